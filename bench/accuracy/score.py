"""How right an association is, against the ground truth (truth.py).

- pair accuracy: spans whose predicted parent is the true one (a correct "no parent"
  counts), over every span with known truth, and per kind of link: `calls` (a CLIENT span
  to the request that made it, inside one process: where the algorithms differ), `cross`
  (a callee's SERVER span to its caller's CLIENT span) and `roots` (gateway requests).
- trace accuracy: requests whose whole tree came out exactly right: every span in it has
  its true parent and no other span with known truth hangs from it (spans without truth,
  e.g. Go's DNS lookups, are neither required nor held against it).
- calibration: link_confidence against how often links at that confidence are right, in
  10 bins; the expected calibration error (weighted mean gap) and the largest gap over
  bins holding at least MIN_BIN links.
"""

from __future__ import annotations

from collections import defaultdict

from truth import Truth

BINS = 10
MIN_BIN = 50


def pair_accuracy(predicted: dict[str, str | None], truth: Truth) -> dict[str, float | None]:
    right: dict[str, list[bool]] = defaultdict(list)
    for sid, true_parent in truth.parent.items():
        ok = predicted.get(sid) == true_parent
        right["all"].append(ok)
        right[truth.kind[sid]].append(ok)
    return {k: _share(right.get(k, [])) for k in ("all", "calls", "cross", "roots")} | {
        "n": len(right["all"])
    }


def trace_accuracy(predicted: dict[str, str | None], truth: Truth) -> float | None:
    children: dict[str, list[str]] = defaultdict(list)
    for sid, parent in predicted.items():
        if parent is not None:
            children[parent].append(sid)
    # A child with no known truth (a DNS lookup no service logs) is not held against a trace.
    exact = [
        all(predicted.get(sid) == truth.parent[sid] and all(c in ids or c not in truth.parent for c in children[sid])
            for sid in ids)
        for ids in truth.traces
    ]  # fmt: skip
    return _share(exact)


def calibration(confidence: dict[str, float], right: dict[str, bool]) -> dict:
    bins: list[list[tuple[float, bool]]] = [[] for _ in range(BINS)]
    for sid, ok in right.items():
        c = confidence.get(sid)
        if c is not None:
            bins[min(BINS - 1, int(c * BINS))].append((c, ok))
    n = sum(len(b) for b in bins)
    ece, max_gap, table = 0.0, 0.0, []
    for i, b in enumerate(bins):
        if not b:
            continue
        conf = sum(c for c, _ in b) / len(b)
        acc = sum(ok for _, ok in b) / len(b)
        ece += len(b) / n * abs(conf - acc)
        if len(b) >= MIN_BIN:
            max_gap = max(max_gap, abs(conf - acc))
        table.append({"bin": f"{i / BINS:.1f}-{(i + 1) / BINS:.1f}", "n": len(b), "confidence": round(conf, 4),
                      "accuracy": round(acc, 4)})  # fmt: skip
    return {"ece": round(ece, 4) if n else None, "max_gap": round(max_gap, 4) if n else None, "bins": table}


def score(linked: list[dict], truth: Truth) -> dict:
    """Every figure for one association of one level's spans."""
    predicted = {d["span_id"]: d.get("parent_span_id") for d in linked}
    confidence = {d["span_id"]: d.get("link_confidence") for d in linked}
    right = {sid: predicted.get(sid) == p for sid, p in truth.parent.items()}
    calls = {sid: ok for sid, ok in right.items() if truth.kind[sid] == "calls"}
    return {
        "pair_accuracy": pair_accuracy(predicted, truth),
        "trace_accuracy": trace_accuracy(predicted, truth),
        "traces": len(truth.traces),
        "calibration_all": calibration(confidence, right),
        "calibration_calls": calibration(confidence, calls),
    }


def _share(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None
