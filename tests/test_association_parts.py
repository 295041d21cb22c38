"""The association's fast parts against the plain definitions they replace."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from spanmaker import client, server

from deeptrace.association.candidates import Containment
from deeptrace.association.features import shared_weights
from deeptrace.association.model import SpanRef


def refs(dicts: list[dict]) -> list[SpanRef]:
    return [SpanRef.from_json(i, d) for i, d in enumerate(dicts)]


intervals = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 5_000) | st.integers(0, 10**7)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(servers=intervals, calls=intervals)
def test_containment_finds_exactly_the_open_requests_latest_first(servers, calls):
    """Durations from nanoseconds to far longer than the rest: one long request must neither
    be missed nor make the others be missed."""
    ss = refs([server(1, start, start + dur) for start, dur in servers])
    index = Containment(ss)
    ordered = sorted(ss, key=lambda s: s.start_ns)  # stable: ties keep their input order
    for start, dur in calls:
        c = SpanRef.from_json(0, client(1, start, start + dur))
        want = [s for s in reversed(ordered) if s.start_ns <= c.start_ns and s.end_ns >= c.end_ns]
        assert [s.index for s in index.containing(c.start_ns, c.end_ns)] == [s.index for s in want]


field_sets = st.lists(st.frozensets(st.sampled_from([f"u{i}" for i in range(8)]), max_size=4), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(a=field_sets, b=field_sets, data=st.data())
def test_shared_weights_sum_the_idf_of_the_fields_both_carry(a, b, data):
    n = data.draw(st.integers(0, 30))
    pa = np.array(data.draw(st.lists(st.integers(0, len(a) - 1), min_size=n, max_size=n)), dtype=np.int64)
    pb = np.array(data.draw(st.lists(st.integers(0, len(b) - 1), min_size=n, max_size=n)), dtype=np.int64)
    documents = a + b
    frequency = {f: sum(f in d for d in documents) for d in documents for f in d}
    want = [sum(math.log(len(documents) + 1) - math.log(frequency[f] + 1) for f in a[i] & b[j])
            for i, j in zip(pa.tolist(), pb.tolist())]  # fmt: skip
    got = shared_weights(a, b, pa, pb)
    assert got.shape == (n,)
    assert np.allclose(got, want)
