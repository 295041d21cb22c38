"""One load level, recorded: the services under the real agent, the load driver outside it.

out/<level>/spans.jsonl   the agent's spans (what association gets)
out/<level>/truth.jsonl   the services' own records of what caused what
out/<level>/load.json     what the load driver sent and got back
out/<level>/*.log         agent and services output
out/<level>/warmup/       with a warm-up: its load.json, spans.jsonl and truth.jsonl (not scored)

A warm-up (`warmup` seconds of the same load first, another seed) lets runtimes that
compile as they go (the JVM's JIT) reach their steady state and fill their connection
pools before the measured window. The driver waits for every warm-up request's answer
(or its 20 s timeout, an error in warmup/load.json), so no request straddles the cut
between them, which lies in a second with nothing in flight: spans and records that
start before it are the warm-up's, and the CPU figures are the measured window's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import infra

HERE = Path(__file__).resolve().parent
AGENT = [str(infra.ROOT / ".venv/bin/deeptrace"), "agent"]
CAPTURE = 16384  # payload bytes per record


def listening(port: int) -> bool:
    """Whether something listens on the port, read from /proc: connecting to find out would
    add a connection of our own to the traced services. (gRPC listens on an IPv6 socket.)"""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def wait_until(what: str, ready, timeout_s: float, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if not alive() or time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready (see the logs in the output directory)")
        time.sleep(0.1)


@contextmanager
def running(argv: list[str], log: Path, **popen):
    """A process for the block's duration; SIGTERM (then SIGKILL) at the end, even on failure."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out, **popen)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def cpu_seconds(root: int) -> dict[int, float]:
    """CPU time (user + system) of a process and all its descendants, per pid: where the
    machine's two cores went."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            stats[int(entry)] = (
                int(fields[1]),
                (int(fields[11]) + int(fields[12])) / tick,
            )  # ppid, utime + stime
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        tree[pid] = stats.get(pid, (0, 0.0))[1]
        todo += [p for p, (ppid, _) in stats.items() if ppid == pid]
    return tree


def clock_offset() -> int:
    """time.time_ns() - time.monotonic_ns(), from the closest of a few readings: one
    preempted between its two clocks would be off by as long as it waited (this machine is
    shared; 20 us already moves a record off its span)."""
    best = None
    for _ in range(9):
        m0, wall, m1 = time.monotonic_ns(), time.time_ns(), time.monotonic_ns()
        if best is None or m1 - m0 < best[0]:
            best = (m1 - m0, wall - (m0 + m1) // 2)
    return best[1]


def record_level(level_dir: Path, rate: float, seconds: float, stores: dict, seed: int, workload,
                 warmup: float = 0.0) -> dict:  # fmt: skip
    """Run the workload at `rate` requests/s for `seconds` under the agent, after `warmup`
    seconds of the same load that are not scored; returns the load summary."""
    level_dir.mkdir(parents=True, exist_ok=True)
    truth_dir = level_dir / "truth"
    truth_dir.mkdir(exist_ok=True)
    workload.before_level(stores)
    ports = {name: infra.servers.free_port() for name in workload.services}
    launcher = [sys.executable, str(HERE / "launch.py")]
    # The offset the agent adds to its kernel stamps, taken as it starts: truth logged on
    # CLOCK_MONOTONIC gets the same one, so a wall clock stepped meanwhile moves neither.
    offset = clock_offset()
    with running(launcher, level_dir / "services.log", stdin=subprocess.PIPE) as services:
        agent_log = level_dir / "agent.log"
        agent = AGENT + [
            "--pid",
            str(services.pid),
            "--out",
            str(level_dir / "spans.jsonl"),
            "--stats-interval",
            "5",
            "--capture",
            str(CAPTURE),
        ]
        with running(agent, agent_log) as tracer:
            wait_until(
                "agent",
                lambda: "deeptrace: tracing" in agent_log.read_text(),
                60,
                lambda: tracer.poll() is None,
            )
            services.stdin.write(json.dumps(workload.commands(ports, truth_dir, stores)).encode() + b"\n")
            services.stdin.close()
            wait_until(
                "services",
                lambda: all(listening(p) for p in ports.values()),
                60,
                lambda: services.poll() is None,
            )
            load_out = level_dir / "load.json"

            def drive(duration: float, seed: int, out: Path) -> None:
                subprocess.run([sys.executable, str(HERE / "load.py"), str(ports[workload.entry]), str(rate),
                                str(duration), str(seed), str(out), *workload.load_args()], check=True)  # fmt: skip

            def cpu() -> dict:
                return {"services": cpu_seconds(services.pid), "agent": cpu_seconds(tracer.pid)[tracer.pid]}

            cut, before = None, None
            if warmup > 0:
                (level_dir / "warmup").mkdir(exist_ok=True)
                drive(warmup, seed + 1000, level_dir / "warmup/load.json")  # returns once all are answered
                time.sleep(0.5)  # the cut: half a second from either side's requests
                cut, before = offset + time.monotonic_ns(), cpu()
                time.sleep(0.5)
            drive(seconds, seed, load_out)
            time.sleep(1)  # the last responses' bytes reach the agent
            used = cpu()
            if before is not None:  # the measured window's, per process alive at the cut
                used = {"services": {pid: round(t - before["services"].get(pid, 0.0), 2)
                                     for pid, t in used["services"].items()},
                        "agent": round(used["agent"] - before["agent"], 2)}  # fmt: skip
            services.terminate()  # services first: their connections close while the agent still watches
            services.wait(60)
            tracer.terminate()
            tracer.wait(120)
    merge_truth(truth_dir, level_dir / "truth.jsonl", offset)
    if cut is not None:
        split_warmup(level_dir, cut)
    load = json.loads(load_out.read_text())
    load["cpu_seconds"] = used
    if cut is not None:
        load["warmup"] = {"target_seconds": warmup, **json.loads((level_dir / "warmup/load.json").read_text())}
    load_out.write_text(json.dumps(load))
    (level_dir / "ports.json").write_text(json.dumps(ports))
    return load


def split_warmup(level_dir: Path, cut: int) -> None:
    """Spans and truth records that start before `cut` (wall-clock ns) move to warmup/."""
    for name, start in (("spans.jsonl", "start_ns"), ("truth.jsonl", "t0")):
        lines = (level_dir / name).read_text().splitlines(keepends=True)
        early = [json.loads(line)[start] < cut for line in lines]
        (level_dir / "warmup" / name).write_text("".join(x for x, e in zip(lines, early) if e))
        (level_dir / name).write_text("".join(x for x, e in zip(lines, early) if not e))


def merge_truth(truth_dir: Path, out: Path, offset: int) -> None:
    """One file per service process while running (no interleaved writes), one file after,
    every time on the wall clock. The mesh logs CLOCK_MONOTONIC (Java's and Node's wall
    clocks are coarse, and a VM's may be stepped during a run): `offset` makes it wall time
    as the agent does."""
    with open(out, "w") as f:
        for part in sorted(truth_dir.glob("*.jsonl")):
            for line in part.read_text().splitlines():
                rec = json.loads(line)
                if rec.pop("clock", None) == "monotonic":
                    for key in ("t0", "t1", "t_conn", "t_done"):
                        if rec.get(key) is not None:
                            rec[key] += offset
                f.write(json.dumps(rec) + "\n")
            part.unlink()
    truth_dir.rmdir()
