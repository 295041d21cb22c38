"""Real servers and clients from Debian packages, traced by pid."""

from __future__ import annotations

import subprocess

from servers import need, nginx, redis


def test_curl_against_nginx_traced_by_master_pid(collector, store, tmp_path):
    with nginx(tmp_path) as (master, port):
        workers = collector.trace(master)  # with the workers it already forked
        assert len(workers) == 2
        out = subprocess.run([need("curl"), "-s", f"http://127.0.0.1:{port}/hello"], capture_output=True, check=True)
        assert out.stdout == b"hello from nginx\n"
        recs = store.wait_for(workers, lambda rs: any(r.direction == "egress" for r in rs))
        req = next(r for r in recs if r.direction == "ingress")
        resp = next(r for r in recs if r.direction == "egress")
        assert req.payload.startswith(b"GET /hello HTTP/1.1\r\n")
        assert resp.payload.startswith(b"HTTP/1.1 200 OK\r\n")
        assert resp.payload.endswith(b"hello from nginx\n")
        for r in (req, resp):
            assert r.comm == "nginx" and r.tgid != master  # a worker served it
            assert (r.laddr, r.lport, r.raddr) == ("127.0.0.1", port, "127.0.0.1")
            assert r.l4 == "tcp" and r.role == "server"
        assert req.conn_id == resp.conn_id and req.rport == resp.rport
        assert resp.enter_ns >= req.exit_ns


def test_redis_cli_against_redis_server(collector, store, tmp_path):
    with redis(tmp_path) as (pid, port):
        collector.trace(pid)
        cli = [need("redis-cli"), "-p", str(port)]
        assert subprocess.run([*cli, "SET", "user:42", "alice"], capture_output=True, check=True).stdout == b"OK\n"
        assert subprocess.run([*cli, "GET", "user:42"], capture_output=True, check=True).stdout == b"alice\n"
        recs = store.wait_for(pid, lambda rs: sum(r.direction == "egress" for r in rs) >= 2)
        reads = [r.payload for r in recs if r.direction == "ingress"]
        writes = [r.payload for r in recs if r.direction == "egress"]
        assert b"*3\r\n$3\r\nSET\r\n$7\r\nuser:42\r\n$5\r\nalice\r\n" in reads
        assert b"*2\r\n$3\r\nGET\r\n$7\r\nuser:42\r\n" in reads
        assert b"+OK\r\n" in writes and b"$5\r\nalice\r\n" in writes
        assert all(r.lport == port and r.comm.startswith("redis") for r in recs if r.direction)
