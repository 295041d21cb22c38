"""Two stand-in "algorithms" that check the scorer itself: `oracle` links every span to its
true parent (every figure must come out 1.0, calibration error 0), `random` links each call
to any request of its process, with random confidence (figures must come out low)."""

from __future__ import annotations

import random
from collections import defaultdict

from truth import Truth


def oracle(spans: list[dict], truth: Truth) -> list[dict]:
    for d in spans:
        d["parent_span_id"] = truth.parent.get(d["span_id"])
        d["link_confidence"] = 1.0
    return spans


def random_parent(spans: list[dict], truth: Truth, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    requests = defaultdict(list)
    for d in spans:
        if d["kind"] == "SERVER":
            requests[d["pid"]].append(d["span_id"])
    for d in spans:
        options = requests[d["pid"]] if d["kind"] == "CLIENT" else []
        d["parent_span_id"] = rng.choice(options) if options else None
        d["link_confidence"] = rng.random()
    return spans


STANDINS = {"oracle": oracle, "random": random_parent}
