"""TLS: plaintext spans read by uprobes at real TLS libraries (OpenSSL, GnuTLS, Go's
crypto/tls), against real servers and clients we did not write, compared with the spans of
the same exchanges in plaintext, and joined to the other end by the ciphertext's TCP bytes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import require_bpf
from servers import free_port, need, nginx, postgres, serving, wait_port

from deeptrace.agent.collector import Collector, CollectorConfig
from deeptrace.agent.selection import Selection
from deeptrace.capture.pipeline import SpanPipeline
from deeptrace.capture.records import FLAG_TLS

GO_SOURCE = Path(__file__).parent / "gotls" / "main.go"
BUILD = Path(__file__).parents[1] / "build"


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("cert")
    subprocess.run([need("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", d / "key.pem",
                    "-out", d / "cert.pem", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)  # fmt: skip
    return d / "cert.pem", d / "key.pem"


@pytest.fixture(scope="module")
def gotls() -> str:
    """tests/gotls built with Debian's Go (a static binary with its own crypto/tls)."""
    out = BUILD / "gotls"
    env = {**os.environ, "GOCACHE": str(BUILD / "gocache"), "GOFLAGS": "-mod=mod", "GO111MODULE": "off"}
    subprocess.run(
        [need("go"), "build", "-o", str(out), str(GO_SOURCE)], check=True, env=env, capture_output=True
    )
    return str(out)


def spans_of(recs) -> list:
    pipeline = SpanPipeline()
    return pipeline.push(sorted(recs, key=lambda r: r.exit_ns)) + pipeline.close_all(time.time_ns())


def shape(s) -> tuple:
    """What a span of an exchange over TLS must share with the same exchange in plaintext."""
    return (s.kind, s.protocol, s.name, s.status, s.status_code, s.req_size, s.resp_size)


def run_traced(collector, argv: list[str], env: dict | None = None, store=None) -> tuple[int, str]:
    """Run a client traced from its first instruction: a shell traced first execs it. With
    `store`, the collector is polled meanwhile, as the agent does (it looks for libraries the
    process loads when polled)."""
    p = subprocess.Popen(["sh", "-c", 'read _ && exec "$@"', "sh", *argv], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    collector.trace(p.pid)
    p.stdin.write("\n")
    p.stdin.flush()
    deadline = time.monotonic() + 60
    while store is not None and p.poll() is None and time.monotonic() < deadline:
        store.pump(0.05)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    return p.pid, out


def on_port(store, port: int) -> list:
    """Every record so far of either end of a connection to `port`."""
    store.settle([], quiet_s=0.5)
    return [r for rs in store.by_tgid.values() for r in rs if port in (r.lport, r.rport) and r.direction]


def assert_tls(spans: list, library: str, kind: str | None = None) -> None:
    chosen = [s for s in spans if kind is None or s.kind == kind]
    assert chosen
    assert all(s.attributes.get("tls") is True and s.attributes.get("tls.library") == library for s in chosen)


def assert_only_plaintext_written(recs: list) -> None:
    """The connection's ciphertext is not written: every record with bytes is the library's
    plaintext (a 1-byte MSG_PEEK nginx makes to tell TLS from plain HTTP moves no bytes)."""
    data = [r for r in recs if r.size and r.exit_seq != r.enter_seq or r.flags & FLAG_TLS]
    assert data and all(r.flags & FLAG_TLS for r in data), [
        (r.syscall, r.payload[:8]) for r in data if not r.flags & FLAG_TLS
    ]


def seq_joined(spans: list) -> int:
    """Client spans whose request bytes (their ciphertext's TCP range) a server span has too,
    each the same request (a range given to the wrong span would join the wrong calls)."""
    servers = {tuple(s.req_seq): s for s in spans if s.kind == "SERVER" and s.req_seq}
    assert len(servers) == sum(s.kind == "SERVER" and bool(s.req_seq) for s in spans), "one range, two spans"
    clients = [c for c in spans if c.kind == "CLIENT" and c.req_seq]
    joined = [(c, servers[tuple(c.req_seq)]) for c in clients if tuple(c.req_seq) in servers]
    assert all(c.req_head == s.req_head for c, s in joined), "a client span joined to another request's server span"
    return len(joined)


def stream_joined(spans: list) -> int:
    """HTTP/2 client spans whose connection and stream a server span has."""

    def key(s):
        e = s.endpoint
        ends = sorted([(e.laddr, e.lport), (e.raddr, e.rport)])
        return (*ends, s.attributes.get("http2.stream_id"))

    servers = {key(s) for s in spans if s.kind == "SERVER"}
    return sum(key(s) in servers for s in spans if s.kind == "CLIENT")


# ---- nginx (OpenSSL) and curl (OpenSSL): HTTP/1.1 and HTTP/2 over TLS ----

_HELLO = 'location /hello {{{{ default_type text/plain; return 200 "hello from nginx\\n"; }}}}'
_NGINX_TLS_SERVERS = """
    server {{{{
        listen 127.0.0.1:{tls} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        HELLO
    }}}}
    server {{{{
        listen 127.0.0.1:{h2c} http2;
        HELLO
    }}}}
""".replace("HELLO", _HELLO)


@pytest.mark.parametrize("version", ["1.1", "2"])
def test_curl_and_nginx_over_tls_give_the_spans_of_plain_http(collector, store, tmp_path, cert, version):
    require_bpf()
    tls_port, h2c_port = free_port(), free_port()
    servers = _NGINX_TLS_SERVERS.format(tls=tls_port, h2c=h2c_port, cert=cert[0], key=cert[1])
    paths = ("/hello", "/missing", "/hello")
    with nginx(tmp_path, http=servers) as (master, plain_port):
        wait_port(tls_port)
        collector.trace(master)
        if version == "1.1":  # one connection for the three
            plain = [[need("curl"), "-s", "--http1.1"] + [f"http://127.0.0.1:{plain_port}{p}" for p in paths]]
            secure = [
                [need("curl"), "-sk", "--http1.1"] + [f"https://127.0.0.1:{tls_port}{p}" for p in paths]
            ]
        else:  # curl 7.88 fails to reuse a plain HTTP/2 connection (exit 16): one each
            plain = [
                [need("curl"), "-s", "--http2-prior-knowledge", f"http://127.0.0.1:{h2c_port}{p}"]
                for p in paths
            ]
            secure = [[need("curl"), "-sk", "--http2", f"https://127.0.0.1:{tls_port}{p}"] for p in paths]
        out_plain = "".join(run_traced(collector, argv)[1] for argv in plain)
        out_tls = "".join(run_traced(collector, argv)[1] for argv in secure)
        assert out_plain == out_tls and out_tls.count("hello from nginx") == 2
        assert "openssl" in collector.tls.stats.attached.values()
        plain_spans = spans_of(on_port(store, plain_port if version == "1.1" else h2c_port))
        tls_recs = on_port(store, tls_port)
    tls_spans = spans_of(tls_recs)
    assert len(plain_spans) == 6  # 3 requests, seen by curl and by nginx
    assert sorted(map(shape, tls_spans)) == sorted(map(shape, plain_spans))
    assert {s.protocol for s in tls_spans} == ({"http"} if version == "1.1" else {"http2"})
    assert_tls(tls_spans, "openssl")
    assert not any("tls" in s.attributes for s in plain_spans)
    assert_only_plaintext_written(tls_recs)
    if (
        version == "1.1"
    ):  # all but a first request nginx read ahead within the handshake (see the two-host test)
        assert seq_joined(tls_spans) >= 2
    else:
        assert stream_joined(tls_spans) == 3


def test_wget_with_gnutls_traced_by_name_from_an_agent_started_first(tmp_path, cert):
    """wget (GnuTLS) starts after the agent, traced by its name, and is gone within a second:
    an agent tracing by name attaches to the system's TLS libraries when it starts."""
    require_bpf()
    tls_port, h2c_port = free_port(), free_port()
    servers = _NGINX_TLS_SERVERS.format(tls=tls_port, h2c=h2c_port, cert=cert[0], key=cert[1])
    with Collector(CollectorConfig(selection=Selection(comms=["wget"]))) as own, \
            nginx(tmp_path, http=servers) as (master, _):  # fmt: skip
        wait_port(tls_port)
        assert "gnutls" in own.tls.stats.attached.values()
        own.trace(master)
        urls = [f"https://127.0.0.1:{tls_port}/hello"] * 2
        out = subprocess.run([need("wget"), "-q", "-O", "-", "--no-check-certificate", *urls], capture_output=True,
                             text=True, check=True)  # fmt: skip
        assert out.stdout.count("hello from nginx") == 2
        recs, deadline = [], time.monotonic() + 5
        while time.monotonic() < deadline and sum(r.flags & FLAG_TLS > 0 for r in recs) < 8:
            recs += own.poll(0.1)
    spans = spans_of([r for r in recs if r.direction])
    assert sorted((s.kind, s.name, s.status_code) for s in spans) == [("CLIENT", "GET /hello", "200")] * 2 + [
        ("SERVER", "GET /hello", "200")] * 2  # fmt: skip
    assert_tls(spans, "gnutls", "CLIENT")
    assert_tls(spans, "openssl", "SERVER")
    assert seq_joined(spans) == 2


# ---- Python's ssl module (OpenSSL, SSL_read_ex/SSL_write_ex), loaded after tracing began ----

_PY_SERVER = r"""
import socket, sys
tls = sys.argv[1] == "tls"
ls = socket.create_server(("127.0.0.1", 0))
print(ls.getsockname()[1], flush=True)
sys.stdin.readline()
if tls:  # the ssl module, and with it libssl, is loaded only now: after the agent traced this process
    import ssl, time
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[2], sys.argv[3])
    print("loaded", flush=True)
    sys.stdin.readline()
conn, _ = ls.accept()
if tls:
    conn = ctx.wrap_socket(conn, server_side=True)
buf = b""
while True:
    data = conn.recv(65536)
    if not data:
        break
    buf += data
    while b"\r\n\r\n" in buf:
        head, buf = buf.split(b"\r\n\r\n", 1)
        body = b"missing" if b" /missing " in head else b"hello"
        status = b"404 Not Found" if body == b"missing" else b"200 OK"
        conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
"""

_PY_CLIENT = r"""
import socket, sys
port, tls = int(sys.argv[1]), sys.argv[2] == "tls"
sys.stdin.readline()
sock = socket.create_connection(("127.0.0.1", port))
if tls:
    import ssl
    ctx = ssl.create_default_context(cafile=sys.argv[3])
    sock = ctx.wrap_socket(sock, server_hostname="localhost")
for path in ("/a/1", "/missing", "/a/2"):
    sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
    got = b""
    while b"\r\n\r\n" not in got or not (got.endswith(b"hello") or got.endswith(b"missing")):
        got += sock.recv(65536)
sock.close()
print("done", flush=True)
"""


def _python_pair(collector, store, mode: str, cert) -> list:
    server = subprocess.Popen([sys.executable, "-c", _PY_SERVER, mode, str(cert[0]), str(cert[1])],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        port = int(server.stdout.readline())
        collector.trace(server.pid)
        server.stdin.write("go\n")
        server.stdin.flush()
        if mode == "tls":
            assert server.stdout.readline().strip() == "loaded"
            # The agent reads a young process's maps at each refresh (1 s) and attaches to new libraries.
            deadline = time.monotonic() + 5
            while "openssl" not in collector.tls.stats.attached.values() and time.monotonic() < deadline:
                store.pump(0.1)
            server.stdin.write("go\n")
            server.stdin.flush()
        client = subprocess.Popen([sys.executable, "-c", _PY_CLIENT, str(port), mode, str(cert[0])],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        collector.trace(client.pid)
        assert client.communicate("go\n", timeout=30)[0].strip() == "done"
        return on_port(store, port)
    finally:
        server.kill()
        server.wait()


def test_python_ssl_client_and_server_give_the_spans_of_plain_sockets(collector, store, cert):
    require_bpf()
    plain = spans_of(_python_pair(collector, store, "plain", cert))
    tls = spans_of(recs := _python_pair(collector, store, "tls", cert))
    assert len(plain) == 6
    assert sorted(map(shape, tls)) == sorted(map(shape, plain))
    assert {r.syscall for r in recs if r.flags & FLAG_TLS} == {"ssl_read", "ssl_write"}
    assert_tls(tls, "openssl")
    assert_only_plaintext_written(recs)
    assert seq_joined(tls) == 3


# ---- Go's crypto/tls (net/http: HTTP/1.1, HTTP/2, gRPC's wire format) ----


def _go_server(gotls: str, collector, plain: bool = False, env: dict | None = None):
    port = free_port()
    argv = [gotls, "server", str(port)] + (["plain"] if plain else [])
    return port, serving(argv, port, env=env)


@pytest.mark.parametrize("version", ["h1", "h2"])
def test_go_net_http_over_tls(collector, store, gotls, version):
    require_bpf()
    port, server = _go_server(gotls, collector)
    plain_port, plain_server = _go_server(gotls, collector, plain=True)
    with server as pid, plain_server as plain_pid:
        collector.trace(pid)
        collector.trace(plain_pid)
        assert "go" in collector.tls.stats.attached.values()
        _, out = run_traced(collector, [gotls, "client", f"https://127.0.0.1:{port}/hello", "3", version])
        assert out.count("200 hello over HTTP/" + ("1.1" if version == "h1" else "2.0")) == 3
        if version == "h1":
            run_traced(collector, [gotls, "client", f"http://127.0.0.1:{plain_port}/hello", "3", "h1"])
        recs, plain_recs = on_port(store, port), on_port(store, plain_port)
    spans = spans_of(recs)
    assert sorted((s.kind, s.name, s.status_code) for s in spans) == [("CLIENT", "GET /hello", "200")] * 3 + [
        ("SERVER", "GET /hello", "200")] * 3  # fmt: skip
    assert_tls(spans, "go")
    assert_only_plaintext_written(recs)
    if version == "h1":
        # The server's handshake may read the first request along with the client's Finished:
        # its Read moves no ciphertext, so that span has no range to join on (README).
        assert seq_joined(spans) >= 2
        # Go writes a Date header: the sizes are the same, the bytes are not.
        assert sorted(map(shape, spans)) == sorted(map(shape, spans_of(plain_recs)))
    else:
        assert {s.protocol for s in spans} == {"http2"} and stream_joined(spans) == 3


def test_grpc_over_tls_from_go_and_from_grpcio(collector, store, gotls, tmp_path):
    """gRPC's wire format over Go's HTTP/2 and crypto/tls; the calls come from a Go client
    (traced: joined by stream) and from grpcio, a real gRPC client (its BoringSSL is linked in
    statically, which the agent does not cover: only the Go server's side is read)."""
    require_bpf()
    import grpc

    cert_out = tmp_path / "go-cert.pem"
    port, server = _go_server(gotls, collector, env={**os.environ, "GOTLS_CERT_OUT": str(cert_out)})
    with server as pid:
        collector.trace(pid)
        _, out = run_traced(collector, [gotls, "grpc", f"https://127.0.0.1:{port}", "3"])
        assert out.split("\n")[:3] == ["grpc-status 0", "grpc-status 0", "grpc-status 5"]
        creds = grpc.ssl_channel_credentials(root_certificates=cert_out.read_bytes())
        with grpc.secure_channel(
            f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", "localhost")]
        ) as ch:
            call = ch.unary_unary("/demo.Greeter/SayHello")
            assert call(b"hi", timeout=10) == b"hi"
            with pytest.raises(grpc.RpcError) as failed:
                call(b"fail", timeout=10)
            assert failed.value.code() == grpc.StatusCode.NOT_FOUND
        recs = on_port(store, port)
    spans = spans_of(recs)
    assert {s.attributes.get("rpc.system") for s in spans} == {"grpc"}
    servers = [s for s in spans if s.kind == "SERVER"]
    assert sorted((s.name, s.status_code) for s in servers) == sorted(
        [("grpc demo.Greeter/SayHello", "OK")] * 3 + [("grpc demo.Greeter/SayHello", "NOT_FOUND")] * 2
    )
    assert len([s for s in spans if s.kind == "CLIENT"]) == 3 and stream_joined(spans) == 3
    assert_tls(spans, "go")


# ---- databases over TLS: PostgreSQL (libpq and the server, OpenSSL) and Redis ----


_PSYCOPG_CLIENT = """
import sys, time, psycopg
time.sleep(2)
with psycopg.connect(host="127.0.0.1", port=int(sys.argv[1]), user="postgres", dbname="postgres") as conn:
    print(conn.execute("select 42").fetchone()[0])
"""


def test_postgres_with_ssl_gives_the_spans_of_plain_connections(collector, store, cert):
    require_bpf()
    with postgres(tls=cert) as (pid, port):
        base = ["-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
        subprocess.run(
            [need("pgbench"), *base, "-i", "-s", "1", "-q", "postgres"], check=True, capture_output=True
        )
        collector.trace(pid)  # backends are forked from here
        by_mode = {}
        for mode in ("disable", "require"):
            env = {**os.environ, "PGSSLMODE": mode}
            before = {id(r) for r in on_port(store, port)}
            run_traced(collector, [need("pgbench"), *base, "-M", "prepared", "-S", "-c", "2", "-t", "20", "-n",
                                   "postgres"], env=env)  # fmt: skip
            _, out = run_traced(collector, [need("psql"), *base, "-X", "-A", "-t", "-c",
                                            "select count(*) from pgbench_branches", "postgres"], env=env)  # fmt: skip
            assert out.strip() == "1"
            # psycopg's wheel bundles its own libssl (libssl-<hash>.so.3), mapped when it is
            # imported; the agent finds it at its next look at the process's maps (1 s).
            _, out = run_traced(
                collector, [sys.executable, "-c", _PSYCOPG_CLIENT, str(port)], env=env, store=store
            )
            assert out.strip() == "42"
            by_mode[mode] = [r for r in on_port(store, port) if id(r) not in before]
    plain, tls = spans_of(by_mode["disable"]), spans_of(by_mode["require"])
    names = [s.name for s in tls if s.kind == "SERVER"]
    assert names.count("SELECT pgbench_accounts") == 40 and "SELECT pgbench_branches" in names
    assert "SELECT" in names  # psycopg's select 42
    # pgbench picks random account ids: the sizes differ, the exchanges do not.
    assert Counter(s[:5] for s in map(shape, tls)) == Counter(s[:5] for s in map(shape, plain))
    assert_tls(tls, "openssl")
    assert_only_plaintext_written([r for r in by_mode["require"] if r.flags & FLAG_TLS or r.exit_ns > 0 and
                                   not r.payload.startswith((b"\x00\x00\x00\x08\x04\xd2\x16\x2f", b"S"))])  # fmt: skip
    assert seq_joined(tls) == len([s for s in tls if s.kind == "SERVER"])


def test_redis_over_tls(collector, store, tmp_path, cert):
    require_bpf()
    port, tls_port = free_port(), free_port()
    argv = [need("redis-server"), "--port", str(port), "--tls-port", str(tls_port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(cert[0]), "--tls-key-file", str(cert[1]), "--tls-ca-cert-file", str(cert[0]),
            "--tls-auth-clients", "no", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]  # fmt: skip
    with serving(argv, tls_port, stdout=subprocess.DEVNULL) as pid:
        collector.trace(pid)
        for p, extra in ((port, []), (tls_port, ["--tls", "--cacert", str(cert[0])])):
            cli = [need("redis-cli"), "-h", "127.0.0.1", "-p", str(p), *extra]
            assert run_traced(collector, [*cli, "SET", "user:42", "alice"])[1] == "OK\n"
            assert run_traced(collector, [*cli, "GET", "user:42"])[1] == "alice\n"
        plain, recs = spans_of(on_port(store, port)), on_port(store, tls_port)
    tls = spans_of(recs)
    assert sorted(s.name for s in tls if s.kind == "SERVER") == ["redis GET", "redis SET"]
    assert sorted(map(shape, tls)) == sorted(map(shape, plain))
    assert_tls(tls, "openssl")
    assert_only_plaintext_written(recs)
    assert seq_joined(tls) == len([s for s in tls if s.kind == "SERVER"]) >= 2


# ---- two hosts, an agent each: the client's TLS span and the server's are seq-joined ----


def test_seq_join_over_tls_across_two_namespaces_with_an_agent_each(tmp_path, cert):
    require_bpf()
    from servers import nginx_conf
    from test_association_live import B_ADDR, _agent, _spans, associated, stop, two_hosts, wait_listening

    conf = tmp_path / "nginx.conf"
    https = f"server {{{{ listen {B_ADDR}:8643 ssl http2; ssl_certificate {cert[0]}; ssl_certificate_key {cert[1]}; " \
            + _HELLO.format() + " }}"  # fmt: skip
    conf.write_text(nginx_conf(tmp_path, free_port(), http=https))
    with two_hosts() as (in_a, in_b):
        server = subprocess.Popen([*in_b, need("nginx"), "-c", str(conf), "-e", str(tmp_path / "error.log")])
        try:
            wait_listening(in_b, B_ADDR, 8643)
            assert server.poll() is None, (tmp_path / "error.log").read_text()
            agent_b = _agent(tmp_path / "b.jsonl", "--pid", str(server.pid), "--host", "host-b")
            agent_a = _agent(tmp_path / "a.jsonl", "--comm", "curl", "--host", "host-a")
            for version in ("--http1.1", "--http1.1", "--http2"):
                subprocess.run([*in_a, need("curl"), "-sk", "-o", "/dev/null", version,
                                f"https://{B_ADDR}:8643/hello"], check=True)  # fmt: skip
            time.sleep(1)
            stop(agent_a, agent_b)
        finally:
            server.terminate()
            server.wait()
    a, b = _spans(tmp_path / "a.jsonl"), _spans(tmp_path / "b.jsonl")
    assert [(d["kind"], d["attributes"].get("tls")) for d in a] == [("CLIENT", True)] * 3
    assert [(d["kind"], d["attributes"].get("tls")) for d in b] == [("SERVER", True)] * 3
    linked = associated(tmp_path, a + b)
    servers = [d for d in linked.values() if d["kind"] == "SERVER"]
    # A first request that nginx's OpenSSL read ahead within the handshake is returned by an
    # SSL_read that moves no ciphertext: its range is empty, at the record's end, and it is not
    # seq-joined (README, limitations). How often depends on timing; the others must be.
    joined = [d for d in servers if d["link_method"] == "seq-join"]
    read_ahead = [d for d in servers if d["link_method"] != "seq-join"]
    assert len(joined) >= 2, [
        (d["name"], d.get("req_seq"), d["attributes"].get("http2.stream_id")) for d in a + b
    ]
    assert all(d["req_seq"] is None or d["req_seq"][0] not in {c["req_seq"][0] for c in a if c["req_seq"]}
               for d in read_ahead)  # fmt: skip
    for s in joined:
        c = linked[s["parent_span_id"]]
        assert c["host"] == "host-a" and c["trace_id"] == s["trace_id"] and c["name"] == s["name"]


# ---- attaching and letting go ----


def test_a_library_is_attached_while_a_traced_process_maps_it_and_let_go_after(collector):
    require_bpf()
    from deeptrace.agent.tls import library_targets

    proc = subprocess.Popen([sys.executable, "-c", "import ssl, sys; print(1, flush=True); sys.stdin.read()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        proc.stdout.readline()
        (target,) = library_targets(proc.pid)
        assert target.library == "openssl" and target.path.startswith(f"/proc/{proc.pid}/root/")
        assert os.path.basename(target.name).startswith("libssl.so")
        collector.tls.sync({proc.pid}, time.monotonic())
        assert collector.tls.stats.attached == {target.name: "openssl"} and not collector.tls.stats.errors
    finally:
        proc.kill()
        proc.wait()
    collector.tls.sync(set(), time.monotonic())
    assert collector.tls.stats.attached == {} and collector.tls.stats.probes == 0
    collector.refresh()  # back to what the traced processes map


def test_go_functions_and_their_returns_are_found_only_in_go_programs(gotls):
    import capstone

    from deeptrace.agent.tls import go_tls_functions

    assert go_tls_functions(sys.executable) is None and go_tls_functions(need("nginx")) is None
    found = go_tls_functions(gotls)
    assert set(found) == {"crypto/tls.(*Conn).Read", "crypto/tls.(*Conn).Write"}
    with open(gotls, "rb") as f:
        data = f.read()
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    for fn in found.values():
        assert fn.returns and all(fn.offset < r < fn.offset + 65536 for r in fn.returns)
        for r in fn.returns:  # each is a whole RET instruction where the file has one
            (insn,) = md.disasm(data[r : r + 1], 0)
            assert insn.mnemonic == "ret"


_PY_BOTH_ENDS = r"""
import socket, ssl, sys, threading
srv_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
srv_ctx.load_cert_chain(sys.argv[1], sys.argv[2])
ls = socket.create_server(("127.0.0.1", 0))

def serve():
    conn = srv_ctx.wrap_socket(ls.accept()[0], server_side=True)
    while data := conn.recv(65536):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

threading.Thread(target=serve, daemon=True).start()
cli = ssl.create_default_context(cafile=sys.argv[1]).wrap_socket(
    socket.create_connection(ls.getsockname()), server_hostname="localhost")
def ask(path):
    cli.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
    got = b""
    while not got.endswith(b"ok"):
        got += cli.recv(65536)
ask(b"/before")
print(ls.getsockname()[1], flush=True)
sys.stdin.readline()  # traced from here: the connection and its handshake are older
ask(b"/after/1")
ask(b"/after/2")
print("done", flush=True)
"""


def test_a_tls_connection_older_than_the_tracing(collector, store, cert):
    """Traced after its handshake: the first calls find their socket by the syscalls inside them.
    The server's SSL_read that was already waiting when tracing began is not seen (its entry
    was not probed): that request has only its client span."""
    require_bpf()
    proc = subprocess.Popen([sys.executable, "-c", _PY_BOTH_ENDS, str(cert[0]), str(cert[1])],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        port = int(proc.stdout.readline())
        collector.trace(proc.pid)
        assert proc.communicate("go\n", timeout=30)[0].strip() == "done"
    finally:
        proc.kill()
        proc.wait()
    spans = spans_of(on_port(store, port))
    assert sorted((s.kind, s.name, s.status_code) for s in spans) == [("CLIENT", "GET /after/{id}", "200")] * 2 + [
        ("SERVER", "GET /after/{id}", "200")]  # fmt: skip
    assert_tls(spans, "openssl")
    assert seq_joined(spans) == 1


def test_plaintext_that_starts_like_a_tls_record_is_still_written(collector, store):
    """A MySQL packet of 0x000316 bytes whose sequence number is 0 and whose command is 0x17
    (COM_STMT_EXECUTE) of statement 1 begins 16 03 00 00 17 01: not a TLS handshake."""
    require_bpf()
    code = r"""
import socket, sys
ls = socket.create_server(("127.0.0.1", 0))
c = socket.create_connection(ls.getsockname())
s, _ = ls.accept()
print(ls.getsockname()[1], flush=True)
sys.stdin.readline()
packet = bytes([0x16, 0x03, 0x00, 0x00, 0x17, 0x01, 0x00, 0x00, 0x00, 0x00, 0x01]) + bytes(0x316 - 7)
c.sendall(packet)
got = b""
while len(got) < len(packet):
    got += s.recv(65536)
print("done", flush=True)
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    port = int(proc.stdout.readline())
    collector.trace(proc.pid)
    assert proc.communicate("go\n", timeout=30)[0].strip() == "done"
    recs = store.wait_for(proc.pid, lambda rs: sum(r.size for r in rs if r.direction == "ingress") >= 0x31A)
    data = [r for r in recs if r.direction and port in (r.lport, r.rport)]
    assert sum(r.size for r in data if r.direction == "egress") == 0x31A
    assert data[0].payload.startswith(bytes([0x16, 0x03, 0x00, 0x00, 0x17, 0x01]))
