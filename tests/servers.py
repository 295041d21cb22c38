"""Real servers from Debian packages, started on free loopback ports for one test."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout_s: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port} after {timeout_s}s")


def need(binary: str) -> str:
    path = shutil.which(binary) or next((p for p in (f"/usr/sbin/{binary}", f"/usr/bin/{binary}") if Path(p).exists()), None)
    if path is None:
        pytest.fail(f"{binary} is not installed: run `make setup` (it installs the test servers)", pytrace=False)
    return path


_NGINX_CONF = """
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path {dir};
    proxy_temp_path {dir};
    fastcgi_temp_path {dir};
    uwsgi_temp_path {dir};
    scgi_temp_path {dir};
    {http}
    server {{
        listen 127.0.0.1:{port};
        {server}
    }}
}}
"""


def nginx_conf(directory, port: int, http: str = "access_log {dir}/access.log;",
               server: str = 'location /hello {{ default_type text/plain; return 200 "hello from nginx\\n"; }}') -> str:  # fmt: skip
    """One worker in the foreground, every file in `directory`; `http` and `server` are
    lines for those blocks (format fields {dir} and, in `server`, {port}; braces as in
    str.format). The default serves /hello, as the tests use it."""
    return _NGINX_CONF.format(dir=directory, port=port, http=http.format(dir=directory),
                              server=server.format(dir=directory, port=port))  # fmt: skip


@contextmanager
def serving(argv: list[str], port: int, **popen):
    """Run a server in the foreground until the test is done; yields its pid."""
    proc = subprocess.Popen(argv, **popen)
    try:
        wait_port(port)
        yield proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def nginx(tmp_path: Path, server: str | None = None, http: str | None = None):
    """nginx serving /hello, or these server-block lines, with these http-block lines (see
    nginx_conf); yields (master pid, port)."""
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_conf(tmp_path, port, **({"server": server} if server else {}), **({"http": http} if http else {})))
    with serving([need("nginx"), "-c", str(conf), "-e", str(tmp_path / "error.log")], port) as pid:
        # The master listens before it forks its worker: a test that traces the master's
        # children right away could miss the worker that will serve its requests.
        children = Path(f"/proc/{pid}/task/{pid}/children")
        deadline = time.monotonic() + 10
        while not children.read_text().split() and time.monotonic() < deadline:
            time.sleep(0.01)
        yield pid, port


@contextmanager
def redis(tmp_path: Path):
    port = free_port()
    argv = [need("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(tmp_path)]  # fmt: skip
    with serving(argv, port, stdout=subprocess.DEVNULL) as pid:
        yield pid, port


@contextmanager
def memcached(tmp_path: Path | None = None):
    """memcached on TCP only, two worker threads; yields (pid, port)."""
    port = free_port()
    argv = [need("memcached"), "-u", "nobody", "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-t", "2"]
    with serving(argv, port) as pid:
        yield pid, port


@contextmanager
def dnsmasq(tmp_path: Path, port: int | None = None):
    """A DNS server answering web.test with 10.1.2.3 and NXDOMAIN for other .test names."""
    port = port or free_port()
    argv = [need("dnsmasq"), "--no-daemon", f"--port={port}", "--listen-address=127.0.0.1", "--bind-interfaces",
            "--no-resolv", "--no-hosts", "--conf-file=/dev/null", "--pid-file=", "--local=/test/",
            "--address=/web.test/10.1.2.3"]  # fmt: skip
    with serving(argv, port, stderr=subprocess.DEVNULL) as pid:
        yield pid, port


@contextmanager
def postgres(password: str | None = None, tls: tuple[Path, Path] | None = None):
    """A throwaway PostgreSQL cluster run by the postgres user: trust authentication, or with
    a password, the cleartext `password` method over TCP (the password crosses the wire).
    tls: (certificate, key) files: `ssl = on` with them (clients choose with sslmode)."""
    import os
    import tempfile

    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if not versions:
        pytest.fail("PostgreSQL is not installed: run `make setup`", pytrace=False)
    bindir = versions[-1].parent
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="deeptrace-pg-") as d:
        shutil.chown(d, "postgres", "postgres")
        os.chmod(d, 0o700)
        as_postgres = ["runuser", "-u", "postgres", "--"]
        auth = ["--auth=trust"]
        if password is not None:
            Path(d, "pw").write_text(password + "\n")
            shutil.chown(Path(d, "pw"), "postgres", "postgres")
            auth = ["--auth-local=trust", "--auth-host=password", f"--pwfile={d}/pw"]
        subprocess.run([*as_postgres, str(bindir / "initdb"), "-D", f"{d}/data", *auth, "-U", "postgres"],
                       check=True, capture_output=True)  # fmt: skip
        argv = [*as_postgres, str(bindir / "postgres"), "-D", f"{d}/data", "-p", str(port), "-k", d,
                "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]  # fmt: skip
        if tls is not None:
            for name, src in (("server.crt", tls[0]), ("server.key", tls[1])):  # the key must be the server's, 0600
                shutil.copy(src, Path(d, name))
                shutil.chown(Path(d, name), "postgres", "postgres")
                os.chmod(Path(d, name), 0o600)
            argv += ["-c", "ssl=on", "-c", f"ssl_cert_file={d}/server.crt", "-c", f"ssl_key_file={d}/server.key"]
        with serving(argv, port, stderr=subprocess.DEVNULL) as pid:
            _until_postgres_accepts(bindir, port)
            yield pid, port


def _until_postgres_accepts(bindir: Path, port: int, timeout_s: float = 30.0) -> None:
    """PostgreSQL listens before it accepts logins ("the database system is starting up")."""
    deadline = time.monotonic() + timeout_s
    while subprocess.run([str(bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)]).returncode != 0:
        assert time.monotonic() < deadline, f"PostgreSQL on port {port} did not accept connections in {timeout_s}s"
        time.sleep(0.1)


@contextmanager
def mariadb():
    """A throwaway MariaDB server; any user may connect (grant tables skipped)."""
    import tempfile

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="deeptrace-mysql-") as d:
        subprocess.run([need("mariadb-install-db"), "--no-defaults", f"--datadir={d}/data", "--user=root",
                        "--skip-test-db"], check=True, capture_output=True)  # fmt: skip
        argv = [need("mariadbd"), "--no-defaults", f"--datadir={d}/data", f"--socket={d}/sock", f"--port={port}",
                "--bind-address=127.0.0.1", "--user=root", "--skip-grant-tables", f"--pid-file={d}/pid"]  # fmt: skip
        with serving(argv, port, stderr=subprocess.DEVNULL) as pid:
            yield pid, port


@contextmanager
def tshark_capture(path: Path, ports):
    """Capture loopback traffic on these ports into path (pcapng) while the block runs."""
    import time

    flt = " or ".join(f"port {p}" for p in ports)
    shark = subprocess.Popen([need("tshark"), "-i", "lo", "-f", flt, "-w", str(path)], stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    try:
        while "Capturing on" not in shark.stderr.readline():
            assert shark.poll() is None, "tshark did not start"
        # It says so a moment before packets are really being taken, and the last packets
        # reach dumpcap's file a moment after they were sent: 1 s each lost packets on a
        # loaded machine (a MariaDB capture one exchange short of the live spans).
        time.sleep(2)
        yield path
        time.sleep(2)
    finally:
        shark.send_signal(signal.SIGINT)  # as Ctrl-C: dumpcap writes out what it still holds
        shark.wait(10)


@contextmanager
def scripted_pair(collector, server_src: str, client_src: str, capture: Path, timeout_s: float = 60):
    """A server and a client, each a Python script: the server prints its port and is traced;
    the client gets the port as its argument, is traced, waits for a line on stdin before it
    starts and prints "done" when it is. Yields (server pid, client pid, capture file) once the
    client is done, with tshark having captured the server's port; the server is killed after."""
    import sys

    server = subprocess.Popen([sys.executable, "-c", server_src], stdout=subprocess.PIPE, text=True)
    try:
        port = server.stdout.readline().strip()
        collector.trace(server.pid)
        with tshark_capture(capture, [port]) as cap:
            client = subprocess.Popen([sys.executable, "-c", client_src, port], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)  # fmt: skip
            collector.trace(client.pid)
            assert client.communicate("go\n", timeout=timeout_s)[0].strip() == "done"
        yield server.pid, client.pid, cap
    finally:
        server.kill()
        server.wait()


def replayed_spans(path: Path) -> list:
    """What `deeptrace replay` makes of a capture (in-process: the same code path as the CLI)."""
    from deeptrace.capture import replay
    from deeptrace.capture.pipeline import SpanPipeline

    pipeline = SpanPipeline(host="pcap")
    return pipeline.push(list(replay.records(path))) + pipeline.close_all(0)


def span_key(s) -> tuple:
    """What a replayed span must share with the live one."""
    return (s.protocol, s.name, s.status, s.status_code, s.req_size, s.resp_size, s.req_seq, s.resp_seq)
