"""The one-command demo: the shop, the DeepTrace server, an agent tracing the shop, traffic.

    python -m demo.launch [--seconds N] [--rate R] [--seed S] [--mix ...] [--listen HOST:PORT]
                          [--two-hosts | --cluster] [--keep-work-dir]

Starts, each waited for: PostgreSQL and Redis (seeded, private, in a temp dir), the services
(catalog, cart, checkout, gateway), nginx in front, `deeptrace server`, `deeptrace agent`
tracing nginx and the services by pid, and the traffic. Prints the UI's address and runs until
Ctrl-C, SIGTERM or --seconds; then stops everything in reverse order and removes its files.
With --two-hosts the front half (nginx, gateway) runs in one network namespace and the back
half in another, each with its own agent, the server in between (demo/netns.py).
With --cluster, as --two-hosts but with two servers sharing one ClickHouse store (a private
clickhouse-server in the temp dir, demo/clickhouse.py): hostA's agent ships to the first,
hostB's to the second, and either server shows every trace whole.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from demo import callgraph, clickhouse, infra, netns
from demo.infra import Host
from demo.procs import Proc, StartError, children
from demo.traffic import DEFAULT_MIX, parse_mix

ROOT = Path(__file__).resolve().parents[1]
# Ports in the two-host demo's namespaces (empty, so always free); here, free ones are picked.
PORTS = {
    "nginx": 8080,
    "gateway": 8001,
    "catalog": 8002,
    "cart": 8003,
    "checkout": 8004,
    "postgresql": 5432,
    "redis": 6379,
}
BACKENDS = ("catalog", "cart", "checkout")  # started before the gateway, which calls them
SERVER_PORT = 8700


class Stop(Exception):
    """SIGINT, SIGTERM or SIGHUP: stop everything, cleanly."""


def _on_signal(signum, frame) -> None:
    # Once stopping, further signals must not interrupt the clean-up itself.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    raise Stop(signal.Signals(signum).name)


def say(text: str = "", end: str = "\n") -> None:
    print(text, end=end, flush=True)


def deeptrace(*args: str) -> list[str]:
    return [sys.executable, "-m", "deeptrace.cli", *args]


class Demo:
    def __init__(self, args: argparse.Namespace, stack: ExitStack) -> None:
        self.args, self.stack = args, stack
        self.procs: dict[str, Proc] = {}
        self.work = Path(tempfile.mkdtemp(prefix="deeptrace-demo-"))
        self.work.chmod(0o711)  # postgres (its own user) needs to pass through to its directory
        if not args.keep_work_dir:
            stack.callback(shutil.rmtree, self.work, ignore_errors=True)
        self.token = secrets.token_urlsafe(18)
        if args.two_hosts:
            self.front, self.back, self.server_addr = stack.enter_context(netns.two_hosts())
        else:
            self.front = self.back = Host(None, "127.0.0.1")
            self.server_addr = args.listen.rpartition(":")[0] or "127.0.0.1"
        self.hosts = {
            name: self.front if name in callgraph.FRONT else self.back
            for name in (*callgraph.SERVICES, *callgraph.DATASTORES)
        }
        self.ports = {name: self.hosts[name].port(fixed) for name, fixed in PORTS.items()}

    # -- helpers

    def where(self, name: str) -> str:
        return f"{self.hosts[name].addr}:{self.ports[name]}"

    def url(self, name: str) -> str:
        return f"http://{self.where(name)}"

    @contextmanager
    def step(self, what: str):
        say(f"demo: {what} ...", end="")
        t0 = time.monotonic()
        try:
            yield
        except Stop:
            say(" interrupted")
            raise
        except BaseException:
            say(" failed")
            raise
        say(f" ready ({time.monotonic() - t0:.1f}s)")

    def started(self, proc: Proc, stop_timeout_s: float = 10.0) -> Proc:
        """Remembered, and stopped when the demo ends (ExitStack: in reverse order of start)."""
        self.procs[proc.name] = proc
        self.stack.callback(self._stop, proc, stop_timeout_s)
        return proc

    def _stop(self, proc: Proc, timeout_s: float) -> None:
        t0 = time.monotonic()
        proc.stop(timeout_s)
        if time.monotonic() - t0 > 3:
            say(f"demo: {proc.name} took {time.monotonic() - t0:.0f}s to stop")

    def spawn(
        self,
        name: str,
        argv: list[str],
        host: Host | None = None,
        env: dict | None = None,
        stop_timeout_s: float = 10.0,
    ) -> Proc:
        argv = host.argv(argv) if host else argv
        return self.started(Proc(name, argv, self.work / f"{name}.log", env=env, cwd=ROOT), stop_timeout_s)

    def service_env(self, name: str) -> dict:
        back = self.back.addr
        return {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "OTEL_SERVICE_NAME": name,
            "SHOP_LISTEN": self.where(name),
            **{f"{s.upper()}_URL": self.url(s) for s in BACKENDS},
            "DATABASE_URL": f"postgresql://postgres@{back}:{self.ports['postgresql']}/shop",
            "REDIS_URL": f"redis://{back}:{self.ports['redis']}/0",
        }

    # -- the steps

    def datastores(self) -> None:
        with self.step(f"postgresql on {self.where('postgresql')}"):
            infra.postgres(self.hosts["postgresql"], self.work, self.ports["postgresql"], self.started)
            infra.seed_postgres(self.back.addr, self.ports["postgresql"])
        with self.step(f"redis on {self.where('redis')}"):
            infra.redis(self.hosts["redis"], self.work, self.ports["redis"], self.started)

    def services(self) -> None:
        for name in (*BACKENDS, "gateway"):
            with self.step(f"{name} on {self.where(name)}"):
                self.service(name)
        with self.step(f"nginx on {self.where('nginx')}"):
            gateway = self.where("gateway")
            infra.nginx(self.hosts["nginx"], self.work, self.ports["nginx"], gateway, started=self.started)

    def service(self, name: str) -> None:
        proc = self.spawn(
            name, [sys.executable, "-m", f"demo.services.{name}"], self.hosts[name], self.service_env(name)
        )
        proc.wait_until(lambda: infra.http_ok(f"{self.url(name)}/health"), "answering /health")
        if name == "catalog":  # gunicorn's workers, all of them, before the agent starts
            proc.wait_until(lambda: len(children(proc.pid)) >= 2, "its 2 workers")

    def server_port(self, port: int, taken: tuple[int, ...] = ()) -> int:
        if port in taken or infra.listening(self.server_addr, port):
            free = infra.free_port(self.server_addr)
            say(f"demo: port {port} is taken on {self.server_addr}; the server gets {free}")
            port = free
        return port

    def server(self) -> None:
        """One server on an embedded store; with --cluster, ClickHouse, then two servers on it."""
        port = self.server_port(int(self.args.listen.rpartition(":")[2]))
        if not self.args.cluster:
            self.server_urls = [
                self.one_server("server", port, ["--db", str(self.work / "deeptrace.duckdb")])
            ]
            return
        here = Host(None, "127.0.0.1")  # the root namespace, where the servers run
        ports: set[int] = set()
        while len(ports) < 3:  # native, HTTP, interserver: free, and not the same one twice
            ports.add(infra.free_port(here.addr))
        tcp, http, interserver = sorted(ports)
        with self.step(f"clickhouse-server on {here.addr}:{tcp} (native), :{http} (HTTP)"):
            clickhouse.clickhouse(here, self.work, tcp, http, interserver, self.started)
        self.store_url = clickhouse.store_url(here, tcp)
        self.clickhouse_ports = (tcp, http)
        second = self.server_port(port + 1, taken=(port,))
        self.server_urls = [
            self.one_server(f"server-{i}", p, ["--store", self.store_url])
            for i, p in enumerate((port, second), start=1)
        ]

    def one_server(self, name: str, port: int, store: list[str]) -> str:
        url = f"http://{self.server_addr}:{port}"
        with self.step(f"deeptrace {name} on {self.server_addr}:{port}"):
            env = {**os.environ, "DEEPTRACE_TOKEN": self.token}  # not on the command line, where ps shows it
            argv = deeptrace("server", "--listen", f"{self.server_addr}:{port}", *store)
            proc = self.spawn(name, argv, env=env)
            proc.wait_until(lambda: infra.http_ok(f"{url}/api/v1/status", self.token), "answering")
        return url

    def agents(self) -> None:
        hosts = [self.front, self.back] if self.args.two_hosts else [self.front]
        for i, host in enumerate(hosts):
            traced = [s for s in callgraph.SERVICES if self.hosts[s] is host]
            pids = [arg for s in traced for arg in ("--pid", str(self.procs[s].pid))]
            name = f"agent-{host.name}" if host.name else "agent"
            # With two servers, each agent ships to its own: hostA's to the first, hostB's to the second.
            server_url = self.server_urls[i % len(self.server_urls)]
            to = f", shipping to {server_url}" if len(self.server_urls) > 1 else ""
            with self.step(
                f"deeptrace agent{' on ' + host.name if host.name else ''} tracing {' '.join(traced)}{to}"
            ):
                self.agent(name, host, pids, server_url)

    def agent(self, name: str, host: Host, pids: list[str], server_url: str) -> None:
        spool, named = str(self.work / f"spool-{name}"), ["--host", host.name] if host.name else []
        argv = deeptrace("agent", *pids, "--server", server_url, "--spool-dir", spool, "--capture", "4096")
        argv += named
        env = {**os.environ, "DEEPTRACE_TOKEN": self.token}  # as --token, but out of sight of ps
        # Stopped before the server: it sends what it still holds first.
        proc = self.spawn(name, argv, host, env, stop_timeout_s=30)
        tracing = re.compile(r"^deeptrace: tracing ", re.MULTILINE)
        proc.wait_until(lambda: tracing.search(proc.log.read_text(errors="replace")), "tracing", 60)

    def traffic(self) -> None:
        with self.step("a first request through nginx"):
            nginx = self.procs["nginx"]
            hint = (
                "; can hostA reach hostB? a firewall on bridged traffic (br_netfilter) stops it"
                if self.args.two_hosts
                else ""
            )
            nginx.wait_until(
                lambda: infra.http_ok(f"{self.url('nginx')}/api/products"),
                f"a 200 for /api/products (see also gateway.log and catalog.log{hint})",
                15,
            )
        mix = ",".join(f"{k}={v:g}" for k, v in self.args.mix.items())
        argv = [sys.executable, "-m", "demo.traffic", "--url", self.url("nginx"), "--mix", mix]
        argv += ["--rate", f"{self.args.rate:g}"]
        argv += ["--seed", str(self.args.seed)] if self.args.seed is not None else []
        self.spawn("traffic", argv, stop_timeout_s=15)
        say(f"demo: traffic at ~{self.args.rate:g} requests/s ({mix})")

    def banner(self) -> None:
        p = self.procs
        say()
        for url in self.server_urls:
            say(f"DeepTrace UI: {url}/")
        say()
        say(f"  shop      {self.url('nginx')}/api/products   (nginx in front; see demo/callgraph.py)")
        for host in [self.front, self.back] if self.args.two_hosts else [self.front]:
            here = [n for n in (*callgraph.SERVICES, *callgraph.DATASTORES) if self.hosts[n] is host]
            where = f" {host.addr} (netns {host.netns}):" if host.netns else ""
            say(
                f"  {host.name or socket.gethostname():9}{where} "
                + " ".join(f"{n}[{p[n].pid}]" for n in here)
            )
        if self.args.cluster:
            tcp, http = self.clickhouse_ports
            say(
                f"  store     clickhouse-server[{p['clickhouse-server'].pid}] on 127.0.0.1:{tcp} "
                f"(HTTP :{http}), {self.store_url}"
            )
            servers = ", ".join(
                f"{n}[{p[n].pid}] {u}/" for n, u in zip(("server-1", "server-2"), self.server_urls)
            )
            say(f"  servers   {servers}; token {self.token}")
            say("            (one store: either UI shows every trace, whichever server its agent ships to)")
        else:
            say(f"  server    deeptrace server[{p['server'].pid}], token {self.token}")
        for name in (n for n in p if n.startswith("agent")):
            say(f"  {name:9} deeptrace agent[{p[name].pid}]")
        say(f"  traffic   demo.traffic[{p['traffic'].pid}]")
        say(f"  logs      {self.work}/")
        say()
        say(f"Running for {self.args.seconds:g}s." if self.args.seconds else "Running until Ctrl-C.")

    def run(self) -> None:
        deadline = time.monotonic() + self.args.seconds if self.args.seconds else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.5)
            for proc in self.procs.values():
                if not proc.running():
                    raise proc.failed(f"stopped unexpectedly (status {proc.popen.returncode})")

    def stop_traffic(self) -> None:
        """Traffic first, so its summary can be shown; the rest stops with the stack."""
        proc = self.procs.get("traffic")
        if proc is not None:
            proc.stop(15)
            last = proc.log.read_text(errors="replace").strip().splitlines()[-1:]
            if last:
                say(f"demo: {last[0]}")


def check_preconditions(two_hosts: bool, cluster: bool = False) -> str | None:
    if os.geteuid() != 0:
        return "the demo needs root (the agent loads eBPF programs): sudo make demo"
    from deeptrace.agent.collector import bpf_object_path
    from deeptrace.cli import main as cli

    obj = bpf_object_path()
    if not obj.exists():
        return f"the BPF object {obj} is not built: run `make setup` (or `make bpf`)"
    if "server" not in cli.commands:
        return "this deeptrace has no `server` command yet"
    for module in ("aiohttp", "fastapi", "flask", "gunicorn", "psycopg", "psycopg_pool", "redis", "uvicorn"):
        if importlib.util.find_spec(module) is None:
            return f"the demo's services need the Python package {module}: run `make setup`"
    tools = ("nginx", "redis-server", "setpriv", *(["ip"] if two_hosts else []))
    for tool in (*tools, *(["clickhouse-server"] if cluster else [])):
        try:
            infra.binary(tool)
        except StartError as e:
            return str(e)
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m demo.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=None, help="stop after this long (default: at Ctrl-C)")
    p.add_argument("--rate", type=float, default=20.0, help="traffic, requests per second (default 20)")
    p.add_argument(
        "--seed", type=int, default=None, help="the traffic's random seed (the same requests each run)"
    )
    p.add_argument(
        "--mix", type=parse_mix, default=DEFAULT_MIX, help="the traffic's mix, e.g. browse=1,checkout=1"
    )
    p.add_argument(
        "--listen",
        default=f"127.0.0.1:{SERVER_PORT}",
        help="the server's address (default %(default)s; another port when taken; with --two-hosts "
        "only the port counts; with --cluster the second server takes the next port)",
    )
    p.add_argument("--two-hosts", action="store_true", help="front and back half in two network namespaces")
    p.add_argument(
        "--cluster",
        action="store_true",
        help="as --two-hosts, with two servers on one ClickHouse store, an agent shipping to each",
    )
    p.add_argument("--keep-work-dir", action="store_true", help="keep logs and data after stopping")
    args = p.parse_args(argv)
    if args.rate <= 0:
        p.error("--rate must be positive")
    args.two_hosts = args.two_hosts or args.cluster
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = check_preconditions(args.two_hosts, args.cluster)
    if problem:
        say(f"demo: {problem}")
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    status, demo = 0, None
    with ExitStack() as stack:
        stack.callback(say, "demo: stopped" + ("" if args.keep_work_dir else ", its files removed"))
        try:
            demo = Demo(args, stack)
            say(f"demo: work dir {demo.work}")
            demo.datastores()
            demo.services()
            demo.server()
            demo.agents()
            demo.traffic()
            demo.banner()
            demo.run()
            say("demo: time is up")
        except Stop as s:
            say(f"demo: {s}")
        except StartError as e:
            say(f"demo: error: {e}")
            status = 1
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            say("demo: stopping ...")
            if demo is not None:
                demo.stop_traffic()
    return status


if __name__ == "__main__":
    sys.exit(main())
