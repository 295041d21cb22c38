"""HTTP/1 framing and fields on hand-built messages: every split, pipelining,
truncation, bodies of every kind; and arbitrary bytes never raise."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from parsing import chunk, exchange, feed_split

from deeptrace.protocols.http1 import Http1Connection, starts_request, template_path
from deeptrace.protocols.redaction import http_head

REQ = (b"GET /users/42/orders/7f3e2a1c-1d2e-4f5a-9b8c-0123456789ab?x=1 HTTP/1.1\r\nHost: shop\r\n"
       b"User-Agent: curl/8\r\nX-Request-ID: abc-1\r\nAuthorization: Bearer s3cret\r\n\r\n")  # fmt: skip
RESP = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"id\": 42, 1}"
POST = b"POST /orders HTTP/1.1\r\nHost: shop\r\nContent-Length: 11\r\n\r\n{\"sku\": 99}"
CHUNKED = (b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n")  # fmt: skip


def test_request_fields_name_and_redaction():
    (req,) = Http1Connection().feed(True, chunk(REQ))
    assert req.is_request and req.name == "GET /users/{id}/orders/{id}"
    assert req.size == len(REQ)
    assert req.attributes["url.path"] == "/users/42/orders/7f3e2a1c-1d2e-4f5a-9b8c-0123456789ab"
    assert req.attributes["url.query"] == "x=1"
    assert req.attributes["http.request.header.x-request-id"] == "abc-1"
    assert req.attributes["http.request.header.host"] == "shop"
    assert b"s3cret" not in http_head(req.head) and b"Authorization: [REDACTED]" in http_head(req.head)


@pytest.mark.parametrize("cut", range(1, len(REQ)))
def test_request_split_at_every_byte(cut):
    msgs = feed_split(Http1Connection(), True, REQ, cut)
    assert [(m.name, m.size, m.start_ns, m.end_ns) for m in msgs] == [("GET /users/{id}/orders/{id}", len(REQ), 0, 2)]


@pytest.mark.parametrize("cut", range(1, len(CHUNKED)))
def test_chunked_response_split_at_every_byte(cut):
    conn = Http1Connection()
    conn.feed(True, chunk(b"GET /x HTTP/1.1\r\n\r\n"))
    msgs = feed_split(conn, False, CHUNKED, cut, t=5)
    assert [(m.status_code, m.error, m.size) for m in msgs] == [("404", True, len(CHUNKED))]


def test_pipelined_requests_and_responses_in_one_syscall():
    conn = Http1Connection()
    reqs = conn.feed(True, chunk(REQ + POST + REQ))
    resps = conn.feed(False, chunk(RESP + RESP.replace(b"200 OK", b"201 Created") + RESP, t=9))
    assert [m.name for m in reqs] == ["GET /users/{id}/orders/{id}", "POST /orders", "GET /users/{id}/orders/{id}"]
    assert [m.status_code for m in resps] == ["200", "201", "200"]
    assert [m.size for m in reqs] == [len(REQ), len(POST), len(REQ)]


def test_truncated_body_is_skipped_by_content_length():
    conn = Http1Connection()
    conn.feed(True, chunk(b"GET /big HTTP/1.1\r\n\r\n"))
    body = b"x" * 5000
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + body
    # 1024 bytes captured of the first write, 2000 of a second, the rest in a third.
    first, second = resp[:3000], resp[3000:]
    assert conn.feed(False, chunk(first[:1024], t=1, size=len(first))) == []
    (msg,) = conn.feed(False, chunk(second[:100], t=2, size=len(second)))
    # Its length was known and every byte counted: whole, though not all captured.
    assert msg.size == len(resp) and not msg.partial and msg.end_ns == 3 and msg.start_ns == 1
    # Still in step: the next exchange parses.
    assert [m.status_code for m in exchange(conn, REQ, RESP, t=20)[1:]] == ["200"]


def test_head_and_204_and_1xx_have_no_body():
    conn = Http1Connection()
    conn.feed(True, chunk(b"HEAD /a HTTP/1.1\r\n\r\nPOST /b HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi"))
    resps = conn.feed(False, chunk(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"
                                   b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", t=3))  # fmt: skip
    assert [m.status_code for m in resps] == ["200", "204"]


def test_response_until_close():
    conn = Http1Connection()
    conn.feed(True, chunk(b"GET / HTTP/1.0\r\n\r\n"))
    assert conn.feed(False, chunk(b"HTTP/1.0 200 OK\r\n\r\nsome body", t=2)) == []
    assert conn.feed(False, chunk(b" more", t=3)) == []
    (msg,) = conn.close(end_ns=9)
    assert msg.size == len(b"HTTP/1.0 200 OK\r\n\r\nsome body more") and msg.end_ns == 9


def test_connect_tunnel_stops_parsing():
    conn = Http1Connection()
    conn.feed(True, chunk(b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n"))
    (resp,) = conn.feed(False, chunk(b"HTTP/1.1 200 Connection established\r\n\r\n", t=1))
    assert resp.status_code == "200" and conn.upgraded
    assert conn.feed(True, chunk(b"GET / HTTP/1.1\r\n\r\n", t=2)) == []


def test_header_cut_short_by_the_capture_still_makes_its_request_then_in_step():
    """A header block longer than the capture (a long query string, many headers) gave no span."""
    conn = Http1Connection()
    huge = b"GET /a?" + b"q=1&" * 300 + b" HTTP/1.1\r\nHost: shop\r\nCookie: " + b"c" * 3000 + b"\r\n\r\n"
    (cut,) = conn.feed(True, chunk(huge[:1300], size=len(huge)))
    assert (cut.name, cut.partial, cut.size) == ("GET /a", True, len(huge))
    assert cut.attributes["http.request.header.host"] == "shop" and cut.attributes["url.query"].startswith("q=1&q=1")
    (req,) = conn.feed(True, chunk(POST, t=5))
    assert req.name == "POST /orders"


def test_request_line_longer_than_the_capture():
    target = b"/search?" + b"term=abc&" * 200
    post = b"POST " + target + b" HTTP/1.1\r\nHost: shop\r\nContent-Length: 2\r\n\r\n{}"
    conn = Http1Connection()
    (req,) = conn.feed(True, chunk(post[:1024], size=len(post)))
    assert (req.name, req.partial, req.attributes["url.path"]) == ("POST /search", True, "/search")
    assert "network.protocol.version" not in req.attributes
    (resp,) = conn.feed(False, chunk(RESP, t=3))
    assert resp.status_code == "200"


@pytest.mark.parametrize("cut", [20, 100, 700, 1409])
def test_request_whose_last_fragment_was_never_captured_is_ended_by_its_response(cut):
    """A POST with a long query string whose headers end in a TCP fragment the capture lacks:
    the response says the request was whole."""
    post = (b"POST /bff/v1/check?channel=web&terminalType=bff&" + b"k=v&" * 100 + b" HTTP/1.1\r\nhost: api\r\n"
            + b"x-filler: " + b"f" * 1200 + b"\r\ncontent-length: 2\r\n\r\n{}")  # fmt: skip
    conn = Http1Connection()
    assert conn.feed(True, chunk(post[:cut], t=1)) == []  # the rest never arrives
    req, resp = conn.feed(False, chunk(RESP, t=2))
    assert (req.is_request, req.partial, req.size, resp.status_code) == (True, True, cut, "200")
    assert req.name == "POST /bff/v1/check"
    (again,) = conn.feed(True, chunk(POST, t=3))  # back in step with the next request
    assert again.name == "POST /orders"


@pytest.mark.parametrize("cut", range(1, len(REQ), 9))
def test_fragments_in_three_parts_at_arbitrary_points(cut):
    second = min(len(REQ) - 1, cut + 37)
    conn = Http1Connection()
    parts = [REQ[:cut], REQ[cut:second], REQ[second:]]
    msgs = [m for i, p in enumerate(parts) if p for m in conn.feed(True, chunk(p, t=i))]
    assert [(m.name, m.size, m.partial) for m in msgs] == [("GET /users/{id}/orders/{id}", len(REQ), False)]


def test_response_header_cut_at_the_end_of_the_capture():
    """An Istio capture whose response's later fragments are missing: the status line is there."""
    conn = Http1Connection()
    conn.feed(True, chunk(b"GET /productpage HTTP/1.1\r\nhost: productpage:9080\r\n\r\n"))
    assert conn.feed(False, chunk(b"HTTP/1.0 200 OK\r\n", t=2)) == []
    (resp,) = conn.close(end_ns=9)
    assert (resp.status_code, resp.partial, resp.size) == ("200", True, 17)


def test_chunked_body_cut_by_a_hole_is_reported_partial():
    conn = Http1Connection()
    conn.feed(True, chunk(b"GET /stream HTTP/1.1\r\n\r\n"))
    resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n" + b"y" * 4096 + b"\r\n0\r\n\r\n"
    (msg,) = conn.feed(False, chunk(resp[:1024], t=4, size=len(resp)))
    assert msg.status_code == "200" and msg.partial


@pytest.mark.parametrize("path,name", [("/", "/"), ("/a/123/b", "/a/{id}/b"), ("/v1/deadbeefdeadbeef", "/v1/{id}"),
                                       ("/users/alice", "/users/alice")])  # fmt: skip
def test_path_templates(path, name):
    assert template_path(path) == name


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=300), max_size=6), st.lists(st.booleans(), max_size=6))
@example(parts=[b"CONNECT !"], sides=[False])  # a request line cut by a hole on the response side
def test_arbitrary_bytes_never_raise(parts, sides):
    conn = Http1Connection()
    for i, part in enumerate(parts):
        conn.feed(sides[i] if i < len(sides) else True, chunk(part, t=i, size=len(part) + (i % 3) * 100))
    conn.close(99)


# ---- found by replaying captures made by others (bench/captures) ----


def test_lone_lf_line_ends():
    """RFC 9112 2.2 lets a recipient take a lone LF for a line end, and senders use it: neither
    the request nor the response (chunked too) was framed, nor the exchange's status known."""
    conn = Http1Connection()
    post = b"POST /up HTTP/1.1\nHost: a\nContent-Length: 3\n\nabc"
    (req,) = conn.feed(True, chunk(post))
    assert (req.name, req.attributes["http.request.header.host"], req.size) == ("POST /up", "a", len(post))
    resp = b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n3\nfin\n0\n\n"
    (msg,) = conn.feed(False, chunk(resp, t=2))
    assert (msg.status_code, msg.size) == ("200", len(resp))
    assert [m.status_code for m in exchange(conn, REQ, RESP, t=5)[1:]] == ["200"]  # still in step


def test_response_cut_by_the_close_keeps_its_status():
    """A response whose body ends before its Content-Length does (the server closed early, or
    a length that lies) was lost: its request ended as "connection closed"."""
    conn = Http1Connection()
    conn.feed(True, chunk(b"GET /big HTTP/1.1\r\n\r\n"))
    assert conn.feed(False, chunk(b"HTTP/1.1 200 OK\r\nContent-Length: 2200000000\r\n\r\n" + b"A" * 100, t=2)) == []
    (resp,) = conn.close(end_ns=9)
    assert (resp.status_code, resp.partial, resp.size, resp.end_ns) == ("200", True, 47 + 100, 3)


@pytest.mark.parametrize("write", [1000, 4096, 10_000, 70_000])
def test_chunked_body_larger_than_the_buffer(write):
    """A chunked body was framed only once all of it was buffered, so one over 64 KiB was
    given up on: its response was lost and the next one answered the wrong request."""
    body = b"".join(b"%x\r\n" % n + b"z" * n + b"\r\n" for n in [4096] * 70 + [100_000, 7]) + b"0\r\n\r\n"
    resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    conn = Http1Connection()
    conn.feed(True, chunk(b"GET /a HTTP/1.1\r\n\r\n"))
    msgs = [m for i in range(0, len(resp), write) for m in conn.feed(False, chunk(resp[i : i + write], t=1 + i))]
    assert [(m.status_code, m.size, m.partial, m.start_ns) for m in msgs] == [("200", len(resp), False, 1)]
    assert msgs[0].end_ns == 2 + (len(resp) - 1) // write * write
    assert [m.status_code for m in exchange(conn, REQ, RESP, t=10**6)[1:]] == ["200"]  # still in step


def test_chunked_body_larger_than_the_buffer_cut_by_a_hole():
    resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + (b"1000\r\n" + b"z" * 4096 + b"\r\n") * 30
    conn = Http1Connection()
    conn.feed(True, chunk(b"GET /a HTTP/1.1\r\n\r\n"))
    assert conn.feed(False, chunk(resp, t=2)) == []
    # The next size line falls in bytes never captured: the response is what was framed of it
    # (up to its last chunk's data), partial; and the next exchange is found again.
    (msg,) = conn.feed(False, chunk(b"", t=3, size=50))
    assert (msg.status_code, msg.partial, msg.size) == ("200", True, len(resp) - 2)
    assert [m.status_code for m in exchange(conn, REQ, RESP, t=5)[1:]] == ["200"]


def test_any_token_is_a_method_and_odd_request_lines_are_requests():
    """Only a fixed list of methods was known, and only "method target version" lines: a
    server's answers to these had no request."""
    lines = {b"CCM_POST / HTTP/1.1": "CCM_POST /", b"VERSION-CONTROL /r/7 HTTP/1.1": "VERSION-CONTROL /r/{id}",
             b"GET HTTP/1.1": "GET", b"CONNECT mail.example:25 / HTTP/1.0": "CONNECT mail.example:25",
             b"GET /x": "GET /x"}  # fmt: skip
    for line, name in lines.items():
        conn = Http1Connection()
        (req,) = conn.feed(True, chunk(line + b"\r\nHost: a\r\n\r\n"))
        assert req.name == name
        (resp,) = conn.feed(False, chunk(b"HTTP/1.1 405 Not Allowed\r\nContent-Length: 0\r\n\r\n", t=2))
        assert resp.status_code == "405"


@pytest.mark.parametrize("data,claimed", [
    (b"CCM_POST / HTTP/1.1\r\n", True), (b"CCM_POST / HTT", False), (b"CCM_POST /x\r\n", False),
    (b"HELO relay.example\r\n", False), (b"get key\r\n", False), (b"set k 0 0 1\r\nx\r\n", False),
    (b"*2\r\n$3\r\nGET\r\n", False), (b"PING\r\n", False), (b"SUB subj 1\r\n", False), (b"DEL k\n", False),
    (b"GET /a HTTP/1.1\r\n", True), (b"GET /a", True), (b"OPTIONS\nHost: a\n\n", False),
])  # fmt: skip
def test_detection_by_content_takes_other_methods_only_with_the_version(data, claimed):
    assert starts_request(data) is claimed


@pytest.mark.parametrize("length", [b"Content-Length: -1", b"Content-Length: 18446744073709551615",
                                    b"Content-Length: 1_0", b"Transfer-Encoding: chunked"])  # fmt: skip
def test_a_length_that_cannot_be_read_ends_the_side_not_the_request(length):
    """A negative or overflowing length (a request smuggling attempt) was read as a length: a
    request ending inside its own header, or never; the bytes after it are no request."""
    body = b"10000000000000000\r\n\r\n" if b"chunked" in length else b""
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n"
    head = b"POST / HTTP/1.1\r\nHost: t\r\n" + length + b"\r\n\r\n"
    conn = Http1Connection()
    (req,) = conn.feed(True, chunk(head + body + smuggled))
    assert (req.name, req.size, req.partial) == ("POST /", len(head), True)
    assert conn.feed(True, chunk(smuggled, t=2)) == []
    (resp,) = conn.feed(False, chunk(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", t=3))
    assert resp.status_code == "400"


@pytest.mark.parametrize("data,name", [
    (b"OPTIONS HTTP/1.1\nHost: a\n\n", "OPTIONS"),  # lone LF: the line end was taken into the target
    (b"GET /a\x01b HTTP/1.1\r\n\r\n", "GET /a%01b"),
])  # fmt: skip
def test_names_hold_no_control_characters(data, name):
    conn = Http1Connection()
    msgs = conn.feed(True, chunk(data)) + conn.feed(False, chunk(b"HTTP/1.1 400 Bad\r\nContent-Length: 0\r\n\r\n", t=2))
    assert [m.name for m in msgs if m.is_request] == [name]


def test_a_request_line_cut_by_the_capture_is_named_up_to_its_line_end():
    conn = Http1Connection()
    (req,) = conn.feed(True, chunk(b"GET /a\nHost: x" + b"y" * 100, size=2000))
    assert req.name == "GET /a"
