#!/usr/bin/env python3
"""Several servers on one ClickHouse store, next to one server.

  same     the traces two servers sharing a ClickHouse store write, span by span, against
           one server on the embedded DuckDB store, from the same spans shipped the same
           way (tests/clusterreplay.py: real ingest and linkers, a virtual clock; each
           agent's batches go to the servers in turn). On the synthetic shop, and on every
           spans.jsonl given (bench/accuracy's recordings: there each process is taken for
           its own host, as if every service ran on a machine of its own), and on the
           original DeepTrace's published spans (--external, bench/accuracy/external.py;
           there each service has its own address, taken as its host).
  link     accept + link + write on ClickHouse at --rate spans/s for --seconds virtual
           seconds of the shop spread over --agents hosts: one server process, then two
           (each accepts every other batch; each links the agents it owns), in step, a
           virtual second at a time. Per process: CPU-seconds per 1,000 spans; the rate is
           spans over the busy time of the slowest process (what the servers could sustain);
           clickhouse-server's CPU-seconds per 1,000 spans beside it.

    .venv/bin/python bench/server/cluster.py [--rate 10000] [--seconds 30] [--agents 16]
                                             [--same bench/accuracy/out/.../spans.jsonl ...]
                                             [--external rps100-spans.json ...]

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import queue
import random
import sys
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from clickhouse import clickhouse_server
from clusterreplay import differences, linked, replay, servers_on
from stores import _clickhouse_pid, per_1000
from synth import shop_spans

from deeptrace.server.cluster import owner
from deeptrace.server.store.clickhouse_store import ClickHouseStore
from deeptrace.server.store.duckdb_store import DuckDBStore

SECOND = 10**9
T0 = 1_750_000_000 * SECOND  # 2025: before the server's clock, as an agent's spans are


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def spread_shop(n_traces: int, seconds: int, agents: int, seed: int = 5) -> list[dict]:
    """The shop's traces over `agents` hosts: each trace's gateway on one host, its backend
    on another (so every call crosses hosts)."""
    spans = shop_spans(n_traces, T0, T0 + seconds * SECOND, random.Random(seed))
    half = max(1, agents // 2)
    for k in range(0, len(spans), 4):
        pair = (k // 4) % half
        for d in spans[k:k + 4]:
            d["host"] = f"front-{pair}" if d["host"] == "h1" else f"back-{pair}"
    return spans


def by_host(d: dict) -> str:
    return f"agent-{d['host']}"


def by_pid(d: dict) -> str:
    return f"agent-{d['host']}-{d['pid']}"


def same(name: str, spans: list[dict], agent_of, port: int) -> dict:
    t0 = time.perf_counter()
    one = DuckDBStore(":memory:")
    replay(servers_on([one], header_ids=False), copy.deepcopy(spans), agent_of)
    single = linked(one, spans)
    t1 = time.perf_counter()
    url = f"clickhouse://127.0.0.1:{port}/same_{uuid.uuid4().hex[:8]}"
    stores = [ClickHouseStore(url), ClickHouseStore(url)]
    agents = {agent_of(d) for d in spans}
    # Two server names between which the agents split (with three agents, one pair of names
    # may give all three to one server, and then nothing crosses servers).
    ids = next(p for p in ([f"s{k}", f"s{k + 1}"] for k in range(0, 100, 2))
               if len({owner(a, p) for a in agents}) == 2 or len(agents) < 2)  # fmt: skip
    servers = servers_on(stores, ids, header_ids=False)
    replay(servers, copy.deepcopy(spans), agent_of)
    two = linked(stores[0], spans)
    diff = differences(single, two)
    owned = Counter(s.membership.server_id for s in servers for a in {agent_of(d) for d in spans}
                    if s.membership.owns(a))  # fmt: skip
    result = {"workload": name, "spans": len(spans), "agents": len({agent_of(d) for d in spans}),
              "agents_per_server": dict(owned), "single_written": len(single), "two_written": len(two),
              "differences": len(diff), "differing_keys": dict(Counter(str(k) for _, k, *_ in diff)),
              "cross_server_joins": sum(s.linker.stats.remote_callers for s in servers),
              "single_s": round(t1 - t0, 1), "two_s": round(time.perf_counter() - t1, 1)}  # fmt: skip
    for s in stores:
        s.close()
    log(f"same {name}: {result}")
    return result


def _link_worker(index: int, ids: list[str], url: str, args: dict, barrier, finished, results) -> None:
    """One server: accepts every len(ids)-th batch, links the agents it owns. As in a real
    server, a pass starts a second after the last one ended: the virtual clock moves on by a
    second and what the step (accepting the batches due, a pass) really took. The servers
    take their steps together (a barrier), so neither runs ahead of the other."""
    import gzip

    spans = spread_shop(args["rate"] * args["seconds"] // 4, args["seconds"], args["agents"])
    spans.sort(key=lambda d: d["end_ns"])
    store = ClickHouseStore(url)
    (server,) = servers_on([store], [ids[index]])
    server.membership.servers = sorted(ids)
    now = T0 + SECOND
    server.linker.clock = lambda: now
    latencies: list[tuple[int, float]] = []  # (end, seconds from end to written)
    server.linker.on_published.append(lambda out: latencies.extend((d["end_ns"], (now - d["end_ns"]) / SECOND)
                                                                   for d in out))  # fmt: skip
    i, turn, busy, cpu = 0, 0, 0.0, 0.0
    stop = T0 + (args["seconds"] + 30) * SECOND
    while True:
        j = i
        while j < len(spans) and spans[j]["end_ns"] + SECOND <= now:
            j += 1
        batches = defaultdict(list)
        for d in spans[i:j]:
            batches[by_host(d)].append(d)
        bodies = []  # what the agents send: made before the clock starts
        for agent, batch in sorted(batches.items()):
            if turn % len(ids) == index:
                body = {"agent_id": agent, "batch_id": f"{agent}-{now}", "spans": batch}
                bodies.append(gzip.compress(json.dumps(body).encode(), 1))
            turn += 1
        i = j
        t_wall, t_cpu = time.perf_counter(), time.process_time()
        for body in bodies:
            server.accept(body, "gzip")
        server.linker._pass(final=False)
        took = time.perf_counter() - t_wall
        busy += took
        cpu += time.process_time() - t_cpu
        now += SECOND + int(took * SECOND)
        finished[index] = now > stop
        barrier.wait(timeout=600)
        if all(finished):  # every server's clock is past the end: all stop at the same step
            break
        barrier.wait(timeout=600)
    s = server.linker.stats
    # Keeping up: spans that end late in the run are written as soon after they end as early ones.
    third, warm = args["seconds"] * SECOND // 3, T0 + 15 * SECOND  # the window is full after hold + context
    early = sorted(x for e, x in latencies if warm <= e < warm + third)
    late = sorted(x for e, x in latencies if e >= T0 + args["seconds"] * SECOND - third)
    results.put({"server": ids[index], "published": s.spans_published, "busy_s": busy, "cpu_s": cpu,
                 "virtual_s": (now - T0) / SECOND, "remote_callers": s.remote_callers,
                 "never_stored": s.callers_never_stored,
                 "latency_p50_early_s": _q(early, 0.5), "latency_p50_late_s": _q(late, 0.5),
                 "latency_p99_late_s": _q(late, 0.99),
                 "held": len(server.linker.assoc.pending) + len(server.linker.assoc.waiting)})  # fmt: skip
    store.close()


def _q(xs: list[float], q: float) -> float | None:
    return round(xs[min(len(xs) - 1, int(len(xs) * q))], 1) if xs else None


def link(n_servers: int, rate: int, port: int, ch_pid: int, args: dict) -> dict:
    url = f"clickhouse://127.0.0.1:{port}/link_{uuid.uuid4().hex[:8]}"
    ClickHouseStore(url).close()  # tables made once, before the servers race to make them
    ids = [f"server-{k}" for k in range(n_servers)]
    ctx = mp.get_context("fork")
    barrier, finished, results = ctx.Barrier(n_servers), ctx.Array("b", n_servers), ctx.Queue()
    args = {**args, "rate": rate}
    procs = [ctx.Process(target=_link_worker, args=(k, ids, url, args, barrier, finished, results)) for k in range(n_servers)]
    ch0 = _cpu_of(ch_pid)
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    out = []
    while len(out) < len(procs):
        if not any(p.is_alive() for p in procs) and results.empty():
            raise SystemExit(f"a server process failed: exit codes {[p.exitcode for p in procs]}")
        try:
            out.append(results.get(timeout=1))
        except queue.Empty:
            pass
    for p in procs:
        p.join()
    wall = time.perf_counter() - t0
    total = sum(r["published"] for r in out)
    ch_cpu = _cpu_of(ch_pid) - ch0
    result = {"servers": n_servers, "rate": rate, "spans": total, "wall_s": round(wall, 1),
              "per_server": [{**r, "busy_s": round(r["busy_s"], 2), "cpu_s": round(r["cpu_s"], 2),
                              "busy_share": round(r["busy_s"] / r["virtual_s"], 2),
                              "cpu_s_per_1000": per_1000(r["cpu_s"], r["published"]),
                              "spans_per_cpu_s": round(r["published"] / r["cpu_s"])} for r in out],
              "clickhouse_cpu_s_per_1000": per_1000(ch_cpu, total)}  # fmt: skip
    log(f"link, {n_servers} server(s) at {rate:,} spans/s: {result}")
    return result


def _cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 1/100 s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=10_000, help="spans per virtual second, all servers together")
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--agents", type=int, default=16)
    ap.add_argument("--same", nargs="*", default=[], help="spans.jsonl files to compare one and two servers on")
    ap.add_argument("--same-spans", type=int, default=20_000, help="of each file, the first (by end)")
    ap.add_argument("--external", nargs="*", default=[], help="the original DeepTrace's rpsN-spans.json files")
    ap.add_argument("--skip-link", action="store_true")
    ap.add_argument("--skip-same", action="store_true", help="not even the shop's comparison")
    args = ap.parse_args()
    out = {"same": [], "link": []}
    with clickhouse_server() as port:
        if not args.skip_same:
            out["same"].append(same("shop", spread_shop(2000, 60, args.agents), by_host, port))
        for path in args.same:
            with open(path) as f:
                spans = sorted((json.loads(line) for line in f), key=lambda d: d["end_ns"])[:args.same_spans]
            out["same"].append(same(str(Path(path).parent.relative_to(Path(path).parents[2])), spans, by_pid, port))
        for path in args.external:
            sys.path.insert(0, str(ROOT / "bench" / "accuracy"))
            from external import convert

            spans = convert(json.loads(Path(path).read_text())["spans"])[0]
            out["same"].append(same(f"original DeepTrace {Path(path).name}", spans, by_host, port))
        if not args.skip_link:
            ch_pid = _clickhouse_pid(port)
            params = {"seconds": args.seconds, "agents": args.agents}
            # One server at the rate and at twice it, two servers at twice it: do two keep up
            # with what one cannot?
            for n, rate in ((1, args.rate), (1, 2 * args.rate), (2, 2 * args.rate)):
                out["link"].append(link(n, rate, port, ch_pid, params))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
