#!/usr/bin/env python3
"""The server's budgets, measured in one run:

  ingest      spans/s through the ingest path on one core (gunzip, parse, check every span,
              durable insert into the embedded store), in process, 1,000-span batches; and the
              same over HTTP into a real `deeptrace server` from 4 concurrent uploaders.
  write       spans/s of linked spans into the store's spans table (what the linker does).
  link        spans/s through the streaming associator (the linker's other half).
  queries     at --spans stored spans (default 1M, one hour of a 4-span shop trace), through a
              real server over HTTP: trace by id, filtered searches, the service map over the
              hour; p50/p99 of each.

Run from the repository root:

    .venv/bin/python bench/server/run.py [--spans 1000000] [--quick]

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from serverproc import ServerProcess
from synth import shop_spans

from deeptrace.agent import selfstats
from deeptrace.association.streaming import StreamingAssociator
from deeptrace.server import ingest
from deeptrace.server.store.duckdb_store import DuckDBStore

HOUR_NS = 3600 * 10**9


def pin_to_one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})


def gz_batches(spans: list[dict], size: int, agent: str = "bench") -> list[bytes]:
    return [gzip.compress(json.dumps({"agent_id": agent, "batch_id": uuid.uuid4().hex,
                                      "spans": spans[i:i + size]}).encode(), 1)  # fmt: skip
            for i in range(0, len(spans), size)]


def bench_ingest_in_process(spans: list[dict], tmp: Path) -> dict:
    store = DuckDBStore(tmp / "ingest.duckdb")
    bodies = gz_batches(spans, 1000)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for raw in bodies:
        batch = ingest.read_batch(raw, "gzip")
        store.accept_batch(batch.agent_id, batch.batch_id, batch.body_gz, len(batch.spans), time.time_ns())
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    store.close()
    return {"spans": len(spans), "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "spans_per_s": round(len(spans) / wall), "spans_per_cpu_s": round(len(spans) / cpu)}  # fmt: skip


def bench_ingest_http(spans: list[dict], tmp: Path, uploaders: int = 4) -> dict:
    # A long hold keeps the linker out of the way: this measures what ingest accepts.
    srv = ServerProcess(tmp / "http.duckdb", args=("--hold", "3600")).start()
    bodies = gz_batches(spans, 1000)
    headers = {"Authorization": f"Bearer {srv.token}", "Content-Encoding": "gzip", "Content-Type": "application/json"}
    queue, failures = list(bodies), []
    lock = threading.Lock()

    def upload():
        with httpx.Client(timeout=60) as client:
            while True:
                with lock:
                    if not queue:
                        return
                    raw = queue.pop()
                r = client.post(srv.url + "/api/v1/spans", content=raw, headers=headers)
                if r.status_code != 200:
                    failures.append(r.status_code)

    cpu0 = _proc_cpu(srv.proc.pid)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=upload) for _ in range(uploaders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, _proc_cpu(srv.proc.pid) - cpu0
    accepted = srv.get("/api/v1/status").json()["ingest"]["spans"]
    srv.stop()
    return {"spans": accepted, "failures": len(failures), "wall_s": round(wall, 3), "server_cpu_s": round(cpu, 3),
            "spans_per_s": round(accepted / wall), "spans_per_server_cpu_s": round(accepted / cpu)}  # fmt: skip


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        return selfstats.cpu_seconds(f.read())


def bench_write(spans: list[dict], tmp: Path) -> dict:
    store = DuckDBStore(tmp / "write.duckdb")
    t0 = time.perf_counter()
    for i in range(0, len(spans), 5000):
        store.write_spans(spans[i:i + 5000], [])
    wall = time.perf_counter() - t0
    store.close()
    return {"spans": len(spans), "wall_s": round(wall, 3), "spans_per_s": round(len(spans) / wall)}


def bench_link(spans: list[dict]) -> dict:
    """Spans pushed a second's worth at a time, linked as the server's linker does."""
    assoc = StreamingAssociator("joint", hold_s=5, context_s=10)
    spans = sorted((dict(d) for d in spans), key=lambda d: d["end_ns"])
    t0, out = time.perf_counter(), 0
    i = 0
    while i < len(spans):
        second = spans[i]["end_ns"] + 10**9
        j = i
        while j < len(spans) and spans[j]["end_ns"] < second:
            j += 1
        assoc.push(spans[i:j])
        out += len(assoc.pop_ready(second))
        i = j
    out += len(assoc.close(spans[-1]["end_ns"] + 10**9))
    wall = time.perf_counter() - t0
    return {"spans": out, "wall_s": round(wall, 3), "spans_per_s": round(out / wall)}


def fill_store(path: Path, n_spans: int, end_ns: int) -> list[str]:
    """n spans of one hour of shop traffic, written already linked; returns the trace ids."""
    store = DuckDBStore(path)
    trace_ids, made = [], 0
    rng = random.Random(1)
    while made < n_spans:
        chunk = shop_spans(min(50_000, n_spans - made) // 4, end_ns - HOUR_NS, end_ns, rng, linked=True)
        store.write_spans(chunk, [])
        trace_ids += list({d["trace_id"] for d in chunk})
        made += len(chunk)
        print(f"  stored {made:,} spans", file=sys.stderr, end="\r")
    print(file=sys.stderr)
    store.close()
    return trace_ids


def timed(get, n: int) -> dict:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        r = get(i)
        times.append((time.perf_counter() - t0) * 1000)
        assert r.status_code == 200, r.text
    times.sort()
    return {"n": n, "p50_ms": round(statistics.median(times), 1),
            "p99_ms": round(times[min(n - 1, int(n * 0.99))], 1), "max_ms": round(times[-1], 1)}  # fmt: skip


def bench_queries(tmp: Path, n_spans: int, n_queries: int) -> dict:
    end_ns = time.time_ns()
    db = tmp / "queries.duckdb"
    t0 = time.perf_counter()
    trace_ids = fill_store(db, n_spans, end_ns)
    fill_s = time.perf_counter() - t0
    srv = ServerProcess(db).start()
    rng = random.Random(2)
    start = end_ns - HOUR_NS
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            c.get("/api/v1/traces", params={"start_ns": start, "end_ns": end_ns})  # warm the file cache
            out = {
                "stored_spans": n_spans, "stored_traces": len(trace_ids), "fill_s": round(fill_s, 1),
                "trace_by_id": timed(lambda i: c.get(f"/api/v1/traces/{rng.choice(trace_ids)}"), n_queries),
                "search_service_error": timed(lambda i: c.get("/api/v1/traces", params={
                    "service": "checkout", "status": "error", "start_ns": start, "end_ns": end_ns}), n_queries),
                "search_operation_min_duration": timed(lambda i: c.get("/api/v1/traces", params={
                    "service": "gateway", "operation": "POST /checkout", "min_duration_ms": 20,
                    "start_ns": start, "end_ns": end_ns}), n_queries),
                "search_attribute": timed(lambda i: c.get("/api/v1/traces", params={
                    "attr": "http.response.status_code=409", "start_ns": start, "end_ns": end_ns}), n_queries),
                "search_last_15_min": timed(lambda i: c.get("/api/v1/traces", params={
                    "start_ns": end_ns - HOUR_NS // 4, "end_ns": end_ns}), n_queries),
                "jaeger_search_20_traces": timed(lambda i: c.get("/api/traces", params={
                    "service": "gateway", "start": start // 1000, "end": end_ns // 1000, "limit": 20}),
                    max(5, n_queries // 5)),
                "service_map_1h": timed(lambda i: c.get("/api/v1/service-map", params={
                    "start_ns": start, "end_ns": end_ns}), max(5, n_queries // 5)),
            }  # fmt: skip
        out["db_bytes"] = db.stat().st_size
        return out
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spans", type=int, default=1_000_000, help="stored spans for the query benchmark")
    ap.add_argument("--ingest-spans", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=100, help="queries per kind")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.spans, args.ingest_spans, args.queries = 40_000, 20_000, 20
    now = time.time_ns()
    spans = shop_spans(args.ingest_spans // 4, now - 600 * 10**9, now, random.Random(3))
    results = {}
    with tempfile.TemporaryDirectory(prefix="deeptrace-bench-server-") as t:
        tmp = Path(t)
        print(f"ingest in process, one core: {len(spans):,} spans in 1,000-span gzip batches", file=sys.stderr)
        pinned = os.sched_getaffinity(0)
        pin_to_one_core()
        results["ingest_in_process"] = bench_ingest_in_process(spans, tmp)
        results["write_linked"] = bench_write(spans, tmp)
        results["link"] = bench_link(spans[: min(len(spans), 100_000)])
        os.sched_setaffinity(0, pinned)
        print(json.dumps(results, indent=1), file=sys.stderr)
        print("ingest over HTTP: 4 uploaders -> deeptrace server", file=sys.stderr)
        results["ingest_http"] = bench_ingest_http(spans, tmp)
        print(json.dumps(results["ingest_http"]), file=sys.stderr)
        print(f"queries at {args.spans:,} stored spans", file=sys.stderr)
        results["queries"] = bench_queries(tmp, args.spans, args.queries)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
