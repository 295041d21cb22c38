#!/usr/bin/env python3
"""Per-syscall cost of the agent's hooks, in the style of the original DeepTrace's table.

For each of the ten data syscalls, 128-byte calls over TCP loopback, in four
configurations measured side by side in one run:

  base      no BPF program attached
  floor     empty programs on the same tracepoints (the price of any program there)
  traced    the DeepTrace agent attached and this process traced (reader running)
  untraced  the DeepTrace agent attached, this process not traced

The configurations are interleaved and the whole sequence repeated; each cell is
the median. Run as root from the repository root:

    .venv/bin/python bench/overhead/run.py [--calls 100000] [--repeats 3] [--quick]

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from deeptrace.agent.collector import Collector, CollectorConfig
from deeptrace.agent.libbpf import BpfObject
from deeptrace.agent.records import DATA_SYSCALLS
from deeptrace.agent.selection import Selection

HERE = Path(__file__).parent
OUT = HERE / "out"
CONFIGS = ("base", "floor", "traced", "untraced")
PUBLISHED = "original DeepTrace (own machine): about +2,500 to +2,800 ns per traced call, +7,157 ns for recvmsg"


def build() -> tuple[Path, Path]:
    """Compile the loop program and the empty BPF object if missing or stale."""
    OUT.mkdir(exist_ok=True)
    loop, empty = OUT / "syscall_loop", OUT / "empty.bpf.o"
    steps = [
        (HERE / "syscall_loop.c", loop, ["gcc", "-O2", "-Wall", "-o", str(loop)]),
        (HERE / "empty.bpf.c", empty,
         ["clang", "-O2", "-g", "-target", "bpf", "-I/usr/include/x86_64-linux-gnu", "-c", "-o", str(empty)]),
    ]  # fmt: skip
    for src, dst, cmd in steps:
        if not dst.exists() or dst.stat().st_mtime < src.stat().st_mtime:
            subprocess.run([*cmd, str(src)], check=True)
    return loop, empty


class Reader(threading.Thread):
    """Drains the agent's ring buffer, as the agent does in real use."""

    def __init__(self, collector: Collector):
        super().__init__(daemon=True)
        self.collector = collector
        self.records = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.records += len(self.collector.poll(timeout_s=0.05))
        self.records += len(self.collector.poll(timeout_s=0))


@contextmanager
def attached(config: str, empty_obj: Path):
    """Yields a function that is called with the benchmark pid before it starts."""
    if config == "base":
        yield lambda pid: None
    elif config == "floor":
        with BpfObject(empty_obj) as obj:
            obj.load()
            obj.attach_all()
            yield lambda pid: None
    else:
        # A ring large enough that a reader slower than this tight loop does not drop.
        with Collector(CollectorConfig(selection=Selection(), ring_bytes=64 << 20)) as collector:
            reader = Reader(collector)
            reader.start()
            try:
                yield (lambda pid: collector.trace(pid)) if config == "traced" else (lambda pid: None)
            finally:
                reader.stop.set()
                reader.join()
                attached.last_drops = sum(collector.drops().values())
                attached.last_records = reader.records


attached.last_drops = 0
attached.last_records = 0


# The measured loop on one CPU, this script and the agent's reader on the other,
# in every configuration: the reader then costs the loop no CPU time, and what
# "traced" adds over "base" is the hooks' own cost.
LOOP_CPU, RUNNER_CPU = 1, 0


def measure(loop: Path, syscall: str, calls: int, before_start) -> float:
    proc = subprocess.Popen([str(loop), syscall, str(calls)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    os.sched_setaffinity(proc.pid, {LOOP_CPU})  # it waits for its start line, so pinning now is in time
    before_start(proc.pid)
    out, _ = proc.communicate("go\n", timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"syscall_loop {syscall} failed")
    return json.loads(out)["ns_per_call"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="20,000 calls, 1 repeat: a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.calls, args.repeats = 20_000, 1

    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs two CPUs: one for the measured loop, one for the agent's reader")
    os.sched_setaffinity(0, {RUNNER_CPU})
    loop, empty = build()
    samples = {c: {s: [] for s in DATA_SYSCALLS} for c in CONFIGS}
    traced_records, traced_drops = 0, 0
    for rep in range(args.repeats):
        for config in CONFIGS:
            with attached(config, empty) as before_start:
                for syscall in DATA_SYSCALLS:
                    samples[config][syscall].append(measure(loop, syscall, args.calls, before_start))
            if config == "traced":
                traced_records += attached.last_records
                traced_drops += attached.last_drops
            print(f"repeat {rep + 1}/{args.repeats}: {config} done", file=sys.stderr)

    rows = {}
    for s in DATA_SYSCALLS:
        m = {c: statistics.median(samples[c][s]) for c in CONFIGS}
        floor_cost = m["floor"] - m["base"]
        rows[s] = {
            **{f"{c}_ns": round(m[c], 1) for c in CONFIGS},
            "traced_minus_base_ns": round(m["traced"] - m["base"], 1),
            "floor_minus_base_ns": round(floor_cost, 1),
            "traced_cost_over_floor_cost": round((m["traced"] - m["base"]) / floor_cost, 2) if floor_cost > 0 else None,
            "untraced_over_floor": round(m["untraced"] / m["floor"], 3),
        }

    print(f"{'syscall':10} {'base':>8} {'floor':>8} {'traced':>8} {'untraced':>9} "
          f"{'traced-base':>12} {'floor-base':>11} {'ratio':>6} {'untr/floor':>10}")  # fmt: skip
    for s, r in rows.items():
        ratio = r["traced_cost_over_floor_cost"]
        print(f"{s:10} {r['base_ns']:8.0f} {r['floor_ns']:8.0f} {r['traced_ns']:8.0f} {r['untraced_ns']:9.0f} "
              f"{r['traced_minus_base_ns']:12.0f} {r['floor_minus_base_ns']:11.0f} "
              f"{ratio if ratio is not None else float('nan'):6.2f} {r['untraced_over_floor']:10.3f}")  # fmt: skip
    worst_ratio = max((r["traced_cost_over_floor_cost"] or 0) for r in rows.values())
    worst_untraced = max(r["untraced_over_floor"] for r in rows.values())
    mean_added = statistics.mean(r["traced_minus_base_ns"] for r in rows.values())
    print(f"\nns per call, median of {args.repeats} x {args.calls} calls of 128 bytes over TCP loopback")
    print(f"mean traced cost over base: {mean_added:.0f} ns/call; {PUBLISHED}")
    print(f"records read while traced: {traced_records}, ring-buffer drops: {traced_drops}")
    print(f"target traced-base <= 1.5 x (floor-base): worst {worst_ratio:.2f} -> "
          f"{'met' if worst_ratio <= 1.5 else 'NOT met'}")
    print(f"target untraced within 10% of floor: worst {worst_untraced:.3f} -> "
          f"{'met' if worst_untraced <= 1.10 else 'NOT met'}")
    print(json.dumps({
        "benchmark": "overhead", "calls": args.calls, "repeats": args.repeats, "payload_bytes": 128,
        "per_syscall": rows, "mean_traced_minus_base_ns": round(mean_added, 1),
        "worst_traced_cost_over_floor_cost": worst_ratio, "worst_untraced_over_floor": worst_untraced,
        "traced_records": traced_records, "traced_drops": traced_drops,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
