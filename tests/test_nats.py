"""NATS: framing and fields on bytes written by nats-py 2.16 and nats-server 2.9 (recorded
through a relay, below as constants, and again live), hand-built edge cases, fuzzing, and a
live eBPF test that attaches to a connection already in use."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import Counter

import pytest
from brokers import PASSWORD, USER, Relay, attached_mid_stream, nats_server, server_records
from hypothesis import given, settings
from hypothesis import strategies as st
from parsing import chunk, feed_alternating, feed_split

from deeptrace import protocols
from deeptrace.capture.pipeline import SpanPipeline
from deeptrace.protocols import nats
from deeptrace.protocols.nats import NatsConnection, starts_request, starts_response

# As nats-py 2.16 and nats-server 2.9.10 wrote them (INFO shortened).
INFO = b'INFO {"server_id":"NCTG","version":"2.9.10","proto":1,"headers":true,"auth_required":true,"max_payload":1048576}\r\n'
CONNECT = (b'CONNECT {"echo": true, "headers": true, "lang": "python3", "name": "demo", "no_responders": true, '
           b'"pass": "s3cret-Pw", "pedantic": false, "protocol": 1, "user": "alice", "verbose": %s, '
           b'"version": "2.16.0"}\r\n')  # fmt: skip
SUB = b"SUB demo.orders  1\r\n"
HPUB = b"HPUB demo.orders  51 56\r\nNATS/1.0\r\nTrace: abc\r\nAuthorization: Bearer tok\r\n\r\nhello\r\n"
PUBS = SUB + HPUB + b"PUB demo.orders demo.reply 5\r\nworld\r\nPUB forbidden.x  4\r\nnope\r\n"
HMSG = b"HMSG demo.orders 1 51 56\r\nNATS/1.0\r\nTrace: abc\r\nAuthorization: Bearer tok\r\n\r\nhello\r\n"
MSG = b"MSG demo.orders 1 demo.reply 5\r\nworld\r\n"
DELIVERIES = HMSG + MSG
DENIED = b"-ERR 'Permissions Violation for Publish to \"forbidden.x\"'\r\n"
SESSION = [(False, INFO), (True, CONNECT % b"false"), (True, b"PING\r\n"), (False, b"PONG\r\n"), (True, PUBS),
           (False, DELIVERIES + DENIED), (True, b"UNSUB 1 \r\n"), (True, b"PING\r\n"), (False, b"PONG\r\n")]  # fmt: skip
VERBOSE = [(False, INFO), (True, CONNECT % b"true"), (False, b"+OK\r\n"), (True, b"PING\r\n"), (False, b"PONG\r\n"),
           (True, PUBS), (False, b"+OK\r\n+OK\r\n" + HMSG + b"+OK\r\n" + MSG + DENIED),
           (True, b"UNSUB 1 \r\n"), (False, b"+OK\r\n")]  # fmt: skip
DENIED_SPAN = ("nats -ERR", "error", "Permissions Violation")


def spans_of(pieces, role="server", capture=1024):
    pipeline = SpanPipeline(host="h")
    return pipeline.push(server_records(pieces, role, capture)) + pipeline.close_all(10**18)


def named(spans):
    return [(s.name, s.status, s.status_code) for s in sorted(spans, key=lambda s: (s.start_ns, s.end_ns))]


def test_real_client_session_non_verbose():
    spans = spans_of(SESSION)
    assert named(spans) == [
        ("nats CONNECT", "ok", None), ("nats PING", "ok", None), ("nats SUB demo.orders", "ok", None),
        ("nats HPUB demo.orders", "ok", None), ("nats PUB demo.orders", "ok", None),
        ("nats PUB forbidden.x", "ok", None), ("nats HMSG demo.orders", "ok", None),
        ("nats MSG demo.orders", "ok", None), DENIED_SPAN, ("nats UNSUB demo.orders", "ok", None),
        ("nats PING", "ok", None)]  # fmt: skip
    by_name = {s.name: s for s in spans}
    assert all(s.kind == "SERVER" for s in spans)
    assert by_name["nats PUB demo.orders"].attributes["deeptrace.one_way"] is True
    pub = by_name["nats PUB demo.orders"].attributes
    assert (pub["messaging.system"], pub["messaging.destination.name"], pub["messaging.nats.reply_to"],
            pub["messaging.message.body.size"], pub["messaging.operation.type"]) == (
        "nats", "demo.orders", "demo.reply", 5, "send")  # fmt: skip
    msg = by_name["nats MSG demo.orders"]
    assert msg.attributes["messaging.nats.sid"] == "1" and msg.attributes["messaging.operation.type"] == "receive"
    assert msg.req_size == len(MSG) and msg.req_seq[0] > by_name["nats HMSG demo.orders"].req_seq[0]
    hpub = by_name["nats HPUB demo.orders"]
    assert hpub.attributes["messaging.message.body.size"] == 5 and hpub.req_size == len(HPUB)
    err = by_name["nats -ERR"]
    assert err.attributes["messaging.nats.error"] == 'Permissions Violation for Publish to "forbidden.x"'
    assert err.req_size == 0 and err.resp_size == len(DENIED)
    ping = next(s for s in spans if s.name == "nats PING")
    assert ping.req_size == 6 and ping.resp_size == 6 and ping.resp_head == b"PONG\r\n"


def test_verbose_acks_pair_in_order_with_each_operation():
    spans = spans_of(VERBOSE)
    assert named(spans) == [
        ("nats CONNECT", "ok", None), ("nats PING", "ok", None), ("nats SUB demo.orders", "ok", None),
        ("nats HPUB demo.orders", "ok", None), ("nats PUB demo.orders", "ok", None),
        ("nats PUB forbidden.x", "error", "Permissions Violation"), ("nats HMSG demo.orders", "ok", None),
        ("nats MSG demo.orders", "ok", None), ("nats UNSUB demo.orders", "ok", None)]  # fmt: skip
    answered = [s for s in spans if s.name != "nats HMSG demo.orders" and s.name != "nats MSG demo.orders"]
    assert all(s.resp_size > 0 and "deeptrace.one_way" not in s.attributes for s in answered)
    assert {s.resp_head for s in answered} == {b"+OK\r\n", b"PONG\r\n", DENIED}


def test_joined_mid_stream_learns_verbose_from_ok_and_guesses_direction():
    # No INFO or CONNECT: the first +OK (answering a PUB we took as one-way) says verbose.
    pieces = [(True, b"PUB a 1\r\nx\r\n"), (False, b"+OK\r\n"), (True, b"PUB b 1\r\ny\r\nPING\r\n"),
              (False, b"+OK\r\nPONG\r\n")]  # fmt: skip
    spans = spans_of(pieces, role="unknown")
    assert named(spans) == [("nats PUB a", "ok", None), ("nats PUB b", "ok", None), ("nats PING", "ok", None)]
    assert [s.resp_size for s in spans] == [0, 5, 6] and {s.kind for s in spans} == {"SERVER"}


def test_connect_credentials_never_leave():
    conn = NatsConnection()
    line = (b'CONNECT {"verbose":false,"user":"alice","pass":"s3cret-Pw","auth_token":"tok-123","jwt":"eyJhbGci",'
            b'"sig":"c2lnbmF0","nkey":"UABC","name":"svc"}\r\n')  # fmt: skip
    (msg,) = conn.feed(True, chunk(line))
    text = repr(msg.head) + repr(msg.attributes)
    assert msg.name == "nats CONNECT" and msg.attributes["messaging.client.id"] == "svc"
    for secret in ("alice", "s3cret", "tok-123", "eyJhbGci", "c2lnbmF0", "UABC"):
        assert secret not in text
    # Cut by the capture limit inside the password: no JSON to read, nothing shown.
    conn = NatsConnection()
    (msg,) = conn.feed(True, chunk(line[:60], size=len(line)))
    assert msg.name == "nats CONNECT" and msg.partial and b"s3cret" not in msg.head


def test_header_values_under_secret_names_are_redacted():
    conn = NatsConnection()
    msgs = conn.feed(True, chunk(PUBS))
    hpub = msgs[1]
    assert b"Bearer tok" not in hpub.head and b"Trace: abc" in hpub.head and hpub.head.startswith(b"HPUB demo")


@pytest.mark.parametrize("cut", range(1, len(PUBS)))
def test_operations_split_at_every_byte(cut):
    msgs = feed_split(NatsConnection(), True, PUBS, cut)
    assert [m.name for m in msgs] == ["nats SUB demo.orders", "nats HPUB demo.orders", "nats PUB demo.orders",
                                      "nats PUB forbidden.x"]  # fmt: skip
    assert sum(m.size for m in msgs) == len(PUBS)


def test_payload_longer_than_captured_is_skipped_through():
    conn = NatsConnection()
    pub = b"PUB big 100000\r\n" + b"x" * 100000 + b"\r\n"
    (msg,) = conn.feed(True, chunk(pub[:1024], size=len(pub)))
    assert msg.size == len(pub) and not msg.partial and msg.attributes["messaging.message.body.size"] == 100000
    assert [m.name for m in conn.feed(True, chunk(b"PUB next 0\r\n\r\n", t=2))] == ["nats PUB next"]


def test_absurd_lengths_are_refused_not_allocated():
    assert nats.frame_request(b"PUB a 99999999999\r\n") == nats.INVALID
    assert nats.frame_request(b"HPUB a 10 5\r\n") == nats.INVALID  # headers longer than the whole
    assert nats.frame_request(b"PUB a " + b"x" * nats.MAX_LINE) == nats.INVALID


def test_detection_needs_an_unmistakable_line():
    for data in (CONNECT % b"false", CONNECT[:20], b"PUB a.b 3\r\nabc\r\n", b"SUB a 1\r\n", b"UNSUB 1\r\n", PUBS,
                 b"PING\r\nPUB x 0\r\n\r\n", b"HPUB a 12 12\r\nNATS/1.0\r\n\r\n\r\n"):  # fmt: skip
        assert starts_request(data) and not starts_response(data), data
    for data in (INFO, INFO[:10], DELIVERIES, b"PONG\r\nMSG a 1 0\r\n\r\n"):
        assert starts_response(data) and not starts_request(data), data
    # Alone, these are also Redis (inline command, simple reply): not claimed.
    for data in (b"PING\r\n", b"PONG\r\n", b"+OK\r\n", b"-ERR 'x'\r\n", b"PUB a 3", b"PUB a b c d\r\n",
                 b"INFO server\r\n", b"*1\r\n$4\r\nPING\r\n", b"MSG\r\n", b"SUB\r\n"):  # fmt: skip
        assert not starts_request(data) and not starts_response(data), data


def test_detection_with_the_other_protocols_in_the_registry():
    assert protocols.detect(CONNECT % b"false", None)[::2] == ("nats", True)  # not HTTP's CONNECT, nor Redis inline
    assert protocols.detect(CONNECT[:30], True)[0] == "nats"  # a CONNECT line still incomplete
    assert protocols.detect(INFO, None)[::2] == ("nats", False)
    assert protocols.detect(b"PUB a 1\r\nx\r\n", None)[::2] == ("nats", True)
    assert protocols.detect(DELIVERIES, False)[0] == "nats"
    # Keep-alives alone could be either: nothing is decided until the line after them.
    for data in (b"PING\r\n", b"PING\r\nPONG\r\n", b"PING\r\nPUB demo.orders 5"):
        assert protocols.detect(data, None) is None and protocols.detect(data, True) is None
    assert protocols.detect(b"PING\r\nPUB a 1\r\nx\r\n", None)[::2] == ("nats", True)
    assert protocols.detect(b"PING\r\nSET a b\r\n", True)[0] == "redis"
    assert protocols.detect(b"*1\r\n$4\r\nPING\r\n", True)[0] == "redis"


def test_unknown_operations_lose_step_and_a_new_syscall_regains_it():
    conn = NatsConnection()
    assert conn.feed(True, chunk(b"BOGUS stuff\r\n")) == []
    assert [m.name for m in conn.feed(True, chunk(b"PUB ok 0\r\n\r\n", t=2))] == ["nats PUB ok"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_arbitrary_bytes_never_raise(parts):
    feed_alternating(NatsConnection(), parts, missing=50)


_OPS = st.sampled_from([b"PUB a 3\r\nabc\r\n", b"PING\r\n", b"PONG\r\n", b"+OK\r\n", b"-ERR 'x'\r\n", b"SUB a 1\r\n",
                        b"MSG a 1 2\r\nhi\r\n", b"HPUB a 12 14\r\nNATS/1.0\r\n\r\nhi\r\n", b"CONNECT {}\r\n",
                        b"INFO {}\r\n", b"UNSUB 1 5\r\n", b"PUB a 99\r\n"])  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.lists(_OPS, min_size=1, max_size=4), st.integers(0, 40)), max_size=8))
def test_operation_streams_with_holes_never_raise(parts):
    conn = NatsConnection()
    for i, (side, ops, cut) in enumerate(parts):
        data = b"".join(ops)
        conn.feed(side, chunk(data[: max(1, len(data) - cut)], t=i, size=len(data)))
    conn.close(99)


def test_real_nats_py_through_a_relay(tmp_path):
    """nats-py against nats-server with the bytes relayed and recorded (no eBPF needed)."""
    with nats_server(tmp_path) as (_, port):
        relay = Relay(port)
        out = subprocess.run([sys.executable, "-c", CLIENT, str(relay.port), "relay"], capture_output=True,
                             text=True, timeout=60, check=False)  # fmt: skip
        pieces = relay.close()
    assert out.returncode == 0, out.stderr
    names = sorted(n for n, *_ in named(spans_of(pieces)))
    assert names == sorted(EARLY + AFTER_ATTACH), names


CLIENT = textwrap.dedent(f"""
    import asyncio, sys, nats
    port, mode = sys.argv[1], sys.argv[2]
    async def main():
        errors, got = [], []
        async def on_error(e): errors.append(str(e))
        async def on_msg(m): got.append(m.data)
        url = "nats://127.0.0.1:" + port
        nc = await nats.connect(url, user="{USER}", password="{PASSWORD}", name="early", error_cb=on_error,
                                allow_reconnect=False)
        await nc.subscribe("demo.orders", cb=on_msg)
        await nc.publish("demo.orders", b"before")
        await nc.flush()
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        # From here on the connection above is traced: it was opened and used before.
        await nc.publish("demo.orders", b"hello", headers={{"Trace-Id": "abc"}})
        await nc.publish("demo.orders", b"world", reply="demo.reply")
        await nc.publish("forbidden.x", b"nope")
        await nc.flush()
        sub = await nc.subscribe("demo.more")
        await sub.unsubscribe()
        await nc.flush()
        for _ in range(100):
            if len(got) == 3 and errors:
                break
            await asyncio.sleep(0.02)
        assert got == [b"before", b"hello", b"world"] and "permissions violation" in errors[0], (got, errors)
        if mode == "live":  # a second connection, opened while traced, in verbose mode
            v = await nats.connect(url, user="{USER}", password="{PASSWORD}", name="verbose", verbose=True,
                                   allow_reconnect=False)
            await v.publish("demo.v", b"x")
            await v.flush()  # nats-py writes this PING ahead of the PUB: its PONG comes before the +OK
            await v.flush()  # so the +OK has been read once this PONG is
            await v.close()
        await nc.close()
        print("done", flush=True)
    asyncio.run(main())
""")
EARLY = ["nats CONNECT", "nats PING", "nats SUB demo.orders", "nats PUB demo.orders", "nats MSG demo.orders",
         "nats PING"]  # fmt: skip
AFTER_ATTACH = ["nats HPUB demo.orders", "nats PUB demo.orders", "nats PUB forbidden.x", "nats PING",
                "nats HMSG demo.orders", "nats MSG demo.orders", "nats -ERR", "nats SUB demo.more",
                "nats UNSUB demo.more", "nats PING"]  # fmt: skip
VERBOSE_CONN = ["nats CONNECT", "nats PING", "nats PUB demo.v", "nats PING", "nats PING"]


def test_live_nats_py_and_nats_server_attached_mid_stream_and_their_capture(collector, store, tmp_path):
    from servers import replayed_spans, span_key, tshark_capture

    with nats_server(tmp_path) as (server_pid, port), tshark_capture(tmp_path / "nats.pcapng", [port]) as cap:
        client_recs, server_recs = attached_mid_stream(collector, store, server_pid, [CLIENT, str(port), "live"])
    expected = sorted(AFTER_ATTACH + VERBOSE_CONN)
    for recs, kind in ((client_recs, "CLIENT"), (server_recs, "SERVER")):
        pipeline = SpanPipeline()
        spans = [s for s in pipeline.push(recs) + pipeline.close_all(10**19) if s.protocol == "nats"]
        assert sorted(s.name for s in spans) == expected, kind
        assert all(s.kind == kind for s in spans), kind
        bad = [(s.name, s.status, s.status_code) for s in spans if s.status != "ok"]
        assert bad == [DENIED_SPAN], kind
        verbose_pub = next(s for s in spans if s.name == "nats PUB demo.v")
        assert verbose_pub.resp_head == b"+OK\r\n" and verbose_pub.end_ns > verbose_pub.start_ns
        assert all(b"s3cret" not in s.req_head and "s3cret" not in repr(s.attributes) for s in spans)
        if kind == "SERVER":
            replayed = [s for s in replayed_spans(cap) if s.protocol == "nats"]
            live = Counter(map(span_key, spans))
            # The capture began before the first connection: it also holds what came before the attach.
            assert Counter(map(span_key, replayed)) - live + live == Counter(map(span_key, replayed))
            assert not live - Counter(map(span_key, replayed))
            assert sorted(s.name for s in replayed if span_key(s) not in live) == sorted(EARLY)
