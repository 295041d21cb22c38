"""The workloads bench/accuracy records: what runs, on which ports, and what loads it.

- `shop`: five Python services of ours (services/), Redis and PostgreSQL, payloads with
  user ids and SKUs;
- `mesh`: one small service written three times, in Go, Java and Node.js with their
  standard libraries only (foreign/README.md), run as a -> b -> c, either with an id in
  every request (`fields`) or with every request of a route byte-identical (`timing`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import infra

HERE = Path(__file__).resolve().parent
FOREIGN = HERE / "foreign"

SHOP_DESCRIPTION = (
    "gateway (aiohttp) -> users (FastAPI: Redis, PostgreSQL), 3 x inventory in parallel (Flask, "
    "gunicorn gthread 2x8: PostgreSQL), orders (aiohttp: PostgreSQL, gRPC pricing: Redis MGET, Redis x2); "
    "70% checkout, 30% profile (users only)"
)  # fmt: skip
RUNTIMES = {"go": "Go net/http (goroutines)",
            "java": "Java 17 com.sun.net.httpserver + an HttpClient per pool thread (thread pool; C1 only)",
            "node": "Node.js 20 http (one event loop)"}  # fmt: skip
# Routes of a and their share of the load (foreign/README.md has what each does).
MIXES = {
    "seq": {"/seq": 1.0},  # the shape of the external Go data set of issue 11
    "mix": {"/seq": 0.3, "/par": 0.2, "/deep": 0.2, "/var": 0.15, "/retry": 0.15},
}
MODES = ("fields", "timing")
WORK_MS = 40.0  # a leaf's mean service time: about 32 requests in flight at a at 400 req/s
THINK_MS = 0.2  # a handler's own work before each step
FLAKY_RATE = 0.3
# The JVMs (three on two cores, with the agent): C1 only. With C2 (the default), the
# compiler threads still took nearly half of the services' CPU 15 to 35 s into a level at
# 200 req/s (thread CPU from /proc), and all three JVMs then needed 1.2 cores where they
# need 0.5 with C1 alone; the mesh's own work is I/O, which C1's code does as well. GC
# took under 1% either way (the default G1 kept).
JVM_OPTIONS = ["-XX:TieredStopAtLevel=1"]
JAVA_WARMUP_S = 15.0  # with C1, a cold start's queue has drained within about 6 s at 200 and 12 s at 400 req/s


@dataclass(frozen=True)
class Shop:
    name: str = "shop"
    root_service: str = "gateway"
    services: tuple[str, ...] = ("pricing", "inventory", "users", "orders", "gateway")
    entry: str = "gateway"
    warmup: float = 0.0  # seconds of load before each level's measured window (workload.py)

    @property
    def description(self) -> str:
        return SHOP_DESCRIPTION

    def infra(self):
        return infra.datastores()

    def before_level(self, stores: dict) -> None:
        infra.reset_redis(stores["redis_port"])

    def build(self, build_dir: Path) -> None:
        pass

    def commands(self, ports: dict, truth_dir: Path, stores: dict) -> list[dict]:
        import json

        env = {"ACCURACY_CONFIG": json.dumps({"ports": ports, "truth_dir": str(truth_dir), **stores})}
        return [{"argv": [sys.executable, f"{name}.py"], "cwd": str(HERE / "services"), "env": env}
                for name in self.services]  # fmt: skip

    def load_args(self) -> list[str]:
        return []


@dataclass(frozen=True)
class Mesh:
    runtime: str
    mix: str
    mode: str
    root_service: str = "a"
    services: tuple[str, ...] = ("c", "b", "a")
    entry: str = "a"

    @property
    def name(self) -> str:
        return f"{self.runtime}-{self.mix}-{self.mode}"

    @property
    def warmup(self) -> float:
        """Seconds of load before each level's measured window (workload.py): the JVM
        loads and compiles as it goes, and cold, the first seconds of a level queued
        hundreds of requests that took the next ten to drain. (Go and Node answer as fast
        in their first seconds as later.)"""
        return JAVA_WARMUP_S if self.runtime == "java" else 0.0

    @property
    def description(self) -> str:
        routes = ", ".join(f"{int(share * 100)}% {route}" for route, share in MIXES[self.mix].items())
        payload = "an id in every request" if self.mode == "fields" else "every request of a route byte-identical"
        return f"a -> b -> c in {RUNTIMES[self.runtime]}; {routes}; {payload}"

    @contextmanager
    def infra(self):
        """Go resolves the peers' names through its own resolver, from a dnsmasq of ours
        (not traced: like Redis for the shop, it is infrastructure)."""
        if self.runtime != "go":
            yield {}
            return
        port = infra.servers.free_port()
        argv = ["dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", f"--port={port}",
                "--listen-address=127.0.0.1", "--bind-interfaces", "--conf-file=/dev/null", "--local=/mesh.test/",
                "--address=/mesh.test/127.0.0.1", "--user=root"]  # fmt: skip
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            yield {"dns_port": port}
        finally:
            proc.terminate()
            proc.wait(10)

    def before_level(self, stores: dict) -> None:
        pass

    def build(self, build_dir: Path) -> None:
        """Compiled once per run, before the agent starts: the build is not traced."""
        build_dir = build_dir.resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        if self.runtime == "go" and not (build_dir / "mesh-go").exists():
            if shutil.which("go") is None:
                raise SystemExit("the Go workloads need Go: apt-get install golang-go (make bench-accuracy-foreign does)")
            env = {**os.environ, "GOCACHE": str(build_dir / "gocache")}
            subprocess.run(["go", "build", "-o", str(build_dir / "mesh-go"), "mesh.go"], cwd=FOREIGN / "go", env=env, check=True)
        if self.runtime == "java" and not (build_dir / "Mesh.class").exists():
            subprocess.run(["javac", "-d", str(build_dir), str(FOREIGN / "java/Mesh.java")], check=True)

    def commands(self, ports: dict, truth_dir: Path, stores: dict) -> list[dict]:
        import json

        build = truth_dir.parents[2] / "build"  # OUT/build, truth_dir being OUT/WORKLOAD/rps-N/truth
        argv = {"go": [str(build / "mesh-go")], "java": ["java", *JVM_OPTIONS, "-cp", str(build), "Mesh"],
                "node": ["node", str(FOREIGN / "node/mesh.js")]}[self.runtime]  # fmt: skip
        dns = stores.get("dns_port")
        peers = {p: {"host": f"{p}.mesh.test" if dns else "127.0.0.1", "port": ports[p]} for p in ("b", "c")}
        out = []
        for i, name in enumerate(self.services):
            config = {"service": name, "port": ports[name], "truth_dir": str(truth_dir), "mode": self.mode,
                      "peers": peers, "work_ms": WORK_MS, "think_ms": THINK_MS, "flaky_rate": FLAKY_RATE,
                      "threads": 64, "seed": i + 1, **({"dns_port": dns} if dns else {})}  # fmt: skip
            out.append({"argv": argv, "env": {"MESH_CONFIG": json.dumps(config)}})
        return out

    def load_args(self) -> list[str]:
        return ["--mesh", self.mix, self.mode]


def parse(names: str) -> list[Shop | Mesh]:
    """`shop`, `RUNTIME-MIX-MODE` (go-seq-timing), or shorter: `go-seq` (both modes), `go` (every mix and mode)."""
    out: list[Shop | Mesh] = []
    for name in names.split(","):
        if name == "shop":
            out.append(Shop())
            continue
        runtime, *rest = name.split("-")
        if runtime not in RUNTIMES or len(rest) > 2 or (rest and rest[0] not in MIXES) or (len(rest) == 2 and rest[1] not in MODES):
            raise SystemExit(f"unknown workload {name!r}: shop, or RUNTIME[-MIX[-MODE]] with runtime in "
                             f"{', '.join(RUNTIMES)}, mix in {', '.join(MIXES)}, mode in {', '.join(MODES)}")  # fmt: skip
        mixes = [rest[0]] if rest else list(MIXES)
        modes = [rest[1]] if len(rest) == 2 else list(MODES)
        out += [Mesh(runtime, m, mode) for m in mixes for mode in modes]
    return out


def by_name(name: str) -> Shop | Mesh:
    return parse(name)[0]
