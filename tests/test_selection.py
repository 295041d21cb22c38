"""Which processes produce records: the traced ones, their children, name matches,
everyone in --all mode except the agent; and never files or pipes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from conftest import Tracee, require_bpf

from deeptrace.agent.collector import Collector, CollectorConfig
from deeptrace.agent.selection import Selection


def test_untraced_process_produces_nothing(collector, store):
    t = Tracee("io", "write", "ipv4", "tcp", 100)
    t.go()  # never traced
    # A traced process run after it proves the pipeline was live meanwhile.
    t2 = Tracee("io", "write", "ipv4", "tcp", 100)
    collector.trace(t2.pid)
    t2.go()
    assert store.wait_for(t2.pid)
    assert store.settle(t.pid) == []


def test_files_and_pipes_of_a_traced_process_produce_nothing(collector, store):
    before = collector.counters()["skip_not_socket"]
    t = Tracee("files")
    collector.trace(t.pid)
    t.go()
    assert store.settle(t.pid, quiet_s=0.5) == []
    # The kernel saw them and left them out on purpose: 3 reads/writes of a file or pipe at least.
    assert collector.counters()["skip_not_socket"] - before >= 6


def test_child_forked_after_start_is_traced(collector, store):
    t = Tracee("fork", "ipv4")
    collector.trace(t.pid)
    child = t.go()["child"]
    recs = store.wait_for(child, lambda rs: any(r.syscall == "read" for r in rs))
    assert {r.syscall for r in recs} >= {"connect", "accept", "write", "read"}
    assert all(r.tgid == child for r in recs)


def test_exited_processes_leave_the_pid_map(collector):
    t = Tracee("io", "write", "ipv4", "tcp", 10)
    collector.trace(t.pid)
    assert t.pid in collector.kernel_traced()
    t.go()
    collector.refresh()
    assert t.pid not in collector.kernel_traced()


def _python_named(tmp_path, name):
    """A python interpreter whose process name (comm) is `name`: the kernel names a
    process after the file it executed."""
    link = tmp_path / name
    os.symlink(os.path.realpath(sys.executable), link)
    return str(link)


def test_comm_selection_traces_processes_started_later(tmp_path):
    require_bpf()
    name = "dt-comm-test"
    exe = _python_named(tmp_path, name)
    cfg = CollectorConfig(selection=Selection(comms=[name]), refresh_interval_s=3600)
    with Collector(cfg) as c:
        t = Tracee("io", "write", "ipv4", "tcp", 100, executable=exe)
        # Added by the kernel's exec hook, before user space looked (refresh is an hour away).
        assert t.pid in c.kernel_traced()
        t.go()
        recs = []
        deadline = time.monotonic() + 5
        while not any(r.syscall == "write" for r in recs) and time.monotonic() < deadline:
            recs += [r for r in c.poll(0.1) if r.tgid == t.pid]
        assert any(r.syscall == "write" and r.comm == name for r in recs)


def test_comm_selection_finds_running_processes(tmp_path):
    require_bpf()
    name = "dt-comm-run"
    proc = subprocess.Popen([_python_named(tmp_path, name), "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.2)
        with Collector(CollectorConfig(selection=Selection(comms=[name]))) as c:
            assert proc.pid in c.kernel_traced()
    finally:
        proc.kill()
        proc.wait()


def test_all_mode_traces_others_but_not_the_agent():
    require_bpf()
    with Collector(CollectorConfig(selection=Selection(trace_all=True))) as c:
        t = Tracee("io", "sendto", "ipv4", "udp", 100)
        t.go()
        # The agent's own socket traffic must not be traced (it would feed on itself).
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"agent traffic", ("127.0.0.1", 9))
        mine, agent = [], []
        deadline = time.monotonic() + 5
        while not mine and time.monotonic() < deadline:
            batch = c.poll(0.1)
            mine += [r for r in batch if r.tgid == t.pid and r.syscall == "sendto"]
            agent += [r for r in batch if r.tgid == os.getpid()]
        agent += [r for r in c.poll(0.2) if r.tgid == os.getpid()]
        assert mine and agent == []
