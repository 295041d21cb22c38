"""Dubbo protocol messages built from the published specifications (the Dubbo protocol's
16-byte header, Hessian 2.0 serialization), independent of the parser's reader; and a small
provider and consumer speaking them over a real socket for the live test.

    dubbo_wire.py provider                 prints its port, serves until killed
    dubbo_wire.py consumer PORT            waits for a line on stdin, runs CALLS, says "done"
"""

from __future__ import annotations

import socket
import struct
import sys

FLAG_REQUEST, FLAG_TWO_WAY, FLAG_EVENT, HESSIAN2 = 0x80, 0x40, 0x20, 2
SERVICE = "org.apache.dubbo.demo.GreetingService"


# ---- Hessian 2.0: only the values these messages need ----

def h_string(text: str | None) -> bytes:
    """A string: its length counts UTF-16 units, and Java writes each surrogate as 3 bytes."""
    if text is None:
        return b"N"
    units = struct.unpack(f"<{len(text.encode('utf-16-le'))//2}H", text.encode("utf-16-le"))
    out = b""
    while True:
        piece, units = units[:0x8000], units[0x8000:]
        n = len(piece)
        data = b"".join(chr(u).encode("utf-8", "surrogatepass") for u in piece)
        if units:
            out += b"R" + struct.pack("!H", n) + data  # a chunk, more follow
            continue
        if n <= 31:
            return out + bytes([n]) + data
        if n <= 1023:
            return out + bytes([0x30 + (n >> 8), n & 0xFF]) + data
        return out + b"S" + struct.pack("!H", n) + data


def h_int(v: int) -> bytes:
    if -16 <= v <= 47:
        return bytes([0x90 + v])
    return b"I" + struct.pack("!i", v)


def h_map(pairs: dict) -> bytes:
    """An untyped map of strings."""
    return b"H" + b"".join(h_string(k) + h_string(v) for k, v in pairs.items()) + b"Z"


def h_exception(class_name: str, message: str) -> bytes:
    """An object of a class defined in place: 'C', name, field count and names, then the instance."""
    fields = ["detailMessage", "cause"]
    return (b"C" + h_string(class_name) + h_int(len(fields)) + b"".join(map(h_string, fields))
            + b"\x60" + h_string(message) + b"N")  # fmt: skip


# ---- Dubbo messages ----

def header(flags: int, status: int, rid: int, body: bytes) -> bytes:
    return struct.pack("!HBBqi", 0xDABB, flags, status, rid, len(body)) + body


def request(rid: int, method: str, types: str, args: bytes, attachments: dict | None = None, two_way: bool = True,
            service: str = SERVICE, version: str = "1.0.0") -> bytes:  # fmt: skip
    body = h_string("2.0.2") + h_string(service) + h_string(version) + h_string(method) + h_string(types) + args
    body += h_map({"path": service, "interface": service, "version": version, **(attachments or {})})
    return header(FLAG_REQUEST | (FLAG_TWO_WAY if two_way else 0) | HESSIAN2, 0, rid, body)


def response(rid: int, value: bytes | None = None, status: int = 20, error: str | None = None,
             exception: tuple[str, str] | None = None) -> bytes:  # fmt: skip
    if status != 20:
        body = h_string(error)
    elif exception is not None:
        body = h_int(0) + h_exception(*exception)
    elif value is None:
        body = h_int(2)
    else:
        body = h_int(1) + value
    return header(HESSIAN2, status, rid, body)


def heartbeat(rid: int, reply: bool = False) -> bytes:
    flags = (HESSIAN2 | FLAG_EVENT) if reply else (FLAG_REQUEST | FLAG_TWO_WAY | FLAG_EVENT | HESSIAN2)
    return header(flags, 20 if reply else 0, rid, b"N")


# ---- a provider and a consumer over a real socket ----

BIG = "x" * 3000  # an argument larger than the agent captures of one syscall
# (method, argument, two-way): what the provider does with each is in `answer`.
CALLS = [("sayHello", "world", True), ("sayHello", BIG, True), ("fail", "boom", True), ("nosuch", "", True),
         ("notify", "fire and forget", False), ("slow", "a", True), ("sayHello", "b", True)]  # fmt: skip


def answer(rid: int, method: str, arg: str) -> bytes:
    if method == "sayHello":
        return response(rid, h_string(f"hello {arg[:20]}"))
    if method == "fail":
        return response(rid, exception=("java.lang.IllegalStateException", arg))
    if method == "slow":
        return response(rid, h_string("slow done"))
    return response(rid, status=60, error=f"Not found exported service: {SERVICE}:1.0.0:20880 method {method}")


def _read_message(sock: socket.socket) -> bytes | None:
    head = _read_exact(sock, 16)
    if head is None:
        return None
    return head + (_read_exact(sock, struct.unpack_from("!i", head, 12)[0]) or b"")


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        got = sock.recv(n - len(data))
        if not got:
            return None
        data += got
    return data


def _parse_call(msg: bytes) -> tuple[int, int, str, str]:
    """(flags, request id, method, first argument) of a request this module built."""
    flags, rid = msg[2], struct.unpack_from("!q", msg, 4)[0]
    if flags & FLAG_EVENT:
        return flags, rid, "", ""
    pos, values = 16, []
    for _ in range(6):  # five strings, then the first argument (a string too)
        tag = msg[pos]
        n, pos = (tag, pos + 1) if tag <= 31 else (((tag - 0x30) << 8) | msg[pos + 1], pos + 2) if tag < 0x40 \
            else (struct.unpack_from("!H", msg, pos + 1)[0], pos + 3)  # fmt: skip
        values.append(msg[pos : pos + n].decode())  # ASCII in these calls
        pos += n
    return flags, rid, values[3], values[5]


def provider() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    while True:
        conn, _ = listener.accept()
        held = []  # "slow" answers after the call that follows it: replies out of order
        while (msg := _read_message(conn)) is not None:
            flags, rid, method, arg = _parse_call(msg)
            if flags & FLAG_EVENT:
                conn.sendall(heartbeat(rid, reply=True))
                continue
            if not flags & FLAG_TWO_WAY:
                continue
            if method == "slow":
                held.append(answer(rid, method, arg))
                continue
            conn.sendall(answer(rid, method, arg))
            while held:
                conn.sendall(held.pop())
        conn.close()


def connect(port: int) -> socket.socket:
    """A consumer's connection, its first heartbeat answered."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(heartbeat(1))
    assert _read_message(sock) == heartbeat(1, reply=True)
    return sock


def make_calls(sock: socket.socket, rid: int = 100) -> int:
    """CALLS on the connection, every answer read; returns the last request id used (a benchmark
    repeats them on one connection, and ids must not repeat)."""
    waiting = 0
    for method, arg, two_way in CALLS:
        rid += 1
        sock.sendall(request(rid, method, "Ljava/lang/String;", h_string(arg), {"token": "s3cr3t-token"}, two_way))
        if method == "slow":  # its answer comes after the next call's
            waiting += 1
        elif two_way:
            for _ in range(1 + waiting):
                got = _read_message(sock)
                assert got is not None and got[:2] == b"\xda\xbb", got
            waiting = 0
    return rid


def consumer(port: int) -> None:
    sys.stdin.readline()
    sock = connect(port)
    make_calls(sock)
    print("done", flush=True)
    sys.stdin.readline()
    sock.close()


if __name__ == "__main__":
    provider() if sys.argv[1] == "provider" else consumer(int(sys.argv[2]))
