"""Association at scale: recorded spans tiled to ~1M and linked on one core.

Copies follow each other in time, a minute apart (further than any window association
looks across), so each copy is linked as the original was; ids, connection ids and TCP
sequence numbers are renumbered per copy so that no two copies can join.

    .venv/bin/python bench/accuracy/scale.py SPANS.jsonl [--spans 1000000] [--algorithm joint]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time

GAP_NS = 60_000_000_000
SEQ_STEP = 0x9E3779B1  # an odd step: copies' sequence numbers land far apart modulo 2^32
CONN_STEP = 1 << 40


def _shift_seq(seq, k: int):
    if not seq:
        return seq
    return [(x + k * SEQ_STEP) % (1 << 32) for x in seq]


def tile(spans: list[dict], target: int) -> list[dict]:
    """About `target` spans: as many time-shifted copies of `spans` as it takes."""
    start = min(d["start_ns"] for d in spans)
    period = max(d["end_ns"] for d in spans) - start + GAP_NS
    out: list[dict] = []
    for k in range(math.ceil(target / len(spans))):
        for d in spans:
            c = dict(d)
            c["span_id"] = f"{len(out):016x}"
            c["trace_id"], c["parent_span_id"] = None, None
            c["start_ns"] += k * period
            c["end_ns"] += k * period
            if isinstance(c.get("conn_id"), int):
                c["conn_id"] += k * CONN_STEP
            c["req_seq"], c["resp_seq"] = _shift_seq(c.get("req_seq"), k), _shift_seq(c.get("resp_seq"), k)
            out.append(c)
            if len(out) == target:
                return out
    return out


def time_association(spans: list[dict], target: int, algorithm: str = "joint", cpu: int = 0) -> dict:
    """Seconds to associate `target` tiled spans, pinned to one CPU."""
    from deeptrace.association.associate import associate

    tiled = tile(spans, target)
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        t0 = time.perf_counter()
        associate(tiled, algorithm, header_ids=False)
        seconds = time.perf_counter() - t0
    finally:
        os.sched_setaffinity(0, before)
    # A check of the tiling: a link between two copies means they were not kept apart.
    copy_of = {d["span_id"]: i // len(spans) for i, d in enumerate(tiled)}
    crossing = sum(
        1
        for i, d in enumerate(tiled)
        if d["parent_span_id"] and copy_of[d["parent_span_id"]] != i // len(spans)
    )
    return {"algorithm": algorithm, "spans": len(tiled), "copies": math.ceil(len(tiled) / len(spans)),
            "seconds": round(seconds, 2), "spans_per_s": round(len(tiled) / seconds),
            "seconds_per_1m": round(seconds / len(tiled) * 1e6, 1),
            "links_across_copies": crossing, "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("spans", help="a spans.jsonl the benchmark recorded")
    ap.add_argument("--spans", dest="target", type=int, default=1_000_000)
    ap.add_argument("--algorithm", default="joint")
    args = ap.parse_args()
    with open(args.spans) as f:
        spans = [json.loads(line) for line in f if line.strip()]
    print(json.dumps(time_association(spans, args.target, args.algorithm)))


if __name__ == "__main__":
    main()
