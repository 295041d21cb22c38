"""AMQP 0-9-1 (RabbitMQ): frames, named methods, content assembled into messages, channels.

A connection opens with the client's protocol header "AMQP\\x00\\x00\\x09\\x01"; after it both sides
send frames: type (1 method, 2 content header, 3 content body, 8 heartbeat), channel, payload size,
payload, and the end octet 0xCE. A method frame names its method by class and method ids. Some
methods carry content: the content header (body size, properties) and body frames follow the method
on the same channel; all of them make one message here, sizes added.

What becomes a span: a synchronous method the client sends and the -Ok the server answers on the
same channel (paired by (channel, class)); a Channel.Close or Connection.Close that the server sends
instead of the -Ok is that request's error. One-way: Basic.Publish, Ack, Nack, Reject from the client;
Basic.Deliver, Return, confirms (Ack/Nack) and cancel notices pushed by the server. A close the server
starts on its own is a request of the server's, answered by the client's Close-Ok, with the server's
reply code as its status. Pure functions of bytes.
"""

from __future__ import annotations

import struct
from collections import OrderedDict

from deeptrace.protocols.base import Message, message_from
from deeptrace.protocols.framing import (
    HEAD_BYTES,
    INVALID,
    NEED_MORE,
    DirectionFramer,
    Frame,
    Framed,
    FramedConnection,
)

PROTOCOL = "amqp"
PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_END = 0xCE
METHOD, HEADER, BODY, HEARTBEAT = 1, 2, 3, 8
MAX_FRAME = 1 << 28  # larger than any frame-max a broker grants: a length past it is not AMQP
MAX_METHOD = 16 << 10  # method and header frames up to this are buffered whole to read their arguments
MAX_AWAITED = 4096  # requests (and server closes) awaiting their reply, per connection
MAX_CONTENTS = 1024  # channels with content being assembled, per direction
MAX_NAME = 256  # a short string is at most 255 bytes; attributes keep no more
DETECT_FRAMES = 32  # frames looked at when telling a stream's direction
_FRAME = struct.Struct("!BHI")
_IDS = struct.Struct("!HH")

# Argument types: o octet, h short, l long, L long long, s short string, S long string, t table, b bit.
# A name starting with "_" is skipped. From the AMQP 0-9-1 specification (amqp0-9-1.xml) and RabbitMQ's
# extensions (Basic.Nack, Exchange.Bind, Confirm, Connection.Blocked and Update-Secret).
_CLOSE_ARGS = "h:reply_code s:reply_text h:class_id h:method_id"
METHODS: dict[tuple[int, int], tuple[str, str]] = {
    (10, 10): ("connection.start", "o:_major o:_minor t:_properties S:mechanisms S:_locales"),
    (10, 11): ("connection.start-ok", "t:_properties s:mechanism S:_response s:_locale"),
    (10, 20): ("connection.secure", "S:_challenge"),
    (10, 21): ("connection.secure-ok", "S:_response"),
    (10, 30): ("connection.tune", "h:channel_max l:frame_max h:heartbeat"),
    (10, 31): ("connection.tune-ok", "h:channel_max l:frame_max h:heartbeat"),
    (10, 40): ("connection.open", "s:vhost s:_r1 b:_r2"),
    (10, 41): ("connection.open-ok", "s:_r1"),
    (10, 50): ("connection.close", _CLOSE_ARGS),
    (10, 51): ("connection.close-ok", ""),
    (10, 60): ("connection.blocked", "s:reason"),
    (10, 61): ("connection.unblocked", ""),
    (10, 70): ("connection.update-secret", "S:_secret s:reason"),
    (10, 71): ("connection.update-secret-ok", ""),
    (20, 10): ("channel.open", "s:_r1"),
    (20, 11): ("channel.open-ok", "S:_r1"),
    (20, 20): ("channel.flow", "b:active"),
    (20, 21): ("channel.flow-ok", "b:active"),
    (20, 40): ("channel.close", _CLOSE_ARGS),
    (20, 41): ("channel.close-ok", ""),
    (40, 10): ("exchange.declare", "h:_r1 s:exchange s:exchange_type b:passive b:durable b:auto_delete b:internal b:no_wait"),
    (40, 11): ("exchange.declare-ok", ""),
    (40, 20): ("exchange.delete", "h:_r1 s:exchange b:if_unused b:no_wait"),
    (40, 21): ("exchange.delete-ok", ""),
    (40, 30): ("exchange.bind", "h:_r1 s:exchange s:source s:routing_key b:no_wait"),
    (40, 31): ("exchange.bind-ok", ""),
    (40, 40): ("exchange.unbind", "h:_r1 s:exchange s:source s:routing_key b:no_wait"),
    (40, 51): ("exchange.unbind-ok", ""),
    (50, 10): ("queue.declare", "h:_r1 s:queue b:passive b:durable b:exclusive b:auto_delete b:no_wait"),
    (50, 11): ("queue.declare-ok", "s:queue l:message_count l:consumer_count"),
    (50, 20): ("queue.bind", "h:_r1 s:queue s:exchange s:routing_key b:no_wait"),
    (50, 21): ("queue.bind-ok", ""),
    (50, 30): ("queue.purge", "h:_r1 s:queue b:no_wait"),
    (50, 31): ("queue.purge-ok", "l:message_count"),
    (50, 40): ("queue.delete", "h:_r1 s:queue b:if_unused b:if_empty b:no_wait"),
    (50, 41): ("queue.delete-ok", "l:message_count"),
    (50, 50): ("queue.unbind", "h:_r1 s:queue s:exchange s:routing_key"),
    (50, 51): ("queue.unbind-ok", ""),
    (60, 10): ("basic.qos", "l:prefetch_size h:prefetch_count b:global"),
    (60, 11): ("basic.qos-ok", ""),
    (60, 20): ("basic.consume", "h:_r1 s:queue s:consumer_tag b:no_local b:no_ack b:exclusive b:no_wait"),
    (60, 21): ("basic.consume-ok", "s:consumer_tag"),
    (60, 30): ("basic.cancel", "s:consumer_tag b:no_wait"),
    (60, 31): ("basic.cancel-ok", "s:consumer_tag"),
    (60, 40): ("basic.publish", "h:_r1 s:exchange s:routing_key b:mandatory b:immediate"),
    (60, 50): ("basic.return", "h:reply_code s:reply_text s:exchange s:routing_key"),
    (60, 60): ("basic.deliver", "s:consumer_tag L:delivery_tag b:redelivered s:exchange s:routing_key"),
    (60, 70): ("basic.get", "h:_r1 s:queue b:no_ack"),
    (60, 71): ("basic.get-ok", "L:delivery_tag b:redelivered s:exchange s:routing_key l:message_count"),
    (60, 72): ("basic.get-empty", "s:_r1"),
    (60, 80): ("basic.ack", "L:delivery_tag b:multiple"),
    (60, 90): ("basic.reject", "L:delivery_tag b:requeue"),
    (60, 100): ("basic.recover-async", "b:requeue"),
    (60, 110): ("basic.recover", "b:requeue"),
    (60, 111): ("basic.recover-ok", ""),
    (60, 120): ("basic.nack", "L:delivery_tag b:multiple b:requeue"),
    (85, 10): ("confirm.select", "b:no_wait"),
    (85, 11): ("confirm.select-ok", ""),
    (90, 10): ("tx.select", ""),
    (90, 11): ("tx.select-ok", ""),
    (90, 20): ("tx.commit", ""),
    (90, 21): ("tx.commit-ok", ""),
    (90, 30): ("tx.rollback", ""),
    (90, 31): ("tx.rollback-ok", ""),
}  # fmt: skip
_ARGS = {ids: [tuple(a.split(":")) for a in spec.split()] for ids, (_, spec) in METHODS.items()}
CONTENT_METHODS = frozenset({(60, 40), (60, 50), (60, 60), (60, 71)})  # publish, return, deliver, get-ok
CLOSES = frozenset({(10, 50), (20, 40)})
CLOSE_OKS = {(10, 51): (10, 50), (20, 41): (20, 40)}
# Methods only a client sends; those only a server sends; the rest either side sends.
CLIENT_SENT = frozenset({(10, 11), (10, 21), (10, 31), (10, 40), (10, 70), (20, 10), (40, 10), (40, 20), (40, 30),
                         (40, 40), (50, 10), (50, 20), (50, 30), (50, 40), (50, 50), (60, 10), (60, 20), (60, 40),
                         (60, 70), (60, 90), (60, 100), (60, 110), (85, 10), (90, 10), (90, 20), (90, 30)})  # fmt: skip
_EITHER = frozenset({(10, 50), (10, 51), (20, 20), (20, 21), (20, 40), (20, 41), (60, 30), (60, 80), (60, 120)})
SERVER_SENT = frozenset(METHODS) - CLIENT_SENT - _EITHER
# The client's methods that the server answers (with the -Ok; Start-Ok and Secure-Ok with Secure or
# Tune), and those it answers with nothing.
REQUESTS = CLIENT_SENT - {(10, 31), (60, 40), (60, 90), (60, 100)} | {(10, 50), (20, 20), (20, 40), (60, 30)}
ONE_WAY = frozenset({(60, 40), (60, 80), (60, 90), (60, 100), (60, 120)})
PUSHES = frozenset({(60, 30), (60, 50), (60, 60), (60, 80), (60, 120), (10, 60), (10, 61), (20, 20)})
REPLY_CODES = {200: "REPLY_SUCCESS", 311: "CONTENT_TOO_LARGE", 312: "NO_ROUTE", 313: "NO_CONSUMERS",
               320: "CONNECTION_FORCED", 402: "INVALID_PATH", 403: "ACCESS_REFUSED", 404: "NOT_FOUND",
               405: "RESOURCE_LOCKED", 406: "PRECONDITION_FAILED", 501: "FRAME_ERROR", 502: "SYNTAX_ERROR",
               503: "COMMAND_INVALID", 504: "CHANNEL_ERROR", 505: "UNEXPECTED_FRAME", 506: "RESOURCE_ERROR",
               530: "NOT_ALLOWED", 540: "NOT_IMPLEMENTED", 541: "INTERNAL_ERROR"}  # fmt: skip
OPERATION_TYPES = {"basic.publish": "send", "basic.deliver": "process", "basic.get": "receive",
                   "basic.ack": "settle", "basic.nack": "settle", "basic.reject": "settle"}  # fmt: skip
# Content header properties in flag order (bit 15 first); those kept are named.
_PROPERTIES = [("s", "content_type"), ("s", "_encoding"), ("t", "_headers"), ("o", "delivery_mode"),
               ("o", "_priority"), ("s", "correlation_id"), ("s", "reply_to"), ("s", "_expiration"),
               ("s", "message_id"), ("L", "_timestamp"), ("s", "_type"), ("s", "_user_id"), ("s", "_app_id"),
               ("s", "_cluster_id")]  # fmt: skip


class _Short(Exception):
    """The bytes end inside an argument."""


def _args(payload: bytes, pos: int, spec: list[tuple[str, str]], out: dict) -> None:
    """Read the arguments at pos into out (as far as the bytes go: _Short past their end)."""
    bit = 8
    bits = 0
    n = len(payload)
    for kind, name in spec:
        if kind == "b":  # bits pack into octets, first bit lowest
            if bit == 8:
                if pos >= n:
                    raise _Short
                bits, bit, pos = payload[pos], 0, pos + 1
            value: object = bool(bits >> bit & 1)
            bit += 1
        else:
            bit = 8
            if kind == "s":
                if pos >= n:
                    raise _Short
                end = pos + 1 + payload[pos]
                value = payload[pos + 1 : end].decode("utf-8", "replace")
            elif kind in "St":
                if pos + 4 > n:
                    raise _Short
                end = pos + 4 + int.from_bytes(payload[pos : pos + 4], "big")
                value = None if name[0] == "_" else payload[pos + 4 : min(end, pos + 4 + MAX_NAME)].decode("utf-8", "replace")
            else:
                end = pos + {"o": 1, "h": 2, "l": 4, "L": 8}[kind]
                value = int.from_bytes(payload[pos:end], "big")
            if end > n:
                raise _Short
            pos = end
        if name[0] != "_":
            out[name] = value


def _method(payload: bytes, fields: dict) -> str | None:
    """Fields of a method frame's payload (as far as captured); INVALID for unknown ids."""
    if len(payload) < 4:
        return INVALID
    ids = _IDS.unpack_from(payload)
    spec = _ARGS.get(ids)
    if spec is None:
        return INVALID
    fields["ids"] = ids
    try:
        _args(payload, 4, spec, fields)
    except _Short:
        fields["cut"] = True
    return None


def _content_header(payload: bytes, fields: dict) -> str | None:
    if len(payload) < 14:
        return INVALID
    class_id, weight, body_size, flags = struct.unpack_from("!HHQH", payload)
    if class_id != 60 or weight != 0:
        return INVALID
    fields["body_size"] = body_size
    spec = [_PROPERTIES[i] for i in range(14) if flags >> (15 - i) & 1]
    pos = 14
    while flags & 1 and pos + 2 <= len(payload):  # more flag words follow (none is defined for Basic)
        flags = int.from_bytes(payload[pos : pos + 2], "big")
        pos += 2
    try:
        _args(payload, pos, spec, fields)
    except _Short:
        pass
    return None


def frame(buf: bytes) -> Frame | str:
    """One frame (or the protocol header): the same framing both ways."""
    if buf[:1] == b"A":
        if len(buf) < 8:
            return NEED_MORE if PROTOCOL_HEADER.startswith(buf) else INVALID
        return Frame(8, {"frame": "protocol-header", "version": tuple(buf[4:8])}) if buf[:4] == b"AMQP" else INVALID
    if len(buf) < 7:
        return NEED_MORE if buf and buf[0] in (METHOD, HEADER, BODY, HEARTBEAT) else INVALID
    kind, channel, size = _FRAME.unpack_from(buf)
    if kind not in (METHOD, HEADER, BODY, HEARTBEAT) or size > MAX_FRAME or (kind == HEARTBEAT and (size or channel)):
        return INVALID
    length = size + 8
    whole = len(buf) >= length
    if whole and buf[length - 1] != FRAME_END:
        return INVALID
    fields = {"frame": kind, "channel": channel}
    if kind in (METHOD, HEADER):
        payload = buf[7 : length - 1]
        # Arguments are read from the whole frame; one too long to buffer, as far as it goes.
        if not whole and (length <= MAX_METHOD or len(payload) < 14):
            return NEED_MORE
        if (_method if kind == METHOD else _content_header)(payload, fields) is INVALID:
            return INVALID
        if not whole:
            fields["cut"] = True
        elif kind == HEADER and fields["body_size"]:
            return Frame(_with_body(buf, length, channel, fields), fields)
    return Frame(length, fields)


def _with_body(buf: bytes, at: int, channel: int, fields: dict) -> int:
    """Where a content ends, header and body frames together, when the body frames here show how
    the sender cuts the body: every frame but the last as long as the first. Then a body longer
    than the capture is skipped whole through the hole. Otherwise (or when the first body frame's
    header is not here yet) the header frame alone: its body frames come one by one."""
    body_size = fields["body_size"]
    if len(buf) < at + 7:
        return at
    kind, chan, step = _FRAME.unpack_from(buf, at)
    if kind != BODY or chan != channel or not 0 < step <= body_size:
        return at
    frames = -(-body_size // step)
    end = at + body_size + 8 * frames
    pos, left = at, body_size
    while pos + 7 <= min(len(buf), end):  # the frames that are here must follow that pattern
        kind, chan, size = _FRAME.unpack_from(buf, pos)
        if kind != BODY or chan != channel or size != min(step, left):
            return at
        if pos + size + 7 < len(buf) and buf[pos + size + 7] != FRAME_END:
            return at
        pos, left = pos + size + 8, left - size
    fields["body_included"] = True
    return end


def salvage(buf: bytes) -> dict | None:
    """Fields of a method frame whose end was not captured."""
    if len(buf) < 11 or buf[0] != METHOD:
        return None
    fields = {"frame": METHOD, "channel": int.from_bytes(buf[1:3], "big"), "cut": True}
    return None if _method(buf[7:], fields) is INVALID else fields


def _direction(data: bytes) -> bool | None:
    """True: these bytes are a client's; False: a server's; None: cannot tell (yet) or not AMQP.

    Without the protocol header (a connection joined mid-way) the frames are walked, each checked
    whole (type, heartbeat shape, end octet, known method ids), up to the first method that only one
    side sends; frames either side sends (heartbeats, content, Ack, Close) tell nothing yet."""
    if data[:4] == b"AMQP":
        return True if data[:8] == PROTOCOL_HEADER else None
    pos = 0
    for _ in range(DETECT_FRAMES):
        if len(data) < pos + 7:
            return None
        kind, channel, size = _FRAME.unpack_from(data, pos)
        end = pos + 7 + size
        if end >= len(data) or kind not in (METHOD, HEADER, BODY, HEARTBEAT) or data[end] != FRAME_END:
            return None
        if kind == HEARTBEAT and (size or channel):
            return None
        if kind == HEADER and (size < 14 or data[pos + 7 : pos + 11] != b"\x00\x3c\x00\x00"):
            return None
        if kind == METHOD:
            if size < 4:
                return None
            ids = _IDS.unpack_from(data, pos + 7)
            if ids not in METHODS:
                return None
            if ids in CLIENT_SENT or ids in SERVER_SENT:
                return ids in CLIENT_SENT
        pos = end + 1
    return None


def starts_request(data: bytes) -> bool:
    return _direction(data) is True


def starts_response(data: bytes) -> bool:
    return _direction(data) is False


def starts_frame(data: bytes) -> bool:
    """Whether a syscall's bytes start with a frame: to get back in step after a hole."""
    if data[:4] == b"AMQP":
        return True
    if len(data) < 7 or data[0] not in (METHOD, HEADER, BODY, HEARTBEAT):
        return False
    size = int.from_bytes(data[3:7], "big")
    if 7 + size < len(data):
        return data[7 + size] == FRAME_END
    return data[0] == METHOD and len(data) >= 11 and _IDS.unpack_from(data, 7) in METHODS


class _Content:
    """A content-carrying method being assembled with its header and body frames."""

    __slots__ = ("body_seen", "body_size", "end_ns", "fields", "first", "head", "partial", "size", "tid_end")

    def __init__(self, f: Framed):
        self.first, self.fields, self.size, self.partial = f, dict(f.fields), f.size, f.partial
        self.end_ns, self.tid_end, self.head = f.end_ns, f.tid_end, f.head
        self.body_size: int | None = None
        self.body_seen = 0

    def add(self, f: Framed) -> None:
        self.size += f.size
        self.partial = self.partial or f.partial
        self.end_ns, self.tid_end = f.end_ns, f.tid_end
        if len(self.head) < HEAD_BYTES:
            self.head = (self.head + f.head)[:HEAD_BYTES]

    @property
    def done(self) -> bool:
        return self.body_size is not None and self.body_seen >= self.body_size


def _attributes(fields: dict, name: str) -> dict:
    attrs: dict = {"messaging.system": "rabbitmq", "messaging.operation.name": name,
                   "amqp.channel": fields["channel"]}  # fmt: skip
    if name in OPERATION_TYPES:
        attrs["messaging.operation.type"] = OPERATION_TYPES[name]
    exchange, key = fields.get("exchange"), fields.get("routing_key")
    # OTel for RabbitMQ: the destination is the exchange; the default exchange ("") routes by
    # routing key to the queue of that name, so then the routing key is the destination. Queue
    # operations (declare, bind, consume, get) name the queue.
    destination = fields.get("queue") or exchange or key
    if destination:
        attrs["messaging.destination.name"] = destination
    if key:
        attrs["messaging.rabbitmq.destination.routing_key"] = key
    if "delivery_tag" in fields:
        attrs["messaging.rabbitmq.message.delivery_tag"] = fields["delivery_tag"]
    for field, attr in (("queue", "amqp.queue"), ("consumer_tag", "amqp.consumer_tag"), ("vhost", "amqp.vhost"),
                        ("mechanism", "amqp.sasl.mechanism"), ("exchange_type", "amqp.exchange.type"),
                        ("source", "amqp.source"), ("message_count", "amqp.message_count"),
                        ("consumer_count", "amqp.consumer_count"), ("message_id", "messaging.message.id"),
                        ("correlation_id", "messaging.message.conversation_id"),
                        ("body_size", "messaging.message.body.size"), ("reason", "amqp.reason")):  # fmt: skip
        if field in fields and fields[field] != "":
            attrs[attr] = fields[field]
    if fields.get("passive"):
        attrs["amqp.passive"] = True
    return attrs


def _reply_attributes(fields: dict, name: str) -> dict:
    """What a reply adds to its request's attributes: what the server chose or counted (a queue's
    generated name, a consumer tag, counts, a got message's routing), not what the request said."""
    attrs = _attributes(fields, name)
    for key in ("messaging.system", "messaging.operation.name", "messaging.operation.type", "amqp.channel"):
        attrs.pop(key, None)
    if "queue" not in fields:  # Get-Ok names the exchange and key it came by, not the queue asked
        attrs.pop("messaging.destination.name", None)
    return attrs


def _close_result(fields: dict) -> tuple[bool, str, dict]:
    """(error, status code, attributes) of a Close's reply code and text."""
    code = fields.get("reply_code", 0)
    attrs = {"amqp.reply_code": code, "amqp.reply_text": fields.get("reply_text", "")}
    error = code != 200
    if error:
        attrs["error.type"] = REPLY_CODES.get(code, str(code))
    ids = (fields.get("class_id"), fields.get("method_id"))
    if ids in METHODS:
        attrs["amqp.failed_method"] = METHODS[ids][0]
    return error, str(code), attrs


class AmqpConnection(FramedConnection):
    protocol = PROTOCOL

    def __init__(self) -> None:
        super().__init__(DirectionFramer(frame, starts_frame, salvage), DirectionFramer(frame, starts_frame, salvage))
        # What awaits a reply: (channel, class) -> the client's request fields; ("server", channel,
        # class) -> a close the server sent, answered by the client's Close-Ok.
        self._awaited: OrderedDict[tuple, dict] = OrderedDict()
        self._contents: dict[bool, OrderedDict[int, _Content]] = {True: OrderedDict(), False: OrderedDict()}

    def close(self, end_ns: int) -> list[Message]:
        """A Get-Ok whose content did not all come still answers its Basic.Get (the pipeline
        reports requests left waiting itself)."""
        gets = [c for c in self._contents[False].values() if c.fields["ids"] == (60, 71)]
        self._contents = {True: OrderedDict(), False: OrderedDict()}
        return [self._content_message(False, c, partial=True) for c in gets]

    # ---- frames to messages ----

    def _request(self, f: Framed) -> Message | list[Message] | None:
        return self._frame(True, f)

    def _response(self, f: Framed) -> Message | list[Message] | None:
        return self._frame(False, f)

    def _frame(self, client: bool, f: Framed) -> Message | list[Message] | None:
        kind = f.fields["frame"]
        if kind == METHOD:
            ended = self._end_content(client, f.fields["channel"])
            got = self._method(client, f)
            if ended is None:
                return got
            return [ended] + (got if isinstance(got, list) else [got] if got is not None else [])
        if kind in (HEADER, BODY):
            return self._content_frame(client, f)
        return None  # heartbeats, the protocol header

    def _method(self, client: bool, f: Framed) -> Message | None:
        fields = f.fields
        ids = fields["ids"]
        channel = fields["channel"]
        if ids in CONTENT_METHODS:
            self._start_content(client, f)
            return None
        if client:
            return self._client_method(f, ids, channel)
        return self._server_method(f, ids, channel)

    def _client_method(self, f: Framed, ids: tuple, channel: int) -> Message | None:
        fields = f.fields
        name = METHODS[ids][0]
        if ids in CLOSE_OKS:
            server_close = self._awaited.pop(("server", channel, ids[0]), None)
            if server_close is None:
                return None  # the reply to a close that already answered a request
            error, code, attrs = _close_result(server_close)
            return self._message(f, False, ("server", channel, ids[0]), error=error, status_code=code,
                                 attributes=attrs)  # fmt: skip
        if ids in ONE_WAY:
            return self._message(f, True, None, name=f"amqp {name}", attributes=_attributes(fields, name),
                                 expects_response=False)  # fmt: skip
        if ids not in REQUESTS:
            return None  # Tune-Ok, Flow-Ok, ...: replies the client owes, no operation of its own
        attrs = _attributes(fields, name)
        if ids in CLOSES:
            attrs.update(_close_result(fields)[2])
        key = (channel, ids[0])
        waits = not fields.get("no_wait", False)
        if waits:
            self._await(key, fields)
        return self._message(f, True, key if waits else None, name=f"amqp {name}", attributes=attrs,
                             expects_response=waits)  # fmt: skip

    def _server_method(self, f: Framed, ids: tuple, channel: int) -> Message | None:
        fields = f.fields
        name = METHODS[ids][0]
        if ids in CLOSES:
            failed = (fields.get("class_id"), fields.get("method_id"))
            # The request it fails, or a close of the client's crossing it.
            for key, request_ids in (((channel, failed[0]), failed), ((channel, ids[0]), ids)):
                if self._awaited.get(key, {}).get("ids") == request_ids:
                    del self._awaited[key]
                    error, code, attrs = _close_result(fields)
                    return self._message(f, False, key, error=error, status_code=code, attributes=attrs)
            key = ("server", channel, ids[0])
            self._await(key, fields)  # the server closes on its own: the client's Close-Ok answers
            attrs = _attributes(fields, name)
            attrs.update(_close_result(fields)[2])
            return self._message(f, True, key, name=f"amqp {name}", attributes=attrs)
        if ids in PUSHES:
            return self._message(f, True, None, name=f"amqp {name}", attributes=_attributes(fields, name),
                                 expects_response=False)  # fmt: skip
        key = (channel, ids[0])
        if key not in self._awaited:
            return None  # Connection.Start, a reply to a request not seen
        del self._awaited[key]
        attrs = _reply_attributes(fields, name)
        if ids == (60, 72):
            attrs["amqp.get_empty"] = True
        return self._message(f, False, key, attributes=attrs)

    # ---- content ----

    def _start_content(self, client: bool, f: Framed) -> None:
        contents = self._contents[client]
        contents[f.fields["channel"]] = _Content(f)
        if len(contents) > MAX_CONTENTS:
            contents.popitem(last=False)

    def _content_frame(self, client: bool, f: Framed) -> Message | None:
        content = self._contents[client].get(f.fields["channel"])
        if content is None:
            return None  # content of a method not seen (joined mid-way)
        content.add(f)
        if f.fields["frame"] == HEADER:
            content.body_size = f.fields.get("body_size", 0)
            content.fields.update((k, v) for k, v in f.fields.items() if k not in ("frame", "channel", "cut",
                                                                                    "body_included"))
            if f.fields.get("body_included"):
                content.body_seen = content.body_size
        else:
            content.body_seen += f.size - 8
        if not content.done:
            return None
        del self._contents[client][f.fields["channel"]]
        return self._content_message(client, content)

    def _end_content(self, client: bool, channel: int) -> Message | None:
        """A method frame ends any content still open on its channel (its end was not seen)."""
        content = self._contents[client].pop(channel, None)
        return None if content is None else self._content_message(client, content, partial=True)

    def _content_message(self, client: bool, content: _Content, partial: bool = False) -> Message:
        fields = content.fields
        ids = fields["ids"]
        name = METHODS[ids][0]
        if ids == (60, 71):  # Get-Ok: the reply to Basic.Get
            key = (fields["channel"], 60)
            self._awaited.pop(key, None)
            msg = message_from(content.first, PROTOCOL, False, pair_key=key, attributes=_reply_attributes(fields, name))
        else:
            attrs = _attributes(fields, name)
            if ids == (60, 50):
                attrs.update(_close_result(fields)[2])
            msg = message_from(content.first, PROTOCOL, True, name=f"amqp {name}", attributes=attrs,
                               expects_response=False)  # fmt: skip
        msg.head = content.head
        msg.end_ns, msg.tid_end, msg.size = content.end_ns, content.tid_end, content.size
        msg.partial = content.partial or partial
        if msg.seq_start is not None:
            msg.seq_end = (msg.seq_start + msg.size) & 0xFFFFFFFF
        return msg

    # ---- helpers ----

    def _await(self, key: tuple, fields: dict) -> None:
        self._awaited[key] = fields
        self._awaited.move_to_end(key)
        if len(self._awaited) > MAX_AWAITED:
            self._awaited.popitem(last=False)

    @staticmethod
    def _message(f: Framed, is_request: bool, key, **kw) -> Message:
        return message_from(f, PROTOCOL, is_request, pair_key=key, head=f.head, **kw)
