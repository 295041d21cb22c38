"""Per-connection byte streams in TCP sequence order.

Records of one connection can reach user space out of order (each CPU fills the
ring in turn, and a batch is not globally sorted). Each direction of a TCP
connection is put back in order by its sequence numbers; a range that never
arrives within the reorder window (a dropped record) becomes a hole of known
length, so the parsers can skip it instead of being shifted by it.
"""

from __future__ import annotations

from deeptrace.capture.records import FLAG_ASSEMBLED, FLAG_TLS, Record
from deeptrace.protocols.base import Chunk

REORDER_WINDOW_NS = 50_000_000  # how long a later range waits for an earlier one
MAX_WAITING = 256  # ranges held per direction before the earliest hole is given up on
_SEQ_MOD = 1 << 32


def _ahead(a: int, b: int) -> int:
    """How far seq a is ahead of seq b, in the 32-bit sequence space (negative: behind)."""
    d = (a - b) % _SEQ_MOD
    return d - _SEQ_MOD if d >= _SEQ_MOD // 2 else d


def to_chunk(rec: Record) -> Chunk:
    # Data written is on its way at the write's enter; data read was there at the read's exit
    # (a record the kernel assembled from several calls says when its first byte moved).
    start = rec.enter_ns if rec.direction == "egress" or rec.flags & FLAG_ASSEMBLED else rec.exit_ns
    seq = rec.enter_seq if rec.l4 == "tcp" else None
    if rec.flags & FLAG_TLS and rec.exit_seq == rec.enter_seq:
        seq = None  # TLS plaintext read ahead earlier: no ciphertext of its own to number it
    return Chunk(rec.payload, rec.size, start, rec.exit_ns, rec.tid, seq)


def hole(nbytes: int, at: Chunk) -> Chunk:
    """nbytes that moved but that we never saw, just before `at`."""
    return Chunk(b"", nbytes, at.start_ns, at.start_ns, at.tid, (at.seq - nbytes) % _SEQ_MOD)


class OrderedStream:
    """One direction of one TCP connection: records in, chunks (and holes) out, in order."""

    def __init__(self, stats=None) -> None:
        self.next_seq: int | None = None
        self._waiting: dict[int, tuple[int, Chunk]] = {}  # seq -> (arrival ns, chunk)
        self._stats = stats  # anything with a `holes` count to add to

    def push(self, rec: Record, now_ns: int) -> list[Chunk]:
        if rec.l4 != "tcp":
            return [to_chunk(rec)]  # a datagram is a message of its own
        if rec.flags & FLAG_TLS:
            # Plaintext from a TLS library: its seq range is the ciphertext's, which does not
            # number these bytes. A library's calls on one direction of a session follow one
            # another; they come in the order the batch sorted them into (pipeline._in_order).
            return [to_chunk(rec)]
        if rec.exit_seq == rec.enter_seq:
            return []  # MSG_PEEK: the same bytes come again in the real read
        chunk = to_chunk(rec)
        if chunk.seq == self.next_seq and not self._waiting:  # the usual case: next in line
            self.next_seq = (chunk.seq + chunk.size) % _SEQ_MOD
            return [chunk]
        if self.next_seq is None:
            self.next_seq = chunk.seq
        behind = -_ahead(chunk.seq, self.next_seq)
        if behind > 0:  # overlaps what was delivered (a retransmitted range): keep the new part
            if behind >= chunk.size:
                return []
            cut = min(behind, len(chunk.data))
            chunk = Chunk(chunk.data[cut:], chunk.size - behind, chunk.start_ns, chunk.end_ns, chunk.tid,
                          (chunk.seq + behind) % _SEQ_MOD)  # fmt: skip
        if chunk.seq != self.next_seq:
            self._waiting[chunk.seq] = (now_ns, chunk)
            return self.expire(now_ns) if len(self._waiting) > MAX_WAITING else []
        out = [chunk]
        self.next_seq = (chunk.seq + chunk.size) % _SEQ_MOD
        self._drain(out)
        return out

    def expire(self, now_ns: int) -> list[Chunk]:
        """Give up waiting for ranges that are overdue: the gap becomes a hole."""
        out: list[Chunk] = []
        while self._waiting:
            seq = min(self._waiting, key=lambda s: _ahead(s, self.next_seq))
            arrived, chunk = self._waiting[seq]
            if now_ns - arrived < REORDER_WINDOW_NS and len(self._waiting) <= MAX_WAITING:
                break
            del self._waiting[seq]
            gap = _ahead(seq, self.next_seq)
            if gap < 0:
                continue  # already delivered through another record
            if gap > 0:
                out.append(hole(gap, chunk))
                if self._stats is not None:
                    self._stats.holes += 1
            out.append(chunk)
            self.next_seq = (seq + chunk.size) % _SEQ_MOD
            self._drain(out)
        return out

    def _drain(self, out: list[Chunk]) -> None:
        while self.next_seq in self._waiting:
            _, chunk = self._waiting.pop(self.next_seq)
            out.append(chunk)
            self.next_seq = (chunk.seq + chunk.size) % _SEQ_MOD
