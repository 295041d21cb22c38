"""Spans from exchange events (the kernel's assembled request/response pairs), made from
hand-built event arrays: the same spans by both paths, names and attributes from heads,
redaction, and what the caches must not mix up."""

from __future__ import annotations

import json
import socket

import numpy as np

from deeptrace.capture.pipeline import SpanPipeline
from deeptrace.capture.records import EXCHANGE_PROTOCOLS, XFLAG_DATAGRAM, XFLAG_UNANSWERED, exchange_dtype
from deeptrace.capture.spans import json_lines

HEAD = 256


def event(req: bytes, resp: bytes, *, protocol="http1", status=200, req_size=None, resp_size=None, conn=7,
          tgid=100, role=2, start=1_000, end=5_000, laddr="10.0.0.1", raddr="10.0.0.2", rport=40000,
          flags=0) -> np.ndarray:  # fmt: skip
    e = np.zeros(1, exchange_dtype(HEAD))
    fields = {"start_ns": start, "end_ns": end, "conn_id": conn, "tgid": tgid, "req_tid": tgid + 1,
              "resp_tid": tgid + 2, "req_seq": 0xFFFFFFF0, "resp_seq": 500, "req_size": req_size or len(req),
              "resp_size": resp_size or len(resp), "lport": 8080, "rport": rport, "status": status,
              "req_captured": min(len(req), HEAD), "resp_captured": min(len(resp), HEAD), "family": 2, "role": role,
              "protocol": EXCHANGE_PROTOCOLS.index(protocol), "flags": flags}  # fmt: skip
    for k, v in fields.items():
        e[k] = v
    e["laddr"] = socket.inet_aton(laddr).ljust(16, b"\0")
    e["raddr"] = socket.inet_aton(raddr).ljust(16, b"\0")
    e["comm"] = b"server".ljust(16, b"\0")
    e["req_head"] = req[:HEAD].ljust(HEAD, b"\xee")  # what lies past a head's end is not its bytes
    e["resp_head"] = resp[:HEAD].ljust(HEAD, b"\xee")
    return e


GET = (
    b"GET /users/42?x=1 HTTP/1.1\r\nHost: shop\r\nUser-Agent: curl/8\r\nAuthorization: Bearer s3cret\r\n\r\n"
)
OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


def both(events: np.ndarray, wall: int = 10**18):
    spans = SpanPipeline(host="h").push_exchanges(events, wall)
    lines = json_lines(SpanPipeline(host="h").push_exchanges_json(events, wall)).splitlines()
    return spans, [json.loads(line) for line in lines]


def test_an_http_exchange_is_the_span_the_records_path_makes():
    spans, dicts = both(event(GET, OK))
    (s,) = spans
    assert (s.kind, s.name, s.protocol, s.status, s.status_code) == (
        "SERVER",
        "GET /users/{id}",
        "http",
        "ok",
        "200",
    )
    assert (s.start_ns, s.end_ns, s.tid, s.resp_tid) == (10**18 + 1_000, 10**18 + 5_000, 101, 102)
    assert s.req_seq == (0xFFFFFFF0, (0xFFFFFFF0 + len(GET)) & 0xFFFFFFFF)  # wraps as TCP sequence numbers do
    assert s.resp_seq == (500, 500 + len(OK))
    assert (s.endpoint.service, s.endpoint.laddr, s.endpoint.raddr, s.endpoint.conn_id) == (
        "server",
        "10.0.0.1",
        "10.0.0.2",
        7,
    )
    assert s.attributes["url.query"] == "x=1" and s.attributes["http.response.status_code"] == 200
    assert s.attributes["http.response.header.content-type"] == "text/plain"
    assert b"s3cret" not in s.req_head and b"Authorization" in s.req_head  # redacted like every span
    assert s.resp_head == OK
    # The JSON fast path writes what to_json_dict of the same span gives, ids aside.
    expected = s.to_json_dict()
    for d in (dicts[0], expected):
        d.pop("trace_id"), d.pop("span_id")
    assert dicts[0] == expected and list(dicts[0]) == list(expected)


def test_errors_clients_and_many_in_one_batch():
    events = np.concatenate(
        [event(GET, OK), event(GET, NOT_FOUND, status=404, role=1, conn=8), event(GET, OK)]
    )
    spans, dicts = both(events)
    assert [(s.kind, s.status, s.status_code) for s in spans] == [
        ("SERVER", "ok", "200"),
        ("CLIENT", "error", "404"),
        ("SERVER", "ok", "200"),
    ]
    assert [d["status_code"] for d in dicts] == ["200", "404", "200"]
    assert len({d["span_id"] for d in dicts}) == 3 and len({d["trace_id"] for d in dicts}) == 3
    assert all(len(d["trace_id"]) == 32 and len(d["span_id"]) == 16 for d in dicts)


def test_a_head_cut_short_still_names_the_request():
    long_get = b"GET /a/very/long/path HTTP/1.1\r\nHost: h\r\nCookie: " + b"c" * 400 + b"\r\n\r\n"
    (s,), _ = both(event(long_get, OK))
    assert s.name == "GET /a/very/long/path" and s.req_size == len(long_get)
    assert s.attributes["http.request.header.host"] == "h"
    assert s.req_head.endswith(b"Cookie: [REDACTED]")  # a secret cut by the head's end is redacted too


def test_caches_keep_heads_apart():
    other = GET.replace(b"/users/42", b"/orders/7")
    spans, dicts = both(np.concatenate([event(GET, OK), event(other, NOT_FOUND, status=404), event(GET, OK)]))
    assert [s.name for s in spans] == ["GET /users/{id}", "GET /orders/{id}", "GET /users/{id}"]
    assert [d["attributes"]["url.path"] for d in dicts] == ["/users/42", "/orders/7", "/users/42"]
    # A span's attributes are its own: changing one changes no other.
    spans[0].attributes["mine"] = 1
    assert "mine" not in spans[2].attributes


def test_redis_exchanges():
    cmd = b"*3\r\n$3\r\nSET\r\n$5\r\nuser1\r\n$5\r\nhello\r\n"
    err = b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"
    auth = b"*2\r\n$4\r\nAUTH\r\n$6\r\nsecret\r\n"
    big = b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$100000\r\n" + b"v" * (HEAD - 28)
    events = np.concatenate([
        event(cmd, b"+OK\r\n", protocol="redis", status=0), event(cmd, err, protocol="redis", status=1),
        event(auth, b"+OK\r\n", protocol="redis", status=0),
        event(big, b"+OK\r\n", protocol="redis", status=0, req_size=100_031)])  # fmt: skip
    spans, dicts = both(events)
    assert [(s.name, s.status, s.status_code) for s in spans] == [
        ("redis SET", "ok", None), ("redis SET", "error", "WRONGTYPE"), ("redis AUTH", "ok", None),
        ("redis SET", "ok", None)]  # fmt: skip
    assert spans[0].attributes["db.redis.key"] == "user1" and spans[3].attributes["db.redis.key"] == "big"
    assert "db.redis.key" not in spans[2].attributes and b"secret" not in spans[2].req_head
    assert spans[1].attributes["db.response.error"].startswith("WRONGTYPE")
    assert [d["name"] for d in dicts] == [s.name for s in spans]


def test_text_that_is_not_ascii_is_written_escaped():
    get = "GET /caf\u00e9 HTTP/1.1\r\nHost: h\r\n\r\n".encode("utf-8")
    _, dicts = both(event(get, OK))
    line = json_lines(SpanPipeline(host="h").push_exchanges_json(event(get, OK), 0))
    assert line.isascii() and dicts[0]["attributes"]["url.path"] == get.split(b" ")[1].decode("latin-1")


def test_stats_count_exchanges_and_spans():
    pipeline = SpanPipeline(host="h")
    pipeline.push_exchanges(np.concatenate([event(GET, OK)] * 3), 0)
    pipeline.push_exchanges_json(event(GET, OK), 0)
    assert (pipeline.stats.exchanges, pipeline.stats.spans) == (4, 4)
    assert pipeline.push_exchanges(np.zeros(0, exchange_dtype(HEAD)), 0) == []


def dns_query(ident: int, name: str, qtype: int = 1) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return ident.to_bytes(2, "big") + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + labels + b"\0" + bytes([0, qtype, 0, 1])


def dns_answer(query: bytes, rcode: int = 0, answers: int = 1) -> bytes:
    rr = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\x0a\x01\x02\x03"
    return query[:2] + bytes([0x81, 0x80 | rcode, 0, 1, 0, answers, 0, 0, 0, 0]) + query[12:] + rr * answers


def test_dns_datagrams_have_no_tcp_ranges_and_each_peer_of_a_socket_its_endpoint():
    q1, q2 = dns_query(1, "web.test"), dns_query(2, "gone.test", 28)
    events = np.concatenate([
        event(q1, dns_answer(q1), protocol="dns", status=0, flags=XFLAG_DATAGRAM, raddr="10.0.0.5", rport=5001),
        event(q2, dns_answer(q2, 3, 0), protocol="dns", status=3, flags=XFLAG_DATAGRAM, raddr="10.0.0.6", rport=5002),
        event(GET, OK),  # a TCP exchange in the same batch keeps its ranges
    ])  # fmt: skip
    spans, dicts = both(events)
    a, gone, http = spans
    assert (a.name, a.status, a.status_code, a.req_seq, a.resp_seq) == ("DNS A web.test", "ok", "NOERROR", None, None)
    assert a.attributes == {"dns.id": 1, "dns.question.name": "web.test", "dns.question.type": "A",
                            "dns.response.code": "NOERROR", "dns.answers": 1}  # fmt: skip
    assert (gone.name, gone.status, gone.status_code) == ("DNS AAAA gone.test", "error", "NXDOMAIN")
    # One socket (conn 7), two peers: each span names its own.
    assert [(s.endpoint.raddr, s.endpoint.rport) for s in (a, gone)] == [("10.0.0.5", 5001), ("10.0.0.6", 5002)]
    assert http.req_seq is not None
    for s, d in zip(spans, dicts):
        expected = s.to_json_dict()
        for x in (d, expected):
            x.pop("trace_id"), x.pop("span_id")
        assert d == expected


def test_a_request_another_of_its_id_displaced_is_an_error_span_in_both_paths():
    q = dns_query(9, "retry.test")
    alone = event(q, b"", protocol="dns", status=0, flags=XFLAG_DATAGRAM | XFLAG_UNANSWERED, end=2_000)
    alone["resp_captured"] = alone["resp_size"] = 0
    events = np.concatenate([alone, event(q, dns_answer(q), protocol="dns", status=0, flags=XFLAG_DATAGRAM, start=3_000)])
    pipeline = SpanPipeline(host="h")
    spans, dicts = both(events)
    displaced, answered = spans
    assert (displaced.status, displaced.status_code, displaced.resp_size) == ("error", "too many requests waiting", 0)
    assert displaced.end_ns == 10**18 + 2_000 and displaced.attributes["deeptrace.no_response"] == displaced.status_code
    assert (answered.status, answered.name) == ("ok", "DNS A retry.test")
    assert [d["status_code"] for d in dicts] == ["too many requests waiting", "NOERROR"]
    pipeline.push_exchanges(events, 0)
    assert (pipeline.stats.exchanges, pipeline.stats.spans, pipeline.stats.unanswered) == (2, 2, 1)
