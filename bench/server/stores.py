#!/usr/bin/env python3
"""The server on each store, side by side: the embedded DuckDB file and ClickHouse (a real
clickhouse-server, Debian's 18.16, started here on a temporary directory).

  ingest   spans/s through the ingest path in process (gunzip, parse, check, durable accept),
           1,000-span batches; CPU-seconds per 1,000 spans of this process (the server's
           share) and of clickhouse-server; and over HTTP into a real `deeptrace server`
           from 4 concurrent uploaders
  write    spans/s of linked spans into the spans table, 5,000 at a time (the linker's writes)
  queries  at --spans stored spans (one hour of a 4-span shop trace), through a real
           `deeptrace server` over HTTP: trace by id, searches, the service map; p50/p99

Linking itself (association) does not touch the store: bench/server/run.py measures it.

    .venv/bin/python bench/server/stores.py [--spans 300000] [--ingest-spans 200000] [--queries 50]

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import run
from clickhouse import clickhouse_server
from synth import shop_spans

from deeptrace.server.store.clickhouse_store import ClickHouseStore
from deeptrace.server.store.duckdb_store import DuckDBStore


def _clickhouse_pid(port: int) -> int:
    """The clickhouse-server process listening on `port` (for its CPU time)."""
    import subprocess

    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True).stdout
    return int(out.split("pid=")[1].split(",")[0])


def per_1000(cpu_s: float, spans: int) -> float:
    return round(cpu_s / spans * 1000, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spans", type=int, default=300_000, help="stored spans for the queries")
    ap.add_argument("--ingest-spans", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=50, help="queries per kind")
    ap.add_argument("--clickhouse-queries-only", type=int, default=None, metavar="SPANS",
                    help="only the queries, on ClickHouse alone, at this many stored spans (e.g. 10000000)")
    args = ap.parse_args()
    if args.clickhouse_queries_only:
        with tempfile.TemporaryDirectory(prefix="dt-stores-") as t, clickhouse_server() as port:
            url = f"clickhouse://127.0.0.1:{port}/queries_{uuid.uuid4().hex[:8]}"
            r = run.bench_queries(Path(t), args.clickhouse_queries_only, args.queries, 0, url)
            for q, v in r.items():
                if isinstance(v, dict):
                    print(f"clickhouse {q}: p50 {v['p50_ms']} ms, p99 {v['p99_ms']} ms", file=sys.stderr)
            print(json.dumps({"benchmark": "server-stores-queries", "clickhouse": r}))
        return
    run.pin_to_one_core()
    now = time.time_ns()
    spans = shop_spans(args.ingest_spans // 4, now - 3600 * 10**9, now, random.Random(3), linked=True)
    results: dict = {"benchmark": "server-stores", "ingest_spans": len(spans), "stored_spans": args.spans}
    with tempfile.TemporaryDirectory(prefix="dt-stores-") as t, clickhouse_server() as port:
        tmp = Path(t)
        ch_pid = _clickhouse_pid(port)

        def clickhouse(name: str) -> ClickHouseStore:
            return ClickHouseStore(f"clickhouse://127.0.0.1:{port}/{name}_{uuid.uuid4().hex[:8]}")

        for name, make in (("duckdb", lambda phase: DuckDBStore(tmp / f"{phase}.duckdb")), ("clickhouse", clickhouse)):
            row = {}
            for phase, bench in (("ingest", run.bench_ingest_in_process), ("write", run.bench_write)):
                store = make(phase)
                ch0 = run._proc_cpu(ch_pid)
                r = bench(spans, tmp, store)
                r["cpu_s_per_1000_spans"] = per_1000(r.get("cpu_s", 0), len(spans))
                if name == "clickhouse":
                    r["clickhouse_cpu_s_per_1000_spans"] = per_1000(run._proc_cpu(ch_pid) - ch0, len(spans))
                row[phase] = r
                print(f"{name:10} {phase:6}: {r['spans_per_s']:>9,} spans/s, {r['cpu_s_per_1000_spans']} CPU-s per "
                      f"1,000 spans here, {r.get('clickhouse_cpu_s_per_1000_spans', '-')} in clickhouse-server",
                      file=sys.stderr)  # fmt: skip
            http_url = None if name == "duckdb" else f"clickhouse://127.0.0.1:{port}/http_{uuid.uuid4().hex[:8]}"
            r = row["ingest_http"] = run.bench_ingest_http(spans, tmp, 4, http_url)
            r["server_cpu_s_per_1000_spans"] = per_1000(r["server_cpu_s"], r["spans"])
            print(f"{name:10} ingest over HTTP, 4 uploaders: {r['spans_per_s']:>9,} spans/s, "
                  f"{r['server_cpu_s_per_1000_spans']} CPU-s per 1,000 spans in the server", file=sys.stderr)  # fmt: skip
            url = None if name == "duckdb" else f"clickhouse://127.0.0.1:{port}/queries_{uuid.uuid4().hex[:8]}"
            print(f"{name:10} queries at {args.spans:,} stored spans", file=sys.stderr)
            row["queries"] = run.bench_queries(tmp, args.spans, args.queries, 0, url)
            for q, v in row["queries"].items():
                if isinstance(v, dict):
                    print(f"{name:10}   {q}: p50 {v['p50_ms']} ms, p99 {v['p99_ms']} ms", file=sys.stderr)
            results[name] = row
    print(json.dumps(results))


if __name__ == "__main__":
    main()
