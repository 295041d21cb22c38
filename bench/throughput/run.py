#!/usr/bin/env python3
"""How many records per second the agent's Python reader decodes on one core.

Two measurements, in one run:

  stepped   a load generator on CPU 1 makes paced 64-byte writes (plus one large
            read per 128 writes) at increasing rates; the reader (this process,
            pinned to CPU 0, default 16 MiB ring) decodes every record into Record
            objects. Per step: records/s the kernel produced, records/s decoded,
            ring-buffer drops. The answer is the highest rate with zero drops.
  decode    the generator fills a large ring while the reader is idle, then the
            reader drains it: the pure decode rate of ring -> Record on one core.

Run as root from the repository root:

    .venv/bin/python bench/throughput/run.py [--seconds 3] [--quick]

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from deeptrace.agent.collector import Collector, CollectorConfig
from deeptrace.agent.selection import Selection

HERE = Path(__file__).parent
TARGET = 100_000
RATES = (25_000, 50_000, 100_000, 150_000, 200_000, 300_000, 400_000, 600_000)
READER_CPU, LOAD_CPU = 0, 1


def build() -> Path:
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    exe, src = out / "load", HERE / "load.c"
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(src)], check=True)
    return exe


def start_load(c: Collector, exe: Path, rate: int, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([str(exe), str(rate), str(seconds)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    os.sched_setaffinity(proc.pid, {LOAD_CPU})  # before its start line
    c.trace(proc.pid)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return proc


def stepped(exe: Path, seconds: float, rates) -> list[dict]:
    steps = []
    with Collector(CollectorConfig(selection=Selection())) as c:
        for rate in rates:
            before = c.counters()
            decoded = 0
            proc = start_load(c, exe, rate, seconds)
            t0 = time.perf_counter()
            while proc.poll() is None:
                decoded += len(c.poll(timeout_s=0.05))
            while c.received and (batch := c.poll(timeout_s=0.2)):  # what is left in the ring
                decoded += len(batch)
            load = json.loads(proc.stdout.read())
            after = c.counters()
            produced = after["submitted"] - before["submitted"]
            drops = after["drop_ringbuf_full"] - before["drop_ringbuf_full"]
            step = {
                "target_writes_per_s": rate,
                "records_per_s": round((produced + drops) / load["seconds"]),
                "decoded_per_s": round(decoded / load["seconds"]),
                "records": produced + drops,
                "decoded": decoded,
                "drops": drops,
                "wall_s": round(time.perf_counter() - t0, 2),
            }
            steps.append(step)
            print(f"  {rate:>8} writes/s -> {step['records_per_s']:>8} records/s produced, "
                  f"{step['decoded_per_s']:>8} decoded/s, drops {drops}", file=sys.stderr)  # fmt: skip
            if drops:
                break
    return steps


def decode_rate(exe: Path, seconds: float) -> dict:
    with Collector(CollectorConfig(selection=Selection(), ring_bytes=256 << 20)) as c:
        proc = start_load(c, exe, 0, seconds)  # as fast as it can, nobody reading
        proc.wait()
        queued = c.counters()["submitted"]
        t0 = time.perf_counter()
        decoded = 0
        while batch := c.poll(timeout_s=0):
            decoded += len(batch)
        dt = time.perf_counter() - t0
        return {
            "records": decoded,
            "queued": queued,
            "drops": c.counters()["drop_ringbuf_full"],
            "seconds": round(dt, 3),
            "records_per_s": round(decoded / dt),
            "ns_per_record": round(dt / decoded * 1e9),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each stepped run")
    ap.add_argument("--quick", action="store_true", help="1-second steps")
    args = ap.parse_args()
    if args.quick:
        args.seconds = 1.0
    if os.cpu_count() < 2:
        raise SystemExit("needs two CPUs: one for the reader, one for the load")
    os.sched_setaffinity(0, {READER_CPU})
    exe = build()

    print("stepped load (reader on CPU 0, load on CPU 1, 16 MiB ring):", file=sys.stderr)
    steps = stepped(exe, args.seconds, RATES)
    clean = [s for s in steps if s["drops"] == 0]
    best = max(clean, key=lambda s: s["records_per_s"]) if clean else None
    first_drop = next((s for s in steps if s["drops"]), None)
    dec = decode_rate(exe, 0.25 if args.quick else 0.5)

    print(f"{'writes/s':>10} {'records/s':>10} {'decoded/s':>10} {'drops':>8}")
    for s in steps:
        print(f"{s['target_writes_per_s']:>10} {s['records_per_s']:>10} {s['decoded_per_s']:>10} {s['drops']:>8}")
    best_rate = best["records_per_s"] if best else 0
    print(f"highest rate with zero drops: {best_rate} records/s"
          + (f"; first drops at {first_drop['records_per_s']} records/s" if first_drop else
             " (no step dropped: the load generator's ceiling was reached first)"))  # fmt: skip
    print(f"pure decode rate (ring -> Record, one core): {dec['records_per_s']} records/s "
          f"({dec['ns_per_record']} ns/record, {dec['records']} records)")
    print(f"target >= {TARGET} records/s with no drops -> {'met' if best_rate >= TARGET else 'NOT met'}")
    print(json.dumps({
        "benchmark": "throughput", "step_seconds": args.seconds, "steps": steps,
        "max_zero_drop_records_per_s": best_rate,
        "first_drop_records_per_s": first_drop["records_per_s"] if first_drop else None,
        "decode": dec, "target_records_per_s": TARGET, "target_met": best_rate >= TARGET,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
