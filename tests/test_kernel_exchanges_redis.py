"""Redis exchanges the kernel assembles (CollectorConfig.assemble), against the records path.

Two collectors are loaded at once and trace the same processes, so both see the same
syscalls: the session `collector` (records only, RESP framed in Python) and a module
`assembling` collector, whose kernel frames simple command/reply exchanges itself and
hands a connection over to user space, as records, when something is not simple
(pipelining, a reply with no command, pushes, a gap, a close mid-exchange...). The rule
under test: the spans are the same either way (names, statuses, sizes, TCP byte ranges,
threads, attributes, heads), whatever the traffic, and a command is never paired with
another's reply (the harness: tests/twins.py). A value longer than the capture is not
`deeptrace.partial` on either path: its length is known and every byte was counted.

Traffic comes from real clients (redis-benchmark, redis-cli, redis-py, a Node.js client
over `net`), from raw sockets and from a fake server for bytes no client or server sends.
Processes are traced by pid only, so the assembling collector's counters count this
module's traffic alone. The four product bugs these tests found (a command or reply longer
than the capture lost by the records path, shifting its pairing; commands under 16 bytes
never framed; a split command's head cut to its first call) are fixed; their tests stay.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from servers import free_port, need, serving
from twins import assembling_collector, assert_same_spans, names, span_key, summary


@pytest.fixture(scope="module")
def assembling():
    c = assembling_collector(("http1", "redis"))
    yield c
    c.close()


def redis_argv(port: int, directory: Path) -> list[str]:
    return [need("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(directory), "--enable-debug-command", "yes"]  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One redis-server for the module (DEBUG PROTOCOL enabled: RESP3 types on demand)."""
    port = free_port()
    with serving(redis_argv(port, tmp_path_factory.mktemp("redis")), port, stdout=subprocess.DEVNULL) as pid:
        yield pid, port



PARTIAL = "deeptrace.partial"



def commandstats(port: int) -> dict[str, int]:
    out = subprocess.run([need("redis-cli"), "-p", str(port), "INFO", "commandstats"], check=True, capture_output=True,
                         text=True).stdout  # fmt: skip
    return {line.split(":")[0][8:]: int(line.split("calls=")[1].split(",")[0])
            for line in out.splitlines() if line.startswith("cmdstat_")}  # fmt: skip


def cli(port: int, *args: str, resp3: bool = False) -> subprocess.CompletedProcess:
    argv = [need("redis-cli"), "-p", str(port), *(["-3"] if resp3 else []), *args]
    return subprocess.run(argv, check=False, capture_output=True, timeout=10)


def resp(*args: bytes | str) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def read_reply(sock: socket.socket, until: bytes = b"\r\n", timeout_s: float = 5.0) -> bytes:
    """Bytes until they end with `until` (or the peer closes)."""
    sock.settimeout(timeout_s)
    buf = b""
    while not buf.endswith(until):
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


# ---- 1, 2: redis-benchmark ----


def test_benchmark_one_command_at_a_time_is_all_exchanges_and_the_same_spans(twin, server):
    pid, port = server
    twin.trace(pid)
    n, clients = 1000, 4
    tests = "set,get,incr,lpush,lrange_100,mset,hset,ping_inline"
    bench = subprocess.Popen([need("redis-benchmark"), "-p", str(port), "-n", str(n), "-c", str(clients), "-t", tests,
                              "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    twin.run(bench)
    assert bench.returncode == 0, bench.stderr.read()
    twin.close()
    assert_same_spans(twin)
    got = names(twin.exchange_spans)
    # Every command of the benchmark's own connections came as an exchange; lrange_100 runs its LPUSHes too.
    assert got == {"redis SET": n, "redis GET": n, "redis INCR": n, "redis LPUSH": 2 * n, "redis LRANGE": n,
                   "redis MSET": n, "redis HSET": n}, got  # fmt: skip
    assert all(s.status == "ok" and s.kind == "SERVER" and s.endpoint.pid == pid for s in twin.exchange_spans)
    lrange = next(s for s in twin.exchange_spans if s.name == "redis LRANGE")
    assert lrange.attributes["db.redis.reply_type"] == "array" and lrange.resp_size > 900
    # Records: the inline PINGs (their connections are never assembled), and the two CONFIG GETs
    # redis-benchmark sends first, in one write (pipelined: that connection is handed over).
    assert names(twin.record_spans) == {"redis PING": n, "redis CONFIG": 2}, names(twin.record_spans)
    d = twin.check_counters()
    assert d["conn_handed_over"] == 1 and not twin.handed_records, d
    # Eight benchmarks with connections of their own (lpush runs twice: lrange_100 needs it), plus
    # the CONFIG connection; ping_inline's connections start with no array: never assembled.
    assert d["conn_assembled"] == 8 * clients + 1, d


def test_benchmark_pipelined_is_handed_over_and_counted_as_the_server_counts(twin, server):
    pid, port = server
    twin.trace(pid)
    assert cli(port, "CONFIG", "RESETSTAT").returncode == 0
    n, clients = 2000, 4
    bench = subprocess.Popen([need("redis-benchmark"), "-p", str(port), "-n", str(n), "-P", "16", "-c", str(clients),
                              "-t", "set,get,incr", "-q"], stdout=subprocess.DEVNULL)  # fmt: skip
    twin.run(bench)
    assert bench.returncode == 0
    calls = commandstats(port)  # the server's own count (redis-benchmark rounds up to whole pipelines)
    twin.close()
    assert_same_spans(twin)
    spans = twin.asm_spans
    for command in ("set", "get", "incr"):
        assert names(spans)[f"redis {command.upper()}"] == calls[command] >= n, (command, calls)
    # The pipelined connections went to user space on their first write: no exchange of theirs.
    assert names(twin.exchange_spans) == {"redis CONFIG": 1, "redis INFO": 1}, names(twin.exchange_spans)
    assert all(s.status == "ok" for s in spans)
    d = twin.check_counters()
    assert d["conn_handed_over"] == 3 * clients + 1, d  # + redis-benchmark's CONFIG GETs
    assert twin.p_asm.stats.orphan_responses == 0 and twin.p_asm.stats.unanswered == 0


# ---- 3, 4: errors, large values ----


def test_error_replies_name_their_code(twin, server):
    pid, port = server
    twin.trace(pid)
    assert cli(port, "SET", "str", "v").stdout == b"OK\n"
    assert b"WRONGTYPE" in cli(port, "LPUSH", "str", "x").stdout
    assert b"unknown command" in cli(port, "NOSUCHCOMMAND", "a").stdout
    assert b"wrong number of arguments" in cli(port, "GETRANGE", "str").stdout
    assert b"NOSCRIPT" in cli(port, "EVALSHA", "0" * 40, "0").stdout
    assert cli(port, "GET", "missing").stdout == b"\n"  # a nil reply
    twin.close()
    assert_same_spans(twin)
    assert summary(twin.exchange_spans) == [
        ("redis SET", "ok", None), ("redis LPUSH", "error", "WRONGTYPE"), ("redis NOSUCHCOMMAND", "error", "ERR"),
        ("redis GETRANGE", "error", "ERR"), ("redis EVALSHA", "error", "NOSCRIPT"), ("redis GET", "ok", None)]  # fmt: skip
    wrongtype = twin.exchange_spans[1].attributes["db.response.error"]
    assert wrongtype.startswith("WRONGTYPE Operation against a key")
    assert twin.exchange_spans[-1].attributes["db.redis.reply_type"] == "nil"
    assert not twin.record_spans
    d = twin.check_counters()
    assert d["conn_assembled"] == 6 and d["conn_handed_over"] == 0, d


def test_100kb_value_set_and_get_are_one_exchange_each_with_every_byte_counted(twin, server):
    pid, port = server
    twin.trace(pid)
    value = "v" * 100_000
    assert cli(port, "SET", "big", value).stdout == b"OK\n"
    assert cli(port, "GET", "big").stdout == value.encode() + b"\n"
    twin.close()
    set_size, get_reply = len(resp("SET", "big", value)), len(b"$100000\r\n") + 100_000 + 2
    assert [(s.name, s.status, s.req_size, s.resp_size) for s in twin.exchange_spans] == [
        ("redis SET", "ok", set_size, 5), ("redis GET", "ok", len(resp("GET", "big")), get_reply)]  # fmt: skip
    s, g = twin.exchange_spans
    assert (s.req_seq[1] - s.req_seq[0]) % 2**32 == set_size
    assert (g.resp_seq[1] - g.resp_seq[0]) % 2**32 == get_reply
    assert PARTIAL not in s.attributes and PARTIAL not in g.attributes  # the kernel counted every byte
    assert s.req_head.startswith(b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$100000\r\nvvvv")
    assert len(s.req_head) == 256  # CollectorConfig.exchange_head
    assert not twin.record_spans
    d = twin.check_counters()
    assert d["conn_handed_over"] == 0 and d["exchanges"] == 2, d
    # The records path, capturing 1 KiB of each call: the same GET, not partial either (its
    # length was known and every byte counted).
    (plain_get,) = [p for p in twin.plain_spans if p.name == "redis GET"]
    assert PARTIAL not in plain_get.attributes and span_key(plain_get) == span_key(g)


def test_commands_past_the_scan_window_are_handed_over_and_still_right(twin, server):
    """A command whose values before the last run past the first 1024 bytes, and one of more
    than 1024 values: not framed in the kernel, handed over; sent in pieces the server reads
    one by one (each shorter than the capture), so that the records path has all their bytes."""
    pid, port = server
    twin.trace(pid)
    mset = resp("MSET", "a", "x" * 1500, "b", "y")
    rpush = resp("RPUSH", "l1100", *[str(i) for i in range(1100)])  # 1101 values
    for command, answer in ((mset, b"+OK\r\n"), (rpush, b":1100\r\n")):
        with socket.create_connection(("127.0.0.1", port)) as c:
            for at in range(0, len(command), 700):
                c.sendall(command[at : at + 700])
                time.sleep(0.03)
            assert read_reply(c) == answer
            c.sendall(resp("LLEN", "l1100"))  # after the hand-over: records
            assert read_reply(c).startswith(b":")
    twin.close()
    assert_same_spans(twin)
    assert summary(twin.record_spans) == [("redis MSET", "ok", None), ("redis LLEN", "ok", None),
                                          ("redis RPUSH", "ok", None), ("redis LLEN", "ok", None)]  # fmt: skip
    sizes = [s.req_size for s in sorted(twin.record_spans, key=lambda s: s.start_ns)]
    assert sizes[::2] == [len(mset), len(rpush)]
    assert not twin.exchange_spans
    d = twin.check_counters()
    assert d["conn_assembled"] == 2 and d["conn_handed_over"] == 2 and not twin.handed_records, d


def test_a_command_longer_than_the_capture_keeps_its_span(twin, server):
    pid, port = server
    twin.trace(pid)
    assert cli(port, "SET", "big2", "w" * 100_000).stdout == b"OK\n"
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(resp("MSET", "a", "x" * 1500, "b", "y"))
        assert read_reply(c) == b"+OK\r\n"
    twin.close()
    assert names(twin.exchange_spans) == {"redis SET": 1}  # framed in the kernel: right
    problems = []
    if names(twin.plain_spans) != {"redis SET": 1, "redis MSET": 1}:
        problems.append(f"records path: {summary(twin.plain_spans)}")
    if names(twin.asm_spans) != {"redis SET": 1, "redis MSET": 1}:
        problems.append(f"assembled path: {summary(twin.asm_spans)}")
    assert not problems, problems


def test_a_reply_longer_than_the_capture_does_not_shift_the_pairing(twin, server):
    pid, port = server
    twin.trace(pid)
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(resp("DEL", "l300"))
        read_reply(c)
        for at in range(0, 300, 100):
            c.sendall(resp("RPUSH", "l300", *[str(i) for i in range(at, at + 100)]))
            read_reply(c)
        c.sendall(resp("LRANGE", "l300", "0", "-1"))  # 300 values, 2.5 kB
        assert read_reply(c, b"$3\r\n299\r\n").startswith(b"*300\r\n")
        c.sendall(resp("ECHO", "next command"))
        assert read_reply(c) == b"$12\r\nnext command\r\n"
    twin.close()
    assert_same_spans(twin)
    lrange = [s for s in twin.asm_spans if s.name == "redis LRANGE"]
    echo = [s for s in twin.asm_spans if s.name == "redis ECHO"]
    assert [(s.status, s.attributes.get("db.redis.reply_type"), s.resp_head[:6]) for s in lrange + echo] == [
        ("ok", "array", b"*300\r\n"), ("ok", "bulk", b"$12\r\nn")]  # fmt: skip


# ---- 5: nested replies, RESP3 ----


def test_nested_arrays_and_resp3_maps_sets_doubles_nulls(twin, server):
    pid, port = server
    twin.trace(pid)
    assert cli(port, "HSET", "h", "f1", "v1", "f2", "v2").returncode == 0
    assert cli(port, "XADD", "st", "1-1", "a", "1", "b", "2").returncode == 0
    assert cli(port, "XADD", "st", "2-1", "c", "3").returncode == 0
    assert cli(port, "SADD", "set", "m1", "m2").returncode == 0
    assert cli(port, "ZADD", "z", "1.5", "m").returncode == 0
    assert b"v2" in cli(port, "HGETALL", "h").stdout
    assert b"2-1" in cli(port, "XRANGE", "st", "-", "+").stdout  # [[id, [field, value, ...]], ...]
    assert b"get" in cli(port, "COMMAND", "INFO", "get").stdout  # arrays of arrays, four deep
    # RESP3: redis-cli -3 says HELLO 3 (a map reply), then its command, on one connection.
    assert b"v2" in cli(port, "HGETALL", "h", resp3=True).stdout  # a map
    assert b"m2" in cli(port, "SMEMBERS", "set", resp3=True).stdout  # a set
    assert b"1.5" in cli(port, "ZSCORE", "z", "m", resp3=True).stdout  # a double
    assert cli(port, "GET", "missing", resp3=True).returncode == 0  # a RESP3 null
    assert b"c" in cli(port, "XRANGE", "st", "-", "+", resp3=True).stdout
    twin.close()
    assert_same_spans(twin)
    assert not twin.record_spans
    spans = sorted(twin.exchange_spans, key=lambda s: s.start_ns)
    assert [s.name for s in spans] == [
        "redis HSET",
        "redis XADD",
        "redis XADD",
        "redis SADD",
        "redis ZADD",
        "redis HGETALL",
        "redis XRANGE",
        "redis COMMAND",
        "redis HELLO",
        "redis HGETALL",
        "redis HELLO",
        "redis SMEMBERS",
        "redis HELLO",
        "redis ZSCORE",
        "redis HELLO",
        "redis GET",
        "redis HELLO",
        "redis XRANGE",
    ]
    types = [s.attributes.get("db.redis.reply_type") for s in spans]
    assert types[5:8] == ["array"] * 3
    assert types[8:] == ["map", "map", "map", "set", "map", "double", "map", "null", "map", "array"], types
    assert all(s.status == "ok" for s in spans)
    d = twin.check_counters()
    assert d["conn_handed_over"] == 0 and d["conn_assembled"] == 13, d


def test_resp3_attributes_and_pushes_hand_the_connection_over_without_wrong_pairs(twin, server):
    """DEBUG PROTOCOL writes each RESP3 type; `attrib` and `push` write an attribute or a push
    before the real reply, in the same write: the kernel frames no such reply."""
    pid, port = server
    twin.trace(pid)
    answers = []
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(resp("HELLO", "3"))
        assert read_reply(c, b"\r\n").startswith(b"%")
        for kind, end in (("true", b"#t\r\n"), ("bignum", b"\r\n"), ("verbatim", b"\r\n"), ("double", b"\r\n"),
                          ("null", b"_\r\n"), ("map", b"\r\n"), ("set", b"\r\n")):  # fmt: skip
            c.sendall(resp("DEBUG", "PROTOCOL", kind))
            answers.append(read_reply(c, end))
        c.sendall(resp("DEBUG", "PROTOCOL", "attrib"))
        answers.append(read_reply(c, b"following the attribute\r\n"))
        c.sendall(resp("ECHO", "after"))
        assert read_reply(c) == b"$5\r\nafter\r\n"
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(resp("HELLO", "3"))
        read_reply(c)
        c.sendall(resp("DEBUG", "PROTOCOL", "push"))
        answers.append(read_reply(c, b"following the push reply\r\n"))
        c.sendall(resp("ECHO", "after"))
        assert read_reply(c) == b"$5\r\nafter\r\n"
    assert answers[0] == b"#t\r\n" and answers[1].startswith(b"(") and answers[2].startswith(b"=")
    assert answers[-2].startswith(b"|") and answers[-1].startswith(b">")
    twin.close()
    assert_same_spans(twin)
    spans = twin.asm_spans
    assert [(s.name, s.attributes.get("db.redis.reply_type")) for s in sorted(spans, key=lambda s: s.start_ns)] == [
        ("redis HELLO", "map"), ("redis DEBUG", "boolean"), ("redis DEBUG", "bignum"), ("redis DEBUG", "verbatim"),
        ("redis DEBUG", "double"), ("redis DEBUG", "null"), ("redis DEBUG", "map"), ("redis DEBUG", "set"),
        ("redis DEBUG", "attribute"), ("redis ECHO", "bulk"),
        ("redis HELLO", "map"), ("redis DEBUG", "bulk"), ("redis ECHO", "bulk")]  # fmt: skip
    # The push is no reply: DEBUG's is the bulk string after it (on both paths).
    push_debug = [s for s in spans if s.name == "redis DEBUG"][-1]
    assert push_debug.resp_head == answers[-1][answers[-1].index(b"$40") :] and push_debug.resp_size == 47
    assert len(twin.exchange_spans) == 9  # up to the attribute; the second connection's HELLO
    d = twin.check_counters()
    assert d["conn_assembled"] == 2 and d["conn_handed_over"] == 2, d
    assert [r.size for r in twin.handed_records] == [
        len(resp("DEBUG", "PROTOCOL", p)) for p in ("attrib", "push")
    ]


def test_resp3_invalidation_push_with_no_command_hands_over(twin, server, tmp_path):
    """redis-py (another client library) in RESP3 with client-side caching on: the server
    pushes an invalidation with no command waiting, between two exchanges."""
    pid, port = server
    script = textwrap.dedent("""
        import sys, time, redis
        sys.stdin.readline()
        r = redis.Redis(port=int(sys.argv[1]), protocol=3, single_connection_client=True)
        r.set("tracked", "1")
        r.execute_command("CLIENT", "TRACKING", "on")
        r.get("tracked")
        redis.Redis(port=int(sys.argv[1])).set("tracked", "2")  # another connection: invalidates
        time.sleep(0.1)
        got = r.hgetall("h")
        print("done", got)
    """)
    p = subprocess.Popen([sys.executable, "-c", script, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)  # fmt: skip
    twin.trace(pid)
    twin.trace(p.pid)
    p.stdin.write("go\n")
    p.stdin.flush()
    twin.run(p)
    assert p.stdout.read().startswith("done"), "the redis-py client failed"
    twin.close()
    assert_same_spans(twin)
    for side, pid_ in (("SERVER", pid), ("CLIENT", p.pid)):
        mine = [s for s in twin.asm_spans if s.kind == side and s.endpoint.pid == pid_]
        # redis 7.0 knows neither CLIENT SETINFO nor CLIENT MAINT_NOTIFICATIONS, which redis-py sends first.
        assert all(s.status == "ok" or s.name == "redis CLIENT" for s in mine), summary(mine)
        mine.sort(key=lambda s: s.start_ns)
        assert [s.name for s in mine if s.name != "redis CLIENT"] == [
            "redis HELLO",
            "redis SET",
            "redis GET",
            "redis HELLO",
            "redis SET",
            "redis HGETALL",
        ]
        # No command took the push for its reply: the GET has its value, HGETALL a map.
        get = next(s for s in mine if s.name == "redis GET")
        assert get.attributes["db.redis.reply_type"] == "bulk"
        assert next(s for s in mine if s.name == "redis HGETALL").attributes["db.redis.reply_type"] == "map"
    d = twin.check_counters()
    # Two connections seen from both ends; the tracking one is handed over at each end: the server's
    # when it writes the push, the client's when it reads it, with the HGETALL it had sent. CI runs
    # on a loaded machine counted 4, and the client's held request was another (cause not pinned
    # down: calls split or merged otherwise under load hand a connection over too), with the
    # spans still the same on both paths, which is the rule.
    assert d["conn_assembled"] == 4 and 2 <= d["conn_handed_over"] <= 4, d
    # Here: the HGETALL (24 bytes) the client held; under load the hand-over can come earlier.
    assert any(r.tgid == p.pid and r.direction == "egress" for r in twin.handed_records), twin.handed_records


# ---- 6: subscriptions ----


def test_subscriber_is_not_assembled_publisher_is(twin, server):
    pid, port = server
    twin.trace(pid)
    sub = subprocess.Popen([need("redis-cli"), "-p", str(port), "SUBSCRIBE", "news"], stdout=subprocess.PIPE)
    monitor = subprocess.Popen([need("redis-cli"), "-p", str(port), "MONITOR"], stdout=subprocess.PIPE)
    assert sub.stdout.readline() == b"subscribe\n"
    assert monitor.stdout.readline() == b"OK\n"
    for i in range(3):
        assert cli(port, "PUBLISH", "news", f"item {i}").stdout == b"1\n"
        twin.pump()
    for _ in range(3):
        twin.pump()
    sub.terminate()
    monitor.terminate()
    sub.wait()
    monitor.wait()
    twin.close()
    assert_same_spans(twin)
    assert names(twin.exchange_spans) == {"redis PUBLISH": 3}
    assert all(
        s.status == "ok" and s.attributes["db.redis.reply_type"] == "integer" for s in twin.exchange_spans
    )
    assert {s.name for s in twin.record_spans} == {"redis SUBSCRIBE", "redis MONITOR"}, summary(
        twin.record_spans
    )
    subscribe = next(s for s in twin.record_spans if s.name == "redis SUBSCRIBE")
    assert subscribe.status == "ok"
    d = twin.check_counters()
    # SUBSCRIBE and MONITOR start as Redis arrays: the kernel takes them on, frames neither, hands over.
    assert d["conn_assembled"] == 5 and d["conn_handed_over"] == 2 and not twin.handed_records, d


# ---- 7: a Node.js client ----

NODE_CLIENT = r"""
const net = require('net');
const [port, json] = process.argv.slice(2);
const cmds = JSON.parse(json);
function encode(args) {
  const parts = [Buffer.from(`*${args.length}\r\n`)];
  for (const a of args) {
    const b = Buffer.from(a, 'latin1');
    parts.push(Buffer.from(`$${b.length}\r\n`), b, Buffer.from('\r\n'));
  }
  return Buffer.concat(parts);
}
function parse(buf, pos) {  // [value, end], or null while incomplete
  if (pos >= buf.length) return null;
  const t = String.fromCharCode(buf[pos]);
  const nl = buf.indexOf('\r\n', pos);
  if (nl < 0) return null;
  const line = buf.toString('latin1', pos + 1, nl);
  let p = nl + 2;
  if ('+-:_,#('.includes(t)) return [t + line, p];
  const n = parseInt(line, 10);
  if ('$!='.includes(t)) {
    if (n < 0) return [null, p];
    if (p + n + 2 > buf.length) return null;
    return [buf.toString('latin1', p, p + n).slice(0, 40), p + n + 2];
  }
  const out = [];
  for (let i = 0; i < (t === '%' ? 2 * n : n); i++) {
    const r = parse(buf, p);
    if (!r) return null;
    out.push(r[0]);
    p = r[1];
  }
  return [out, p];
}
process.stdin.once('data', () => {
  const sock = net.connect(+port, '127.0.0.1');
  let buf = Buffer.alloc(0), i = 0;
  const replies = [];
  const next = () => (i < cmds.length ? sock.write(encode(cmds[i++])) : sock.end());
  sock.on('connect', next);
  sock.on('data', (d) => {
    buf = Buffer.concat([buf, d]);
    const r = parse(buf, 0);
    if (r) { replies.push(r[0]); buf = buf.subarray(r[1]); next(); }
  });
  sock.on('close', () => { console.log(JSON.stringify(replies)); process.exit(0); });
});
"""


def run_node(twin, tmp_path, port: int, commands: list[list[str]]) -> tuple[int, list]:
    """The Node.js client, traced from before it connects; (its pid, its replies)."""
    script = tmp_path / "client.js"
    script.write_text(NODE_CLIENT)
    node = subprocess.Popen([need("node"), str(script), str(port), json.dumps(commands)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    twin.trace(node.pid)
    node.stdin.write("go\n")
    node.stdin.flush()
    twin.run(node)
    assert node.returncode == 0
    return node.pid, json.loads(node.stdout.read())


def test_node_client_one_command_at_a_time_both_sides(twin, server, tmp_path):
    pid, port = server
    twin.trace(pid)
    commands = [["SET", "nk", "1"], ["INCR", "nk"], ["GET", "nk"], ["DEL", "nk", "nope"],
                ["HSET", "nh", "a", "1", "b", "2"], ["HGETALL", "nh"], ["LPUSH", "nh", "x"], ["GET", "nothing"],
                ["SET", "nbig", "n" * 900], ["SETRANGE", "nbig", "19999", "n"], ["GET", "nbig"], ["EXISTS", "nbig"], ["ECHO", "\r\n*2\r\n$1\r\n"],
                ["ECHO", "\u00e9\u00ff\x00\x01"]]  # fmt: skip
    node_pid, replies = run_node(twin, tmp_path, port, commands)
    assert replies[:4] == ["+OK", ":2", "2", ":1"] and replies[6].startswith("-WRONGTYPE"), replies
    assert replies[7] is None and replies[12] == "\r\n*2\r\n$1\r\n"
    twin.close()
    assert_same_spans(twin)
    expected = [(f"redis {c[0]}", "error" if c[0] == "LPUSH" else "ok", "WRONGTYPE" if c[0] == "LPUSH" else None)
                for c in commands]  # fmt: skip
    server_side = sorted((s for s in twin.exchange_spans if s.kind == "SERVER"), key=lambda s: s.start_ns)
    client_side = sorted((s for s in twin.exchange_spans if s.kind == "CLIENT"), key=lambda s: s.start_ns)
    assert summary(server_side) == expected and summary(client_side) == expected
    assert {s.endpoint.pid for s in client_side} == {node_pid} and {s.endpoint.pid for s in server_side} == {
        pid
    }
    # Each side's span carries the same TCP byte ranges and sizes: the join across processes.
    assert [(s.req_seq, s.resp_seq, s.req_size, s.resp_size) for s in server_side] == [
        (s.req_seq, s.resp_seq, s.req_size, s.resp_size) for s in client_side
    ]
    assert (
        server_side[8].req_size == len(resp("SET", "nbig", "n" * 900))
        and server_side[10].resp_size == 8 + 20000 + 2
    )
    assert PARTIAL not in server_side[10].attributes
    assert not twin.record_spans
    d = twin.check_counters()
    assert d["conn_assembled"] == 2 and d["conn_handed_over"] == 0 and d["exchanges"] == 2 * len(commands), d


def test_short_commands_like_ping_are_framed_in_the_kernel(twin, server, tmp_path):
    pid, port = server
    twin.trace(pid)
    commands = [["PING"], ["SET", "pk", "1"], ["MULTI"], ["INCR", "pk"], ["EXEC"], ["INFO"], ["GET", "pk"]]
    _, replies = run_node(twin, tmp_path, port, commands)
    assert replies[:3] == ["+PONG", "+OK", "+OK"]
    twin.close()
    assert_same_spans(twin)
    assert [s.name for s in twin.asm_spans if s.kind == "SERVER"] == [f"redis {c[0]}" for c in commands]
    d = twin.check_counters()
    assert d["conn_handed_over"] == 0 and d["exchanges"] == 2 * len(commands), d


# ---- 8: connections the kernel did not see start; inline commands ----


def test_connection_older_than_the_tracing_comes_as_records(twin, tmp_path):
    """A redis-server and a client connection that exist before the collectors trace the
    server: the kernel never saw the accept (as for a connection older than the collector:
    no entry of it in the kernel's connection map), so it does not know the role, never frames."""
    port = free_port()
    with serving(redis_argv(port, tmp_path), port, stdout=subprocess.DEVNULL) as pid:
        old = socket.create_connection(("127.0.0.1", port))
        old.sendall(resp("SET", "k", "before"))
        assert read_reply(old) == b"+OK\r\n"
        twin.trace(pid)
        for args, answer in (((b"GET", b"k"), b"$6\r\nbefore\r\n"), ((b"LPUSH", b"k", b"x"), None),
                             ((b"INCRBY", b"n", b"5"), b":5\r\n")):  # fmt: skip
            old.sendall(resp(*args))
            got = read_reply(old)
            assert answer is None or got == answer
        old.close()
        # A connection it sees start, but whose first bytes are an inline command (as typed into telnet).
        with socket.create_connection(("127.0.0.1", port)) as inline:
            inline.sendall(b"EXISTS k\r\n")
            assert read_reply(inline) == b":1\r\n"
            inline.sendall(resp("GET", "k"))
            assert read_reply(inline) == b"$6\r\nbefore\r\n"
        twin.close()
    assert_same_spans(twin)
    assert summary(twin.record_spans) == [("redis GET", "ok", None), ("redis LPUSH", "error", "WRONGTYPE"),
                                          ("redis INCRBY", "ok", None), ("redis EXISTS", "ok", None),
                                          ("redis GET", "ok", None)]  # fmt: skip
    assert not twin.exchange_spans
    d = twin.check_counters()
    assert d["conn_assembled"] == 0 and d["exchanges"] == 0, d


# ---- 9: hostile bytes ----


def test_hostile_commands_from_raw_sockets(twin, server):
    pid, port = server
    twin.trace(pid)
    # A negative bulk length other than -1: redis says protocol error and closes.
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(b"*2\r\n$3\r\nGET\r\n$-5\r\n")
        assert read_reply(c).startswith(b"-ERR Protocol error")
    # A huge element count, alone and followed by a value: redis waits for the rest; we close first.
    for data in (b"*99999999\r\n", b"*99999999\r\n$3\r\nGET\r\n"):
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(data)
            time.sleep(0.05)
    # One command split over two sends, 50 ms apart (handed over): inside the last length line,
    # inside an earlier bulk string, before 16 bytes. (Inside the last bulk string: a test below.)
    whole = resp("SET", "split", "value")
    for cut in (26, 20, 10):
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(whole[:cut])
            time.sleep(0.05)
            c.sendall(whole[cut:])
            assert read_reply(c) == b"+OK\r\n"
            c.sendall(resp("GET", "split"))
            assert read_reply(c) == b"$5\r\nvalue\r\n"
    # Garbage after a valid command, in the same send: an inline command for redis.
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(resp("ECHO", "one") + b"GARBAGE \x7f\x13junk\r\n")
        assert read_reply(c, b"' \r\n").startswith(b"$3\r\none\r\n-ERR unknown command 'GARBAGE'")
        c.sendall(resp("ECHO", "two"))
        assert read_reply(c) == b"$3\r\ntwo\r\n"
    # Binary garbage after a valid command (redis waits for its line end forever), then close.
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(resp("ECHO", "three") + b"\x00\xff\x13garbage\x80")
        assert read_reply(c) == b"$5\r\nthree\r\n"
    # Half a command, then close.
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(resp("SET", "half", "x" * 100)[:60])
        time.sleep(0.05)
    # Starts like RESP, is not.
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(b"*1\r\n!#%&/()=?\x01\x02\x7f\r\n")
        assert read_reply(c).startswith(b"-ERR Protocol error: expected '$'")
    # After all that, a plain command on a new connection is an exchange as ever.
    assert cli(port, "SET", "after", "hostile").stdout == b"OK\n"
    twin.close()
    assert_same_spans(twin)
    spans = sorted(twin.asm_spans, key=lambda s: s.start_ns)
    ok = [s for s in spans if s.status == "ok"]
    assert [s.name for s in ok] == ["redis SET", "redis GET"] * 3 + ["redis ECHO"] * 3 + ["redis SET"], (
        summary(spans)
    )
    errors = [
        (s.name, s.status_code, s.attributes.get("db.response.error", "")[:30])
        for s in spans
        if s.status != "ok"
    ]
    # (The array that is not RESP gets no span on either path: its error reply is an orphan.)
    assert errors == [("redis GET", "ERR", "ERR Protocol error: invalid bu"),
                      ("redis GARBAGE", "ERR", "ERR unknown command 'GARBAGE',")], errors  # fmt: skip
    # Each hostile connection was handed over before a reply; the last one is plain.
    assert summary(twin.exchange_spans) == [("redis SET", "ok", None)]
    d = twin.check_counters()
    # Every connection starts with "*<digit>": assembled, then handed over, the 60 bytes of the
    # half SET with what the kernel held of it.
    assert d["conn_assembled"] == 11 and d["conn_handed_over"] == 10, d
    assert [(r.direction, r.size) for r in twin.handed_records] == [("ingress", 60)]


def test_a_command_split_over_two_sends_has_the_same_head_as_records_give(twin, server):
    pid, port = server
    twin.trace(pid)
    whole = resp("SET", "split", "value")  # 35 bytes, cut inside its last bulk string: framed in the kernel
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(whole[:30])
        time.sleep(0.05)
        c.sendall(whole[30:])
        assert read_reply(c) == b"+OK\r\n"
    twin.close()
    (span,) = twin.exchange_spans
    assert (span.name, span.req_size, span.req_seq[1] - span.req_seq[0]) == ("redis SET", 35, 35)
    assert twin.check_counters()["conn_handed_over"] == 0
    assert span.req_head == whole, span.req_head
    assert_same_spans(twin)


FAKE_SERVER = r"""
import json, os, socket, sys, tempfile, time
ops = json.loads(sys.argv[1])
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen()
print(ls.getsockname()[1], flush=True)
sys.stdin.readline()  # traced by now: the kernel sees the accept
c, _ = ls.accept()
for op, arg in ops:
    if op == "recv":
        got = b""
        while len(got) < arg:
            chunk = c.recv(65536)
            if not chunk:
                sys.exit("the client closed")
            got += chunk
    elif op == "peek":
        c.recv(65536, socket.MSG_PEEK)
    elif op == "send":
        c.sendall(arg.encode("latin-1"))
    elif op == "sendfile":  # bytes the tracer does not see (sendfile is not traced): a gap in the sequence
        with tempfile.TemporaryFile() as f:
            f.write(arg.encode("latin-1"))
            f.flush()
            os.sendfile(c.fileno(), f.fileno(), 0, len(arg))
    elif op == "sleep":
        time.sleep(arg)
c.close()
"""


def fake_exchange(twin, ops: list, client_sends: list[bytes]) -> bytes:
    """A fake Redis server running `ops` on one connection, traced; this process is its
    (untraced) client, sending each of client_sends 50 ms apart; returns all it received."""
    server = subprocess.Popen([sys.executable, "-c", FAKE_SERVER, json.dumps(ops)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        port = int(server.stdout.readline())
        twin.trace(server.pid)
        server.stdin.write("go\n")
        server.stdin.flush()
        got = b""
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.settimeout(5)
            for data in client_sends:
                c.sendall(data)
                time.sleep(0.05)
            while chunk := c.recv(65536):
                got += chunk
        assert server.wait(10) == 0
    finally:
        server.kill()
        server.wait()
    return got


GET_K = resp("GET", "k")  # 20 bytes
ECHO = resp("ECHO", "hi")  # 22 bytes


def test_fake_server_closes_mid_reply(twin):
    got = fake_exchange(twin, [["recv", len(GET_K)], ["send", "$10\r\nhello"]], [GET_K])
    assert got == b"$10\r\nhello"
    twin.close()
    assert_same_spans(twin)
    (span,) = twin.asm_spans
    assert (span.name, span.req_size) == ("redis GET", 20)
    d = twin.check_counters()
    assert d["conn_assembled"] == 1 and d["conn_handed_over"] == 1 and d["exchanges"] == 0, d
    assert [(r.direction, r.size, r.payload) for r in twin.handed_records] == [("ingress", 20, GET_K),
                                                                              ("egress", 10, b"$10\r\nhello")]  # fmt: skip


def test_fake_server_closes_mid_command(twin):
    """The kernel has framed the first 40 bytes of a 127-byte command when the server closes."""
    command = resp("SET", "k", "x" * 100)
    got = fake_exchange(twin, [["recv", 40]], [command[:40], command[40:60]])
    assert got == b""
    twin.close()
    assert_same_spans(twin)
    d = twin.check_counters()
    assert d["conn_assembled"] == 1 and d["conn_handed_over"] == 1 and d["exchanges"] == 0, d
    assert [(r.direction, r.size, r.payload) for r in twin.handed_records] == [("ingress", 40, command[:40])]


def test_fake_server_peeks_then_reads_is_one_exchange_each(twin):
    ops = [["peek", 0], ["recv", len(GET_K)], ["send", "+PONG\r\n"], ["peek", 0], ["recv", len(ECHO)],
           ["send", "$2\r\nhi\r\n"]]  # fmt: skip
    got = fake_exchange(twin, ops, [GET_K, ECHO])
    assert got == b"+PONG\r\n$2\r\nhi\r\n"
    twin.close()
    assert_same_spans(twin)
    assert summary(twin.exchange_spans) == [("redis GET", "ok", None), ("redis ECHO", "ok", None)]
    d = twin.check_counters()
    assert d["conn_handed_over"] == 0, d


def test_fake_server_reply_with_no_command(twin):
    ops = [["recv", len(GET_K)], ["send", "+PONG\r\n"], ["sleep", 0.02], ["send", "+EXTRA\r\n"], ["recv", len(ECHO)],
           ["send", "$2\r\nhi\r\n"]]  # fmt: skip
    got = fake_exchange(twin, ops, [GET_K, ECHO])
    assert got == b"+PONG\r\n+EXTRA\r\n$2\r\nhi\r\n"
    twin.close()
    assert_same_spans(twin)
    assert [(s.name, s.resp_head) for s in sorted(twin.asm_spans, key=lambda s: s.start_ns)] == [
        ("redis GET", b"+PONG\r\n"), ("redis ECHO", b"$2\r\nhi\r\n")]  # fmt: skip
    assert [s.name for s in twin.exchange_spans] == ["redis GET"]
    d = twin.check_counters()
    assert d["conn_assembled"] == 1 and d["conn_handed_over"] == 1 and not twin.handed_records, d


def test_fake_server_reply_with_a_sequence_gap(twin):
    """Part of a reply written with sendfile, which is not traced: the kernel sees the TCP
    sequence jump, and must not count the next write as the rest of the reply."""
    ops = [["recv", len(GET_K)], ["send", "$10\r\nhel"], ["sleep", 0.02], ["sendfile", "lo"], ["sleep", 0.02],
           ["send", "world\r\n"], ["recv", len(ECHO)], ["send", "$2\r\nhi\r\n"]]  # fmt: skip
    got = fake_exchange(twin, ops, [GET_K, ECHO])
    assert got == b"$10\r\nhelloworld\r\n$2\r\nhi\r\n"
    twin.close()
    assert_same_spans(twin)
    d = twin.check_counters()
    assert d["conn_assembled"] == 1 and d["conn_handed_over"] == 1 and d["exchanges"] == 0, d
    assert [(r.direction, r.size) for r in twin.handed_records] == [("ingress", 20), ("egress", 8)]
    spans = sorted(twin.asm_spans, key=lambda s: s.start_ns)
    assert [s.name for s in spans] == ["redis GET", "redis ECHO"], summary(spans)
    assert spans[1].resp_head == b"$2\r\nhi\r\n"
