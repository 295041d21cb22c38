"""HTTP/2 and gRPC on connections joined mid-stream: HPACK without the table's past, frame
boundaries found again, detection from frame headers, and live on a warm grpcio channel."""

from __future__ import annotations

import random
import struct
import subprocess
import sys
import textwrap

import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from parsing import chunk

from deeptrace.capture.pipeline import SpanPipeline
from deeptrace.capture.records import Record
from deeptrace.protocols import detect
from deeptrace.protocols.http2 import (
    PREFACE,
    TABLE_CAP,
    HpackTable,
    Http2Connection,
    frames_of_either_side,
    starts_request,
    starts_response,
)

NEVER = hpack.NeverIndexedHeaderTuple


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + struct.pack("!I", stream) + payload


SETTINGS = frame(4, 0, 0, struct.pack("!HI", 4, 1 << 20))
WINDOW_UPDATE = frame(8, 0, 0, struct.pack("!I", 1000))
PING = frame(6, 0, 0, b"12345678")


def grpc_request(enc: hpack.Encoder, stream: int, path: str, body: bytes = b"\0\0\0\0\x02hi") -> bytes:
    """As grpc-c sends one: pseudo-headers, then gRPC's; the body ends the stream."""
    headers = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "svc:50051"),
               ("content-type", "application/grpc"), ("te", "trailers")]  # fmt: skip
    return frame(1, 0x4, stream, enc.encode(headers)) + frame(0, 0x1, stream, body)


def grpc_status(enc: hpack.Encoder, status: int) -> bytes:
    """grpc-status as grpc-c encodes it: indexed once in the table, else a literal with its
    name spelled out (hpack would refer to the name's entry), and inserted."""
    value = str(status).encode()
    found = enc.header_table.search(b"grpc-status", value)
    if found is not None and found[2] is not None:
        return enc.encode([("grpc-status", value)])
    enc.header_table.add(b"grpc-status", value)
    return b"\x40\x0bgrpc-status" + bytes([len(value)]) + value


def grpc_response(enc: hpack.Encoder, stream: int, status: int = 0, messages: int = 1) -> bytes:
    """Headers, messages, trailers; grpc-message is never indexed, as grpc-c sends it."""
    out = frame(1, 0x4, stream, enc.encode([(":status", "200"), ("content-type", "application/grpc")]))
    out += b"".join(frame(0, 0, stream, b"\0\0\0\0\x03r%02d" % i) for i in range(messages))
    return out + frame(1, 0x5, stream, grpc_status(enc, status) + enc.encode([NEVER("grpc-message", "")]))


class Conversation:
    """A gRPC connection's two byte streams from its start, with the offsets at which each
    call begins, so a test can join it at any call."""

    def __init__(self) -> None:
        self.cenc, self.senc = hpack.Encoder(), hpack.Encoder()
        self.req, self.resp = bytearray(PREFACE + SETTINGS), bytearray(SETTINGS)
        self.marks: list[tuple[int, int]] = []
        self.stream = 1

    def call(self, path: str, status: int = 0, messages: int = 1) -> int:
        self.marks.append((len(self.req), len(self.resp)))
        stream, self.stream = self.stream, self.stream + 2
        self.req += WINDOW_UPDATE + grpc_request(self.cenc, stream, path)
        self.resp += PING + grpc_response(self.senc, stream, status, messages)
        return stream

    def joined_at(self, call: int) -> tuple[bytes, bytes]:
        a, b = self.marks[call]
        return bytes(self.req[a:]), bytes(self.resp[b:])


def names(conn: Http2Connection, req: bytes, resp: bytes) -> list[tuple]:
    msgs = conn.feed(True, chunk(req)) + conn.feed(False, chunk(resp, t=5))
    reqs = {m.pair_key: m for m in msgs if m.is_request}
    return [(reqs[m.pair_key].name, m.error, m.status_code) for m in msgs if not m.is_request]


# ---- HPACK with an unknown past ----


def test_table_joined_mid_connection_knows_only_what_it_saw_inserted():
    enc = hpack.Encoder()
    enc.encode([(":path", "/warm/Up"), ("x-a", "1")])  # inserted before we joined
    table = HpackTable(from_start=False)
    fields = table.decode(enc.encode([(":method", "POST"), (":path", "/warm/Up"), (":path", "/new/Path"),
                                      ("x-a", "1"), ("x-b", "2")]))  # fmt: skip
    assert fields == [(":method", "POST"), None, (":path", "/new/Path"), None, ("x-b", "2")]
    # Entries inserted while we watched are known from then on, past the unknown ones too.
    assert table.decode(enc.encode([(":path", "/new/Path"), ("x-b", "2"), (":path", "/warm/Up")])) == [
        (":path", "/new/Path"), ("x-b", "2"), None]  # fmt: skip


def test_size_update_makes_the_table_known_and_a_reference_past_it_is_out_of_step():
    enc = hpack.Encoder()
    enc.encode([("x-old", "1")])
    table = HpackTable(from_start=False)
    enc.header_table_size = 0  # the next block starts with a size update: everything evicted
    assert table.decode(enc.encode([("x-a", "1")])) == [("x-a", "1")]
    enc.header_table_size = 200
    assert table.decode(enc.encode([("x-b", "2"), ("x-b", "2")])) == [("x-b", "2"), ("x-b", "2")]
    assert not table.tail_unknown and len(table.entries) == 1
    # Index 63 cannot exist in a table we know whole: we are out of step, and say so.
    assert table.decode(bytes([0x80 | 63])) == [None] and table.tail_unknown


def test_table_size_is_bounded_whatever_the_peer_says():
    table = HpackTable(from_start=True)
    big = hpack.Encoder()
    big.header_table_size = 1 << 20
    for i in range(200):
        table.decode(big.encode([(f"x-{i}", "v" * 1000)]))
    assert table.size <= TABLE_CAP and table.tail_unknown  # what we dropped may still be the peer's


header_lists = st.lists(st.lists(st.tuples(st.sampled_from([":path", "x-a", "x-b", "content-type", "grpc-status"]),
                                           st.text(max_size=30)), min_size=1, max_size=6),
                        min_size=1, max_size=25)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(header_lists, st.lists(st.integers(0, 400), max_size=25), st.integers(0, 24))
def test_partial_decoding_never_invents_a_field(blocks, sizes, join):
    """Against hpack's own decoder of the whole stream: from the start every field is known;
    joined at any block, each field is either the true one or unknown, in its place."""
    enc, truth, full, late = hpack.Encoder(), hpack.Decoder(), HpackTable(True), HpackTable(False)
    for i, headers in enumerate(blocks):
        if i < len(sizes) and sizes[i] % 3 == 0:
            enc.header_table_size = sizes[i]
        block = enc.encode(headers)
        expected = [(n, v) for n, v in truth.decode(block)]
        assert full.decode(block) == expected
        if i >= join:
            got = late.decode(block)
            assert len(got) == len(expected) and all(g is None or g == e for g, e in zip(got, expected))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_hpack_on_arbitrary_bytes_never_raises(block, from_start):
    table = HpackTable(from_start)
    table.decode(block)
    assert table.size <= TABLE_CAP


# ---- joined mid-connection ----


def test_joined_after_the_table_was_filled():
    talk = Conversation()
    talk.call("/demo.Users/Get")
    talk.call("/demo.Users/Get")
    talk.call("/demo.Users/Get", status=5)  # grpc-status 5 inserted now, before we join
    talk.call("/demo.Users/Get")  # joined here
    talk.call("/demo.Users/Get", status=5)
    talk.call("/demo.Users/List", messages=3)
    talk.call("/demo.Users/List")
    talk.call("/demo.Users/Get", status=7)
    got = names(Http2Connection(), *talk.joined_at(3))
    assert got == [
        # path and grpc-status from entries inserted before we joined: unknown, and said so;
        # grpc-message (never indexed) shows it is gRPC.
        ("grpc (unknown method)", False, None),
        ("grpc (unknown method)", False, None),
        # A method first called after we joined is a literal, then an entry we saw inserted.
        ("grpc demo.Users/List", False, None),
        ("grpc demo.Users/List", False, None),
        ("grpc (unknown method)", True, "PERMISSION_DENIED"),  # a status first sent now: a literal
    ]


def test_joined_spans_say_what_stayed_unknown():
    talk = Conversation()
    talk.call("/demo.Users/Get")
    talk.call("/demo.Users/Get")
    conn = Http2Connection()
    req, resp = talk.joined_at(1)
    (request,) = conn.feed(True, chunk(req))
    (response,) = conn.feed(False, chunk(resp))
    # :method and :scheme are in the static table; :path, :authority, content-type, te were inserted before.
    assert request.attributes["http2.request.headers_unknown"] == 4
    assert request.attributes["rpc.system"] == "grpc" and "rpc.method" not in request.attributes
    assert response.attributes["deeptrace.http2.grpc_status"] == "not decoded"
    assert response.attributes["http2.response.headers_unknown"] == 2  # content-type, grpc-status
    assert response.attributes["http.response.status_code"] == 200


def test_from_the_start_everything_is_named():
    talk = Conversation()
    talk.call("/demo.Users/Get")
    talk.call("/demo.Users/Get", status=5)
    talk.call("/demo.Users/List", messages=4)
    got = names(Http2Connection(), bytes(talk.req), bytes(talk.resp))
    assert got == [("grpc demo.Users/Get", False, "OK"), ("grpc demo.Users/Get", True, "NOT_FOUND"),
                   ("grpc demo.Users/List", False, "OK")]  # fmt: skip


def test_server_streaming_is_one_response_ended_by_its_trailers():
    talk = Conversation()
    talk.call("/demo.Users/List", messages=200)
    conn = Http2Connection()
    req, resp = bytes(talk.req), bytes(talk.resp)
    msgs = conn.feed(True, chunk(req))
    for i in range(0, len(resp), 700):  # as reads of the socket would cut it
        msgs += conn.feed(False, chunk(resp[i : i + 700], t=10 + i))
    (request, response) = msgs
    assert (request.name, response.status_code) == ("grpc demo.Users/List", "OK")
    assert response.size == len(resp) - len(SETTINGS) - len(PING)  # every frame of the stream, no other
    assert response.end_ns > response.start_ns and not conn._streams  # nothing kept once it is over


@pytest.mark.parametrize("direction", ["request", "response"])
def test_joined_mid_connection_split_at_every_byte(direction):
    talk = Conversation()
    talk.call("/demo.Users/Get")
    talk.call("/demo.Users/Get")
    talk.call("/demo.Users/List", messages=2)
    req, resp = talk.joined_at(1)
    expected = names(Http2Connection(), req, resp)
    data = req if direction == "request" else resp
    for cut in range(1, len(data)):
        conn = Http2Connection()
        parts = [data[:cut], data[cut:]]
        msgs = []
        if direction == "response":
            msgs += conn.feed(True, chunk(req))
        msgs += conn.feed(direction == "request", chunk(parts[0], t=1))
        msgs += conn.feed(direction == "request", chunk(parts[1], t=2))
        if direction == "request":
            msgs += conn.feed(False, chunk(resp, t=3))
        reqs = {m.pair_key: m for m in msgs if m.is_request}
        assert [
            (reqs[m.pair_key].name, m.error, m.status_code) for m in msgs if not m.is_request
        ] == expected, cut


def test_one_byte_at_a_time():
    talk = Conversation()
    talk.call("/demo.Users/Get")
    talk.call("/demo.Users/List", messages=3)
    req, resp = talk.joined_at(1)
    conn = Http2Connection()
    msgs = [m for i, b in enumerate(req) for m in conn.feed(True, chunk(bytes([b]), t=i))]
    msgs += [m for i, b in enumerate(resp) for m in conn.feed(False, chunk(bytes([b]), t=10**4 + i))]
    # grpc-status 0 was inserted by the call before we joined: not decoded.
    assert [(m.is_request, m.name, m.status_code) for m in msgs] == [(True, "grpc demo.Users/List", None),
                                                                       (False, None, None)]  # fmt: skip


def test_first_bytes_inside_a_frame_then_back_in_step():
    """Joined in the middle of a large DATA frame: those bytes are no frame; the next write
    starts one, and the calls from there are named."""
    talk = Conversation()
    talk.call("/demo.Users/Get")
    talk.call("/demo.Users/List")
    req, resp = talk.joined_at(1)
    conn = Http2Connection()
    tail = b"lo world, the rest of a message the agent saw only the end of" * 3
    assert conn.feed(True, chunk(tail)) == []
    assert names(conn, req, resp) == [("grpc demo.Users/List", False, None)]  # grpc-status 0: an old entry


def test_bytes_lost_between_frames_cost_the_table_not_the_names_that_follow():
    talk = Conversation()
    talk.call("/demo.Users/Get")
    talk.call("/demo.Users/A")
    talk.call("/demo.Users/A")
    talk.call("/demo.Users/B")
    req0, resp0 = talk.joined_at(0)
    a, b = talk.marks[1][0] - talk.marks[0][0], talk.marks[2][0] - talk.marks[0][0]
    conn = Http2Connection()
    msgs = conn.feed(True, chunk(req0[:a]))
    msgs += conn.feed(True, chunk(b"", size=b - a))  # /demo.Users/A's request was not captured
    msgs += conn.feed(True, chunk(req0[b:]))
    msgs += conn.feed(False, chunk(resp0))
    reqs = {m.pair_key: m.name for m in msgs if m.is_request}
    # Stream 5 refers to the entry inserted in the lost bytes: unknown, not another path.
    assert reqs == {1: "grpc demo.Users/Get", 5: "grpc (unknown method)", 7: "grpc demo.Users/B"}


def test_rst_stream_from_the_client_ends_the_exchange():
    talk = Conversation()
    talk.call("/demo.Users/Get")
    req, _ = talk.joined_at(0)
    conn = Http2Connection()
    assert [m.is_request for m in conn.feed(True, chunk(req))] == [True]
    (response,) = conn.feed(True, chunk(frame(3, 0, 1, struct.pack("!I", 8)), t=3))
    assert (response.is_request, response.error, response.status_code, response.size) == (
        False, True, "RST_STREAM CANCEL", 0)  # fmt: skip
    assert conn.feed(False, chunk(talk.resp[len(SETTINGS) :], t=4)) == []  # the stream was over


# ---- detection ----


def test_detection_from_frame_headers_mid_stream():
    talk = Conversation()
    talk.call("/demo.Users/Get")
    talk.call("/demo.Users/Get")
    req, resp = talk.joined_at(1)
    assert starts_request(req) and not starts_response(req)  # WINDOW_UPDATE, then a request's HEADERS
    assert starts_response(resp) and not starts_request(resp)  # PING, then :status
    assert detect(req, None)[0:3:2] == ("http2", True) and detect(resp, None)[0:3:2] == ("http2", False)
    # Frames either side sends cannot tell: wait for more rather than guess the direction.
    data = frame(0, 0, 3, b"\0\0\0\0\x01x")
    for ambiguous in (
        WINDOW_UPDATE,
        PING + WINDOW_UPDATE,
        data,
        (data + PING)[:-3],
        data + PING + WINDOW_UPDATE[:5],
    ):
        assert not starts_request(ambiguous) and not starts_response(ambiguous)
        assert frames_of_either_side(ambiguous)  # what detection should wait on, not give to another
    assert not frames_of_either_side(req) and not frames_of_either_side(data[:-1])


OTHERS = [b"GET /users/42 HTTP/1.1\r\nHost: a\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
          b"*2\r\n$3\r\nGET\r\n$7\r\nuser:42\r\n", b"+OK\r\n", b"get user:42\r\n", b"VALUE k 0 1\r\nv\r\nEND\r\n",
          b"\x00\x00\x00\x08\x04\xd2\x16\x2f", b"\x00\x00\x00\x28\x00\x03\x00\x00user\x00pg\x00\x00",
          b"\x16\x00\x00\x00\x03select * from users", b"\x07\x00\x00\x01\x00\x00\x00\x02\x00\x00\x00",
          b"\x01\x00\x00\x01\x01\x27\x00\x00\x02\x03def\x04shop\x05users\x05users\x02id\x02id\x0c?\x00",
          b"\x00\x1c\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03web\x04test\x00\x00\x01\x00\x01",
          b"\x80\x01\x00\x03\x00\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00abc"]  # fmt: skip


def test_other_protocols_are_not_taken_for_http2_nor_http2_for_them():
    for data in OTHERS:
        for cut in range(1, len(data) + 1):
            assert not starts_request(data[:cut]) and not starts_response(data[:cut]), data[:cut]
            assert not frames_of_either_side(data[:cut]), data[:cut]
    talk = Conversation()
    for path in ("/a.B/C", "/a.B/C", "/a.B/D"):
        talk.call(path)
    for call in range(3):
        for data, is_request in zip(talk.joined_at(call), (True, False)):
            assert detect(data, None)[0:3:2] == ("http2", is_request)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=6), st.booleans())
def test_arbitrary_bytes_mid_stream_never_raise(parts, request_first):
    conn = Http2Connection()
    for i, part in enumerate(parts):
        conn.feed((i % 2 == 0) == request_first, chunk(part, t=i, size=len(part) + (i % 3) * 20))
    conn.close(99)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 3), st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=4),
       st.lists(st.integers(1, 400), max_size=8))  # fmt: skip
def test_real_frames_corrupted_and_cut_anywhere_never_raise(join, flips, cuts):
    talk = Conversation()
    for path in ("/a.B/C", "/a.B/C", "/a.B/D", "/a.B/C"):
        talk.call(path, messages=2)
    req, resp = (bytearray(x) for x in talk.joined_at(join))
    for pos, value in flips:
        (req if pos % 2 else resp)[pos % len(req if pos % 2 else resp)] = value
    conn = Http2Connection()
    for data, is_request in ((bytes(req), True), (bytes(resp), False)):
        pos = 0
        for cut in cuts + [len(data)]:
            conn.feed(is_request, chunk(data[pos : pos + cut], t=pos))
            pos += cut
    assert len(conn._streams) <= 8


# ---- through the pipeline, role unknown (a connection older than the agent) ----


def records(chunks: list[tuple[str, bytes]], role: str = "unknown") -> list[Record]:
    seq = {"ingress": 1000, "egress": 9000}
    out, t = [], 1_000_000
    for direction, data in chunks:
        t += 1000
        start = seq[direction]
        seq[direction] += len(data)
        out.append(Record(10, 11, "svc", "read" if direction == "ingress" else "write", direction, "ipv4", "tcp",
                          "127.0.0.1", 50051, "127.0.0.1", 40000, role, 7, 3, t, t + 10, start, start + len(data),
                          len(data), len(data), 0, 0, data))  # fmt: skip
    return out


@pytest.mark.parametrize("server_side", [True, False])
def test_pipeline_joined_mid_stream_with_role_unknown(server_side):
    talk = Conversation()
    talk.call("/demo.Users/Get")
    start = len(talk.marks)
    talk.call("/demo.Users/Get")
    talk.call("/demo.Users/List", messages=3)
    talk.call("/demo.Users/Get", status=5)
    req_dir, resp_dir = ("ingress", "egress") if server_side else ("egress", "ingress")
    chunks = []
    for i in range(start, len(talk.marks)):  # each call as the syscalls would move it
        a, b = talk.marks[i]
        a2, b2 = talk.marks[i + 1] if i + 1 < len(talk.marks) else (len(talk.req), len(talk.resp))
        chunks += [(req_dir, bytes(talk.req[a:a2])), (resp_dir, bytes(talk.resp[b:b2]))]
    spans = SpanPipeline().push(records(chunks))
    assert [(s.kind, s.name, s.status, s.status_code) for s in spans] == [
        ("SERVER" if server_side else "CLIENT", name, status, code)
        for name, status, code in (("grpc (unknown method)", "ok", None), ("grpc demo.Users/List", "ok", None),
                                   ("grpc (unknown method)", "error", "NOT_FOUND"))]  # fmt: skip


def client_stream(enc: hpack.Encoder, stream: int, path: str) -> tuple[bytes, bytes]:
    """A client-streaming call's opening: its headers, then a message that does not end the stream."""
    headers = [(":method", "POST"), (":path", path), ("content-type", "application/grpc")]
    return frame(1, 0x4, stream, enc.encode(headers)), frame(0, 0, stream, b"\0\0\0\0\x04push")


def test_client_stream_not_ended_when_the_capture_ends_is_still_a_span():
    """Joined mid-connection on a client stream whose END_STREAM never came (a long upload
    cut by the capture): the request is known from its headers, so its exchange is a span."""
    enc = hpack.Encoder()
    enc.encode([(":path", "/warm/Up"), ("x-a", "1")])  # the table filled before we joined
    head, body = client_stream(enc, 9, "/demo.Sync/Push")
    conn = Http2Connection()
    (request,) = conn.feed(True, chunk(head + WINDOW_UPDATE))
    assert (request.name, request.size) == ("grpc demo.Sync/Push", len(head))
    assert conn.feed(True, chunk(body, t=5)) == [] and (request.size, request.end_ns) == (len(head + body), 6)
    pipe = SpanPipeline()
    spans = pipe.push(records([("ingress", head), ("ingress", body)])) + pipe.close_all(10**9)
    assert [(s.name, s.status, s.status_code, s.req_size) for s in spans] == [
        ("grpc demo.Sync/Push", "error", "agent stopped", len(head + body))]  # fmt: skip


def test_server_answering_before_the_client_stream_ends_pairs():
    """A server may end a call (trailers only, UNIMPLEMENTED) while the client still streams:
    the answer pairs with the request emitted at its headers, not left without one."""
    cenc, senc = hpack.Encoder(), hpack.Encoder()
    head, body = client_stream(cenc, 1, "/demo.Sync/Push")
    trailers = frame(1, 0x5, 1, senc.encode([(":status", "200"), ("content-type", "application/grpc"),
                                             ("grpc-status", "12")]))  # fmt: skip
    end = frame(0, 0x1, 1, b"")
    pipe = SpanPipeline()
    spans = pipe.push(records([("ingress", head + body), ("egress", trailers), ("ingress", end)]))
    assert [(s.name, s.status, s.status_code) for s in spans + pipe.close_all(10**9)] == [
        ("grpc demo.Sync/Push", "error", "UNIMPLEMENTED")]  # fmt: skip
    assert pipe.stats.orphan_responses == 0


def test_random_syscall_boundaries_give_the_same_spans():
    talk = Conversation()
    for path in ("/a.B/C", "/a.B/C", "/a.B/D", "/a.B/D", "/a.B/C"):
        talk.call(path, messages=2)
    req, resp = talk.joined_at(1)
    whole = SpanPipeline().push(records([("ingress", req), ("egress", resp)]))
    assert len(whole) == 4
    rng = random.Random(7)
    for _ in range(20):
        chunks = []
        for direction, data in (("ingress", req), ("egress", resp)):
            pos = 0
            while pos < len(data):
                n = rng.randint(1, 60)
                chunks.append((direction, data[pos : pos + n]))
                pos += n
        got = SpanPipeline().push(records(chunks))
        assert [(s.name, s.status_code, s.req_size, s.resp_size) for s in got] == [
            (s.name, s.status_code, s.req_size, s.resp_size) for s in whole]  # fmt: skip


# ---- live: a warm grpcio channel, traced (and captured) only from the middle ----

SERVER = textwrap.dedent("""
    import sys, grpc
    from concurrent import futures
    def get(request, context):
        if request == b"missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such user")
        return b"user:" + request
    def items(request, context):
        for i in range(3):
            yield b"item:%d" % i
    handler = grpc.method_handlers_generic_handler("demo.Users", {
        "Get": grpc.unary_unary_rpc_method_handler(get), "List": grpc.unary_stream_rpc_method_handler(items)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port("127.0.0.1:" + sys.argv[1])
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()
""")
CLIENT = textwrap.dedent("""
    import sys, grpc
    with grpc.insecure_channel("127.0.0.1:" + sys.argv[1]) as ch:
        get, items = ch.unary_unary("/demo.Users/Get"), ch.unary_stream("/demo.Users/List")
        for who in (b"1", b"2"):  # before anyone watches: the dynamic tables fill
            get(who, timeout=5)
        print("warm", flush=True)
        sys.stdin.readline()
        get(b"3", timeout=5)
        try:
            get(b"missing", timeout=5)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND
        assert list(items(b"x", timeout=5)) == [b"item:0", b"item:1", b"item:2"]
        assert len(list(items(b"y", timeout=5))) == 3
        get(b"4", timeout=5)
        print("done", flush=True)
""")
# What HPACK lets us know of each call after joining (grpc-c's encoder, checked by hand on its bytes):
# the path of Get and grpc-status 0 are table entries from the warm-up, so unknown; NOT_FOUND is
# sent for the first time, as a literal; List's path is a literal on its first call, then the entry
# we saw inserted. grpc-message is never indexed, which tells every response is gRPC's.
EXPECTED = sorted([("grpc (unknown method)", "ok", None), ("grpc (unknown method)", "error", "NOT_FOUND"),
                   ("grpc demo.Users/List", "ok", None), ("grpc demo.Users/List", "ok", None),
                   ("grpc (unknown method)", "ok", None)], key=str)  # fmt: skip


def low_port() -> int:
    """A free port below the ephemeral range: a capture without the handshake takes the lower
    port for the server's (replay's hint), so the server's must be the lower one."""
    import socket

    for port in random.Random().sample(range(20000, 32000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in 20000-32000")


def test_live_grpcio_warm_channel_joined_mid_stream(collector, store, tmp_path):
    from servers import replayed_spans, span_key, tshark_capture

    port = str(low_port())
    server = subprocess.Popen([sys.executable, "-c", SERVER, port], stdout=subprocess.PIPE, text=True)
    client = None
    try:
        assert server.stdout.readline().strip() == "ready"
        client = subprocess.Popen([sys.executable, "-c", CLIENT, port], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True)  # fmt: skip
        assert client.stdout.readline().strip() == "warm"
        with tshark_capture(tmp_path / "warm.pcapng", [port]) as cap:
            collector.trace(server.pid)
            collector.trace(client.pid)
            assert client.communicate("go\n", timeout=60)[0].strip() == "done"
            got = {}
            for pid in (server.pid, client.pid):
                store.wait_for(pid, lambda rs: len(http2_spans(rs)) >= len(EXPECTED), timeout_s=10)
                got[pid] = http2_spans(store.settle(pid, quiet_s=0.5))
    finally:
        for proc in (client, server):
            if proc is not None:
                proc.kill()
                proc.wait()
    for pid, kind in ((server.pid, "SERVER"), (client.pid, "CLIENT")):
        spans = got[pid]
        assert sorted(((s.name, s.status, s.status_code) for s in spans), key=str) == EXPECTED, kind
        assert all(s.kind == kind and s.duration_ns > 0 and s.resp_size > 0 for s in spans), kind
        for s in spans:  # what was not decoded is said, not filled in
            assert s.attributes.get("http2.request.headers_unknown", 0) > 0
            assert (s.status_code is None) == (
                s.attributes.get("deeptrace.http2.grpc_status") == "not decoded"
            )
    # The capture started on the warm channel too: replayed, it gives the server's spans.
    assert sorted(map(span_key, (s for s in replayed_spans(cap) if s.protocol == "http2"))) == sorted(
        map(span_key, got[server.pid]))  # fmt: skip


def http2_spans(recs: list[Record]) -> list:
    return [s for s in SpanPipeline().push(recs) if s.protocol == "http2"]
