#!/usr/bin/env python3
"""Average run time of each DeepTrace kernel program under real servers at saturation, with
the kernel assembling exchanges (`deeptrace agent`'s default) and with records only, from the
kernel's own BPF statistics (kernel.bpf_stats_enabled).

Each case runs its load twice against one server, once per mode (the two alternate, and the
whole is repeated); a drain thread empties both rings, making no spans, so that only the
kernel side is measured. Per program: runs, and ns per run; per mode: the kernel's ns per
request over all programs. The statistics add two clock reads per program run, so the
figures are a little high; compare the modes with each other.

    .venv/bin/python bench/overhead/real_hooks.py [--seconds 3] [--repeats 2]

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from hook_times import STATS, program_stats
from servers import free_port, nginx_conf, redis, serving, wait_port  # the test suite's server helpers

from deeptrace.agent.collector import Collector, CollectorConfig
from deeptrace.agent.selection import Selection

MODES = {"exchanges": ("http1", "redis"), "records": ()}


def nginx_server(directory: Path):
    port = free_port()
    conf = directory / "nginx.conf"
    conf.write_text(nginx_conf(directory, port, http="access_log off;"))
    return serving(["nginx", "-c", str(conf), "-e", str(directory / "error.log")], port), port


def wrk_load(port: int, seconds: float) -> int:
    out = subprocess.run(["wrk", "-t1", "-c16", f"-d{max(1, round(seconds))}s", f"http://127.0.0.1:{port}/hello"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return int(re.search(r"(\d+) requests in", out)[1])


def redis_load(port: int, seconds: float) -> int:
    n = int(20_000 * seconds)
    subprocess.run(["redis-benchmark", "-p", str(port), "-c", "16", "-n", str(n), "-t", "get,set", "-q"],
                   capture_output=True, check=True)  # fmt: skip
    return 2 * n


def traced_run(pid: int, assemble: tuple, load, port: int, seconds: float) -> tuple[int, dict]:
    """Requests made, and (runs, ns) per program, while `load` runs with pid traced."""
    with Collector(CollectorConfig(selection=Selection(), assemble=assemble)) as c:
        c.trace(pid)
        stop = threading.Event()

        def drain() -> None:
            while not stop.is_set():
                c.poll(timeout_s=0.05)
                c.poll_exchanges()

        reader = threading.Thread(target=drain)
        reader.start()
        try:
            before = program_stats()
            requests = load(port, seconds)
            after = program_stats()
        finally:
            stop.set()
            reader.join()
        lost = sum(c.drops().values())
    if lost:
        print(f"  ({lost} records or exchanges dropped)", file=sys.stderr)
    mine = {n for n in after if n.startswith(("enter_", "exit_"))}
    return requests, {n: (after[n][0] - before.get(n, (0, 0))[0], after[n][1] - before.get(n, (0, 0))[1]) for n in mine}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    was = STATS.read_text().strip()
    STATS.write_text("1")
    result = {}
    try:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            server, port = nginx_server(tmp)
            cases = [("nginx (wrk -c16)", server, port, wrk_load)]
            for name, server_ctx, port, load in cases:
                with server_ctx as pid:
                    wait_port(port)
                    result[name] = measure(pid, load, port, args)
            with redis(tmp) as (pid, port):
                result["redis (redis-benchmark -c16)"] = measure(pid, redis_load, port, args)
    finally:
        STATS.write_text(was)
    for case, modes in result.items():
        print(case)
        print(f"  {'program':16} " + " ".join(f"{m + ' ns/run':>18}" for m in modes))
        programs = sorted({p for m in modes.values() for p in m["programs"]})
        for p in programs:
            cells = [modes[m]["programs"].get(p, {}).get("ns_per_run") for m in modes]
            print(f"  {p:16} " + " ".join(f"{c if c is not None else '-':>18}" for c in cells))
        print("  kernel ns per request, all programs: "
              + ", ".join(f"{m} {modes[m]['ns_per_request']}" for m in modes))  # fmt: skip
    print(json.dumps({"benchmark": "real_hooks", "seconds": args.seconds, "repeats": args.repeats, "cases": result}))


def measure(pid: int, load, port: int, args) -> dict:
    totals = {m: [0, defaultdict(lambda: [0, 0])] for m in MODES}
    for _ in range(args.repeats):
        for mode, assemble in MODES.items():
            requests, programs = traced_run(pid, assemble, load, port, args.seconds)
            totals[mode][0] += requests
            for name, (runs, ns) in programs.items():
                totals[mode][1][name][0] += runs
                totals[mode][1][name][1] += ns
    out = {}
    for mode, (requests, programs) in totals.items():
        busy = {n: v for n, v in programs.items() if v[0] >= requests // 10}  # the programs this load runs
        out[mode] = {
            "requests": requests,
            "programs": {n: {"runs": r, "ns_per_run": round(ns / r)} for n, (r, ns) in sorted(busy.items())},
            "ns_per_request": round(sum(ns for _, ns in programs.values()) / max(requests, 1)),
        }
    return out


if __name__ == "__main__":
    main()
