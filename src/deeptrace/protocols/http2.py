"""HTTP/2 and gRPC: frames, HPACK, streams multiplexed on one connection, `:method :path
:status`, gRPC service/method and `grpc-status`; also on connections joined mid-stream.

Frames are framed one by one (9-byte header + length, so large DATA frames are skipped
through holes by their length); a stream's frames from one side make one message, ended
by END_STREAM (or RST_STREAM). Requests and responses pair by stream id. A request is
emitted once its headers are whole and grows until its end, since a client stream may
outlast the server's answer, or the capture; a response the close cuts short is emitted
from what was seen of it.

HPACK (RFC 7541) is decoded here with what can be known: the static table, literals and
Huffman strings always; the dynamic table only for the entries we saw inserted. A
connection joined mid-stream has a dynamic table we never saw filled: an index into
it is counted as unknown (`http2.request.headers_unknown`), never guessed, and names say
only what was decoded ("HTTP/2 POST", "grpc (unknown method)").
"""

from __future__ import annotations

import struct
from collections import deque

from hpack.exceptions import HPACKDecodingError
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

from deeptrace.protocols.base import Chunk, ConnectionParser, Message, message_from
from deeptrace.protocols.framing import HEAD_BYTES, INVALID, NEED_MORE, DirectionFramer, Frame, Framed

PROTOCOL = "http2"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    range(10)
)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
FRAME_HEADER = 9
MAX_FRAME = (1 << 24) - 1  # the 24-bit length field's limit (SETTINGS_MAX_FRAME_SIZE may not exceed it)
DEFAULT_MAX_FRAME = 1 << 14  # RFC 9113 6.5.2: until the receiver's SETTINGS say otherwise
MAX_STREAMS = 1024  # streams open at once per connection; the oldest is dropped past this
MAX_BLOCK = 64 << 10  # a header block (HEADERS + CONTINUATIONs) larger than this is not decoded
DEFAULT_TABLE = 4096  # RFC 7541 4.2: the dynamic table's size until a size update
TABLE_CAP = 64 << 10  # we never hold more dynamic table than this, whatever the peers agreed
ENTRY_OVERHEAD = 32  # RFC 7541 4.1: an entry's size is name + value + 32
DETECT_FRAMES = 32  # frames walked to decide which side of a connection bytes come from
GRPC_CODES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
              "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
              "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")  # fmt: skip
RST_CODES = ("NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR", "SETTINGS_TIMEOUT",
             "STREAM_CLOSED", "FRAME_SIZE_ERROR", "REFUSED_STREAM", "CANCEL", "COMPRESSION_ERROR", "CONNECT_ERROR",
             "ENHANCE_YOUR_CALM", "INADEQUATE_SECURITY", "HTTP_1_1_REQUIRED")  # fmt: skip

# Per frame type: the flags it defines, and the payload length it must have (None: any).
_FLAGS = (END_STREAM | PADDED, END_STREAM | END_HEADERS | PADDED | PRIORITY_FLAG, 0, 0, ACK,
          END_HEADERS | PADDED, ACK, 0, 0, END_HEADERS)  # fmt: skip
_FIXED_LENGTH = (None, None, 5, 4, None, None, 8, None, 4, None)
_CONNECTION_FRAMES = (SETTINGS, PING, GOAWAY)  # on stream 0 only
_KEEP_PAYLOAD = (HEADERS, CONTINUATION, PUSH_PROMISE, RST_STREAM, SETTINGS)  # read, not only framed
_STATIC = tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in HeaderTable.STATIC_TABLE)
_REQUEST_PSEUDO = frozenset((":method", ":path", ":scheme", ":authority"))
_HEAD_FIELDS = (":authority", "user-agent", "x-request-id", "traceparent", "b3", "uber-trace-id")


# ---- frame headers ----


def header_ok(data: bytes, pos: int, client: bool | None, strict: bool, max_len: int = MAX_FRAME) -> bool:
    """Whether data[pos:pos+9] can be a frame header sent by a client (True), a server
    (False) or either (None). Strict: only the frame types and flags RFC 9113 defines,
    as implementations send them; otherwise unknown types pass (peers ignore them)."""
    length = int.from_bytes(data[pos : pos + 3], "big")
    kind, flags = data[pos + 3], data[pos + 4]
    stream = int.from_bytes(data[pos + 5 : pos + 9], "big")
    if length > max_len:
        return False
    if kind > CONTINUATION:
        return not strict
    if strict and (stream >> 31 or flags & ~_FLAGS[kind]):
        return False
    stream &= 0x7FFFFFFF
    if kind != WINDOW_UPDATE and (stream == 0) != (kind in _CONNECTION_FRAMES):
        return False
    fixed = _FIXED_LENGTH[kind]
    if fixed is not None and length != fixed:
        return False
    if kind == SETTINGS and (length % 6 or (flags & ACK and length)):
        return False
    if kind == GOAWAY and length < 8:
        return False
    if (flags & PADDED) and length < 1 + (4 if kind == PUSH_PROMISE else 0):
        return False
    if kind == HEADERS and flags & PRIORITY_FLAG and length < 5:
        return False
    # Clients open odd streams and may not send on a server's pushed (even) ones; only servers push.
    if kind == PUSH_PROMISE and (client is True or not stream & 1 or length < 4):
        return False
    return not (client is True and kind in (HEADERS, DATA, CONTINUATION) and not stream & 1)


def _chain_ok(data: bytes, client: bool | None, strict: bool, max_len: int) -> bool:
    """The frame at data[0] is plausible, and so is the next one where the bytes hold its header."""
    if not header_ok(data, 0, client, strict, max_len):
        return False
    after = FRAME_HEADER + int.from_bytes(data[:3], "big")
    return len(data) < after + FRAME_HEADER or header_ok(data, after, client, strict, max_len)


def _header_block(payload: bytes, flags: int, kind: int) -> bytes:
    """The HPACK fragment of a HEADERS or PUSH_PROMISE payload: padding, priority and the
    promised stream id taken off."""
    start, end = 0, len(payload)
    if flags & PADDED and payload:
        start, end = 1, len(payload) - payload[0]
    if kind == HEADERS and flags & PRIORITY_FLAG:
        start += 5
    elif kind == PUSH_PROMISE:
        start += 4
    return payload[start:end] if start <= end else b""


# ---- HPACK ----


class _Bad(Exception):
    """The header block is not valid HPACK for the table we hold: we are out of step."""


def _integer(block: bytes, pos: int, prefix: int) -> tuple[int, int]:
    """RFC 7541 5.1: an integer in a prefix of `prefix` bits at block[pos]; (value, next pos)."""
    mask = (1 << prefix) - 1
    value = block[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    while True:
        if pos >= len(block) or shift > 21:  # 2^28 is far beyond any index or length here
            raise _Bad
        byte = block[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _string(block: bytes, pos: int) -> tuple[bytes, int]:
    """RFC 7541 5.2: a string literal, Huffman-decoded if so marked."""
    if pos >= len(block):
        raise _Bad
    huffman = block[pos] & 0x80
    length, pos = _integer(block, pos, 7)
    end = pos + length
    if end > len(block):
        raise _Bad
    raw = block[pos:end]
    if huffman:
        try:
            raw = decode_huffman(raw)
        except HPACKDecodingError:
            raise _Bad from None
    return raw, end


class HpackTable:
    """One direction's HPACK dynamic table, as far as we know it.

    `entries` are the newest ones, which we saw inserted (newest first): (name or None
    when its name came from an entry we never knew, value, size). Older entries may
    follow that we never saw (`tail_unknown`): an index past ours refers to one of them.
    Sizes of entries with unknown names are lower bounds, and a max size we did not
    see set is taken as the largest we hold: both only keep entries longer than the
    peer does, and the peer never refers to an entry it evicted, so what we decode is
    what it meant. We decide that no unknown entry is left only on exact knowledge."""

    __slots__ = ("entries", "exact", "max_size", "size", "tail_unknown")

    def __init__(self, from_start: bool) -> None:
        self.entries: deque[tuple[str | None, str, int]] = deque()
        self.size = 0
        self.from_start() if from_start else self.lost()

    def from_start(self) -> None:
        """The connection's start: an empty table of the default size."""
        self.entries.clear()
        self.size, self.max_size, self.exact, self.tail_unknown = 0, DEFAULT_TABLE, True, False

    def lost(self) -> None:
        """Insertions we did not see happened (joined mid-stream, or bytes lost): the
        positions of what we held are unknown too."""
        self.entries.clear()
        self.size, self.max_size, self.exact, self.tail_unknown = 0, TABLE_CAP, False, True

    def get(self, index: int) -> tuple[str | None, str | None]:
        """(name, value) at an HPACK index; None for what we cannot know."""
        if index <= 0:
            raise _Bad
        if index <= len(_STATIC):
            return _STATIC[index - 1]
        i = index - len(_STATIC) - 1
        if i < len(self.entries):
            name, value, _ = self.entries[i]
            return name, value
        if self.tail_unknown and i < self.max_size // ENTRY_OVERHEAD:
            return None, None
        raise _Bad

    def add(self, name: str | None, value: str, size: int) -> None:
        self.entries.appendleft((name, value, size))
        self.size += size
        self._evict()

    def resize(self, max_size: int) -> None:
        if max_size > TABLE_CAP:  # more than we hold: entries we drop may still be the peer's
            self.max_size, self.exact, self.tail_unknown = TABLE_CAP, False, True
        else:
            self.max_size, self.exact = max_size, True
        self._evict()

    def _evict(self) -> None:
        while self.size > self.max_size and self.entries:
            self.size -= self.entries.pop()[2]
        # Unknown entries are older than all of ours, so they went first: when not even the
        # smallest entry fits beside ours, none is left. Said only when max_size is exact.
        if self.exact and self.size + ENTRY_OVERHEAD > self.max_size:
            self.tail_unknown = False

    def decode(self, block: bytes) -> list[tuple[str, str] | None]:
        """A header block's fields, None for each we cannot know. A block that is not valid
        for our table costs the table (we may have missed its insertions): its rest is one
        None."""
        fields: list[tuple[str, str] | None] = []
        pos = 0
        try:
            while pos < len(block):
                byte = block[pos]
                if byte & 0x80:  # indexed field
                    index, pos = _integer(block, pos, 7)
                    name, value = self.get(index)
                    fields.append(None if name is None or value is None else (name, value))
                    continue
                if byte & 0xE0 == 0x20:  # dynamic table size update
                    size, pos = _integer(block, pos, 5)
                    self.resize(size)
                    continue
                indexing = byte & 0x40  # with incremental indexing; else without / never indexed
                index, pos = _integer(block, pos, 6 if indexing else 4)
                if index:
                    name = self.get(index)[0]
                    name_len = 0 if name is None else len(name)  # a lower bound when unknown
                else:
                    raw, pos = _string(block, pos)
                    name, name_len = raw.decode("latin-1").lower(), len(raw)
                raw, pos = _string(block, pos)
                value = raw.decode("utf-8", "replace")
                if indexing:
                    self.add(name, value, name_len + len(raw) + ENTRY_OVERHEAD)
                fields.append(None if name is None else (name, value))
        except _Bad:
            fields.append(None)
            self.lost()
        return fields


def _side_of_block(block: bytes, complete: bool) -> bool | None:
    """True if a header block carries request pseudo-headers, False for `:status`, None if
    it cannot say (only dynamic-table fields). Parsed as HPACK with an unknown table, so
    bytes that are not a header block are refused (None). A block cut short (the frame
    continues in CONTINUATION) may end inside a field."""
    table = HpackTable(from_start=False)
    side: bool | None = None
    pos = 0
    try:
        while pos < len(block):
            start = pos
            byte = block[pos]
            if byte & 0x80:
                index, pos = _integer(block, pos, 7)
                name, value = table.get(index)
            elif byte & 0xE0 == 0x20:
                _, pos = _integer(block, pos, 5)
                continue
            else:
                index, pos = _integer(block, pos, 6 if byte & 0x40 else 4)
                name = table.get(index)[0] if index else None
                if not index:
                    raw, pos = _string(block, pos)
                    name = raw.decode("latin-1")
                raw, pos = _string(block, pos)
                value = raw.decode("latin-1")
            if name is None or not name.startswith(":"):
                continue
            this = _pseudo_side(name, value)
            if this is None or (side is not None and this != side):
                return None  # not a pseudo-header, a bad value, or both kinds: not a header block
            side = this
    except _Bad:
        if complete or start == 0:
            return None
    return side


def _pseudo_side(name: str, value: str) -> bool | None:
    if name == ":status":
        return False if len(value) == 3 and value.isdigit() else None
    if name == ":method":
        return True if value.isalpha() and value.isupper() else None
    if name == ":path":
        return True if value[:1] in ("/", "*") else None
    if name in (":scheme", ":authority"):
        return True
    return None


# ---- detection ----


def _side(data: bytes) -> bool | None:
    """Which side sent these bytes, from the HTTP/2 frames they start with: True for a
    client (its connection preface, or request pseudo-headers in a HEADERS frame), False
    for a server (`:status`, or PUSH_PROMISE), None when the frames so far cannot tell
    (DATA, WINDOW_UPDATE, PING, ...) or these are not HTTP/2 frames."""
    if data[:1] == b"P":  # "PRI" is no HTTP/1 method: three bytes of the preface tell
        return True if len(data) >= 3 and PREFACE.startswith(data[: len(PREFACE)]) else None
    pos, even = 0, False
    for _ in range(DETECT_FRAMES):
        if pos + FRAME_HEADER > len(data) or not header_ok(data, pos, None, True):
            return None
        length, kind, flags = int.from_bytes(data[pos : pos + 3], "big"), data[pos + 3], data[pos + 4]
        even = even or (kind in (HEADERS, DATA, CONTINUATION) and not data[pos + 8] & 1)  # only servers push
        end = pos + FRAME_HEADER + length
        if end > len(data):
            return None  # the whole frame is needed to tell (and bytes after it must be a frame too)
        if kind == PUSH_PROMISE:
            return False
        if kind == HEADERS:
            block = _header_block(data[pos + FRAME_HEADER : end], flags, kind)
            side = _side_of_block(block, bool(flags & END_HEADERS))
            if side is not None and not (side and even):
                return side if end + FRAME_HEADER > len(data) or header_ok(data, end, side, True) else None
            if side is not None:
                return None
        pos = end
    return None


def frames_of_either_side(data: bytes) -> bool:
    """Whether data is whole HTTP/2 frames (at least two, or one that ends where the bytes
    do) that either side could have sent (DATA, WINDOW_UPDATE, PING, ...). Detection should
    wait for more on such bytes rather than let a looser check take them for another protocol."""
    if _side(data) is not None:
        return False
    pos = frames = 0
    while frames < DETECT_FRAMES and pos + FRAME_HEADER <= len(data):
        if not header_ok(data, pos, None, True):
            return False
        pos += FRAME_HEADER + int.from_bytes(data[pos : pos + 3], "big")
        frames += 1
    # Ending inside a frame, the bytes need two headers in a row that vouch for each other.
    return frames >= 1 if pos == len(data) else frames >= 2


def starts_request(data: bytes) -> bool:
    """A client's bytes: its connection preface, or, on a connection joined mid-stream,
    frames up to a HEADERS frame that carries request pseudo-headers."""
    return _side(data) is True


def starts_response(data: bytes) -> bool:
    """A server's bytes, joined mid-stream: frames up to a HEADERS frame with `:status`
    (or a PUSH_PROMISE). A server's SETTINGS alone cannot tell: clients send them too."""
    return _side(data) is False


# ---- one direction ----


class _Direction:
    """What one side of the connection sends: its framing, its encoder's table as far as we
    know it, the header block it is in the middle of."""

    def __init__(self, client: bool) -> None:
        self.client = client
        self.framer = DirectionFramer(self.frame, self.starts_frame)
        self.table = HpackTable(from_start=False)
        self.seen_first = False
        self.checked = 0  # frames in a row found plausible since we got in step; strict until 2
        # What the peer's SETTINGS let this side send. The 16 KiB default is not assumed: the
        # SETTINGS that raised it may be processed after this side's first frames.
        self.max_frame = MAX_FRAME
        self.block = bytearray()  # header block fragments waiting for END_HEADERS
        self.block_stream: int | None = None
        self.block_kind = HEADERS
        self.block_lost = False  # a fragment of it was too large to keep

    def frame(self, buf: bytes) -> Frame | str:
        if self.client and buf[:1] == b"P" and PREFACE.startswith(buf[: len(PREFACE)]):
            return Frame(len(PREFACE), {"type": "preface"}) if len(buf) >= len(PREFACE) else NEED_MORE
        if len(buf) < FRAME_HEADER:
            return NEED_MORE
        # Until two frames in a row were plausible, we may be mid-frame (joined, or after lost
        # bytes): check strictly, and that the next frame header is one too where it is here.
        strict = self.checked < 2
        if not (_chain_ok(buf, self.client, True, self.max_frame) if strict
                else header_ok(buf, 0, self.client, False, self.max_frame)):  # fmt: skip
            return INVALID
        length, kind = int.from_bytes(buf[:3], "big"), buf[3]
        if kind in _KEEP_PAYLOAD and len(buf) < FRAME_HEADER + length:
            return NEED_MORE
        payload = buf[FRAME_HEADER : FRAME_HEADER + length] if kind in _KEEP_PAYLOAD else b""
        stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
        return Frame(
            FRAME_HEADER + length, {"type": kind, "flags": buf[4], "stream": stream, "payload": payload}
        )

    def starts_frame(self, data: bytes) -> bool:
        """Getting back in step at the start of a syscall (peers write whole frames)."""
        if self.client and data[:1] == b"P" and PREFACE.startswith(data[: len(PREFACE)]):
            return True
        if len(data) < FRAME_HEADER or not _chain_ok(data, self.client, True, self.max_frame):
            return False
        self.checked = 0
        return True

    def settings(self, payload: bytes, peer: _Direction) -> None:
        """This side's SETTINGS bind what the peer sends."""
        for pos in range(0, len(payload) - 5, 6):
            ident, value = struct.unpack_from("!HI", payload, pos)
            if ident == 5 and DEFAULT_MAX_FRAME <= value <= MAX_FRAME:  # SETTINGS_MAX_FRAME_SIZE
                peer.max_frame = value

    def out_of_step(self) -> None:
        self.table.lost()
        self.drop_block()
        self.checked = 0

    def drop_block(self) -> None:
        self.block.clear()
        self.block_stream, self.block_lost = None, False


# ---- streams ----


class _Half:
    """One side of one stream, until END_STREAM: bounded however many frames it has."""

    __slots__ = ("body", "ending", "first", "grpc_evidence", "headers", "headers_seen", "last", "partial",
                 "size", "unknown")  # fmt: skip

    def __init__(self, first: Framed) -> None:
        self.first = self.last = first
        self.size = 0
        self.partial = False
        self.headers: dict[str, str] = {}
        self.unknown = 0  # header fields we could not decode
        self.headers_seen = False  # its first HEADERS frame was seen (not joined inside the stream)
        self.body = b""  # start of its first DATA frame's payload
        self.grpc_evidence = False
        self.ending = False  # END_STREAM seen, on a HEADERS frame whose block CONTINUATIONs still finish

    def add(self, f: Framed) -> None:
        self.last = f
        self.size += f.size
        self.partial = self.partial or f.partial


class _Stream:
    __slots__ = ("done", "halves", "request", "request_headers")

    def __init__(self) -> None:
        self.halves: dict[bool, _Half | None] = {True: None, False: None}
        self.done = {True: False, False: False}
        # Emitted once its headers were whole; until answered it grows with its frames, and is
        # named again if its response proves it gRPC.
        self.request: Message | None = None
        self.request_headers: dict[str, str] = {}


class Http2Connection(ConnectionParser):
    protocol = PROTOCOL

    def __init__(self) -> None:
        self._sides = {True: _Direction(client=True), False: _Direction(client=False)}
        self._streams: dict[int, _Stream] = {}
        self._joined = False  # the request side's first frame was not the preface

    def feed(self, is_request: bool, chunk: Chunk) -> list[Message]:
        side = self._sides[is_request]
        lost = side.framer.lost
        out: list[Message] = []
        for f in side.framer.feed(chunk):
            side.checked += 1
            self._frame(is_request, side, f, out)
        if side.framer.lost != lost:
            # Bytes were lost between frames: a header block may have been among them, and
            # its insertions with it. What we held of the table is no longer in place.
            side.out_of_step()
        return out

    # ---- frames ----

    def _frame(self, is_request: bool, side: _Direction, f: Framed, out: list[Message]) -> None:
        fields = f.fields
        kind = fields["type"]
        if not side.seen_first:
            side.seen_first = True
            self._first_frame(is_request, side, kind, fields)
        if kind == "preface":
            return
        flags, stream, payload = fields["flags"], fields["stream"], fields["payload"]
        if side.block_stream is not None and (kind != CONTINUATION or stream != side.block_stream):
            side.out_of_step()  # a header block must be continued at once: we lost its end
        if kind == SETTINGS and not flags & ACK:
            side.settings(payload, self._sides[not is_request])
        elif kind == RST_STREAM:
            self._reset(is_request, f, out)
        if stream == 0 or kind not in (HEADERS, CONTINUATION, DATA, PUSH_PROMISE):
            return  # connection-level frames, PRIORITY, WINDOW_UPDATE: not part of a message
        st = self._streams.get(stream)
        if st is None and is_request and kind != CONTINUATION:
            st = self._new_stream(stream)
        # A response on a stream we hold nothing of answers a request we never saw (it began
        # before we joined, or its exchange is over): no message, it could pair with nothing.
        half = None
        if st is not None and not st.done[is_request]:  # else: a frame after the side's end
            half = st.halves[is_request]
            if half is None:
                half = st.halves[is_request] = _Half(f)
                half.headers_seen = kind == HEADERS  # its first frame: the stream began while we watched
            half.add(f)
            if kind == DATA and not half.body and f.head:
                body = f.head[FRAME_HEADER:]
                half.body = body[1:] if flags & PADDED else body
                if is_request and st.request is not None and not st.done[False]:
                    st.request.head = _head(half.headers, half.body)  # emitted with its headers only
        # Every header block goes through the table, whatever its stream: its insertions count.
        sink = half if half is not None and kind != PUSH_PROMISE else _Half(f)
        if kind in (HEADERS, PUSH_PROMISE):
            side.block_stream, side.block_kind = stream, kind
            self._fragment(side, sink, _header_block(payload, flags, kind), flags)
        elif kind == CONTINUATION:
            if side.block_stream == stream:
                self._fragment(side, sink, payload, flags)
            else:  # joined inside a header block: its start, and its insertions, are not ours
                sink.unknown += 1
                side.table.lost()
        if half is not None:
            self._progress(is_request, stream, st, half, kind, flags, out)

    def _progress(self, is_request: bool, stream: int, st: _Stream, half: _Half, kind: int, flags: int,
                  out: list[Message]) -> None:  # fmt: skip
        """A frame was added to a stream's side: it may end it, or make its request known."""
        if kind in (HEADERS, DATA) and flags & END_STREAM:
            half.ending = True
        block_done = kind in (HEADERS, CONTINUATION) and bool(flags & END_HEADERS)
        # END_STREAM on HEADERS ends the side only after its header block: the CONTINUATIONs that
        # follow still carry its fields (grpc-status in trailers, a request's :path).
        if half.ending and (kind == DATA or block_done):
            self._end(is_request, stream, st, out)
        elif is_request and st.request is None and block_done and half.headers_seen:
            # Named now, not at its end: a client stream may outlast the capture (or the server
            # may answer before it ends), and the exchange must still make a span.
            st.request, st.request_headers = self._request(stream, half, None), half.headers
            out.append(st.request)
        elif is_request and st.request is not None and not st.done[False]:
            _grow(st.request, half)

    def _first_frame(self, is_request: bool, side: _Direction, kind, fields: dict) -> None:
        """A side's table is known from its first frame only if that frame opens the connection:
        the client's preface, or the server's SETTINGS on a connection whose preface we saw."""
        if kind == "preface":
            side.table.from_start()
            side.checked = 2
        elif is_request:
            self._joined = True
        elif kind == SETTINGS and not fields["flags"] & ACK and not self._joined:
            side.table.from_start()

    def _fragment(self, side: _Direction, half: _Half, fragment: bytes, flags: int) -> None:
        if side.block_lost or len(side.block) + len(fragment) > MAX_BLOCK:
            side.block_lost = True  # too large to keep: its insertions are lost with it
            side.block.clear()
        else:
            side.block += fragment
        if not flags & END_HEADERS:
            return
        block, kind, block_lost = bytes(side.block), side.block_kind, side.block_lost
        side.drop_block()
        if block_lost:
            half.unknown += 1
            side.table.lost()
            return
        decoded = side.table.decode(block)
        if kind == PUSH_PROMISE:
            return  # the promised request's headers: read only to keep the table in step
        for field in decoded:
            if field is None:
                half.unknown += 1
                continue
            name, value = field
            half.headers[name] = value
            if name.startswith("grpc-") or (name == "content-type" and value.startswith("application/grpc")):
                half.grpc_evidence = True

    def _new_stream(self, stream: int) -> _Stream:
        if len(self._streams) >= MAX_STREAMS:
            del self._streams[next(iter(self._streams))]  # the oldest: its exchange times out
        st = self._streams[stream] = _Stream()
        return st

    def _end(
        self, is_request: bool, stream: int, st: _Stream, out: list[Message], rst: str | None = None
    ) -> None:
        """One side of a stream ended: its message."""
        half = st.halves[is_request]
        st.done[is_request] = True
        if not is_request:
            out.append(self._response(stream, half, st.request, st.request_headers, rst))
        elif st.request is None:
            st.request, st.request_headers = self._request(stream, half, rst), half.headers
            out.append(st.request)
        elif not st.done[False]:  # emitted with its headers and not yet answered: its end is this
            _grow(st.request, half)
            if rst:
                st.request.attributes["http2.request.reset"] = rst
        if st.done[False] and (st.done[True] or st.halves[True] is None):
            self._streams.pop(stream, None)

    def _reset(self, is_request: bool, f: Framed, out: list[Message]) -> None:
        """RST_STREAM ends both sides of the stream: the request as far as it went, and the
        response with the error (made of the reset itself if no response frame came)."""
        stream = f.fields["stream"]
        st = self._streams.get(stream)
        if st is None:
            return  # a stream we know nothing of (or whose exchange is already over)
        code = int.from_bytes(f.fields["payload"][:4], "big")
        reason = f"RST_STREAM {RST_CODES[code] if code < len(RST_CODES) else code}"
        if st.halves[True] is not None and not st.done[True]:
            if is_request:
                st.halves[True].add(f)
            self._end(True, stream, st, out, reason)
        if not st.done[False]:
            if st.halves[False] is None:
                st.halves[False] = _Half(f)  # no response frame: the reset is the answer (of 0 bytes if ours)
            if not is_request:
                st.halves[False].add(f)
            self._end(False, stream, st, out, reason)

    def close(self, end_ns: int) -> list[Message]:
        """The connection closed, or the capture or the agent stopped, inside streams."""
        out: list[Message] = []
        for stream, st in list(self._streams.items()):
            self._cut(stream, st, out)
        self._streams.clear()
        return out

    def _cut(self, stream: int, st: _Stream, out: list[Message]) -> None:
        """A stream the close cut short. A response begun but not ended is what came of its
        request (a `:status` seen, the trailers not): emitted partial, rather than the exchange
        reported unanswered. A response to a request never emitted could pair with nothing."""
        if st.request is None or st.done[False]:
            return
        if not st.done[True]:
            st.request.partial = True  # its end was not seen
        half = st.halves[False]
        if half is None:
            return  # no answer begun: the exchange is unanswered, and says why
        st.done[False] = True
        msg = self._response(stream, half, st.request, st.request_headers, None, cut=True)
        msg.partial = True
        out.append(msg)

    # ---- messages ----

    def _message(self, half: _Half, is_request: bool, **kw) -> Message:
        msg = message_from(half.first, PROTOCOL, is_request, **kw)
        msg.end_ns, msg.tid_end, msg.size, msg.partial = (
            half.last.end_ns,
            half.last.tid_end,
            half.size,
            half.partial,
        )
        msg.seq_start = msg.seq_end = None  # frames of other streams interleave: no single byte range
        return msg

    def _request(self, stream: int, half: _Half, rst: str | None) -> Message:
        h = half.headers
        attrs: dict = {"http2.stream_id": stream}
        if half.unknown:
            attrs["http2.request.headers_unknown"] = half.unknown
        if not half.headers_seen:
            attrs["deeptrace.http2.stream_start_seen"] = False
        if rst:
            attrs["http2.request.reset"] = rst
        for key in _HEAD_FIELDS:
            if key in h:
                attrs[f"http.request.header.{key.lstrip(':')}"] = h[key]
        name = _request_name(h, half.grpc_evidence, attrs)
        return self._message(
            half, True, name=name, pair_key=stream, attributes=attrs, head=_head(h, half.body)
        )

    def _response(self, stream: int, half: _Half, request: Message | None, request_headers: dict[str, str],
                  rst: str | None, cut: bool = False) -> Message:  # fmt: skip
        h = half.headers
        attrs: dict = {}
        if half.unknown:
            attrs["http2.response.headers_unknown"] = half.unknown
        if not half.headers_seen and not rst:
            attrs["deeptrace.http2.stream_start_seen"] = False
        grpc = half.grpc_evidence or (request is not None and request.attributes.get("rpc.system") == "grpc")
        if request is not None and half.grpc_evidence and request.attributes.get("rpc.system") != "grpc":
            # The request's headers did not show it was gRPC (content-type from a table entry
            # we never saw), its response does: name the exchange as a gRPC call.
            request.attributes.pop("http.request.method", None)
            request.attributes.pop("url.path", None)
            request.name = _request_name(request_headers, True, request.attributes)
        error, code = False, None
        status = h.get(":status")
        if status is not None:
            attrs["http.response.status_code"] = int(status) if status.isdigit() else status
            code, error = status, not status.isdigit() or int(status) >= 400 or (grpc and status != "200")
        if "grpc-status" in h:
            value = h["grpc-status"]
            grpc_code = int(value) if value.isdigit() else -1
            attrs["rpc.grpc.status_code"] = grpc_code
            code = GRPC_CODES[grpc_code] if 0 <= grpc_code < len(GRPC_CODES) else value
            error = grpc_code != 0
        elif grpc and not error:
            # gRPC says how the call went in grpc-status, and we could not read it (an entry of the
            # table from before we joined), or the close cut the trailers that carry it. Say so
            # rather than call the HTTP status the outcome.
            code = None
            attrs["deeptrace.http2.grpc_status"] = "not seen" if cut else "not decoded"
        if grpc:
            attrs["rpc.system"] = "grpc"
        if "grpc-message" in h:  # said even when grpc-status was not decoded: it reads as a reason
            attrs["rpc.grpc.message"] = h["grpc-message"]
        if rst:
            error, code = rst != "RST_STREAM NO_ERROR" or error, rst
        return self._message(half, False, error=error, status_code=code, pair_key=stream, attributes=attrs,
                             head=_head(h, half.body))  # fmt: skip


def _grow(msg: Message, half: _Half) -> None:
    """A request emitted before its end takes in the frames since: its span is made when its
    response comes, and the pipeline times a request out from its last byte."""
    msg.end_ns, msg.tid_end = half.last.end_ns, half.last.tid_end
    msg.size, msg.partial = half.size, half.partial


def _request_name(h: dict[str, str], grpc: bool, attrs: dict) -> str:
    """The operation's name from what was decoded, never from what was not; fills attrs."""
    path = h.get(":path", "").split("?", 1)[0]
    method = h.get(":method", "")
    grpc = grpc or h.get("content-type", "").startswith("application/grpc")
    if grpc:
        attrs["rpc.system"] = "grpc"
        if path.count("/") == 2 and len(path) > 2:
            service, rpc_method = path[1:].split("/")
            attrs.update({"rpc.service": service, "rpc.method": rpc_method})
            return f"grpc {path[1:]}"
        return "grpc (unknown method)"
    if method:
        attrs["http.request.method"] = method
    if path:
        from deeptrace.protocols.http1 import template_path

        attrs["url.path"] = path
        return f"{method or 'HTTP/2'} {template_path(path)}"
    return f"HTTP/2 {method}" if method else "HTTP/2 request"


def _head(headers: dict[str, str], body: bytes) -> bytes:
    """Decoded headers read better than HPACK bytes (spans.make_span redacts them), and raw
    header blocks are never kept: a Huffman-coded secret would pass redaction unseen. The
    start of the body follows, since its fields (user ids, order ids) are what links calls."""
    text = "\n".join(f"{k}: {v}" for k, v in headers.items()).encode()
    if body[:1] in (b"\x00", b"\x01") and len(body) >= 5:
        body = body[5:]  # gRPC length prefix
    if not body:
        return text[:HEAD_BYTES]
    if not text:
        return body[:HEAD_BYTES]
    return (text[: max(96, HEAD_BYTES - 2 - len(body))] + b"\n\n" + body)[:HEAD_BYTES]
