#!/usr/bin/env python3
"""The server's budgets, measured in one run:

  ingest      spans/s through the ingest path on one core (gunzip, parse, check every span,
              durable insert into the embedded store), in process, 1,000-span batches; and the
              same over HTTP into a real `deeptrace server` from 4 concurrent uploaders.
  write       spans/s of linked spans into the store's spans table (what the linker does).
  link        the linker's loop (streaming association, `joint`) on a virtual clock at several
              arrival rates: its busy share of one core and how long after a span ends it is
              published.
  queries     at --spans stored spans (default 1M, one hour of a 4-span shop trace), through a
              real server over HTTP: trace by id, filtered searches, the service map over the
              hour; p50/p99 of each.
  ui          at the same store, in headless Chromium: seconds from navigation until each view
              of the web UI (searches, a waterfall, the service map, a time series) is drawn.

Run from the repository root:

    .venv/bin/python bench/server/run.py [--spans 1000000] [--link-rates 2000,5000,7500,10000]
                                         [--ui-loads 10] [--quick]

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

from browser import browser_unavailable_reason, chromium
from serverproc import ServerProcess
from synth import shop_spans

from deeptrace.agent import selfstats
from deeptrace.association.streaming import StreamingAssociator
from deeptrace.server import ingest
from deeptrace.server.app import ServerConfig
from deeptrace.server.cluster import store_batch
from deeptrace.server.linker import PASS_INTERVAL_S
from deeptrace.server.store.duckdb_store import DuckDBStore

HOUR_NS = 3600 * 10**9


def pin_to_one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})


def gz_batches(spans: list[dict], size: int, agent: str = "bench") -> list[bytes]:
    return [gzip.compress(json.dumps({"agent_id": agent, "batch_id": uuid.uuid4().hex,
                                      "spans": spans[i:i + size]}).encode(), 1)  # fmt: skip
            for i in range(0, len(spans), size)]


def bench_ingest_in_process(spans: list[dict], tmp: Path, store=None) -> dict:
    """Into `store` (default: a new DuckDB file in tmp), which is closed after."""
    store = store or DuckDBStore(tmp / "ingest.duckdb")
    bodies = gz_batches(spans, 1000)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for raw in bodies:
        store_batch(store, ingest.read_batch(raw, "gzip"), time.time_ns())
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    store.close()
    return {"spans": len(spans), "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "spans_per_s": round(len(spans) / wall), "spans_per_cpu_s": round(len(spans) / cpu)}  # fmt: skip


def bench_ingest_http(spans: list[dict], tmp: Path, uploaders: int = 4, store_url: str | None = None) -> dict:
    """Into a real server on a DuckDB file in tmp, or on the store at `store_url`."""
    # A hold longer than the spans are old keeps the linker out of the way (with an hour's
    # hold, the spans of an hour ago fell due during the run, and every pass linked the whole
    # window: 40% of the server's time): this measures what ingest accepts.
    srv = ServerProcess(tmp / "http.duckdb", args=("--hold", "86400"), store=store_url).start()
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


def bench_write(spans: list[dict], tmp: Path, store=None) -> dict:
    """Into `store` (default: a new DuckDB file in tmp), which is closed after."""
    store = store or DuckDBStore(tmp / "write.duckdb")
    t0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(0, len(spans), 5000):
        store.write_spans(spans[i:i + 5000], [])
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    store.close()
    return {"spans": len(spans), "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "spans_per_s": round(len(spans) / wall), "spans_per_cpu_s": round(len(spans) / cpu)}  # fmt: skip


def bench_link(rate: int, seconds: int, ship_delay_s: float = 1.0) -> dict:
    """The server's linker loop on a virtual clock, with the server's defaults (hold, context,
    pass interval): spans arrive at `rate` per second, each `ship_delay_s` after it ended (the
    agent's batching); a pass runs the linker's interval after the previous one finished, and
    the clock moves on by what the pass really took. Keeping up means spans come out a steady
    time after they end, not later and later."""
    t_start = 10**18
    sec = 10**9
    spans = shop_spans(rate * seconds // 4, t_start, t_start + seconds * sec, random.Random(5))
    spans.sort(key=lambda d: d["end_ns"])
    server = ServerConfig()
    assoc = StreamingAssociator(server.algorithm, hold_s=server.hold_s, context_s=server.context_s)
    now, i, busy, passes, latencies = t_start, 0, 0.0, 0, []
    warm = t_start + int((server.hold_s + server.context_s) * sec)  # the window is full from here on
    while now < t_start + seconds * sec:
        now += int(PASS_INTERVAL_S * sec)
        j = i
        while j < len(spans) and spans[j]["end_ns"] + ship_delay_s * sec <= now:
            j += 1
        assoc.push(spans[i:j])
        i = j
        t0 = time.perf_counter()
        out = assoc.pop_ready(now)
        took = time.perf_counter() - t0
        busy, passes, now = busy + took, passes + 1, now + int(took * sec)
        latencies += [(now - d["end_ns"]) / sec for d in out if d["end_ns"] >= warm]
    latencies.sort()
    elapsed = (now - t_start) / sec
    return {"rate": rate, "seconds": seconds, "passes": passes, "busy_share": round(busy / elapsed, 3),
            "cpu_us_per_span": round(busy / max(1, assoc.stats.spans_out) * 1e6, 1),
            "held_at_end": len(assoc.pending),
            "latency_p50_s": round(latencies[len(latencies) // 2], 2) if latencies else None,
            "latency_p99_s": round(latencies[int(len(latencies) * 0.99)], 2) if latencies else None}  # fmt: skip


def fill_store(store, n_spans: int, end_ns: int) -> list[str]:
    """n spans of one hour of shop traffic, written already linked (the store is closed
    after); returns the trace ids."""
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
    return _percentiles(times)


# What a person opens, and what shows it is drawn: each view a fresh page load.
UI_VIEWS = {
    "search_last_hour": ("#/traces", "#results[data-state=ready]"),
    "search_service_error": ("#/traces?service=checkout&status=error", "#results[data-state=ready]"),
    "search_longest_first": ("#/traces?sort=duration", "#results[data-state=ready]"),
    "search_attribute": ("#/traces?attr=http.response.status_code%3D409", "#results[data-state=ready]"),
    "trace_waterfall": ("#/trace/{trace_id}", "#waterfall[data-state=ready]"),
    "service_map_1h": ("#/map", "#service-map[data-state=ready]"),
    "service_time_series": ("#/map?node=checkout", "#map-charts[data-points]"),
}


def bench_ui(url: str, trace_ids: list[str], n: int) -> dict:
    """Seconds from navigation until each view is drawn, in headless Chromium."""
    reason = browser_unavailable_reason()
    if reason is not None:
        print(f"  UI views not timed: {reason}", file=sys.stderr)
        return {"skipped": reason}
    rng, out = random.Random(4), {}
    with chromium() as browser:
        page = browser.new_context(viewport={"width": 1440, "height": 900}).new_page()
        page.set_default_timeout(60_000)
        for name, (hash_, ready) in UI_VIEWS.items():
            times = []
            for _ in range(n):
                page.goto("about:blank")
                t0 = time.perf_counter()
                page.goto(url + "/" + hash_.format(trace_id=rng.choice(trace_ids)))
                page.wait_for_selector(ready)
                times.append((time.perf_counter() - t0) * 1000)
            out[name] = _percentiles(times)
            print(f"  {name}: p50 {out[name]['p50_ms']} ms", file=sys.stderr)
    return out


def _percentiles(times: list[float]) -> dict:
    times = sorted(times)
    n = len(times)
    return {"n": n, "p50_ms": round(statistics.median(times), 1),
            "p99_ms": round(times[min(n - 1, int(n * 0.99))], 1), "max_ms": round(times[-1], 1)}  # fmt: skip


def bench_queries(tmp: Path, n_spans: int, n_queries: int, ui_loads: int, store_url: str | None = None) -> dict:
    """Through a real server on a DuckDB file in tmp, or on the store at `store_url`."""
    from deeptrace.server.store import open_store

    end_ns = time.time_ns()
    db = tmp / "queries.duckdb"
    t0 = time.perf_counter()
    trace_ids = fill_store(open_store(store_url or str(db)), n_spans, end_ns)
    fill_s = time.perf_counter() - t0
    srv = ServerProcess(db, store=store_url).start()
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
                "timeseries_1h_service": timed(lambda i: c.get("/api/v1/timeseries", params={
                    "service": "checkout", "start_ns": start, "end_ns": end_ns, "step_s": 60}), max(5, n_queries // 5)),
                "timeseries_1h_edge": timed(lambda i: c.get("/api/v1/timeseries", params={
                    "source": "gateway", "target": "checkout", "start_ns": start, "end_ns": end_ns, "step_s": 60}),
                    max(5, n_queries // 5)),
            }  # fmt: skip
        out["db_bytes"] = srv.get("/api/v1/status").json()["store"]["bytes_on_disk"]
        if ui_loads:
            print(f"UI views at {len(trace_ids):,} stored traces, {ui_loads} page loads each", file=sys.stderr)
            out["ui"] = bench_ui(srv.url, trace_ids, ui_loads)
        return out
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spans", type=int, default=1_000_000, help="stored spans for the query benchmark")
    ap.add_argument("--ingest-spans", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=100, help="queries per kind")
    ap.add_argument("--link-rates", type=lambda v: [int(x) for x in v.split(",")], default=[2000, 5000, 7500, 10000],
                    help="arrival rates (spans/s) for the linker, comma separated")
    ap.add_argument("--link-seconds", type=int, default=40, help="virtual seconds of arrivals per rate")
    ap.add_argument("--ui-loads", type=int, default=10, help="page loads per UI view (0: do not time the UI)")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.spans, args.ingest_spans, args.queries, args.ui_loads = 40_000, 20_000, 20, 2
        args.link_rates, args.link_seconds = [2000], 20
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
        results["link"] = []
        for rate in args.link_rates:
            print(f"linking at {rate:,} spans/s for {args.link_seconds} s (virtual clock)", file=sys.stderr)
            results["link"].append(bench_link(rate, args.link_seconds))
            print(f"  {json.dumps(results['link'][-1])}", file=sys.stderr)
        os.sched_setaffinity(0, pinned)
        print(json.dumps(results, indent=1), file=sys.stderr)
        print("ingest over HTTP: 4 uploaders -> deeptrace server", file=sys.stderr)
        results["ingest_http"] = bench_ingest_http(spans, tmp)
        print(json.dumps(results["ingest_http"]), file=sys.stderr)
        print(f"queries at {args.spans:,} stored spans", file=sys.stderr)
        results["queries"] = bench_queries(tmp, args.spans, args.queries, args.ui_loads)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
