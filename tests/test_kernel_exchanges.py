"""HTTP/1 exchanges the kernel assembles (CollectorConfig.assemble), against the records path.

Two collectors are loaded at once and trace the same processes, so both see the same
syscalls: the session `collector` (records only, framed in Python as before) and a module
`assembling` collector, whose kernel frames simple HTTP/1 exchanges itself and hands a
connection over to user space, as records, when something is not simple. The rule under
test: the spans are the same either way (names, statuses, sizes, TCP byte ranges,
attributes, heads), whatever the traffic; only the times differ, by the order the two
collectors' hooks run in.

Processes are traced by pid only (clients start stopped until both collectors trace them),
never by name, so that the kernel counters of the assembling collector count this module's
traffic and nothing else on the machine.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import require_bpf
from servers import free_port, need, nginx, serving

from deeptrace.agent.collector import Collector, CollectorConfig
from deeptrace.agent.selection import Selection
from deeptrace.capture.pipeline import SpanPipeline
from deeptrace.capture.records import FLAG_ASSEMBLED, FLAG_HANDED_OVER
from deeptrace.capture.spans import json_lines

HEAD = 256  # CollectorConfig.exchange_head, and the records path's framing.HEAD_BYTES
TIME_SLACK_NS = 5_000_000  # two collectors' hooks on the same syscall: a few us apart, ms under load


@pytest.fixture(scope="module")
def assembling():
    require_bpf()
    c = Collector(CollectorConfig(selection=Selection(), capture_bytes=1024, assemble=("http1",),
                                  exchange_head=HEAD)).start()  # fmt: skip
    yield c
    c.close()


class Twin:
    """The same processes traced by the records path and by the assembling collector."""

    def __init__(self, collector, store, assembling):
        self.plain, self.store, self.asm = collector, store, assembling
        self.asm_records: dict[int, list] = defaultdict(list)
        self.asm_events: list[np.ndarray] = []
        self.tgids: set[int] = set()
        # Records of an earlier process with a pid used again are not this test's.
        self.t0 = time.time_ns()
        # What earlier tests left in the rings is theirs.
        while self.asm.poll(timeout_s=0) or len(self.asm.poll_exchanges()):
            pass
        self.before = self.asm.counters()

    def trace(self, pid: int) -> set[int]:
        added = self.plain.trace(pid) | self.asm.trace(pid)
        self.tgids |= added
        return added

    def start(self, argv: list[str], **popen) -> subprocess.Popen:
        """A client, traced by both from its first instruction: it waits for a line first."""
        proc = subprocess.Popen(
            ["sh", "-c", 'read _ && exec "$@"', "sh", *argv], stdin=subprocess.PIPE, **popen
        )
        self.trace(proc.pid)
        proc.stdin.write(b"\n")
        proc.stdin.flush()
        return proc

    def run(self, argv: list[str], timeout_s: float = 30) -> str:
        proc = self.start(argv, stdout=subprocess.PIPE)
        out, _ = proc.communicate(timeout=timeout_s)
        assert proc.returncode == 0, (argv, out)
        return out.decode(errors="replace")

    def python(self, src: str, *args: str) -> str:
        return self.run([sys.executable, "-c", textwrap.dedent(src), *map(str, args)])

    def pump(self, timeout_s: float = 0.01) -> None:
        self.store.pump(timeout_s)
        for rec in self.asm.poll(timeout_s=timeout_s):
            self.asm_records[rec.tgid].append(rec)
        events = self.asm.poll_exchanges()
        if len(events):
            self.asm_events.append(events)

    def closes(self, tgids=None) -> tuple[int, int]:
        """Close records of these processes each collector delivered so far."""
        tgids = self.tgids if tgids is None else tgids
        plain = sum(r.syscall == "close" for r in self.plain_records(tgids))
        asm = sum(r.syscall == "close" for r in self.records(tgids))
        return plain, asm

    def plain_records(self, tgids=None) -> list:
        """What the session collector delivered of these processes since this test began."""
        tgids = self.tgids if tgids is None else tgids
        return [r for t in tgids for r in self.store.by_tgid.get(t, []) if r.enter_ns >= self.t0]

    def settle(self, closes: int = 0, timeout_s: float = 10, quiet_s: float = 0.3) -> None:
        """Until both collectors delivered `closes` close records of the traced processes
        (or timeout_s passed), then quiet_s more for what is still on its way."""
        deadline = time.monotonic() + timeout_s
        while min(self.closes()) < closes and time.monotonic() < deadline:
            self.pump()
        quiet = time.monotonic() + quiet_s
        while time.monotonic() < quiet:
            self.pump()

    def events(self, tgids=None) -> np.ndarray:
        tgids = self.tgids if tgids is None else tgids
        if not self.asm_events:
            return np.zeros(0, dtype=self.asm.exchange_dtype)
        events = np.concatenate(self.asm_events)
        return events[np.isin(events["tgid"], list(tgids))]

    def records(self, tgids=None) -> list:
        tgids = self.tgids if tgids is None else tgids
        return [r for t in tgids for r in self.asm_records.get(t, [])]

    def data_records(self, tgids=None) -> list:
        """Records of socket data the assembling collector delivered (not connect/accept/close,
        nor the byteless marks of a hand-over)."""
        return [r for r in self.records(tgids) if r.direction is not None and not r.flags & FLAG_HANDED_OVER]

    def spans(self, tgids=None) -> tuple[list, list]:
        """(records path spans, assembling collector's spans) of these processes."""
        tgids = self.tgids if tgids is None else tgids
        plain = SpanPipeline()
        plain_spans = plain.push(self.plain_records(tgids))
        plain_spans += plain.close_all(time.time_ns())
        asm = SpanPipeline()
        events = self.events(tgids)
        asm_spans = asm.push_exchanges(events, self.asm.wall_offset_ns)
        assert_json_path_agrees(events, self.asm.wall_offset_ns)
        asm_spans += asm.push(self.records(tgids))
        asm_spans += asm.close_all(time.time_ns())
        self.asm_pipeline = asm
        return plain_spans, asm_spans

    def counters(self) -> dict[str, int]:
        """What the assembling collector's kernel counted since this test began."""
        now = self.asm.counters()
        return {k: now[k] - self.before.get(k, 0) for k in now}


def assert_json_path_agrees(events: np.ndarray, wall_offset_ns: int) -> None:
    """The agent writes exchanges through push_exchanges_json, not Span objects: the same
    JSON lines but for the ids."""

    def lines(text: str) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k not in ("trace_id", "span_id")}
                for line in text.splitlines()]  # fmt: skip

    fast = json_lines(SpanPipeline().push_exchanges_json(events, wall_offset_ns))
    slow = json_lines([s.to_json() for s in SpanPipeline().push_exchanges(events, wall_offset_ns)])
    assert lines(fast) == lines(slow)


@pytest.fixture
def twin(collector, store, assembling):
    return Twin(collector, store, assembling)


KEY_FIELDS = ("kind", "name", "status", "status_code", "req_size", "resp_size", "req_seq", "resp_seq", "attributes",
              "req_head", "resp_head", "pid", "laddr", "lport", "raddr", "rport", "tid", "resp_tid")  # fmt: skip


def span_key(s) -> tuple:
    """What the assembled span must share with the records path's span."""
    e = s.endpoint
    return (s.kind, s.name, s.status, s.status_code, s.req_size, s.resp_size, s.req_seq, s.resp_seq,
            tuple(sorted(s.attributes.items())), s.req_head, s.resp_head, e.pid, e.laddr, e.lport, e.raddr, e.rport,
            s.tid, s.resp_tid)  # fmt: skip


def _short(value) -> str:
    text = repr(value)
    return text if len(text) < 400 else text[:200] + " ... " + text[-150:]


def _differences(a: tuple, b: tuple) -> dict:
    return {f: f"{_short(x)} (records: {_short(y)})" for f, x, y in zip(KEY_FIELDS, a, b) if x != y}


CAPTURE = 1024  # capture_bytes of both collectors


def without_truncation_mark(spans: list) -> list:
    """The records path marks a message longer than the capture `deeptrace.partial` (its body
    was not captured, though it was framed exactly); an exchange never is. That divergence is
    test_a_message_longer_than_the_capture_is_partial_either_way's; tests of other things
    compare spans without it (spans whose sizes say the capture cut them, nothing else)."""
    for s in spans:
        if max(s.req_size, s.resp_size) > CAPTURE and s.attributes.get("deeptrace.partial") is True:
            s.attributes = {k: v for k, v in s.attributes.items() if k != "deeptrace.partial"}
    return spans


def assert_same_spans(plain: list, asm: list) -> None:
    """The same spans, field for field (KEY_FIELDS); start and end within TIME_SLACK_NS."""
    key = span_key
    plain = sorted(plain, key=lambda s: (key(s), s.start_ns))
    asm = sorted(asm, key=lambda s: (key(s), s.start_ns))
    pk, ak = [key(s) for s in plain], [key(s) for s in asm]
    if pk != ak:
        only_plain, only_asm = (
            list((Counter(pk) - Counter(ak)).elements()),
            list((Counter(ak) - Counter(pk)).elements()),
        )
        # Each assembled span that has no equal, next to the records path's span most like it.
        lines = [f"{len(asm)} assembled spans, {len(plain)} from records"]
        for a in only_asm:
            near = min(only_plain, key=lambda p: len(_differences(a, p)), default=None)
            lines.append(
                f"assembled {a[:2]} differs: {_differences(a, near) if near else 'no records span left'}"
            )
        for p in only_plain:
            lines.append(
                f"records span with no assembled equal: { {f: _short(v) for f, v in zip(KEY_FIELDS, p)} }"
            )
        pytest.fail("\n".join(lines), pytrace=False)
    for p, a in zip(plain, asm):
        assert abs(p.start_ns - a.start_ns) < TIME_SLACK_NS and abs(p.end_ns - a.end_ns) < TIME_SLACK_NS, (
            p,
            a,
        )


def in_wire_order(spans) -> list:
    """Connection by connection (the first to start first), each in the order of its requests'
    TCP sequence numbers (requests pipelined in one call share a start time)."""
    by_conn: dict[tuple, list] = defaultdict(list)
    for s in spans:
        by_conn[(s.endpoint.pid, s.endpoint.lport, s.endpoint.rport)].append(s)
    out = []
    for conn in sorted(by_conn.values(), key=lambda ss: min(s.start_ns for s in ss)):
        base = min(conn, key=lambda s: s.start_ns).req_seq[0]
        out += sorted(conn, key=lambda s: (s.req_seq[0] - base) % 2**32)
    return out


def assert_joined(spans) -> None:
    """Each client span has its server span with the same TCP byte ranges."""
    client = sorted((s.req_seq, s.resp_seq, s.name) for s in spans if s.kind == "CLIENT")
    server = sorted((s.req_seq, s.resp_seq, s.name) for s in spans if s.kind == "SERVER")
    assert client == server and all(seq is not None for c in client for seq in c[:2])


# ---- 1. curl and nginx: every exchange assembled in the kernel ----


def test_curl_and_nginx_keep_alive_post_head_404_all_assembled(twin, tmp_path):
    with nginx(tmp_path) as (master, port):
        workers = twin.trace(master)
        base = f"http://127.0.0.1:{port}"
        curl = need("curl")
        twin.run([curl, "-s", f"{base}/hello", f"{base}/hello?id=3", f"{base}/missing/42",
                  "-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null"])  # fmt: skip
        twin.run([curl, "-s", "-o", "/dev/null", "-d", "name=deeptrace&n=1", f"{base}/hello"])
        twin.run([curl, "-s", "-o", "/dev/null", "-I", f"{base}/hello"])
        twin.settle(closes=6)
        plain, asm = twin.spans()
        counted = twin.counters()
        data = twin.data_records()
    assert_same_spans(plain, asm)
    expected = [("GET /hello", "200"), ("GET /hello", "200"), ("GET /missing/{id}", "404"), ("POST /hello", "200"),
                ("HEAD /hello", "200")]  # fmt: skip
    for kind in ("SERVER", "CLIENT"):
        assert sorted((s.name, s.status_code) for s in asm if s.kind == kind) == sorted(expected)
    assert_joined(asm)
    post = next(s for s in asm if s.name == "POST /hello" and s.kind == "SERVER")
    assert post.req_size > len("name=deeptrace&n=1") and post.req_head.endswith(b"name=deeptrace&n=1")
    assert {s.endpoint.pid for s in asm if s.kind == "SERVER"} <= workers
    # All in the kernel: ten exchange events, no data record, nothing handed over or lost.
    assert twin.asm_pipeline.stats.exchanges == 10 and data == []
    assert counted["exchanges"] == 10 and counted["conn_assembled"] == 6 and counted["conn_handed_over"] == 0
    assert all(v == 0 for k, v in counted.items() if k.startswith("drop_"))


# ---- 2. a big response, through write/writev and through sendfile ----


@pytest.fixture
def files():
    """A directory nginx's worker (nobody) may read: tmp_path is root's alone."""
    with tempfile.TemporaryDirectory(prefix="deeptrace-files-") as d:
        Path(d).chmod(0o755)
        yield Path(d)


def test_nginx_200kb_response_written_is_one_exchange_and_sendfile_is_not_seen(twin, tmp_path, files):
    body = bytes(range(256)) * 800  # 204800 bytes
    (files / "big.bin").write_bytes(body)
    server = (f"location /written/ {{{{ sendfile off; alias {files}/; }}}} "
              f"location /sent/ {{{{ sendfile on; alias {files}/; }}}}")  # fmt: skip
    with nginx(tmp_path, server) as (master, port):
        twin.trace(master)
        out = tmp_path / "got.bin"
        twin.run([need("curl"), "-s", "-o", str(out), f"http://127.0.0.1:{port}/written/big.bin"])
        assert out.read_bytes() == body
        twin.settle(closes=2)
        plain, asm = twin.spans()
        counted = twin.counters()
        assert_same_spans(without_truncation_mark(plain), without_truncation_mark(asm))
        assert [(s.kind, s.name, s.status_code) for s in sorted(asm, key=lambda s: s.kind)] == [
            ("CLIENT", "GET /written/big.bin", "200"), ("SERVER", "GET /written/big.bin", "200")]  # fmt: skip
        header = asm[0].resp_head.index(b"\r\n\r\n") + 4
        assert {s.resp_size for s in asm} == {header + len(body)}
        assert_joined(asm)
        assert twin.data_records() == [] and counted["exchanges"] == 2 and counted["conn_handed_over"] == 0

        # sendfile(2) moves the body without a traced syscall: the server side writes its
        # header and then, as far as either path can tell, nothing until the close.
        before = twin.asm.counters()
        twin.run([need("curl"), "-s", "-o", str(out), f"http://127.0.0.1:{port}/sent/big.bin"])
        assert out.read_bytes() == body
        twin.settle(closes=4)
        plain, asm = twin.spans()
        after = twin.asm.counters()
    assert_same_spans(without_truncation_mark(plain), without_truncation_mark(asm))
    sent = [s for s in asm if s.name == "GET /sent/big.bin"]
    (client,) = [s for s in sent if s.kind == "CLIENT"]
    (server,) = [s for s in sent if s.kind == "SERVER"]
    assert client.resp_size == header + len(body) and client.status_code == "200"
    # The server span: only the header was seen; the connection was handed over at its close.
    assert server.resp_size < 1024 and server.attributes.get("deeptrace.partial") is True
    assert after["conn_handed_over"] - before["conn_handed_over"] == 1
    assert after["exchanges"] - before["exchanges"] == 1


# A server of ours, for what nginx does not do: read a body that comes later, answer
# `Expect: 100-continue`, end a response by closing, promise more than it sends.
PY_SERVER = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; answers Expect: 100-continue

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.answer()

    do_POST = do_PUT = do_GET

    def answer(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        path = self.path.split("?")[0]
        if path == "/until-close":  # HTTP/1.0, no length: the body ends with the connection
            self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"x" * 3000)
            self.close_connection = True
        elif path == "/short":  # promises 100 bytes, sends 9, closes
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
            self.close_connection = True
        else:
            out = b"got %d bytes\n" % len(body)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()  # the header, one send
            self.wfile.write(out)  # the body, another

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


@contextmanager
def py_server():
    port = free_port()
    with serving([sys.executable, "-c", PY_SERVER, str(port)], port, stderr=subprocess.DEVNULL) as pid:
        yield pid, port


# ---- 3. pipelining ----

PIPELINED = r"""
import socket, sys, time
port = int(sys.argv[1])

def read_answers(s, n):
    got = b""
    while got.count(b"hello from nginx") < n:
        more = s.recv(65536)
        assert more, got
        got += more

s = socket.create_connection(("127.0.0.1", port))
s.sendall(b"".join(b"GET /hello/%s?n=%d HTTP/1.1\r\nHost: x\r\n\r\n" % (p, i) for i, p in enumerate((b"a", b"b", b"c"))))
read_answers(s, 3)
s.sendall(b"GET /hello/d HTTP/1.1\r\nHost: x\r\n\r\n")  # and on: records, framed as before
read_answers(s, 1)
s.close()

# Pipelined by time: the second request goes before the first response is read.
s = socket.create_connection(("127.0.0.1", port))
s.sendall(b"GET /hello/e HTTP/1.1\r\nHost: x\r\n\r\n")
s.sendall(b"GET /hello/f HTTP/1.1\r\nHost: x\r\n\r\n")
read_answers(s, 2)
s.close()
"""


def test_pipelined_requests_are_handed_over_and_paired_in_order(twin, tmp_path):
    with nginx(tmp_path) as (master, port):
        twin.trace(master)
        twin.python(PIPELINED, port)
        twin.settle(closes=4)
        plain, asm = twin.spans()
        counted = twin.counters()
    assert_same_spans(plain, asm)
    for kind in ("CLIENT", "SERVER"):
        spans = in_wire_order(s for s in asm if s.kind == kind)
        assert [s.name for s in spans] == [f"GET /hello/{p}" for p in "abcdef"]
        assert [s.attributes.get("url.query") for s in spans[:3]] == ["n=0", "n=1", "n=2"]
        assert all(s.status_code == "200" and s.resp_size > 0 for s in spans)
        # Paired in order: on each connection, each response follows the one before, with
        # nothing between them, as each request does the one before.
        for a, b in (*itertools.pairwise(spans[:4]), (spans[4], spans[5])):
            assert a.req_seq[1] == b.req_seq[0] and a.resp_seq[1] == b.resp_seq[0]
    assert_joined(asm)
    # Both sides of the first connection saw three requests in one call: handed over at
    # once. The client side of the second sent its second request while waiting.
    # nginx read the two of the second either in one call (handed over too) or one by one
    # (two exchanges).
    assert counted["conn_assembled"] == 4 and (counted["conn_handed_over"], counted["exchanges"]) in (
        (3, 2),
        (4, 0),
    )
    assert twin.asm_pipeline.stats.orphan_responses == 0


# ---- 4. a request body sent after its header ----

BODY_LATER = r"""
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
for path in (b"/late-body", b"/late-body-again"):
    s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\n" % path)
    time.sleep(0.05)
    s.sendall(b"0123456789")
    got = b""
    while b"got 10 bytes" not in got:
        got += s.recv(65536)
s.close()
"""


def test_request_body_in_a_later_send_is_still_one_exchange(twin):
    with py_server() as (pid, port):
        twin.trace(pid)
        twin.python(BODY_LATER, port)
        twin.settle(closes=2)
        plain, asm = twin.spans()
        counted = twin.counters()
    assert_same_spans(plain, asm)
    head = b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\n"
    assert sorted((s.kind, s.name, s.status_code, s.req_size) for s in asm) == sorted(
        (kind, f"POST {path}", "200", len(head % path.encode()) + 10)
        for kind in ("CLIENT", "SERVER") for path in ("/late-body", "/late-body-again"))  # fmt: skip
    assert_joined(asm)
    assert counted["exchanges"] == 4 and counted["conn_handed_over"] == 0 and twin.data_records() == []


# ---- 5. Expect: 100-continue ----


def test_expect_100_continue_is_handed_over_with_the_request_so_far(twin, tmp_path):
    body = "k=" + "v" * 2000
    with py_server() as (pid, port):
        twin.trace(pid)
        twin.run([need("curl"), "-s", "-o", "/dev/null", "-H", "Expect: 100-continue", "-d", body,
                  f"http://127.0.0.1:{port}/upload"])  # fmt: skip
        twin.settle(closes=2)
        plain, asm = twin.spans()
        counted = twin.counters()
        data = twin.data_records()
    assert_same_spans(without_truncation_mark(plain), without_truncation_mark(asm))
    assert sorted((s.kind, s.name, s.status_code) for s in asm) == [("CLIENT", "POST /upload", "200"),
                                                                    ("SERVER", "POST /upload", "200")]  # fmt: skip
    assert all(s.req_size > len(body) and s.resp_head.startswith(b"HTTP/1.1 200") for s in asm)
    assert_joined(asm)
    # The 100 Continue came while the body was awaited: each side handed over, the header it
    # held first, as one assembled record.
    assert counted["conn_assembled"] == 2 and counted["conn_handed_over"] == 2 and counted["exchanges"] == 0
    held = [r for r in data if r.flags & FLAG_ASSEMBLED]
    assert len(held) == 2 and all(r.payload.startswith(b"POST /upload ") and b"Expect: 100-continue" in r.payload
                                  for r in held)  # fmt: skip


def test_expect_100_continue_after_a_request_header_longer_than_the_exchange_head(twin):
    """When a connection is handed over, the header the kernel held goes to user space as one
    record of `exchange_head` bytes: a header longer than that reached the parser cut (before
    378516b: the request span lost its body, req_size 517 instead of 2519, and its headers past
    byte 256, and was marked partial). Now such a header is never held: user space's at once."""
    with py_server() as (pid, port):
        twin.trace(pid)
        twin.run([need("curl"), "-s", "-o", "/dev/null", "-H", "Expect: 100-continue", "-H", "X-Pad: " + "p" * 300,
                  "-H", "X-Request-ID: after-the-pad", "-d", "k=" + "v" * 2000, f"http://127.0.0.1:{port}/upload"])  # fmt: skip
        twin.settle(closes=2)
        plain, asm = twin.spans()
    assert_same_spans(without_truncation_mark(plain), without_truncation_mark(asm))


# ---- what the kernel keeps of a message: exchange_head bytes ----


def test_a_request_header_longer_than_the_exchange_head_names_the_span_as_records_do(twin, tmp_path):
    """Within the 1024 bytes the kernel searches but past the 256 it keeps: a long route and
    the trace context after a cookie. The records path parses the whole header (before
    378516b the exchange's name was cut at byte 256 and headers past it were missing)."""
    long_route = "/hello/" + "/".join(["catalogue-section"] * 16)  # 294 bytes, no id segments
    with nginx(tmp_path) as (master, port):
        twin.trace(master)
        base = f"http://127.0.0.1:{port}"
        twin.run([need("curl"), "-s", "-o", "/dev/null", f"{base}{long_route}"])
        twin.run([need("curl"), "-s", "-o", "/dev/null", "-H", "Cookie: session=" + "c" * 300, "-H",
                  "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", f"{base}/hello"])  # fmt: skip
        twin.settle(closes=4)
        plain, asm = twin.spans()
    assert sorted(s.name for s in plain) == sorted([f"GET {long_route}"] * 2 + ["GET /hello"] * 2)
    assert all(s.attributes["http.request.header.traceparent"].startswith("00-0af7")
               for s in plain if s.name == "GET /hello")  # fmt: skip
    assert all(b"ccc" not in s.req_head for s in asm + plain)  # the cookie is a secret either way
    assert_same_spans(plain, asm)


# ---- a runtime we did not write: Node.js ----

NODE_SERVER = r"""
const http = require('http');
http.createServer((req, res) => {
  let got = 0;
  req.on('data', (c) => { got += c.length; });
  req.on('end', () => {
    if (req.url.startsWith('/chunked')) {  // three chunks, some time apart
      res.writeHead(200, { 'Content-Type': 'text/plain' });
      res.write('first part\n');
      setTimeout(() => { res.write('second part\n'); setTimeout(() => res.end('last part\n'), 20); }, 20);
    } else if (req.url.startsWith('/end-alone')) {  // the last chunk written on its own, later
      res.writeHead(200, { 'Content-Type': 'text/plain' });
      res.write('all of it\n');
      setTimeout(() => res.end(), 20);
    } else if (req.url.startsWith('/trailers')) {  // a trailer after the last chunk
      res.writeHead(200, { 'Content-Type': 'text/plain', 'Trailer': 'X-Checksum' });
      res.write('body\n');
      res.addTrailers({ 'X-Checksum': 'c0ffee' });
      setTimeout(() => res.end(), 20);
    } else if (req.url.startsWith('/zero-line')) {  // a chunk whose data ends as the last chunk does
      res.writeHead(200, { 'Content-Type': 'text/csv' });
      res.write('1\r\n0\r\n');
      setTimeout(() => res.end('2\r\n'), 50);
    } else {
      const out = `node got ${got} bytes for ${req.url}\n`;
      res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(out) });
      res.end(out);
    }
  });
}).on('upgrade', (req, socket) => {  // 101, then the bytes are another protocol's: an echo
  socket.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n');
  socket.on('data', (d) => socket.write(d));
  socket.on('end', () => socket.end());
}).listen(+process.argv[2]);  // '::', dual stack: IPv4 clients come as ::ffff:127.0.0.1
"""

NODE_CLIENT = r"""
const http = require('http');
const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
const port = +process.argv[2];
function call(method, path, body) {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, method, path, agent,
                               headers: body ? { 'Content-Type': 'application/json' } : {} }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode));
    });
    req.on('error', reject);
    req.end(body);
  });
}
(async () => {
  await call('GET', '/node/1');
  await call('POST', '/node/orders', JSON.stringify({ item: 'book', qty: 2 }));
  await call('DELETE', '/node/orders/12345');
  agent.destroy();
})();
"""


@contextmanager
def node_server(tmp_path: Path):
    script = tmp_path / "server.js"
    script.write_text(NODE_SERVER)
    port = free_port()
    with serving([need("node"), str(script), str(port)], port) as pid:
        yield pid, port


def test_node_server_with_curl_and_node_clients_keep_alive_all_assembled(twin, tmp_path):
    client = tmp_path / "client.js"
    client.write_text(NODE_CLIENT)
    with node_server(tmp_path) as (pid, port):
        twin.trace(pid)
        base = f"http://127.0.0.1:{port}"
        twin.run(
            [need("curl"), "-s", f"{base}/node/a", f"{base}/node/b?x=1", "-o", "/dev/null", "-o", "/dev/null"]
        )
        twin.run([need("node"), str(client), str(port)])
        twin.settle(closes=4)
        plain, asm = twin.spans()
        counted = twin.counters()
        data = twin.data_records()
    assert_same_spans(plain, asm)
    expected = [
        "GET /node/a",
        "GET /node/b",
        "GET /node/{id}",
        "POST /node/orders",
        "DELETE /node/orders/{id}",
    ]
    for kind in ("SERVER", "CLIENT"):
        assert sorted(s.name for s in asm if s.kind == kind) == sorted(expected)
    assert all(s.status_code == "200" for s in asm)
    assert {s.endpoint.laddr for s in asm if s.kind == "SERVER"} == {
        "::ffff:127.0.0.1"
    }  # IPv4 on a dual-stack socket
    assert_joined(asm)
    assert counted["conn_assembled"] == 4 and counted["conn_handed_over"] == 0 and counted["exchanges"] == 10
    assert data == []


def test_chunked_response_from_node_is_one_exchange(twin, tmp_path):
    with node_server(tmp_path) as (pid, port):
        twin.trace(pid)
        out = twin.run(
            [need("curl"), "-s", f"http://127.0.0.1:{port}/chunked", f"http://127.0.0.1:{port}/node/after"]
        )
        assert out.startswith("first part\nsecond part\nlast part\n")
        twin.settle(closes=2)
        plain, asm = twin.spans()
        counted = twin.counters()
    assert_same_spans(plain, asm)
    chunked = [s for s in asm if s.name == "GET /chunked"]
    assert len(chunked) == 2 and all(s.attributes["http.response.header.transfer-encoding"] == "chunked"
                                     for s in chunked)  # fmt: skip
    header = chunked[0].resp_head.index(b"\r\n\r\n") + 4
    chunks = b"b\r\nfirst part\n\r\nc\r\nsecond part\n\r\na\r\nlast part\n\r\n0\r\n\r\n"
    assert {s.resp_size for s in chunked} == {header + len(chunks)}
    assert_joined(asm)
    assert counted["exchanges"] == 4 and counted["conn_handed_over"] == 0 and twin.data_records() == []


def test_chunked_end_written_alone_and_chunked_trailers(twin, tmp_path):
    with node_server(tmp_path) as (pid, port):
        twin.trace(pid)
        base = f"http://127.0.0.1:{port}"
        out = twin.run([need("curl"), "-s", f"{base}/end-alone", f"{base}/trailers", f"{base}/node/after"])
        assert out.startswith("all of it\nbody\nnode got 0 bytes for /node/after")
        twin.settle(closes=2)
        plain, asm = twin.spans()
    assert_same_spans(plain, asm)
    assert sorted(s.name for s in asm if s.kind == "SERVER") == [
        "GET /end-alone",
        "GET /node/after",
        "GET /trailers",
    ]
    assert all(s.resp_head.endswith(b"\r\n0\r\n\r\n") for s in asm if s.name == "GET /end-alone")
    assert all(
        s.resp_head.endswith(b"0\r\nX-Checksum: c0ffee\r\n\r\n") for s in asm if s.name == "GET /trailers"
    )
    assert_joined(asm)


def test_the_head_of_a_response_in_several_writes_is_its_first_bytes_either_way(twin, tmp_path):
    """The records path frames a chunked body once all its calls are in, and keeps its first
    256 bytes over all of them (before 378516b an exchange kept its first call's only)."""
    with node_server(tmp_path) as (pid, port):
        twin.trace(pid)
        twin.run([need("curl"), "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}/chunked"])
        twin.settle(closes=2)
        plain, asm = twin.spans()
    assert all(s.resp_head.endswith(b"last part\n\r\n0\r\n\r\n") for s in plain)
    assert_same_spans(plain, asm)


def test_a_chunk_whose_data_ends_like_the_last_chunk_does_not_end_the_response(twin, tmp_path):
    """A chunk whose data ends in CRLF "0" CRLF (a CSV line "0") is written as a call that ends
    as the last chunk does (before 378516b the kernel ended the response there: resp_size 166,
    not 179, and the rest went to user space as bytes of no request)."""
    with node_server(tmp_path) as (pid, port):
        twin.trace(pid)
        out = twin.run(
            [need("curl"), "-s", f"http://127.0.0.1:{port}/zero-line", f"http://127.0.0.1:{port}/node/after"]
        )
        assert out.startswith("1\r\n0\r\n2\r\n")
        twin.settle(closes=2)
        plain, asm = twin.spans()
    assert sorted((s.kind, s.name) for s in plain) == [("CLIENT", "GET /node/after"), ("CLIENT", "GET /zero-line"),
                                                       ("SERVER", "GET /node/after"), ("SERVER", "GET /zero-line")]  # fmt: skip
    assert_same_spans(plain, asm)


def test_a_message_longer_than_the_capture_is_whole_either_way(twin):
    """Its length is known and the kernel counted every byte: not partial on either path."""
    with py_server() as (pid, port):
        twin.trace(pid)
        twin.run(
            [need("curl"), "-s", "-o", "/dev/null", "-d", "k=" + "v" * 3000, f"http://127.0.0.1:{port}/form"]
        )
        twin.settle(closes=2)
        plain, asm = twin.spans()
    assert len(plain) == 2 and all(s.req_size > CAPTURE and "deeptrace.partial" not in s.attributes for s in plain)
    assert_same_spans(plain, asm)


# ---- 7. a response that runs until the connection closes ----


def test_http10_response_ended_by_close_is_handed_over(twin):
    with py_server() as (pid, port):
        twin.trace(pid)
        out = twin.run([need("curl"), "-s", f"http://127.0.0.1:{port}/until-close"])
        assert out == "x" * 3000
        twin.settle(closes=2)
        plain, asm = twin.spans()
        counted = twin.counters()
        data = twin.data_records()
    assert_same_spans(plain, asm)
    assert sorted((s.kind, s.name, s.status_code) for s in asm) == [("CLIENT", "GET /until-close", "200"),
                                                                    ("SERVER", "GET /until-close", "200")]  # fmt: skip
    header = len(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n")
    assert all(s.resp_size == header + 3000 for s in asm)
    assert_joined(asm)
    # Handed over at the response's first call, with the request it held.
    assert counted["conn_assembled"] == 2 and counted["conn_handed_over"] == 2 and counted["exchanges"] == 0
    assert sum(bool(r.flags & FLAG_ASSEMBLED) for r in data) == 2


# ---- 8. a header longer than the kernel searches ----


def test_header_over_1024_bytes_is_handed_over_and_its_cookie_redacted(twin, tmp_path):
    secret = "s3cr3t" + "x" * 1200
    with nginx(tmp_path) as (master, port):
        twin.trace(master)
        base = f"http://127.0.0.1:{port}"
        twin.run([need("curl"), "-s", "-o", "/dev/null", "-H", f"Cookie: session={secret}", "-H", "X-Request-ID: r-1",
                  f"{base}/hello", "-o", "/dev/null", f"{base}/hello/again"])  # fmt: skip
        twin.settle(closes=2)
        plain, asm = twin.spans()
        counted = twin.counters()
    assert_same_spans(plain, asm)
    assert sorted((s.kind, s.name, s.status_code) for s in asm) == sorted(
        (kind, name, "200") for kind in ("CLIENT", "SERVER") for name in ("GET /hello", "GET /hello/again"))  # fmt: skip
    assert all(s.req_size > 1200 for s in asm)
    assert all(b"s3cr3t" not in s.req_head and b"Cookie: [REDACTED]" in s.req_head for s in asm)
    assert all("s3cr3t" not in repr(s.attributes) for s in asm)
    assert_joined(asm)
    assert counted["conn_assembled"] == 2 and counted["conn_handed_over"] == 2 and counted["exchanges"] == 0


# ---- 9. a connection older than the tracing ----

OLD_CONNECTION = r"""
import socket, sys

def get(s, path):
    s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
    got = b""
    while b"hello from nginx" not in got:
        got += s.recv(65536)

port = int(sys.argv[1])
old = socket.create_connection(("127.0.0.1", port))
get(old, b"/hello/warm")
print("ready", flush=True)
sys.stdin.readline()
for i in range(3):
    get(old, b"/hello/old/%d" % i)
new = socket.create_connection(("127.0.0.1", port))
get(new, b"/hello/new")
new.close()
old.close()
print("done", flush=True)
"""


def test_a_connection_opened_before_tracing_stays_records_and_spans_are_right(twin, tmp_path):
    """The kernel saw neither its connect nor its accept (both processes were traced after:
    as for a collector started after), so it never assembles it; a connection opened after
    tracing is assembled."""
    with nginx(tmp_path) as (master, port):
        client = subprocess.Popen([sys.executable, "-c", OLD_CONNECTION, str(port)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert client.stdout.readline() == "ready\n"
            twin.trace(master)
            twin.trace(client.pid)
            assert client.communicate("go\n", timeout=30)[0] == "done\n"
        finally:
            client.kill()
        twin.settle(closes=4)
        plain, asm = twin.spans()
        counted = twin.counters()
        data = twin.data_records()
    assert_same_spans(plain, asm)
    names = ["GET /hello/old/{id}"] * 3 + ["GET /hello/new"]
    for kind in ("CLIENT", "SERVER"):
        assert sorted(s.name for s in asm if s.kind == kind) == sorted(names)
    assert_joined(asm)
    assert counted["conn_assembled"] == 2 and counted["exchanges"] == 2 and counted["conn_handed_over"] == 0
    # The old connection's bytes came as records, each request and response on both sides.
    assert len(data) == 12 and not any(r.flags & FLAG_ASSEMBLED for r in data)
    assert {r.role for r in data} == {"unknown"}


# ---- 10. hostile bytes ----

HOSTILE = r"""
import socket, sys, time
nginx, ours = int(sys.argv[1]), int(sys.argv[2])

def whole(response):  # a response with all the body its Content-Length says
    head, sep, body = response.partition(b"\r\n\r\n")
    length = [int(line[15:]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    return sep and length and len(body) >= length[0]

def exchange(port, *parts, pause=0.0, wait=3.0):
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(wait)
    for i, part in enumerate(parts):
        if i:
            time.sleep(pause)
        s.sendall(part)
    got = b""
    try:
        while not whole(got):
            more = s.recv(65536)
            if not more:
                break
            got += more
    except socket.timeout:
        pass
    else:
        # The server closed: let it finish its close before ours (the other order is
        # test_an_exchange_handed_over_at_a_close_after_the_peers_keeps_its_endpoint's).
        time.sleep(0.05)
    s.close()
    print(got.split(b"\r\n", 1)[0].decode(errors="replace"), flush=True)

exchange(nginx, b"POST /hello/negative HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n")
exchange(nginx, b"POST /hello/twice HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello")
exchange(nginx, b"POST /hello/huge HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\nabc")
exchange(nginx, b"GET /" + b"a" * 8192 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
exchange(nginx, b"PROPFIND /hello/dav HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
exchange(nginx, b"POST /hello/late HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nConnection: close\r\n\r\n",
         b"0123456789", pause=0.2)
exchange(ours, b"GET /short HTTP/1.1\r\nHost: x\r\n\r\n")
exchange(ours, b"POST /closed-mid-body HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\nonly half", wait=0.2)
"""


def test_hostile_bytes_no_wrong_pairing_and_sane_counters(twin, tmp_path):
    with nginx(tmp_path) as (master, port), py_server() as (ours, our_port):
        twin.trace(master)
        twin.trace(ours)
        lines = twin.python(HOSTILE, port, our_port).splitlines()
        assert lines == ["HTTP/1.1 400 Bad Request"] * 2 + ["HTTP/1.1 413 Request Entity Too Large",
                         "HTTP/1.1 414 Request-URI Too Large"] + ["HTTP/1.1 200 OK"] * 3 + [""]  # fmt: skip
        # The agent is still whole: the next ordinary exchange is assembled.
        twin.run([need("curl"), "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}/hello/after"])
        twin.settle(closes=18)
        plain, asm = twin.spans()
        counted = twin.counters()
    assert_same_spans(plain, asm)
    for kind in ("CLIENT", "SERVER"):
        got = {s.name: s for s in asm if s.kind == kind}
        assert got["GET /hello/after"].status_code == "200"
        assert got["POST /hello/negative"].status_code == "400" and got["GET /{id}"].status_code == "414"
        assert got["PROPFIND /hello/dav"].status_code == "200"
        assert got["GET /short"].resp_size == len(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        assert got["GET /short"].attributes["deeptrace.partial"] is True
    assert all(v == 0 for k, v in counted.items() if k.startswith("drop_"))
    # Both sides of every connection but PROPFIND's were taken on; /hello/after's stayed in the
    # kernel, and each side not handed over made its one exchange.
    assert counted["conn_assembled"] == 16 and counted["conn_handed_over"] <= 14
    assert counted["exchanges"] == twin.asm_pipeline.stats.exchanges == 16 - counted["conn_handed_over"]


ONE_REQUEST = r"""
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(bytes.fromhex(sys.argv[2]))
got = b""
while b"</html>" not in got:
    more = s.recv(65536)
    if not more:
        break
    got += more
s.close()
print(got.split(b"\r\n", 1)[0].decode(), flush=True)
"""

# Shorter than the exchange head: framed in the kernel for how it starts, whatever its length.
GARBAGE = b"GET " + bytes(range(0x80, 0xD0)) + bytes(c for c in range(32) if c not in (10, 13)) + b"\r\n\r\n"


def test_binary_garbage_after_get_is_what_records_make_of_it(twin, tmp_path):
    with nginx(tmp_path) as (master, port):
        twin.trace(master)
        assert twin.python(ONE_REQUEST, port, GARBAGE.hex()) == "HTTP/1.1 400 Bad Request\n"
        twin.settle(closes=2)
        plain, asm = twin.spans()
    assert len(plain) == 2
    assert_same_spans(plain, asm)


@pytest.mark.parametrize("header", [b"Content-Length: 1 0", b"Content\rLength: 1"],
                         ids=["value-1-space-0", "cr-in-name"])  # fmt: skip
def test_a_content_length_python_rejects_is_not_framed_by_in_the_kernel(twin, tmp_path, header):
    request = b"POST /hello HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\nX"
    with nginx(tmp_path) as (master, port):
        twin.trace(master)
        assert twin.python(ONE_REQUEST, port, request.hex()) == "HTTP/1.1 400 Bad Request\n"
        twin.settle(closes=2)
        plain, asm = twin.spans()
    assert len(plain) == 2
    assert_same_spans(plain, asm)


# ---- 12. under load ----


def test_wrk_load_every_request_one_exchange_none_lost(twin, tmp_path):
    asm = twin.asm  # the kernel's exchanges alone: the records path would double the agent's cost
    with nginx(tmp_path) as (master, port):
        workers = asm.trace(master)
        wrk = subprocess.Popen([need("wrk"), "-t1", "-c8", "-d2s", f"http://127.0.0.1:{port}/hello"],
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
        events = []

        def pump():
            for rec in asm.poll(timeout_s=0.01):
                twin.asm_records[rec.tgid].append(rec)
            events.append(asm.poll_exchanges())

        while wrk.poll() is None:  # read while it runs, as the agent does
            pump()
        report = wrk.stdout.read()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until every connection nginx accepted is closed
            pump()
            calls = Counter(r.syscall for r in twin.records(workers))
            if calls["close"] >= calls["accept"] >= 8:
                break
        pump()
        served = len((tmp_path / "access.log").read_text().splitlines())  # nginx's own count
        counted = twin.counters()
    events = np.concatenate(events)
    events = events[np.isin(events["tgid"], list(workers))]
    pipeline = SpanPipeline()
    spans = pipeline.push_exchanges(events, asm.wall_offset_ns) + pipeline.push(twin.records(workers))
    requests = int(re.search(r"(\d+) requests in", report).group(1))
    assert requests > 1000, report
    # wrk counts the answers it read; nginx may have answered a few more when wrk stopped.
    assert requests <= served <= requests + 8
    assert len(spans) == served and Counter((s.kind, s.name, s.status_code) for s in spans) == {
        ("SERVER", "GET /hello", "200"): served
    }
    assert all(0 < s.duration_ns < 1_000_000_000 and s.req_seq and s.resp_seq for s in spans)
    assert {k: v for k, v in counted.items() if k.startswith("drop_")} == dict.fromkeys(
        [k for k in counted if k.startswith("drop_")], 0
    )
    # nginx closes a keep-alive connection after 1000 requests (keepalive_requests) and wrk opens
    # another: every connection is assembled but one wrk opened as it stopped, that sent nothing.
    assert len(set(events["conn_id"].tolist())) == counted["conn_assembled"] >= calls["accept"] - 8
    assert calls["accept"] >= served / 1000
    assert counted["exchanges"] == served and counted["conn_handed_over"] == 0
    assert twin.data_records(workers) == []


# A response cut short by its server, which closes its socket only once the client has closed
# its own: by then the kernel has released the socket's local port (TCP_CLOSE sets it to 0).
CLOSES_LAST = r"""
import socket, sys
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("listening", flush=True)
sys.stdin.readline()  # traced by now: its accept is seen
conn, _ = srv.accept()
assert conn.recv(65536).startswith(b"GET /cut ")
conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
conn.shutdown(socket.SHUT_WR)
while conn.recv(65536):  # until the client's FIN
    pass
conn.close()
print("closed", flush=True)
"""

READS_TO_EOF = r"""
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"GET /cut HTTP/1.1\r\nHost: x\r\n\r\n")
while s.recv(65536):
    pass
s.close()
"""


def test_an_exchange_handed_over_at_a_close_after_the_peers_keeps_its_endpoint(twin):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", CLOSES_LAST, str(port)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert server.stdout.readline() == "listening\n"
        twin.trace(server.pid)
        server.stdin.write("go\n")
        server.stdin.flush()
        twin.python(READS_TO_EOF, port)
        assert server.stdout.readline() == "closed\n"
        twin.settle(closes=2)
        plain, asm = twin.spans()
    finally:
        server.kill()
        server.wait()
    (cut,) = [s for s in plain if s.kind == "SERVER"]
    assert cut.name == "GET /cut" and cut.endpoint.lport == port
    assert_same_spans(plain, asm)


# ---- bodiless by rule, over IPv6 ----


def test_204_304_and_head_have_no_body_and_ipv6_endpoints_are_the_records(twin, tmp_path, files):
    (files / "page.txt").write_text("a page\n" * 50)
    server = (f'listen [::1]:{{port}}; location /hello {{{{ return 200 "hi\\n"; }}}} '
              f"location /nothing {{{{ return 204; }}}} location /static/ {{{{ alias {files}/; }}}}")  # fmt: skip
    with nginx(tmp_path, server) as (master, port):
        twin.trace(master)
        for host in ("127.0.0.1", "[::1]"):
            base = f"http://{host}:{port}"
            page = f"{base}/static/page.txt"
            etag = twin.run([need("curl"), "-g", "-s", "-o", "/dev/null", "-w", "%header{etag}", page])
            twin.run([need("curl"), "-g", "-s", f"{base}/nothing", page, "-H", f"If-None-Match: {etag}",
                      "-o", "/dev/null", "-o", "/dev/null"])  # fmt: skip
            twin.run([need("curl"), "-g", "-s", "-o", "/dev/null", "-I", f"{base}/hello"])
        twin.settle(closes=12)
        plain, asm = twin.spans()
        counted = twin.counters()
    assert_same_spans(plain, asm)
    for kind in ("CLIENT", "SERVER"):
        got = sorted((s.endpoint.laddr, s.name, s.status_code) for s in asm if s.kind == kind)
        assert got == sorted((addr, name, code) for addr in ("127.0.0.1", "::1") for name, code in (
            ("GET /static/page.txt", "200"), ("GET /nothing", "204"), ("GET /static/page.txt", "304"),
            ("HEAD /hello", "200")))  # fmt: skip
    assert all(
        s.resp_head.endswith(b"\r\n\r\n") for s in asm if s.status_code in ("204", "304") or s.name[0] == "H"
    )
    assert_joined(asm)
    assert counted["exchanges"] == 16 and counted["conn_handed_over"] == 0 and twin.data_records() == []


# ---- 101 Switching Protocols ----

UPGRADE = r"""
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
got = b""
while b"\r\n\r\n" not in got:
    got += s.recv(65536)
assert got.startswith(b"HTTP/1.1 101 "), got
for line in (b"GET /not-http HTTP/1.1\r\n\r\n", b"ping\r\n"):  # echoed: no longer HTTP
    s.sendall(line)
    back = b""
    while len(back) < len(line):
        back += s.recv(65536)
    assert back == line
s.shutdown(socket.SHUT_WR)
while s.recv(65536):
    pass
s.close()
"""


def test_101_switching_protocols_is_handed_over_and_what_follows_is_no_http(twin, tmp_path):
    with node_server(tmp_path) as (pid, port):
        twin.trace(pid)
        twin.python(UPGRADE, port)
        twin.settle(closes=2)
        plain, asm = twin.spans()
        counted = twin.counters()
    assert_same_spans(plain, asm)
    assert sorted((s.kind, s.name, s.status_code) for s in asm) == [("CLIENT", "GET /echo", "101"),
                                                                    ("SERVER", "GET /echo", "101")]  # fmt: skip
    assert counted["conn_assembled"] == 2 and counted["conn_handed_over"] == 2 and counted["exchanges"] == 0


# ---- a gap in the TCP sequence: bytes moved by a call the agent does not trace ----

SENDFILE_BODY = r"""
import socket, sys, tempfile
with tempfile.TemporaryFile() as f:
    f.write(b"B" * 10)
    f.flush()
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    for path in (b"/gap", b"/after-gap"):
        s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\n" % path + b"A" * 10)
        if path == b"/gap":
            s.sendfile(f, 0, 10)  # sendfile(2): not traced, a gap in the client's sequence
        else:
            s.sendall(b"B" * 10)
        s.sendall(b"C" * 10)
        got = b""
        while b"got 30 bytes" not in got:
            got += s.recv(65536)
    s.close()
"""


def test_a_gap_in_the_request_hands_over_and_both_paths_agree(twin):
    with py_server() as (pid, port):
        twin.trace(pid)
        twin.python(SENDFILE_BODY, port)
        twin.settle(closes=2)
        plain, asm = twin.spans()
        counted = twin.counters()
    assert_same_spans(plain, asm)
    server = sorted((s for s in asm if s.kind == "SERVER"), key=lambda s: s.start_ns)
    head = b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\n"
    assert [(s.name, s.status_code, s.req_size) for s in server] == [
        (f"POST {p}", "200", len(head % p.encode()) + 30) for p in ("/gap", "/after-gap")]  # fmt: skip
    # The server read every byte: two exchanges. The client's side handed over at the gap.
    assert counted["conn_assembled"] == 2 and counted["conn_handed_over"] == 1 and counted["exchanges"] == 2
    # (The client's side, records either way, names both requests; the records path pairs
    # neither with its response: the responses come while the request after the gap waits out
    # the reorder window, and are orphans. Not the kernel's doing.)
    client = sorted((s for s in asm if s.kind == "CLIENT"), key=lambda s: s.start_ns)
    assert [(s.name, s.req_seq) for s in client] == [(s.name, s.req_seq) for s in server]


# ---- MSG_PEEK: the same bytes read twice ----

PEEKS = r"""
import socket, sys
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("listening", flush=True)
sys.stdin.readline()
conn, _ = srv.accept()
for _ in range(2):
    first = conn.recv(4, socket.MSG_PEEK)  # what protocol is it? (as sniffing servers do)
    data = conn.recv(65536)
    assert data.startswith(first) and data.endswith(b"\r\n\r\n"), data
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\npeeks")
conn.recv(1)
conn.close()
"""

TWO_GETS = r"""
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
for path in (b"/peek/1", b"/peek/2"):
    s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
    got = b""
    while not got.endswith(b"peeks"):
        got += s.recv(65536)
s.close()
"""


def test_a_server_that_peeks_before_it_reads(twin):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", PEEKS, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert server.stdout.readline() == "listening\n"
        twin.trace(server.pid)
        server.stdin.write("go\n")
        server.stdin.flush()
        twin.python(TWO_GETS, port)
        assert server.wait(10) == 0
        twin.settle(closes=2)
        plain, asm = twin.spans()
        counted = twin.counters()
    finally:
        server.kill()
        server.wait()
    assert counted["exchanges"] == 4 and counted["conn_handed_over"] == 0  # a peek moves no bytes: skipped
    assert (
        sorted((s.kind, s.name, s.status_code) for s in plain)
        == [("CLIENT", "GET /peek/{id}", "200")] * 2 + [("SERVER", "GET /peek/{id}", "200")] * 2
    )
    assert_same_spans(plain, asm)


# ---- a status line Python does not read as the kernel does ----

ANSWERS = r"""
import socket, sys
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
answer = bytes.fromhex(sys.argv[2])
print("listening", flush=True)
sys.stdin.readline()
conn, _ = srv.accept()
assert conn.recv(65536).endswith(b"\r\n\r\n")
conn.sendall(answer)
while conn.recv(65536):
    pass
conn.close()
"""

ASKS = r"""
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
got = b""
while not got.endswith(b"ok"):
    got += s.recv(65536)
s.close()
"""


@pytest.mark.parametrize(
    "status_line", [b"HTTP/1.1 2000 OK", b"HTTP/1.1 200OK"], ids=["four-digits", "no-space"]
)
def test_a_status_line_the_kernel_reads_otherwise_than_python(twin, status_line):
    port = free_port()
    answer = status_line + b"\r\nContent-Length: 2\r\n\r\nok"
    server = subprocess.Popen([sys.executable, "-c", ANSWERS, str(port), answer.hex()], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert server.stdout.readline() == "listening\n"
        twin.trace(server.pid)
        server.stdin.write("go\n")
        server.stdin.flush()
        twin.python(ASKS, port)
        assert server.wait(10) == 0
        twin.settle(closes=2)
        plain, asm = twin.spans()
    finally:
        server.kill()
        server.wait()
    assert len(plain) == 2
    assert_same_spans(plain, asm)


# ---- one connection, two threads: a reader and a writer ----

TWO_THREADS = r"""
import socket, sys, threading
n, port = int(sys.argv[1]), int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port))
answered = threading.Semaphore(0)

def reader():  # always blocked in recv: its hook runs the moment a response lands
    got, seen = b"", 0
    while seen < n:
        more = s.recv(65536)
        assert more
        got += more
        while b"\n" in got.partition(b"\r\n\r\n")[2]:
            head, _, rest = got.partition(b"\r\n\r\n")
            line, _, got = rest.partition(b"\n")
            seen += 1
            answered.release()

t = threading.Thread(target=reader)
t.start()
for i in range(n):  # one request in flight at a time: no pipelining
    s.sendall(b"GET /node/pair?i=%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
    answered.acquire()
t.join()
s.close()
"""


def test_a_connection_read_and_written_by_two_threads_pairs_every_request_right(twin, tmp_path):
    n = 1500
    with node_server(tmp_path) as (pid, port):
        twin.trace(pid)
        twin.python(TWO_THREADS, n, port)
        twin.settle(closes=2)
        plain, asm = twin.spans()
    assert_same_spans(plain, asm)
    for kind in ("CLIENT", "SERVER"):
        spans = [s for s in asm if s.kind == kind]
        assert len(spans) == n
        # The response names the request it answers.
        assert all(
            s.resp_head.endswith(b"for /node/pair?%s\n" % s.attributes["url.query"].encode()) for s in spans
        )


# ---- another runtime we did not write: Go's net/http (goroutines over several threads) ----

GO_SERVER = r"""
package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"
)

func main() {
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, r.Body)
		if strings.HasPrefix(r.URL.Path, "/slow") {
			time.Sleep(20 * time.Millisecond) // its connection's background read is pending meanwhile
		}
		fmt.Fprintf(w, "go got %d bytes for %s\n", n, r.URL.RequestURI())
	})
	http.ListenAndServe("127.0.0.1:"+os.Args[1], nil)
}
"""


def test_go_server_keep_alive_all_assembled(twin, tmp_path):
    (tmp_path / "main.go").write_text(GO_SERVER)
    binary = tmp_path / "server"
    subprocess.run([need("go"), "build", "-o", str(binary), "main.go"], cwd=tmp_path, check=True,
                   env={**os.environ, "GO111MODULE": "off", "GOFLAGS": ""})  # fmt: skip
    port = free_port()
    with serving([str(binary), str(port)], port) as pid:
        twin.trace(pid)
        base = f"http://127.0.0.1:{port}"
        twin.run([need("curl"), "-s", f"{base}/go/1", f"{base}/slow/2", f"{base}/go/orders?id=3",
                  "-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null"])  # fmt: skip
        twin.run([need("curl"), "-s", "-o", "/dev/null", "-d", "x=" + "y" * 500, f"{base}/go/form"])
        twin.settle(closes=4)
        plain, asm = twin.spans()
        counted = twin.counters()
    assert_same_spans(plain, asm)
    expected = ["GET /go/{id}", "GET /slow/{id}", "GET /go/orders", "POST /go/form"]
    for kind in ("SERVER", "CLIENT"):
        assert sorted(s.name for s in asm if s.kind == kind) == sorted(expected)
    assert all(s.resp_head.endswith(b"for %s\n" % s.req_head.split(b" ")[1]) for s in asm)
    assert_joined(asm)
    # curl's side all in the kernel. Go's: a handler's connection has a read pending in the
    # background (for a client that goes away) until just after the response is written; a
    # quick next request can have its first byte taken by that 1-byte read, and a header split
    # over calls is handed over (safe: the same spans, from records). Else all in the kernel.
    data = twin.data_records()
    assert {r.comm for r in data} <= {"server"}
    handed = {r.conn_id for r in data}
    first = {c: min((r for r in data if r.conn_id == c), key=lambda r: r.exit_ns) for c in handed}
    assert all(r.size == 1 and r.payload == b"G" for r in first.values()), first
    assert counted["conn_assembled"] == 4 and counted["conn_handed_over"] == len(handed)
    roles = Counter(twin.events()["role"].tolist())  # enum dt_role: 1 client, 2 server
    from_records = twin.asm_pipeline.stats.spans - twin.asm_pipeline.stats.exchanges
    assert roles[1] == 4 and roles[2] == 4 - from_records and counted["exchanges"] == roles[1] + roles[2]
    assert (from_records > 0) == bool(handed)
