"""Ship spans from the agent to the server, through a write-ahead spool on disk.

    submit() (hot path)  -> open batch in memory -> sealer thread: gzip JSON, fsync -> spool
    sender thread: oldest spooled batch -> POST /api/v1/spans -> removed once the server has it
    heartbeat thread: PUT /api/v1/agents/{agent_id} with the agent's and the shipper's stats

The hot path only appends to a list. A batch's id is fixed when it is sealed, and the file holds
the exact request body, so a batch re-sent after a timeout or a restart is the same request and
the server stores it once. Nothing the spool accepted is deleted before the server answered 200,
except the oldest batches when the spool is full, and those are counted. A batch the disk refuses
to store (full, I/O error) was never accepted: it is lost, counted apart.
"""

from __future__ import annotations

import email.utils
import fcntl
import gzip
import json
import logging
import os
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Self
from urllib.parse import quote

import httpx

from deeptrace import __version__
from deeptrace.agent import selfstats
from deeptrace.agent.spool import Spool, SpoolEntry, write_atomically
from deeptrace.errors import DeepTraceError
from deeptrace.schema import MAX_BODY_BYTES, check_span  # the server's own rules

log = logging.getLogger(__name__)

_AGENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# The server's answers that say this batch can never be accepted, however often it is sent.
_PERMANENT = {400, 413, 415, 422}
_AUTH = {401, 403}
_MAX_RETRY_AFTER_S = 300.0  # a Retry-After beyond this is more likely a bug than a plan


@dataclass
class ShipperStats:
    sent_batches: int = 0  # acknowledged by the server (duplicates included)
    sent_spans: int = 0
    duplicate_batches: int = 0  # the server already had them (a re-send after a lost answer)
    send_failures: int = 0  # attempts that left the batch spooled: network, 5xx, 503, 401...
    rejected_batches: int = 0  # the server said never (400/413): moved to spool_dir/rejected
    rejected_spans: int = 0
    bad_spans: int = 0  # ones the server would refuse (or not JSON at all): dropped before sealing
    overflow_spans: int = 0  # dropped in memory: sealing fell behind max_pending_spans, or after close
    heartbeat_failures: int = 0
    pending_spans: int = 0  # submitted, not yet sealed
    spool_batches: int = 0
    spool_bytes: int = 0
    spool_spans: int = 0
    spool_dropped_batches: int = 0  # the spool was full: the oldest batches dropped to make room
    spool_dropped_spans: int = 0
    spool_write_failed_batches: int = 0  # the disk refused them (full, I/O error): the newest, lost
    spool_write_failed_spans: int = 0
    last_error: str | None = None

    def counters(self) -> dict:
        """The numeric fields, for the server's agent stats."""
        return {k: v for k, v in asdict(self).items() if k != "last_error"}

    def describe(self) -> str:
        """One line for the agent's stderr: what reached the server, what waits, what was lost."""
        line = (f"sent {self.sent_spans} spans in {self.sent_batches} batches, {self.send_failures} failed "
                f"attempts; spooled {self.spool_spans} spans in {self.spool_batches} batches "
                f"({self.spool_bytes} bytes)")  # fmt: skip
        dropped = {"spool full": self.spool_dropped_spans, "disk write failed": self.spool_write_failed_spans,
                   "rejected by the server": self.rejected_spans, "overflow": self.overflow_spans,
                   "bad": self.bad_spans}  # fmt: skip
        return line + "; spans dropped: " + (", ".join(f"{k} {v}" for k, v in dropped.items() if v) or "0")


class _SpoolLock:
    """One agent per spool directory: two senders on one queue would re-send and miscount."""

    def __init__(self, directory: Path):
        path = directory / ".lock"
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            self._fd = None
            raise DeepTraceError(f"spool directory {directory} is in use by another agent (pid {holder}); "
                                 "give each agent its own --spool-dir") from None  # fmt: skip
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        self._guard = threading.Lock()

    def release(self) -> None:
        with self._guard:
            if self._fd is not None:
                os.close(self._fd)  # closing the descriptor drops the flock
                self._fd = None


def load_agent_id(spool_dir: Path, given: str | None) -> str:
    """The given id, else the one this spool directory was first given, else a new one saved
    there: an agent keeps its identity across restarts, and its spooled batches with it."""
    if given is not None:
        if not _AGENT_ID.match(given):
            raise DeepTraceError(f"agent id {given!r}: use 1-128 letters, digits, '.', '_' or '-'")
        return given
    path = spool_dir / "agent_id"
    try:
        saved = path.read_text(errors="replace").strip()
    except FileNotFoundError:
        saved = None
    except OSError as e:
        raise DeepTraceError(f"cannot read {path}: {e.strerror or e}") from None
    if saved and _AGENT_ID.match(saved):
        return saved
    if saved is not None:
        log.warning("deeptrace: %s holds no valid agent id; making a new one", path)
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:64].strip(".-") or "agent"
    new = f"{host}-{uuid.uuid4().hex[:12]}"
    try:
        write_atomically(path, (new + "\n").encode())
    except OSError as e:
        raise DeepTraceError(f"cannot write {path}: {e.strerror or e}") from None
    return new


def _server_base(url: str) -> str:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise DeepTraceError(f"--server {url!r}: expected an http:// or https:// URL (http://collector:8700)")
    return url.rstrip("/")


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), None if absent or bad."""
    if not value:
        return None
    try:
        return min(max(float(value), 0.0), _MAX_RETRY_AFTER_S)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return min(max(when - time.time(), 0.0), _MAX_RETRY_AFTER_S)


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    text = detail if isinstance(detail, str) else json.dumps(detail) if detail is not None else response.text
    return " ".join(str(text).split())[:500] or f"HTTP {response.status_code}"


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


class Shipper:
    """Spans from the agent's hot path to the server, at least once, in order, never blocking."""

    def __init__(self, server_url: str, token: str | None, spool_dir: str | os.PathLike,
                 agent_id: str | None = None, max_spool_bytes: int = 256 << 20, batch_spans: int = 1000,
                 flush_interval_s: float = 1.0, heartbeat_s: float = 5.0,
                 stats_provider: Callable[[], dict] | None = None, host: str | None = None,
                 request_timeout_s: float = 10.0, backoff_min_s: float = 0.5, backoff_max_s: float = 30.0,
                 max_pending_spans: int | None = None, max_rejected_bytes: int | None = None,
                 max_batch_bytes: int = MAX_BODY_BYTES // 4):  # fmt: skip
        self.server = _server_base(server_url)
        self.token = token
        self.spool_dir = Path(spool_dir)
        self.batch_spans = max(1, int(batch_spans))
        self.flush_interval_s = max(0.0, float(flush_interval_s))
        self.heartbeat_s = max(0.05, float(heartbeat_s))
        # Spans waiting for the sealer, at most: a ceiling on memory when the disk falls behind.
        self.max_pending_spans = max_pending_spans or max(20 * self.batch_spans, 20_000)
        self.max_batch_bytes = max_batch_bytes  # uncompressed JSON
        self.stats_provider = stats_provider
        self.host = host or socket.gethostname()
        self.started_ns = time.time_ns()
        self._timeout = httpx.Timeout(request_timeout_s, connect=min(request_timeout_s, 5.0))
        self._backoff = (backoff_min_s, max(backoff_min_s, backoff_max_s))

        try:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            self._lock_file = _SpoolLock(self.spool_dir)
        except OSError as e:
            raise DeepTraceError(f"cannot use spool directory {self.spool_dir}: {e.strerror or e}") from None
        try:
            # Only once the directory is ours: opening a spool clears unfinished writes.
            self.spool = Spool(self.spool_dir, max_spool_bytes)
            self.agent_id = load_agent_id(self.spool_dir, agent_id)
            if max_rejected_bytes is None:
                max_rejected_bytes = min(max_spool_bytes // 4, 64 << 20)
            self.rejected = Spool(self.spool_dir / "rejected", max_rejected_bytes)
        except BaseException:
            self._lock_file.release()
            raise
        self._stats = ShipperStats()

        self._lock = threading.Condition()  # the open batch
        self._pending: list = []
        self._pending_since = 0.0
        self._closed = False
        self._seal_lock = threading.Lock()  # one sealer at a time keeps batches in submit order
        self._sealer_stop = False
        self._stop = threading.Event()
        self._wake_sender = threading.Event()
        self._retry_at = 0.0  # monotonic time of the sender's next attempt while it backs off
        self._failure_streak = 0
        self._last_logged: str | None = None
        self._provider_failed = False
        self._bad_logged = False

        self._threads = [
            threading.Thread(target=self._seal_loop, name="deeptrace-sealer", daemon=True),
            threading.Thread(target=self._send_loop, name="deeptrace-sender", daemon=True),
            threading.Thread(target=self._heartbeat_loop, name="deeptrace-heartbeat", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # -- the hot path -------------------------------------------------------------------------

    def submit(self, spans) -> None:
        """Queue span dicts for the server. Never blocks on the network or the disk; the dicts
        must not be changed afterwards."""
        if not isinstance(spans, list):
            spans = list(spans)
        with self._lock:
            if self._closed:
                self._stats.overflow_spans += len(spans)
                return
            before = len(self._pending)
            self._pending.extend(spans)
            over = len(self._pending) - self.max_pending_spans
            if over > 0:
                del self._pending[:over]
                self._stats.overflow_spans += over
            if before == 0 and self._pending:
                self._pending_since = time.monotonic()
                self._lock.notify()  # the sealer sleeps without a deadline while nothing is open
            elif len(self._pending) >= self.batch_spans:
                self._lock.notify()

    # -- sealing ------------------------------------------------------------------------------

    def _seal_loop(self) -> None:
        while True:
            with self._lock:
                while not self._sealer_stop:
                    n = len(self._pending)
                    if n >= self.batch_spans:
                        break
                    wait = self._pending_since + self.flush_interval_s - time.monotonic() if n else None
                    if wait is not None and wait <= 0:
                        break
                    self._lock.wait(wait)
                if self._sealer_stop:
                    return
            try:
                self._seal(everything=False)
            except Exception:  # a bug here must not stop shipping for the agent's whole life
                log.exception("deeptrace: sealing a batch failed")
                time.sleep(0.1)

    def _seal(self, everything: bool) -> None:
        with self._seal_lock:
            with self._lock:
                aged = self._pending and time.monotonic() - self._pending_since >= self.flush_interval_s
                if everything or aged:
                    take, self._pending = self._pending, []
                else:
                    cut = len(self._pending) // self.batch_spans * self.batch_spans
                    take, self._pending = self._pending[:cut], self._pending[cut:]
                # What stays keeps its first span's time: no span waits much past flush_interval_s.
            for chunk in _chunks(take, self.batch_spans):
                self._seal_batch(chunk)

    def _valid(self, spans: list) -> list:
        """The spans the server will take. It refuses a whole batch for one bad span, so a bad
        one is left out here, alone, counted, and its problem logged the first time."""
        good = []
        for span in spans:
            problem = check_span(span)
            if problem is None:
                try:
                    json.dumps(span, allow_nan=False)
                except (TypeError, ValueError, RecursionError) as e:
                    problem = f"not JSON: {e}"
                else:
                    good.append(span)
                    continue
            self._stats.bad_spans += 1
            if not self._bad_logged:
                self._bad_logged = True
                log.error("deeptrace: dropped a span the server would refuse (%s): %.300r", problem, span)
        return good

    def _encode(self, spans: list) -> tuple[list, bytes]:
        """The spans that go, and their request body as JSON (a new batch id each time)."""
        batch = {"agent_id": self.agent_id, "batch_id": uuid.uuid4().hex, "spans": spans}
        try:
            if not all(check_span(s) is None for s in spans):
                raise ValueError("a bad span")
            return spans, json.dumps(batch, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError, RecursionError):
            batch["spans"] = spans = self._valid(spans)
            return spans, json.dumps(batch, separators=(",", ":")).encode()

    def _seal_batch(self, spans: list) -> None:
        spans, data = self._encode(spans)
        if not spans:
            return
        if len(data) > self.max_batch_bytes and len(spans) > 1:
            # Large captured heads: halve until the server's body limit cannot be reached.
            half = len(spans) // 2
            self._seal_batch(spans[:half])
            self._seal_batch(spans[half:])
            return
        if self.spool.put(gzip.compress(data, compresslevel=5, mtime=0), len(spans)) is not None:
            self._wake_sender.set()

    def flush(self) -> None:
        """Seal the open batch into the spool now (on the caller's thread: it waits for the disk)."""
        self._seal(everything=True)
        self._wake_sender.set()

    # -- sending ------------------------------------------------------------------------------

    def _headers(self) -> dict:
        h = {"User-Agent": f"deeptrace-agent/{__version__}"}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    def _send_loop(self) -> None:
        client = httpx.Client(timeout=self._timeout, headers=self._headers())
        try:
            while not self._stop.is_set():
                self._wake_sender.clear()
                entry = self.spool.oldest()
                if entry is None:
                    self._wake_sender.wait(1.0)
                    continue
                try:
                    delay = self._send(client, entry)
                except Exception as e:  # never let a surprise stop the sender
                    self.spool.release(entry)
                    log.exception("deeptrace: sending a batch failed")
                    delay = self._failed("internal", f"internal error: {e!r}", None)
                if delay:
                    self._retry_at = time.monotonic() + delay
                    self._stop.wait(delay)
                    self._retry_at = 0.0
        finally:
            client.close()
            if self._stop.is_set():
                self._lock_file.release()

    def _send(self, client: httpx.Client, entry: SpoolEntry) -> float:
        """One attempt at the oldest batch; returns how long to wait before the next."""
        body = entry.read()
        if body is None:
            self.spool.drop(entry)
            self._stats.last_error = f"spooled batch {entry.path.name} vanished from the disk"
            log.warning("deeptrace: %s", self._stats.last_error)
            return 0.0
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        try:
            r = client.post(f"{self.server}/api/v1/spans", content=body, headers=headers)
        except httpx.TimeoutException:
            self.spool.release(entry)
            return self._failed("timeout", f"{self.server} did not answer in {self._timeout.read:g} s", None)
        except (httpx.HTTPError, OSError) as e:
            self.spool.release(entry)
            return self._failed("network", f"cannot reach {self.server}: {str(e) or type(e).__name__}", None)
        status = r.status_code
        if status == 200:
            try:
                answer = r.json()
                ours = isinstance(answer, dict) and ("accepted" in answer or "duplicate" in answer)
            except ValueError:
                ours = False
            if not ours:
                # A proxy's or another service's page: deleting the batch on its word would lose it.
                self.spool.release(entry)
                error = f"{self.server} answered 200 but not as a DeepTrace server would: {r.text[:200]!r}"
                return self._failed("not-deeptrace", error, None)
            st = self._stats
            st.sent_batches += 1
            st.sent_spans += entry.n_spans
            st.duplicate_batches += bool(answer.get("duplicate"))
            self.spool.remove(entry)  # after counting: whoever sees the spool empty sees the counts
            self._recovered()
            return 0.0
        if status in _PERMANENT:
            detail = _detail(r)
            # Kept aside, not deleted: a server bug or a parser change may make it worth a look.
            self.rejected.put(body, entry.n_spans)
            error = f"server rejected a batch of {entry.n_spans} spans ({status}): {detail}"
            self.spool.remove(entry)
            log.error("deeptrace: %s; kept in %s", error, self.rejected.dir)
            # Counted after the log line, so whoever sees the count also finds the reason.
            self._stats.last_error = error
            self._stats.rejected_batches += 1
            self._stats.rejected_spans += entry.n_spans
            self._recovered()
            return 0.0
        self.spool.release(entry)
        retry_after = _retry_after(r.headers.get("Retry-After"))
        if status in _AUTH:
            error = (f"{self.server} refused the token ({status}): check --token / DEEPTRACE_TOKEN; "
                     "spans stay spooled until it is accepted")  # fmt: skip
            return self._failed("auth", error, retry_after)
        if status in (429, 503):
            return self._failed("busy", f"{self.server} is busy ({status})", retry_after)
        error = f"{self.server} answered {status} to POST /api/v1/spans: {_detail(r)}"
        return self._failed(str(status), error, retry_after)

    def _failed(self, kind: str, error: str, retry_after: float | None) -> float:
        st = self._stats
        st.send_failures += 1
        st.last_error = error
        self._failure_streak += 1
        if kind != self._last_logged:  # once per streak (and when the reason changes), not per retry
            self._last_logged = kind
            level = logging.ERROR if kind == "auth" else logging.WARNING
            log.log(level, "deeptrace: %s; %d batches spooled, retrying", error, self.spool.stats.batches)
        lo, hi = self._backoff
        if retry_after is not None:
            return max(lo, retry_after)  # "retry now" from a struggling server must not become a busy loop
        ceiling = min(hi, lo * 2 ** min(self._failure_streak - 1, 30))
        return random.uniform(max(lo, ceiling / 2), ceiling)  # jitter: agents restarted together spread out

    def _recovered(self) -> None:
        if self._failure_streak:
            log.warning("deeptrace: %s accepts spans again", self.server)
        self._failure_streak = 0
        self._last_logged = None

    # -- heartbeat ----------------------------------------------------------------------------

    def heartbeat_body(self) -> dict:
        stats: dict = {}
        if self.stats_provider is not None:
            try:
                stats.update(self.stats_provider())
            except Exception:
                if not self._provider_failed:  # once: it would fail the same way every beat
                    self._provider_failed = True
                    log.warning("deeptrace: agent stats unavailable", exc_info=True)
        stats.update(self.stats.counters())
        own = selfstats.read()
        stats["cpu_seconds"] = own.cpu_seconds
        stats["rss_bytes"] = own.rss_bytes
        return {"host": self.host, "kernel": os.uname().release, "version": __version__,
                "started_ns": self.started_ns, "stats": stats}  # fmt: skip

    def _heartbeat_loop(self) -> None:
        client = httpx.Client(timeout=self._timeout, headers=self._headers())
        url = f"{self.server}/api/v1/agents/{quote(self.agent_id, safe='')}"
        failing = False
        try:
            while True:
                stopping = self._stop.is_set()
                quiet = False
                try:
                    r = client.put(url, json=self.heartbeat_body())
                    problem = None if r.status_code == 200 else f"answered {r.status_code}: {_detail(r)}"
                except (httpx.HTTPError, OSError) as e:
                    # The sender already says when the server cannot be reached.
                    problem, quiet = str(e) or type(e).__name__, True
                except (TypeError, ValueError) as e:
                    problem = f"stats are not JSON: {e}"
                if problem is not None:
                    self._stats.heartbeat_failures += 1
                    if not failing and not quiet:  # once per streak
                        log.warning("deeptrace: agent report to %s failed (%s)", self.server, problem)
                failing = problem is not None
                if stopping:
                    return
                # Woken by close() for one last report: the server keeps the agent's final numbers.
                self._stop.wait(self.heartbeat_s)
        finally:
            client.close()

    # -- state and shutdown -------------------------------------------------------------------

    @property
    def stats(self) -> ShipperStats:
        sp = self.spool.stats
        with self._lock:
            pending = len(self._pending)
        return replace(self._stats, pending_spans=pending, spool_batches=sp.batches, spool_bytes=sp.bytes,
                       spool_spans=sp.spans, spool_dropped_batches=sp.dropped_batches,
                       spool_dropped_spans=sp.dropped_spans,
                       spool_write_failed_batches=sp.write_failed_batches,
                       spool_write_failed_spans=sp.write_failed_spans)  # fmt: skip

    def drain(self, timeout_s: float) -> bool:
        """Seal what is open and wait until the server has every spooled batch; False if it did
        not within timeout_s (or the sender backs off past that)."""
        self.flush()
        deadline = time.monotonic() + timeout_s
        while len(self.spool):
            now = time.monotonic()
            if now >= deadline or self._retry_at > deadline or self._stop.is_set():
                return False
            self._wake_sender.set()
            time.sleep(0.01)
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Seal the open batch to disk, give the sender up to timeout_s to deliver the spool, stop.
        What is still spooled stays on disk for the next start."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._sealer_stop = True
            self._lock.notify()
        self._threads[0].join()
        self.drain(timeout_s)
        self._stop.set()
        self._wake_sender.set()
        for t in self._threads[1:]:
            t.join(timeout=1.0)
        if not self._threads[1].is_alive():
            self._lock_file.release()
        # else: the sender is inside a request; it releases the lock when that returns.

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
