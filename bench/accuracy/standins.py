"""Stand-in "algorithms". Two check the scorer itself: `oracle` links every span to its true
parent (every figure must come out 1.0, calibration error 0), `random` links each call to
any request of its process, with random confidence (figures must come out low). The others
are bounds: `oracle-timing` is `joint` with its model fitted on the truth, `oracle-siblings`
that with the gaps measured among the true siblings as well."""

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
    from deeptrace.association import joint
    from deeptrace.association.refine import refine

    class Fitted(joint.Inference):
        def _infer(self):
            _, slots, _, tables = self._learn(_true_rows(self, truth))
            assign = self._first_come()
            for _ in range(joint.ROUNDS):
                assign = self._assign(self._scored(tables, assign), slots)
            score = self._scored(tables, assign)
            assign = refine(self, tables, assign, score, self._ranked(score)[2], joint.CLEAR_MARGIN)
            return assign, self._scored(tables, assign), slots

    return _run(spans, Fitted)


def sibling_oracle(spans: list[dict], truth: Truth) -> list[dict]:
    """A looser bound than `oracle-timing`: the model fitted on the truth and every call's
    gaps measured among its *true* siblings (so the truth enters the features too), then
    one joint matching. What timing could reach if each request's other calls were known."""
    from deeptrace.association import joint

    class Fitted(joint.Inference):
        def _infer(self):
            score, slots, _, _ = self._learn(_true_rows(self, truth))
            return self._assign(score, slots), score, slots

    return _run(spans, Fitted)


def _true_rows(inf, truth: Truth) -> np.ndarray:
    """Each call's true request, as a row of the inference's servers (first come, first
    served where the truth knows none, e.g. DNS lookups)."""
    row_of = {s.span_id: r for r, s in enumerate(inf.process.servers)}
    fallback = inf._first_come()
    return np.array([row_of.get(truth.parent.get(c.span_id), fallback[i]) for i, c in enumerate(inf.calls)])


def _run(spans: list[dict], inference) -> list[dict]:
    from deeptrace.association import associate as pipeline
    from deeptrace.association import joint

    pipeline.ALGORITHMS["stand-in"] = lambda process: joint.link(process, inference)
    try:
        return pipeline.associate(spans, "stand-in", header_ids=False)
    finally:
        del pipeline.ALGORITHMS["stand-in"]



STANDINS = {"oracle": oracle, "random": random_parent, "oracle-timing": timing_oracle, "oracle-siblings": sibling_oracle}
