#!/usr/bin/env python3
"""Accuracy of trace association on real microservice workloads traced by the real agent.

Workloads (workloads.py): `shop`, five Python services of ours (aiohttp gateway, FastAPI
users, Flask/gunicorn gthread inventory, aiohttp orders, gRPC pricing) calling each other,
Redis and PostgreSQL over keep-alive pools; and `mesh`, one small service written in Go,
Java and Node.js with their standard libraries (foreign/), with an id in every request or
with none. No request id of a tracing system is anywhere on the wire. For each load level
(open-loop Poisson arrivals) the services run under `deeptrace agent`; each service logs
its own causal pairs (the ground truth); every association algorithm then links the
agent's spans with header_ids=False and is scored against that truth. Last, the shop's
highest level is tiled to 1M spans and linked on one core.

    sudo .venv/bin/python bench/accuracy/run.py [--workloads shop,go,java,node] [--levels ...] [--seconds 20]
    .venv/bin/python bench/accuracy/run.py --reuse bench/accuracy/out/run-...   # score again

Each level's data stays in OUT/WORKLOAD/rps-NNNN/ (spans.jsonl, truth.jsonl, load.json, logs).
Writes OUT/results.json and OUT/results.md, copies the Markdown to bench/accuracy/results.md,
and prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import report
import score
import truth
import workloads

# Requests/s: the shop saturates this 2-core machine at about 130; the mesh's a holds about
# 32 requests in flight at 400 (its leaves take 40 ms).
DEFAULT_LEVELS = {"shop": "10,50,100,150", "mesh": "25,100,200,400"}


def log(msg: str) -> None:
    print(f"[accuracy {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def record(out: Path, wl, levels: list[float], seconds: float, warmup: float) -> None:
    import infra
    import workload

    if os.geteuid() != 0:
        raise SystemExit("recording needs root (the agent loads eBPF programs): sudo .venv/bin/python ...")
    if not any((infra.ROOT / "src/deeptrace/agent/bpf").glob("*.bpf.o")):
        raise SystemExit("the BPF objects are not built: make bpf")
    wl.build(out.parent / "build")
    log(f"{wl.name}: starting what it needs besides its services")
    with wl.infra() as stores:
        for i, rate in enumerate(levels):
            log(f"{wl.name}: level {rate:g} req/s for {seconds:g} s" + (f" after {warmup:g} s of warm-up" if warmup else "")
                + ": services under the agent, load from outside")  # fmt: skip
            summary = workload.record_level(level_dir(out, rate), rate, seconds, stores, seed=i + 1, workload=wl,
                                            warmup=warmup)  # fmt: skip
            log(f"  sent {summary['sent']}, ok {summary['ok']} ({summary['achieved_rps']} req/s), "
                f"errors {summary['errors']}, in-flight mean {summary['inflight_mean']} peak {summary['inflight_peak']}")  # fmt: skip


def level_dir(out: Path, rate: float) -> Path:
    return out / f"rps-{rate:05g}"


def associate_timed(spans: list[dict], name: str, t: truth.Truth) -> tuple[list[dict], float]:
    from standins import STANDINS
    from streamed import STREAMED

    copies = [dict(d) for d in spans]  # associate() fills the dicts in place
    t0 = time.perf_counter()
    if name in STANDINS:
        linked = STANDINS[name](copies, t)
    elif name in STREAMED:
        linked = STREAMED[name](copies)
    else:
        from deeptrace.association.associate import associate

        linked = associate(copies, name, header_ids=False)
    return linked, time.perf_counter() - t0


def evaluate(out: Path, wl, algorithms: list[str]) -> list[dict]:
    levels = []
    for d in sorted(out.glob("rps-*"), key=lambda p: float(p.name[4:])):
        spans, records = truth.load_jsonl(d / "spans.jsonl"), truth.load_jsonl(d / "truth.jsonl")
        t = truth.build(spans, records, wl.root_service)
        cov = t.coverage
        log(f"{d.name}: {len(spans)} spans, {len(records)} truth records; {cov['records_mapped']} records on a span, "
            f"{cov['spans_with_truth']} spans with truth, {cov['complete_traces']}/{cov['requests']} complete traces")  # fmt: skip
        load = json.loads((d / "load.json").read_text())
        level = {"target_rps": float(d.name[4:]), "load": load, "cpu_cores": cpu_cores(load, records), "coverage": cov,
                 "algorithms": {}}  # fmt: skip
        for name in algorithms:
            linked, seconds = associate_timed(spans, name, t)
            r = score.score(linked, t)
            r["seconds"] = round(seconds, 3)
            r["seconds_per_10k"] = round(seconds / max(1, len(spans)) * 10_000, 3)
            level["algorithms"][name] = r
            log(f"  {name:12} pair {r['pair_accuracy']['all']}, calls {r['pair_accuracy']['calls']}, "
                f"trace {r['trace_accuracy']}, ECE {r['calibration_all']['ece']}, {seconds:.2f} s")  # fmt: skip
        levels.append(level)
    return levels


def run_scale(spans: Path, target: int) -> dict:
    """scale.py in its own process: its memory goes back when it is done (a million
    spans take gigabytes), and running out of it loses only this figure."""
    log(f"scale: {spans.parent.name} tiled to {target:,} spans, joint on one core")
    done = subprocess.run([sys.executable, str(HERE / "scale.py"), str(spans), "--spans", str(target)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        log(f"scale run failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        return {}
    return {"level": spans.parent.name, **json.loads(done.stdout.splitlines()[-1])}


def cpu_cores(load: dict, records: list[dict]) -> dict[str, float]:
    """Cores each service and the agent kept busy while the load ran: where the machine went."""
    service_of = {str(r["pid"]): r["service"] for r in records}
    cores: dict[str, float] = {}
    for pid, seconds in load["cpu_seconds"]["services"].items():
        name = service_of.get(pid, "other")  # the launcher, gunicorn's master
        cores[name] = cores.get(name, 0) + seconds / load["seconds"]
    cores["agent"] = load["cpu_seconds"]["agent"] / load["seconds"]
    return {k: round(v, 2) for k, v in cores.items()}


def main() -> None:
    from deeptrace.association.associate import ALGORITHMS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # About 130 requests/s saturate a 2-core machine (services and agent); 150 runs past it.
    ap.add_argument("--workloads", default="shop",
                    help="comma-separated: shop, and RUNTIME[-MIX[-MODE]] with runtime go, java or node, "
                         "mix seq or mix, mode fields or timing (go: every mix and mode)")  # fmt: skip
    ap.add_argument("--levels", help=f"requests/s, comma-separated (default: shop {DEFAULT_LEVELS['shop']}, "
                                     f"mesh {DEFAULT_LEVELS['mesh']})")  # fmt: skip
    ap.add_argument("--seconds", type=float, default=20.0, help="load duration of each level")
    ap.add_argument("--warmup", type=float,
                    help="seconds of the same load before each level's measured window, not scored "
                         "(default: the workload's, workloads.py: 15 for Java, else 0)")  # fmt: skip
    ap.add_argument("--out", type=Path, help="output directory (default: bench/accuracy/out/run-TIME)")
    ap.add_argument(
        "--reuse", type=Path, metavar="DIR", help="score the data of an earlier run, record nothing"
    )
    ap.add_argument("--algorithms", default=",".join([*ALGORITHMS, "joint-stream", "oracle-timing"]),
                    help="comma-separated; joint-stream is joint as the server runs it (streamed.py), "
                         "oracle-timing joint with its model fitted on the truth (standins.py)")  # fmt: skip
    ap.add_argument(
        "--standins", action="store_true", help="also score `oracle` and `random` (checks the scorer)"
    )
    ap.add_argument(
        "--scale-spans", type=int, default=1_000_000, help="spans for the one-core scale run (0: skip)"
    )
    ap.add_argument("--scale-level", type=float, help="the level (req/s) to tile (default: the highest)")
    args = ap.parse_args()
    algorithms = args.algorithms.split(",") + (["oracle", "random"] if args.standins else [])
    started = time.monotonic()

    if args.reuse:
        out = args.reuse
        if any(out.glob("rps-*")):  # a run from before there were several workloads: the shop's
            (out / "shop").mkdir(exist_ok=True)
            for d in out.glob("rps-*"):
                d.rename(out / "shop" / d.name)
        chosen = [workloads.by_name(d.name) for d in sorted(out.iterdir()) if any(d.glob("rps-*"))]
    else:
        out = (args.out or HERE / "out" / time.strftime("run-%Y%m%d-%H%M%S")).resolve()
        chosen = workloads.parse(args.workloads)
        for wl in chosen:
            kind = "shop" if wl.name == "shop" else "mesh"
            levels = [float(x) for x in (args.levels or DEFAULT_LEVELS[kind]).split(",")]
            (out / wl.name).mkdir(parents=True, exist_ok=True)
            warmup = wl.warmup if args.warmup is None else args.warmup
            (out / wl.name / "run.json").write_text(json.dumps({"levels": levels, "seconds": args.seconds,
                                                                "warmup": warmup}))  # fmt: skip
            record(out / wl.name, wl, levels, args.seconds, warmup)
    log(f"data in {out}; associating")
    results = {"workloads": []}
    for wl in chosen:
        result = {"name": wl.name, "workload": wl.description, "levels": evaluate(out / wl.name, wl, algorithms)}
        if not result["levels"]:
            raise SystemExit(f"no recorded levels (rps-*/) in {out / wl.name}")
        if args.scale_spans and wl.name == "shop":
            rate = args.scale_level or result["levels"][-1]["target_rps"]
            result["scale"] = run_scale(level_dir(out / wl.name, rate) / "spans.jsonl", args.scale_spans)
        results["workloads"].append(result)
    results["wall_seconds"] = round(time.monotonic() - started)
    print(report.write(results, out, HERE / "results.md"))
    print(json.dumps({"benchmark": "accuracy", "out": str(out), **results}))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the blocks that started things have stopped them on the way out
        log("interrupted: every process it started is stopped")
        sys.exit(130)
