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


def _parsed_span(conn, request: bytes, response: bytes) -> SpanRef:
    """A span exactly as the agent writes it, from a real parser, read back as association reads it."""
    from parsing import chunk

    from deeptrace.capture.spans import Endpoint, make_span

    (req,) = conn.feed(True, chunk(request))
    resp = [m for m in conn.feed(False, chunk(response, t=5))][-1]
    span = make_span("SERVER", Endpoint("svc", "h", 1, "10.0.0.1", 80, "10.0.0.2", 5000, 1), req, resp)
    return SpanRef.from_json(0, span.to_json_dict())


def test_fields_of_real_http1_spans_leave_propagated_ids_out():
    """The protocol names here once were "http1" while spans said "http": propagated ids
    counted as transaction fields even with header ids turned off."""
    from deeptrace.association.features import request_fields
    from deeptrace.protocols.http1 import Http1Connection

    ref = _parsed_span(Http1Connection(),
                       b"POST /orders/ord-98765 HTTP/1.1\r\nHost: shop-7\r\nX-Request-ID: req-12345\r\n"
                       b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"
                       b"Content-Length: 17\r\n\r\n{\"user\":\"u-4242\"}",
                       b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")  # fmt: skip
    fields = request_fields(ref)
    assert {"ord-98765", "u-4242"} <= fields
    assert not any("12345" in f or "4bf92f" in f for f in fields), fields
    assert "shop-7" in fields  # other headers may carry what a request is about


def test_fields_of_real_http2_spans_leave_propagated_ids_out():
    import hpack
    from test_http2 import SETTINGS, request_bytes, response_bytes

    from deeptrace.association.features import request_fields
    from deeptrace.protocols.http2 import PREFACE, Http2Connection

    enc = hpack.Encoder()
    request = PREFACE + SETTINGS + request_bytes(enc, 1, "/orders/ord-98765", b'{"user":"u-4242"}', grpc=False)
    ref = _parsed_span(Http2Connection(), request, SETTINGS + response_bytes(hpack.Encoder(), 1))
    assert {"ord-98765", "u-4242"} <= request_fields(ref)
    head = b":path: /orders/ord-98765\nx-request-id: req-12345\ntraceparent: 00-4bf92f35-00f067aa-01\n\nbody-77"
    ref.req_head, ref.req_fields = head, None
    assert request_fields(ref) == {"ord-98765", "body-77"}


def test_fields_of_real_redis_spans_are_the_arguments():
    from deeptrace.association.features import request_fields
    from deeptrace.protocols.redis import RedisConnection

    ref = _parsed_span(RedisConnection(), b"*2\r\n$3\r\nGET\r\n$11\r\ncart:u-4242\r\n", b"$2\r\nok\r\n")
    assert request_fields(ref) == {"u-4242"}


def test_fields_of_real_postgres_spans_hold_binary_parameters_and_row_values():
    """psycopg 3 and asyncpg send integer parameters in binary: "WHERE id = $1" with 31337
    carries the user id of a request for /users/31337 only once it is read as a number.
    (On the shop, 47 of 69 wrong calls at 50 requests/s were such SELECTs: the span's head
    was the Parse alone.)"""
    import struct

    from test_postgres import READY, connected, msg

    from deeptrace.association.features import request_fields, span_fields

    bind = msg(b"B", b"\0\0" + struct.pack("!hhhii", 1, 1, 1, 4, 31337))
    batch = msg(b"P", b"\0SELECT name FROM users WHERE id = $1\0\0\0") + bind + msg(b"E", bytes(5)) + msg(b"S", b"")
    reply = msg(b"1", b"") + msg(b"2", b"") + msg(b"D", b"\0\x01\0\0\0\x09ord-77001") + msg(b"C", b"SELECT 1\0") + READY
    conn = connected()
    ref = _parsed_span(conn, batch, reply)
    assert "31337" in request_fields(ref)
    assert "ord-77001" in span_fields(ref)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_postgres_fields_of_arbitrary_bytes_never_raise(head):
    from deeptrace.association.features import _postgres_fields

    assert all(isinstance(v, str) for v in _postgres_fields(b"B" + head))


def test_candidate_pairs_at_once_are_those_found_one_call_at_a_time():
    """Containment.pairs (joint inference, all calls at once) and Containment.containing
    (the baselines, one call at a time) must find the same candidates in the same order."""
    rng = np.random.default_rng(7)
    starts = rng.integers(0, 10_000, 400)
    lengths = rng.choice([5, 50, 500, 5_000], 400)
    servers = [SpanRef.from_json(i, server(1, int(a), int(a + n))) for i, (a, n) in enumerate(zip(starts, lengths))]
    servers[5].start_ns = servers[6].start_ns  # ties keep their order
    call_starts = rng.integers(0, 11_000, 300) * 1000
    call_ends = call_starts + rng.integers(0, 3_000, 300) * 1000
    contain = Containment(servers)
    call, found = contain.pairs(call_starts, call_ends)
    for c, (a, b) in enumerate(zip(call_starts.tolist(), call_ends.tolist())):
        assert [servers[i].index for i in found[call == c]] == [s.index for s in contain.containing(a, b)]



def test_association_pauses_the_cycle_collector_and_gives_it_back(monkeypatch):
    """Paused while linking (it walks millions of objects that never form cycles), and
    resumed after, but never by a call that found it paused already."""
    import gc

    from deeptrace.association import associate as module

    seen = []
    real = module.seq_join
    monkeypatch.setattr(module, "seq_join", lambda *a, **k: seen.append(gc.isenabled()) or real(*a, **k))
    spans = [server(1, 0, 1_000), client(1, 100, 200)]
    was = gc.isenabled()
    try:
        gc.enable()
        module.associate([dict(s) for s in spans], "joint")
        assert gc.isenabled() and seen == [False]
        gc.disable()
        module.associate([dict(s) for s in spans], "joint")
        assert not gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()
