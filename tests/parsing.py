"""Helpers to feed hand-built bytes to a connection parser as syscalls would."""

from __future__ import annotations

from deeptrace.protocols.base import Chunk


def chunk(data: bytes, t: int = 0, size: int | None = None, tid: int = 1, seq: int | None = None) -> Chunk:
    return Chunk(data, len(data) if size is None else size, t, t + 1, tid, seq)


def feed_split(parser, is_request: bool, data: bytes, cut: int, t: int = 0):
    """Feed data as two syscalls split at `cut`."""
    out = []
    for i, part in enumerate((data[:cut], data[cut:])):
        if part:
            out += parser.feed(is_request, chunk(part, t + i))
    return out


def exchange(parser, request: bytes, response: bytes, t: int = 0):
    return parser.feed(True, chunk(request, t)) + parser.feed(False, chunk(response, t + 10))


def feed_alternating(parser, parts: list[bytes], missing: int = 30) -> None:
    """Feed arbitrary parts to both sides in turn, some with uncaptured tails (fuzzing)."""
    for i, part in enumerate(parts):
        parser.feed(i % 2 == 0, chunk(part, t=i, size=len(part) + (i % 3) * missing))
    parser.close(len(parts) + 1)
