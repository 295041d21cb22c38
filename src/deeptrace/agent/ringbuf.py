"""Batched reader of a BPF ring buffer, mapped into this process.

libbpf's ring_buffer__poll calls back into Python once per record, and a ctypes
callback costs more than decoding the record. Instead the ring is mapped here
(the kernel's documented layout: a consumer page we write, a producer page and
the data area mapped twice in a row so records never wrap) and walked in a plain
loop; samples are decoded in place and the consumer position is published once
per batch slice. This relies on x86-64's ordered loads and stores, which is
where the agent runs.

The two positions must be read and written as whole 8-byte words: the kernel
reads consumer_pos while we write it. struct's little-endian '<Q' packs byte by
byte, and a torn consumer_pos made the kernel see a full ring that was nearly
empty (sporadic drops, measured); a memoryview cast to 'Q' loads and stores the
aligned word in one access.
"""

from __future__ import annotations

import mmap
import select
import struct
from collections.abc import Callable
from typing import TypeVar

import numpy as np

T = TypeVar("T")

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HDR = 8  # u32 length (with the two flag bits) + u32 page offset
_LEN = struct.Struct("<I")


class RingReader:
    def __init__(self, map_fd: int, size: int, publish_every: int = 512):
        if size & (size - 1):
            raise ValueError("ring buffer size must be a power of two")
        page = mmap.PAGESIZE
        self.size = size
        self._mask = size - 1
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._data_start = page
        self._consumer_pos = memoryview(self._consumer)[:8].cast("Q")
        self._producer_pos = memoryview(self._producer)[:8].cast("Q")
        self._publish_every = publish_every
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)

    def watch(self, fd: int) -> None:
        """Also wake wait() when this file descriptor (another ring) is readable."""
        self._epoll.register(fd, select.EPOLLIN)

    def wait(self, timeout_s: float) -> None:
        """Sleep until the kernel wakes us (backlog over the threshold) or timeout."""
        self._epoll.poll(timeout_s)

    def pending_bytes(self) -> int:
        return self._producer_pos[0] - self._consumer_pos[0]

    def drain(self, decode: Callable[[mmap.mmap, int], T], limit: int = 1 << 30) -> list[T]:
        """Decode every committed sample (up to `limit`) and release its space."""
        out: list[T] = []
        data = self._producer
        base = self._data_start
        mask = self._mask
        cons = self._consumer_pos[0]
        prod = self._producer_pos[0]
        since_publish = 0
        while len(out) < limit:
            if cons >= prod:
                prod = self._producer_pos[0]
                if cons >= prod:
                    break
            off = base + (cons & mask)
            length = _LEN.unpack_from(data, off)[0]
            if length & _BUSY:  # reserved but not yet committed by the producer
                break
            if not length & _DISCARD:
                out.append(decode(data, off + _HDR))
            cons += ((length & ~(_BUSY | _DISCARD)) + _HDR + 7) & ~7
            since_publish += 1
            if since_publish >= self._publish_every:
                self._consumer_pos[0] = cons
                since_publish = 0
        self._consumer_pos[0] = cons
        return out

    def drain_array(self, dtype: np.dtype, limit: int = 1 << 30) -> np.ndarray:
        """Every committed sample (up to `limit`) as one array, for a ring whose samples all
        have dtype's size: they lie at a fixed stride, and the data area is mapped twice in a
        row, so any run of them is one strided view. Copied out, then their space released."""
        stride = (dtype.itemsize + _HDR + 7) & ~7
        cons = self._consumer_pos[0]
        n = min((self._producer_pos[0] - cons) // stride, limit, self.size // stride)
        if n <= 0:
            return np.empty(0, dtype)
        start = self._data_start + (cons & self._mask)
        lengths = np.ndarray((n,), "<u4", self._producer, start, (stride,))
        busy = np.flatnonzero(lengths & _BUSY)
        if busy.size:  # reserved but not yet committed: stop before it
            n = int(busy[0])
            lengths = lengths[:n]
        if np.any((lengths & (_DISCARD - 1)) != dtype.itemsize):
            raise ValueError(f"a sample of this ring is not {dtype.itemsize} bytes long")
        out = np.ndarray((n,), dtype, self._producer, start + _HDR, (stride,)).copy()
        self._consumer_pos[0] = cons + n * stride
        kept = (lengths & _DISCARD) == 0
        return out if kept.all() else out[kept]

    def close(self) -> None:
        self._consumer_pos.release()
        self._producer_pos.release()
        self._epoll.close()
        self._consumer.close()
        self._producer.close()
