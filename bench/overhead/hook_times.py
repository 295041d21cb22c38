#!/usr/bin/env python3
"""Average run time of each DeepTrace kernel program, from the kernel's own BPF
statistics (kernel.bpf_stats_enabled), while a traced loop makes each syscall.

Where run.py says how much a traced call costs in all, this says which program
the time goes to. The statistics add two clock reads per program run, so the
figures are a little high; compare them with each other, not with run.py.

    .venv/bin/python bench/overhead/hook_times.py [--calls 50000] [SYSCALL ...]

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[1] / "src"))
sys.path.insert(0, str(HERE))

from run import LOOP_CPU, RUNNER_CPU, Reader, build, own_program_ids

from deeptrace.agent.collector import Collector, CollectorConfig
from deeptrace.agent.selection import Selection
from deeptrace.capture.records import DATA_SYSCALLS

STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def program_stats() -> dict[str, tuple[int, int]]:
    """(runs, ns) by name of the programs this process loaded (another agent's or a test's
    programs of the same names are not ours)."""
    progs = json.loads(subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True,
                                      check=True).stdout)  # fmt: skip
    mine = own_program_ids()
    return {p["name"]: (p.get("run_cnt", 0), p.get("run_time_ns", 0)) for p in progs if p["id"] in mine}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=50_000)
    ap.add_argument("syscalls", nargs="*", default=list(DATA_SYSCALLS))
    args = ap.parse_args()
    os.sched_setaffinity(0, {RUNNER_CPU})
    loop, _ = build()
    was = STATS.read_text().strip()
    STATS.write_text("1")
    rows = {}
    try:
        with Collector(CollectorConfig(selection=Selection(), ring_bytes=64 << 20)) as c:
            reader = Reader(c)
            reader.start()
            for syscall in args.syscalls:
                before = program_stats()
                proc = subprocess.Popen([str(loop), syscall, str(args.calls)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)  # fmt: skip
                os.sched_setaffinity(proc.pid, {LOOP_CPU})
                c.trace(proc.pid)
                proc.communicate("go\n", timeout=300)
                after = program_stats()
                for name in (f"enter_{syscall}", f"exit_{syscall}"):
                    runs = after[name][0] - before.get(name, (0, 0))[0]
                    spent = after[name][1] - before.get(name, (0, 0))[1]
                    rows[name] = {"runs": runs, "avg_ns": round(spent / runs) if runs else None}
            reader.stop.set()
            reader.join()
    finally:
        STATS.write_text(was)
    print(f"{'program':18} {'runs':>8} {'avg ns':>7}")
    for name, r in rows.items():
        print(f"{name:18} {r['runs']:>8} {r['avg_ns']:>7}")
    print(json.dumps({"benchmark": "hook_times", "calls": args.calls, "programs": rows}))


if __name__ == "__main__":
    main()
