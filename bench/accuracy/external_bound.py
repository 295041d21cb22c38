#!/usr/bin/env python3
"""What timing alone can reach on the original DeepTrace's published spans: an exact search.

external.py scores our algorithms on those spans (three Go services: A calls B, then C,
once each, for every request). This asks how far *any* timing model could go there. It
fits the model on the truth itself, which no algorithm has: the densities of a request's
three gaps (its start to its first call, the first call's end to the second call's start,
the second call's end to its response; kernel density estimates) and how often each step
stays on the thread of the step before, against how often unrelated pairs do. Then, for
every burst of requests (those that overlap in time; the load there comes in bursts about
60 ms apart), it finds the most likely assignment of the burst's calls to its requests
exactly: every way of giving the first calls to the requests, each with the best way of
giving them the second calls (a linear assignment). No search can find a likelier one under
that model. It also counts the calls that lie outside their own request on the recorded
timestamps (responses the original agent paired with the wrong request on a connection):
no method that requires a call to lie inside its request can get those right.

    .venv/bin/python bench/accuracy/external_bound.py rps100-spans.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.stats import gaussian_kde

sys.path.insert(0, str(Path(__file__).resolve().parent))

from external import convert

THREAD_STEPS = ("request read -> first call sent", "first response read -> second call sent",
                "second response read -> response sent")  # fmt: skip


def bursts(requests: list[dict]) -> list[list[dict]]:
    """Requests in groups that overlap in time (a request that starts after every earlier one
    has ended begins a new group)."""
    out, end = [], -1
    for r in sorted(requests, key=lambda r: r["start_ns"]):
        if not out or r["start_ns"] > end:
            out.append([])
        out[-1].append(r)
        end = max(end, r["end_ns"])
    return out


def _steps(r: dict, first: dict, second: dict) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    gaps = (
        first["start_ns"] - r["start_ns"],
        second["start_ns"] - first["end_ns"],
        r["end_ns"] - second["end_ns"],
    )
    same = (first["tid"] == r["tid"], second["tid"] == first["resp_tid"], r["resp_tid"] == second["resp_tid"])
    return gaps, same


def bound(spans: list[dict], truth: dict[str, str | None]) -> dict:
    entry = Counter(s["pid"] for s in spans if s["kind"] == "CLIENT" and s["protocol"] == "http").most_common(
        1
    )[0][0]
    requests = [s for s in spans if s["pid"] == entry and s["kind"] == "SERVER"]
    calls = [s for s in spans if s["pid"] == entry and s["kind"] == "CLIENT" and s["protocol"] == "http"]
    by_id = {s["span_id"]: s for s in spans}
    made = defaultdict(list)
    for c in calls:
        if truth.get(c["span_id"]):
            made[truth[c["span_id"]]].append(c)
    # The callee of each request's first and second call, as the truth has them.
    order = Counter(
        tuple(c["raddr"] for c in sorted(cs, key=lambda c: c["start_ns"])) for cs in made.values()
    )
    (callee_1, callee_2), _ = order.most_common(1)[0]
    fitted = [
        _steps(by_id[r], *sorted(cs, key=lambda c: c["start_ns"])) for r, cs in made.items() if len(cs) == 2
    ]
    density = [gaussian_kde(np.array([g[i] for g, _ in fitted]) / 1e3) for i in range(3)]
    same_true = np.array([[s[i] for _, s in fitted] for i in range(3)]).mean(axis=1)
    groups = bursts(requests)
    # How often a step stays on one thread between a request and calls that are not its own.
    same_any = np.zeros(3)
    n_any = 0
    for group in groups:
        lo, hi = group[0]["start_ns"], max(r["end_ns"] for r in group)
        inside = [c for c in calls if lo <= c["start_ns"] <= hi]
        for r, a, b in itertools.product(group, inside, inside):
            if a is not b:
                same_any += _steps(r, a, b)[1]
                n_any += 1
    same_any /= max(n_any, 1)

    def log_p(step: int, gap: int, same: bool) -> float:
        p_gap = float(density[step](gap / 1e3)[0]) + 1e-12
        p_thread = same_true[step] / same_any[step] if same else (1 - same_true[step]) / (1 - same_any[step])
        return np.log(p_gap) + (np.log(p_thread) if use_threads else 0.0)

    out = {"requests": len(requests), "callees": [callee_1, callee_2], "bursts": len(groups),
           "largest_burst": max(len(g) for g in groups),
           "thread_same_true": dict(zip(THREAD_STEPS, same_true.round(3).tolist())),
           "thread_same_unrelated": dict(zip(THREAD_STEPS, same_any.round(3).tolist()))}  # fmt: skip
    for use_threads in (False, True):
        right = 0
        for group in groups:
            lo, hi = group[0]["start_ns"], max(r["end_ns"] for r in group)
            inside = [c for c in calls if lo <= c["start_ns"] <= hi]
            firsts = [c for c in inside if c["raddr"] == callee_1]
            seconds = [c for c in inside if c["raddr"] == callee_2]
            if len(firsts) != len(group) or len(seconds) != len(group):
                continue  # calls missing or extra: the burst counts as wrong
            n = len(group)
            a1 = np.array(
                [
                    [log_p(0, f["start_ns"] - r["start_ns"], f["tid"] == r["tid"]) for f in firsts]
                    for r in group
                ]
            )
            a2 = np.array(
                [
                    [log_p(1, s["start_ns"] - f["end_ns"], s["tid"] == f["resp_tid"]) for s in seconds]
                    for f in firsts
                ]
            )
            a3 = np.array(
                [
                    [log_p(2, r["end_ns"] - s["end_ns"], r["resp_tid"] == s["resp_tid"]) for s in seconds]
                    for r in group
                ]
            )
            best = None
            for perm in itertools.permutations(range(n)):
                cost = a2[list(perm)] + a3  # request i with first call perm[i], against each second call
                rows, cols = linear_sum_assignment(-cost)
                total = a1[range(n), perm].sum() + cost[rows, cols].sum()
                if best is None or total > best[0]:
                    best = (total, perm, cols)
            _, perm, cols = best
            for i, r in enumerate(group):
                right += (
                    truth.get(firsts[perm[i]]["span_id"])
                    == r["span_id"]
                    == truth.get(seconds[cols[i]]["span_id"])
                )
        out["exact_with_threads" if use_threads else "exact_gaps_only"] = round(right / len(requests), 4)
    outside = [c for c in calls if truth.get(c["span_id"]) and not (
        by_id[truth[c["span_id"]]]["start_ns"] <= c["start_ns"] and c["end_ns"] <= by_id[truth[c["span_id"]]]["end_ns"])]  # fmt: skip
    out["calls_outside_their_request"] = len(outside)
    out["ceiling_for_containment"] = round(1 - len({truth[c["span_id"]] for c in outside}) / len(requests), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    args = ap.parse_args()
    for path in args.files:
        spans, truth, _ = convert(json.loads(path.read_text())["spans"])
        print(json.dumps({"benchmark": "accuracy-external-bound", "file": path.name, **bound(spans, truth)}))


if __name__ == "__main__":
    main()
