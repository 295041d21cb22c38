#!/usr/bin/env python3
"""A process for the tests to trace. It sets up its sockets, prints `ready {...}`,
waits for a line on stdin (the test traces its pid meanwhile), performs exactly
the syscalls asked for, prints `done {...}` and exits.

Standalone on purpose (no deeptrace import): what it does is all the tracer sees.

    tracee.py io SYSCALL FAMILY TRANSPORT SIZE   one message via SYSCALL on the side under test
    tracee.py seq FAMILY SIZE                    one TCP write and one read of the same bytes
    tracee.py files                              file and pipe I/O only
    tracee.py fork FAMILY                        a forked child does TCP I/O
    tracee.py burst PORT COUNT SIZE              COUNT writes to 127.0.0.1:PORT
    tracee.py mmsg-many FAMILY COUNT             one sendmmsg of COUNT UDP messages
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import json
import os
import select
import socket
import sys
import tempfile
import termios
import time

INGRESS = {"read", "readv", "recvfrom", "recvmsg", "recvmmsg"}
EGRESS = {"write", "writev", "sendto", "sendmsg", "sendmmsg"}


def ready(info: dict | None = None) -> None:
    print("ready " + json.dumps(info or {}), flush=True)
    sys.stdin.readline()


def done(info: dict) -> None:
    print("done " + json.dumps(info), flush=True)


def payload(tag: str, size: int) -> bytes:
    head = f"deeptrace-{tag}-".encode()
    body = bytes((i * 7 + 13) % 251 for i in range(max(0, size - len(head))))
    return (head + body)[:size]


def loopback(family: str) -> tuple[int, str]:
    return (socket.AF_INET, "127.0.0.1") if family == "ipv4" else (socket.AF_INET6, "::1")


def addr(sock: socket.socket) -> list:
    a = sock.getsockname()
    return [a[0], a[1]]


def tcp_pair(family: str) -> tuple[socket.socket, socket.socket]:
    af, host = loopback(family)
    with socket.socket(af, socket.SOCK_STREAM) as lst:
        lst.bind((host, 0))
        lst.listen()
        cli = socket.socket(af, socket.SOCK_STREAM)
        cli.connect(lst.getsockname()[:2])
        srv, _ = lst.accept()
    return cli, srv


def udp_pair(family: str, connected: bool) -> tuple[socket.socket, socket.socket]:
    af, host = loopback(family)
    a = socket.socket(af, socket.SOCK_DGRAM)
    b = socket.socket(af, socket.SOCK_DGRAM)
    a.bind((host, 0))
    b.bind((host, 0))
    if connected:
        a.connect(b.getsockname()[:2])
        b.connect(a.getsockname()[:2])
    return a, b


def wait_readable(sock: socket.socket, nbytes: int, stream: bool) -> None:
    """Block until the whole message is queued, so one receive call takes it all."""
    select.select([sock], [], [], 5)
    if stream:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            queued = array.array("i", [0])
            fcntl.ioctl(sock.fileno(), termios.FIONREAD, queued)  # not a traced syscall, unlike MSG_PEEK
            if queued[0] >= nbytes:
                return
            time.sleep(0.005)


# ---- sendmmsg / recvmmsg: no Python wrapper, so through libc ----

class IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(IOVec)), ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]  # fmt: skip


class MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", MsgHdr), ("msg_len", ctypes.c_uint)]


_libc = ctypes.CDLL(None, use_errno=True)


def _sockaddr(family: str, peer) -> ctypes.Array | None:
    if peer is None:
        return None
    af, _ = loopback(family)
    # Build the raw sockaddr the way the kernel expects it.
    if af == socket.AF_INET:
        raw = (socket.AF_INET).to_bytes(2, "little") + peer[1].to_bytes(2, "big")
        raw += socket.inet_pton(af, peer[0]) + bytes(8)
    else:
        raw = (socket.AF_INET6).to_bytes(2, "little") + peer[1].to_bytes(2, "big") + bytes(4)
        raw += socket.inet_pton(af, peer[0]) + bytes(4)
    return ctypes.create_string_buffer(raw, len(raw))


def _mmsg_vec(bufs: list[list], name) -> ctypes.Array:
    vec = (MMsgHdr * len(bufs))()
    keep = []
    for i, parts in enumerate(bufs):
        iovs = (IOVec * len(parts))()
        for j, p in enumerate(parts):
            iovs[j].iov_base = ctypes.cast(p, ctypes.c_void_p)
            iovs[j].iov_len = len(p)
        keep.append(iovs)
        vec[i].msg_hdr.msg_iov = iovs
        vec[i].msg_hdr.msg_iovlen = len(parts)
        if name is not None:
            vec[i].msg_hdr.msg_name = ctypes.cast(name, ctypes.c_void_p)
            vec[i].msg_hdr.msg_namelen = len(name)
    vec._keep = keep  # keep buffers alive
    return vec


def sendmmsg(sock: socket.socket, messages: list[bytes], family: str, peer=None) -> int:
    name = _sockaddr(family, peer)
    bufs = []
    for m in messages:  # two iovecs per message: gathering is part of the test
        half = len(m) // 2
        bufs.append([ctypes.create_string_buffer(m[:half], half), ctypes.create_string_buffer(m[half:], len(m) - half)])
    vec = _mmsg_vec(bufs, name)
    n = _libc.sendmmsg(sock.fileno(), vec, len(messages), 0)
    if n < 0:
        raise OSError(ctypes.get_errno(), "sendmmsg")
    return n


def recvmmsg(sock: socket.socket, sizes: list[int]) -> list[bytes]:
    bufs = [[ctypes.create_string_buffer(s)] for s in sizes]
    vec = _mmsg_vec(bufs, None)
    names = [ctypes.create_string_buffer(128) for _ in sizes]  # the kernel fills in each sender
    for i, name in enumerate(names):
        vec[i].msg_hdr.msg_name = ctypes.cast(name, ctypes.c_void_p)
        vec[i].msg_hdr.msg_namelen = len(name)
    n = _libc.recvmmsg(sock.fileno(), vec, len(sizes), socket.MSG_DONTWAIT, None)
    if n < 0:
        raise OSError(ctypes.get_errno(), "recvmmsg")
    return [bufs[i][0].raw[: vec[i].msg_len] for i in range(n)]


# ---- the side under test ----

def send_with(syscall: str, sock: socket.socket, data: bytes, family: str, peer) -> list[bytes]:
    """Send data with exactly `syscall`; returns the messages as sent."""
    half = len(data) // 2
    if syscall == "write":
        os.write(sock.fileno(), data)
    elif syscall == "writev":
        os.writev(sock.fileno(), [data[:half], data[half:]])
    elif syscall == "sendto":
        sock.sendto(data, peer) if peer else sock.send(data)
    elif syscall == "sendmsg":
        sock.sendmsg([data[:half], data[half:]], [], 0, *([peer] if peer else []))
    elif syscall == "sendmmsg":
        msgs = [data[:half], data[half:]]
        assert sendmmsg(sock, msgs, family, peer) == 2
        return msgs
    else:
        raise ValueError(syscall)
    return [data]


def recv_with(syscall: str, sock: socket.socket, sizes: list[int]) -> list[bytes]:
    total = sum(sizes)
    if syscall == "read":
        return [os.read(sock.fileno(), total)]
    if syscall == "readv":
        a, b = bytearray(total // 2), bytearray(total - total // 2)
        n = os.readv(sock.fileno(), [a, b])
        return [(bytes(a) + bytes(b))[:n]]
    if syscall == "recvfrom":
        return [sock.recvfrom(total)[0]]
    if syscall == "recvmsg":
        return [sock.recvmsg(total)[0]]
    if syscall == "recvmmsg":
        return recvmmsg(sock, sizes)
    raise ValueError(syscall)


def scenario_io(syscall: str, family: str, transport: str, size: int) -> None:
    """One message from a sender to a receiver; SYSCALL is used on its side, the other
    side uses plain write (or sendto) / read (or recvfrom)."""
    data = payload(syscall, size)
    stream = transport == "tcp"
    if stream:
        sender, receiver = tcp_pair(family)
    else:
        sender, receiver = udp_pair(family, connected=transport == "udp")
    peer = None if transport != "udp-unconnected" else receiver.getsockname()[:2]
    ready()
    if syscall in EGRESS:
        sent = send_with(syscall, sender, data, family, peer)
        wait_readable(receiver, len(data), stream)
        plain = "read" if stream or transport == "udp" else "recvfrom"
        got = [recv_with(plain, receiver, [len(m)])[0] for m in ([data] if stream else sent)]
    else:
        if syscall == "recvmmsg":
            sent = [data[: size // 2], data[size // 2 :]]
        else:
            sent = [data]
        for m in sent:
            if peer:
                sender.sendto(m, peer)
            else:
                os.write(sender.fileno(), m)
        wait_readable(receiver, len(data), stream)
        got = recv_with(syscall, receiver, [len(m) for m in sent])
    assert b"".join(got) == data, (got, data)
    done({
        "sender": addr(sender), "receiver": addr(receiver),
        "messages": [m.hex() for m in sent], "pid": os.getpid(),
    })  # fmt: skip


def scenario_seq(family: str, size: int) -> None:
    """Connection made while traced, so connect/accept give the roles."""
    data = payload("seq", size)
    ready()
    cli, srv = tcp_pair(family)
    os.write(cli.fileno(), data)
    wait_readable(srv, size, stream=True)
    got = os.read(srv.fileno(), size)
    assert got == data
    done({"client": addr(cli), "server": addr(srv)})


def scenario_files() -> None:
    with tempfile.TemporaryDirectory() as d:
        r, w = os.pipe()
        ready()
        path = os.path.join(d, "f")
        with open(path, "wb", buffering=0) as f:
            f.write(b"file bytes that are not network traffic")
        with open(path, "rb", buffering=0) as f:
            f.read()
        os.write(w, b"pipe bytes")
        os.read(r, 100)
        os.writev(w, [b"pipe ", b"vector"])
        os.readv(r, [bytearray(100)])
    done({})


def scenario_fork(family: str) -> None:
    ready()
    child = os.fork()
    if child == 0:
        cli, srv = tcp_pair(family)
        os.write(cli.fileno(), payload("child", 64))
        os.read(srv.fileno(), 64)
        os._exit(0)
    os.waitpid(child, 0)
    done({"child": child})


def scenario_burst(port: int, count: int, size: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port))  # before tracing: only writes + close are seen
    data = payload("burst", size)
    ready()
    fd = sock.fileno()
    for _ in range(count):
        os.write(fd, data)
    sock.close()
    done({"writes": count})


def scenario_mmsg_many(family: str, count: int) -> None:
    a, _receiver = udp_pair(family, connected=True)
    msgs = [payload(f"m{i}", 40) for i in range(count)]
    ready()
    assert sendmmsg(a, msgs, family) == count
    done({"messages": count})


def main(argv: list[str]) -> None:
    name, args = argv[0], argv[1:]
    if name == "io":
        scenario_io(args[0], args[1], args[2], int(args[3]))
    elif name == "seq":
        scenario_seq(args[0], int(args[1]))
    elif name == "files":
        scenario_files()
    elif name == "fork":
        scenario_fork(args[0])
    elif name == "burst":
        scenario_burst(int(args[0]), int(args[1]), int(args[2]))
    elif name == "mmsg-many":
        scenario_mmsg_many(args[0], int(args[1]))
    else:
        raise SystemExit(f"unknown scenario {name}")


if __name__ == "__main__":
    main(sys.argv[1:])
