"""Apache Dubbo (dubbo protocol, hessian2): messages built from the specifications by
tests/thriftsvc/dubbo_wire.py (its own hessian2 writer, not the parser's reader), and live
between a small provider and consumer speaking them over a real socket, traced by pid."""

from __future__ import annotations

import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from parsing import chunk, exchange, feed_alternating, feed_split
from thriftsvc import others
from thriftsvc.dubbo_wire import SERVICE, h_int, h_string, header, heartbeat, request, response

from deeptrace.capture.pipeline import SpanPipeline
from deeptrace.protocols import thrift
from deeptrace.protocols.dubbo import DubboConnection, frame_request, starts_request, starts_response
from deeptrace.protocols.framing import Frame

WIRE = Path(__file__).parent / "thriftsvc" / "dubbo_wire.py"
HELLO = request(7, "sayHello", "Ljava/lang/String;", h_string("world"), {"token": "s3cr3t"})


def test_request_fields_and_pairing_by_id():
    req, resp = exchange(DubboConnection(), HELLO, response(7, h_string("hello world")))
    assert (req.name, req.pair_key, req.size, req.expects_response) == (f"dubbo {SERVICE}/sayHello", 7, len(HELLO), True)
    assert req.attributes == {"rpc.system": "apache_dubbo", "rpc.service": SERVICE, "rpc.method": "sayHello",
                              "rpc.apache_dubbo.service_version": "1.0.0", "rpc.apache_dubbo.version": "2.0.2",
                              "rpc.apache_dubbo.serialization": "hessian2",
                              "rpc.apache_dubbo.parameter_types": "Ljava/lang/String;"}  # fmt: skip
    assert (resp.pair_key, resp.error, resp.status_code) == (7, False, "OK")
    assert starts_request(HELLO) and not starts_response(HELLO)


@pytest.mark.parametrize("cut", range(1, len(HELLO)))
def test_request_split_at_every_byte(cut):
    assert [m.name for m in feed_split(DubboConnection(), True, HELLO, cut)] == [f"dubbo {SERVICE}/sayHello"]


def test_head_keeps_no_argument_nor_token():
    (req,) = DubboConnection().feed(True, chunk(HELLO))
    assert b"s3cr3t" not in req.head and b"world" not in req.head and req.head.endswith(b"Ljava/lang/String;")


@pytest.mark.parametrize(("status", "name"), [(30, "CLIENT_TIMEOUT"), (31, "SERVER_TIMEOUT"), (40, "BAD_REQUEST"),
                                              (50, "BAD_RESPONSE"), (60, "SERVICE_NOT_FOUND"), (70, "SERVICE_ERROR"),
                                              (80, "SERVER_ERROR"), (90, "CLIENT_ERROR"),
                                              (100, "SERVER_THREADPOOL_EXHAUSTED_ERROR")])  # fmt: skip
def test_error_statuses_by_name(status, name):
    _, resp = exchange(DubboConnection(), HELLO, response(7, status=status, error="it went wrong: é"))
    assert (resp.error, resp.status_code, resp.attributes["error.type"]) == (True, name, name)
    assert resp.attributes["rpc.apache_dubbo.error_message"] == "it went wrong: é"


def test_exception_thrown_by_the_provider_is_an_error():
    _, resp = exchange(DubboConnection(), HELLO, response(7, exception=("java.lang.IllegalStateException", "no")))
    assert (resp.error, resp.status_code) == (True, "EXCEPTION")
    assert resp.attributes["error.type"] == "java.lang.IllegalStateException"
    _, resp = exchange(DubboConnection(), HELLO, response(7))  # a null result is fine
    assert not resp.error


def test_heartbeats_are_not_spans_and_one_way_calls_expect_nothing():
    conn = DubboConnection()
    assert conn.feed(True, chunk(heartbeat(1))) == [] and conn.feed(False, chunk(heartbeat(1, reply=True))) == []
    assert starts_request(heartbeat(1)) and starts_response(heartbeat(1, reply=True))  # still Dubbo
    (req,) = conn.feed(True, chunk(request(2, "notify", "", b"", two_way=False)))
    assert not req.expects_response and req.pair_key is None


def test_out_of_order_responses_pair_by_id():
    conn = DubboConnection()
    reqs = conn.feed(True, chunk(b"".join(request(i, f"m{i}", "", b"") for i in (1, 2, 3))))
    resps = conn.feed(False, chunk(b"".join(response(i, h_int(i)) for i in (3, 1, 2)), t=3))
    assert [m.pair_key for m in reqs] == [1, 2, 3] and [m.pair_key for m in resps] == [3, 1, 2]


def test_strings_in_every_hessian2_form():
    # Short (<32), medium (<1024), chunked ('R' ... 'S'), and characters beyond 16 bits.
    for method in ("m", "m" * 200, "m" * 40000, "sayHello😀é"):
        (req,) = DubboConnection().feed(True, chunk(request(1, method, "", b"")))
        assert req.attributes["rpc.method"] == method[:1024], len(method)
    (req,) = DubboConnection().feed(True, chunk(request(1, "m", "", b"", version=None)))
    assert "rpc.apache_dubbo.service_version" not in req.attributes  # null


def test_message_longer_than_captured_is_skipped_through():
    big = request(9, "sayHello", "Ljava/lang/String;", h_string("x" * 5000))
    conn = DubboConnection()
    (req,) = conn.feed(True, chunk(big[:1024], size=3000)) + conn.feed(True, chunk(big[3000:], t=1))
    assert (req.name, req.size, req.partial) == (f"dubbo {SERVICE}/sayHello", len(big), False)
    assert [m.pair_key for m in conn.feed(True, chunk(HELLO, t=2))] == [7]


def test_request_cut_inside_its_leading_strings_keeps_what_was_read():
    req = request(5, "sayHello", "Ljava/lang/String;", h_string("x"))
    cut = 16 + len(h_string("2.0.2") + h_string(SERVICE)) + 3
    (msg,) = DubboConnection().feed(True, chunk(req[:cut], size=len(req)))
    assert (msg.name, msg.partial, msg.size, msg.pair_key) == (f"dubbo {SERVICE}", True, len(req), 5)
    assert "rpc.method" not in msg.attributes and msg.attributes["rpc.service"] == SERVICE


def test_joined_mid_stream_and_bounds():
    conn = DubboConnection()
    got = conn.feed(False, chunk(response(6, h_string("late")))) + exchange(conn, HELLO, response(7), t=2)
    assert [(m.is_request, m.pair_key) for m in got] == [(False, 6), (True, 7), (False, 7)]
    # Lengths from the wire are not trusted: a body length beyond any Dubbo message is not Dubbo,
    # and a string claiming 65535 characters ends with the frame.
    assert not starts_request(struct.pack("!HBBqi", 0xDABB, 0xC2, 0, 1, -5))
    body = h_string("2.0.2") + b"S\xff\xff" + b"a" * 10
    frame = frame_request(header(0xC2, 0, 1, body))
    assert isinstance(frame, Frame) and frame.length == 16 + len(body) and "service" not in frame.fields


def test_detection_claims_no_other_protocol_and_none_claims_dubbo():
    ours = [HELLO, response(7, h_string("x")), heartbeat(1), heartbeat(1, reply=True),
            request(2, "n", "", b"", two_way=False), response(3, status=60, error="x")]  # fmt: skip
    assert others.claims(ours) == set()
    for data in others.samples():
        assert not starts_request(data) and not starts_response(data), data
    assert not any(thrift.starts_request(d) or thrift.starts_response(d) for d in ours)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_arbitrary_bytes_never_raise(parts):
    feed_alternating(DubboConnection(), parts, missing=50)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 200), st.binary(min_size=1, max_size=8), st.integers(0, 3))
def test_corrupted_messages_never_raise(at, noise, missing):
    data = bytearray(HELLO)
    at %= len(data)
    data[at : at + len(noise)] = noise
    resp = response(7, exception=("java.lang.IllegalStateException", "no"))
    feed_alternating(DubboConnection(), [bytes(data), resp, bytes(data)[::-1], resp[:30]], missing * 40)


def test_live_provider_and_consumer_and_their_capture(collector, store, tmp_path):
    from servers import replayed_spans, span_key, tshark_capture

    provider = subprocess.Popen([sys.executable, str(WIRE), "provider"], stdout=subprocess.PIPE, text=True)
    consumer = None
    try:
        port = provider.stdout.readline().strip()
        collector.trace(provider.pid)
        consumer = subprocess.Popen([sys.executable, str(WIRE), "consumer", port], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)  # fmt: skip
        collector.trace(consumer.pid)
        with tshark_capture(tmp_path / "dubbo.pcapng", [port]) as cap:
            consumer.stdin.write("\n")
            consumer.stdin.flush()
            assert consumer.stdout.readline().strip() == "done"
        provider_recs = store.wait_for(provider.pid, lambda rs: sum(r.direction == "egress" for r in rs) >= 7)
        consumer_recs = store.settle(consumer.pid, quiet_s=0.5)
    finally:
        # The consumer closes its socket itself and the provider its side (a socket freed by a
        # killed process leaves the agent a stale connection entry); then both are gone.
        if consumer is not None:
            try:
                consumer.communicate("\n", timeout=10)
            except (subprocess.TimeoutExpired, OSError, ValueError):
                consumer.kill()
                consumer.wait()
            time.sleep(0.2)
        provider.kill()
        provider.wait()
    name = f"dubbo {SERVICE}/"
    want = sorted([(name + "sayHello", "ok", "OK")] * 3 + [(name + "fail", "error", "EXCEPTION"),
                  (name + "nosuch", "error", "SERVICE_NOT_FOUND"), (name + "notify", "ok", None),
                  (name + "slow", "ok", "OK")])  # fmt: skip
    for recs, kind in ((provider_recs, "SERVER"), (consumer_recs, "CLIENT")):
        spans = [s for s in SpanPipeline().push(recs) if s.protocol == "dubbo"]
        assert sorted((s.name, s.status, s.status_code) for s in spans) == want, kind
        assert all(s.kind == kind for s in spans)
        big = [s for s in spans if s.req_size > 3000]
        # Larger than the capture limit, but every byte counted: whole.
        assert len(big) == 1 and "deeptrace.partial" not in big[0].attributes
        assert not any(b"s3cr3t" in s.req_head for s in spans)
        if kind == "SERVER":
            assert sorted(map(span_key, replayed_spans(cap))) == sorted(map(span_key, spans))
