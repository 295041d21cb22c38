"""Shipping spans to the server: spool, sender, heartbeat, restart, against real HTTP on loopback.

First against a small receiver in this file that speaks the ingest contract (docs/server.md) and
can be told to fail in the ways a real server or network does; then, when it exists, against
the real `deeptrace server`.
"""

from __future__ import annotations

import errno
import gzip
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import spanmaker
from servers import free_port

from deeptrace import __version__
from deeptrace.agent import selfstats
from deeptrace.agent import spool as spool_mod
from deeptrace.agent.shipper import Shipper
from deeptrace.agent.spool import Spool
from deeptrace.errors import DeepTraceError

TOKEN = "t0ken"
SRC = Path(__file__).resolve().parents[1] / "src"
# Fast retries: the tests exercise the schedule's logic, not its real-world pace.
FAST = {"backoff_min_s": 0.02, "backoff_max_s": 0.2, "flush_interval_s": 0.05, "heartbeat_s": 0.2,
        "request_timeout_s": 2.0}  # fmt: skip


def wait_until(predicate, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Receiver:
    """The ingest side of the server contract, with switchable failures.

    `batches` is what the application got: each (agent_id, batch_id) once, in arrival order.
    `mode` is one of ok, 503, 401, 400, 413, slow (store, then answer too late), reset
    (close the connection without an answer); `fail_next` fails that many requests with
    `fail_status` before following `mode`.
    """

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.batches: list[dict] = []
        self.seen: set[tuple[str, str]] = set()
        self.posts = 0
        self.duplicates = 0
        self.heartbeats: list[tuple[str, dict]] = []
        self.auth_headers: list[str | None] = []
        self.mode = "ok"
        self.fail_next = 0
        self.fail_status = 503
        self.retry_after = "0"
        self.post_times: list[float] = []
        self.slow_s = 0.0
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _answer(self, status: int, body: dict, headers: dict | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the agent gave up waiting: that is what the slow mode is for

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_PUT(self) -> None:
                body = json.loads(self._body())
                with receiver.lock:
                    receiver.heartbeats.append((self.path, body))
                self._answer(200, {"ok": True})

            def do_POST(self) -> None:
                raw = self._body()
                with receiver.lock:
                    receiver.posts += 1
                    receiver.post_times.append(time.monotonic())
                    receiver.auth_headers.append(self.headers.get("Authorization"))
                    failing = receiver.fail_next > 0
                    receiver.fail_next -= failing
                    mode = str(receiver.fail_status) if failing else receiver.mode
                if mode == "reset":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if mode in ("503", "429"):
                    return self._answer(int(mode), {"detail": "busy"}, {"Retry-After": receiver.retry_after})
                if mode in ("401", "400", "413", "500"):
                    return self._answer(int(mode), {"detail": f"test says {mode}: span 0: bad key start_ns"})
                assert self.path == "/api/v1/spans"
                assert self.headers["Content-Encoding"] == "gzip"
                assert self.headers["Content-Type"] == "application/json"
                batch = json.loads(gzip.decompress(raw))
                key = (batch["agent_id"], batch["batch_id"])
                with receiver.lock:
                    duplicate = key in receiver.seen
                    if duplicate:
                        receiver.duplicates += 1
                    else:
                        receiver.seen.add(key)
                        receiver.batches.append(batch)
                if mode == "slow":
                    time.sleep(receiver.slow_s)  # stored, but the agent gives up before the answer
                accepted = 0 if duplicate else len(batch["spans"])
                self._answer(200, {"accepted": accepted, "duplicate": duplicate})

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def span_ids(self) -> list[str]:
        with self.lock:
            return [s["span_id"] for b in self.batches for s in b["spans"]]

    def start_times(self) -> list[int]:
        with self.lock:
            return [s["start_ns"] - T0_US * 1000 for b in self.batches for s in b["spans"]]


@pytest.fixture
def receiver():
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def shippers():
    """Shippers made by the test, closed at its end whatever happens."""
    made: list[Shipper] = []

    def make(*args, **kw) -> Shipper:
        s = Shipper(*args, **{**FAST, **kw})
        made.append(s)
        return s

    yield make
    for s in made:
        s.close(timeout_s=0.5)


T0_US = 1_767_225_600_000_000  # 2026-01-01: times the server takes as plausible


def spans(n: int) -> list[dict]:
    return [spanmaker.server(100, T0_US + i, T0_US + i + 5) for i in range(n)]


def ids(span_dicts: list[dict]) -> list[str]:
    return [s["span_id"] for s in span_dicts]


# -- the spool alone ------------------------------------------------------------------------------


def test_spool_orders_bounds_and_survives_reopening(tmp_path):
    sp = Spool(tmp_path, max_bytes=1000)
    for i in range(5):
        sp.put(bytes([i]) * 300, n_spans=10 + i)
    st = sp.stats
    # 5 x 300 bytes in 1000: the two oldest went, and were counted with their spans.
    assert (st.batches, st.bytes, st.spans) == (3, 900, 12 + 13 + 14)
    assert (st.dropped_batches, st.dropped_spans) == (2, 10 + 11)
    (tmp_path / ".00000000000000000009-3.json.gz.abcd.tmp").write_bytes(b"half a write")
    (tmp_path / "notes.txt").write_text("not ours")

    again = Spool(tmp_path, max_bytes=1000)
    assert not list(tmp_path.glob("*.tmp")) and (tmp_path / "notes.txt").exists()
    assert again.stats.batches == 3 and again.stats.spans == 39
    first = again.oldest()
    assert first.read() == bytes([2]) * 300 and first.n_spans == 12
    again.put(b"x", 1)  # numbered after the highest found on disk
    names = sorted(p.name for p in tmp_path.glob("*.json.gz"))
    assert names[-1].startswith(f"{first.seq + 3:020d}-1")
    again.remove(first)
    assert again.oldest().read() == bytes([3]) * 300


def test_spool_never_evicts_the_batch_in_flight(tmp_path):
    sp = Spool(tmp_path, max_bytes=500)
    sp.put(b"a" * 300, 1)
    in_flight = sp.oldest()
    sp.put(b"b" * 300, 2)  # over the bound, but the oldest may already be at the server
    assert in_flight.read() == b"a" * 300 and sp.stats.dropped_batches == 0
    sp.release(in_flight)  # the send failed: now it is the oldest, and it goes
    assert sp.stats.dropped_batches == 1 and sp.oldest().read() == b"b" * 300


def test_spool_refuses_a_batch_larger_than_itself_and_counts_it(tmp_path):
    sp = Spool(tmp_path, max_bytes=100)
    assert sp.put(b"x" * 101, 7) is None
    assert sp.stats == type(sp.stats)(0, 0, 0, 1, 7, 0, 0)


class FullDisk:
    """Stands in for the spool module's open(): each write puts half the bytes on disk, then fails
    the way a full disk does, leaving a partial file behind for the spool to clean up."""

    def __init__(self):
        self.calls = 0

    def __call__(self, path, mode="r", *args, **kw):
        f = open(path, mode, *args, **kw)
        if "w" not in mode:
            return f
        self.calls += 1
        real_write = f.write

        def write(data):
            real_write(data[: len(data) // 2])
            f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        f.write = write
        return f


class Clock:
    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def spool_errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == spool_mod.__name__ and r.levelno >= logging.ERROR]  # fmt: skip


def test_a_failed_spool_write_drops_the_newest_batch_counted_apart_and_logged_sparingly(
    tmp_path, monkeypatch, caplog
):
    clock = Clock()
    monkeypatch.setattr(spool_mod, "time", clock)
    sp = Spool(tmp_path, max_bytes=100_000)
    first = sp.put(b"a" * 300, 3)
    disk = FullDisk()
    monkeypatch.setattr(spool_mod, "open", disk, raising=False)
    with caplog.at_level(logging.INFO):
        for _ in range(50):
            clock.now += 0.5  # 25 s of failures: within one log interval
            assert sp.put(b"b" * 300, 7) is None
    assert disk.calls == 50
    st = sp.stats
    # Counted as failed writes, not as evictions; the batch already queued is untouched.
    assert (st.write_failed_batches, st.write_failed_spans) == (50, 50 * 7)
    assert (st.dropped_batches, st.dropped_spans) == (0, 0)
    assert (st.batches, st.spans) == (1, 3)
    # No partial file is left to be sent later as a corrupt batch.
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]
    errors = spool_errors(caplog)
    assert len(errors) == 1 and "No space left on device" in errors[0] and "7 spans" in errors[0]

    caplog.clear()
    clock.now += 60  # past the interval: one line with how many failed since the last one
    assert sp.put(b"b" * 300, 7) is None
    errors = spool_errors(caplog)
    assert len(errors) == 1 and "50 more batches (350 spans)" in errors[0], errors

    monkeypatch.undo()  # space is back
    second = sp.put(b"c" * 300, 4)
    assert second is not None and second.read() == b"c" * 300
    assert sp.oldest() == first and sp.stats.batches == 2 and sp.stats.write_failed_batches == 51
    assert Spool(tmp_path, max_bytes=100_000).stats.spans == 3 + 4


def test_spool_in_an_unusable_place_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(DeepTraceError, match="cannot use spool directory"):
        Spool(tmp_path / "file" / "spool", 1000)


# -- shipping to a receiver -----------------------------------------------------------------------


def test_batches_arrive_in_order_with_the_token(receiver, shippers, tmp_path):
    sent = spans(2350)
    # A long flush interval: every batch but the last is sealed because it is full.
    sh = shippers(receiver.url, TOKEN, tmp_path, batch_spans=100, max_pending_spans=10_000,
                  flush_interval_s=30)  # fmt: skip
    for i in range(0, len(sent), 70):  # the agent hands spans over in odd-sized groups
        sh.submit(sent[i : i + 70])
    assert sh.drain(10)
    assert receiver.span_ids() == ids(sent)
    assert [len(b["spans"]) for b in receiver.batches][:23] == [100] * 23
    assert all(b["agent_id"] == sh.agent_id for b in receiver.batches)
    assert set(receiver.auth_headers) == {f"Bearer {TOKEN}"}
    st = sh.stats
    assert (st.sent_spans, st.sent_batches, st.spool_batches, st.send_failures) == (2350, 24, 0, 0)
    assert not list(tmp_path.glob("*.json.gz"))


def test_a_batch_is_sealed_after_the_flush_interval_without_more_spans(receiver, shippers, tmp_path):
    sh = shippers(receiver.url, TOKEN, tmp_path, batch_spans=1000, flush_interval_s=0.2)
    sh.submit(spans(3))
    time.sleep(0.05)
    assert receiver.span_ids() == []
    wait_until(lambda: len(receiver.span_ids()) == 3, 5, "the aged batch")


def test_resends_after_503_resets_and_timeouts_deliver_each_batch_once(receiver, shippers, tmp_path):
    receiver.fail_next, receiver.fail_status = 3, 503
    sent = spans(600)
    sh = shippers(receiver.url, TOKEN, tmp_path, batch_spans=50, request_timeout_s=0.3)
    sh.submit(sent[:200])
    wait_until(lambda: len(receiver.batches) >= 2, 10, "delivery after the 503s")
    # Stored by the receiver, but the answer comes after the agent gave up: it must send again.
    receiver.mode, receiver.slow_s = "slow", 0.6
    sh.submit(sent[200:400])
    wait_until(lambda: receiver.duplicates >= 1, 10, "a re-sent batch")
    receiver.mode = "ok"
    receiver.fail_next, receiver.fail_status = 2, "reset"
    sh.submit(sent[400:])
    assert sh.drain(20)
    assert receiver.span_ids() == ids(sent)  # nothing lost, nothing twice, in order
    st = sh.stats
    assert st.send_failures >= 3 + 1 + 2 and st.sent_spans >= 600 and st.duplicate_batches >= 1
    assert st.last_error


def test_absent_receiver_then_started_drains_the_spool_in_order(shippers, tmp_path):
    receiver = Receiver()  # its port is known, nothing listens yet
    sent = spans(500)
    sh = shippers(receiver.url, TOKEN, tmp_path, batch_spans=40)
    sh.submit(sent)
    sh.flush()
    wait_until(lambda: sh.stats.send_failures >= 2, 5, "failed attempts")
    st = sh.stats
    assert st.spool_batches == math.ceil(500 / 40) and st.spool_spans == 500 and st.sent_spans == 0
    assert "cannot reach" in st.last_error
    receiver.start()
    try:
        assert sh.drain(10)
        assert receiver.span_ids() == ids(sent)
    finally:
        receiver.stop()


def test_a_full_spool_drops_the_oldest_batches_and_counts_them(shippers, tmp_path):
    receiver = Receiver()
    sh = shippers(receiver.url, TOKEN, tmp_path, batch_spans=10, max_spool_bytes=20_000)
    sent = spans(400)
    for i in range(0, 400, 10):
        sh.submit(sent[i : i + 10])
        sh.flush()
    st = sh.stats
    assert st.spool_dropped_batches > 0 and st.spool_bytes <= 20_000 + 2_000  # + the one in flight
    assert st.spool_dropped_spans == 10 * st.spool_dropped_batches
    assert st.spool_spans + st.spool_dropped_spans == 400
    receiver.start()
    try:
        assert sh.drain(10)
        got = receiver.span_ids()
        # What arrives is exactly what was not counted as dropped, and it is the newest.
        assert len(got) + sh.stats.spool_dropped_spans == 400
        assert got == ids(sent)[400 - len(got) :]
    finally:
        receiver.stop()


def test_a_disk_that_refuses_writes_loses_only_those_batches_and_reports_them(
    receiver, shippers, tmp_path, monkeypatch
):
    sh = shippers(receiver.url, TOKEN, tmp_path, batch_spans=10)
    sent = spans(60)
    with monkeypatch.context() as m:
        m.setattr(spool_mod, "open", FullDisk(), raising=False)
        for i in range(0, 30, 10):
            sh.submit(sent[i : i + 10])
            sh.flush()
    st = sh.stats
    assert (st.spool_write_failed_batches, st.spool_write_failed_spans) == (3, 30)
    assert (st.spool_dropped_batches, st.spool_dropped_spans) == (0, 0)
    assert "disk write failed 30" in st.describe() and "spool full" not in st.describe()
    sh.submit(sent[30:])  # the disk has room again
    assert sh.drain(10)
    assert receiver.span_ids() == ids(sent[30:])
    wait_until(lambda: any(b["stats"]["sent_spans"] == 30 for _, b in receiver.heartbeats), 5, "a heartbeat")
    stats = receiver.heartbeats[-1][1]["stats"]
    assert (stats["spool_write_failed_batches"], stats["spool_write_failed_spans"]) == (3, 30)


def test_a_refused_token_keeps_every_batch_and_says_so_once(receiver, shippers, tmp_path, caplog):
    receiver.mode = "401"
    sent = spans(120)
    sh = shippers(receiver.url, "wrong", tmp_path, batch_spans=50)
    with caplog.at_level(logging.WARNING, logger="deeptrace.agent.shipper"):
        sh.submit(sent)
        sh.flush()
        wait_until(lambda: receiver.posts >= 5, 5, "retries")
    refusals = [r for r in caplog.records if "refused the token" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.ERROR
    assert sh.stats.spool_spans == 120 and sh.stats.rejected_batches == 0
    receiver.mode = "ok"  # the operator fixed the server's token
    assert sh.drain(10)
    assert receiver.span_ids() == ids(sent)


def test_retry_after_is_honoured_and_5xx_is_retried(receiver, shippers, tmp_path):
    receiver.fail_next, receiver.fail_status, receiver.retry_after = 1, 503, "1"
    sh = shippers(receiver.url, TOKEN, tmp_path)
    sh.submit(spans(3))
    assert sh.drain(5)
    first, second = receiver.post_times[:2]
    assert second - first >= 0.9  # not the 20 ms the fast back-off would have waited
    receiver.fail_next, receiver.fail_status = 2, 500
    more = spans(4)
    sh.submit(more)
    assert sh.drain(5)
    assert receiver.span_ids()[3:] == ids(more) and sh.stats.send_failures == 3


@pytest.mark.parametrize("status", ["400", "413"])
def test_a_batch_the_server_can_never_accept_is_moved_aside_and_counted(receiver, shippers, tmp_path, caplog,
                                                                        status):  # fmt: skip
    receiver.mode = status
    sh = shippers(receiver.url, TOKEN, tmp_path, batch_spans=50)
    with caplog.at_level(logging.WARNING, logger="deeptrace.agent.shipper"):
        sh.submit(spans(30))
        sh.flush()
        wait_until(lambda: sh.stats.rejected_batches == 1, 5, "the rejection")
    assert receiver.posts == 1  # not retried: it would be refused forever
    assert any("bad key start_ns" in r.getMessage() for r in caplog.records)
    assert "bad key start_ns" in sh.stats.last_error
    kept = list((tmp_path / "rejected").glob("*.json.gz"))
    assert len(kept) == 1 and len(json.loads(gzip.decompress(kept[0].read_bytes()))["spans"]) == 30
    assert (sh.stats.rejected_spans, sh.stats.spool_batches) == (30, 0)
    receiver.mode = "ok"
    later = spans(5)
    sh.submit(later)
    assert sh.drain(5) and receiver.span_ids() == ids(later)


def test_a_bad_span_is_dropped_alone_and_counted(receiver, shippers, tmp_path, caplog):
    """The server refuses a whole batch for one bad span: the agent leaves it out instead."""
    good = spans(5)
    bad = [spanmaker.server(1, T0_US, T0_US + 1) for _ in range(5)]
    bad[0]["req_head"] = b"raw"
    bad[1]["attributes"] = {"x": float("nan")}
    bad[2]["end_ns"] = bad[2]["start_ns"] - 1
    del bad[3]["span_id"]
    bad[4]["kind"] = "SIDEWAYS"
    sh = shippers(receiver.url, TOKEN, tmp_path)
    with caplog.at_level(logging.ERROR, logger="deeptrace.agent.shipper"):
        sh.submit([good[0], bad[0], good[1], "not a span", good[2], bad[1], bad[2], good[3], bad[3], bad[4],
                   good[4]])  # fmt: skip
        assert sh.drain(5)
    assert receiver.span_ids() == ids(good) and sh.stats.bad_spans == 6
    assert len([r for r in caplog.records if "would refuse" in r.getMessage()]) == 1


def test_batches_are_split_below_the_servers_body_limit(receiver, shippers, tmp_path):
    big = [spanmaker.server(100, T0_US + i, T0_US + i + 1, req=b"x" * 3000) for i in range(40)]
    sh = shippers(receiver.url, TOKEN, tmp_path, batch_spans=40, max_batch_bytes=20_000)
    sh.submit(big)
    assert sh.drain(5)
    assert receiver.span_ids() == ids(big)
    assert len(receiver.batches) >= 8 and all(len(json.dumps(b)) <= 20_000 for b in receiver.batches)


def test_submit_does_not_wait_for_a_hanging_server(receiver, shippers, tmp_path):
    receiver.mode, receiver.slow_s = "slow", 8.0
    sh = shippers(receiver.url, TOKEN, tmp_path, batch_spans=100, request_timeout_s=10.0)
    sent = spans(5000)
    started = time.perf_counter()
    for i in range(0, 5000, 50):
        sh.submit(sent[i : i + 50])
    assert time.perf_counter() - started < 0.5
    started = time.monotonic()
    sh.close(timeout_s=0.5)  # seals to disk, waits a little, returns; the rest is for the next start
    assert time.monotonic() - started < 4.0  # not the 8 s the request in flight takes
    st = sh.stats
    assert st.spool_spans == 5000 and st.sent_spans == 0 and st.overflow_spans == 0


def test_pending_spans_are_bounded_in_memory_and_overflow_is_counted(tmp_path):
    sh = Shipper("http://127.0.0.1:9", TOKEN, tmp_path, batch_spans=10, max_pending_spans=100, **FAST)
    try:
        with sh._seal_lock:  # the disk is stuck: nothing gets sealed meanwhile
            sh.submit(spans(250))
            assert sh.stats.pending_spans == 100 and sh.stats.overflow_spans == 150
    finally:
        sh.close(timeout_s=0.1)
    assert sh.stats.spool_spans == 100
    sh.submit(spans(2))  # after close: counted, not lost silently
    assert sh.stats.overflow_spans == 152


def test_agent_id_is_made_once_per_spool_and_kept(receiver, tmp_path):
    with Shipper(receiver.url, TOKEN, tmp_path / "a", **FAST) as first:
        agent_id = first.agent_id
    with Shipper(receiver.url, TOKEN, tmp_path / "a", **FAST) as second:
        assert second.agent_id == agent_id
    assert (tmp_path / "a" / "agent_id").read_text().strip() == agent_id
    with Shipper(receiver.url, TOKEN, tmp_path / "b", **FAST) as other:
        assert other.agent_id != agent_id
    with Shipper(receiver.url, TOKEN, tmp_path / "a", agent_id="web-1", **FAST) as named:
        assert named.agent_id == "web-1"
    with pytest.raises(DeepTraceError, match="agent id"):
        Shipper(receiver.url, TOKEN, tmp_path / "c", agent_id="../etc", **FAST)
    (tmp_path / "a" / "agent_id").write_text("\x00garbage/\n")
    with Shipper(receiver.url, TOKEN, tmp_path / "a", **FAST) as fresh:
        assert fresh.agent_id != agent_id and "/" not in fresh.agent_id


def test_one_agent_per_spool_directory(receiver, shippers, tmp_path):
    shippers(receiver.url, TOKEN, tmp_path)
    with pytest.raises(DeepTraceError, match="in use by another agent"):
        Shipper(receiver.url, TOKEN, tmp_path, **FAST)


def test_a_bad_server_url_is_a_clear_error(tmp_path):
    for url in ("collector:8700", "ftp://x", "http://"):
        with pytest.raises(DeepTraceError, match="http:// or https://"):
            Shipper(url, TOKEN, tmp_path, **FAST)


def test_heartbeat_registers_the_agent_with_its_stats(receiver, shippers, tmp_path):
    sh = shippers(receiver.url, TOKEN, tmp_path, host="web-7",
                  stats_provider=lambda: {"records": 12, "spans": 3, "drops": 1})  # fmt: skip
    sh.submit(spans(3))
    assert sh.drain(5)
    wait_until(lambda: any(b["stats"]["sent_spans"] == 3 for _, b in receiver.heartbeats), 5, "a heartbeat")
    path, body = receiver.heartbeats[-1]
    assert path == f"/api/v1/agents/{sh.agent_id}"
    assert (body["host"], body["kernel"], body["version"]) == ("web-7", os.uname().release, __version__)
    assert body["started_ns"] == sh.started_ns
    stats = body["stats"]
    assert (stats["records"], stats["spans"], stats["drops"]) == (12, 3, 1)
    for key in ("spool_batches", "spool_bytes", "spool_dropped_batches", "spool_dropped_spans",
                "spool_write_failed_batches", "spool_write_failed_spans", "sent_batches",
                "send_failures"):  # fmt: skip
        assert isinstance(stats[key], int)
    assert stats["cpu_seconds"] > 0 and stats["rss_bytes"] > 10 << 20


def test_a_failing_stats_provider_does_not_stop_the_heartbeat(receiver, shippers, tmp_path):
    def broken() -> dict:
        raise RuntimeError("collector closed")

    shippers(receiver.url, TOKEN, tmp_path, stats_provider=broken)
    wait_until(lambda: len(receiver.heartbeats) >= 2, 5, "heartbeats")
    assert "sent_spans" in receiver.heartbeats[-1][1]["stats"]


def test_selfstats_reads_this_process():
    text = "123 (a) (b c)) S 1 2 3 4 5 6 7 8 9 10 250 150 0 0 20 0 1 0 100 1000 50"
    assert selfstats.cpu_seconds(text) == pytest.approx(400 / os.sysconf("SC_CLK_TCK"))
    assert selfstats.rss_bytes("1000 50 20 1 0 30 0") == 50 * os.sysconf("SC_PAGE_SIZE")
    before = selfstats.read()
    sum(i * i for i in range(2_000_000))
    after = selfstats.read()
    assert after.cpu_seconds > before.cpu_seconds and after.rss_bytes > 0


# -- restarts -------------------------------------------------------------------------------------

DRIVER = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{tests!r}]
    import spanmaker
    from deeptrace.agent.shipper import Shipper

    url, spool, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    T0_US = {t0_us}
    sh = Shipper(url, {token!r}, spool, batch_spans=25, flush_interval_s=0.05, backoff_min_s=0.02,
                 backoff_max_s=0.1, request_timeout_s=2.0)
    sh.submit([spanmaker.server(7, T0_US + i, T0_US + i + 1) for i in range(n)])
    sh.flush()
    print(sh.agent_id, flush=True)
    time.sleep(60)
""")


def run_driver(tmp_path: Path, url: str, spool: Path, n: int) -> tuple[subprocess.Popen, str]:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=str(Path(__file__).parent), token=TOKEN, t0_us=T0_US))
    proc = subprocess.Popen([sys.executable, str(script), url, str(spool), str(n)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(SRC)})  # fmt: skip
    agent_id = proc.stdout.readline().strip()
    assert agent_id, f"driver failed (exit {proc.poll()})"
    return proc, agent_id


def test_a_killed_agent_leaves_its_spool_to_the_next_one(tmp_path):
    receiver = Receiver()  # down while the first agent runs
    spool = tmp_path / "spool"
    proc, agent_id = run_driver(tmp_path, receiver.url, spool, 300)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert len(list(spool.glob("*.json.gz"))) == 300 // 25
    receiver.start()
    try:
        with Shipper(receiver.url, TOKEN, spool, **FAST) as sh:
            assert sh.agent_id == agent_id
            assert sh.drain(10)
        assert {b["agent_id"] for b in receiver.batches} == {agent_id}
        assert receiver.start_times() == [i * 1000 for i in range(300)]
        assert receiver.duplicates == 0
    finally:
        receiver.stop()


def test_an_agent_killed_mid_delivery_loses_and_doubles_nothing(tmp_path):
    receiver = Receiver().start()
    receiver.mode, receiver.slow_s = "slow", 0.3  # some batches get through; the kill comes mid-answer
    spool = tmp_path / "spool"
    try:
        proc, agent_id = run_driver(tmp_path, receiver.url, spool, 1000)
        wait_until(lambda: len(receiver.batches) >= 5, 10, "some deliveries")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        delivered_before = len(receiver.batches)
        assert delivered_before < 1000 // 25, "the kill came too late to test anything"
        receiver.mode = "ok"
        with Shipper(receiver.url, TOKEN, spool, **FAST) as sh:
            assert sh.agent_id == agent_id
            assert sh.drain(10)
        # The batch in flight at the kill (almost always one: the receiver spends its time
        # answering) was stored, then sent again by the next agent: the receiver saw it twice,
        # the application once; everything else once, in order.
        assert receiver.duplicates <= 1
        assert receiver.start_times() == [i * 1000 for i in range(1000)]
    finally:
        receiver.stop()


# -- the CLI ---------------------------------------------------------------------------------------


def _agent_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "DEEPTRACE_TOKEN"}
    argv = [sys.executable, "-m", "deeptrace.cli", "agent", "--all", *args]
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60,
                          env={**environ, **(env or {})})  # fmt: skip


def test_cli_refuses_associate_with_server(tmp_path):
    r = _agent_cli("--server", "http://127.0.0.1:9", "--token", "x", "--spool-dir", str(tmp_path),
                   "--associate")  # fmt: skip
    assert r.returncode == 2 and "the server" in r.stderr and "--associate" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_refuses_server_without_a_token(tmp_path):
    r = _agent_cli("--server", "http://127.0.0.1:9", "--spool-dir", str(tmp_path))
    assert r.returncode == 2 and "DEEPTRACE_TOKEN" in r.stderr and "Traceback" not in r.stderr


def test_cli_refuses_out_with_server(tmp_path):
    r = _agent_cli("--server", "http://127.0.0.1:9", "--spool-dir", str(tmp_path), "--out", "x.jsonl",
                   env={"DEEPTRACE_TOKEN": "x"})  # fmt: skip
    assert r.returncode == 2 and "leave out --out" in r.stderr


def test_agent_command_ships_spans_to_the_real_server(tmp_path):
    """nginx traced by `deeptrace agent --server`: its spans stored by the server, the agent listed."""
    from conftest import require_bpf
    from serverproc import TOKEN as SERVER_TOKEN
    from serverproc import running_server
    from servers import need, nginx

    require_bpf()
    with running_server(tmp_path) as srv, nginx(tmp_path) as (master, port):
        argv = [sys.executable, "-m", "deeptrace.cli", "agent", "--pid", str(master), "--duration", "5",
                "--stats-interval", "1", "--server", srv.url, "--spool-dir", str(tmp_path / "spool")]
        env = {**os.environ, "DEEPTRACE_TOKEN": SERVER_TOKEN}
        agent = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
        assert "shipping spans to" in agent.stderr.readline()
        assert "tracing pid" in agent.stderr.readline()
        for path in ("/hello", "/hello", "/nope"):
            subprocess.run([need("curl"), "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}{path}"],
                           check=True)  # fmt: skip
        _, err = agent.communicate(timeout=30)
        assert agent.returncode == 0, err
        last = err.splitlines()[-1]  # what the agent says on its way out
        assert "sent 3 spans in 1 batches" in last and "spooled 0 spans" in last and "Traceback" not in err
        srv.wait_published(3)
        recent = time.time_ns() - 60 * 10**9
        found = srv.get("/api/v1/traces", service="nginx", start_ns=recent).json()["traces"]
        assert sorted(t["root_name"] for t in found) == ["GET /hello", "GET /hello", "GET /nope"]
        (reported,) = srv.get("/api/v1/agents").json()["agents"]
        agent_id = (tmp_path / "spool" / "agent_id").read_text().strip()
        assert reported["agent_id"] == agent_id and reported["stats"]["records"] > 0
        assert reported["stats"]["spans"] == 3 and "drops" in reported["stats"]


def test_cli_says_when_the_spool_directory_is_unusable(tmp_path):
    (tmp_path / "file").write_text("")
    r = _agent_cli("--server", "http://127.0.0.1:9", "--spool-dir", str(tmp_path / "file" / "spool"),
                   env={"DEEPTRACE_TOKEN": "x"})  # fmt: skip
    assert r.returncode == 2 and "cannot use spool directory" in r.stderr and "Traceback" not in r.stderr


# -- against the real server ----------------------------------------------------------------------


def traces(n: int) -> list[dict]:
    """n two-host calls (CLIENT on h1, SERVER on h2), times of now."""
    t0 = time.time_ns() // 1000
    out: list[dict] = []
    for i in range(n):
        out.extend(spanmaker.call_pair(10, 20, t0 + i * 3000, t0 + i * 3000 + 2000, seq=10_000 * (i + 1)))
    return out


def assert_stored_exactly_once(srv, sent: list[dict]) -> None:
    """Every span once: the store keeps a row per ingested span (no key merges a double), so its
    count and its answer for our ids together say nothing is missing and nothing is doubled."""
    from deeptrace.server.store import open_store

    srv.stop()  # the store file has one writer at a time
    store = open_store(str(srv.db))
    try:
        assert store.stats().spans == len(sent)
        assert store.stored_span_ids(ids(sent)) == set(ids(sent))
    finally:
        store.close()


def test_real_server_started_after_the_agent_gets_every_span_once(tmp_path):
    from serverproc import TOKEN as SERVER_TOKEN
    from serverproc import ServerProcess

    srv = ServerProcess(tmp_path / "store.duckdb", args=("--hold", "0.5"))  # not started yet
    sent = traces(100)
    sh = Shipper(srv.url, SERVER_TOKEN, tmp_path / "spool", batch_spans=30, host="agent-host",
                 stats_provider=lambda: {"records": 400, "spans": 200, "drops": 0}, **FAST)  # fmt: skip
    try:
        sh.submit(sent)
        sh.flush()
        wait_until(lambda: sh.stats.send_failures >= 2, 5, "failed attempts")
        assert sh.stats.spool_spans == 200
        srv.start()
        assert sh.drain(30)
        status = srv.wait_published(200)
        assert status["store"]["spans"] == 200 and status["ingest"]["duplicates"] == 0
        # Linked across the two hosts: the server got both sides of each call.
        pair = srv.get(f"/api/v1/spans/{sent[1]['span_id']}").json()
        assert pair["parent_span_id"] == sent[0]["span_id"] and pair["link_method"] == "seq-join"

        def reported() -> dict | None:
            agents = srv.get("/api/v1/agents").json()["agents"]
            done = (a for a in agents if a["agent_id"] == sh.agent_id and a["stats"]["sent_spans"] == 200)
            return next(done, None)

        wait_until(reported, 10, "the agent's report")
        agent = reported()
        assert (agent["host"], agent["kernel"]) == ("agent-host", os.uname().release)
        assert agent["version"] == __version__
        assert agent["started_ns"] == sh.started_ns and agent["stats"]["records"] == 400
        assert agent["stats"]["spool_batches"] == 0 and agent["stats"]["rss_bytes"] > 0
        sh.close(timeout_s=1)
        assert_stored_exactly_once(srv, sent)
    finally:
        sh.close(timeout_s=1)
        srv.stop()


def test_real_server_killed_mid_ingest_and_restarted_loses_and_doubles_nothing(tmp_path):
    from serverproc import TOKEN as SERVER_TOKEN
    from serverproc import ServerProcess

    db = tmp_path / "store.duckdb"
    srv = ServerProcess(db, args=("--hold", "0.5")).start()
    sent = traces(300)
    sh = Shipper(srv.url, SERVER_TOKEN, tmp_path / "spool", batch_spans=4, **FAST)
    try:
        sh.submit(sent)
        sh.flush()
        wait_until(lambda: sh.stats.sent_batches >= 20, 30, "some deliveries")
        srv.stop(signal.SIGKILL)
        assert sh.stats.spool_batches > 0, "the kill came too late to test anything"
        wait_until(lambda: sh.stats.send_failures >= 1, 5, "the agent noticing")
        srv = ServerProcess(db, port=srv.port, args=("--hold", "0.5")).start()
        assert sh.drain(60)
        status = srv.wait_published(600)
        assert status["store"]["spans"] == 600 and status["store"]["incoming_batches"] == 0
        assert sh.stats.sent_spans >= 600 and sh.stats.spool_batches == 0
        assert_stored_exactly_once(srv, sent)
    finally:
        sh.close(timeout_s=1)
        srv.stop()
