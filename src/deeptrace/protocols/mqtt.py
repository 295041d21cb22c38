"""MQTT 3.1, 3.1.1 and 5 (OASIS specifications): packets framed by the fixed header's
remaining length; topics, QoS, packet ids, reason codes. Pure functions of bytes.

What becomes a span:
- CONNECT -> CONNACK and PINGREQ -> PINGRESP, in order (the broker answers them in order).
- A client's PUBLISH: QoS 0 is one-way; QoS 1 pairs with PUBACK, QoS 2 with PUBREC, by packet
  id; the PUBREL that follows pairs with PUBCOMP ("mqtt PUBREL").
- The broker's PUBLISH to a subscriber is a delivery, "mqtt deliver <topic>", a request the
  broker makes: QoS 0 one-way; QoS 1 and 2 paired with the client's PUBACK/PUBREC, so the span
  lasts until the subscriber took it (paho acknowledges once its on_message returned).
- SUBSCRIBE -> SUBACK and UNSUBSCRIBE -> UNSUBACK by packet id; a SUBACK code of 0x80 or
  more (3.1.1's 0x80 failure, 5's reason codes) is an error, as is any 5 reason code >= 0x80.
- DISCONNECT is one-way; a broker's DISCONNECT with an error reason (5) is an error span.

Client and broker packet ids are separate number spaces, so pairing keys say whose id it is.

Versions: 5 adds properties to most packets. CONNECT says which; joined mid-stream we assume
3.1.1 until a packet proves 5 (a CONNACK or acknowledgement longer than 3.1.1 allows, a
DISCONNECT or AUTH with a body, a SUBSCRIBE/SUBACK/UNSUBSCRIBE that parses only as 5). Framing
does not depend on it (the remaining length does not); only properties and the payload size
of a PUBLISH seen before the proof do.

Joined mid-stream with the connection's role unknown, the first packet may be a PUBLISH or an
acknowledgement, which both sides send: detection takes it for the client's. Packets only a
client sends (CONNECT, SUBSCRIBE, UNSUBSCRIBE, PINGREQ) or only a broker sends (CONNACK,
SUBACK, UNSUBACK, PINGRESP) seen on the other side correct that from then on.
"""

from __future__ import annotations

from deeptrace.protocols.base import Message, message_from
from deeptrace.protocols.framing import INVALID, NEED_MORE, DirectionFramer, Frame, Framed, FramedConnection
from deeptrace.protocols.redaction import REDACTED

PROTOCOL = "mqtt"
(CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ,
 PINGRESP, DISCONNECT, AUTH) = range(1, 16)  # fmt: skip
NAMES = {1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL", 7: "PUBCOMP",
         8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK", 12: "PINGREQ", 13: "PINGRESP",
         14: "DISCONNECT", 15: "AUTH"}  # fmt: skip
FROM_CLIENT = frozenset((CONNECT, SUBSCRIBE, UNSUBSCRIBE, PINGREQ))
FROM_SERVER = frozenset((CONNACK, SUBACK, UNSUBACK, PINGRESP))
CLIENT_SENDS = frozenset(range(1, 16)) - FROM_SERVER
SERVER_SENDS = frozenset(range(1, 16)) - FROM_CLIENT
# Fixed-header flags every packet but PUBLISH must carry, and the smallest remaining length.
FLAGS = {PUBREL: 2, SUBSCRIBE: 2, UNSUBSCRIBE: 2}
MIN_REMAINING = {CONNECT: 12, CONNACK: 2, PUBLISH: 2, PUBACK: 2, PUBREC: 2, PUBREL: 2, PUBCOMP: 2, SUBSCRIBE: 6,
                 SUBACK: 3, UNSUBSCRIBE: 5, UNSUBACK: 2}  # fmt: skip
WAIT_WHOLE = 16 << 10  # packets up to this size are read whole; larger ones from their start
PUBLISH_CODES = frozenset((0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99))
RELEASE_CODES = frozenset((0x00, 0x92))
SUBACK_CODES_3 = frozenset((0, 1, 2, 0x80))
SUBACK_CODES_5 = frozenset((0, 1, 2, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2))
UNSUBACK_CODES = frozenset((0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91))
REASONS = {
    0x00: "SUCCESS", 0x01: "GRANTED_QOS_1", 0x02: "GRANTED_QOS_2", 0x04: "DISCONNECT_WITH_WILL_MESSAGE",
    0x10: "NO_MATCHING_SUBSCRIBERS", 0x11: "NO_SUBSCRIPTION_EXISTED", 0x18: "CONTINUE_AUTHENTICATION",
    0x19: "RE_AUTHENTICATE", 0x80: "UNSPECIFIED_ERROR", 0x81: "MALFORMED_PACKET", 0x82: "PROTOCOL_ERROR",
    0x83: "IMPLEMENTATION_SPECIFIC_ERROR", 0x84: "UNSUPPORTED_PROTOCOL_VERSION", 0x85: "CLIENT_IDENTIFIER_NOT_VALID",
    0x86: "BAD_USER_NAME_OR_PASSWORD", 0x87: "NOT_AUTHORIZED", 0x88: "SERVER_UNAVAILABLE", 0x89: "SERVER_BUSY",
    0x8A: "BANNED", 0x8B: "SERVER_SHUTTING_DOWN", 0x8C: "BAD_AUTHENTICATION_METHOD", 0x8D: "KEEP_ALIVE_TIMEOUT",
    0x8E: "SESSION_TAKEN_OVER", 0x8F: "TOPIC_FILTER_INVALID", 0x90: "TOPIC_NAME_INVALID",
    0x91: "PACKET_IDENTIFIER_IN_USE", 0x92: "PACKET_IDENTIFIER_NOT_FOUND", 0x93: "RECEIVE_MAXIMUM_EXCEEDED",
    0x94: "TOPIC_ALIAS_INVALID", 0x95: "PACKET_TOO_LARGE", 0x96: "MESSAGE_RATE_TOO_HIGH", 0x97: "QUOTA_EXCEEDED",
    0x98: "ADMINISTRATIVE_ACTION", 0x99: "PAYLOAD_FORMAT_INVALID", 0x9A: "RETAIN_NOT_SUPPORTED",
    0x9B: "QOS_NOT_SUPPORTED", 0x9C: "USE_ANOTHER_SERVER", 0x9D: "SERVER_MOVED",
    0x9E: "SHARED_SUBSCRIPTIONS_NOT_SUPPORTED", 0x9F: "CONNECTION_RATE_EXCEEDED", 0xA0: "MAXIMUM_CONNECT_TIME",
    0xA1: "SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED", 0xA2: "WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED",
}  # fmt: skip
# 3.1.1 CONNACK return codes.
RETURN_CODES = {0: "ACCEPTED", 1: "UNACCEPTABLE_PROTOCOL_VERSION", 2: "IDENTIFIER_REJECTED", 3: "SERVER_UNAVAILABLE",
                4: "BAD_USER_NAME_OR_PASSWORD", 5: "NOT_AUTHORIZED"}  # fmt: skip
# 5 property ids -> value type: 1, 2, 4 bytes, "v" varint, "s" string, "b" binary, "p" string pair.
PROPERTIES = {0x01: 1, 0x02: 4, 0x03: "s", 0x08: "s", 0x09: "b", 0x0B: "v", 0x11: 4, 0x12: "s", 0x13: 2, 0x15: "s",
              0x16: "b", 0x17: 1, 0x18: 4, 0x19: 1, 0x1A: "s", 0x1C: "s", 0x1F: "s", 0x21: 2, 0x22: 2, 0x23: 2,
              0x24: 1, 0x25: 1, 0x26: "p", 0x27: 4, 0x28: 1, 0x29: 1, 0x2A: 1}  # fmt: skip
V311, V5 = 4, 5


class _Short(Exception):
    """The buffer ends inside the packet."""


class _Bad(Exception):
    """Not a well-formed packet."""


def header(buf: bytes) -> tuple[int, int, int, int] | str:
    """(type, flags, header length, remaining length) of the fixed header, or NEED_MORE/INVALID."""
    if not buf:
        return NEED_MORE
    kind, flags = buf[0] >> 4, buf[0] & 15
    if kind == 0 or (flags != FLAGS.get(kind, 0) if kind != PUBLISH else (flags & 6) == 6):
        return INVALID
    remaining = shift = 0
    for i in range(1, 5):
        if i >= len(buf):
            return NEED_MORE
        remaining |= (buf[i] & 127) << shift
        shift += 7
        if buf[i] < 128:
            if remaining < MIN_REMAINING.get(kind, 0) or (kind in (PINGREQ, PINGRESP) and remaining):
                return INVALID
            return kind, flags, i + 1, remaining
    return INVALID  # a remaining length takes four bytes at most


class _Reader:
    """Reads a packet's body: past the packet's end is malformed, past the buffer's is short."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: bytes, pos: int, end: int):
        self.buf, self.pos, self.end = buf, pos, end

    def take(self, n: int) -> bytes:
        stop = self.pos + n
        if stop > self.end:
            raise _Bad
        if stop > len(self.buf):
            raise _Short
        out = self.buf[self.pos : stop]
        self.pos = stop
        return out

    def byte(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def varint(self) -> int:
        value = 0
        for shift in (0, 7, 14, 21):
            b = self.byte()
            value |= (b & 127) << shift
            if b < 128:
                return value
        raise _Bad

    def string(self) -> bytes:
        return self.take(self.u16())

    def properties(self) -> dict:
        """A 5 property list; keeps the few a span shows."""
        length = self.varint()
        stop = self.pos + length
        if stop > self.end:
            raise _Bad
        inner = _Reader(self.buf, self.pos, stop)
        kept: dict = {}
        while inner.pos < stop:
            pid = inner.varint()
            kind = PROPERTIES.get(pid)
            if kind is None:
                raise _Bad
            if kind == "s" or kind == "b":
                value = inner.string()
                if pid in (0x03, 0x08, 0x1F):  # content type, response topic, reason string
                    kept[pid] = value[:256].decode("utf-8", "replace")
            elif kind == "p":
                inner.string()
                inner.string()
            elif kind == "v":
                inner.varint()
            else:
                inner.take(kind)
        self.pos = stop
        return kept

    def rest(self) -> bytes:
        return self.take(self.end - self.pos)


def _text(raw: bytes, strict: bool, wildcards: bool) -> str:
    text = raw.decode("utf-8", "strict" if strict else "replace")
    if strict and (not text or not text.isprintable() or (not wildcards and ("+" in text or "#" in text))):
        raise _Bad
    return text


def _ack(r: _Reader, kind: int, fields: dict, strict: bool) -> None:
    fields["id"] = r.u16()
    if strict and fields["id"] == 0:
        raise _Bad
    if r.pos < r.end:  # only 5 says more than the packet id
        fields["v5"] = True
        code = r.byte()
        if strict and code not in (PUBLISH_CODES if kind in (PUBACK, PUBREC) else RELEASE_CODES):
            raise _Bad
        fields["code"] = code
        if r.pos < r.end:
            fields["props"] = r.properties()


def _filters(r: _Reader, strict: bool, options: bool, v5: bool) -> list[str]:
    out = []
    while r.pos < r.end:
        out.append(_text(r.string(), strict, True))
        if options:
            opts = r.byte()
            if strict and (opts & (0xC0 if v5 else 0xFC) or opts & 3 == 3 or (opts >> 4) & 3 == 3):
                raise _Bad
            out[-1] = (out[-1], opts & 3)
    if not out:
        raise _Bad
    return out


def _subscription(r: _Reader, kind: int, fields: dict, strict: bool, v5: bool) -> None:
    fields["id"] = r.u16()
    if strict and fields["id"] == 0:
        raise _Bad
    if v5:
        fields["props"] = r.properties()
    if kind == SUBSCRIBE:
        pairs = _filters(r, strict, True, v5)
        fields["filters"], fields["qos"] = [p[0] for p in pairs], max(p[1] for p in pairs)
    elif kind == UNSUBSCRIBE:
        fields["filters"] = _filters(r, strict, False, v5)
    else:  # SUBACK, UNSUBACK
        codes = list(r.rest())
        valid = SUBACK_CODES_5 if v5 else SUBACK_CODES_3
        if kind == UNSUBACK:
            valid = UNSUBACK_CODES if v5 else frozenset()
        if strict and ((kind == SUBACK and not codes) or any(c not in valid for c in codes)):
            raise _Bad
        fields["codes"] = codes


def _connect(r: _Reader, fields: dict, strict: bool) -> None:
    name = r.string()
    level = r.byte()
    if name not in (b"MQTT", b"MQIsdp") or level not in (3, 4, 5):
        raise _Bad
    flags = r.byte()
    if strict and flags & 1:
        raise _Bad
    fields.update(level=level, keepalive=r.u16(), clean=bool(flags & 2), will=bool(flags & 4),
                  username=bool(flags & 128), vh_end=r.pos)  # fmt: skip
    if level == 5:
        r.properties()  # may hold authentication data: nothing of it is kept
    fields["client_id"] = r.string()[:128].decode("utf-8", "replace")


def packet(buf: bytes, version: int | None, strict: bool = False) -> Frame | str:
    """Frame one packet at buf[0]. strict (detection): every field must be what the spec allows."""
    h = header(buf)
    if h.__class__ is str:
        return h
    kind, flags, hlen, remaining = h
    total = hlen + remaining
    fields: dict = {"kind": kind, "flags": flags, "hlen": hlen}
    r = _Reader(buf, hlen, total)
    try:
        if kind == CONNECT:
            _connect(r, fields, strict)
        elif kind == CONNACK:
            ack_flags, fields["code"] = r.byte(), r.byte()
            if strict and ack_flags > 1:
                raise _Bad
            fields["v5"] = remaining > 2  # 5 always has a property length; 3.1.1 never
            if fields["v5"]:
                fields["props"] = r.properties()
        elif kind == PUBLISH:
            qos = (flags >> 1) & 3
            if strict and qos == 0 and flags & 8:
                raise _Bad  # DUP on QoS 0
            fields["topic"] = _text(r.string(), strict, False)
            if qos:
                fields["id"] = r.u16()
                if strict and fields["id"] == 0:
                    raise _Bad
            if version == V5:
                fields["props"] = r.properties()
            fields["body"] = total - r.pos
        elif kind in (PUBACK, PUBREC, PUBREL, PUBCOMP):
            _ack(r, kind, fields, strict)
        elif kind in (SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK):
            if kind == UNSUBACK and remaining > 2:
                version = V5
            if version is None:  # mid-stream: whichever reading fits; 3.1.1 when both do
                try:
                    _subscription(_Reader(buf, hlen, total), kind, dict(fields), True, False)
                except _Bad:
                    version = V5
            _subscription(r, kind, fields, strict, version == V5)
            fields["v5"] = version == V5
        elif kind in (DISCONNECT, AUTH) and remaining:
            fields["v5"] = True
            fields["code"] = r.byte()
            if remaining > 1:
                fields["props"] = r.properties()
        if strict and kind not in (PUBLISH, CONNECT) and r.pos != total:  # CONNECT's payload is not read
            raise _Bad
    except _Short:
        if len(buf) < min(total, WAIT_WHOLE):
            return NEED_MORE
        fields["cut"] = True  # a large packet: what its start says
    except (_Bad, UnicodeDecodeError):
        return INVALID
    return Frame(total, fields)


def _claims(data: bytes, sends: frozenset) -> bool:
    """Whether data starts with MQTT packets this side sends: the first whole (or a PUBLISH or
    CONNECT whose start proves it), every whole one after it well-formed (a few are looked at)."""
    pos = 0
    version = None
    for i in range(8):
        if pos >= len(data):
            return i > 0
        result = packet(data[pos:], version, strict=True)
        if result == NEED_MORE:
            # Enough of a first CONNECT to read its protocol name and level is proof enough.
            return i > 0 or (CONNECT in sends and _connect_start(data))
        if result == INVALID or result.fields["kind"] not in sends:
            return False
        fields = result.fields
        if fields.get("cut") and i == 0 and fields["kind"] not in (PUBLISH, CONNECT):
            return False
        if fields["kind"] == CONNECT:
            version = V5 if fields.get("level") == 5 else V311
        elif fields.get("v5"):
            version = V5
        pos += result.length
    return True


def _connect_start(data: bytes) -> bool:
    h = header(data)
    if h.__class__ is str or h[0] != CONNECT:
        return False
    start = data[h[2] : h[2] + 9]
    return (start[:6] == b"\x00\x04MQTT" and start[6:7] in (b"\x04", b"\x05")) or (
        start[:8] == b"\x00\x06MQIsdp" and start[8:9] == b"\x03")


def starts_request(data: bytes) -> bool:
    return _claims(data, CLIENT_SENDS)


def starts_response(data: bytes) -> bool:
    return _claims(data, SERVER_SENDS)


def starts_packet(data: bytes) -> bool:
    """Cheap: could a syscall's data begin with a packet (to get back in step)?"""
    return header(data[:5]).__class__ is tuple


def _salvage(buf: bytes) -> dict | None:
    """A packet whose start is here but whose end was not captured: what its start says."""
    h = header(buf)
    return None if h.__class__ is str else {"kind": h[0], "flags": h[1], "hlen": h[2], "cut": True}


def _reason(code: int | None, v5: bool, kind: int) -> tuple[bool, str | None]:
    """(error, status code) for a reason or return code."""
    if code is None:
        return False, None
    if kind == CONNACK and not v5:
        return code != 0, RETURN_CODES.get(code, str(code)) if code else None
    if kind == SUBACK and not v5 and code == 0x80:
        return True, "FAILURE"
    name = REASONS.get(code, f"0x{code:02X}")
    return code >= 0x80, name if code not in (0, 1, 2) else None


class MqttConnection(FramedConnection):
    protocol = PROTOCOL

    def __init__(self) -> None:
        super().__init__(DirectionFramer(self._frame, starts_packet, _salvage),
                         DirectionFramer(self._frame, starts_packet, _salvage))  # fmt: skip
        self.version: int | None = None  # V311 (also 3.1) or V5; None: not known yet
        self.swapped = False  # the pipeline's request side is the broker's (role guessed wrong)
        self._errors = 0

    def _frame(self, buf: bytes) -> Frame | str:
        result = packet(buf, self.version)
        if result.__class__ is Frame:
            fields = result.fields
            if fields["kind"] == CONNECT and "level" in fields:
                self.version = V5 if fields["level"] == 5 else V311
            elif fields.get("v5"):
                self.version = V5
            elif fields["kind"] == CONNACK and self.version is None:
                self.version = V311
        return result

    def _request(self, f: Framed) -> Message | list[Message] | None:
        return self._packet(f, True)

    def _response(self, f: Framed) -> Message | list[Message] | None:
        return self._packet(f, False)

    def _packet(self, f: Framed, request_side: bool) -> Message | list[Message] | None:
        fields = f.fields
        kind = fields["kind"]
        if kind in FROM_CLIENT:
            self.swapped = not request_side
        elif kind in FROM_SERVER:
            self.swapped = request_side
        client = request_side != self.swapped  # the client sent it
        mine, theirs = ("c", "s") if client else ("s", "c")  # whose packet id space
        attrs = {"messaging.system": "mqtt", "messaging.operation.name": NAMES[kind]}
        pid = fields.get("id")
        if kind == PUBLISH:
            return self._publish(f, client, attrs, mine)
        if kind in (PUBACK, PUBREC, PUBCOMP, SUBACK, UNSUBACK, CONNACK, PINGRESP):
            key = None if kind in (CONNACK, PINGRESP) or pid is None else (("rel", theirs, pid) if kind == PUBCOMP
                                                                           else (theirs, pid))  # fmt: skip
            return self._answer(f, kind, key, attrs)
        if kind == CONNECT:
            attrs["messaging.client.id"] = fields.get("client_id", "")
            attrs["messaging.mqtt.protocol_level"] = fields.get("level")
            # The head stops before the client id: user name, password, will and 5's
            # authentication data never leave.
            head = f.head[: fields.get("vh_end", fields["hlen"])] + REDACTED.encode()
            return message_from(f, PROTOCOL, True, name="mqtt CONNECT", attributes=attrs, head=head)
        if kind in (SUBSCRIBE, UNSUBSCRIBE):
            filters = fields.get("filters") or [""]
            attrs["messaging.destination.name"] = filters[0]
            if len(filters) > 1:
                attrs["messaging.mqtt.topic_filters"] = ",".join(filters)[:512]
            if "qos" in fields:
                attrs["messaging.mqtt.qos"] = fields["qos"]
            return message_from(f, PROTOCOL, True, name=f"mqtt {NAMES[kind]} {filters[0]}".rstrip(), attributes=attrs,
                                head=f.head, pair_key=None if pid is None else ("c", pid),
                                expects_response=pid is not None)  # fmt: skip
        if kind == PUBREL:
            return message_from(f, PROTOCOL, True, name="mqtt PUBREL", attributes=attrs, head=f.head,
                                pair_key=None if pid is None else ("rel", mine, pid),
                                expects_response=pid is not None)  # fmt: skip
        if kind == PINGREQ:
            return message_from(f, PROTOCOL, True, name="mqtt PINGREQ", attributes=attrs, head=f.head)
        if kind == DISCONNECT:
            code = fields.get("code")
            error, status = _reason(code, True, kind)
            if code is not None:
                attrs["messaging.mqtt.reason_code"] = code
            if error and not client:  # the broker ends the session over an error: say so
                return self._error(f, "mqtt DISCONNECT", status, attrs)
            return message_from(f, PROTOCOL, True, name="mqtt DISCONNECT", attributes=attrs, head=f.head,
                                expects_response=False)  # fmt: skip
        return None  # AUTH: enhanced authentication steps, secrets inside, no span of their own

    def _publish(self, f: Framed, client: bool, attrs: dict, mine: str) -> Message:
        fields = f.fields
        topic = fields.get("topic")
        qos = (fields["flags"] >> 1) & 3
        attrs["messaging.operation.type"] = "send" if client else "receive"
        attrs["messaging.mqtt.qos"] = qos
        if topic is not None:
            attrs["messaging.destination.name"] = topic
        if "body" in fields:
            attrs["messaging.message.body.size"] = fields["body"]
        if fields["flags"] & 1:
            attrs["messaging.mqtt.retain"] = True
        if fields["flags"] & 8:
            attrs["messaging.mqtt.duplicate"] = True
        props = fields.get("props") or {}
        if 0x08 in props:
            attrs["messaging.mqtt.response_topic"] = props[0x08]
        if 0x03 in props:
            attrs["messaging.mqtt.content_type"] = props[0x03]
        pid = fields.get("id")
        name = f"mqtt {'PUBLISH' if client else 'deliver'} {topic if topic is not None else ''}".rstrip()
        return message_from(f, PROTOCOL, True, name=name, attributes=attrs, head=f.head,
                            pair_key=None if not qos or pid is None else (mine, pid),
                            expects_response=bool(qos) and pid is not None)  # fmt: skip

    def _answer(self, f: Framed, kind: int, key: tuple | None, attrs: dict) -> Message:
        fields = f.fields
        codes = fields.get("codes")
        code = fields.get("code")
        if codes:  # SUBACK/UNSUBACK: one code per filter; the first failure speaks for them
            attrs["messaging.mqtt.reason_codes"] = ",".join(map(str, codes[:32]))
            code = next((c for c in codes if c >= 0x80), codes[0])
        v5 = bool(fields.get("v5")) or self.version == V5
        error, status = _reason(code, v5, kind)
        if code is not None:
            attrs["messaging.mqtt.reason_code"] = code
        reason = (fields.get("props") or {}).get(0x1F)
        if reason:
            attrs["messaging.mqtt.reason_string"] = reason
        head = f.head[: fields["hlen"] + 2] if kind == CONNACK else f.head  # CONNACK properties: none shown
        return message_from(f, PROTOCOL, False, error=error, status_code=status, pair_key=key, attributes=attrs,
                            head=head)  # fmt: skip

    def _error(self, f: Framed, name: str, status: str | None, attrs: dict) -> list[Message]:
        """An error the broker reports unasked: a span of its own, its request empty."""
        self._errors += 1
        key = ("error", self._errors)
        req = message_from(f, PROTOCOL, True, name=name, pair_key=key, attributes=dict(attrs))
        req.size, req.end_ns, req.seq_start, req.seq_end = 0, f.start_ns, None, None
        resp = message_from(f, PROTOCOL, False, error=True, status_code=status, pair_key=key, attributes={},
                            head=f.head)  # fmt: skip
        return [req, resp]
