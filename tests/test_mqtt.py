"""MQTT 3.1.1 and 5: framing and fields on bytes written by paho-mqtt 2.2 and mosquitto 2.0
(recorded through a relay, below as constants, and again live), hand-built packets from the
OASIS specifications, fuzzing, and a live eBPF test that attaches to a connection in use."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
from brokers import PASSWORD, USER, Relay, attached_mid_stream, mosquitto, server_records
from hypothesis import given, settings
from hypothesis import strategies as st
from parsing import chunk, feed_alternating, feed_split

from deeptrace import protocols
from deeptrace.capture.pipeline import SpanPipeline
from deeptrace.protocols import mqtt
from deeptrace.protocols.mqtt import MqttConnection, starts_request, starts_response

# As paho-mqtt 2.2 and mosquitto 2.0.11 wrote them, one syscall each: CONNECT, SUBSCRIBE demo/in
# (QoS 1), PUBLISH "before" (QoS 1) and its delivery; then (index 8 on, what a tracer attached
# mid-stream sees) PUBLISH at QoS 0, 1 and 2 with their deliveries, UNSUBSCRIBE, DISCONNECT.
V311 = [
    (True, b"\x10'\x00\x04MQTT\x04\xc2\x00<\x00\tearly-311\x00\x05alice\x00\ts3cret-Pw"),
    (False, b" \x02\x00\x00"),
    (True, b"\x82\x0c\x00\x01\x00\x07demo/in\x01"),
    (False, b"\x90\x03\x00\x01\x01"),
    (True, b"2\x11\x00\x07demo/in\x00\x02before"),
    (False, b"2\x11\x00\x07demo/in\x00\x01before"),
    (True, b"@\x02\x00\x01"),
    (False, b"@\x02\x00\x02"),
    (True, b"0\x0b\x00\x07demo/inq0"),
    (False, b"0\x0b\x00\x07demo/inq0"),
    (True, b"2\r\x00\x07demo/in\x00\x04q1"),
    (False, b"2\r\x00\x07demo/in\x00\x02q1"),
    (True, b"@\x02\x00\x02"),
    (False, b"@\x02\x00\x04"),
    (True, b"4\r\x00\x07demo/in\x00\x05q2"),
    (False, b"P\x02\x00\x05"),
    (True, b"b\x02\x00\x05"),
    (False, b"2\r\x00\x07demo/in\x00\x03q2"),
    (True, b"@\x02\x00\x03"),
    (False, b"p\x02\x00\x05"),
    (True, b"\xa2\x0b\x00\x06\x00\x07demo/in"),
    (False, b"\xb0\x02\x00\x06"),
    (True, b"\xe0\x00"),
]
V5 = [
    (True, b"\x10&\x00\x04MQTT\x05\xc2\x00<\x00\x00\x07early-5\x00\x05alice\x00\ts3cret-Pw"),
    (False, b' \t\x00\x00\x06"\x00\n!\x00\x14'),
    (True, b"\x82\r\x00\x01\x00\x00\x07demo/in\x01"),
    (False, b"\x90\x04\x00\x01\x00\x01"),
    (True, b"2\x12\x00\x07demo/in\x00\x02\x00before"),
    (False, b"2\x12\x00\x07demo/in\x00\x01\x00before"),
    (True, b"@\x02\x00\x01"),
    (False, b"@\x02\x00\x02"),
    (True, b"0\x0c\x00\x07demo/in\x00q0"),
    (False, b"0\x0c\x00\x07demo/in\x00q0"),
    (True, b"2\x0e\x00\x07demo/in\x00\x04\x00q1"),
    (False, b"2\x0e\x00\x07demo/in\x00\x02\x00q1"),
    (True, b"@\x02\x00\x02"),
    (False, b"@\x02\x00\x04"),
    (True, b"4\x0e\x00\x07demo/in\x00\x05\x00q2"),
    (False, b"P\x02\x00\x05"),
    (True, b"b\x02\x00\x05"),
    (False, b"2\x0e\x00\x07demo/in\x00\x03\x00q2"),
    (True, b"@\x02\x00\x03"),
    (False, b"p\x02\x00\x05"),
    (True, b"\xa2\x0c\x00\x06\x00\x00\x07demo/in"),
    (False, b"\xb0\x04\x00\x06\x00\x00"),
    (True, b"\xe0\x00"),
]
ATTACH = 8
BAD_311 = [(True, b"\x10\x1d\x00\x04MQTT\x04\xc2\x00<\x00\x03bad\x00\x05alice\x00\x05wrong"), (False, b" \x02\x00\x05")]
BAD_5 = [(True, b"\x10\x1e\x00\x04MQTT\x05\xc2\x00<\x00\x00\x03bad\x00\x05alice\x00\x05wrong"),
         (False, b" \x03\x00\x87\x00")]  # fmt: skip
EARLY = ["mqtt CONNECT", "mqtt SUBSCRIBE demo/in", "mqtt PUBLISH demo/in", "mqtt deliver demo/in"]
AFTER_ATTACH = ["mqtt PUBLISH demo/in", "mqtt deliver demo/in", "mqtt PUBLISH demo/in", "mqtt deliver demo/in",
                "mqtt PUBLISH demo/in", "mqtt PUBREL", "mqtt deliver demo/in", "mqtt UNSUBSCRIBE demo/in",
                "mqtt DISCONNECT"]  # fmt: skip
LATE = ["mqtt CONNECT", "mqtt PUBLISH demo/late", "mqtt DISCONNECT"]
REFUSED = ("mqtt CONNECT", "error", "NOT_AUTHORIZED")


def spans_of(pieces, role="server", capture=1024):
    pipeline = SpanPipeline(host="h")
    return pipeline.push(server_records(pieces, role, capture, first_seq=(5000, 70000))) + pipeline.close_all(10**18)


def ordered(spans):
    return sorted(spans, key=lambda s: (s.start_ns, s.end_ns))


def one_way(span) -> bool:
    return span.attributes.get("deeptrace.one_way", False)


@pytest.mark.parametrize("session", [V311, V5], ids=["3.1.1", "5"])
def test_real_paho_session(session):
    spans = ordered(spans_of(session))
    assert [s.name for s in spans] == EARLY + AFTER_ATTACH
    assert all(s.kind == "SERVER" and s.status == "ok" for s in spans)
    assert [one_way(s) for s in spans] == [False] * 4 + [True, True] + [False] * 6 + [True]
    connect, sub, pub, deliver = spans[:4]
    assert connect.attributes["messaging.client.id"] == ("early-5" if session is V5 else "early-311")
    assert sub.attributes["messaging.destination.name"] == "demo/in" and sub.resp_size == len(session[3][1])
    # The client's PUBLISH pairs with the broker's PUBACK, the delivery with the client's PUBACK.
    assert (pub.req_head, pub.resp_head) == (session[4][1], session[7][1])
    assert (deliver.req_head, deliver.resp_head) == (session[5][1], session[6][1])
    assert deliver.attributes["messaging.operation.type"] == "receive" and pub.attributes["messaging.mqtt.qos"] == 1
    qos2, rel = spans[8], spans[9]
    assert (qos2.resp_head, rel.req_head, rel.resp_head) == (b"P\x02\x00\x05", b"b\x02\x00\x05", b"p\x02\x00\x05")
    assert spans[4].attributes["messaging.message.body.size"] == 2  # known version: properties not counted


@pytest.mark.parametrize("session", [V311, V5], ids=["3.1.1", "5"])
def test_joined_mid_stream_every_exchange_is_whole_and_named(session):
    spans = ordered(spans_of(session[ATTACH:], role="unknown"))
    assert [(s.name, s.status, s.kind) for s in spans] == [(n, "ok", "SERVER") for n in AFTER_ATTACH]
    assert all(s.resp_size > 0 for s in spans if not one_way(s))


def test_mid_stream_first_bytes_from_the_broker_are_taken_for_the_client_until_proven():
    # A delivery both sides could send comes first: it is taken for the client's PUBLISH (and the
    # side for the client's); the client's PINGREQ on the other side corrects it from there on.
    pieces = [(False, b"2\r\x00\x07demo/in\x00\x02q1"), (True, b"@\x02\x00\x02"), (True, b"\xc0\x00"),
              (False, b"\xd0\x00"), (True, b"2\r\x00\x07demo/in\x00\x09q1"), (False, b"@\x02\x00\x09")]  # fmt: skip
    spans = ordered(spans_of(pieces, role="unknown"))
    assert [(s.name, s.status, s.resp_size) for s in spans] == [
        ("mqtt PUBLISH demo/in", "ok", 4), ("mqtt PINGREQ", "ok", 2), ("mqtt PUBLISH demo/in", "ok", 4)]
    assert spans[2].req_head.endswith(b"\x09q1")


@pytest.mark.parametrize("bad", [BAD_311, BAD_5], ids=["3.1.1", "5"])
def test_refused_connect_is_an_error_and_its_password_never_leaves(bad):
    (span,) = spans_of(bad)
    assert (span.name, span.status, span.status_code) == REFUSED
    assert span.attributes["messaging.mqtt.reason_code"] == (5 if bad is BAD_311 else 0x87)
    assert b"wrong" not in span.req_head and b"alice" not in span.req_head and b"[REDACTED]" in span.req_head
    assert "wrong" not in repr(span.attributes)


def test_connect_v5_authentication_data_and_will_never_leave():
    props = b"\x15\x00\x05PLAIN\x16\x00\x06tok123"  # authentication method and data
    payload = b"\x00\x03cid" + b"\x00" + b"\x00\x05w/top" + b"\x00\x04will" + b"\x00\x02me" + b"\x00\x06hunter"
    body = b"\x00\x04MQTT\x05\xc6\x00\x3c" + bytes([len(props)]) + props + payload
    (msg,) = MqttConnection().feed(True, chunk(b"\x10" + bytes([len(body)]) + body))
    assert msg.name == "mqtt CONNECT" and msg.attributes["messaging.client.id"] == "cid"
    for secret in (b"tok123", b"hunter", b"will", b"me"):
        assert secret not in msg.head


def _subscribe_exchange(request: bytes, reply: bytes):
    conn = MqttConnection()
    return conn.feed(True, chunk(request)) + conn.feed(False, chunk(reply, t=5))


@pytest.mark.parametrize("request_bytes,reply,status", [
    (b"\x82\x0d\x00\x06\x00\x08secret/#\x00", b"\x90\x03\x00\x06\x80", "FAILURE"),  # 3.1.1
    (b"\x82\x0e\x00\x06\x00\x00\x08secret/#\x00", b"\x90\x04\x00\x06\x00\x87", "NOT_AUTHORIZED"),  # 5
    (b"\x82\x0e\x00\x06\x00\x00\x08secret/#\x00", b"\x90\x09\x00\x06\x05\x1f\x00\x02no\x87", "NOT_AUTHORIZED"),
])  # fmt: skip
def test_suback_failures_are_errors(request_bytes, reply, status):
    req, resp = _subscribe_exchange(request_bytes, reply)
    assert req.name == "mqtt SUBSCRIBE secret/#" and req.pair_key == resp.pair_key == ("c", 6)
    assert (resp.error, resp.status_code) == (True, status)
    if b"\x1f" in reply:
        assert resp.attributes["messaging.mqtt.reason_string"] == "no"


def test_v5_reason_codes_on_acknowledgements():
    conn = MqttConnection()
    conn.feed(True, chunk(b"\x10\x0d\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x00"))  # CONNECT 5, empty client id
    (pub,) = conn.feed(True, chunk(b"\x32\x09\x00\x01t\x00\x07\x00abc"))
    assert pub.attributes["messaging.message.body.size"] == 3  # 5's property length is not payload
    (ok,) = conn.feed(False, chunk(b"\x40\x03\x00\x07\x10", t=2))
    assert (ok.error, ok.status_code, ok.pair_key) == (False, "NO_MATCHING_SUBSCRIBERS", ("c", 7))
    (bad,) = conn.feed(False, chunk(b"\x40\x04\x00\x08\x97\x00", t=3))
    assert (bad.error, bad.status_code) == (True, "QUOTA_EXCEEDED")


def test_broker_disconnect_with_an_error_reason_is_an_error_span():
    pieces = [(True, b"\x10\x0d\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x00"), (False, b"\x20\x03\x00\x00\x00"),
              (False, b"\xe0\x02\x8e\x00")]  # fmt: skip
    spans = ordered(spans_of(pieces))
    assert [(s.name, s.status, s.status_code) for s in spans] == [
        ("mqtt CONNECT", "ok", None), ("mqtt DISCONNECT", "error", "SESSION_TAKEN_OVER")]


def test_version_is_learned_mid_stream_from_a_packet_only_5_allows():
    conn = MqttConnection()
    conn.feed(True, chunk(b"\x82\x0e\x00\x06\x00\x00\x08secret/#\x00"))  # a 5 SUBSCRIBE: property length 0
    assert conn.version == mqtt.V5
    conn = MqttConnection()
    conn.feed(True, chunk(b"\x82\x0d\x00\x06\x00\x08secret/#\x00"))  # fits 3.1.1 (and not 5)
    conn.feed(False, chunk(b"\x40\x02\x00\x06", t=2))
    assert conn.version is None  # nothing proved 5: 3.1.1 is assumed
    conn.feed(False, chunk(b"\xb0\x03\x00\x06\x00", t=3))
    assert conn.version == mqtt.V5


def test_publish_longer_than_captured_is_skipped_through():
    conn = MqttConnection()
    payload = b"x" * 100000
    rl = 2 + 5 + 2 + len(payload)
    varint = bytes([rl & 127 | 128, (rl >> 7) & 127 | 128, rl >> 14])
    pub = b"\x32" + varint + b"\x00\x05big/t\x00\x01" + payload
    (msg,) = conn.feed(True, chunk(pub[:1024], size=len(pub)))
    assert msg.size == len(pub) and not msg.partial and msg.name == "mqtt PUBLISH big/t"
    assert msg.attributes["messaging.message.body.size"] == len(payload)
    assert [m.name for m in conn.feed(True, chunk(b"\xc0\x00", t=3))] == ["mqtt PINGREQ"]


def test_remaining_length_bounds():
    assert mqtt.header(b"\x30\xff\xff\xff\xff\x01") == mqtt.INVALID  # five length bytes
    assert mqtt.header(b"\x30\xff\xff\xff\x7f")[3] == 268435455  # the largest: framed, never allocated
    assert mqtt.header(b"\xc0\x01") == mqtt.INVALID and mqtt.header(b"\x60\x02") == mqtt.INVALID  # PUBREL flags
    assert mqtt.header(b"\x36\x05") == mqtt.INVALID  # QoS 3


def test_packets_split_at_every_byte():
    data = b"".join(b for c, b in V311 if c)
    names = [m.name for m in MqttConnection().feed(True, chunk(data))]
    for cut in range(1, len(data)):
        assert [m.name for m in feed_split(MqttConnection(), True, data, cut)] == names


def test_detection():
    for c, data in V311 + V5:
        assert (starts_request if c else starts_response)(data), data
    for data in (V311[0][1][:20], b"\xc0\x00", b"\x82\x0c\x00\x01\x00\x07demo/in\x01\xc0\x00"):
        assert starts_request(data) and not starts_response(data)
    assert starts_response(b"\x20\x02\x00\x00") and starts_response(b"\xd0\x00") and not starts_request(b"\xd0\x00")
    # Other protocols' first bytes: none is taken for MQTT.
    for data in (b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                 b"*1\r\n$4\r\nPING\r\n", b"+OK\r\n", b":12\r\n", b"PING\r\n", b"get k\r\n", b"VALUE k 0 1\r\nv\r\nEND\r\n",
                 b"\x21\x00\x00\x00\x03SELECT 1", b"\x4a\x00\x00\x00\x0a5.5.5-10", b"\x00\x00\x00\x08\x04\xd2\x16\x2f",
                 b"Q\x00\x00\x00\x0dSELECT 1\x00", b"\x00\x1d\x12\x34\x01\x00\x00\x01", b"PUB a 1\r\nx\r\n",
                 b"INFO {}\r\n", b"\xc0\x00\x00\x00\x03", b"\x30\x00", b"@\x02\x00\x00"):  # fmt: skip
        assert not starts_request(data) and not starts_response(data), data


def test_detection_in_the_registry():
    assert protocols.detect(V311[0][1], None)[::2] == ("mqtt", True)
    assert protocols.detect(V5[ATTACH][1], None)[::2] == ("mqtt", True)
    # A PUBLISH of a 3-letter topic longer than 127 bytes would be a MySQL COM_QUERY to MySQL's test.
    pub = b"\x30\x8a\x01\x00\x03foo" + b"x" * 133
    assert protocols.detect(pub, True)[0] == "mqtt"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_arbitrary_bytes_never_raise(parts):
    feed_alternating(MqttConnection(), parts, missing=50)


_PACKETS = st.sampled_from([b for _, b in V311 + V5] + [b"\x90\x03\x00\x06\x80", b"\xe0\x02\x8e\x00",
                                                         b"\xf0\x00", b"\x32\xff\x7f\x00\x01t"])  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.lists(_PACKETS, min_size=1, max_size=4), st.integers(0, 40)), max_size=8))
def test_packet_streams_with_holes_never_raise(parts):
    conn = MqttConnection()
    for i, (side, packets, cut) in enumerate(parts):
        data = b"".join(packets)
        conn.feed(side, chunk(data[: max(1, len(data) - cut)], t=i, size=len(data)))
        starts_request(data[:cut]), starts_response(data[cut:])  # detection on any piece must not raise either
    conn.close(99)


@pytest.mark.parametrize("version", ["311", "5"])
def test_real_paho_through_a_relay(version, tmp_path):
    """paho-mqtt against mosquitto with the bytes relayed and recorded (no eBPF needed)."""
    with mosquitto(tmp_path) as (_, port):
        relay = Relay(port)
        out = subprocess.run([sys.executable, "-c", CLIENT, str(relay.port), "relay", version], input="go\n",
                             capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        pieces = relay.close()
    assert out.returncode == 0 and out.stdout.split() == ["ready", "done"], out.stderr
    spans = ordered(spans_of(pieces))
    assert [(s.name, s.status) for s in spans] == [(n, "ok") for n in EARLY + AFTER_ATTACH]


CLIENT = f"""import sys, threading, time
import paho.mqtt.client as mqtt
port, mode, version = int(sys.argv[1]), sys.argv[2], sys.argv[3]
USER, PASSWORD = "{USER}", "{PASSWORD}"
proto = mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311
got, acks = [], []
subscribed = threading.Event()

def client(cid, password=PASSWORD):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=proto)
    c.username_pw_set(USER, password)
    c.on_message = lambda cl, ud, msg: got.append(msg.payload)
    c.on_subscribe = lambda cl, ud, mid, codes, props: acks.append([int(getattr(x, "value", x)) for x in codes])
    c.on_unsubscribe = lambda cl, ud, mid, codes, props: acks.append("unsub")
    return c

def wait(pred, what):
    for _ in range(500):
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {{what}}: {{got}} {{acks}}")

c = client("early-" + version)
c.connect("127.0.0.1", port, keepalive=60)
c.loop_start()
c.subscribe("demo/in", qos=1)
wait(lambda: acks, "suback")
c.publish("demo/in", b"before", qos=1).wait_for_publish(5)
wait(lambda: got == [b"before"], "first delivery")
print("ready", flush=True)
sys.stdin.readline()
# Traced from here: the connection above was opened and used before.
c.publish("demo/in", b"q0", qos=0)
c.publish("demo/in", b"q1", qos=1).wait_for_publish(5)
c.publish("demo/in", b"q2", qos=2).wait_for_publish(5)
wait(lambda: len(got) == 4, "deliveries")
c.unsubscribe("demo/in")
wait(lambda: len(acks) == 2, "unsuback")
c.disconnect()
c.loop_stop()
if mode == "relay":  # the relay takes one connection
    print("done", flush=True)
    sys.exit(0)
# A connection opened while traced, and one refused for its password.
late = client("late-" + version)
late.connect("127.0.0.1", port, keepalive=60)
late.loop_start()
late.publish("demo/late", b"x" * 3000, qos=1).wait_for_publish(5)
late.disconnect()
late.loop_stop()
bad = client("bad-" + version, password="wrong")
rc = []
bad.on_connect = lambda cl, ud, flags, reason, props: rc.append(reason)
bad.connect("127.0.0.1", port, keepalive=60)
bad.loop_start()
wait(lambda: rc, "refused connack")
bad.loop_stop()
assert rc[0].is_failure, rc
print("done", flush=True)
"""


@pytest.mark.parametrize("version", ["311", "5"])
def test_live_paho_and_mosquitto_attached_mid_stream_and_their_capture(version, collector, store, tmp_path):
    from servers import replayed_spans, span_key, tshark_capture

    with mosquitto(tmp_path) as (broker, port), tshark_capture(tmp_path / "mqtt.pcapng", [port]) as cap:
        client_recs, broker_recs = attached_mid_stream(collector, store, broker, [CLIENT, str(port), "live", version])
    expected = sorted(AFTER_ATTACH + LATE + ["mqtt CONNECT"])
    for recs, kind in ((client_recs, "CLIENT"), (broker_recs, "SERVER")):
        pipeline = SpanPipeline()
        spans = [s for s in pipeline.push(recs) + pipeline.close_all(10**19) if s.protocol == "mqtt"]
        assert sorted(s.name for s in spans) == expected, (kind, sorted(s.name for s in spans))
        assert all(s.kind == kind for s in spans), kind
        assert [(s.name, s.status, s.status_code) for s in spans if s.status != "ok"] == [REFUSED], kind
        late = next(s for s in spans if s.name == "mqtt PUBLISH demo/late")
        assert late.req_size > 3000 and late.resp_head.startswith(b"@") and late.end_ns > late.start_ns
        assert all(b"s3cret" not in s.req_head and b"wrong" not in s.req_head for s in spans)
        if kind == "SERVER":
            replayed = [s for s in replayed_spans(cap) if s.protocol == "mqtt"]
            live = Counter(map(span_key, spans))
            # The capture began before the first connection: it also holds what came before the attach.
            assert not live - Counter(map(span_key, replayed))
            assert sorted(s.name for s in replayed if span_key(s) not in live) == sorted(EARLY)
