"""Redis RESP2 and RESP3: command and key of requests (arrays or inline), reply
type and errors of responses, pipelining. Pure functions of bytes."""

from __future__ import annotations

from deeptrace.protocols.base import CONNECTION_SETUP, Message, message_from
from deeptrace.protocols.framing import INVALID, NEED_MORE, DirectionFramer, Frame, Framed, FramedConnection
from deeptrace.protocols.redaction import REDIS_ALL_ARGS

PROTOCOL = "redis"
REPLY_TYPES = frozenset(b"+-:$*_,#!=(%~>|")
AGGREGATES = frozenset(b"*%~>|")  # element counts follow; maps and attributes count pairs
MAX_ELEMENTS = 1 << 20
MAX_DEPTH = 16
MAX_LINE = 64 << 10
# Sent by a client on a connection before it uses it (redis-py: HELLO, then CLIENT SETINFO
# and CLIENT MAINT_NOTIFICATIONS; CLIENT's other subcommands are an operator's, not a request's).
SETUP = frozenset({"HELLO", "AUTH", "SELECT", "READONLY", "CLIENT"})


class _Short(Exception):
    """The buffer ends inside the value."""


class _Bad(Exception):
    """Not RESP."""


def _line(buf: bytes, pos: int) -> tuple[bytes, int]:
    end = buf.find(b"\r\n", pos)
    if end < 0:
        if len(buf) - pos > MAX_LINE:
            raise _Bad
        raise _Short
    return buf[pos:end], end + 2


def _int(raw: bytes) -> int:
    try:
        return int(raw)
    except ValueError:
        raise _Bad from None


def _value(buf: bytes, pos: int, depth: int, keep: list | None) -> int:
    """End offset of the RESP value at pos; appends bulk/simple strings to keep."""
    if pos >= len(buf):
        raise _Short
    kind = buf[pos]
    if kind not in REPLY_TYPES or depth > MAX_DEPTH:
        raise _Bad
    line, pos = _line(buf, pos + 1)
    if kind in b"$!=":  # bulk string, blob error, verbatim string
        n = _int(line)
        if n < 0:
            return pos
        end = pos + n + 2
        if end > len(buf):
            raise _Short
        if keep is not None:
            keep.append(buf[pos : pos + n])
        return end
    if kind in AGGREGATES:
        n = _int(line)
        if n > MAX_ELEMENTS:
            raise _Bad
        count = n * 2 if kind in b"%|" else n
        for _ in range(max(count, 0)):
            pos = _value(buf, pos, depth + 1, keep)
        if kind == ord("|"):  # an attribute precedes the reply it annotates
            pos = _value(buf, pos, depth + 1, None)
        return pos
    if keep is not None:
        keep.append(line)
    return pos


def starts_request(data: bytes) -> bool:
    if data[:1] == b"*":
        return data[1:2].isdigit()
    word = data.split(b" ", 1)[0].split(b"\r\n", 1)[0]
    return 0 < len(word) <= 16 and word.isalpha() and data.find(b"\r\n", 0, MAX_LINE) > 0


def starts_response(data: bytes) -> bool:
    return bool(data) and data[0] in REPLY_TYPES


def frame_request(buf: bytes) -> Frame | str:
    try:
        if buf[:1] == b"*":
            args: list[bytes] = []
            end = _value(buf, 0, 0, args)
        else:  # inline command, as typed into telnet
            line, end = _line(buf, 0)
            args = line.split()
            if not args or not args[0].isalpha():
                return INVALID
    except _Short:
        return NEED_MORE
    except _Bad:
        return INVALID
    if not args:
        return INVALID
    command = args[0].decode("latin-1").upper()
    fields = {"command": command, "args": len(args) - 1}
    if len(args) > 1 and command not in REDIS_ALL_ARGS:  # no password as a key
        fields["key"] = args[1][:128].decode("utf-8", "replace")
    return Frame(end, fields)


def frame_response(buf: bytes) -> Frame | str:
    if not buf:
        return NEED_MORE
    kind = buf[0]
    try:
        if kind == ord("$"):
            # A bulk reply's length is in its header: frame it even when its body is not
            # all captured (large GET values), the rest is skipped as it arrives.
            line, pos = _line(buf, 1)
            n = _int(line)
            return Frame(pos if n < 0 else pos + n + 2, {"type": "nil" if n < 0 else "bulk", "length": max(n, -1)})
        end = _value(buf, 0, 0, None)
    except _Short:
        return NEED_MORE
    except _Bad:
        return INVALID
    fields: dict = {"type": _TYPE_NAMES.get(kind, "?")}
    if kind in b"-!":
        text = buf[1 : buf.find(b"\r\n")] if kind == ord("-") else b""
        fields["error"] = text.decode("utf-8", "replace")
        fields["error_code"] = text.split(b" ", 1)[0].decode("latin-1") if text else "ERR"
    return Frame(end, fields)


_TYPE_NAMES = {
    ord("+"): "simple", ord("-"): "error", ord(":"): "integer", ord("*"): "array", ord("_"): "null",
    ord(","): "double", ord("#"): "boolean", ord("!"): "error", ord("="): "verbatim", ord("("): "bignum",
    ord("%"): "map", ord("~"): "set", ord(">"): "push", ord("|"): "attribute",
}  # fmt: skip


class RedisConnection(FramedConnection):
    protocol = PROTOCOL

    def __init__(self) -> None:
        super().__init__(DirectionFramer(frame_request, starts_request), DirectionFramer(frame_response, starts_response))

    @staticmethod
    def _request(f: Framed) -> Message:
        attrs = {"db.system": "redis", "db.operation.name": f.fields["command"]}
        if "key" in f.fields:
            attrs["db.redis.key"] = f.fields["key"]
        if f.fields["command"] in SETUP:
            attrs[CONNECTION_SETUP] = True
        return message_from(f, PROTOCOL, True, name=f"redis {f.fields['command']}", attributes=attrs,
                            head=f.head)  # fmt: skip

    @staticmethod
    def _response(f: Framed) -> Message | None:
        if f.fields["type"] == "push":
            return None  # RESP3 pushes (pub/sub) answer no request
        error = f.fields["type"] == "error"
        attrs = {"db.redis.reply_type": f.fields["type"]}
        if error:
            attrs["db.response.error"] = f.fields.get("error", "")
        return message_from(f, PROTOCOL, False, error=error, status_code=f.fields.get("error_code") if error else None,
                            attributes=attrs, head=f.head)  # fmt: skip
