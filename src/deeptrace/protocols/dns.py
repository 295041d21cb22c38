"""DNS over UDP (one message per datagram) and TCP (two-byte length prefix):
id, question name and type, rcode, answer count. Pure functions of bytes."""

from __future__ import annotations

import struct

from deeptrace.protocols.base import Chunk, ConnectionParser, Message, message_from
from deeptrace.protocols.framing import INVALID, NEED_MORE, DirectionFramer, Frame, Framed

PROTOCOL = "dns"
_HEADER = struct.Struct("!HHHHHH")
# IANA's resource record types, but for the obsolete and experimental ones.
QTYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 10: "NULL", 11: "WKS", 12: "PTR", 13: "HINFO", 14: "MINFO", 15: "MX",
          16: "TXT", 17: "RP", 18: "AFSDB", 24: "SIG", 25: "KEY", 28: "AAAA", 29: "LOC", 30: "NXT", 33: "SRV",
          35: "NAPTR", 36: "KX", 37: "CERT", 39: "DNAME", 41: "OPT", 42: "APL", 43: "DS", 44: "SSHFP",
          45: "IPSECKEY", 46: "RRSIG", 47: "NSEC", 48: "DNSKEY", 49: "DHCID", 50: "NSEC3", 51: "NSEC3PARAM",
          52: "TLSA", 53: "SMIMEA", 55: "HIP", 59: "CDS", 60: "CDNSKEY", 61: "OPENPGPKEY", 62: "CSYNC",
          63: "ZONEMD", 64: "SVCB", 65: "HTTPS", 99: "SPF", 108: "EUI48", 109: "EUI64", 249: "TKEY", 250: "TSIG",
          251: "IXFR", 252: "AXFR", 255: "ANY", 256: "URI", 257: "CAA", 32769: "DLV"}  # fmt: skip
# The operations a server takes (6, DSO, is TCP-only and has no question); a QUERY is the span's default.
OPCODES = {0: "QUERY", 1: "IQUERY", 2: "STATUS", 4: "NOTIFY", 5: "UPDATE"}
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED", 6: "YXDOMAIN",
          7: "YXRRSET", 8: "NXRRSET", 9: "NOTAUTH", 10: "NOTZONE"}  # fmt: skip
CLASSES = (1, 3, 4, 254, 255)  # IN, CH, HS, NONE, ANY
MAX_NAME = 255
MAX_POINTERS = 16


def _name(buf: bytes, pos: int) -> tuple[str | None, int | None]:
    """The name at pos and the offset after it in place. Either is None when it cannot be read:
    the name for a pointer that loops or a label too long, both when the message ends inside it."""
    labels: list[str] = []
    after: int | None = None  # where the name ends in place, once a pointer has been followed
    length = 0
    for _ in range(MAX_NAME + MAX_POINTERS):
        if pos >= len(buf):
            return None, after
        n = buf[pos]
        if n == 0:
            return ".".join(labels) or ".", pos + 1 if after is None else after
        if n >= 0xC0:  # a pointer, which names usually only use outside the question
            if pos + 2 > len(buf):
                return None, after
            after = pos + 2 if after is None else after
            pos = ((n & 0x3F) << 8) | buf[pos + 1]
            continue
        length += n + 1
        if n > 63 or length > MAX_NAME:
            return None, after
        labels.append(buf[pos + 1 : pos + 1 + n].decode("ascii", "replace").lower())
        pos += 1 + n
    return None, after  # pointers that loop


def _header(msg: bytes, size: int) -> dict | None:
    """The header's fields if they are those of a DNS message of `size` bytes: a known operation,
    the reserved bit clear, no error in a request, a question, and no more records than the
    message could hold."""
    if len(msg) < _HEADER.size:
        return None
    ident, flags, qd, an, ns, ar = _HEADER.unpack_from(msg)
    opcode, rcode, response = (flags >> 11) & 0xF, flags & 0xF, bool(flags & 0x8000)
    if opcode not in OPCODES or flags & 0x0040 or (rcode and not response):
        return None
    if not 1 <= qd <= size - _HEADER.size or an + ns + ar > size:
        return None
    return {"id": ident, "response": response, "rcode": rcode, "opcode": OPCODES[opcode], "answers": an,
            "truncated": bool(flags & 0x0200), "questions": qd}  # fmt: skip


def _question(msg: bytes) -> tuple[str | None, str | None, bool]:
    """The first question's name and type, as far as they can be read, and whether all of it was
    (a class among the known ones included)."""
    name, end = _name(msg, _HEADER.size)
    if end is None or end + 4 > len(msg):
        return name, None, False
    qtype, qclass = struct.unpack_from("!HH", msg, end)
    return name, QTYPES.get(qtype, str(qtype)), name is not None and qtype != 0 and qclass in CLASSES


def parse(msg: bytes, whole: bool = False, size: int | None = None) -> dict | None:
    """Fields of one DNS message, or None if these bytes are not one. A sound header is enough for
    a message (a name or type that cannot be read is left out) unless whole is asked for: with
    whole, the question must be readable too (what detection asks of bytes not yet known as DNS).
    `size`: the message's length when msg is only its first bytes."""
    fields = _header(msg, len(msg) if size is None else size)
    if fields is None:
        return None
    name, qtype, readable = _question(msg)
    if whole and not readable:
        return None
    fields.update(name=name, qtype=qtype)
    return fields


def starts_message_udp(data: bytes) -> bool:
    return parse(data) is not None


def _tcp_message(data: bytes) -> bytes:
    return data[2 : 2 + int.from_bytes(data[:2], "big")]


def starts_message_tcp(data: bytes) -> bool:
    """Getting back in step mid-stream: only on a message read whole."""
    return len(data) >= 2 + _HEADER.size and parse(_tcp_message(data), whole=True) is not None


def looks_like(data: bytes) -> bool | None:
    """Whether data is a DNS query (True), a response (False), or not DNS (None).

    A datagram whose question cannot be read still is DNS by its header alone (a malformed query
    gets its span), unless it could be a TCP message's length prefix and start: TCP streams carry
    other protocols, so they are only taken on a question read whole."""
    fields = parse(data, whole=True)
    if fields is None and starts_message_tcp(data):
        fields = parse(_tcp_message(data), whole=True)
    if fields is None and int.from_bytes(data[:2], "big") != len(data) - 2:
        fields = parse(data)
    if fields is None:
        return None
    return not fields["response"]


def frame_tcp(buf: bytes) -> Frame | str:
    if len(buf) < 2:
        return NEED_MORE
    length = int.from_bytes(buf[:2], "big")
    if len(buf) < 2 + min(length, 512):  # the question is near the start: that much is enough
        return NEED_MORE if length >= _HEADER.size else INVALID
    fields = parse(_tcp_message(buf))
    return INVALID if fields is None else Frame(2 + length, fields)


def _frame_udp(buf: bytes) -> Frame | str:
    fields = parse(buf)
    return INVALID if fields is None else Frame(len(buf), fields)


class DnsConnection(ConnectionParser):
    """A UDP peer or a TCP connection. Requests and responses pair by DNS id."""

    protocol = PROTOCOL

    def __init__(self, tcp: bool) -> None:
        self._tcp = tcp
        frame, starts = (frame_tcp, starts_message_tcp) if tcp else (_frame_udp, starts_message_udp)
        self._sides = {True: DirectionFramer(frame, starts), False: DirectionFramer(frame, starts)}

    def feed(self, is_request: bool, chunk: Chunk) -> list[Message]:
        framer = self._sides[is_request]
        if self._tcp:
            return [self._message(f) for f in framer.feed(chunk) if f.fields["response"] != is_request]
        # Every datagram stands alone, and is framed by the bytes captured of it (a long
        # response's head is enough); its size is the datagram's.
        framer.in_step = True
        captured = Chunk(chunk.data, len(chunk.data), chunk.start_ns, chunk.end_ns, chunk.tid, chunk.seq)
        messages = [self._message(f) for f in framer.feed(captured) if f.fields["response"] != is_request]
        for msg in messages:
            msg.size = chunk.size
        return messages

    @staticmethod
    def _message(f: Framed) -> Message:
        fields = f.fields
        if not fields["response"]:
            return message_from(f, PROTOCOL, True, name=span_name(fields), pair_key=fields["id"],
                                attributes=request_attributes(fields), head=f.head)  # fmt: skip
        return message_from(f, PROTOCOL, False, error=fields["rcode"] != 0, status_code=response_code(fields),
                            pair_key=fields["id"], attributes=response_attributes(fields), head=f.head)  # fmt: skip


def request_attributes(fields: dict) -> dict:
    attrs = {"dns.id": fields["id"]}
    for key, attr in (("name", "dns.question.name"), ("qtype", "dns.question.type")):
        if fields[key] is not None:
            attrs[attr] = fields[key]
    if fields["opcode"] != "QUERY":
        attrs["dns.opcode"] = fields["opcode"]
    return attrs


def response_code(fields: dict) -> str:
    return RCODES.get(fields["rcode"], str(fields["rcode"]))


def response_attributes(fields: dict) -> dict:
    """A response's attributes: those of its question (it repeats it) and its outcome."""
    attrs = request_attributes(fields)
    attrs.update({"dns.response.code": response_code(fields), "dns.answers": fields["answers"]})
    if fields["truncated"]:
        attrs["dns.truncated"] = True
    return attrs


def span_name(fields: dict) -> str:
    """`DNS A example.org`; other operations than a query say theirs (`DNS UPDATE SOA zone`), and
    what of the question could not be read is left out."""
    words = ["DNS", fields["opcode"] if fields["opcode"] != "QUERY" else None, fields["qtype"], fields["name"]]
    return " ".join(w for w in words if w is not None)
