"""Records -> spans without a kernel: ordering by TCP seq, holes, pairing, timeouts."""

from __future__ import annotations

import random

from deeptrace.capture.pipeline import SpanPipeline
from deeptrace.capture.records import Record

REQ = b"GET /users/42 HTTP/1.1\r\nHost: a\r\n\r\n"
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Conn:
    """Builds the records a server process would produce for one TCP connection."""

    def __init__(self, role="server", conn_id=7):
        self.role, self.conn_id = role, conn_id
        self.seq = {"ingress": 1000, "egress": 5000}
        self.t = 1_000_000

    def rec(self, direction, data, size=None, syscall=None, captured=None):
        size = len(data) if size is None else size
        start = self.seq[direction]
        self.seq[direction] = (start + size) % 2**32
        self.t += 1000
        payload = data if captured is None else data[:captured]
        return Record(10, 11, "svc", syscall or ("read" if direction == "ingress" else "write"), direction, "ipv4",
                      "tcp", "127.0.0.1", 80, "127.0.0.1", 5555, self.role, self.conn_id, 3, self.t, self.t + 10,
                      start, (start + size) % 2**32, size, size, 0, 0, payload)  # fmt: skip

    def close(self):
        self.t += 1000
        return Record(10, 11, "svc", "close", None, "ipv4", "tcp", "127.0.0.1", 80, "127.0.0.1", 5555, self.role,
                      self.conn_id, 3, self.t, self.t, 0, 0, 0, 0, 0, 0, b"")  # fmt: skip


def test_request_response_make_one_server_span():
    c = Conn()
    recs = [c.rec("ingress", REQ), c.rec("egress", RESP)]
    (span,) = SpanPipeline(host="h").push(recs)
    assert (span.kind, span.name, span.status, span.status_code) == ("SERVER", "GET /users/{id}", "ok", "200")
    assert span.start_ns == recs[0].exit_ns and span.end_ns == recs[1].exit_ns
    assert span.req_seq == (1000, 1000 + len(REQ)) and span.resp_seq == (5000, 5000 + len(RESP))
    assert span.endpoint.service == "svc" and span.endpoint.host == "h"


def test_records_of_a_sampled_connection_give_spans_weighted_by_it():
    c = Conn()
    recs = [c.rec("ingress", REQ), c.rec("egress", RESP)]
    for r in recs:
        r.sample_shift = 2  # the kernel kept its connection with probability 1/4
    (span,) = SpanPipeline(host="h").push(recs)
    assert span.attributes["sampling.weight"] == 4 and span.status == "ok"
    c = Conn()
    (plain,) = SpanPipeline(host="h").push([c.rec("ingress", REQ), c.rec("egress", RESP)])
    assert "sampling.weight" not in plain.attributes


def test_client_side_kind():
    c = Conn(role="client")
    (span,) = SpanPipeline().push([c.rec("egress", REQ), c.rec("ingress", RESP)])
    assert span.kind == "CLIENT"


def test_role_unknown_is_detected_from_the_bytes():
    c = Conn(role="unknown")
    (span,) = SpanPipeline().push([c.rec("egress", REQ), c.rec("ingress", RESP)])
    assert span.kind == "CLIENT" and span.name == "GET /users/{id}"


def test_records_out_of_order_are_put_back_in_seq_order():
    c = Conn()
    parts = [REQ[:5], REQ[5:20], REQ[20:]]
    recs = [c.rec("ingress", p) for p in parts] + [c.rec("egress", RESP[:10]), c.rec("egress", RESP[10:])]
    expected = [("GET /users/{id}", "200", len(REQ), len(RESP))]
    for seed in range(20):  # within one batch, any order
        shuffled = recs[:]
        random.Random(seed).shuffle(shuffled)
        spans = SpanPipeline().push(shuffled)
        assert [(s.name, s.status_code, s.req_size, s.resp_size) for s in spans] == expected
    # Across batches: once a direction has started, a later range waits for the earlier one.
    pipeline = SpanPipeline()
    spans = pipeline.push([recs[0], recs[2]]) + pipeline.push([recs[1], recs[3], recs[4]])
    assert [(s.name, s.status_code, s.req_size, s.resp_size) for s in spans] == expected


def test_a_lost_record_becomes_a_hole_and_later_exchanges_still_pair():
    c = Conn()
    first = [c.rec("ingress", REQ), c.rec("egress", b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n" + b"x" * 100)]
    lost = c.rec("egress", b"y" * 400)  # the rest of the body: its record was dropped
    second = [c.rec("ingress", REQ), c.rec("egress", RESP)]
    pipeline = SpanPipeline()
    spans = pipeline.push(first) + pipeline.push(second)
    assert lost and spans == []  # waiting for the missing range
    spans = pipeline.flush(now_ns=c.t + 10**9)
    assert [(s.status_code, s.resp_size) for s in spans] == [("200", len(first[1].payload) + 400), ("200", len(RESP))]
    assert pipeline.stats.holes == 1


def test_truncated_capture_is_skipped():
    c = Conn()
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 9000\r\n\r\n" + b"z" * 9000
    spans = SpanPipeline().push([c.rec("ingress", REQ), c.rec("egress", big, captured=1024),
                                 c.rec("ingress", REQ), c.rec("egress", RESP)])  # fmt: skip
    assert [(s.status_code, s.resp_size) for s in spans] == [("200", len(big)), ("200", len(RESP))]


def test_unanswered_request_times_out_and_close_reports_the_rest():
    c = Conn()
    pipeline = SpanPipeline(timeout_ns=10**6)
    assert pipeline.push([c.rec("ingress", REQ)]) == []
    (late,) = pipeline.flush(now_ns=c.t + 10**7)
    assert late.status == "error" and late.status_code == "timeout"
    pipeline.push([c.rec("ingress", REQ)])
    (closed,) = pipeline.push([c.close()])
    assert closed.status_code == "connection closed" and pipeline.open_connections == 0


def test_unknown_protocol_is_given_up_on():
    c = Conn()
    pipeline = SpanPipeline()
    for _ in range(5):
        pipeline.push([c.rec("ingress", bytes(range(256)) * 4)])
    assert pipeline.stats.undetected_connections == 1 and pipeline.stats.spans == 0


def test_redis_pipelined_over_several_reads():
    c = Conn()
    cmds = b"*1\r\n$4\r\nPING\r\n" * 3 + b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
    replies = b"+PONG\r\n" * 3 + b"-ERR nope\r\n"
    spans = SpanPipeline().push([c.rec("ingress", cmds[:20]), c.rec("ingress", cmds[20:]),
                                 c.rec("egress", replies)])  # fmt: skip
    assert [(s.name, s.status) for s in spans] == [("redis PING", "ok")] * 3 + [("redis GET", "error")]


def test_protocol_detected_across_tiny_first_reads():
    """DNS over TCP read as 1 + 1 + rest bytes (dnsmasq does this): detection waits for enough bytes."""
    from test_dns import answer, query, tcp

    c = Conn()
    q, a = tcp(query(5, "web.test")), tcp(answer(5, "web.test"))
    (span,) = SpanPipeline().push([c.rec("ingress", q[:1]), c.rec("ingress", q[1:2]), c.rec("ingress", q[2:]),
                                   c.rec("egress", a)])  # fmt: skip
    assert (span.name, span.status_code, span.req_size) == ("DNS A web.test", "NOERROR", len(q))


def test_a_request_that_the_close_ends_is_a_span(monkeypatch):
    """A parser may finish a request only when the connection closes (its last bytes cut short):
    that request is a span like any other (unanswered, or one-way), never dropped unseen."""
    from deeptrace import protocols
    from deeptrace.protocols.base import ConnectionParser, Message

    class ClosesWithARequest(ConnectionParser):
        protocol = "test"

        def feed(self, is_request, chunk):
            self.start = chunk.start_ns
            return []

        def close(self, end_ns):
            return [Message("test", True, self.start, end_ns, 4, 11, 11, name="test cut short", partial=True)]

    spec = protocols.ProtocolSpec("test", frozenset({"tcp"}), lambda data: data.startswith(b"ZZZ"),
                                  lambda data: False, lambda l4: ClosesWithARequest())  # fmt: skip
    monkeypatch.setattr(protocols, "PROTOCOLS", (spec, *protocols.PROTOCOLS))
    c = Conn()
    spans = SpanPipeline().push([c.rec("ingress", b"ZZZ!"), c.close()])
    assert [(s.name, s.status, s.status_code) for s in spans] == [("test cut short", "error", "connection closed")]


def test_a_span_the_pipeline_makes_has_the_keys_of_the_one_schema_and_ingest_takes_it():
    """deeptrace.schema.FIELDS is the one definition: the agent writes its keys in its order,
    ingest takes what the agent writes, and the store has a column for every one."""
    import time

    from deeptrace import schema
    from deeptrace.server.store.schema import COLUMN_NAMES

    c = Conn()
    c.t = time.time_ns()
    (span,) = SpanPipeline(host="h").push([c.rec("ingress", REQ), c.rec("egress", RESP)])
    d = span.to_json_dict()
    assert tuple(d) == tuple(f.name for f in schema.FIELDS if f.written is not None)
    stored = schema.validate_span(d)
    assert set(stored) == set(d) - {f.name for f in schema.FIELDS if f.checked is None}
    assert stored["req_seq"] == [1000, 1000 + len(REQ)]
    ranges = {f.name for f in schema.FIELDS if f.range}
    assert set(COLUMN_NAMES) == {f.name for f in schema.FIELDS} - ranges | {
        f"{r}_{end}" for r in ranges for end in ("start", "end")}  # fmt: skip


def test_tls_plaintext_read_ahead_has_no_range_of_its_own():
    """A TLS read that moved no ciphertext (the handshake read the request ahead) finds the
    socket's seq already past its bytes: that number is the next request's, so its span must
    carry no range rather than the next span's key."""
    from dataclasses import replace

    from deeptrace.capture.records import FLAG_TLS

    c = Conn()
    first, answer = c.rec("ingress", REQ), c.rec("egress", RESP)
    first = replace(first, flags=FLAG_TLS, enter_seq=first.exit_seq)  # nothing moved: both at the end
    second, answer2 = c.rec("ingress", REQ), c.rec("egress", RESP)
    recs = [first, replace(answer, flags=FLAG_TLS), replace(second, flags=FLAG_TLS), replace(answer2, flags=FLAG_TLS)]
    spans = SpanPipeline(host="h").push(recs)
    assert [s.req_seq for s in spans] == [None, (second.enter_seq, second.enter_seq + len(REQ))]


def test_a_client_span_names_its_peer_and_a_server_span_does_not():
    """peer.service is OpenTelemetry's name for the service a call went to: on CLIENT spans only.
    Connections of one process to one peer share one resource tuple (the exchange path caches
    encoded attributes by it)."""
    from deeptrace.capture.spans import ProcessInfo

    pod = (("k8s.pod.name", "checkout-x"),)
    pipeline = SpanPipeline(host="h", process_info=lambda pid, comm: ProcessInfo("checkout", pod),
                            peer_name=lambda ip: "users")  # fmt: skip
    client, server = Conn(role="client", conn_id=1), Conn(role="server", conn_id=2)
    call = pipeline.push([client.rec("egress", REQ), client.rec("ingress", RESP)])
    served = pipeline.push([server.rec("ingress", REQ), server.rec("egress", RESP)])
    assert call[0].attributes["peer.service"] == "users" and call[0].attributes["k8s.pod.name"] == "checkout-x"
    assert "peer.service" not in served[0].attributes and served[0].attributes["k8s.pod.name"] == "checkout-x"
    again = pipeline.endpoint(10, "svc", "127.0.0.1", 80, "127.0.0.1", 5555, 9, client=True)
    assert again.resource is pipeline.endpoint(10, "svc", "127.0.0.1", 81, "127.0.0.1", 5555, 8, client=True).resource
