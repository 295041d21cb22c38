"""Two collectors on the same syscalls: the records path and one whose kernel assembles
exchanges (CollectorConfig.assemble). The rule the kernel-exchange tests check with it: the
spans are the same either way (names, statuses, sizes, TCP byte ranges, threads,
attributes, heads), whatever the traffic, and a request is never paired with another's
response. Used by the Redis and Memcached tests; the HTTP tests have their own, older one."""

from __future__ import annotations

import subprocess
import time
from collections import Counter

import numpy as np
from conftest import require_bpf

from deeptrace.agent.collector import Collector, CollectorConfig
from deeptrace.agent.selection import Selection
from deeptrace.capture.pipeline import SpanPipeline
from deeptrace.capture.records import FLAG_ASSEMBLED

CAPTURE = 1024
KERNEL_COUNTERS = ("exchanges", "drop_exchange_ringbuf_full", "drop_exchange_state_lost", "conn_assembled",
                   "conn_handed_over", "drop_ringbuf_full")  # fmt: skip


def assembling_collector(protocols: tuple[str, ...], **config) -> Collector:
    require_bpf()
    return Collector(CollectorConfig(selection=Selection(), capture_bytes=CAPTURE, assemble=protocols,
                                     **config)).start()  # fmt: skip


class Twin:
    """The same processes traced by the records path and by the assembling collector;
    spans of each, those of the assembling side split by where they came from."""

    def __init__(self, collector, store, asm):
        self.plain, self.store, self.asm = collector, store, asm
        self.tgids: set[int] = set()
        # Whatever earlier tests left in the rings is theirs.
        while self.asm.poll(timeout_s=0) or len(self.asm.poll_exchanges()):
            pass
        store.pump(0)
        self.before = asm.counters()
        self.p_plain, self.p_asm = SpanPipeline(), SpanPipeline()
        self.plain_spans: list = []
        self.exchange_spans: list = []  # from kernel exchange events
        self.record_spans: list = []  # the assembling collector's records (handed over, or never assembled)
        self.held_spans: list = []  # requests the kernel still held when the twin closed
        self.handed_records: list = []  # records with FLAG_ASSEMBLED: what the kernel held at a hand-over
        self.plain_syscalls: Counter = Counter()  # of the records path's records
        self.events = 0
        self.closed = False

    def trace(self, pid: int) -> None:
        self.asm.trace(pid)
        self.tgids |= self.plain.trace(pid)
        self.store.by_tgid.pop(pid, None)

    def pump(self, timeout_s: float = 0.01) -> int:
        events = self.asm.poll_exchanges()
        records = self.asm.poll(timeout_s=timeout_s)
        if len(events) == 0:
            events = self.asm.poll_exchanges()
        self.events += len(events)
        self.exchange_spans += self.p_asm.push_exchanges(events, self.asm.wall_offset_ns)
        self.handed_records += [r for r in records if r.flags & FLAG_ASSEMBLED]
        # Children the traced processes forked since (the kernel traces them from their fork).
        self.tgids |= set(events["tgid"].tolist()) | {r.tgid for r in records}
        self.record_spans += self.p_asm.push(records)
        self.store.pump(timeout_s=0)
        plain = [r for t in self.tgids for r in self.store.by_tgid.pop(t, [])]
        self.plain_syscalls.update(r.syscall for r in plain)
        self.plain_spans += self.p_plain.push(plain)
        return len(events) + len(records) + len(plain)

    def settle(self, quiet_s: float = 0.3, timeout_s: float = 15.0) -> None:
        """Pump until nothing new came for quiet_s."""
        deadline = time.monotonic() + timeout_s
        last = time.monotonic()
        while time.monotonic() - last < quiet_s and time.monotonic() < deadline:
            if self.pump():
                last = time.monotonic()

    def run(self, proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
        """Pump while a client runs."""
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            assert time.monotonic() < deadline, f"{proc.args} still runs after {timeout_s}s"
            self.pump()

    def close(self) -> None:
        """Everything in; connections still open, and requests the kernel still holds, end as
        the agent stopping ends them."""
        self.settle()
        now = time.time_ns()
        self.plain_spans += self.p_plain.close_all(now)
        self.record_spans += self.p_asm.close_all(now)
        events, ends = self.asm.waiting_exchanges(time.monotonic_ns())
        ours = np.isin(events["tgid"], list(self.tgids))
        self.held_spans = self.p_asm.expire_exchanges(events[ours], [e for e, o in zip(ends, ours) if o],
                                                      self.asm.wall_offset_ns, "agent stopped")  # fmt: skip
        self.closed = True

    @property
    def asm_spans(self) -> list:
        return self.exchange_spans + self.record_spans + self.held_spans

    def delta(self) -> dict[str, int]:
        now = self.asm.counters()
        return {k: now[k] - self.before[k] for k in KERNEL_COUNTERS}

    def check_counters(self) -> dict[str, int]:
        """What holds after any traffic: nothing lost, every event a span."""
        d = self.delta()
        lost = ("drop_exchange_ringbuf_full", "drop_exchange_state_lost", "drop_ringbuf_full")
        assert not any(d[k] for k in lost), d
        assert d["exchanges"] == self.events == len(self.exchange_spans), (
            d,
            self.events,
            len(self.exchange_spans),
        )
        assert d["conn_handed_over"] <= d["conn_assembled"], d
        return d


def span_key(s) -> tuple:
    attrs = tuple(sorted((k, repr(v)) for k, v in s.attributes.items()))
    e = s.endpoint
    return (s.kind, s.name, s.status, s.status_code, s.req_size, s.resp_size, s.req_seq, s.resp_seq, s.tid,
            s.resp_tid, attrs, s.req_head, s.resp_head, e.pid, e.laddr, e.lport, e.raddr, e.rport)  # fmt: skip


def show(keys) -> str:
    return "\n".join(f"  {n} x {k[:10]} {dict(k[10])} heads {k[11][:60]!r} {k[12][:60]!r}"
                     for k, n in list(keys.items())[:8])  # fmt: skip


def assert_same_spans(twin: Twin) -> None:
    assert twin.closed
    plain, asm = Counter(map(span_key, twin.plain_spans)), Counter(map(span_key, twin.asm_spans))
    only_plain, only_asm = plain - asm, asm - plain
    assert not only_plain and not only_asm, (f"records path only ({sum(only_plain.values())}):\n{show(only_plain)}\n"
                                             f"assembled only ({sum(only_asm.values())}):\n{show(only_asm)}")  # fmt: skip
    # Same durations too (both collectors' hooks read the same kernel times, a few us apart).
    by_key = {}
    for s in twin.plain_spans:
        by_key.setdefault(span_key(s), []).append(s.duration_ns)
    for s in twin.asm_spans:
        assert any(abs(d - s.duration_ns) < 5_000_000 for d in by_key[span_key(s)]), s


def names(spans) -> Counter:
    return Counter(s.name for s in spans)


def summary(spans) -> list[tuple]:
    return [(s.name, s.status, s.status_code) for s in sorted(spans, key=lambda s: s.start_ns)]
