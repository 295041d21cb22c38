"""HTTP/2 and gRPC on hand-built frames, and live between a real grpcio client and server."""

from __future__ import annotations

import struct
import textwrap

import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from parsing import chunk, feed_alternating

from deeptrace.capture.pipeline import SpanPipeline
from deeptrace.protocols import detect
from deeptrace.protocols.http2 import PREFACE, Http2Connection
from deeptrace.protocols.redaction import http_head


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + struct.pack("!I", stream) + payload


SETTINGS = frame(4, 0, 0, b"")


def request_bytes(enc: hpack.Encoder, stream: int, path: str, body: bytes = b"", grpc: bool = True) -> bytes:
    headers = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "svc:50051"),
               ("content-type", "application/grpc" if grpc else "application/json"), ("authorization", "Bearer x")]  # fmt: skip
    out = frame(1, 0x4 if body else 0x5, stream, enc.encode(headers))
    if body:
        out += frame(0, 0x1, stream, body)
    return out


def response_bytes(enc: hpack.Encoder, stream: int, grpc_status: int = 0) -> bytes:
    return (frame(1, 0x4, stream, enc.encode([(":status", "200"), ("content-type", "application/grpc")]))
            + frame(0, 0, stream, b"\0\0\0\0\x02hi")
            + frame(1, 0x5, stream, enc.encode([("grpc-status", str(grpc_status)), ("grpc-message", "m")])))  # fmt: skip


def test_grpc_calls_multiplexed_and_paired_by_stream():
    conn, cenc, senc = Http2Connection(), hpack.Encoder(), hpack.Encoder()
    reqs = conn.feed(True, chunk(PREFACE + SETTINGS + request_bytes(cenc, 1, "/demo.Users/Get", b"\0\0\0\0\x01a")
                                 + request_bytes(cenc, 3, "/demo.Users/List", b"\0\0\0\0\x00")))  # fmt: skip
    resps = conn.feed(False, chunk(SETTINGS + response_bytes(senc, 3, 5) + response_bytes(senc, 1), t=5))
    assert [(m.name, m.pair_key) for m in reqs] == [("grpc demo.Users/Get", 1), ("grpc demo.Users/List", 3)]
    assert [(m.pair_key, m.error, m.status_code) for m in resps] == [(3, True, "NOT_FOUND"), (1, False, "OK")]
    head = http_head(reqs[0].head)  # as every span's head is redacted
    assert b"Bearer" not in head and b"authorization: [REDACTED]" in head
    assert reqs[0].attributes["rpc.service"] == "demo.Users"


@pytest.mark.parametrize("cut", range(1, 80, 3))
def test_request_split_anywhere(cut):
    data = PREFACE + SETTINGS + request_bytes(hpack.Encoder(), 1, "/a/B", b"\0\0\0\0\x01z")
    conn = Http2Connection()
    msgs = conn.feed(True, chunk(data[:cut])) + conn.feed(True, chunk(data[cut:], t=1))
    assert [m.name for m in msgs] == ["grpc a/B"]


def test_plain_http2_and_rst_stream():
    conn, enc = Http2Connection(), hpack.Encoder()
    (req,) = conn.feed(True, chunk(PREFACE + request_bytes(enc, 1, "/users/42?x=1", grpc=False)))
    assert req.name == "POST /users/{id}"
    (resp,) = conn.feed(False, chunk(SETTINGS + frame(3, 0, 1, struct.pack("!I", 8))))
    assert resp.error and resp.status_code == "RST_STREAM CANCEL"


def test_connection_start_not_seen_decodes_what_hpack_allows():
    enc = hpack.Encoder()
    enc.encode([(":path", "/warm/Up"), ("content-type", "application/grpc")])  # table state never seen
    conn = Http2Connection()
    (req,) = conn.feed(True, chunk(request_bytes(enc, 5, "/demo.Users/Get", b"\0\0\0\0\x00")))
    # :method and :scheme are static, the new :path a literal; content-type was inserted before we joined.
    assert req.name == "POST /demo.Users/Get" and req.attributes["http2.request.headers_unknown"] == 1
    enc2 = hpack.Encoder()
    enc2.encode([(":path", "/warm/Up")])
    (req,) = Http2Connection().feed(True, chunk(request_bytes(enc2, 7, "/warm/Up")))
    assert req.name == "grpc (unknown method)" and req.attributes["http2.request.headers_unknown"] == 1


def test_response_cut_by_the_close_is_a_partial_response():
    """The capture (or connection) ended after a response's `:status` and some of its body,
    before its trailers: what was seen of it answers the request, marked partial."""
    conn, cenc, senc = Http2Connection(), hpack.Encoder(), hpack.Encoder()
    calls = request_bytes(cenc, 1, "/demo.Users/Get", b"\0\0\0\0\x01a")
    calls += request_bytes(cenc, 3, "/users/7", grpc=False)
    assert len(conn.feed(True, chunk(PREFACE + SETTINGS + calls))) == 2
    grpc_head = frame(1, 0x4, 1, senc.encode([(":status", "200"), ("content-type", "application/grpc")]))
    plain_head = frame(1, 0x4, 3, senc.encode([(":status", "503")]))
    cut = SETTINGS + grpc_head + frame(0, 0, 1, b"\0\0\0\0\x02hi") + plain_head
    assert conn.feed(False, chunk(cut, t=5)) == []
    grpc, plain = conn.close(9)
    assert (grpc.pair_key, grpc.error, grpc.status_code, grpc.partial) == (1, False, None, True)
    assert grpc.size == len(cut) - len(SETTINGS + plain_head)
    assert grpc.attributes["http.response.status_code"] == 200
    assert grpc.attributes["deeptrace.http2.grpc_status"] == "not seen"  # the trailers never came
    assert (plain.pair_key, plain.error, plain.status_code, plain.partial) == (3, True, "503", True)
    assert conn.close(10) == [] and not conn._streams


def test_end_stream_waits_for_the_continuations_of_its_header_block():
    """END_STREAM on a HEADERS frame whose block goes on in CONTINUATION: the side ends after
    the block, whose fields (the request's :path, the trailers' grpc-status) count."""
    cenc, senc = hpack.Encoder(), hpack.Encoder()
    block = cenc.encode([(":method", "GET"), (":scheme", "http"), (":path", "/users/42")])
    trailers = senc.encode([("grpc-status", "5")])
    conn = Http2Connection()
    (req,) = conn.feed(True, chunk(PREFACE + frame(1, 0x1, 1, block[:3]) + frame(9, 0x4, 1, block[3:])))
    assert req.name == "GET /users/{id}"
    grpc_head = frame(1, 0x4, 1, senc.encode([(":status", "200"), ("content-type", "application/grpc")]))
    (resp,) = conn.feed(False, chunk(grpc_head + frame(1, 0x1, 1, b"") + frame(9, 0x4, 1, trailers)))
    assert (resp.error, resp.status_code) == (True, "NOT_FOUND")


def test_detection():
    assert detect(PREFACE + SETTINGS, None)[0:3:2] == ("http2", True)
    assert detect(PREFACE[:3], None)[0:3:2] == ("http2", True)
    assert detect(b"P", None) is None  # could still be an HTTP/1 POST
    assert detect(SETTINGS, None) is None  # both sides send SETTINGS: it cannot tell which one this is
    enc = hpack.Encoder()
    assert detect(SETTINGS + request_bytes(enc, 1, "/a/B"), None)[0:3:2] == ("http2", True)
    assert detect(response_bytes(enc, 1), None)[0:3:2] == ("http2", False)


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_arbitrary_bytes_never_raise(parts):
    conn = Http2Connection()
    conn.feed(True, chunk(PREFACE))
    feed_alternating(conn, parts)


SERVER = textwrap.dedent("""
    import sys, grpc
    from concurrent import futures
    def get(request, context):
        if request == b"missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such user")
        return b"user:" + request
    handler = grpc.method_handlers_generic_handler("demo.Users", {"Get": grpc.unary_unary_rpc_method_handler(get)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()
""")
CLIENT = textwrap.dedent("""
    import sys, grpc
    sys.stdin.readline()
    with grpc.insecure_channel("127.0.0.1:" + sys.argv[1]) as ch:
        get = ch.unary_unary("/demo.Users/Get")
        for who in (b"42", b"7", b"missing"):
            try:
                get(who, timeout=5)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND
    print("done", flush=True)
""")


def test_live_grpcio_client_and_server_and_their_capture(collector, store, tmp_path):
    from servers import replayed_spans, scripted_pair, span_key

    with scripted_pair(collector, SERVER, CLIENT, tmp_path / "grpc.pcapng", timeout_s=30) as (server, client, cap):
        server_recs = store.wait_for(server, lambda rs: sum(b"grpc-status" in r.payload or b"\x88" in r.payload
                                                           for r in rs if r.direction == "egress") >= 3)  # fmt: skip
        client_recs = store.settle(client, quiet_s=0.5)
    for recs, kind in ((server_recs, "SERVER"), (client_recs, "CLIENT")):
        spans = [s for s in SpanPipeline().push(recs) if s.protocol == "http2"]
        got = sorted((s.name, s.status, s.status_code) for s in spans)
        assert got == [("grpc demo.Users/Get", "error", "NOT_FOUND"), ("grpc demo.Users/Get", "ok", "OK"),
                       ("grpc demo.Users/Get", "ok", "OK")], kind  # fmt: skip
        assert all(s.kind == kind and s.duration_ns > 0 for s in spans)
        if kind == "SERVER":
            assert sorted(map(span_key, replayed_spans(cap))) == sorted(map(span_key, spans))
