"""Apache Dubbo's "dubbo" protocol (Dubbo 2 and the dubbo protocol of Dubbo 3): the 16-byte
header (magic 0xdabb, flags, status, request id, body length), and from a hessian2 body the
service, its version and the method of a request, the result flag or error text of a response.
Requests pair with responses by request id; heartbeats and other events are not spans.
Pure functions of bytes."""

from __future__ import annotations

import struct

from deeptrace.protocols.base import Message, message_from
from deeptrace.protocols.framing import INVALID, NEED_MORE, DirectionFramer, Frame, Framed, FramedConnection

PROTOCOL = "dubbo"
HEADER = struct.Struct("!HBBqi")  # magic, flags, status, request id, body length
MAGIC = 0xDABB
FLAG_REQUEST, FLAG_TWO_WAY, FLAG_EVENT = 0x80, 0x40, 0x20
HESSIAN2 = 2
SERIALIZATIONS = {1: "dubbo", 2: "hessian2", 3: "java", 4: "compactedjava", 6: "fastjson", 7: "nativejava", 8: "kryo", 9: "fst",
                  10: "native-hessian", 11: "protostuff", 12: "avro", 21: "gson", 22: "protobuf-json",
                  23: "fastjson2"}  # fmt: skip
STATUSES = {20: "OK", 30: "CLIENT_TIMEOUT", 31: "SERVER_TIMEOUT", 35: "CHANNEL_INACTIVE", 40: "BAD_REQUEST",
            50: "BAD_RESPONSE", 60: "SERVICE_NOT_FOUND", 70: "SERVICE_ERROR", 80: "SERVER_ERROR", 90: "CLIENT_ERROR",
            100: "SERVER_THREADPOOL_EXHAUSTED_ERROR"}  # fmt: skip
# The result flag that starts an OK response body: 0 and 3 carry an exception the provider threw.
RESULT_FLAGS = {0: "exception", 1: "value", 2: "null", 3: "exception", 4: "value", 5: "null"}
REQUEST_STRINGS = ("dubbo_version", "service", "service_version", "method", "parameter_types")
MAX_BODY = 1 << 30  # a body length above this is not Dubbo (its own default limit is 8 MiB)
MAX_TEXT = 1024  # characters read of one hessian2 string
LOOK = 4096  # body bytes read for the leading strings: more is never waited for


class _Short(Exception):
    """The buffer ends inside the value."""


class _Bad(Exception):
    """Not the hessian2 value expected."""


def _string(buf: bytes, pos: int) -> tuple[str | None, int]:
    """A hessian2 string (or null) at pos: its text, cut at MAX_TEXT characters, and its end.

    Lengths count UTF-16 units, not bytes, so the UTF-8 is walked character by character; a
    4-byte sequence is two units (Java writes those as two 3-byte surrogates, also two)."""
    if pos >= len(buf):
        raise _Short
    tag = buf[pos]
    if tag == 0x4E:  # 'N'
        return None, pos + 1
    parts: list[bytes] = []
    kept = 0
    while True:
        if pos >= len(buf):
            raise _Short
        tag = buf[pos]
        final = True
        if tag <= 0x1F:  # short string, length in the tag
            n, pos = tag, pos + 1
        elif 0x30 <= tag <= 0x33:  # medium string, length in the tag and one byte
            if pos + 2 > len(buf):
                raise _Short
            n, pos = ((tag - 0x30) << 8) | buf[pos + 1], pos + 2
        elif tag in (0x52, 0x53):  # 'R' a chunk with more to follow, 'S' the final chunk
            if pos + 3 > len(buf):
                raise _Short
            n, pos, final = (buf[pos + 1] << 8) | buf[pos + 2], pos + 3, tag == 0x53
        else:
            raise _Bad
        start = pos
        if buf[pos : pos + n].isascii() and pos + n <= len(buf):  # the usual case: one byte a character
            pos, n = pos + n, 0
        while n > 0:
            if pos >= len(buf):
                raise _Short
            lead = buf[pos]
            width = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
            pos += width
            n -= 2 if width == 4 else 1
        if pos > len(buf):
            raise _Short
        if kept < MAX_TEXT:
            parts.append(buf[start:pos])
            kept += pos - start
        if final:
            return _decode(b"".join(parts))[:MAX_TEXT], pos


def _decode(raw: bytes) -> str:
    """Java writes a character beyond 16 bits as two 3-byte surrogates (CESU-8): join them."""
    try:
        return raw.decode("utf-8", "surrogatepass").encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace")


def _header(buf: bytes) -> tuple[int, int, int, int] | None:
    """(flags, status, request id, body length) of a plausible header, or None."""
    if len(buf) < 16:
        return None
    magic, flags, status, rid, body = HEADER.unpack_from(buf)
    if magic != MAGIC or not 0 <= body <= MAX_BODY or flags & 0x1F not in SERIALIZATIONS:
        return None
    # A response says how the call went; a request leaves the byte zero (the Java library does).
    if status not in STATUSES and (status != 0 or not flags & FLAG_REQUEST):
        return None
    return flags, status, rid, body


def _frame(buf: bytes, requests: bool) -> Frame | str:
    if len(buf) < 16:
        return NEED_MORE if buf[:2] in (b"\xda\xbb", b"\xda", b"") else INVALID
    hdr = _header(buf)
    if hdr is None or bool(hdr[0] & FLAG_REQUEST) != requests:
        return INVALID
    flags, status, rid, body = hdr
    end = 16 + body
    fields = {"flags": flags, "status": status, "id": rid, "serialization": SERIALIZATIONS[flags & 0x1F],
              "head_end": 16}  # fmt: skip
    if flags & FLAG_EVENT or flags & 0x1F != HESSIAN2 or body == 0:
        return Frame(end, fields)
    view = buf[:end]
    try:
        _body(view, requests, status, fields)
    except _Short:
        if len(buf) < min(end, 16 + LOOK):
            return NEED_MORE  # the leading strings are near the start: wait for them
    except _Bad:
        pass  # a body we cannot read: the frame still says where the message ends
    return Frame(end, fields)


def _body(buf: bytes, requests: bool, status: int, fields: dict) -> None:
    """The leading values of a hessian2 body: a request's dubbo version, service path,
    service version, method name and parameter types; a response's result flag (OK) or
    error text (otherwise)."""
    if requests:
        pos = 16
        for name in REQUEST_STRINGS:  # each kept as soon as read: a cut body still names what it can
            fields[name], pos = _string(buf, pos)
            fields["head_end"] = pos
        return
    if status != 20:
        fields["error_message"], fields["head_end"] = _string(buf, 16)
        return
    if len(buf) < 17:
        raise _Short
    tag = buf[16]
    if not 0x90 <= tag <= 0x95:  # hessian2's one-byte int: 0x90 + value
        raise _Bad
    fields["result"], fields["head_end"] = RESULT_FLAGS[tag - 0x90], 17
    if fields["result"] == "exception" and len(buf) > 18 and buf[17] == 0x43:  # 'C': the exception's class
        try:
            fields["exception"], _ = _string(buf, 18)
        except (_Short, _Bad):
            pass


def frame_request(buf: bytes) -> Frame | str:
    return _frame(buf, True)


def frame_response(buf: bytes) -> Frame | str:
    return _frame(buf, False)


def starts_request(data: bytes) -> bool:
    hdr = _header(data)
    return hdr is not None and bool(hdr[0] & FLAG_REQUEST)


def starts_response(data: bytes) -> bool:
    hdr = _header(data)
    return hdr is not None and not hdr[0] & FLAG_REQUEST


def _salvage(buf: bytes, requests: bool) -> dict | None:
    """What a header says of a message whose leading strings were not captured."""
    hdr = _header(buf)
    if hdr is None or bool(hdr[0] & FLAG_REQUEST) != requests:
        return None
    fields = {"flags": hdr[0], "status": hdr[1], "id": hdr[2], "serialization": SERIALIZATIONS[hdr[0] & 0x1F],
              "head_end": 16}  # fmt: skip
    if hdr[0] & 0x1F == HESSIAN2 and not hdr[0] & FLAG_EVENT:
        try:
            _body(buf, requests, hdr[1], fields)
        except (_Short, _Bad):
            pass
    return fields


class DubboConnection(FramedConnection):
    protocol = PROTOCOL

    def __init__(self) -> None:
        super().__init__(DirectionFramer(frame_request, starts_request, lambda b: _salvage(b, True)),
                         DirectionFramer(frame_response, starts_response, lambda b: _salvage(b, False)))  # fmt: skip

    @staticmethod
    def _request(f: Framed) -> Message | None:
        fields = f.fields
        if fields["flags"] & FLAG_EVENT:
            return None  # a heartbeat or another event: no call
        service, method = fields.get("service"), fields.get("method")
        attrs = {"rpc.system": "apache_dubbo", "rpc.apache_dubbo.serialization": fields["serialization"]}
        if service:
            attrs["rpc.service"] = service
        if method:
            attrs["rpc.method"] = method
        if fields.get("service_version"):
            attrs["rpc.apache_dubbo.service_version"] = fields["service_version"]
        if fields.get("dubbo_version"):
            attrs["rpc.apache_dubbo.version"] = fields["dubbo_version"]
        if fields.get("parameter_types") is not None:
            attrs["rpc.apache_dubbo.parameter_types"] = fields["parameter_types"]
        name = f"dubbo {service}/{method}" if service and method else f"dubbo {service or 'call'}"
        two_way = bool(fields["flags"] & FLAG_TWO_WAY)
        # The head stops before the arguments and attachments: the attachments carry Dubbo's
        # token (token authentication) and arguments can carry anything.
        return message_from(f, PROTOCOL, True, name=name, attributes=attrs, head=f.head[: fields["head_end"]],
                            pair_key=fields["id"] if two_way else None, expects_response=two_way)  # fmt: skip

    @staticmethod
    def _response(f: Framed) -> Message | None:
        fields = f.fields
        if fields["flags"] & FLAG_EVENT:
            return None
        code = STATUSES[fields["status"]]
        attrs = {"rpc.apache_dubbo.status": code}
        error = code != "OK"
        if error and fields.get("error_message"):
            attrs["rpc.apache_dubbo.error_message"] = fields["error_message"]
        if fields.get("result") == "exception":  # the provider threw: the call failed though delivered
            error, code = True, "EXCEPTION"
            if fields.get("exception"):
                attrs["error.type"] = fields["exception"]
        elif error:
            attrs["error.type"] = code
        return message_from(f, PROTOCOL, False, error=error, status_code=code, pair_key=fields["id"],
                            attributes=attrs, head=f.head[: fields["head_end"]])  # fmt: skip
