"""A bounded on-disk queue of sealed span batches: the agent's write-ahead log toward the server.

Each batch is one file holding the exact request body the ingest endpoint takes (gzip JSON), so
a batch re-sent after a crash or a timeout is byte-identical and the server can drop the copy.
File names sort in send order and carry the span count, so the queue can be rebuilt, bounded
and accounted for from a directory listing alone, without opening any file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from deeptrace.errors import DeepTraceError

log = logging.getLogger(__name__)

SUFFIX = ".json.gz"
TMP_SUFFIX = ".tmp"
_NAME = re.compile(r"^(\d{20})-(\d+)\.json\.gz$")


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    seq: int
    n_spans: int
    size: int
    path: Path

    def read(self) -> bytes | None:
        """The body, or None when the file is gone (evicted meanwhile, or removed by hand)."""
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None


@dataclass(frozen=True, slots=True)
class SpoolStats:
    batches: int
    bytes: int
    spans: int
    dropped_batches: int  # evicted (the oldest) to stay within the bound, larger than it, or unreadable
    dropped_spans: int
    write_failed_batches: int  # the disk refused them (full, quota, I/O error): the newest, never queued
    write_failed_spans: int


def _name(seq: int, n_spans: int) -> str:
    return f"{seq:020d}-{n_spans}{SUFFIX}"


def _fsync_dir(path: Path) -> None:
    # The rename is only durable once the directory entry itself is on disk.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Write, fsync, rename: after a crash the file is either whole or absent."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Failing to clean up must not hide why the write failed; a leftover .tmp is never sent
        # (it does not look like a batch) and the next start removes it.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class _Throttle:
    """When to log a failure that may repeat many times a second: the first at once, then at most
    one line per interval, carrying the count of those kept quiet since. Not thread-safe."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._last_line: float | None = None
        self._batches = self._spans = 0  # failures not yet in a line

    def failed(self, n_spans: int, now: float) -> tuple[int, int] | None:
        """Count one failure; (batches, spans) failed since the last line if one is due, else None."""
        self._batches += 1
        self._spans += n_spans
        if self._last_line is not None and now - self._last_line < self.interval_s:
            return None
        self._last_line = now
        due = self._batches, self._spans
        self._batches = self._spans = 0
        return due


class Spool:
    """Batches in a directory, oldest first, at most max_bytes in all (the oldest go first).

    Thread-safe: one thread puts, another takes the oldest, sends it and removes it. The entry
    handed out by oldest() is in flight until remove() or release(): eviction skips it, so a
    batch the server may already hold is never counted as dropped (the bound may therefore be
    exceeded by that one batch).

    Two ways a batch is lost, counted apart: eviction when the spool is full drops the oldest
    queued batch; a write the disk refuses (full disk, quota, I/O error) drops the batch being
    written, the newest, and nothing else (the queue keeps what it had, less what was evicted
    to make room for this batch before the write: when the spool is full too, both go).
    """

    WRITE_FAILURE_LOG_INTERVAL_S = 60.0

    def __init__(self, directory: str | os.PathLike, max_bytes: int):
        self.dir = Path(directory)
        self.max_bytes = max(0, int(max_bytes))
        self._lock = threading.Lock()
        self._entries: deque[SpoolEntry] = deque()
        self._bytes = 0
        self._spans = 0
        self._dropped_batches = 0
        self._dropped_spans = 0
        self._write_failed_batches = 0
        self._write_failed_spans = 0
        self._write_failures = _Throttle(self.WRITE_FAILURE_LOG_INTERVAL_S)
        self._in_flight: int | None = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._load()
        except OSError as e:
            raise DeepTraceError(f"cannot use spool directory {self.dir}: {e.strerror or e}") from None
        self._next_seq = self._entries[-1].seq + 1 if self._entries else 1
        with self._lock:
            self._evict(0)

    def _load(self) -> None:
        found = []
        for p in self.dir.iterdir():
            if p.name.endswith(TMP_SUFFIX):
                # A write the previous run never finished: it was never acknowledged as spooled.
                p.unlink(missing_ok=True)
                continue
            m = _NAME.match(p.name)
            if m is None or not p.is_file():
                continue
            try:
                size = p.stat().st_size
            except FileNotFoundError:
                continue
            found.append(SpoolEntry(int(m.group(1)), int(m.group(2)), size, p))
        found.sort(key=lambda e: e.seq)
        self._entries.extend(found)
        self._bytes = sum(e.size for e in found)
        self._spans = sum(e.n_spans for e in found)

    @property
    def stats(self) -> SpoolStats:
        with self._lock:
            return SpoolStats(len(self._entries), self._bytes, self._spans,
                              self._dropped_batches, self._dropped_spans,
                              self._write_failed_batches, self._write_failed_spans)  # fmt: skip

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, body_gz: bytes, n_spans: int) -> SpoolEntry | None:
        """Store a sealed batch durably. Never raises: a batch larger than the whole bound is
        dropped and counted as dropped, one the disk refuses as write_failed (None for both)."""
        size = len(body_gz)
        if size > self.max_bytes:
            with self._lock:
                self._dropped_batches += 1
                self._dropped_spans += n_spans
            log.warning("deeptrace: a batch of %d bytes is larger than the spool (%d bytes): dropped",
                        size, self.max_bytes)  # fmt: skip
            return None
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            self._evict(size)
        path = self.dir / _name(seq, n_spans)
        # Written outside the lock: the sender must not wait on our fsync to read the queue.
        try:
            write_atomically(path, body_gz)
        except OSError as e:
            # The disk is full or failing: this batch is lost, the ones already queued stay, and
            # the next put tries again. A full disk fails every batch: log a count, not each one.
            with self._lock:
                self._write_failed_batches += 1
                self._write_failed_spans += n_spans
                due = self._write_failures.failed(n_spans, time.monotonic())
            if due is not None:
                self._log_write_failure(e, *due)
            return None
        entry = SpoolEntry(seq, n_spans, size, path)
        with self._lock:
            self._entries.append(entry)
            self._bytes += size
            self._spans += n_spans
            # Another put may have been written meanwhile; keep send order by sequence.
            if len(self._entries) > 1 and self._entries[-2].seq > seq:
                self._entries = deque(sorted(self._entries, key=lambda e: e.seq))
        return entry

    def _log_write_failure(self, e: OSError, batches: int, spans: int) -> None:
        if batches == 1:
            log.error("deeptrace: cannot write a batch to the spool %s (%s): its %d spans are dropped "
                      "(the newest batch; queued ones are kept; repeats are logged at most every %g s)",
                      self.dir, e.strerror or e, spans, self._write_failures.interval_s)  # fmt: skip
        else:
            log.error("deeptrace: still cannot write to the spool %s (%s): %d more batches (%d spans) "
                      "dropped since the last message",
                      self.dir, e.strerror or e, batches, spans)  # fmt: skip

    def _evict(self, incoming: int) -> None:
        """Drop the oldest batches until `incoming` more bytes fit. Caller holds the lock."""
        pinned = next((e for e in self._entries if e.seq == self._in_flight), None)
        pinned_size = pinned.size if pinned is not None else 0
        while self._entries and self._bytes - pinned_size + incoming > self.max_bytes:
            victim = self._entries[0]
            if victim is pinned:
                if len(self._entries) == 1:
                    break
                victim = self._entries[1]
            self._entries.remove(victim)
            victim.path.unlink(missing_ok=True)
            self._bytes -= victim.size
            self._spans -= victim.n_spans
            self._dropped_batches += 1
            self._dropped_spans += victim.n_spans

    def oldest(self) -> SpoolEntry | None:
        """The next batch to send; it is in flight (not evicted) until remove() or release()."""
        with self._lock:
            if not self._entries:
                return None
            entry = self._entries[0]
            self._in_flight = entry.seq
            return entry

    def release(self, entry: SpoolEntry) -> None:
        """The send failed: the batch stays queued and may be evicted again."""
        with self._lock:
            if self._in_flight == entry.seq:
                self._in_flight = None
            self._evict(0)

    def remove(self, entry: SpoolEntry) -> None:
        """The batch is delivered (or handed elsewhere): forget it."""
        with self._lock:
            if self._in_flight == entry.seq:
                self._in_flight = None
            try:
                self._entries.remove(entry)
            except ValueError:
                return
            self._bytes -= entry.size
            self._spans -= entry.n_spans
        entry.path.unlink(missing_ok=True)

    def drop(self, entry: SpoolEntry) -> None:
        """Remove a batch and count it as dropped (e.g. it could not be read)."""
        with self._lock:
            present = entry in self._entries
            if present:
                self._dropped_batches += 1
                self._dropped_spans += entry.n_spans
        if present:
            self.remove(entry)
