"""OTLP export, checked against a real OTLP/HTTP receiver on loopback that decodes what it gets."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1 import trace_pb2
from servers import free_port

import deeptrace
from deeptrace.capture.spans import Endpoint, Span
from deeptrace.server.otlp import OtlpExporter, convert_spans, id_bytes, spans_to_request, traces_url

SERVER, CLIENT = trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_CLIENT
UNSET, ERROR = trace_pb2.Status.STATUS_CODE_UNSET, trace_pb2.Status.STATUS_CODE_ERROR
FAST_RETRIES = {"backoff_base_s": 0.01, "backoff_max_s": 0.05}


# ---------------------------------------------------------------------------------------------
# The receiver


class Receiver:
    """An OTLP/HTTP traces receiver: keeps every request it decoded. It can answer `fail_status`
    to the first `fail_first` posts, hold posts until `gate` is set, and report rejected spans."""

    def __init__(self, fail_first: int = 0, fail_status: int = 503, retry_after: str | None = None,
                 gate: threading.Event | None = None, reject_spans: int = 0) -> None:  # fmt: skip
        self.fail_first, self.fail_status, self.retry_after = fail_first, fail_status, retry_after
        self.gate, self.reject_spans = gate, reject_spans
        self.lock = threading.Lock()
        self.arrived = threading.Event()
        self.requests: list[ExportTraceServiceRequest] = []
        self.attempts: list[tuple[float, str, dict]] = []  # (monotonic time, path, headers)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        # A short poll interval: shutdown() waits for it, once per test.
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        if self.gate is not None:
            self.gate.set()
        self.server.shutdown()
        self.server.server_close()

    def spans(self) -> list[tuple[dict, trace_pb2.Span]]:
        """Every span received, with its resource's attributes."""
        with self.lock:
            return [(attrs(rs.resource.attributes), span) for req in self.requests
                    for rs in req.resource_spans for ss in rs.scope_spans for span in ss.spans]  # fmt: skip

    def _answer(self, body: bytes) -> tuple[int, dict, bytes]:
        with self.lock:
            n = len(self.attempts)
        if n <= self.fail_first:
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return self.fail_status, {"Content-Type": "text/plain", **headers}, b"receiver says no"
        request = ExportTraceServiceRequest.FromString(body)
        with self.lock:
            self.requests.append(request)
        response = ExportTraceServiceResponse()
        if self.reject_spans:
            response.partial_success.rejected_spans = self.reject_spans
            response.partial_success.error_message = "spans too old"
        return 200, {"Content-Type": "application/x-protobuf"}, response.SerializeToString()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.attempts.append((time.monotonic(), self.path, dict(self.headers.items())))
                receiver.arrived.set()
                if receiver.gate is not None:
                    receiver.gate.wait(30)
                status, headers, payload = receiver._answer(body)
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(payload))}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        return Handler


@pytest.fixture
def receivers():
    made: list[Receiver] = []

    def make(**kw) -> Receiver:
        made.append(Receiver(**kw))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.fixture
def exporters():
    made: list[OtlpExporter] = []

    def make(*args, **kw) -> OtlpExporter:
        made.append(OtlpExporter(*args, **kw))
        return made[-1]

    yield make
    for e in made:
        e.close(timeout_s=5)


def wait_until(predicate, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def attrs(key_values) -> dict:
    return {kv.key: value(kv.value) for kv in key_values}


def value(v):
    which = v.WhichOneof("value")
    if which == "array_value":
        return [value(x) for x in v.array_value.values]
    return getattr(v, which) if which else None


# ---------------------------------------------------------------------------------------------
# Spans in the agent's format


def make_span(kind: str, name: str, service: str, host: str, pid: int, raddr: str, rport: int, *,
              start: int, trace_id: str, span_id: str, parent: str | None, protocol: str = "http",
              status: str = "ok", status_code: str | None = None, attributes: dict | None = None,
              **server_keys) -> dict:  # fmt: skip
    """A span as `Span.to_json_dict` writes it, plus the server's association keys."""
    endpoint = Endpoint(service, host, pid, "10.0.0.9", 40000 + pid, raddr, rport, conn_id=pid * 10)
    span = Span(kind, name, protocol, endpoint, start, start + 1_000_000, status, status_code, tid=pid + 1,
                resp_tid=pid + 1, req_size=120, resp_size=340, req_seq=(1, 121), resp_seq=(1, 341),
                attributes=attributes or {}, req_head=b"GET", resp_head=b"HTTP/1.1 200")  # fmt: skip
    span.trace_id, span.span_id, span.parent_span_id = trace_id, span_id, parent
    return {**span.to_json_dict(), "link_method": "root", "link_confidence": 1.0, "peer_service": None,
            **server_keys}  # fmt: skip


TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
T0 = 1_700_000_000_000_000_000


def three_service_trace() -> list[dict]:
    """frontend (SERVER root) -> its CLIENT call -> orders' SERVER span -> orders' redis CLIENT."""
    return [
        make_span("SERVER", "GET /checkout", "frontend", "host-a", 100, "192.168.1.7", 51000, start=T0,
                  trace_id=TRACE, span_id="00f067aa0ba902b7", parent=None),
        make_span("CLIENT", "POST /orders", "frontend", "host-a", 100, "10.0.0.20", 8080, start=T0 + 10,
                  trace_id=TRACE, span_id="1111111111111111", parent="00f067aa0ba902b7",
                  link_method="inferred", link_confidence=0.93, peer_service="orders"),
        make_span("SERVER", "POST /orders", "orders", "host-b", 200, "10.0.0.9", 40100, start=T0 + 20,
                  trace_id=TRACE, span_id="2222222222222222", parent="1111111111111111",
                  link_method="seq-join", peer_service="frontend"),
        make_span("CLIENT", "redis GET", "orders", "host-b", 200, "10.0.0.30", 6379, start=T0 + 30,
                  trace_id=TRACE, span_id="3333333333333333", parent="2222222222222222", protocol="redis",
                  status="error", status_code="WRONGTYPE", attributes={"db.redis.key": "cart:7"},
                  link_method="thread", peer_service="redis"),
    ]  # fmt: skip


def export(receivers, exporters, spans: list[dict], **kw) -> tuple[Receiver, OtlpExporter]:
    """Sends the spans through an exporter to a fresh receiver and waits for all that can arrive."""
    receiver = receivers()
    exporter = exporters(receiver.url, **kw)
    exporter.submit(spans)
    assert exporter.flush(timeout_s=15), exporter.stats
    return receiver, exporter


def by_span_id(receiver: Receiver) -> dict[bytes, tuple[dict, trace_pb2.Span]]:
    got = receiver.spans()
    out = {span.span_id: (resource, span) for resource, span in got}
    assert len(out) == len(got), "a span arrived twice"
    return out


# ---------------------------------------------------------------------------------------------
# What arrives


def test_three_service_trace_arrives_intact(receivers, exporters):
    spans = three_service_trace()
    receiver, exporter = export(receivers, exporters, spans, headers={"X-Scope-OrgID": "team-7"})
    got = by_span_id(receiver)
    assert set(got) == {bytes.fromhex(s["span_id"]) for s in spans}
    kinds = {"SERVER": SERVER, "CLIENT": CLIENT}
    for s in spans:
        resource, span = got[bytes.fromhex(s["span_id"])]
        assert span.trace_id == bytes.fromhex(TRACE)
        assert span.parent_span_id == (bytes.fromhex(s["parent_span_id"]) if s["parent_span_id"] else b"")
        assert span.kind == kinds[s["kind"]]
        assert span.name == s["name"]
        assert (span.start_time_unix_nano, span.end_time_unix_nano) == (s["start_ns"], s["end_ns"])
        assert resource == {"service.name": s["service"], "host.name": s["host"], "process.pid": s["pid"]}
    assert len(receiver.requests) == 1
    resource_spans = receiver.requests[0].resource_spans
    assert len(resource_spans) == 2  # one per (service, host, pid)
    for rs in resource_spans:
        (scope_spans,) = rs.scope_spans
        assert (scope_spans.scope.name, scope_spans.scope.version) == ("deeptrace", deeptrace.__version__)
    _, path, headers = receiver.attempts[0]
    assert path == "/v1/traces"
    assert headers["Content-Type"] == "application/x-protobuf"
    assert headers["X-Scope-OrgID"] == "team-7"
    s = exporter.stats
    assert (s.exported_spans, s.dropped_spans, s.queued_spans, s.failed_requests) == (4, 0, 0, 0)


def test_network_and_deeptrace_attributes(receivers, exporters):
    spans = three_service_trace()
    got = by_span_id(export(receivers, exporters, spans)[0])
    client = attrs(got[bytes.fromhex("1111111111111111")][1].attributes)
    assert client["server.address"] == client["network.peer.address"] == "10.0.0.20"
    assert client["server.port"] == client["network.peer.port"] == 8080
    assert "client.address" not in client
    assert client["network.transport"] == "tcp"
    assert client["network.type"] == "ipv4"
    assert client["deeptrace.protocol"] == "http"
    assert client["deeptrace.link_method"] == "inferred"
    assert client["deeptrace.link_confidence"] == pytest.approx(0.93)
    assert client["deeptrace.peer_service"] == "orders"
    assert client["thread.id"] == 101
    assert (client["deeptrace.request.size"], client["deeptrace.response.size"]) == (120, 340)
    server = attrs(got[bytes.fromhex("2222222222222222")][1].attributes)
    assert server["client.address"] == server["network.peer.address"] == "10.0.0.9"
    assert server["client.port"] == 40100
    assert "server.address" not in server
    redis = attrs(got[bytes.fromhex("3333333333333333")][1].attributes)
    assert redis["db.redis.key"] == "cart:7"
    assert redis["deeptrace.status_code"] == "WRONGTYPE"


def test_where_a_process_runs_goes_on_the_resource(receivers, exporters):
    """Container and Kubernetes attributes are the process's, not the call's: OTel puts them on
    the Resource, and two pods of one service are two resources."""
    pod = {"k8s.namespace.name": "shop", "k8s.pod.name": "checkout-7d4b9c8f6d-x2k9p", "container.id": "ab" * 32,
           "deeptrace.cgroup.path": "/kubepods.slice/x.scope"}  # fmt: skip
    spans = three_service_trace()
    spans[2]["attributes"] = {**pod, "http.route": "/orders"}
    spans[3]["attributes"] = {**pod, "k8s.pod.name": "checkout-7d4b9c8f6d-q8w7e", "db.redis.key": "cart:7"}
    got = by_span_id(export(receivers, exporters, spans)[0])
    (res_a, served), (res_b, call) = got[bytes.fromhex("2222222222222222")], got[bytes.fromhex("3333333333333333")]
    assert res_a["k8s.namespace.name"] == res_b["k8s.namespace.name"] == "shop" and res_a["service.name"] == "orders"
    assert (res_a["k8s.pod.name"], res_b["k8s.pod.name"]) == ("checkout-7d4b9c8f6d-x2k9p", "checkout-7d4b9c8f6d-q8w7e")
    assert res_a["container.id"] == "ab" * 32 and res_a["deeptrace.cgroup.path"] == "/kubepods.slice/x.scope"
    assert attrs(served.attributes)["http.route"] == "/orders" and "k8s.pod.name" not in attrs(served.attributes)
    assert "container.id" not in attrs(call.attributes) and attrs(call.attributes)["db.redis.key"] == "cart:7"
    frontend_resource = got[bytes.fromhex("00f067aa0ba902b7")][0]
    assert not any(k.startswith(("k8s.", "container.")) for k in frontend_resource)


def test_status_mapping(receivers, exporters):
    base = {"start": T0, "trace_id": TRACE, "parent": None}
    spans = [
        make_span("SERVER", "GET /a", "web", "h", 1, "10.0.0.2", 1, span_id="000000000000000a", **base),
        make_span("SERVER", "GET /b", "web", "h", 1, "10.0.0.2", 1, span_id="000000000000000b",
                  status="error", status_code="503", **base),
        make_span("CLIENT", "GET /c", "web", "h", 1, "10.0.0.2", 1, span_id="000000000000000c",
                  status="error", **base),
    ]  # fmt: skip
    got = by_span_id(export(receivers, exporters, spans)[0])
    status = {sid[-1]: (span.status.code, span.status.message) for sid, (_, span) in got.items()}
    # ok is UNSET: instrumentation leaves OK to the application (OTel trace API).
    assert status == {0xA: (UNSET, ""), 0xB: (ERROR, "503"), 0xC: (ERROR, "")}


def test_attribute_types(receivers, exporters):
    attributes = {
        "count": 7, "ratio": 0.25, "cached": True, "tags": ["a", "b"], "ports": [80, 443],
        "weights": [1, 2.5], "empty": [], "mixed": [1, "a"], "nested": {"user": {"id": 5, "roles": ["x"]}},
        "missing": None, "huge": 2**70,
    }  # fmt: skip
    spans = [make_span("SERVER", "GET /", "web", "h", 1, "::1", 9, start=T0, trace_id=TRACE,
                       span_id="00000000000000aa", parent=None, attributes=attributes)]  # fmt: skip
    ((_, span),) = by_span_id(export(receivers, exporters, spans)[0]).values()
    kinds = {kv.key: kv.value.WhichOneof("value") for kv in span.attributes}
    got = attrs(span.attributes)
    assert (kinds["count"], got["count"]) == ("int_value", 7)
    assert (kinds["ratio"], got["ratio"]) == ("double_value", 0.25)
    assert (kinds["cached"], got["cached"]) == ("bool_value", True)
    assert (kinds["tags"], got["tags"]) == ("array_value", ["a", "b"])
    items = {kv.key: [x.WhichOneof("value") for x in kv.value.array_value.values] for kv in span.attributes}
    assert (items["ports"], got["ports"]) == (["int_value"] * 2, [80, 443])
    assert (items["weights"], got["weights"]) == (["double_value"] * 2, [1.0, 2.5])  # one type per array
    assert (kinds["empty"], got["empty"]) == ("array_value", [])
    assert json.loads(got["mixed"]) == [1, "a"]  # not an OTel array: kept as JSON
    assert json.loads(got["nested"]) == {"user": {"id": 5, "roles": ["x"]}}
    assert got["huge"] == str(2**70)
    assert "missing" not in got
    assert span.dropped_attributes_count == 1
    assert got["network.type"] == "ipv6"


def test_kinds_other_than_ours():
    kinds = ["PRODUCER", "CONSUMER", "INTERNAL", "weird", None, "client"]
    spans = [make_span(kind, "op", "q", "h", 1, "10.0.0.2", 1, start=T0, trace_id=TRACE,
                       span_id=f"{i + 1:016x}", parent=None) for i, kind in enumerate(kinds)]  # fmt: skip
    (rs,) = spans_to_request(spans).resource_spans
    K = trace_pb2.Span
    expected = [K.SPAN_KIND_PRODUCER, K.SPAN_KIND_CONSUMER, *[K.SPAN_KIND_INTERNAL] * 3, K.SPAN_KIND_CLIENT]
    assert [s.kind for s in rs.scope_spans[0].spans] == expected


def test_non_hex_ids_are_consistent_for_parent_and_child(receivers, exporters):
    trace_id = "req-7f3a (X-Request-ID)"
    parent = make_span("SERVER", "GET /", "a", "h", 1, "10.0.0.2", 1, start=T0, trace_id=trace_id,
                       span_id="gateway-span:42", parent=None)  # fmt: skip
    child = make_span("CLIENT", "GET /x", "a", "h", 1, "10.0.0.3", 2, start=T0 + 5, trace_id=trace_id,
                      span_id="5555555555555555", parent="gateway-span:42")  # fmt: skip
    # Parent and child reach the exporter in different batches, as they may in the server.
    receiver = receivers()
    exporter = exporters(receiver.url, batch_spans=1)
    exporter.submit([parent])
    exporter.submit([child])
    assert exporter.flush(timeout_s=15)
    got = by_span_id(receiver)
    assert len(receiver.requests) == 2
    expected_parent_id = hashlib.sha256(b"gateway-span:42").digest()[:8]
    p = got[expected_parent_id][1]
    c = got[bytes.fromhex("5555555555555555")][1]
    assert c.parent_span_id == p.span_id == expected_parent_id
    assert len(p.trace_id) == 16 and c.trace_id == p.trace_id
    assert p.parent_span_id == b""


def test_id_rules():
    assert id_bytes(TRACE, 16) == bytes.fromhex(TRACE)
    assert id_bytes(TRACE.upper(), 16) == id_bytes(TRACE, 16)
    assert id_bytes("a3ce929d0e0e4736", 16) == bytes(8) + bytes.fromhex("a3ce929d0e0e4736")  # 64-bit, padded
    assert id_bytes("abc", 8) == bytes.fromhex("0000000000000abc")  # unpadded (uber-trace-id allows it)
    for odd in ["00" * 8, "ab cd", "g" * 16, "a" * 17, "\ud800"]:
        assert id_bytes(odd, 8) == id_bytes(odd, 8) != bytes(8)
        assert len(id_bytes(odd, 8)) == 8
    no_parent = {"trace_id": TRACE, "span_id": "1" * 16, "start_ns": 1, "end_ns": 2}
    spans = [dict(no_parent, parent_span_id=p) for p in [None, "", "0000000000000000", "0"]]
    request = spans_to_request(spans)
    assert [s.parent_span_id for s in request.resource_spans[0].scope_spans[0].spans] == [b""] * 4


# ---------------------------------------------------------------------------------------------
# Delivery


def test_retries_after_503_and_delivers_once(receivers, exporters):
    spans = three_service_trace()
    receiver = receivers(fail_first=2)
    exporter = exporters(receiver.url, **FAST_RETRIES)
    exporter.submit(spans)
    assert exporter.flush(timeout_s=15)
    assert len(receiver.attempts) == 3
    assert len(by_span_id(receiver)) == 4  # delivered once
    stats = exporter.stats
    assert (stats.exported_spans, stats.dropped_spans) == (4, 0)
    assert (stats.failed_requests, stats.retried_requests) == (2, 2)
    assert "503" in stats.last_error


def test_retry_after_is_honoured(receivers, exporters):
    receiver = receivers(fail_first=1, fail_status=429, retry_after="1")
    exporter = exporters(receiver.url, backoff_base_s=0.001, backoff_max_s=5.0)
    exporter.submit(three_service_trace())
    assert exporter.flush(timeout_s=15)
    (first, *_), (second, *_) = receiver.attempts
    assert second - first >= 0.9  # back-off alone would have retried within a few ms
    assert exporter.stats.exported_spans == 4


def test_receiver_down_submit_does_not_block_and_batch_is_dropped(exporters):
    exporter = exporters(f"http://127.0.0.1:{free_port()}", max_tries=3, timeout_s=2.0, **FAST_RETRIES)
    began = time.monotonic()
    exporter.submit(three_service_trace())
    assert time.monotonic() - began < 1.0
    assert wait_until(lambda: exporter.stats.dropped_spans == 4), exporter.stats
    stats = exporter.stats
    assert (stats.exported_spans, stats.queued_spans) == (0, 0)
    assert (stats.failed_requests, stats.retried_requests) == (3, 2)
    assert "Connect" in stats.last_error


def test_client_error_is_not_retried(receivers, exporters, caplog):
    receiver = receivers(fail_first=1, fail_status=400)
    exporter = exporters(receiver.url, **FAST_RETRIES)
    with caplog.at_level(logging.WARNING, logger="deeptrace.server.otlp"):
        exporter.submit(three_service_trace())
        assert exporter.flush(timeout_s=15)
    assert len(receiver.attempts) == 1
    s = exporter.stats
    assert (s.exported_spans, s.dropped_spans, s.failed_requests, s.retried_requests) == (0, 4, 1, 0)
    assert "receiver says no" in caplog.text


def test_partial_success_counts_rejected_spans(receivers, exporters):
    receiver = receivers(reject_spans=1)
    exporter = exporters(receiver.url)
    exporter.submit(three_service_trace())
    assert exporter.flush(timeout_s=15)
    stats = exporter.stats
    assert (stats.exported_spans, stats.dropped_spans) == (3, 1)
    assert "spans too old" in stats.last_error


def test_full_queue_drops_oldest(receivers, exporters):
    gate = threading.Event()
    receiver = receivers(gate=gate)
    exporter = exporters(receiver.url, max_queue_spans=10, batch_spans=100)
    spans = [make_span("SERVER", "GET /", "a", "h", 1, "10.0.0.2", 1, start=T0 + i, trace_id=TRACE,
                       span_id=f"{i + 1:016x}", parent=None) for i in range(26)]  # fmt: skip
    exporter.submit(spans[:1])
    assert receiver.arrived.wait(15)  # the first post is held at the receiver: nothing drains the queue
    began = time.monotonic()
    for s in spans[1:]:
        exporter.submit([s])
    assert time.monotonic() - began < 1.0
    assert (exporter.stats.dropped_spans, exporter.stats.queued_spans) == (15, 11)
    gate.set()
    assert exporter.flush(timeout_s=15)
    got = {int.from_bytes(sid, "big") for sid in by_span_id(receiver)}
    assert got == {1} | set(range(17, 27))  # the first, held in flight, and the newest ten
    stats = exporter.stats
    assert (stats.submitted_spans, stats.exported_spans, stats.dropped_spans) == (26, 11, 15)


def test_malformed_spans_are_skipped_and_counted(receivers, exporters):
    good = three_service_trace()
    bad = [
        "not a span", None, {},
        {**good[0], "span_id": None}, {**good[0], "trace_id": 12}, {**good[0], "span_id": ""},
        {**good[0], "parent_span_id": 5}, {**good[0], "start_ns": "yesterday"}, {**good[0], "end_ns": -1},
        {**good[0], "start_ns": 2**64}, {**good[0], "start_ns": True},
    ]  # fmt: skip
    # Bad values elsewhere cost an attribute, not the span.
    odd = {**good[0], "span_id": "9999999999999999", "rport": "eighty", "attributes": ["x"], "pid": "p",
           "name": 3, "service": None}  # fmt: skip
    mixed = [bad[0], good[0], *bad[1:5], good[1], odd, *bad[5:], good[2], good[3]]
    conversion = convert_spans(mixed)
    assert (conversion.spans, conversion.skipped) == (5, len(bad))
    receiver, exporter = export(receivers, exporters, mixed)
    got = by_span_id(receiver)
    assert set(got) == {bytes.fromhex(s["span_id"]) for s in [*good, odd]}
    resource, span = got[bytes.fromhex("9999999999999999")]
    assert resource == {"service.name": "unknown_service", "host.name": "host-a"}
    assert span.name == "http"
    assert span.dropped_attributes_count == 2  # the port and the attributes that were not an object
    stats = exporter.stats
    assert (stats.exported_spans, stats.malformed_spans, stats.dropped_spans) == (5, len(bad), len(bad))


def test_close_flushes_everything_queued(receivers, exporters):
    receiver = receivers()
    exporter = exporters(receiver.url, batch_spans=7)
    spans = [make_span("SERVER", "GET /", "a", "h", 1, "10.0.0.2", 1, start=T0 + i, trace_id=TRACE,
                       span_id=f"{i + 1:016x}", parent=None) for i in range(50)]  # fmt: skip
    exporter.submit(spans)
    assert exporter.close(timeout_s=15)
    assert len(by_span_id(receiver)) == 50
    assert all(len(r.resource_spans[0].scope_spans[0].spans) <= 7 for r in receiver.requests)
    exporter.submit(spans[:3])  # after close: counted, not sent
    s = exporter.stats
    assert (s.submitted_spans, s.exported_spans, s.dropped_spans, s.queued_spans) == (53, 50, 3, 0)


def test_close_gives_up_on_a_dead_receiver(exporters):
    exporter = exporters(f"http://127.0.0.1:{free_port()}", max_tries=1000, timeout_s=1.0,
                         backoff_base_s=0.05, backoff_max_s=0.2)  # fmt: skip
    exporter.submit(three_service_trace())
    assert exporter.close(timeout_s=0.5) is False
    assert wait_until(lambda: exporter.stats.dropped_spans == 4), exporter.stats
    assert exporter.stats.queued_spans == 0


def test_endpoint_path():
    assert traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert traces_url("https://collector:4318/") == "https://collector:4318/v1/traces"
    assert traces_url("http://gw/otlp/v1/traces?tenant=a") == "http://gw/otlp/v1/traces?tenant=a"
    for bad in ["collector:4318", "ftp://collector/", "http://"]:
        with pytest.raises(ValueError):
            traces_url(bad)


def test_custom_path_is_used(receivers, exporters):
    receiver = receivers()
    exporter = exporters(receiver.url + "/tenant-a/v1/traces")
    exporter.submit(three_service_trace())
    assert exporter.flush(timeout_s=15)
    assert receiver.attempts[0][1] == "/tenant-a/v1/traces"
