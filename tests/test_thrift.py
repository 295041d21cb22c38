"""Apache Thrift: messages written by the Thrift library itself (binary strict and old,
compact; framed and buffered), fed to the parser; and live between the library's own server
and client, traced by pid, joined mid-stream, and replayed from a capture."""

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
from thrift.Thrift import TApplicationException
from thriftsvc import others
from thriftsvc.calc import DivideByZero, Point, app_error, call, reply

from deeptrace.capture.pipeline import SpanPipeline
from deeptrace.protocols.framing import INVALID, NEED_MORE, Frame
from deeptrace.protocols.thrift import ThriftConnection, frame_request, starts_request, starts_response

ENCODINGS = [(p, t) for p in ("binary", "binary-old", "compact") for t in ("buffered", "framed")]
STATS = {"series": {"a": [1, 2], "b": [3]}, "flags": {True, False}, "points": [Point(x=1, y=-2, label="p")],
         "scale": 0.5}  # fmt: skip
RUN = Path(__file__).parent / "thriftsvc" / "run.py"


@pytest.mark.parametrize(("protocol", "transport"), ENCODINGS)
def test_call_and_reply_in_every_encoding(protocol, transport):
    enc = {"protocol": protocol, "transport": transport}
    req, resp = call("stats", 7, args=STATS, **enc), reply("stats", 7, success=[1.5, 2.0], **enc)
    got = exchange(ThriftConnection(), req, resp)
    assert [(m.is_request, m.size, m.pair_key) for m in got] == [(True, len(req), 7), (False, len(resp), 7)]
    assert got[0].name == "thrift stats" and not got[1].error and got[1].status_code is None
    assert got[0].attributes == {"rpc.system": "apache_thrift", "rpc.method": "stats", "rpc.apache_thrift.protocol":
                                 protocol, "rpc.apache_thrift.framed": transport == "framed"}  # fmt: skip
    assert starts_request(req) and not starts_response(req) and starts_response(resp) and not starts_request(resp)


@pytest.mark.parametrize(("protocol", "transport"), [("binary", "buffered"), ("compact", "buffered"),
                                                     ("binary-old", "framed")])  # fmt: skip
def test_split_at_every_byte(protocol, transport):
    data = call("stats", 3, args=STATS, protocol=protocol, transport=transport)
    for cut in range(1, len(data)):
        assert [m.name for m in feed_split(ThriftConnection(), True, data, cut)] == ["thrift stats"], cut


@pytest.mark.parametrize("protocol", ["binary", "compact"])
def test_unframed_end_is_found_by_walking_the_struct(protocol):
    # Several messages in one read, and the walk must land exactly on each boundary.
    reqs = [call("add", 1, args={"a": 1, "b": 2}, protocol=protocol), call("stats", 2, args=STATS, protocol=protocol),
            call("echo", 3, args={"text": "hé" * 40}, protocol=protocol), call("ping", 4, protocol=protocol)]  # fmt: skip
    got = ThriftConnection().feed(True, chunk(b"".join(reqs)))
    assert [(m.name, m.size, m.pair_key) for m in got] == [
        ("thrift add", len(reqs[0]), 1), ("thrift stats", len(reqs[1]), 2), ("thrift echo", len(reqs[2]), 3),
        ("thrift ping", len(reqs[3]), 4)]  # fmt: skip


@pytest.mark.parametrize(("protocol", "transport"), ENCODINGS)
def test_declared_exception_is_an_error(protocol, transport):
    enc = {"protocol": protocol, "transport": transport}
    _, resp = exchange(ThriftConnection(), call("divide", args={"a": 1, "b": 0}, **enc),
                       reply("divide", ouch=DivideByZero(message="by zero"), **enc))  # fmt: skip
    assert resp.error and resp.status_code == "DECLARED_EXCEPTION"
    assert resp.attributes["rpc.apache_thrift.exception_field_id"] == 1
    assert resp.attributes["rpc.apache_thrift.error_message"] == "by zero"


@pytest.mark.parametrize(("protocol", "transport"), ENCODINGS)
def test_application_exception_type_and_message(protocol, transport):
    enc = {"protocol": protocol, "transport": transport}
    _, resp = exchange(ThriftConnection(), call("nosuch", **enc),
                       app_error("nosuch", TApplicationException.UNKNOWN_METHOD, "Unknown function nosuch", **enc))
    assert resp.error and resp.status_code == "UNKNOWN_METHOD"
    assert resp.attributes["error.type"] == "TApplicationException UNKNOWN_METHOD"
    assert resp.attributes["rpc.apache_thrift.error_message"] == "Unknown function nosuch"


def test_void_reply_is_ok_and_oneway_expects_nothing():
    conn = ThriftConnection()
    (log,) = conn.feed(True, chunk(call("log", args={"line": "x"}, protocol="compact", transport="framed")))
    assert log.name == "thrift log" and not log.expects_response and log.pair_key is None
    _, resp = exchange(conn, call("ping"), reply("ping"))
    assert not resp.error and resp.status_code is None


def test_multiplexed_service_name():
    (req,) = ThriftConnection().feed(True, chunk(call("add", args={"a": 1, "b": 2}, multiplexed=True)))
    assert req.name == "thrift Calculator/add"
    assert (req.attributes["rpc.service"], req.attributes["rpc.method"]) == ("Calculator", "add")


def test_seqid_zero_reused_pairs_in_order_and_numbered_calls_pair_by_seqid():
    conn = ThriftConnection()
    reqs = conn.feed(True, chunk(b"".join(call("add", 0, args={"a": i, "b": i}) for i in range(3))))
    resps = conn.feed(False, chunk(b"".join(reply("add", 0, success=i) for i in range(3)), t=5))
    # The first waits under its seqid; the others have that seqid taken: in order (key None).
    assert [m.pair_key for m in reqs] == [m.pair_key for m in resps] == [0, None, None]
    conn = ThriftConnection()
    reqs = conn.feed(True, chunk(b"".join(call("add", i, args={"a": i, "b": i}) for i in (5, 6, 7))))
    resps = conn.feed(False, chunk(b"".join(reply("add", i, success=i) for i in (7, 5, 6)), t=5))
    assert [m.pair_key for m in reqs] == [5, 6, 7] and [m.pair_key for m in resps] == [7, 5, 6]


def test_head_stops_before_the_arguments():
    req = call("echo", args={"text": "password=hunter2"}, transport="framed")
    (msg,) = ThriftConnection().feed(True, chunk(req))
    assert b"hunter2" not in msg.head and msg.head.endswith(b"echo\x00\x00\x00\x00")


def test_message_longer_than_captured_is_salvaged_then_back_in_step():
    big, small = call("echo", 1, args={"text": "e" * 3000}), call("add", 2, args={"a": 1, "b": 1})
    conn = ThriftConnection()
    (first,) = conn.feed(True, chunk(big[:1024], size=len(big)))
    assert (first.name, first.partial, first.size, first.pair_key) == ("thrift echo", True, len(big), 1)
    assert [m.name for m in conn.feed(True, chunk(small, t=2))] == ["thrift add"]
    # Framed: the length is known, so the rest is skipped as it comes, captured or not.
    big = call("echo", 3, args={"text": "e" * 3000}, transport="framed")
    msgs = conn.feed(True, chunk(big[:1024], t=3, size=2000)) + conn.feed(True, chunk(big[2000:], t=4))
    assert [(m.name, m.size, m.partial) for m in msgs] == [("thrift echo", len(big), False)]


@pytest.mark.parametrize(("protocol", "transport"), ENCODINGS)
def test_joined_mid_stream_at_any_message(protocol, transport):
    enc = {"protocol": protocol, "transport": transport}
    calls = [call("add", 0, args={"a": 1, "b": 2}, **enc), call("log", args={"line": "x"}, **enc), call("ping", **enc)]
    replies = [reply("add", 0, success=3, **enc), app_error("nosuch", 1, "u", **enc), reply("ping", **enc)]
    for k in range(3):  # the first bytes seen are those of the k-th message of each side
        assert starts_request(b"".join(calls[k:])) and not starts_response(b"".join(calls[k:]))
        assert starts_response(b"".join(replies[k:])) and not starts_request(b"".join(replies[k:]))
        conn = ThriftConnection()
        got = conn.feed(False, chunk(b"".join(replies[k:]))) + conn.feed(True, chunk(b"".join(calls[k:]), t=2))
        assert [m.name for m in got if m.is_request] == ["thrift add", "thrift log", "thrift ping"][k:]
        assert len([m for m in got if not m.is_request]) == 3 - k


def test_bounds_on_depth_counts_and_lengths():
    # 100 nested structs (binary): deeper than any library writes is not Thrift.
    deep = b"\x80\x01\x00\x01\x00\x00\x00\x01f\x00\x00\x00\x00" + b"\x0c\x00\x01" * 100 + b"\x00" * 101
    assert frame_request(deep) == INVALID
    # A list claiming 2**31-1 elements waits for bytes (the framer gives up past its buffer bound).
    huge = b"\x80\x01\x00\x01\x00\x00\x00\x01f\x00\x00\x00\x00\x0f\x00\x01\x08\x7f\xff\xff\xff"
    assert frame_request(huge) == NEED_MORE
    assert frame_request(b"\x80\x01\x00\x01\x7f\xff\xff\xff") == INVALID  # no method name is that long
    assert frame_request(struct.pack("!i", 1 << 30) + b"\x80\x01\x00\x01") == INVALID  # nor a frame
    frame = frame_request(call("ping", transport="framed"))
    assert isinstance(frame, Frame) and frame.fields["method"] == "ping"


def test_detection_claims_no_other_protocol_and_none_claims_thrift():
    for data in others.samples():
        assert not starts_request(data) and not starts_response(data), data
    ours = [call("add", args={"a": 1, "b": 2}, protocol=p, transport=t) for p, t in ENCODINGS]
    ours += [reply("add", success=3, protocol=p, transport=t) for p, t in ENCODINGS]
    # Known: memcached's binary check (magic 0x80, then a known opcode: 0x01 is SET) takes a strict binary
    # call; Thrift comes before memcached in `detect`. No memcached message is a Thrift one: a SET has
    # 8 extras bytes, which make an impossible Thrift name length.
    assert others.claims(ours) == {(0, "memcached request")}
    assert not starts_request(b"\x80\x01\x00\x01\x08\x00\x00\x00" + bytes(16) + b"key")


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_arbitrary_bytes_never_raise(parts):
    feed_alternating(ThriftConnection(), parts, missing=50)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(ENCODINGS), st.integers(0, 400), st.binary(min_size=1, max_size=8), st.integers(0, 3))
def test_corrupted_library_messages_never_raise(encoding, at, noise, missing):
    data = bytearray(call("stats", 1, args=STATS, protocol=encoding[0], transport=encoding[1]))
    at %= len(data)
    data[at : at + len(noise)] = noise
    feed_alternating(ThriftConnection(), [bytes(data), bytes(reply("stats", 1, success=[1.0]))] * 2, missing * 40)


def _plan_spans(service: str) -> list[tuple]:
    """(name, status, status_code) of the spans of run.py's PLAN, sorted."""
    prefix = f"thrift {service}/" if service else "thrift "
    plan = [("add", "ok", None), ("echo", "ok", None), ("divide", "error", "DECLARED_EXCEPTION"),
            ("log", "ok", None), ("ping", "ok", None), ("nosuch", "error", "UNKNOWN_METHOD"), ("stats", "ok", None),
            ("crash", "error", "INTERNAL_ERROR"), ("add", "ok", None)]  # fmt: skip
    return [(prefix + name, status, code) for name, status, code in plan]


class _Pair:
    """run.py's server and client: started, driven line by line, and always killed."""

    def __init__(self, kind: str, protocol: str, transport: str, *flags: str) -> None:
        args = [protocol, transport, *flags]
        self.server = subprocess.Popen([sys.executable, str(RUN), "server", kind, *args], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)  # fmt: skip
        self.client = None
        try:
            self.port = self.server.stdout.readline().strip()
            assert self.port.isdigit(), f"server said {self.port!r}"
            self.client = subprocess.Popen([sys.executable, str(RUN), "client", self.port, *args],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        except BaseException:
            self.close()
            raise

    def serve(self) -> None:
        self.server.stdin.write("\n")
        self.server.stdin.flush()

    def say(self, expect: str) -> None:
        self.client.stdin.write("\n")
        self.client.stdin.flush()
        line = self.client.stdout.readline().strip()
        assert line == expect, f"client said {line!r} (exit {self.client.poll()})"

    def close(self) -> None:
        # The client closes its socket itself, and the server its side on seeing that: a socket
        # freed by a killed process leaves the agent a stale entry that a later socket can reuse.
        if self.client is not None:
            try:
                self.client.communicate("\n", timeout=10)
            except (subprocess.TimeoutExpired, OSError, ValueError):
                self.client.kill()
                self.client.wait()
            time.sleep(0.2)
        self.server.kill()
        self.server.wait()


LIVE = [("simple", "binary", "buffered"), ("threaded", "compact", "framed", "multiplexed"),
        ("simple", "binary-old", "buffered", "multiplexed", "counting"), ("threaded", "compact", "buffered")]  # fmt: skip


@pytest.mark.parametrize("setup", LIVE, ids=["-".join(s) for s in LIVE])
def test_live_library_server_and_client(collector, store, tmp_path, setup):
    from servers import replayed_spans, span_key, tshark_capture

    pair = _Pair(*setup)
    try:
        collector.trace(pair.server.pid)
        collector.trace(pair.client.pid)
        pair.serve()  # its accept is traced: the connection's role is known
        with tshark_capture(tmp_path / "thrift.pcapng", [pair.port]) as cap:
            pair.say("warm")  # connects and makes the WARM calls, all traced
            pair.say("done")
        server_recs = store.wait_for(pair.server.pid, lambda rs: sum(r.direction == "egress" for r in rs) >= 10)
        client_recs = store.settle(pair.client.pid, quiet_s=0.5)
    finally:
        pair.close()
    service = "Calculator" if "multiplexed" in setup else ""
    want = sorted(_plan_spans(service) + [(f"thrift {service + '/' if service else ''}add", "ok", None)] * 2)
    for recs, kind in ((server_recs, "SERVER"), (client_recs, "CLIENT")):
        assert {r.role for r in recs if r.direction} == {kind.lower()}  # connect and accept were traced
        spans = [s for s in SpanPipeline().push(recs) if s.protocol == "thrift"]
        assert sorted((s.name, s.status, s.status_code) for s in spans) == want, kind
        assert all(s.kind == kind for s in spans)
        assert all(s.duration_ns > 0 for s in spans if "deeptrace.one_way" not in s.attributes)
        echo = next(s for s in spans if s.name.endswith("echo"))
        # Larger than the capture limit: framed, its length is known and it is whole; buffered,
        # its end past the capture is not known (salvaged, partial).
        assert echo.attributes.get("deeptrace.partial", False) == ("framed" not in setup) and echo.req_size > 3000
        if kind == "SERVER":
            assert sorted(map(span_key, replayed_spans(cap))) == sorted(map(span_key, spans))


def test_live_connection_opened_before_tracing(collector, store):
    pair = _Pair("threaded", "compact", "buffered")
    try:
        pair.serve()
        pair.say("warm")  # connected and used, untraced
        collector.trace(pair.server.pid)
        collector.trace(pair.client.pid)
        pair.say("done")
        client_recs = store.wait_for(pair.client.pid, lambda rs: sum(r.direction == "ingress" for r in rs) >= 8)
        server_recs = store.settle(pair.server.pid, quiet_s=0.5)
    finally:
        pair.close()
    # The agent cannot know the role of a connection older than it (test_agent_live has the case
    # where a stale entry of its connection table once gave one).
    assert {r.role for r in client_recs + server_recs if r.direction} == {"unknown"}
    want = sorted(_plan_spans(""))
    client = [s for s in SpanPipeline().push(client_recs) if s.protocol == "thrift"]
    assert sorted((s.name, s.status, s.status_code) for s in client) == want
    assert all(s.kind == "CLIENT" for s in client)  # the role came from the bytes
    server = [s for s in SpanPipeline().push(server_recs) if s.protocol == "thrift"]
    got = sorted((s.name, s.status, s.status_code) for s in server)
    # The server thread was already inside read() when tracing began: that read (the first
    # PLAN call) has no enter record and is not seen. Everything after it is.
    assert got in (want, sorted(_plan_spans("")[1:])), got
    assert all(s.kind == "SERVER" for s in server)


def test_frame_length_read_alone_then_the_payload():
    # TFramedTransport reads the 4-byte length, then the frame: also when the frame is larger
    # than the capture, and also to get back in step after a hole.
    big = call("echo", 1, args={"text": "e" * 3000}, protocol="compact", transport="framed")
    small = call("ping", 2, protocol="compact", transport="framed")
    conn = ThriftConnection()
    msgs = conn.feed(True, chunk(big[:4])) + conn.feed(True, chunk(big[4:1028], t=1, size=len(big) - 4))
    assert [(m.name, m.size) for m in msgs] == [("thrift echo", len(big))]
    conn.feed(True, chunk(b"\x82\x21\x03\x04echo\x18", t=2, size=500))  # a message cut short: out of step
    msgs = conn.feed(True, chunk(small[:4], t=3)) + conn.feed(True, chunk(small[4:], t=4))
    assert [(m.name, m.size) for m in msgs] == [("thrift ping", len(small))]
