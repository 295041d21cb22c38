"""Apache Thrift: binary (strict and old non-strict) and compact protocols, framed and
unframed (buffered) transports. Method, service of a multiplexed call, seqid pairing,
one-way calls, TApplicationException and declared exceptions. Pure functions of bytes.

Unframed messages carry no length: their end is found by walking the argument or
result struct, with bounds on depth and on the fields and elements walked.
"""

from __future__ import annotations

import re
import struct
from collections import deque
from typing import ClassVar

from deeptrace.protocols.base import Message, message_from
from deeptrace.protocols.framing import INVALID, NEED_MORE, DirectionFramer, Frame, Framed, FramedConnection

PROTOCOL = "thrift"
CALL, REPLY, EXCEPTION, ONEWAY = 1, 2, 3, 4
REQUESTS = (CALL, ONEWAY)
RESPONSES = (REPLY, EXCEPTION)
MAX_NAME = 255
MIN_MESSAGE = 6  # the smallest message: a compact header with a 1-letter name, an empty struct
MAX_FRAME = 1 << 28  # a 4-byte length above this is not a frame (libraries default to 16 MB)
MAX_DEPTH = 64  # the libraries' own recursion limit
MAX_STEPS = 1 << 17  # fields and elements walked in one message: more than a 64 KiB buffer holds
MAX_TEXT = 256
MAX_WAITING = 1024  # seqids remembered per connection for pairing
# Method names are identifiers; a multiplexed call prefixes "Service:".
_NAME = re.compile(rb"[A-Za-z_][A-Za-z0-9_.:$-]*")
_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")
APPLICATION_ERRORS = {0: "UNKNOWN", 1: "UNKNOWN_METHOD", 2: "INVALID_MESSAGE_TYPE", 3: "WRONG_METHOD_NAME",
                      4: "BAD_SEQUENCE_ID", 5: "MISSING_RESULT", 6: "INTERNAL_ERROR", 7: "PROTOCOL_ERROR",
                      8: "INVALID_TRANSFORM", 9: "INVALID_PROTOCOL", 10: "UNSUPPORTED_CLIENT_TYPE"}  # fmt: skip


class _Short(Exception):
    """The buffer ends inside the message."""


class _Bad(Exception):
    """Not Thrift."""


class _Binary:
    """TBinaryProtocol values, walked over a buffer. Types: the binary protocol's codes."""

    STOP, STRING, I32, STRUCT = 0, 11, 8, 12
    _FIXED: ClassVar[dict[int, int]] = {2: 1, 3: 1, 4: 8, 6: 2, 8: 4, 10: 8, 16: 16}  # bool byte double i16 i32 i64 uuid

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.steps = 0

    def need(self, end: int) -> None:
        if end > len(self.buf):
            raise _Short

    def i32(self, pos: int) -> tuple[int, int]:
        self.need(pos + 4)
        return _I32.unpack_from(self.buf, pos)[0], pos + 4

    def string(self, pos: int) -> tuple[bytes, int]:
        n, pos = self.i32(pos)
        if n < 0:
            raise _Bad
        self.need(pos + n)
        return self.buf[pos : pos + n], pos + n

    def field(self, pos: int, last_id: int) -> tuple[int, int, int]:
        """(type, id, position of the value); type STOP ends the struct."""
        self.need(pos + 1)
        kind = self.buf[pos]
        if kind == 0:
            return 0, 0, pos + 1
        self.need(pos + 3)
        return kind, _I16.unpack_from(self.buf, pos + 1)[0], pos + 3

    def skip(self, pos: int, kind: int, depth: int, element: bool = False) -> int:
        """End of the value of this type at pos (element: inside a list, set or map)."""
        self.steps += 1
        if depth > MAX_DEPTH or self.steps > MAX_STEPS:
            raise _Bad
        size = self._FIXED.get(kind)
        if size is not None:
            self.need(pos + size)
            return pos + size
        if kind == 11:
            n, pos = self.i32(pos)
            if n < 0:
                raise _Bad
            self.need(pos + n)
            return pos + n
        if kind == 12:
            last = 0
            while True:
                ftype, last, pos = self.field(pos, last)
                if ftype == 0:
                    return pos
                pos = self.skip(pos, ftype, depth + 1)
        if kind == 13:  # map: key type, value type, count
            self.need(pos + 6)
            ktype, vtype = self.buf[pos], self.buf[pos + 1]
            n, pos = self.i32(pos + 2)
            return self._elements(pos, n, (ktype, vtype), depth)
        if kind in (14, 15):  # set, list: element type, count
            self.need(pos + 5)
            etype = self.buf[pos]
            n, pos = self.i32(pos + 1)
            return self._elements(pos, n, (etype,), depth)
        raise _Bad

    def _elements(self, pos: int, n: int, types: tuple[int, ...], depth: int) -> int:
        if n < 0:
            raise _Bad
        sizes = [self._FIXED.get(t) for t in types]
        if None not in sizes:  # fixed-size elements: no need to walk them one by one
            self.need(pos + n * sum(sizes))
            return pos + n * sum(sizes)
        for _ in range(n):  # every element takes at least one byte: the buffer ends the loop
            for t in types:
                pos = self.skip(pos, t, depth + 1, True)
        return pos


class _Compact(_Binary):
    """TCompactProtocol values. Types: the compact protocol's codes."""

    STOP, STRING, I32, STRUCT = 0, 8, 5, 12
    _FIXED: ClassVar[dict[int, int]] = {3: 1, 7: 8, 13: 16}  # byte double uuid (bools are in the field header, or a byte in lists)
    _VARINT = (4, 5, 6)  # i16 i32 i64

    def varint(self, pos: int, limit: int = 10) -> tuple[int, int]:
        value = shift = 0
        for i in range(limit):
            self.need(pos + i + 1)
            b = self.buf[pos + i]
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value, pos + i + 1
            shift += 7
        raise _Bad

    def i32(self, pos: int) -> tuple[int, int]:
        raw, pos = self.varint(pos, 5)
        return (raw >> 1) ^ -(raw & 1), pos  # zigzag

    def string(self, pos: int) -> tuple[bytes, int]:
        n, pos = self.varint(pos, 5)
        self.need(pos + n)
        return self.buf[pos : pos + n], pos + n

    def field(self, pos: int, last_id: int) -> tuple[int, int, int]:
        self.need(pos + 1)
        b = self.buf[pos]
        if b == 0:
            return 0, 0, pos + 1
        kind, delta = b & 0x0F, b >> 4
        if delta:
            return kind, last_id + delta, pos + 1
        raw, pos = self.varint(pos + 1, 3)
        return kind, (raw >> 1) ^ -(raw & 1), pos

    def skip(self, pos: int, kind: int, depth: int, element: bool = False) -> int:
        self.steps += 1
        if depth > MAX_DEPTH or self.steps > MAX_STEPS:
            raise _Bad
        if kind in (1, 2):  # a bool field carries its value in its header; an element is a byte
            if element:
                self.need(pos + 1)
                return pos + 1
            return pos
        size = self._FIXED.get(kind)
        if size is not None:
            self.need(pos + size)
            return pos + size
        if kind in self._VARINT:
            return self.varint(pos)[1]
        if kind == 8:
            return self.string(pos)[1]
        if kind == 12:
            last = 0
            while True:
                ftype, last, pos = self.field(pos, last)
                if ftype == 0:
                    return pos
                pos = self.skip(pos, ftype, depth + 1)
        if kind in (9, 10):  # list, set: size and type in one byte, a varint size if it is 15
            self.need(pos + 1)
            b = self.buf[pos]
            n, pos = (b >> 4, pos + 1) if b >> 4 != 15 else self.varint(pos + 1, 5)
            return self._elements(pos, n, (b & 0x0F,), depth)
        if kind == 11:  # map: varint size, then key and value types unless empty
            n, pos = self.varint(pos, 5)
            if n == 0:
                return pos
            self.need(pos + 1)
            b = self.buf[pos]
            return self._elements(pos + 1, n, (b >> 4, b & 0x0F), depth)
        raise _Bad


def _name(raw: bytes) -> str:
    if not 0 < len(raw) <= MAX_NAME or not _NAME.fullmatch(raw):
        raise _Bad
    return raw.decode("ascii")


def _header(buf: bytes, pos: int) -> tuple[_Binary, dict, int]:
    """The message header at pos: (walker for its protocol, fields, offset of its struct)."""
    if pos >= len(buf):
        raise _Short
    first = buf[pos]
    if first == 0x80:  # strict binary: version 1 word with the type in its low byte
        w = _Binary(buf)
        w.need(pos + 4)
        if buf[pos + 1] != 1 or buf[pos + 2] != 0:
            raise _Bad
        kind = buf[pos + 3]
        _check_name_length(w, pos + 4)
        raw, p = w.string(pos + 4)
        seqid, p = w.i32(p)
        proto = "binary"
    elif first == 0x82:  # compact: protocol id, then version 1 and the type in one byte
        w = _Compact(buf)
        w.need(pos + 2)
        if buf[pos + 1] & 0x1F != 1:
            raise _Bad
        kind = buf[pos + 1] >> 5
        seqid, p = w.varint(pos + 2, 5)
        seqid = struct.unpack("!i", struct.pack("!I", seqid & 0xFFFFFFFF))[0]
        n, p = w.varint(p, 2)
        if not 0 < n <= MAX_NAME:
            raise _Bad
        w.need(p + n)
        raw, p = buf[p : p + n], p + n
        proto = "compact"
    elif first == 0:  # old non-strict binary: the name comes first, then a type byte
        w = _Binary(buf)
        _check_name_length(w, pos)
        raw, p = w.string(pos)
        w.need(p + 1)
        kind = buf[p]
        seqid, p = w.i32(p + 1)
        proto = "binary-old"
    else:
        raise _Bad
    if kind not in (CALL, REPLY, EXCEPTION, ONEWAY):
        raise _Bad
    return w, {"type": kind, "method": _name(raw), "seqid": seqid, "protocol": proto}, p


def _check_name_length(w: _Binary, pos: int) -> None:
    """A name length beyond any method name is not Thrift (rather than a name not all here)."""
    if not 0 < w.i32(pos)[0] <= MAX_NAME:
        raise _Bad


def _outcome(w: _Binary, pos: int, fields: dict) -> int:
    """Walk a result struct (REPLY) or TApplicationException (EXCEPTION) at pos, noting in
    fields what says how the call ended; returns the struct's end."""
    last = 0
    while True:
        ftype, last, pos = w.field(pos, last)
        if ftype == 0:
            return pos
        if fields["type"] == REPLY:
            fields.setdefault("result_field", last)  # 0 is the return value; others declared exceptions
            if last != 0 and ftype == w.STRUCT and "message" not in fields:
                fields["message"] = _first_string(w, pos)
        elif last == 1 and ftype == w.STRING:
            fields["message"] = w.string(pos)[0][:MAX_TEXT].decode("utf-8", "replace")
        elif last == 2 and ftype == w.I32:
            fields["app_error"] = w.i32(pos)[0]
        pos = w.skip(pos, ftype, 1)


def _first_string(w: _Binary, pos: int) -> str | None:
    """An exception struct's first field, if it is a string: its message, in nearly every IDL."""
    try:
        ftype, _, pos = w.field(pos, 0)
        return w.string(pos)[0][:MAX_TEXT].decode("utf-8", "replace") if ftype == w.STRING else None
    except _Short:
        return None


def _frame_length(buf: bytes) -> int | None:
    """The length of a framed message (TFramedTransport) starting buf, None if unframed.
    An unframed message starts with 0x80 or 0x82 (strict, compact) or with an old header's
    name length, whose next byte is the name's first letter; a frame's payload starts with
    0x80, 0x82 or an old header's zero byte."""
    if len(buf) < 5 or buf[0] in (0x80, 0x82) or buf[4] not in (0x80, 0x82, 0):
        return None
    length = _I32.unpack_from(buf)[0]
    if not MIN_MESSAGE <= length <= MAX_FRAME:
        raise _Bad
    return length


def _length_only(buf: bytes) -> bool:
    """Four bytes that can be a frame's length alone: TFramedTransport reads those first."""
    return len(buf) == 4 and MIN_MESSAGE <= _I32.unpack_from(buf)[0] <= MAX_FRAME


def _frame(buf: bytes, kinds: tuple[int, int]) -> Frame | str:
    if len(buf) < 5 and buf[:1] not in (b"\x80", b"\x82"):
        # A frame's length, or an old header's name length: the next byte tells which.
        return NEED_MORE if len(buf) < 4 or 0 < _I32.unpack_from(buf)[0] <= MAX_FRAME else INVALID
    try:
        framed = _frame_length(buf)
        w, fields, body = _header(buf, 0 if framed is None else 4)
        if fields["type"] not in kinds:
            return INVALID
        fields["framed"], fields["head_end"] = framed is not None, body
        if framed is None:  # the end is where the struct ends
            end = _outcome(w, body, fields) if fields["type"] in RESPONSES else w.skip(body, w.STRUCT, 0)
            return Frame(end, fields)
    except _Short:
        return NEED_MORE
    except _Bad:
        return INVALID
    end = 4 + framed
    if body > end:
        return INVALID
    if fields["type"] in RESPONSES:
        w.buf = buf[:end]  # a struct running past its frame is cut there
        try:
            _outcome(w, body, fields)
        except _Short:
            # How the call ended is said at the struct's start: wait for that unless the frame is all here.
            if fields["type"] == REPLY and "result_field" not in fields and len(buf) < min(end, body + 4):
                return NEED_MORE
        except _Bad:
            pass  # the frame says where the message ends; its content is not ours to judge
    return Frame(end, fields)


def frame_request(buf: bytes) -> Frame | str:
    return _frame(buf, REQUESTS)


def frame_response(buf: bytes) -> Frame | str:
    return _frame(buf, RESPONSES)


def _salvage(buf: bytes) -> dict | None:
    """The header of a message whose end was not captured."""
    try:
        framed = _frame_length(buf)
        w, fields, body = _header(buf, 0 if framed is None else 4)
    except (_Short, _Bad):
        return None
    fields["framed"], fields["head_end"] = framed is not None, body
    if fields["type"] in RESPONSES:
        try:
            _outcome(w, body, fields)
        except (_Short, _Bad):
            pass
    return fields


def _starts(data: bytes, kinds: tuple[int, int]) -> bool:
    """A message of these types begins here (framed or not): its header is all here and plausible."""
    try:
        _, fields, _ = _header(data, 0 if _frame_length(data) is None else 4)
    except (_Short, _Bad):
        return False
    return fields["type"] in kinds


def starts_request(data: bytes) -> bool:
    return _starts(data, REQUESTS)


def starts_response(data: bytes) -> bool:
    return _starts(data, RESPONSES)


def _salvage_request(buf: bytes) -> dict | None:
    fields = _salvage(buf)
    return fields if fields is not None and fields["type"] in REQUESTS else None


def _salvage_response(buf: bytes) -> dict | None:
    fields = _salvage(buf)
    return fields if fields is not None and fields["type"] in RESPONSES else None


def _attributes(fields: dict) -> dict:
    return {"rpc.system": "apache_thrift", "rpc.apache_thrift.protocol": fields["protocol"],
            "rpc.apache_thrift.framed": fields["framed"]}  # fmt: skip


class ThriftConnection(FramedConnection):
    protocol = PROTOCOL

    def __init__(self) -> None:
        # Back in step at a syscall that starts a message, or that reads a frame's length alone.
        super().__init__(DirectionFramer(frame_request, lambda d: starts_request(d) or _length_only(d),
                                         _salvage_request),
                         DirectionFramer(frame_response, lambda d: starts_response(d) or _length_only(d),
                                         _salvage_response))  # fmt: skip
        # seqid -> the pair keys given to its calls still waiting, oldest first. Clients
        # that number their calls pair by seqid; those that send seqid 0 every time (the
        # Python library does) pair in order once two calls with one seqid are waiting.
        self._waiting: dict[int, deque] = {}
        self._count = 0

    def _request(self, f: Framed) -> Message:
        fields = f.fields
        service, _, method = fields["method"].rpartition(":")
        attrs = _attributes(fields)
        attrs["rpc.method"] = method
        if service:
            attrs["rpc.service"] = service
        oneway = fields["type"] == ONEWAY
        key = None
        if not oneway:
            key = self._remember(fields["seqid"])
        # The head stops before the arguments: they can hold credentials (HiveServer2
        # OpenSession, Cassandra login) and there is no general way to find them.
        return message_from(f, PROTOCOL, True, name=f"thrift {service + '/' if service else ''}{method}",
                            attributes=attrs, head=f.head[: fields["head_end"]], pair_key=key,
                            expects_response=not oneway)  # fmt: skip

    def _remember(self, seqid: int) -> object:
        queue = self._waiting.get(seqid)
        key = None if queue else seqid  # the same seqid already waits: in order from here
        if self._count >= MAX_WAITING:
            self._waiting.clear()
            self._count = 0
            queue = None
        if queue is None:
            queue = self._waiting[seqid] = deque()
        queue.append(key)
        self._count += 1
        return key

    def _response(self, f: Framed) -> Message:
        fields = f.fields
        seqid = fields["seqid"]
        queue = self._waiting.get(seqid)
        key = seqid
        if queue:
            key = queue.popleft()
            self._count -= 1
            if not queue:
                del self._waiting[seqid]
        attrs = _attributes(fields)
        error, code = False, None
        if fields["type"] == EXCEPTION:
            error = True
            code = APPLICATION_ERRORS.get(fields.get("app_error", 0), str(fields.get("app_error")))
            attrs["error.type"] = f"TApplicationException {code}"
        elif fields.get("result_field", 0) != 0:
            error, code = True, "DECLARED_EXCEPTION"
            attrs["error.type"] = code
            attrs["rpc.apache_thrift.exception_field_id"] = fields["result_field"]
        if error and fields.get("message"):
            attrs["rpc.apache_thrift.error_message"] = fields["message"]
        return message_from(f, PROTOCOL, False, error=error, status_code=code, pair_key=key, attributes=attrs,
                            head=f.head[: fields["head_end"]])  # fmt: skip
