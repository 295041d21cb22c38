#!/usr/bin/env python3
"""What saying where a process runs costs the agent (issue 16): the same captured traffic
replayed through the pipeline with no process context, and with the context a process in a
Kubernetes pod gets (cgroup id, container, pod, namespace, workload: a dozen attributes on
every span), alternately, several rounds. Both of the agent's paths: records -> spans (HTTP/1 framed
in user space) and kernel-assembled exchanges -> JSON lines (its default for HTTP/1).

Real traffic from a client we did not write: wrk against Debian's nginx, captured once by
the real collector.

    .venv/bin/python bench/spans/context.py [--seconds 3] [--rounds 3]

Prints one line per round and path, then a summary; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import capture, capture_exchanges, nginx, replay, replay_exchanges, wrk

from deeptrace.agent.containers import Container
from deeptrace.capture.pipeline import SpanPipeline
from deeptrace.capture.spans import ProcessInfo

CID = "a345febbc802776b73902d2f5a8b3d0208605dc4b734c28e851a1159f3a5b40b"
UID = "0b43b788-b6c8-0230-50e4-dc3fb6e0b3be"
# What agent/services.Processes gives a process of a Deployment's pod (agent/kube.py's keys).
POD = {
    **Container(f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice/"
                f"cri-containerd-{CID}.scope", 41873, "containerd", CID, UID, "Burstable").attributes(),
    "k8s.namespace.name": "shop", "k8s.pod.name": "checkout-7d4b9c8f6d-x2k9p", "k8s.node.name": "node-a",
    "k8s.deployment.name": "checkout", "k8s.workload.kind": "deployment", "k8s.workload.name": "checkout",
    "k8s.container.name": "checkout",
}  # fmt: skip


def pipelines():
    plain = lambda: SpanPipeline(host="bench")
    in_pod = lambda: SpanPipeline(host="bench", process_info=lambda pid, comm: ProcessInfo("checkout", tuple(POD.items())))
    return {"no context": plain, "pod context": in_pod}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds of wrk load captured")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (each: best of 3 replays)")
    args = ap.parse_args()
    print(f"capturing wrk against nginx for {args.seconds:g} s (records, then kernel exchanges)", file=sys.stderr)
    records = capture(nginx, wrk, args.seconds)
    events, wall = capture_exchanges(nginx, wrk, args.seconds)
    print(f"{len(records):,} records, {len(events):,} exchange events; {len(POD)} context attributes per span")
    results: dict[str, dict[str, list]] = {}
    for r in range(args.rounds):
        for name, make in pipelines().items():
            rec = replay(records, new_pipeline=make)
            exc = replay_exchanges(events, wall, new_pipeline=make)
            got = results.setdefault(name, {"records_per_s": [], "exchange_spans_per_s": [], "bytes_per_span": []})
            got["records_per_s"].append(rec["records_per_s"])
            got["exchange_spans_per_s"].append(exc["spans_per_s"])
            got["bytes_per_span"].append(exc["bytes_per_span"])
            print(f"round {r + 1} {name:>11}: records->spans {rec['records_per_s']:>8,} records/s "
                  f"({rec['spans']:,} spans); exchanges->JSON {exc['spans_per_s']:>8,} spans/s, "
                  f"{exc['bytes_per_span']} bytes/span")  # fmt: skip
    med = {n: {k: statistics.median(v) for k, v in got.items()} for n, got in results.items()}
    base, pod = med["no context"], med["pod context"]
    summary = {
        "records": len(records), "exchanges": len(events), "context_attributes": len(POD),
        "median": med,
        "records_path_ratio": round(pod["records_per_s"] / base["records_per_s"], 3),
        "exchange_path_ratio": round(pod["exchange_spans_per_s"] / base["exchange_spans_per_s"], 3),
        "bytes_per_span_added": round(pod["bytes_per_span"] - base["bytes_per_span"]),
    }  # fmt: skip
    print(f"pod context / no context, medians of {args.rounds} rounds: records path "
          f"{summary['records_path_ratio']}, exchanges path {summary['exchange_path_ratio']}; "
          f"+{summary['bytes_per_span_added']} bytes per JSON span")  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
