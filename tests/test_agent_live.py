"""Spans from real servers and clients traced by the real agent."""

from __future__ import annotations

import subprocess

from servers import need, nginx, redis

from deeptrace.capture.pipeline import SpanPipeline


def spans_of(store, tgids, predicate, timeout_s=10.0):
    """Run the records of these processes through a fresh pipeline once predicate(records) holds."""
    recs = store.wait_for(tgids, predicate, timeout_s)
    pipeline = SpanPipeline()
    return pipeline.push(recs), pipeline


def test_curl_and_nginx_give_one_client_and_one_server_span_per_request(collector, store, tmp_path):
    collector.trace_comm("curl")
    with nginx(tmp_path) as (master, port):
        workers = collector.trace(master)
        urls = [f"http://127.0.0.1:{port}/hello", f"http://127.0.0.1:{port}/hello?id=3",
                f"http://127.0.0.1:{port}/missing/42"]  # fmt: skip
        curls = []
        for url in urls:
            p = subprocess.Popen([need("curl"), "-s", "-o", "/dev/null", url])
            curls.append(p.pid)
            assert p.wait(10) == 0
        head = subprocess.Popen([need("curl"), "-s", "-I", "-o", "/dev/null", urls[0]])
        curls.append(head.pid)
        assert head.wait(10) == 0
        # Every connection closed on both sides: all their records are in.
        server, _ = spans_of(store, workers, lambda rs: sum(r.syscall == "close" for r in rs) >= 4)
        client, _ = spans_of(store, curls, lambda rs: sum(r.syscall == "close" for r in rs) >= 4)
    expected = [("GET /hello", "ok", "200"), ("GET /hello", "ok", "200"), ("GET /missing/{id}", "error", "404"),
                ("HEAD /hello", "ok", "200")]  # fmt: skip
    for spans, kind in ((server, "SERVER"), (client, "CLIENT")):
        spans.sort(key=lambda s: s.start_ns)
        assert [(s.name, s.status, s.status_code) for s in spans] == expected
        assert all(s.kind == kind and 0 < s.duration_ns < 2_000_000_000 for s in spans)
    assert {s.endpoint.service for s in server} == {"nginx"} and {s.endpoint.service for s in client} == {"curl"}
    # Each client span and its server span carry the same TCP byte ranges: the exact cross-process join.
    assert sorted(s.req_seq for s in server) == sorted(s.req_seq for s in client)
    assert sorted(s.resp_seq for s in server) == sorted(s.resp_seq for s in client)
    assert server[0].attributes["http.request.header.user-agent"].startswith("curl/")


def test_redis_benchmark_pipelined_and_redis_errors(collector, store, tmp_path):
    with redis(tmp_path) as (pid, port):
        collector.trace(pid)
        n = 500
        subprocess.run([need("redis-benchmark"), "-p", str(port), "-n", str(n), "-P", "16", "-c", "4", "-t", "set,get",
                        "-q"], check=True, capture_output=True)  # fmt: skip
        cli = [need("redis-cli"), "-p", str(port)]
        subprocess.run([*cli, "SET", "s", "v"], check=True, capture_output=True)
        assert b"WRONGTYPE" in subprocess.run([*cli, "LPUSH", "s", "x"], capture_output=True).stdout
        # The server's own count of what it ran (redis-benchmark rounds up to whole pipelines).
        stats = subprocess.run([*cli, "INFO", "commandstats"], check=True, capture_output=True, text=True).stdout
        calls = {line.split(":")[0][8:]: int(line.split("calls=")[1].split(",")[0])
                 for line in stats.splitlines() if line.startswith("cmdstat_")}  # fmt: skip
        # The INFO reply is the last thing the server sent.
        spans, pipeline = spans_of(store, pid, lambda rs: any(b"# Commandstats" in r.payload for r in rs))
        spans += pipeline.close_all(0)
    names = [s.name for s in spans]
    assert names.count("redis SET") == calls["set"] >= n + 1 and names.count("redis GET") == calls["get"] >= n
    (err,) = [s for s in spans if s.name == "redis LPUSH"]
    assert err.status == "error" and err.status_code == "WRONGTYPE"
    ok = [s for s in spans if s.name in ("redis SET", "redis GET")]
    assert all(s.status == "ok" and s.kind == "SERVER" and s.duration_ns > 0 for s in ok)
    assert pipeline.stats.orphan_responses == 0 and pipeline.stats.unanswered == 0


def test_agent_command_writes_one_span_per_curl_request(tmp_path):
    import json
    import sys

    from conftest import require_bpf

    require_bpf()
    out = tmp_path / "spans.jsonl"
    with nginx(tmp_path) as (_, port):
        agent = subprocess.Popen([sys.executable, "-m", "deeptrace.cli", "agent", "--comm", "nginx", "--duration", "5",
                                  "--stats-interval", "1", "--out", str(out)], stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert "tracing name nginx" in agent.stderr.readline()
        for path in ("/hello", "/hello", "/nope"):
            subprocess.run([need("curl"), "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}{path}"], check=True)
        _, err = agent.communicate(timeout=30)
    assert agent.returncode == 0, err
    spans = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(s["kind"], s["name"], s["status_code"]) for s in spans] == [
        ("SERVER", "GET /hello", "200"), ("SERVER", "GET /hello", "200"), ("SERVER", "GET /nope", "404")]
    keys = {"trace_id", "span_id", "parent_span_id", "kind", "name", "protocol", "service", "host", "pid", "tid",
            "start_ns", "end_ns", "duration_ns", "status", "status_code", "laddr", "lport", "raddr", "rport",
            "req_size", "resp_size", "req_seq", "resp_seq", "attributes", "req_head", "resp_head"}  # fmt: skip
    assert all(keys <= set(s) for s in spans)
    assert "open connections" in err and "spans 3" in err


def test_dig_and_dnsmasq_over_udp_and_tcp(collector, store, tmp_path):
    from servers import dnsmasq

    collector.trace_comm("dig")
    with dnsmasq(tmp_path) as (pid, port):
        collector.trace(pid)
        digs = []
        for args, want in ((["web.test"], "10.1.2.3"), (["missing.test"], ""), (["web.test", "+tcp"], "10.1.2.3")):
            p = subprocess.run([need("dig"), "@127.0.0.1", "-p", str(port), "+short", "+tries=1", *args],
                               capture_output=True, text=True, check=True)  # fmt: skip
            assert p.stdout.strip() == want
            digs.append(p)
        server, _ = spans_of(store, pid, lambda rs: sum(r.direction == "egress" for r in rs) >= 3)
    server.sort(key=lambda s: s.start_ns)
    assert [(s.name, s.status, s.status_code, s.attributes["dns.answers"]) for s in server] == [
        ("DNS A web.test", "ok", "NOERROR", 1), ("DNS A missing.test", "error", "NXDOMAIN", 0),
        ("DNS A web.test", "ok", "NOERROR", 1)]  # fmt: skip
    assert [s.protocol for s in server] == ["dns"] * 3 and all(s.kind == "SERVER" for s in server)
    assert server[2].req_seq is not None and server[0].req_seq is None  # TCP has byte ranges, UDP none
    dig_tgids = {r.tgid for recs in store.by_tgid.values() for r in recs if r.comm == "dig"}
    client, _ = spans_of(store, dig_tgids, lambda rs: sum(r.direction == "ingress" for r in rs) >= 3)
    assert sorted((s.name, s.status_code) for s in client) == sorted((s.name, s.status_code) for s in server)
    assert all(s.kind == "CLIENT" for s in client)


def test_wrk_keep_alive_load_gives_one_span_per_request_nginx_served(collector, store, tmp_path):
    import re

    drops_before = sum(collector.drops().values())
    with nginx(tmp_path) as (master, port):
        workers = collector.trace(master)
        wrk = subprocess.Popen([need("wrk"), "-t1", "-c4", "-d1s", f"http://127.0.0.1:{port}/hello"],
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
        while wrk.poll() is None:  # read while it runs, as the agent does
            store.pump()
        assert int(re.search(r"(\d+) requests in", wrk.stdout.read()).group(1)) > 100
        recs = store.wait_for(workers, lambda rs: sum(r.syscall == "close" for r in rs) >= 4)
        # And whatever is still in the ring: wrk opens a new connection where one fails, so
        # four closes need not be its last four.
        spans, pipeline = spans_of(store, workers, lambda rs: False, timeout_s=0.5)
        # nginx's own count, read last: it logs a request after answering it, and the answers
        # to wrk's last requests (one per connection) can be logged after wrk has exited.
        served = len((tmp_path / "access.log").read_text().splitlines())
    assert sum(collector.drops().values()) == drops_before
    assert len(spans) == served and pipeline.stats.orphan_responses == 0
    assert {(s.name, s.status_code) for s in spans} == {("GET /hello", "200")}
    assert all(0 < s.duration_ns < 1_000_000_000 for s in spans)
    assert recs


_UDP_POINTER = """
def pointer_of(ino):  # the kernel's (hashed) address of the socket with this inode
    for line in open("/proc/net/udp").read().splitlines()[1:]:
        f = line.split()
        if int(f[9]) == ino:
            return f[11]
"""
_DIES_WITH_ITS_SOCKET_OPEN = _UDP_POINTER + """
import os, socket, sys
sys.stdin.readline()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("127.0.0.1", 9))
s.send(b"first")
print(pointer_of(os.fstat(s.fileno()).st_ino), flush=True)
sys.stdin.readline()
"""
_TAKES_ITS_PLACE = _UDP_POINTER + """
import os, socket, sys
wanted, keep = sys.argv[1], []
for _ in range(2000):  # the kernel reuses a freed socket's memory soon, most often at once
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    if pointer_of(os.fstat(s.fileno()).st_ino) == wanted:
        print("found", flush=True)
        sys.stdin.readline()
        s.sendto(b"second", ("127.0.0.1", 9))
        break
    keep.append(s)
else:
    print("not found", flush=True)
"""


def test_a_socket_where_an_unseen_freed_one_was_is_a_connection_of_its_own(collector, store):
    """A traced process killed with a socket open closes it without a close() to see, so
    the socket stays in the agent's connection table. The kernel soon gives its memory to a
    new socket; one made before tracing must not inherit the dead one's connection id and
    role (it did: a connection older than the agent came out as the dead one's client and
    was never parsed)."""
    import sys

    import pytest

    first = subprocess.Popen([sys.executable, "-c", _DIES_WITH_ITS_SOCKET_OPEN], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    collector.trace(first.pid)
    first.stdin.write("go\n")
    first.stdin.flush()
    pointer = first.stdout.readline().strip()
    (dead,) = [r for r in store.wait_for(first.pid, lambda rs: any(r.direction for r in rs)) if r.direction]
    first.kill()
    first.wait()
    second = subprocess.Popen([sys.executable, "-c", _TAKES_ITS_PLACE, pointer], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        if second.stdout.readline().strip() != "found":
            pytest.skip("the kernel gave none of 2000 new sockets the killed process's socket memory")
        collector.trace(second.pid)
        second.stdin.write("go\n")
        second.stdin.flush()
        (rec,) = [r for r in store.wait_for(second.pid, lambda rs: any(r.direction for r in rs)) if r.direction]
    finally:
        second.kill()
        second.wait()
    assert dead.role == "client" and rec.payload == b"second"
    assert rec.conn_id != dead.conn_id and rec.role == "unknown"
