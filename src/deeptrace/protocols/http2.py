"""HTTP/2 and gRPC: frames, HPACK (the `hpack` library), streams multiplexed on one
connection, `:method :path :status`, gRPC service/method and `grpc-status`.

Frames are framed one by one (9-byte header + length, so large DATA frames are
skipped through holes by their length); a stream's frames from one side make one
message, ended by END_STREAM (or RST_STREAM). Requests and responses pair by
stream id. HPACK is stateful per direction: when the connection's start was not
seen, header blocks cannot be decoded, and the spans say so
(`deeptrace.http2.headers` = "connection start not seen") instead of guessing.
"""

from __future__ import annotations

import struct

import hpack

from deeptrace.protocols.base import Chunk, ConnectionParser, Message, message_from_parts
from deeptrace.protocols.framing import HEAD_BYTES, INVALID, NEED_MORE, DirectionFramer, Frame, Framed

PROTOCOL = "http2"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x4, 0x8, 0x20
MAX_FRAME = 1 << 24
FRAME_HEADER = 9
MAX_STREAMS = 4096
GRPC_CODES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
              "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
              "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")  # fmt: skip
UNDECODED = "connection start not seen"


def starts_request(data: bytes) -> bool:
    return data.startswith(PREFACE[: len(data)]) if len(data) < len(PREFACE) else data.startswith(PREFACE)


def starts_response(data: bytes) -> bool:
    """A server opens with a SETTINGS frame on stream 0."""
    return len(data) >= 9 and data[3] == SETTINGS and data[5:9] == b"\0\0\0\0" and int.from_bytes(data[:3], "big") % 6 == 0


def starts_frame(data: bytes) -> bool:
    """Whether data plausibly starts with a frame header: used to get back in step
    after a hole, at the start of a syscall (clients and servers write whole frames)."""
    if starts_request(data) or len(data) < 9:
        return starts_request(data)
    length, kind, stream = int.from_bytes(data[:3], "big"), data[3], int.from_bytes(data[5:9], "big")
    return length <= 1 << 20 and kind <= CONTINUATION and stream < 1 << 31 and (stream == 0) == (
        kind in (SETTINGS, PING, GOAWAY) or (kind == WINDOW_UPDATE and stream == 0))


def frame(buf: bytes) -> Frame | str:
    if buf[:1] == b"P" and PREFACE.startswith(buf[:24]):
        return Frame(len(PREFACE), {"type": "preface"}) if len(buf) >= len(PREFACE) else NEED_MORE
    if len(buf) < 9:
        return NEED_MORE
    length = int.from_bytes(buf[:3], "big")
    kind, flags = buf[3], buf[4]
    stream = struct.unpack_from("!I", buf, 5)[0] & 0x7FFFFFFF
    if kind > CONTINUATION or length > MAX_FRAME:
        return INVALID
    # Header blocks and stream resets are read; DATA is framed from its header alone.
    if kind in (HEADERS, CONTINUATION, RST_STREAM) and len(buf) < 9 + length:
        return NEED_MORE
    payload = buf[9 : 9 + length] if kind != DATA else b""
    return Frame(9 + length, {"type": kind, "flags": flags, "stream": stream, "payload": payload, "length": length})


def _header_block(f: dict) -> bytes:
    """The HPACK block of a HEADERS frame, without padding and priority fields."""
    payload, flags = f["payload"], f["flags"]
    start, end = 0, len(payload)
    if flags & PADDED and payload:
        start, end = 1, len(payload) - payload[0]
    if flags & PRIORITY_FLAG:
        start += 5
    return payload[start:end] if start <= end else b""


class _Half:
    """One side of one stream, until END_STREAM."""

    __slots__ = ("block", "frames", "headers")

    def __init__(self) -> None:
        self.frames: list[Framed] = []
        self.headers: dict[str, str] = {}
        self.block = b""  # header block being continued


class Http2Connection(ConnectionParser):
    protocol = PROTOCOL

    def __init__(self) -> None:
        self._framers = {True: DirectionFramer(frame, starts_frame), False: DirectionFramer(frame, starts_frame)}
        self._hpack = {True: hpack.Decoder(), False: hpack.Decoder()}
        self._decodable = {True: False, False: False}  # True once the side's first frames were seen
        self._open: dict[tuple[bool, int], _Half] = {}
        self._seen_first = {True: False, False: False}

    def feed(self, is_request: bool, chunk: Chunk) -> list[Message]:
        out: list[Message] = []
        framer = self._framers[is_request]
        lost = framer.lost
        frames = framer.feed(chunk)
        if framer.lost != lost:
            # Bytes were lost between frames: if a header block was among them, the HPACK
            # table is no longer what the peer's is. Stop trusting it rather than guess.
            self._decodable[is_request] = False
        for f in frames:
            if not self._seen_first[is_request]:
                # HPACK state is only right if we saw this side from its first frame.
                self._seen_first[is_request] = True
                self._decodable[is_request] = f.fields["type"] == "preface" or (
                    not is_request and f.fields["type"] == SETTINGS)
            if f.fields["type"] == "preface":
                continue
            msg = self._frame(is_request, f)
            if msg is not None:
                out.append(msg)
        return out

    def _frame(self, is_request: bool, f: Framed) -> Message | None:
        fields = f.fields
        kind, stream = fields["type"], fields["stream"]
        if stream == 0 or kind not in (HEADERS, CONTINUATION, DATA, RST_STREAM):
            return None  # connection-level: SETTINGS, PING, GOAWAY, WINDOW_UPDATE, PRIORITY
        key = (is_request, stream)
        half = self._open.get(key)
        if half is None:
            if len(self._open) >= MAX_STREAMS:
                self._open.pop(next(iter(self._open)))
            half = self._open[key] = _Half()
        half.frames.append(f)
        if kind in (HEADERS, CONTINUATION):
            half.block += _header_block(fields) if kind == HEADERS else fields["payload"]
            if fields["flags"] & END_HEADERS:
                self._decode(is_request, half)
        ended = kind == RST_STREAM or (kind in (HEADERS, DATA) and fields["flags"] & END_STREAM)
        if not ended:
            return None
        del self._open[key]
        if kind == RST_STREAM:
            half.headers.setdefault(":rst", str(int.from_bytes(fields["payload"][:4], "big")))
        return self._message(is_request, stream, half)

    def _decode(self, is_request: bool, half: _Half) -> None:
        block, half.block = half.block, b""
        if not self._decodable[is_request]:
            return
        try:
            for name, value in self._hpack[is_request].decode(block, raw=True):
                half.headers[name.decode("latin-1").lower()] = value.decode("utf-8", "replace")
        except (hpack.HPACKError, ValueError, IndexError):
            self._decodable[is_request] = False  # state lost (a hole in a header block): stop guessing

    def _message(self, is_request: bool, stream: int, half: _Half) -> Message:
        h = half.headers
        attrs: dict = {"http2.stream_id": stream}
        if not self._decodable[is_request] and not h:
            attrs["deeptrace.http2.headers"] = UNDECODED
        grpc = h.get("content-type", "").startswith("application/grpc")
        if is_request:
            path = h.get(":path", "")
            if grpc and path.count("/") == 2:
                name = f"grpc {path[1:]}"
                service, method = path[1:].split("/")
                attrs.update({"rpc.system": "grpc", "rpc.service": service, "rpc.method": method})
            elif path:
                from deeptrace.protocols.http1 import template_path

                name = f"{h.get(':method', 'GET')} {template_path(path.split('?', 1)[0])}"
                attrs.update({"http.request.method": h.get(":method", ""), "url.path": path.split("?", 1)[0]})
            else:
                name = f"HTTP/2 stream {stream}"
            for key in (":authority", "user-agent", "x-request-id", "traceparent", "b3", "uber-trace-id"):
                if key in h:
                    attrs[f"http.request.header.{key.lstrip(':')}"] = h[key]
            msg = message_from_parts(half.frames, PROTOCOL, True, name=name, pair_key=stream, attributes=attrs,
                                     head=_head(h, half.frames))  # fmt: skip
        else:
            error, code = False, None
            if ":status" in h:
                attrs["http.response.status_code"] = int(h[":status"]) if h[":status"].isdigit() else h[":status"]
                code = h[":status"]
                error = h[":status"].isdigit() and int(h[":status"]) >= 400
            if "grpc-status" in h:
                status = int(h["grpc-status"]) if h["grpc-status"].isdigit() else -1
                attrs["rpc.grpc.status_code"] = status
                code = GRPC_CODES[status] if 0 <= status < len(GRPC_CODES) else h["grpc-status"]
                error = status != 0
                if "grpc-message" in h:
                    attrs["rpc.grpc.message"] = h["grpc-message"]
            if ":rst" in h:
                error, code = True, f"RST_STREAM {h[':rst']}"
            msg = message_from_parts(half.frames, PROTOCOL, False, error=error, status_code=code, pair_key=stream,
                                     attributes=attrs, head=_head(h, half.frames))  # fmt: skip
        msg.seq_start = msg.seq_end = None  # frames of other streams interleave: no single byte range
        return msg


def _head(headers: dict[str, str], frames: list[Framed]) -> bytes:
    """Decoded headers read better than HPACK bytes (spans.make_span redacts them). The start of
    the body follows, since its fields (user ids, order ids) are what links calls."""
    if not headers:
        return frames[0].head
    lines = (f"{k}: {v}" for k, v in headers.items() if not k.startswith(":rst"))
    text = "\n".join(lines).encode()
    body = next((f.head[FRAME_HEADER:] for f in frames if f.fields["type"] == DATA), b"")
    if body[:1] in (b"\x00", b"\x01") and len(body) >= 5:
        body = body[5:]  # gRPC length prefix
    if not body:
        return text[:HEAD_BYTES]
    return (text[: max(96, HEAD_BYTES - 2 - len(body))] + b"\n\n" + body)[:HEAD_BYTES]
