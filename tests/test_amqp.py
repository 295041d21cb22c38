"""AMQP 0-9-1 on frames built by hand from the specification and by pika's encoder, and live
between pika and Debian's rabbitmq-server (one broker for the module), with its capture replayed."""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from parsing import chunk, feed_alternating
from pika import frame as pika_frame
from pika import spec

from deeptrace import protocols
from deeptrace.capture.pipeline import SpanPipeline
from deeptrace.protocols import amqp
from deeptrace.protocols.amqp import PROTOCOL_HEADER, AmqpConnection, starts_request, starts_response
from deeptrace.protocols.redaction import REDACTED, redact_span_parts

PASSWORD = "hunter2-s3cret"


def method(channel: int, m) -> bytes:
    return pika_frame.Method(channel, m).marshal()


def content(channel: int, body: bytes, props: spec.BasicProperties | None = None, frame_max: int = 0) -> bytes:
    """A content header and the body in frames of at most frame_max bytes (one frame if 0)."""
    out = pika_frame.Header(channel, len(body), props or spec.BasicProperties()).marshal()
    step = frame_max or max(len(body), 1)
    for i in range(0, len(body), step):
        out += pika_frame.Body(channel, body[i : i + step]).marshal()
    return out


def hand_frame(kind: int, channel: int, payload: bytes) -> bytes:
    """A frame as the specification draws it (section 4.2.3): type, channel, size, payload, 0xCE."""
    return struct.pack("!BHI", kind, channel, len(payload)) + payload + b"\xce"


def shortstr(s: bytes) -> bytes:
    return bytes([len(s)]) + s


START = method(0, spec.Connection.Start(server_properties={"product": "RabbitMQ"}, mechanisms="PLAIN AMQPLAIN"))
START_OK = method(0, spec.Connection.StartOk({"product": "pika"}, "PLAIN", f"\0guest\0{PASSWORD}", "en_US"))
TUNE = method(0, spec.Connection.Tune(2047, 131072, 60))
TUNE_OK = method(0, spec.Connection.TuneOk(2047, 131072, 60))
OPEN = method(0, spec.Connection.Open("/"))
OPEN_OK = method(0, spec.Connection.OpenOk())
PROPS = spec.BasicProperties(content_type="text/plain", message_id="m-1", correlation_id="c-9", delivery_mode=2,
                             headers={"traceparent": "00-ab-cd-01"})  # fmt: skip
PUBLISH = method(1, spec.Basic.Publish(exchange="orders", routing_key="eu.new")) + content(1, b"order 42", PROPS)
DELIVER = method(1, spec.Basic.Deliver("ctag-1", 7, False, "orders", "eu.new")) + content(1, b"order 42", PROPS)
DECLARE = method(1, spec.Queue.Declare(queue="jobs", durable=True))
DECLARE_OK = method(1, spec.Queue.DeclareOk("jobs", 3, 1))
HEARTBEAT = pika_frame.Heartbeat().marshal()
CLOSE_404 = method(2, spec.Channel.Close(404, "NOT_FOUND - no queue 'missing' in vhost '/'", 50, 10))


def shipped(msg) -> bytes:
    """A message's head as a span carries it off the host (spans.make_span redacts every head)."""
    return redact_span_parts(msg.protocol, {}, msg.head, b"")[0]


def handshake(conn: AmqpConnection) -> list:
    out = conn.feed(True, chunk(PROTOCOL_HEADER)) + conn.feed(False, chunk(START, t=1))
    out += conn.feed(True, chunk(START_OK, t=2)) + conn.feed(False, chunk(TUNE, t=3))
    out += conn.feed(True, chunk(TUNE_OK + OPEN, t=4)) + conn.feed(False, chunk(OPEN_OK, t=5))
    return out


def test_handshake_login_and_open_with_the_password_kept_out():
    msgs = handshake(AmqpConnection())
    assert [(m.is_request, m.name, m.pair_key) for m in msgs] == [
        (True, "amqp connection.start-ok", (0, 10)), (False, None, (0, 10)),
        (True, "amqp connection.open", (0, 10)), (False, None, (0, 10))]  # fmt: skip
    login = msgs[0]
    assert login.attributes["amqp.sasl.mechanism"] == "PLAIN" and msgs[2].attributes["amqp.vhost"] == "/"
    assert PASSWORD.encode() not in shipped(login) and shipped(login).endswith(REDACTED.encode())
    assert shipped(login).endswith(b"\x05PLAIN" + REDACTED.encode())  # cut where the response starts
    assert not any(PASSWORD in str(v) for m in msgs for v in m.attributes.values())


@pytest.mark.parametrize("props_size", [0, 400])  # client properties inside, and past, the head
def test_start_ok_head_never_holds_the_response(props_size):
    start_ok = method(0, spec.Connection.StartOk({"p": "x" * props_size}, "PLAIN", f"\0u\0{PASSWORD}", "en_US"))
    secure_ok = method(0, spec.Connection.SecureOk(f"token {PASSWORD}"))
    conn = AmqpConnection()
    msgs = conn.feed(True, chunk(start_ok)) + conn.feed(False, chunk(method(0, spec.Connection.Secure("c")), t=1))
    msgs += conn.feed(True, chunk(secure_ok, t=2))
    assert [m.name for m in msgs if m.is_request] == ["amqp connection.start-ok", "amqp connection.secure-ok"]
    assert all(PASSWORD.encode()[:4] not in shipped(m) for m in msgs)
    update = method(0, spec.Connection.UpdateSecret(f"token {PASSWORD}", "refresh"))
    (msg,) = conn.feed(True, chunk(update, t=3))
    assert msg.name == "amqp connection.update-secret" and PASSWORD.encode()[:4] not in shipped(msg)


def test_secret_application_headers_and_body_pairs_are_redacted():
    props = spec.BasicProperties(content_type="application/json", headers={
        "traceparent": "00-ab-cd-01", "X-Auth-Token": PASSWORD, "after": "x"})  # fmt: skip
    pub = method(1, spec.Basic.Publish(exchange="", routing_key="jobs"))
    (msg,) = AmqpConnection().feed(True, chunk(pub + content(1, b'{"user": "ann", "password": "p4ss"}', props)))
    assert PASSWORD.encode() not in shipped(msg) and b"traceparent" in shipped(msg)
    (msg,) = AmqpConnection().feed(True, chunk(pub + content(1, b'{"user": "ann", "password": "p4ss"}')))
    assert b"p4ss" not in shipped(msg) and b'"user": "ann"' in shipped(msg)


def test_publish_is_one_message_with_its_content_and_one_way():
    (msg,) = AmqpConnection().feed(True, chunk(PUBLISH))
    assert (msg.name, msg.size, msg.expects_response, msg.pair_key) == ("amqp basic.publish", len(PUBLISH), False, None)
    expected = {"messaging.system": "rabbitmq", "messaging.destination.name": "orders",
                "messaging.rabbitmq.destination.routing_key": "eu.new", "messaging.message.id": "m-1",
                "messaging.message.conversation_id": "c-9", "messaging.message.body.size": 8,
                "messaging.operation.type": "send", "messaging.operation.name": "basic.publish"}  # fmt: skip
    assert {k: msg.attributes.get(k) for k in expected} == expected
    assert b"order 42" in msg.head  # the head runs on into the content


def test_default_exchange_names_the_queue_by_routing_key():
    pub = method(1, spec.Basic.Publish(exchange="", routing_key="jobs")) + content(1, b"x")
    (msg,) = AmqpConnection().feed(True, chunk(pub))
    assert msg.attributes["messaging.destination.name"] == "jobs"


@pytest.mark.parametrize("cut", range(1, len(PUBLISH)))
def test_publish_split_at_every_byte(cut):
    conn = AmqpConnection()
    msgs = conn.feed(True, chunk(PUBLISH[:cut], t=0)) + conn.feed(True, chunk(PUBLISH[cut:], t=1))
    assert [(m.name, m.size, m.attributes["messaging.message.id"]) for m in msgs] == [
        ("amqp basic.publish", len(PUBLISH), "m-1")]  # fmt: skip
    assert msgs[0].start_ns == 0 and msgs[0].end_ns == 2


def test_body_in_many_frames_and_past_the_capture():
    body = bytes(range(256)) * 200
    pub = method(1, spec.Basic.Publish(exchange="", routing_key="big")) + content(1, body, frame_max=4096)
    after = method(1, spec.Basic.Publish(exchange="", routing_key="next")) + content(1, b"x")
    conn = AmqpConnection()
    (big,) = conn.feed(True, chunk(pub[:1024], size=len(pub)))
    (nxt,) = conn.feed(True, chunk(after, t=5))
    assert (big.size, big.partial, big.attributes["messaging.message.body.size"]) == (len(pub), False, len(body))
    assert (nxt.attributes["messaging.destination.name"], nxt.size, nxt.partial) == ("next", len(after), False)


def test_deliver_is_a_one_way_push_from_the_server():
    (msg,) = AmqpConnection().feed(False, chunk(DELIVER))
    assert (msg.is_request, msg.expects_response, msg.name, msg.size) == (True, False, "amqp basic.deliver", len(DELIVER))
    assert msg.attributes["amqp.consumer_tag"] == "ctag-1"
    assert msg.attributes["messaging.rabbitmq.message.delivery_tag"] == 7
    assert msg.attributes["messaging.destination.name"] == "orders"


def test_content_of_two_channels_interleaved():
    a = method(1, spec.Basic.Publish(exchange="", routing_key="a")), content(1, b"aaaa")
    b = method(2, spec.Basic.Publish(exchange="", routing_key="b")), content(2, b"bb")
    msgs = AmqpConnection().feed(True, chunk(a[0] + b[0] + HEARTBEAT + b[1] + a[1]))
    assert [(m.attributes["messaging.destination.name"], m.size) for m in msgs] == [
        ("b", len(b[0]) + len(b[1])), ("a", len(a[0]) + len(a[1]))]  # fmt: skip


def test_declare_pairs_with_its_ok_on_channel_and_class():
    conn = AmqpConnection()
    (req,) = conn.feed(True, chunk(DECLARE))
    (resp,) = conn.feed(False, chunk(HEARTBEAT + DECLARE_OK, t=1))
    assert (req.name, req.pair_key, resp.pair_key, resp.error) == ("amqp queue.declare", (1, 50), (1, 50), False)
    assert resp.attributes == {"messaging.destination.name": "jobs", "amqp.queue": "jobs", "amqp.message_count": 3,
                               "amqp.consumer_count": 1}  # fmt: skip


def test_server_named_queue_comes_from_the_reply():
    conn = AmqpConnection()
    (req,) = conn.feed(True, chunk(method(1, spec.Queue.Declare(queue="", exclusive=True))))
    (resp,) = conn.feed(False, chunk(method(1, spec.Queue.DeclareOk("amq.gen-XyZ", 0, 0)), t=1))
    assert "messaging.destination.name" not in req.attributes
    assert resp.attributes["messaging.destination.name"] == "amq.gen-XyZ"


def test_nowait_declare_expects_no_reply():
    (req,) = AmqpConnection().feed(True, chunk(method(1, spec.Exchange.Declare(exchange="ex", nowait=True))))
    assert (req.name, req.expects_response, req.pair_key) == ("amqp exchange.declare", False, None)


def test_get_ok_with_content_answers_get_and_get_empty_too():
    conn = AmqpConnection()
    get = method(3, spec.Basic.Get(queue="jobs"))
    get_ok = method(3, spec.Basic.GetOk(9, False, "", "jobs", 4)) + content(3, b"payload")
    (req,) = conn.feed(True, chunk(get))
    assert conn.feed(False, chunk(get_ok[:30], t=1)) == []
    (resp,) = conn.feed(False, chunk(get_ok[30:], t=2))
    assert (req.pair_key, resp.pair_key, resp.size, resp.is_request) == ((3, 60), (3, 60), len(get_ok), False)
    assert resp.attributes["messaging.rabbitmq.message.delivery_tag"] == 9
    assert resp.attributes["amqp.message_count"] == 4 and resp.attributes["messaging.message.body.size"] == 7
    conn.feed(True, chunk(get, t=3))
    (empty,) = conn.feed(False, chunk(method(3, spec.Basic.GetEmpty()), t=4))
    assert (empty.pair_key, empty.error, empty.attributes) == ((3, 60), False, {"amqp.get_empty": True})


def test_channel_close_is_the_error_of_the_request_it_fails():
    conn = AmqpConnection()
    (req,) = conn.feed(True, chunk(method(2, spec.Queue.Declare(queue="missing", passive=True))))
    (resp,) = conn.feed(False, chunk(CLOSE_404, t=1))
    assert (resp.pair_key, resp.error, resp.status_code) == (req.pair_key, True, "404")
    assert resp.attributes["error.type"] == "NOT_FOUND" and resp.attributes["amqp.failed_method"] == "queue.declare"
    assert "no queue 'missing'" in resp.attributes["amqp.reply_text"]
    assert conn.feed(True, chunk(method(2, spec.Channel.CloseOk()), t=2)) == []  # the close is answered already


def test_server_closing_on_its_own_is_answered_by_close_ok():
    # Publish to a missing exchange: the publish is one-way, the server closes the channel.
    conn = AmqpConnection()
    conn.feed(True, chunk(method(1, spec.Basic.Publish(exchange="nope", routing_key="k")) + content(1, b"x")))
    (close,) = conn.feed(False, chunk(method(1, spec.Channel.Close(404, "NOT_FOUND - no exchange 'nope'", 60, 40))))
    (ok,) = conn.feed(True, chunk(method(1, spec.Channel.CloseOk()), t=2))
    assert (close.is_request, close.expects_response, close.name) == (True, True, "amqp channel.close")
    assert (ok.is_request, ok.pair_key, ok.error, ok.status_code) == (False, close.pair_key, True, "404")
    assert close.attributes["amqp.failed_method"] == "basic.publish"


def test_bad_login_is_the_start_ok_error():
    conn = AmqpConnection()
    (login,) = conn.feed(True, chunk(START_OK))
    refused = method(0, spec.Connection.Close(403, "ACCESS_REFUSED - Login was refused", 10, 11))
    (resp,) = conn.feed(False, chunk(refused, t=1))
    assert (resp.pair_key, resp.error, resp.status_code) == (login.pair_key, True, "403")


def test_client_close_pairs_with_close_ok():
    conn = AmqpConnection()
    (req,) = conn.feed(True, chunk(method(1, spec.Channel.Close(200, "Normal shutdown", 0, 0))))
    (resp,) = conn.feed(False, chunk(method(1, spec.Channel.CloseOk()), t=1))
    assert (req.name, resp.pair_key, resp.error) == ("amqp channel.close", (1, 20), False)


def test_acks_are_one_way_either_way():
    conn = AmqpConnection()
    mine = conn.feed(True, chunk(method(1, spec.Basic.Ack(5, multiple=True)) + method(1, spec.Basic.Nack(6))
                                 + method(1, spec.Basic.Reject(7, requeue=False))))  # fmt: skip
    confirms = conn.feed(False, chunk(method(1, spec.Basic.Ack(1)), t=1))  # publisher confirms
    assert [(m.name, m.expects_response, m.attributes["messaging.rabbitmq.message.delivery_tag"]) for m in mine] == [
        ("amqp basic.ack", False, 5), ("amqp basic.nack", False, 6), ("amqp basic.reject", False, 7)]  # fmt: skip
    assert [(m.name, m.is_request, m.expects_response) for m in confirms] == [("amqp basic.ack", True, False)]


def test_hand_built_frames_read_as_pika_writes_them():
    # Basic.Publish (60, 40): reserved short, exchange, routing key, bits mandatory|immediate.
    publish = hand_frame(1, 4, struct.pack("!HHH", 60, 40, 0) + shortstr(b"ex") + shortstr(b"rk") + b"\x01")
    assert publish == method(4, spec.Basic.Publish(exchange="ex", routing_key="rk", mandatory=True))
    header = hand_frame(2, 4, struct.pack("!HHQH", 60, 0, 3, 1 << 7) + shortstr(b"id-7"))  # message-id: flag bit 7
    (msg,) = AmqpConnection().feed(True, chunk(publish + header + hand_frame(3, 4, b"abc")))
    assert (msg.attributes["messaging.message.id"], msg.attributes["amqp.channel"]) == ("id-7", 4)


def test_bad_end_octet_loses_step_and_a_syscall_at_a_frame_gets_it_back():
    conn = AmqpConnection()
    broken = DECLARE[:-1] + b"\x00"
    assert conn.feed(True, chunk(broken)) == []
    (req,) = conn.feed(True, chunk(DECLARE, t=1))
    assert req.name == "amqp queue.declare"


def test_huge_size_fields_are_skipped_not_allocated():
    conn = AmqpConnection()
    body_header = struct.pack("!BHI", 3, 1, amqp.MAX_FRAME)
    assert conn.feed(True, chunk(body_header, size=1 << 20)) == []
    assert conn.feed(False, chunk(struct.pack("!BHI", 1, 0, amqp.MAX_FRAME + 1) + b"\0" * 8)) == []


# ---- detection ----

MID_STREAM_CLIENT = [PUBLISH, DECLARE, HEARTBEAT + PUBLISH, method(1, spec.Basic.Ack(1)) + DECLARE, TUNE_OK, OPEN]
MID_STREAM_SERVER = [DELIVER, DECLARE_OK, HEARTBEAT + DECLARE_OK, START, TUNE, method(1, spec.Basic.ConsumeOk("c"))]
UNDECIDED = [HEARTBEAT, method(1, spec.Basic.Ack(1)), CLOSE_404, content(1, b"body"), DECLARE[:-1]]


def test_direction_from_the_first_bytes_even_mid_stream():
    assert starts_request(PROTOCOL_HEADER) and not starts_response(PROTOCOL_HEADER)
    assert all(starts_request(d) and not starts_response(d) for d in MID_STREAM_CLIENT)
    assert all(starts_response(d) and not starts_request(d) for d in MID_STREAM_SERVER)
    # Frames either side sends say nothing yet; a frame not all here cannot be checked.
    assert not any(starts_request(d) or starts_response(d) for d in UNDECIDED)


def other_protocols_first_bytes() -> list[bytes]:
    from test_http2 import SETTINGS
    from test_memcached import GET_HIT, SET
    from test_redis import GET, REPLIES

    return [b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n", protocols.http2.PREFACE,
            SETTINGS, SET, GET_HIT, GET, *REPLIES, b"\x00\x00\x00\x08\x04\xd2\x16\x2f",  # postgres SSLRequest
            b"\x00\x00\x00\x29\x00\x03\x00\x00user\x00postgres\x00", b"Q\x00\x00\x00\x0dselect 1\x00",
            b"\x4a\x00\x00\x00\x0a8.0.36\x00", b"\x0f\x00\x00\x00\x03select 1 + 1",  # MySQL greeting, COM_QUERY
            b"\x80\x00\x00\x03\x00\x00\x00\x00\x00\x00\x00\x03" + bytes(12) + b"key",  # memcached binary get
            b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03www\x07example\x03com\x00\x00\x01\x00\x01"]  # fmt: skip


def test_no_other_protocol_takes_amqp_and_amqp_takes_none_of_theirs():
    ours = [PROTOCOL_HEADER, *MID_STREAM_CLIENT, *MID_STREAM_SERVER, *UNDECIDED, START_OK, CLOSE_404]
    for spec_ in protocols.PROTOCOLS:
        if spec_.name == amqp.PROTOCOL:
            continue
        taken = [d[:16] for d in ours if spec_.is_request(d) or spec_.is_response(d)]
        assert taken == [], spec_.name
    theirs = other_protocols_first_bytes()
    assert [d for d in theirs if starts_request(d) or starts_response(d)] == []


def test_detect_with_amqp_in_its_place():
    for data in [PROTOCOL_HEADER, *MID_STREAM_CLIENT]:
        assert protocols.detect(data, None)[0:3:2] == ("amqp", True)
    for data in MID_STREAM_SERVER:
        assert protocols.detect(data, None)[0:3:2] == ("amqp", False)
    for data in other_protocols_first_bytes():
        found = protocols.detect(data, None)
        assert found is None or found[0] != "amqp"


def test_pipeline_joined_mid_stream_makes_named_spans():
    from test_pipeline import Conn

    c = Conn(role="unknown")
    get = method(1, spec.Basic.Get(queue="jobs"))
    get_ok = method(1, spec.Basic.GetOk(1, False, "", "jobs", 0)) + content(1, b"job")
    recs = [c.rec("egress", DELIVER[5:]), c.rec("ingress", HEARTBEAT), c.rec("ingress", PUBLISH), c.rec("egress", DELIVER),
            c.rec("ingress", get), c.rec("egress", get_ok)]  # fmt: skip
    spans = SpanPipeline(host="h").push(recs)
    assert [(s.name, s.status, s.resp_size) for s in spans] == [
        ("amqp basic.publish", "ok", 0), ("amqp basic.deliver", "ok", 0), ("amqp basic.get", "ok", len(get_ok))]  # fmt: skip


# ---- fuzz ----

@settings(max_examples=300)
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_arbitrary_bytes_never_raise(parts):
    feed_alternating(AmqpConnection(), parts, missing=50)


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=120), max_size=6), st.integers(0, 5))
def test_frames_with_garbage_and_holes_never_raise(parts, which):
    frames = [PROTOCOL_HEADER, START_OK, PUBLISH, DELIVER, DECLARE, CLOSE_404, HEARTBEAT]
    stream = [frames[(which + i) % len(frames)] + p for i, p in enumerate(parts)]
    feed_alternating(AmqpConnection(), stream, missing=7)


@settings(max_examples=200)
@given(st.lists(st.integers(1, len(PUBLISH) * 3 - 1), max_size=8))
def test_any_syscall_boundaries_give_the_same_messages(cuts):
    data = PUBLISH + DECLARE + PUBLISH
    conn = AmqpConnection()
    msgs, last = [], 0
    for i, cut in enumerate([*sorted(set(cuts)), len(data)]):
        msgs += conn.feed(True, chunk(data[last:cut], t=i)) if cut > last else []
        last = cut
    assert [(m.name, m.size) for m in msgs] == [("amqp basic.publish", len(PUBLISH)), ("amqp queue.declare", len(DECLARE)),
                                                ("amqp basic.publish", len(PUBLISH))]  # fmt: skip


# ---- live: pika against rabbitmq-server ----

CLIENT = textwrap.dedent("""
    import sys, pika
    params = pika.ConnectionParameters("127.0.0.1", int(sys.argv[1]), heartbeat=0,
                                       credentials=pika.PlainCredentials("guest", "guest"))
    early = pika.BlockingConnection(params)  # opened and used before anyone traces
    ch = early.channel()
    ch.queue_declare("early")
    ch.basic_publish("", "early", b"before tracing")
    assert ch.basic_get("early", auto_ack=True)[2] == b"before tracing"
    print("ready", flush=True)
    sys.stdin.readline()
    ch.basic_publish("", "early", b"after", pika.BasicProperties(message_id="m-early"))
    got, _, body = ch.basic_get("early")
    assert body == b"after"
    ch.basic_ack(got.delivery_tag)
    ch.queue_declare("early", passive=True)
    early.close()

    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.queue_declare("jobs")
    ch.basic_qos(prefetch_count=10)
    for i in range(3):
        ch.basic_publish("", "jobs", b"job %d" % i, pika.BasicProperties(message_id="job-%d" % i))
    n = 0
    for got, props, body in ch.consume("jobs", inactivity_timeout=10):
        assert body == b"job %d" % n
        ch.basic_ack(got.delivery_tag)
        n += 1
        if n == 3:
            break
    ch.cancel()
    ch.basic_publish("", "jobs", b"one more")
    assert ch.basic_get("jobs", auto_ack=True)[2] == b"one more"
    assert ch.basic_get("jobs")[0] is None
    try:
        ch.queue_declare("missing", passive=True)
        raise SystemExit("a missing queue was declared passively")
    except pika.exceptions.ChannelClosedByBroker as e:
        assert e.reply_code == 404
    conn.close()
    print("done", flush=True)
""")

# What the traced part of the run is, exchange by exchange: (name, status, status code).
EARLY = [("amqp basic.publish", "ok", None), ("amqp basic.get", "ok", None), ("amqp basic.ack", "ok", None),
         ("amqp queue.declare", "ok", None), ("amqp channel.close", "ok", None),
         ("amqp connection.close", "ok", None)]  # fmt: skip
WHOLE = [("amqp connection.start-ok", "ok", None), ("amqp connection.open", "ok", None),
         ("amqp channel.open", "ok", None), ("amqp queue.declare", "ok", None), ("amqp basic.qos", "ok", None),
         *[("amqp basic.publish", "ok", None)] * 4, ("amqp basic.consume", "ok", None),
         *[("amqp basic.deliver", "ok", None)] * 3, *[("amqp basic.ack", "ok", None)] * 3,
         ("amqp basic.cancel", "ok", None), ("amqp basic.get", "ok", None), ("amqp basic.get", "ok", None),
         ("amqp queue.declare", "error", "404"), ("amqp connection.close", "ok", None)]  # fmt: skip


@pytest.fixture(scope="module")
def broker():
    from rabbit import rabbitmq

    with rabbitmq() as (pid, port):
        yield pid, port


def test_live_pika_and_rabbitmq_and_their_capture(collector, store, broker, tmp_path):
    from servers import replayed_spans, span_key, tshark_capture

    pid, port = broker
    client = subprocess.Popen([sys.executable, "-c", CLIENT, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert client.stdout.readline().strip() == "ready"
        collector.trace(pid)
        collector.trace(client.pid)
        with tshark_capture(tmp_path / "amqp.pcapng", [port]) as cap:
            client.stdin.write("go\n")
            client.stdin.flush()
            assert client.stdout.readline().strip() == "done"
            assert client.wait(30) == 0
            server_recs = store.wait_for(pid, lambda rs: sum(b"\x00\x0a\x00\x33" in r.payload for r in rs) >= 2,
                                         timeout_s=10)  # both Connection.Close-Ok  # fmt: skip
            client_recs = store.settle(client.pid, quiet_s=0.5)
    finally:
        client.kill()
        client.wait()
    expected = sorted(EARLY + WHOLE, key=str)
    for recs, kind in ((server_recs, "SERVER"), (client_recs, "CLIENT")):
        spans = [s for s in SpanPipeline().push(recs) if s.protocol == "amqp"]
        assert sorted([(s.name, s.status, s.status_code) for s in spans], key=str) == expected, kind
        assert all(s.kind == kind for s in spans)
        error = next(s for s in spans if s.status == "error")
        assert error.attributes["error.type"] == "NOT_FOUND" and error.attributes["amqp.queue"] == "missing"
        login = next(s for s in spans if s.name == "amqp connection.start-ok")
        assert b"guest\x00guest" not in login.req_head and REDACTED.encode() in login.req_head
        delivered = sorted(s.attributes["messaging.message.id"] for s in spans if s.name == "amqp basic.deliver")
        assert delivered == ["job-0", "job-1", "job-2"]
        early = next(s for s in spans if s.attributes.get("messaging.message.id") == "m-early")
        assert early.name == "amqp basic.publish" and early.attributes["messaging.destination.name"] == "early"
        if kind == "SERVER":
            assert sorted(map(span_key, replayed_spans(cap))) == sorted(map(span_key, spans))
