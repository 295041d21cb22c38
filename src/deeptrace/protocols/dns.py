"""DNS over UDP (one message per datagram) and TCP (two-byte length prefix):
id, question name and type, rcode, answer count. Pure functions of bytes."""

from __future__ import annotations

import struct

from deeptrace.protocols.base import Chunk, ConnectionParser, Message, message_from
from deeptrace.protocols.framing import INVALID, NEED_MORE, DirectionFramer, Frame, Framed

PROTOCOL = "dns"
_HEADER = struct.Struct("!HHHHHH")
QTYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA", 33: "SRV",
          35: "NAPTR", 43: "DS", 46: "RRSIG", 48: "DNSKEY", 64: "SVCB", 65: "HTTPS", 255: "ANY", 257: "CAA"}  # fmt: skip
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
MAX_NAME = 255


def _name(buf: bytes, pos: int) -> tuple[str, int] | None:
    """The question name at pos (uncompressed, as questions are) and the offset after it."""
    labels = []
    length = 0
    while pos < len(buf):
        n = buf[pos]
        if n == 0:
            return ".".join(labels) or ".", pos + 1
        if n > 63 or pos + 1 + n > len(buf):
            return None  # a pointer or a label past the end: not a question name
        length += n + 1
        if length > MAX_NAME:
            return None
        labels.append(buf[pos + 1 : pos + 1 + n].decode("ascii", "replace").lower())
        pos += 1 + n
    return None


def parse(msg: bytes) -> dict | None:
    """Fields of one DNS message, or None if these bytes are not one."""
    if len(msg) < _HEADER.size:
        return None
    ident, flags, qd, an, _ns, _ar = _HEADER.unpack_from(msg)
    opcode = (flags >> 11) & 0xF
    if qd != 1 or opcode > 2 or flags & 0x0040:  # one question, QUERY/IQUERY/STATUS, Z bit clear
        return None
    name = _name(msg, _HEADER.size)
    if name is None or name[1] + 4 > len(msg):
        return None
    qtype, qclass = struct.unpack_from("!HH", msg, name[1])
    if qclass not in (1, 3, 4, 255) or qtype == 0:
        return None
    return {"id": ident, "response": bool(flags & 0x8000), "rcode": flags & 0xF, "name": name[0],
            "qtype": QTYPES.get(qtype, str(qtype)), "answers": an, "truncated": bool(flags & 0x0200)}  # fmt: skip


def starts_message_udp(data: bytes) -> bool:
    return parse(data) is not None


def starts_message_tcp(data: bytes) -> bool:
    return len(data) >= 2 + _HEADER.size and parse(data[2 : 2 + int.from_bytes(data[:2], "big")]) is not None


def looks_like(data: bytes) -> bool | None:
    """Whether data is a DNS query (True), a response (False), or not DNS (None)."""
    fields = parse(data)
    if fields is None and starts_message_tcp(data):
        fields = parse(data[2 : 2 + int.from_bytes(data[:2], "big")])
    if fields is None:
        return None
    return not fields["response"]


def frame_tcp(buf: bytes) -> Frame | str:
    if len(buf) < 2:
        return NEED_MORE
    length = int.from_bytes(buf[:2], "big")
    if len(buf) < 2 + min(length, 512):  # the question is near the start: that much is enough
        return NEED_MORE if length >= _HEADER.size else INVALID
    fields = parse(buf[2 : 2 + length])
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
        if not self._tcp:
            framer.in_step = True  # every datagram stands alone
            chunk = Chunk(chunk.data, len(chunk.data), chunk.start_ns, chunk.end_ns, chunk.tid, chunk.seq)
        return [self._message(f) for f in framer.feed(chunk) if f.fields["response"] != is_request]

    @staticmethod
    def _message(f: Framed) -> Message:
        fields = f.fields
        attrs = {"dns.question.name": fields["name"], "dns.question.type": fields["qtype"], "dns.id": fields["id"]}
        if not fields["response"]:
            return message_from(f, PROTOCOL, True, name=f"DNS {fields['qtype']} {fields['name']}",
                                pair_key=fields["id"], attributes=attrs, head=f.head)  # fmt: skip
        rcode = RCODES.get(fields["rcode"], str(fields["rcode"]))
        attrs.update({"dns.response.code": rcode, "dns.answers": fields["answers"]})
        if fields["truncated"]:
            attrs["dns.truncated"] = True
        return message_from(f, PROTOCOL, False, error=fields["rcode"] != 0, status_code=rcode, pair_key=fields["id"],
                            attributes=attrs, head=f.head)  # fmt: skip
