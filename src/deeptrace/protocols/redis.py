"""Redis RESP2 and RESP3: command and key of requests (arrays or inline), reply
type and errors of responses, pipelining. Pure functions of bytes."""

from __future__ import annotations

from collections import deque

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
# Commands that get no reply of their own: the server pushes one confirmation per channel, whose
# first element is the command's name in lower case (RESP3 `>`, RESP2 an array).
SUBSCRIPTIONS = frozenset({"SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE"})
CONFIRMATIONS = frozenset(c.lower().encode() for c in SUBSCRIPTIONS)
MAX_SUBSCRIPTIONS_PENDING = 64
MAX_CONFIRMATION = 4096


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


def unmistakable_response(data: bytes) -> bool:
    """Whether a server's first bytes can only be Redis: its answer to PING. Inline PINGs alone
    are as much a NATS keep-alive (protocols.detect waits on them); NATS answers `PONG` with no '+'."""
    return data.startswith(b"+PONG\r\n")


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
    return Frame(end, _command_fields(args, len(args)))


def _command_fields(args: list[bytes], count: int) -> dict:
    """Command, argument count and key of a command's first `args` of `count`."""
    command = args[0].decode("latin-1").upper()
    fields = {"command": command, "args": count - 1}
    if len(args) > 1 and command not in REDIS_ALL_ARGS:  # no password as a key
        fields["key"] = args[1][:128].decode("utf-8", "replace")
    return fields


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
    if kind in b">*":
        fields.update(_confirmation(buf[:end]))
    if kind in b"-!":
        fields.update(_error_fields(buf))
    return Frame(end, fields)


def _error_fields(buf: bytes) -> dict:
    """The message and code ("ERR", "WRONGTYPE") of an error reply; a blob error has no code."""
    text = buf[1:].split(b"\r\n", 1)[0] if buf[0] == ord("-") else b""
    return {"error": text.decode("utf-8", "replace"), "error_code": text.split(b" ", 1)[0].decode("latin-1") or "ERR"}


def _confirmation(reply: bytes) -> dict:
    """{"confirms": COMMAND, "subscriptions": n} when reply is an (un)subscription's confirmation
    [command, channel, subscriptions left]; {} for anything else (a message, a list, a large reply)."""
    if len(reply) > MAX_CONFIRMATION or reply[:4] not in (b">3\r\n", b"*3\r\n") or reply[4:5] != b"$":
        return {}
    elements: list[bytes] = []  # the channel is left out when it is a RESP2 nil
    _value(reply, 0, 0, elements)
    count = reply[reply.rfind(b"\r\n", 0, -2) + 2 : -2]  # the last element's line
    if not elements or elements[0] not in CONFIRMATIONS or count[:1] != b":" or not count[1:].isdigit():
        return {}
    return {"confirms": elements[0].decode().upper(), "subscriptions": int(count[1:])}


_TYPE_NAMES = {
    ord("+"): "simple", ord("-"): "error", ord(":"): "integer", ord("*"): "array", ord("_"): "null",
    ord(","): "double", ord("#"): "boolean", ord("!"): "error", ord("="): "verbatim", ord("("): "bignum",
    ord("%"): "map", ord("~"): "set", ord(">"): "push", ord("|"): "attribute",
}  # fmt: skip


class _Subscription:
    """A (un)subscription command awaiting its confirmations."""

    def __init__(self, command: str, channels: int | None) -> None:
        self.command = command
        self.left = channels  # None: all of them (UNSUBSCRIBE alone), as many as are subscribed
        self.answered = False


class RedisConnection(FramedConnection):
    protocol = PROTOCOL

    def __init__(self) -> None:
        # A command or reply cut by bytes never captured (longer than the capture) is still a
        # message: salvaged from its first bytes, so that pairing stays in order after it.
        super().__init__(DirectionFramer(frame_request, starts_request, request_head_fields),
                         DirectionFramer(frame_response, starts_response, reply_head_fields))  # fmt: skip
        self._subscriptions: deque[_Subscription] = deque(maxlen=MAX_SUBSCRIPTIONS_PENDING)

    def _request(self, f: Framed) -> Message:
        command = f.fields["command"]
        if command in SUBSCRIPTIONS and (f.fields["args"] or "UNSUB" in command):  # SUBSCRIBE alone is an error
            self._subscriptions.append(_Subscription(command, f.fields["args"] or None))
        return message_from(f, PROTOCOL, True, name=f"redis {command}", attributes=request_attributes(f.fields),
                            head=f.head)  # fmt: skip

    def _response(self, f: Framed) -> Message | None:
        waiting = self._waiting(f.fields.get("confirms"))
        if waiting is not None:
            return self._confirmed(waiting, f)
        if f.fields["type"] == "push":
            return None  # RESP3 pushes (pub/sub messages, invalidations) answer no request
        return self._reply(f)

    def _waiting(self, confirms: str | None) -> _Subscription | None:
        """The oldest command this confirmation is for; None for an array that only looks like one."""
        if confirms is None:
            return None
        return next((s for s in self._subscriptions if s.command == confirms), None)

    def _confirmed(self, waiting: _Subscription, f: Framed) -> Message | None:
        """The first confirmation answers the command, the others (one per further channel) nothing."""
        first, waiting.answered = not waiting.answered, True
        if waiting.left is not None:
            waiting.left -= 1
        # Unsubscribing from all: the count of subscriptions left reaches 0 on the last one (unless
        # patterns are left: then the command stays, taking later confirmations of its kind).
        if (waiting.left if waiting.left is not None else f.fields["subscriptions"]) <= 0:
            self._subscriptions.remove(waiting)
        return self._reply(f) if first else None

    @staticmethod
    def _reply(f: Framed) -> Message:
        error = f.fields["type"] == "error"
        return message_from(f, PROTOCOL, False, error=error, status_code=f.fields.get("error_code") if error else None,
                            attributes=reply_attributes(f.fields), head=f.head)  # fmt: skip


def request_attributes(fields: dict) -> dict:
    attrs = {"db.system": "redis", "db.operation.name": fields["command"]}
    if "key" in fields:
        attrs["db.redis.key"] = fields["key"]
    if fields["command"] in SETUP:
        attrs[CONNECTION_SETUP] = True
    return attrs


def reply_attributes(fields: dict) -> dict:
    attrs = {"db.redis.reply_type": fields["type"]}
    if fields["type"] == "error":
        attrs["db.response.error"] = fields.get("error", "")
    return attrs


def request_head_fields(head: bytes) -> dict | None:
    """Fields of a command from its first bytes, which may end before the command does (a
    head the kernel kept, a command longer than the capture)."""
    frame = frame_request(head)
    if frame.__class__ is Frame:
        return frame.fields
    args: list[bytes] = []
    try:
        _value(head, 0, 0, args)  # the bulk strings whole within the head are kept
    except (_Short, _Bad):
        pass
    count = head[1 : head.find(b"\r\n")] if head[:1] == b"*" else b""
    if not args or not count.isdigit():
        return None
    return _command_fields(args, int(count))


def reply_head_fields(head: bytes) -> dict | None:
    """Fields of a reply from its first bytes (which may end before the reply does)."""
    frame = frame_response(head)
    if frame.__class__ is Frame:
        return frame.fields
    kind = head[0] if head else None
    if kind not in _TYPE_NAMES:
        return None
    fields: dict = {"type": _TYPE_NAMES[kind]}
    if kind in b"-!":  # an error line longer than the head: its code is at its start
        fields.update(_error_fields(head))
    return fields
