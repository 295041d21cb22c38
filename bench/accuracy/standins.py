"""Stand-in "algorithms". Two check the scorer itself: `oracle` links every span to its true
parent (every figure must come out 1.0, calibration error 0), `random` links each call to
any request of its process, with random confidence (figures must come out low). The third,
`oracle-timing`, is a bound: `joint` with its model fitted on the truth."""

from __future__ import annotations

import random

import numpy as np
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



def timing_oracle(spans: list[dict], truth: Truth) -> list[dict]:
    """`joint` with its model fitted on the truth: every likelihood ratio and call pattern
    learnt from the true parents, then its own inference, where the truth enters no
    feature (a call's gaps are measured among the siblings inference gave it). What our
    model reaches when learning is perfect: the bound the issue's "oracle" asks for."""
    from deeptrace.association import associate as pipeline
    from deeptrace.association import joint
    from deeptrace.association.refine import refine

    class Fitted(joint.Inference):
        def _infer(self):
            row_of = {s.span_id: r for r, s in enumerate(self.process.servers)}
            fallback = self._first_come()
            true = np.array([row_of.get(truth.parent.get(c.span_id), fallback[i]) for i, c in enumerate(self.calls)])
            _, slots, _, tables = self._learn(true)
            assign = fallback
            for _ in range(joint.ROUNDS):
                score = sum(t[v] for t, (v, *_) in zip(tables, self._features(assign)))
                assign = self._assign(score, slots)
            score = sum(t[v] for t, (v, *_) in zip(tables, self._features(assign)))
            assign = refine(self, tables, assign, score, self._ranked(score)[2], joint.CLEAR_MARGIN)
            return assign, sum(t[v] for t, (v, *_) in zip(tables, self._features(assign))), slots

    pipeline.ALGORITHMS["oracle-timing"] = lambda process: joint.link(process, Fitted)
    try:
        return pipeline.associate(spans, "oracle-timing", header_ids=False)
    finally:
        del pipeline.ALGORITHMS["oracle-timing"]



STANDINS = {"oracle": oracle, "random": random_parent, "oracle-timing": timing_oracle}
