"""The other protocols' sample messages (from their own tests) and first-bytes checks, to show
that a new protocol's detection claims none of theirs and theirs claim none of its."""

from __future__ import annotations

import struct

import hpack

from deeptrace.protocols import dns, http1, http2, memcached, mysql, postgres, redis


# The same messages as the other protocols' tests use (copied here: importing those test
# modules would tie this one to their state).
def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + struct.pack("!I", stream) + payload


def _mysql(seq: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "little") + bytes([seq]) + payload


def _pg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def _dns_query(ident: int, name: str) -> bytes:
    q = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", 1, 1)


def _dns_answer(ident: int, name: str) -> bytes:
    body = _dns_query(ident, name)[12:] + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\x0a\x01\x02\x03"
    return struct.pack("!HHHHHH", ident, 0x8180, 1, 1, 0, 0) + body


def samples() -> list[bytes]:
    enc = hpack.Encoder()
    headers = _frame(1, 0x5, 1, enc.encode([(":method", "POST"), (":path", "/demo.Users/Get"), (":scheme", "http")]))
    greeting = _mysql(0, b"\x0a" + b"10.11.6-MariaDB\0" + bytes(4) + bytes(8) + b"\0\xff\xff\x21" + bytes(15))
    ready = _pg(b"Z", b"I")
    return [
        b"GET /users/42?x=1 HTTP/1.1\r\nHost: shop\r\nAuthorization: Bearer s3cret\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"id\": 42, 1}",
        b"POST /orders HTTP/1.1\r\nHost: shop\r\nContent-Length: 11\r\n\r\n{\"sku\": 99}",
        b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        http2.PREFACE + _frame(4, 0, 0, b"") + headers, _frame(4, 0, 0, b""), headers,
        b"set user:42 0 60 5\r\nalice\r\n", b"VALUE user:42 0 5\r\nalice\r\nEND\r\n", b"get k\r\n",
        b"\x80\x00\x00\x01" + bytes(8) + b"\x00\x00\x00\x01" + bytes(12) + b"k",
        b"\x81\x00\x00\x00" + bytes(20),
        greeting, _mysql(0, b"\x03select 1"), _mysql(1, b"\x00\x01\x00\x02\x00\x00\x00"),
        _mysql(1, b"\xff\x7a\x04#42S02Table 'shop.nope' doesn't exist"),
        struct.pack("!ii", 8 + 22, 196608) + b"user\0alice\0database\0x\0\0", struct.pack("!ii", 8, 80877103),
        ready, _pg(b"R", struct.pack("!i", 0)) + ready, _pg(b"Q", b"select 1\0"),
        _pg(b"E", b"SERROR\0C42P01\0Mrelation \"nope\" does not exist\0\0") + ready,
        b"*3\r\n$3\r\nSET\r\n$7\r\nuser:42\r\n$5\r\nalice\r\n", b"PING\r\n", b"+OK\r\n", b"$5\r\nalice\r\n",
        b"-WRONGTYPE Operation against a key\r\n", b":12\r\n", b"*2\r\n$1\r\na\r\n*1\r\n:1\r\n", b"%1\r\n+k\r\n#t\r\n",
        _dns_query(7, "example.com"), _dns_answer(7, "example.com"),
        len(_dns_query(9, "a.b")).to_bytes(2, "big") + _dns_query(9, "a.b"),
    ]  # fmt: skip


DETECTORS = {
    "http1 request": http1.starts_request, "http1 response": http1.starts_response,
    "http2 request": http2.starts_request, "http2 response": http2.starts_response,
    "memcached request": memcached.starts_request, "memcached response": memcached.starts_response,
    "postgres request": postgres.starts_request, "mysql request": mysql.starts_request,
    "mysql response": mysql.starts_response, "redis request": redis.starts_request,
    "dns": lambda data: dns.looks_like(data) is not None,
}  # fmt: skip


def claims(messages: list[bytes]) -> set[tuple[int, str]]:
    """(index of a message, detector) for every other protocol's check that takes it."""
    return {(i, name) for i, data in enumerate(messages) for name, check in DETECTORS.items() if check(data)}
