"""A request the kernel holds whose response is late: a timeout span, as the records path
makes one, and no second span when the response comes after all (tests/twins.py harness)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
from servers import free_port
from twins import Twin, assembling_collector, assert_same_spans

TIMEOUT_NS = 1_000_000_000
LATE_S = 3.0

SERVER = """
import socket, sys, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1]))); srv.listen(); print("listening", flush=True)
sys.stdin.readline()  # traced by now: its accept is seen, its connection assembled
c, _ = srv.accept()
c.recv(65536)
c.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")  # the first, in time
c.recv(65536)
time.sleep(float(sys.argv[2]))  # the second: late
c.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 4\\r\\n\\r\\nlate")
c.recv(65536)
c.close()
"""

CLIENT = """
import socket, sys
sys.stdin.readline()
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
for path in (b"/fast", b"/slow"):
    s.sendall(b"GET " + path + b" HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
    got = b""
    while not got.endswith((b"ok", b"late")):
        got += s.recv(65536)
s.close()
"""


@pytest.fixture(scope="module")
def assembling():
    c = assembling_collector(("http1",))
    yield c
    c.close()


def test_a_late_response_gives_a_timeout_span_on_both_paths_and_no_other(collector, store, assembling):
    twin = Twin(collector, store, assembling)
    twin.p_plain.timeout_ns = twin.p_asm.timeout_ns = TIMEOUT_NS
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SERVER), str(port), str(LATE_S)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert server.stdout.readline() == "listening\n"
    client = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CLIENT), str(port)], stdin=subprocess.PIPE,
                              text=True)  # fmt: skip
    twin.trace(server.pid)
    twin.trace(client.pid)
    for p in (server, client):
        p.stdin.write("go\n")
        p.stdin.flush()
    swept = 0
    while client.poll() is None:  # what the agent's tick does, every pump here
        twin.pump()
        twin.plain_spans += twin.p_plain.flush(time.time_ns())
        twin.record_spans += twin.p_asm.flush(time.time_ns())
        events, ends = assembling.waiting_exchanges(time.monotonic_ns() - TIMEOUT_NS)
        swept += len(events)
        twin.exchange_spans += twin.p_asm.expire_exchanges(events, ends, assembling.wall_offset_ns)
    server.wait(10)
    twin.close()
    assert_same_spans(twin)
    got = sorted((s.kind, s.name, s.status, s.status_code) for s in twin.exchange_spans)
    assert got == [("CLIENT", "GET /fast", "ok", "200"), ("CLIENT", "GET /slow", "error", "timeout"),
                   ("SERVER", "GET /fast", "ok", "200"), ("SERVER", "GET /slow", "error", "timeout")]  # fmt: skip
    assert not twin.record_spans
    assert swept > 2  # found again by later sweeps, reported once
    assert twin.p_asm.stats.orphan_responses == 2  # the late exchange, from both ends: no span
