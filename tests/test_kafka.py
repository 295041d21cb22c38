"""Kafka: requests and responses encoded by kafka-python's own protocol classes (every API
it knows, every version, flexible ones too), and live: kafka-python's KafkaProducer against
a small broker that answers with kafka-python's response classes, traced with eBPF and
captured with tshark."""

from __future__ import annotations

import textwrap
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.protocol.api_message import ApiMessage
from kafka.protocol.consumer import FetchRequest, FetchResponse
from kafka.protocol.metadata import ApiVersionsRequest, ApiVersionsResponse, MetadataRequest, MetadataResponse
from kafka.protocol.producer import ProduceRequest, ProduceResponse
from kafka.protocol.sasl import SaslAuthenticateRequest, SaslHandshakeRequest
from parsing import chunk, feed_alternating, feed_split

from deeptrace.capture.pipeline import SpanPipeline
from deeptrace.protocols import kafka
from deeptrace.protocols.kafka import APIS, KafkaConnection, starts_request

TOPIC_ID = uuid.UUID("0b7e2f6c-1d2a-4c55-9a51-3c1f7a0d9e42")


def encode(msg: ApiMessage, version: int, corr: int = 7, client_id: str = "shop-app") -> bytes:
    """The bytes kafka-python sends (requests) or a broker built with it would (responses)."""
    msg.API_VERSION = version
    if msg.is_request():
        msg.with_header(correlation_id=corr, client_id=client_id)
    else:
        msg.with_header(correlation_id=corr)
    return bytes(msg.encode(header=True, framed=True))


def produce(topic: str = "orders", partition: int = 3, acks: int = -1, records: bytes = b"r" * 40) -> ProduceRequest:
    data = ProduceRequest.TopicProduceData
    return ProduceRequest(transactional_id=None, acks=acks, timeout_ms=1000, topic_data=[data(
        name=topic, topic_id=TOPIC_ID, partition_data=[data.PartitionProduceData(index=partition, records=records)])])  # fmt: skip


def produce_response(error: int = 0, topic: str = "orders") -> ProduceResponse:
    r = ProduceResponse.TopicProduceResponse
    return ProduceResponse(throttle_time_ms=0, responses=[r(name=topic, topic_id=TOPIC_ID, partition_responses=[
        r.PartitionProduceResponse(index=3, error_code=error, base_offset=42)])])  # fmt: skip


def fetch(topic: str = "orders") -> FetchRequest:
    t = FetchRequest.FetchTopic
    return FetchRequest(max_wait_ms=500, min_bytes=1, topics=[t(topic=topic, topic_id=TOPIC_ID, partitions=[
        t.FetchPartition(partition=1, fetch_offset=10, partition_max_bytes=1 << 20)])])  # fmt: skip


def fetch_response(error: int = 0, top_error: int = 0, records: bytes = b"") -> FetchResponse:
    t = FetchResponse.FetchableTopicResponse
    return FetchResponse(throttle_time_ms=0, error_code=top_error, session_id=0, responses=[t(
        topic="orders", topic_id=TOPIC_ID, partitions=[t.PartitionData(
            partition_index=1, error_code=error, high_watermark=11, records=records)])])  # fmt: skip


def metadata_response(error: int = 0) -> MetadataResponse:
    t, b = MetadataResponse.MetadataResponseTopic, MetadataResponse.MetadataResponseBroker
    p = t.MetadataResponsePartition
    return MetadataResponse(throttle_time_ms=0, cluster_id="c1", controller_id=0,
                            brokers=[b(node_id=0, host="broker-0.example", port=9092, rack="r1")],
                            topics=[t(error_code=error, name="orders", topic_id=TOPIC_ID, is_internal=False, partitions=[
                                p(error_code=0, partition_index=0, leader_id=0, leader_epoch=1, replica_nodes=[0, 1],
                                  isr_nodes=[0], offline_replicas=[])])])  # fmt: skip


def exchange(conn: KafkaConnection, request: bytes, response: bytes):
    (req,) = conn.feed(True, chunk(request))
    (resp,) = conn.feed(False, chunk(response, t=5))
    return req, resp


@pytest.mark.parametrize("version", [0, 2, 3, 7, 8, 9, 11, 12])
def test_produce_topic_partition_and_partition_error(version):
    req, resp = exchange(KafkaConnection(), encode(produce(), version), encode(produce_response(6), version))
    assert req.name == "kafka Produce orders" and req.pair_key == 7 == resp.pair_key
    assert req.attributes["messaging.destination.name"] == "orders"
    assert req.attributes["messaging.destination.partition.id"] == "3"
    assert req.attributes["messaging.client.id"] == "shop-app" and req.attributes["messaging.operation.type"] == "send"
    assert (resp.error, resp.status_code) == (True, "NOT_LEADER_OR_FOLLOWER")
    ok = exchange(KafkaConnection(), encode(produce(), version, corr=8), encode(produce_response(0), version, corr=8))
    assert (ok[1].error, ok[1].status_code) == (False, None)


def test_produce_by_topic_id_is_named_from_a_metadata_response_on_the_connection():
    conn = KafkaConnection()
    (req,) = conn.feed(True, chunk(encode(produce(), 13, corr=1)))
    assert req.name == "kafka Produce" and req.attributes["messaging.kafka.topic_id"] == str(TOPIC_ID)
    meta, _ = exchange(conn, encode(MetadataRequest(topics=[MetadataRequest.MetadataRequestTopic(
        name="orders", topic_id=TOPIC_ID)]), 12, corr=2), encode(metadata_response(), 12, corr=2))  # fmt: skip
    assert meta.name == "kafka Metadata orders"
    (req,) = conn.feed(True, chunk(encode(produce(), 13, corr=3)))
    assert req.name == "kafka Produce orders" and req.attributes["messaging.destination.partition.id"] == "3"


def test_topic_named_like_an_id_and_a_request_cut_before_its_partition():
    (req,) = KafkaConnection().feed(True, chunk(encode(produce(topic="id:zz"), 9)))
    assert req.name == "kafka Produce id:zz" and "messaging.kafka.topic_id" not in req.attributes
    data = encode(produce(), 9)
    cut = data.index(b"orders") + len("orders") + 1  # the partition array's length, not its first index
    (req,) = KafkaConnection().feed(True, chunk(data[:cut], size=len(data)))
    assert req.name == "kafka Produce orders" and "messaging.destination.partition.id" not in req.attributes


def test_produce_with_acks_0_is_one_way():
    (req,) = KafkaConnection().feed(True, chunk(encode(produce(acks=0), 9)))
    assert req.name == "kafka Produce orders" and not req.expects_response


@pytest.mark.parametrize("version", [0, 4, 7, 11, 12])
def test_fetch_topic_partition_and_errors(version):
    req, resp = exchange(KafkaConnection(), encode(fetch(), version), encode(fetch_response(error=1), version))
    assert req.name == "kafka Fetch orders" and req.attributes["messaging.destination.partition.id"] == "1"
    assert req.attributes["messaging.operation.type"] == "receive"
    assert (resp.error, resp.status_code) == (True, "OFFSET_OUT_OF_RANGE")
    if version >= 7:  # a top-level error code (fetch sessions)
        _, resp = exchange(KafkaConnection(), encode(fetch(), version, corr=9),
                           encode(fetch_response(top_error=70), version, corr=9))  # fmt: skip
        assert resp.status_code == "FETCH_SESSION_ID_NOT_FOUND"


@pytest.mark.parametrize("version", [13, 17, 18])
def test_fetch_by_topic_id(version):
    req, resp = exchange(KafkaConnection(), encode(fetch(), version), encode(fetch_response(), version))
    assert req.attributes["messaging.kafka.topic_id"] == str(TOPIC_ID) and not resp.error


@pytest.mark.parametrize("version", [0, 1, 4, 9, 12, 13])
def test_metadata_topic_errors(version):
    topics = [MetadataRequest.MetadataRequestTopic(name="orders", topic_id=TOPIC_ID)]
    req, resp = exchange(KafkaConnection(), encode(MetadataRequest(topics=topics), version),
                         encode(metadata_response(error=5), version))  # fmt: skip
    assert req.name == "kafka Metadata orders"
    assert (resp.error, resp.status_code) == (True, "LEADER_NOT_AVAILABLE")


@pytest.mark.parametrize("version", [0, 1, 2, 3, 4])
def test_api_versions_response_header_is_v0_even_when_flexible(version):
    v = ApiVersionsResponse.ApiVersion
    body = ApiVersionsResponse(error_code=35, api_keys=[v(api_key=0, min_version=0, max_version=9)])
    req, resp = exchange(KafkaConnection(), encode(ApiVersionsRequest(client_software_name="kafka-python",
                                                                      client_software_version="3"), version),
                         encode(body, version))  # fmt: skip
    assert req.name == "kafka ApiVersions" and req.attributes["messaging.kafka.api_version"] == version
    assert resp.status_code == "UNSUPPORTED_VERSION"


def _api_classes(kind: str) -> dict[int, type]:
    def subclasses(c):
        for s in c.__subclasses__():
            yield s
            yield from subclasses(s)

    return {c.API_KEY: c for c in subclasses(ApiMessage)
            if getattr(c, "_class_version", 0) is None and c._json.get("type") == kind}  # fmt: skip


REQUESTS, RESPONSES = _api_classes("request"), _api_classes("response")


def _valid_in(versions: str, version: int) -> bool:
    """A schema's "versions" range ("3+", "0-4", "5", "none") holds this version."""
    if versions == "none":
        return False
    if versions.endswith("+"):
        return version >= int(versions[:-1])
    low, _, high = versions.partition("-")
    return int(low) <= version <= int(high or low)


def top_error_code_first(cls: type, version: int) -> bool:
    """From kafka-python's copy of the message schema, not from the parser's table: the body
    starts with ErrorCode, or with ThrottleTimeMs and then ErrorCode."""
    names = [f["name"] for f in cls._json["fields"] if "tag" not in f and _valid_in(f["versions"], version)]
    return names[:1] == ["ErrorCode"] or names[:2] == ["ThrottleTimeMs", "ErrorCode"]
EVERY_VERSION = [(key, v) for key, cls in sorted(REQUESTS.items()) for v in range(cls.max_version + 1)]


@pytest.mark.parametrize(("key", "version"), EVERY_VERSION)
def test_every_api_and_version_kafka_python_speaks(key, version):
    data = encode(REQUESTS[key](), version, corr=1000 + key)
    assert starts_request(data), "mid-stream detection: any request can be the first bytes seen"
    conn = KafkaConnection()
    (req,) = conn.feed(True, chunk(data))
    assert req.name.split()[:2] == ["kafka", REQUESTS[key].name.removesuffix("Request")]
    assert req.size == len(data) and req.pair_key == 1000 + key
    response = RESPONSES[key]()
    for field in ("error_code",):  # a top-level error code where the API has one
        if hasattr(response, field):
            setattr(response, field, 87)
    resp_bytes = encode(response, version, corr=1000 + key)
    assert not kafka.starts_response(resp_bytes)
    (resp,) = conn.feed(False, chunk(resp_bytes))
    assert resp.pair_key == 1000 + key and resp.size == len(resp_bytes)
    if top_error_code_first(RESPONSES[key], version):
        assert resp.status_code == "INVALID_RECORD"
    elif key not in (kafka.PRODUCE, kafka.FETCH, kafka.METADATA):  # their codes sit in arrays, empty here
        assert resp.status_code is None


def test_api_table_covers_the_spec_keys_and_kafka_python_versions():
    assert set(range(76)) <= set(APIS)
    for key, cls in REQUESTS.items():
        name, highest, flexible_from = APIS[key]
        assert name == cls.name.removesuffix("Request") or (key, name) == (74, "ListConfigResources")
        assert highest >= cls.max_version
        flexible = cls._flexible_versions  # kafka-python reads "none" as negative versions
        assert flexible_from == (flexible[0] if flexible and flexible[0] >= 0 else None), name


def test_pipelined_requests_and_responses_out_of_order():
    conn = KafkaConnection()
    reqs = conn.feed(True, chunk(encode(produce(), 9, corr=1) + encode(fetch(), 12, corr=2)))
    resps = conn.feed(False, chunk(encode(fetch_response(), 12, corr=2) + encode(produce_response(), 9, corr=1)))
    assert [(m.name, m.pair_key) for m in reqs] == [("kafka Produce orders", 1), ("kafka Fetch orders", 2)]
    assert [(m.pair_key, m.error) for m in resps] == [(2, False), (1, False)]


@pytest.mark.parametrize("cut", range(1, 80, 3))
def test_split_anywhere(cut):
    conn = KafkaConnection()
    data = encode(produce(), 9)
    assert [m.name for m in feed_split(conn, True, data, cut)] == ["kafka Produce orders"]
    response = encode(produce_response(29), 9)
    assert [m.status_code for m in feed_split(conn, False, response, cut)] == ["TOPIC_AUTHORIZATION_FAILED"]


def test_message_larger_than_captured_is_skipped_through():
    conn = KafkaConnection()
    big = encode(produce(records=b"x" * 100_000), 9, corr=1)
    (req,) = conn.feed(True, chunk(big[:1024], size=len(big)))
    assert req.name == "kafka Produce orders" and req.size == len(big) and not req.partial
    resp = encode(fetch_response(records=b"y" * 50_000), 12, corr=2)
    conn.feed(True, chunk(encode(fetch(), 12, corr=2)))
    assert [m.size for m in conn.feed(False, chunk(resp[:700], size=len(resp)))] == [len(resp)]
    (req,) = conn.feed(True, chunk(encode(fetch(), 12, corr=3)))
    assert req.name == "kafka Fetch orders"


def test_sasl_authenticate_secrets_stay_out_of_heads():
    password = b"hunter2-very-secret"
    for version in (0, 1, 2):
        req = SaslAuthenticateRequest(auth_bytes=b"\0alice\0" + password)
        (msg,) = KafkaConnection().feed(True, chunk(encode(req, version)))
        assert msg.name == "kafka SaslAuthenticate" and password not in msg.head and b"alice" not in msg.head
        assert msg.head.endswith(b"[REDACTED]")


def test_sasl_handshake_v0_raw_tokens_stay_out_of_heads():
    conn = KafkaConnection()
    (hs,) = conn.feed(True, chunk(encode(SaslHandshakeRequest(mechanism="PLAIN"), 0, corr=1)))
    assert hs.name == "kafka SaslHandshake"
    token = b"\0alice\0hunter2-very-secret"
    msgs = conn.feed(True, chunk(len(token).to_bytes(4, "big") + token, t=2))
    assert all(b"hunter2" not in m.head for m in msgs) and all(not m.expects_response for m in msgs)
    assert conn.feed(False, chunk(b"\0\0\0\0", t=3)) == []  # the server's empty token
    (meta,) = conn.feed(True, chunk(encode(MetadataRequest(topics=None), 4, corr=2), t=4))
    assert meta.name == "kafka Metadata"


def test_response_to_an_unseen_request_says_only_its_id():
    conn = KafkaConnection()
    assert not conn._starts_response(encode(produce_response(), 9, corr=5))
    (resp,) = conn.feed(False, chunk(encode(produce_response(), 9, corr=5)))
    assert resp.pair_key == 5 and resp.head.endswith(b"[REDACTED]")


def test_detection_rejects_what_is_not_kafka():
    data = encode(produce(), 9)
    assert starts_request(data)
    assert not starts_request(data[:4] + b"\x03\xe7" + data[6:])  # api key 999
    assert not starts_request(data[:6] + b"\x00\x63" + data[8:])  # Produce v99
    assert not starts_request(data[:12] + b"\x00\x05ab\x00\x01c" + data[19:])  # client id not text
    assert not starts_request(b"\x7f\xff\xff\xff" + data[4:])  # 2 GiB
    postgres_startup = b"\x00\x00\x00\x25\x00\x03\x00\x00user\x00alice\x00database\x00shop\x00\x00"
    assert not starts_request(postgres_startup)


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_arbitrary_bytes_never_raise(parts):
    feed_alternating(KafkaConnection(), parts, missing=50)


@settings(max_examples=200)
@given(st.integers(0, 11), st.binary(max_size=64), st.integers(1, 60))
def test_corrupted_real_messages_never_raise(version, junk, at):
    conn = KafkaConnection()
    request, response = encode(produce(), version), encode(produce_response(), version)
    conn.feed(True, chunk(request[:at] + junk + request[at:]))
    conn.feed(False, chunk(response[:at] + junk + response[at:]))


# ---- live: kafka-python's producer, a broker made of kafka-python's response classes ----

BROKER = textwrap.dedent("""
    import socket, struct, threading, uuid
    from kafka.protocol.metadata import ApiVersionsResponse, MetadataResponse
    from kafka.protocol.producer import ProduceRequest, ProduceResponse

    TOPICS = {"orders": uuid.UUID(int=1), "locked": uuid.UUID(int=2)}
    SUPPORTED = {18: (0, 3), 3: (0, 12), 0: (0, 9)}

    def answer(key, version, corr, body, port):
        if key == 18:
            v = ApiVersionsResponse.ApiVersion
            resp = ApiVersionsResponse(version=version, error_code=0, throttle_time_ms=0, api_keys=[
                v(api_key=k, min_version=a, max_version=b) for k, (a, b) in SUPPORTED.items()])
        elif key == 3:
            t, b = MetadataResponse.MetadataResponseTopic, MetadataResponse.MetadataResponseBroker
            p = t.MetadataResponsePartition
            resp = MetadataResponse(version=version, throttle_time_ms=0, cluster_id="fake", controller_id=0,
                                    brokers=[b(node_id=0, host="127.0.0.1", port=port, rack=None)],
                                    topics=[t(error_code=0, name=n, topic_id=i, is_internal=False, partitions=[
                                        p(error_code=0, partition_index=0, leader_id=0, leader_epoch=0,
                                          replica_nodes=[0], isr_nodes=[0], offline_replicas=[])])
                                        for n, i in TOPICS.items()])
        elif key == 0:
            req = ProduceRequest.decode(body, version=version, header=True)
            if req.acks == 0:
                return None
            r = ProduceResponse.TopicProduceResponse
            resp = ProduceResponse(version=version, throttle_time_ms=0, responses=[
                r(name=t.name, partition_responses=[r.PartitionProduceResponse(
                    index=p.index, base_offset=0, error_code=29 if t.name == "locked" else 0)
                    for p in t.partition_data]) for t in req.topic_data])
        else:
            raise SystemExit(f"unexpected api key {key}")
        resp.with_header(correlation_id=corr)
        return resp.encode(header=True, framed=True)

    def serve(conn, port):
        with conn:
            while True:
                head = conn.recv(4, socket.MSG_WAITALL)
                if len(head) < 4:
                    return
                body = conn.recv(struct.unpack(">i", head)[0], socket.MSG_WAITALL)
                key, version, corr = struct.unpack_from(">hhi", body)
                out = answer(key, version, corr, body, port)
                if out is not None:
                    conn.sendall(out)

    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    print(port, flush=True)
    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c, port), daemon=True).start()
""")
CLIENT = textwrap.dedent("""
    import sys
    from kafka import KafkaProducer
    from kafka.errors import KafkaError
    sys.stdin.readline()
    p = KafkaProducer(bootstrap_servers="127.0.0.1:" + sys.argv[1], acks=1, retries=0, linger_ms=0, client_id="shop")
    p.send("orders", b"hello").get(timeout=10)
    try:
        p.send("locked", b"nope").get(timeout=10)
        raise SystemExit("expected TopicAuthorizationFailed")
    except KafkaError as e:
        assert "TopicAuthorization" in type(e).__name__, e
    p.close(timeout=5)
    print("done", flush=True)
""")
def test_live_kafka_python_producer_and_its_capture(collector, store, tmp_path):
    from servers import replayed_spans, scripted_pair, span_key

    with scripted_pair(collector, BROKER, CLIENT, tmp_path / "kafka.pcapng") as (broker, client, cap):
        client_recs = store.settle(client, quiet_s=0.5)
        server_recs = store.wait_for(broker, lambda rs: sum(r.syscall == "close" for r in rs) >= 2)
    for recs, kind in ((server_recs, "SERVER"), (client_recs, "CLIENT")):
        pipeline = SpanPipeline()
        spans = [s for s in pipeline.push(recs) + pipeline.close_all(0) if s.protocol == "kafka"]
        produced = sorted((s.name, s.status, s.status_code) for s in spans if "Produce" in s.name)
        assert produced == [("kafka Produce locked", "error", "TOPIC_AUTHORIZATION_FAILED"),
                            ("kafka Produce orders", "ok", None)], kind  # fmt: skip
        names = {s.name for s in spans}
        assert "kafka ApiVersions" in names and any(n.startswith("kafka Metadata") for n in names), names
        assert names <= {"kafka ApiVersions", "kafka Metadata", "kafka Metadata orders", "kafka Metadata locked",
                         "kafka Produce orders", "kafka Produce locked"}, names  # fmt: skip
        assert all(s.kind == kind and s.attributes["messaging.client.id"] == "shop" for s in spans)
        assert all(s.status == "ok" for s in spans if "Produce" not in s.name)
        if kind == "SERVER":
            assert sorted(map(span_key, replayed_spans(cap))) == sorted(map(span_key, spans))
