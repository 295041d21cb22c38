"""Shared fixtures: a real collector attached to the kernel, and traced helper processes.

The eBPF tests need root, BTF and the built object. Where they cannot run they
are skipped with the exact reason, except under DEEPTRACE_REQUIRE_BPF=1 (set by
`make test` and CI), where that is a failure: on our machines they must run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from deeptrace.agent.collector import Collector, CollectorConfig, bpf_object_path
from deeptrace.agent.selection import Selection
from deeptrace.agent.system import BTF_PATH
from deeptrace.capture.records import Record

TESTS = Path(__file__).parent
TRACEE = TESTS / "tracee.py"


def bpf_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "eBPF tests need root (they load programs into the kernel)"
    if not BTF_PATH.exists():
        return f"eBPF tests need kernel BTF at {BTF_PATH}"
    if not bpf_object_path().exists():
        return f"eBPF tests need the built object {bpf_object_path()} (run `make bpf`)"
    return None


def require(reason: str | None, must_run_var: str) -> None:
    """Skip with the reason why this cannot run here, or fail where `must_run_var`=1 says it
    must run (make test, CI)."""
    if reason is None:
        return
    if os.environ.get(must_run_var) == "1":
        pytest.fail(f"{must_run_var}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def require_bpf() -> None:
    require(bpf_unavailable_reason(), "DEEPTRACE_REQUIRE_BPF")


class RecordStore:
    """Everything a collector delivered, by tgid, so no test loses another's records."""

    def __init__(self, collector: Collector):
        self.collector = collector
        self.by_tgid: dict[int, list[Record]] = defaultdict(list)

    def pump(self, timeout_s: float = 0.05) -> None:
        for rec in self.collector.poll(timeout_s=timeout_s):
            self.by_tgid[rec.tgid].append(rec)

    def wait_for(self, tgids, predicate=lambda recs: bool(recs), timeout_s: float = 5.0) -> list[Record]:
        """Records of these processes once predicate(records) holds (or at timeout)."""
        tgids = {tgids} if isinstance(tgids, int) else set(tgids)
        deadline = time.monotonic() + timeout_s
        while True:
            self.pump()
            recs = sorted((r for t in tgids for r in self.by_tgid.get(t, [])), key=lambda r: r.exit_ns)
            if predicate(recs) or time.monotonic() > deadline:
                return recs

    def settle(self, tgids, quiet_s: float = 0.3) -> list[Record]:
        """All records of these processes, once nothing new arrived for quiet_s."""
        return self.wait_for(tgids, lambda r: False, timeout_s=quiet_s)


@pytest.fixture(scope="session")
def collector():
    require_bpf()
    c = Collector(CollectorConfig(selection=Selection(), capture_bytes=1024)).start()
    yield c
    c.close()


@pytest.fixture(scope="session")
def store(collector):
    return RecordStore(collector)


class Tracee:
    """A tests/tracee.py process: started, traced (or not), released, finished."""

    def __init__(self, *args: str, executable: str | None = None):
        argv = [executable or sys.executable, str(TRACEE), *map(str, args)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.ready_info = self._expect("ready")

    def _expect(self, word: str) -> dict:
        line = self.proc.stdout.readline()
        if not line.startswith(word + " "):
            self.proc.kill()
            raise AssertionError(f"tracee said {line!r}, expected {word!r} (exit {self.proc.wait()})")
        return json.loads(line[len(word) + 1 :])

    def go(self) -> dict:
        """Release it and wait until it has done its syscalls."""
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        info = self._expect("done")
        assert self.proc.wait(timeout=30) == 0
        return info


@pytest.fixture
def traced_run(collector, store):
    """Run a tracee traced by the session collector; returns (done info, its records)."""

    def run(*args: str, predicate=lambda recs: bool(recs)) -> tuple[dict, list[Record]]:
        t = Tracee(*args)
        collector.trace(t.pid)
        info = t.go()
        return info, store.wait_for(t.pid, predicate)

    return run


@pytest.fixture
def twin(collector, store, assembling):
    """The records path and a module's `assembling` collector on the same processes
    (tests/twins.py); what this test's processes leave in the store goes with it."""
    from twins import Twin

    t = Twin(collector, store, assembling)
    yield t
    for pid in t.tgids:  # a server of this test is gone; the module's stays traced
        store.by_tgid.pop(pid, None)
