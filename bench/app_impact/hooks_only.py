#!/usr/bin/env python3
"""What the kernel side alone costs a saturated nginx: the agent's programs attached and a
reader that only empties the rings (no spans, no output), against no agent at all, and
against the least any tracer that reads payloads in the kernel would do.

Same nginx and wrk set-up as run.py (1 worker, 592-byte page, wrk -t1 -c16). Phases, in one
run on one nginx process, repeated: none, hooks with exchanges assembled in the kernel
(HTTP/1), hooks with every call as a record, the minimal capture of bench/overhead
(minimal.bpf.c: look the process up, keep the buffer, copy 128 bytes into a ring), none
again. The readers run in this process, on their own thread, as the agent's would. What it
prints: requests/s of each phase and its ratio to the mean of the two phases without hooks,
what the reader drained, and any drops. The gap between this and run.py's full agent is the
agent's user space; the gap between this and 1.0 is the hooks' (and the draining's) share of
the machine; the minimal phase's gap is what no payload-reading design avoids.

Run as root from the repository root (about a minute at 5-second phases):

    .venv/bin/python bench/app_impact/hooks_only.py [--seconds 5] [--repeats 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import struct
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # the same set-up as the full benchmark
    Processes,
    accepting,
    free_port,
    nginx_server,
    progress,
    wait_for,
    wrk_load,
)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from deeptrace.agent.collector import Collector, CollectorConfig
from deeptrace.agent.libbpf import BpfObject
from deeptrace.agent.selection import Selection


def with_hooks(pid: int, port: int, seconds: float, assemble: tuple[str, ...]) -> dict:
    """wrk for `seconds` while the programs are attached to nginx and a thread drains the rings."""
    config = CollectorConfig(selection=Selection([pid], [], False), assemble=assemble)
    with Collector(config) as col:
        drained, stop = [0, 0], threading.Event()

        def drain() -> None:
            while not stop.is_set():
                drained[0] += len(col.poll(timeout_s=0.05))
                drained[1] += len(col.poll_exchanges())

        reader = threading.Thread(target=drain)
        reader.start()
        try:
            load = wrk_load(port, seconds)
        finally:
            stop.set()
            reader.join()
        drops = {k: v for k, v in col.counters().items() if k.startswith("drop_") and v}
    return {"rps": round(load.rps, 1), "requests": load.requests, "records": drained[0], "exchanges": drained[1],
            "drops": drops}  # fmt: skip


def overhead_bench():
    """bench/overhead/run.py, which builds minimal.bpf.c and reads its ring (its name is this
    directory's run.py's too)."""
    spec = importlib.util.spec_from_file_location("overhead_run", ROOT / "bench" / "overhead" / "run.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def with_minimal(pids: set[int], port: int, seconds: float) -> dict:
    """wrk for `seconds` while minimal.bpf.c captures nginx's calls and a thread drains its ring."""
    overhead = overhead_bench()
    MinimalReader, reading = overhead.MinimalReader, overhead.reading
    with BpfObject(overhead.build()[1]["minimal"]) as obj:
        obj.load()
        obj.attach_all()
        traced = obj.map("TRACED")
        for pid in pids:
            traced.update(struct.pack("<I", pid), struct.pack("<I", 1))
        with reading(MinimalReader(obj), lambda pid: None) as state:
            load = wrk_load(port, seconds)
    return {"rps": round(load.rps, 1), "requests": load.requests, "records": state.records}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each phase")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="deeptrace-hooks-only-") as d, Processes() as procs:
        tmp = Path(d)
        tmp.chmod(0o755)
        port = free_port()
        server = procs.start(nginx_server(tmp, port), tmp / "server.log")
        wait_for("nginx", lambda: accepting(port), server, tmp / "server.log", 15)
        for i in range(args.repeats):
            a1 = wrk_load(port, args.seconds).rps
            progress(f"repeat {i + 1}: none {a1:,.0f}/s")
            ex = with_hooks(server.pid, port, args.seconds, ("http1",))
            progress(f"repeat {i + 1}: hooks, exchanges {ex['rps']:,.0f}/s")
            rec = with_hooks(server.pid, port, args.seconds, ())
            progress(f"repeat {i + 1}: hooks, records {rec['rps']:,.0f}/s")
            workers = {int(c) for c in Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()}
            least = with_minimal({server.pid} | workers, port, args.seconds)
            progress(f"repeat {i + 1}: minimal capture {least['rps']:,.0f}/s")
            a2 = wrk_load(port, args.seconds).rps
            progress(f"repeat {i + 1}: none {a2:,.0f}/s")
            base = (a1 + a2) / 2
            rows.append({"none_rps": [round(a1, 1), round(a2, 1)], "exchanges": ex, "records": rec, "minimal": least,
                         "exchanges_ratio": round(ex["rps"] / base, 3), "records_ratio": round(rec["rps"] / base, 3),
                         "minimal_ratio": round(least["rps"] / base, 3)})  # fmt: skip
    print(f"{'repeat':>6} {'none req/s':>12} {'exchanges':>10} {'ratio':>6} {'records':>10} {'ratio':>6} "
          f"{'minimal':>10} {'ratio':>6}  drained / drops")  # fmt: skip
    for i, r in enumerate(rows, 1):
        ex, rec, least = r["exchanges"], r["records"], r["minimal"]
        print(f"{i:>6} {sum(r['none_rps']) / 2:>12,.0f} {ex['rps']:>10,.0f} {r['exchanges_ratio']:>6.3f} "
              f"{rec['rps']:>10,.0f} {r['records_ratio']:>6.3f} {least['rps']:>10,.0f} {r['minimal_ratio']:>6.3f}  "
              f"exchanges {ex['exchanges']:,} + records {ex['records']:,} / {ex['drops'] or 0}; records "
              f"{rec['records']:,} / {rec['drops'] or 0}; minimal {least['records']:,}")  # fmt: skip
    print("ratio: requests/s with the hooks and a drain-only reader / mean of the runs without, around it")
    print(json.dumps({"benchmark": "app_impact_hooks_only", "phase_seconds": args.seconds, "repeats": rows}))


if __name__ == "__main__":
    main()
