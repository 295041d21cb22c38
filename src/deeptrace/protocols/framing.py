"""Turning one direction's chunks and holes into messages, for any protocol.

A protocol supplies a frame function: given the bytes buffered at a message
boundary, it answers with a `Frame` (this message is `length` bytes, maybe more
than are buffered: the rest is skipped as it arrives, captured or not),
`NEED_MORE`, or `INVALID` (these bytes do not start a message: we are out of
step). This module does the rest: buffering, skipping bodies through holes,
timestamps and threads per message, and getting back in step after a hole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from deeptrace.protocols.base import Chunk, ConnectionParser, Message

HEAD_BYTES = 256  # payload head kept per message
MAX_BUFFER = 64 << 10  # a message header larger than this is given up on


@dataclass(slots=True)
class Frame:
    length: int | None  # whole message in bytes; None: runs until the connection closes
    fields: dict = field(default_factory=dict)


NEED_MORE = "need-more"
INVALID = "invalid"

FrameFn = Callable[[bytes], "Frame | str"]


@dataclass(slots=True)
class Framed:
    """A message's bytes located in the stream, before the protocol names it."""

    fields: dict
    size: int
    head: bytes
    start_ns: int
    end_ns: int
    tid_start: int
    tid_end: int
    seq_start: int | None
    partial: bool


@dataclass(slots=True)
class _Open:
    """The message being skipped through (its header is known, its body is not all here)."""

    frame: Frame
    head: bytes
    remaining: int | None  # None: until close
    seen: int  # bytes of it so far, captured or not
    start_ns: int
    tid_start: int
    seq_start: int | None
    partial: bool
    end_ns: int = 0
    tid_end: int = 0


def _seq_at(chunk: Chunk, offset: int) -> int | None:
    """TCP sequence number of chunk.data[offset] (None off TCP)."""
    return None if chunk.seq is None else (chunk.seq + offset) & 0xFFFFFFFF


class DirectionFramer:
    """One direction of one connection."""

    def __init__(self, frame: FrameFn, starts_message: Callable[[bytes], bool],
                 salvage: Callable[[bytes], dict | None] | None = None):  # fmt: skip
        self._frame = frame
        self._starts_message = starts_message  # cheap check used to get back in step
        # Fields of a message whose header is here but whose end cannot be found past a hole.
        self._salvage = salvage
        self._buf = bytearray()
        # (offset in _buf, chunk that brought those bytes, offset of them inside chunk.data)
        self._marks: list[tuple[int, Chunk, int]] = []
        self._open: _Open | None = None
        self.in_step = True
        self.lost = 0  # times we lost step

    def feed(self, chunk: Chunk) -> list[Framed]:
        out: list[Framed] = []
        data = chunk.data
        if not self.in_step:
            # A new syscall often starts a new message: try to get back in step there.
            if not data or not self._starts_message(data):
                return out
            self.in_step = True
        if self._open is not None:
            data = self._skip(len(data), chunk, out, data)
        if data and not self._buf:
            data = self._frame_whole(data, chunk, out)
        if data:
            self._marks.append((len(self._buf), chunk, len(chunk.data) - len(data)))
            self._buf += data
            self._frame_buffered(out, chunk)
        missing = chunk.size - len(chunk.data)
        if missing > 0:
            self.hole(missing, chunk, out, counted=True)
        return out

    def hole(self, nbytes: int, chunk: Chunk, out: list[Framed], counted: bool = False) -> None:
        """nbytes moved but were not captured (truncation or lost records). counted: bytes of
        this very call past the capture limit; a message of known length that they lie inside
        is still whole (its size and end are exact), so it is not marked partial."""
        if self._open is not None:
            rem = self._open.remaining
            if not (counted and rem is not None and rem >= nbytes):
                self._open.partial = True
            if self._open.remaining is None or self._open.remaining >= nbytes:
                self._skip(nbytes, chunk, out, b"")
                return
            # It ends inside the hole: it is whole (if not all seen); what follows it is unknown.
            nbytes -= self._open.remaining
            self._skip(self._open.remaining, chunk, out, b"")
        # A header cut short, a body of unknown length cut, or a hole past the end of the
        # message we knew: out of step. Keep what can be said of a message begun here.
        if self._buf and self._salvage is not None:
            fields = self._salvage(bytes(self._buf))
            if fields is not None:
                _, first, first_off = self._marks[0]
                out.append(Framed(
                    fields, len(self._buf) + nbytes, bytes(self._buf[:HEAD_BYTES]), first.start_ns, chunk.end_ns,
                    first.tid, chunk.tid, _seq_at(first, first_off), True,
                ))  # fmt: skip
        self._lose_step()

    def close(self, end_ns: int) -> list[Framed]:
        """The connection closed: a message that runs until close ends here."""
        out: list[Framed] = []
        if self._open is not None and self._open.remaining is None:
            self._open.end_ns = max(self._open.end_ns, end_ns)
            out.append(self._finish(self._open))
            self._open = None
        return out

    # ---- internals ----

    def _lose_step(self) -> None:
        self._buf.clear()
        self._marks.clear()
        self._open = None
        if self.in_step:
            self.lost += 1
        self.in_step = False

    def _skip(self, nbytes: int, chunk: Chunk, out: list[Framed], data: bytes) -> bytes:
        """Count nbytes toward the open message; returns what is left of data."""
        op = self._open
        take = nbytes if op.remaining is None else min(op.remaining, nbytes)
        op.end_ns, op.tid_end = chunk.end_ns, chunk.tid
        op.seen += take
        if op.remaining is not None:
            op.remaining -= take
            if op.remaining == 0:
                out.append(self._finish(op))
                self._open = None
        return data[take:] if data else data

    def _frame_whole(self, data: bytes, chunk: Chunk, out: list[Framed]) -> bytes:
        """Frame the messages that lie wholly inside one chunk (the usual case: one
        message, or several pipelined, per syscall) straight from its bytes; returns
        what is left for the buffer."""
        base = len(chunk.data) - len(data)
        while data:
            result = self._frame(data)
            if result.__class__ is not Frame or result.length is None or result.length > len(data):
                return data  # incomplete, running on, or not a message: the general path decides
            length = result.length
            seq = _seq_at(chunk, base)
            # A head is its own message's bytes only: what follows in the same syscall
            # (a pipelined AUTH, another request's token) belongs to the next one.
            out.append(Framed(result.fields, length, data[: min(length, HEAD_BYTES)], chunk.start_ns, chunk.end_ns,
                              chunk.tid, chunk.tid, seq, False))  # fmt: skip
            data = data[length:]
            base += length
        return data

    def _frame_buffered(self, out: list[Framed], chunk: Chunk) -> None:
        while self._buf:
            pending = bytes(self._buf)
            result = self._frame(pending)
            if result == NEED_MORE:
                if len(self._buf) > MAX_BUFFER:
                    self._lose_step()
                return
            if result == INVALID:
                self._lose_step()
                return
            _, first, first_off = self._marks[0]
            start_seq = _seq_at(first, first_off)
            length = result.length
            if length is not None and length <= len(self._buf):
                last = self._chunk_at(length - 1)
                out.append(Framed(
                    result.fields, length, pending[: min(length, HEAD_BYTES)], first.start_ns,
                    last.end_ns, first.tid, last.tid, start_seq, False,
                ))  # fmt: skip
                self._consume(length)
                continue
            # Longer than what is here: keep the header, skip the rest as it comes.
            have = len(self._buf)
            self._open = _Open(
                result, bytes(self._buf[:HEAD_BYTES]), None if length is None else length - have, have,
                first.start_ns, first.tid, start_seq, False, chunk.end_ns, chunk.tid,
            )  # fmt: skip
            self._consume(have)
            return

    def _chunk_at(self, offset: int) -> Chunk:
        found = self._marks[0][1]
        for start, chunk, _ in self._marks:
            if start > offset:
                break
            found = chunk
        return found

    def _consume(self, n: int) -> None:
        del self._buf[:n]
        if not self._buf:
            self._marks.clear()
            return
        # Rebase the marks; the one covering the new start keeps its place inside its chunk.
        keep: list[tuple[int, Chunk, int]] = []
        for off, chunk, chunk_off in self._marks:
            off -= n
            if off <= 0:
                keep = [(0, chunk, chunk_off - off)]
            else:
                keep.append((off, chunk, chunk_off))
        self._marks = keep

    @staticmethod
    def _finish(op: _Open) -> Framed:
        return Framed(op.frame.fields, op.seen, op.head, op.start_ns, op.end_ns, op.tid_start, op.tid_end,
                      op.seq_start, op.partial)  # fmt: skip


class FramedConnection(ConnectionParser):
    """A connection parser made of one framer per side and a handler per side that
    turns a framed piece into a Message, or None when the piece is not a message of
    its own (part of a larger one, connection set-up, a push), or a list of Messages."""

    def __init__(self, requests: DirectionFramer, responses: DirectionFramer) -> None:
        self._requests = requests
        self._responses = responses

    def feed(self, is_request: bool, chunk: Chunk) -> list[Message]:
        framer, handle = (self._requests, self._request) if is_request else (self._responses, self._response)
        out: list[Message] = []
        for f in framer.feed(chunk):
            got = handle(f)
            if got.__class__ is list:  # a piece that also ends an exchange whose end was never seen
                out += got
            elif got is not None:
                out.append(got)
        return out

    def _request(self, f: Framed) -> Message | list[Message] | None:
        raise NotImplementedError

    def _response(self, f: Framed) -> Message | list[Message] | None:
        raise NotImplementedError
