"""Every record is delivered or counted as dropped; capture size is configurable."""

from __future__ import annotations

import socket
import threading
import time

from conftest import Tracee, require_bpf

from deeptrace.agent.collector import Collector, CollectorConfig
from deeptrace.agent.selection import Selection
from deeptrace.capture.records import MAX_CAPTURE, MAX_MMSG


def _sink() -> tuple[socket.socket, threading.Thread]:
    """An untraced TCP server in this process that reads and discards."""
    lst = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = lst.accept()
        while conn.recv(1 << 16):
            pass
        conn.close()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    return lst, th


def _drain(c: Collector, tgid: int, quiet_s: float = 0.5) -> list:
    out, last = [], time.monotonic()
    while time.monotonic() - last < quiet_s:
        batch = [r for r in c.poll(0.05) if r.tgid == tgid]
        if batch:
            out += batch
            last = time.monotonic()
    return out


def test_burst_overflowing_a_small_ring_counts_every_lost_record():
    require_bpf()
    writes = 3000
    # 16 KiB ring holds ~70 of these records; the reader is not reading during the burst.
    cfg = CollectorConfig(selection=Selection(), ring_bytes=16 << 10, wakeup_records=1 << 30)
    with Collector(cfg) as c:
        lst, th = _sink()
        t = Tracee("burst", lst.getsockname()[1], writes, 100)
        c.trace(t.pid)
        t.go()
        th.join(5)
        got = _drain(c, t.pid)
        counters = c.counters()
        expected = writes + 1  # the writes and the close
        assert counters["drop_ringbuf_full"] > 0
        assert counters["submitted"] == len(got) == c.received
        assert counters["submitted"] + counters["drop_ringbuf_full"] == expected
        assert sum(r.syscall == "close" for r in got) <= 1
        lst.close()


def test_sendmmsg_beyond_the_per_call_limit_is_counted(collector, store):
    before = collector.counters()["drop_mmsg_overflow"]
    t = Tracee("mmsg-many", "ipv4", MAX_MMSG + 3)
    collector.trace(t.pid)
    t.go()
    recs = store.wait_for(t.pid, lambda rs: len(rs) >= MAX_MMSG)
    assert sorted(r.msg_index for r in recs if r.syscall == "sendmmsg") == list(range(MAX_MMSG))
    assert collector.counters()["drop_mmsg_overflow"] - before == 3


def test_capture_up_to_the_16k_maximum():
    require_bpf()
    with Collector(CollectorConfig(selection=Selection(), capture_bytes=MAX_CAPTURE)) as c:
        for syscall in ("write", "sendmsg"):
            t = Tracee("io", syscall, "ipv4", "tcp", 20000)
            c.trace(t.pid)
            info = t.go()
            recs = [r for r in _drain(c, t.pid) if r.syscall == syscall]
            msg = b"".join(bytes.fromhex(m) for m in info["messages"])
            assert len(recs) == 1
            assert recs[0].size == 20000 and recs[0].captured == MAX_CAPTURE and recs[0].truncated
            assert recs[0].payload == msg[:MAX_CAPTURE]
