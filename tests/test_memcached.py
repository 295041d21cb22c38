"""Memcached text and binary protocols on hand-built messages, and live against memcached."""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from parsing import chunk, exchange, feed_alternating, feed_split

from deeptrace.capture.pipeline import SpanPipeline
from deeptrace.protocols import detect
from deeptrace.protocols.memcached import MemcachedConnection

SET = b"set user:42 0 60 5\r\nalice\r\n"
GET_HIT = b"VALUE user:42 0 5\r\nalice\r\nEND\r\n"


def binary(magic: int, opcode: int, key: bytes = b"", value: bytes = b"", extras: bytes = b"", opaque: int = 0,
           status: int = 0) -> bytes:  # fmt: skip
    body = extras + key + value
    return struct.pack("!BBHBBHIIQ", magic, opcode, len(key), len(extras), 0, status, len(body), opaque, 0) + body


def test_text_set_and_get():
    conn = MemcachedConnection()
    req, resp = exchange(conn, SET, b"STORED\r\n")
    assert (req.name, req.attributes["db.memcached.key"], req.size) == ("memcached set", "user:42", len(SET))
    assert (resp.status_code, resp.error) == ("STORED", False)
    req, resp = exchange(conn, b"get user:42 user:43\r\n", GET_HIT, t=20)
    assert resp.size == len(GET_HIT) and resp.attributes["db.memcached.values"] == 1


@pytest.mark.parametrize("cut", range(1, len(GET_HIT)))
def test_multi_block_reply_split_at_every_byte(cut):
    assert [m.size for m in feed_split(MemcachedConnection(), False, GET_HIT, cut)] == [len(GET_HIT)]


def test_a_reply_longer_than_the_capture_is_salvaged_and_the_next_exchange_parses():
    conn = MemcachedConnection()
    conn.feed(True, chunk(b"get big\r\n"))
    reply = b"VALUE big 0 3000\r\n" + b"x" * 3000 + b"\r\nEND\r\n"
    (resp,) = conn.feed(False, chunk(reply[:1024], t=1, size=len(reply)))  # END was not captured
    assert (resp.status_code, resp.partial, resp.size, resp.attributes["db.memcached.values"]) == (
        "VALUE", True, len(reply), 1)  # fmt: skip
    req, resp = exchange(conn, b"get k\r\n", b"END\r\n", t=2)
    assert (req.name, resp.status_code) == ("memcached get", "END")


def test_errors_and_misses():
    conn = MemcachedConnection()
    _, err = exchange(conn, b"incr user:42 1\r\n", b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n")
    _, miss = exchange(conn, b"get nope\r\n", b"END\r\n", t=30)
    assert (err.error, err.status_code) == (True, "CLIENT_ERROR") and (miss.error, miss.status_code) == (False, "END")


def test_noreply_is_a_one_way_span():
    from test_pipeline import Conn

    c = Conn()
    spans = SpanPipeline().push([c.rec("ingress", b"set k 0 0 1 noreply\r\nx\r\n"), c.rec("ingress", b"get k\r\n"),
                                 c.rec("egress", b"VALUE k 0 1\r\nx\r\nEND\r\n")])  # fmt: skip
    assert [(s.name, s.status, s.resp_size > 0) for s in spans] == [("memcached set", "ok", False),
                                                                     ("memcached get", "ok", True)]  # fmt: skip


def test_binary_pairs_by_opaque():
    conn = MemcachedConnection()
    reqs = conn.feed(True, chunk(binary(0x80, 0x01, b"k", b"v", b"\0" * 8, opaque=7) + binary(0x80, 0x00, b"k", opaque=8)))
    resps = conn.feed(False, chunk(binary(0x81, 0x00, value=b"v", extras=b"\0" * 4, opaque=8) +
                                   binary(0x81, 0x01, opaque=7, status=0)))  # fmt: skip
    assert [(m.name, m.pair_key) for m in reqs] == [("memcached set", 7), ("memcached get", 8)]
    assert [(m.pair_key, m.status_code) for m in resps] == [(8, "OK"), (7, "OK")]


def test_text_quit_is_one_way():
    from test_pipeline import Conn

    c = Conn()
    spans = SpanPipeline().push([c.rec("ingress", b"get k\r\n"), c.rec("egress", b"END\r\n"), c.rec("ingress", b"quit\r\n")])
    spans += SpanPipeline().close_all(0)
    assert [(s.name, s.status) for s in spans] == [("memcached get", "ok"), ("memcached quit", "ok")]


def test_binary_quit_is_answered_and_quitq_is_not():
    conn = MemcachedConnection()
    (quit_req,) = conn.feed(True, chunk(binary(0x80, 0x07, opaque=5)))
    (quit_resp,) = conn.feed(False, chunk(binary(0x81, 0x07, opaque=5)))
    assert (quit_req.name, quit_req.expects_response, quit_resp.pair_key) == ("memcached quit", True, 5)
    (quitq,) = MemcachedConnection().feed(True, chunk(binary(0x80, 0x17, opaque=6)))
    assert (quitq.name, quitq.expects_response) == ("memcached quitq", False)


def test_quiet_requests_pair_when_answered_and_are_one_way_when_passed_over():
    """GETKQ k1 (hit), GETKQ k2 (miss: no answer), SETQ (success: no answer), NOOP: the server
    answers the hit and the NOOP; the others were passed over in silence."""
    conn = MemcachedConnection()
    sent = (binary(0x80, 0x0D, b"k1", opaque=1) + binary(0x80, 0x0D, b"k2", opaque=2)
            + binary(0x80, 0x11, b"k3", b"v", b"\0" * 8, opaque=3) + binary(0x80, 0x0A, opaque=4))  # fmt: skip
    (noop,) = conn.feed(True, chunk(sent))
    out = conn.feed(False, chunk(binary(0x81, 0x0D, b"k1", b"v", b"\0" * 4, opaque=1) + binary(0x81, 0x0A, opaque=4)))
    assert [(m.is_request, m.name, m.pair_key, m.expects_response) for m in out] == [
        (True, "memcached getkq", 1, True), (False, None, 1, True), (True, "memcached getkq", 2, False),
        (True, "memcached setq", 3, False), (False, None, 4, True)]  # fmt: skip
    assert noop.name == "memcached noop"
    # A quiet request still unanswered when the connection ends: done, without a response.
    conn.feed(True, chunk(binary(0x80, 0x14, b"gone", opaque=9)))
    assert [(m.name, m.expects_response) for m in conn.close(99)] == [("memcached deleteq", False)]


def test_quiet_requests_through_the_pipeline():
    from test_pipeline import Conn

    c = Conn()
    spans = SpanPipeline().push([
        c.rec("ingress", binary(0x80, 0x09, b"a", opaque=1) + binary(0x80, 0x09, b"b", opaque=2) + binary(0x80, 0x0A, opaque=3)),
        c.rec("egress", binary(0x81, 0x09, value=b"x", extras=b"\0" * 4, opaque=2) + binary(0x81, 0x0A, opaque=3)),
    ])  # fmt: skip
    assert sorted((s.name, s.status, s.resp_size) for s in spans) == [
        ("memcached getq", "ok", 0), ("memcached getq", "ok", 29), ("memcached noop", "ok", 24)]  # fmt: skip


def test_sasl_credentials_stay_out_of_the_head():
    (auth,) = MemcachedConnection().feed(True, chunk(binary(0x80, 0x21, b"PLAIN", b"\0alice\0hunter2", opaque=1)))
    assert b"hunter2" not in auth.head and auth.head.endswith(b"PLAIN")


def test_detection_prefers_memcached_for_lower_case_text():
    assert detect(b"get k\r\n", True)[0] == "memcached"
    assert detect(b"GET k\r\n", True)[0] == "redis"
    assert detect(binary(0x80, 0x00, b"k"), True)[0] == "memcached"


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_arbitrary_bytes_never_raise(parts):
    feed_alternating(MemcachedConnection(), parts, missing=40)


CLIENT = r"""
import socket, struct, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
sys.stdin.readline()
def text(cmd):
    s.sendall(cmd)
    buf = b""
    while not (buf.endswith(b"END\r\n") or buf.endswith(b"STORED\r\n") or b"ERROR" in buf):
        buf += s.recv(4096)
for cmd in (b"set user:42 0 60 5\r\nalice\r\n", b"get user:42\r\n", b"get missing\r\n", b"incr user:42 1\r\n"):
    text(cmd)
b = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
for opaque, op, key, value, extras in ((7, 1, b"bin", b"v", b"\0" * 8), (8, 0, b"bin", b"", b""), (9, 0, b"nope", b"", b"")):
    body = extras + key + value
    b.sendall(struct.pack("!BBHBBHIIQ", 0x80, op, len(key), len(extras), 0, 0, len(body), opaque, 0) + body)
    hdr = b.recv(24)
    b.recv(struct.unpack("!I", hdr[8:12])[0] or 1) if struct.unpack("!I", hdr[8:12])[0] else None
print("done", flush=True)
"""


def test_live_text_and_binary_clients_and_their_capture(collector, store, tmp_path):
    from servers import free_port, need, replayed_spans, serving, span_key, tshark_capture

    port = free_port()
    with serving([need("memcached"), "-u", "nobody", "-l", "127.0.0.1", "-p", str(port), "-U", "0"], port) as pid, \
            tshark_capture(tmp_path / "mc.pcapng", [port]) as cap:  # fmt: skip
        collector.trace(pid)
        client = subprocess.Popen([sys.executable, "-c", CLIENT, str(port)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        collector.trace(client.pid)
        out, _ = client.communicate("go\n", timeout=20)
        assert out.strip() == "done"
        recs = store.wait_for(pid, lambda rs: sum(r.direction == "egress" for r in rs) >= 7)
        server = SpanPipeline().push(recs)
        client_spans = SpanPipeline().push(store.settle(client.pid))
    got = sorted((s.name, s.status, s.status_code) for s in server)
    assert got == sorted([("memcached set", "ok", "STORED"), ("memcached get", "ok", "VALUE"),
                          ("memcached get", "ok", "END"), ("memcached incr", "error", "CLIENT_ERROR"),
                          ("memcached set", "ok", "OK"), ("memcached get", "ok", "OK"),
                          ("memcached get", "ok", "KEY_NOT_FOUND")])  # fmt: skip
    assert sorted((s.name, s.status_code) for s in client_spans) == sorted((n, c) for n, _, c in got)
    assert {s.kind for s in server} == {"SERVER"} and {s.kind for s in client_spans} == {"CLIENT"}
    assert sorted(map(span_key, replayed_spans(cap))) == sorted(map(span_key, server))
