"""The shop's real components from Debian packages: PostgreSQL, Redis and nginx, each run
privately (its own files in the demo's work dir, its own port) and stopped with the demo."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from demo import data
from demo.procs import Proc, StartError, children


@dataclass(frozen=True)
class Host:
    """Where components run: this machine, or a network namespace standing for another one."""

    name: str | None  # what the agent calls it on its spans (None: the machine's own name)
    addr: str  # components listen here and are reached here
    netns: str | None = None

    def argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def port(self, fixed: int) -> int:
        # A namespace of our own is empty: memorable fixed ports. Here: whatever is free.
        return fixed if self.netns else free_port(self.addr)


def free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def listening(addr: str, port: int) -> bool:
    try:
        socket.create_connection((addr, port), timeout=0.3).close()
        return True
    except OSError:
        return False


def http_ok(url: str, token: str | None = None) -> bool:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def binary(name: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if Path(p).exists()), None
    )
    if path is None:
        raise StartError(f"{name} is not installed: run `make setup` (it installs the demo's servers)")
    return path


def postgres_bindir() -> Path:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    if not versions:
        raise StartError("PostgreSQL is not installed: run `make setup`")
    return versions[-1].parent


# Trust from the loopback and the demo's own subnet only; nothing else can reach the address.
PG_HBA = """
local all all trust
host  all all samenet trust
"""


def _kept(proc: Proc) -> Proc:
    return proc


# Each start function hands its process to `started` (the launcher's clean-up) before it
# waits: a process that never gets ready is still stopped.


def postgres(host: Host, work: Path, port: int, started=_kept) -> Proc:
    bindir = postgres_bindir()
    pg = work / "postgresql"
    pg.mkdir()
    shutil.chown(pg, "postgres", "postgres")
    pg.chmod(0o700)
    # setpriv execs (runuser forks): the pid we hold is postgres itself.
    # The parent-death signal is set again after the change of user, which clears it.
    as_postgres = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--pdeathsig=TERM"]
    initdb = [str(bindir / "initdb"), "-D", str(pg / "data"), "--auth=trust", "-U", "postgres"]
    initdb += ["-E", "UTF8", "--locale=C"]
    r = subprocess.run([*as_postgres, *initdb], check=False, capture_output=True, text=True)
    if r.returncode != 0:
        raise StartError(f"initdb failed:\n{r.stdout}{r.stderr}")
    (pg / "data" / "pg_hba.conf").write_text(PG_HBA)
    settings = [
        f"listen_addresses={host.addr}",
        "fsync=off",
        "synchronous_commit=off",
        "full_page_writes=off",
    ]
    argv = [*as_postgres, str(bindir / "postgres"), "-D", str(pg / "data"), "-p", str(port), "-k", str(pg)]
    argv += [arg for setting in settings for arg in ("-c", setting)]
    # SIGINT is PostgreSQL's fast shutdown: it does not wait for clients to leave.
    proc = started(Proc("postgresql", host.argv(argv), work / "postgresql.log", stop_signal=signal.SIGINT))
    proc.wait_until(lambda: listening(host.addr, port), f"listening on {host.addr}:{port}")
    return proc


def seed_postgres(addr: str, port: int) -> None:
    import psycopg

    admin = f"host={addr} port={port} user=postgres dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("CREATE DATABASE shop")
    with psycopg.connect(f"host={addr} port={port} user=postgres dbname=shop", autocommit=True) as conn:
        conn.execute(data.SCHEMA)
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO products VALUES (%s, %s, %s, %s)", data.products())


def redis(host: Host, work: Path, port: int, started=_kept) -> Proc:
    (work / "redis").mkdir()
    argv = [binary("redis-server"), "--port", str(port), "--bind", host.addr, "--dir", str(work / "redis")]
    argv += ["--save", "", "--appendonly", "no", "--loglevel", "warning"]
    # Protected mode refuses all but loopback clients; the address is the loopback or the two-host
    # demo's private subnet.
    argv += ["--protected-mode", "no"]
    proc = started(Proc("redis", host.argv(argv), work / "redis.log"))
    proc.wait_until(lambda: listening(host.addr, port), f"listening on {host.addr}:{port}")
    return proc


NGINX_CONF = """
daemon off;
master_process on;
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {dir}/nginx-body;
    proxy_temp_path {dir}/nginx-proxy;
    fastcgi_temp_path {dir}/nginx-fastcgi;
    uwsgi_temp_path {dir}/nginx-uwsgi;
    scgi_temp_path {dir}/nginx-scgi;
    # Pooled connections to the gateway, as in most deployments: one connection carries many
    # users' requests, so nothing but timing and bytes ties a call to its request.
    upstream gateway {{
        server {gateway};
        keepalive 32;
    }}
    server {{
        listen {listen};
        location = / {{ default_type text/plain; return 200 "DeepTrace demo shop: try /api/products\\n"; }}
        location /api/ {{
            proxy_pass http://gateway/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }}
    }}
}}
"""


def nginx(host: Host, work: Path, port: int, gateway: str, workers: int = 2, started=_kept) -> Proc:
    conf = work / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(dir=work, workers=workers, listen=f"{host.addr}:{port}", gateway=gateway)
    )
    argv = [binary("nginx"), "-c", str(conf), "-e", str(work / "nginx-error.log")]
    proc = started(Proc("nginx", host.argv(argv), work / "nginx.log"))
    # Its workers are forked after it listens: wait for them, so the agent traces all of them.
    proc.wait_until(
        lambda: listening(host.addr, port) and len(children(proc.pid)) >= workers,
        f"listening on {host.addr}:{port} with {workers} workers",
    )
    return proc
