"""The demo end to end, under real eBPF: `python -m demo.launch` starts the shop, the server
and the agent(s), drives traffic; the server's API must then show traces shaped like the
shop's call graph (demo/callgraph.py, the one description of who calls whom) and a service
map with its edges. Stopping it must leave no process, file or namespace behind."""

from __future__ import annotations

import importlib.util
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import pytest
from conftest import require_bpf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # demo/ is an application next to the package, not part of it

from demo import callgraph
from demo.callgraph import ALWAYS, ON_SUCCESS, Call

# Checkout-heavy, so that a short run has out-of-stock 409s to look at; seeded, so the same
# requests are sent every run.
MIX = "browse=2,product=2,view_cart=1,add_to_cart=2,checkout=3"
SEED = "7"
MATURE_S = 8  # a trace is complete once the server's hold (5 s) and the agent's batching are over
SERVICE_PACKAGES = ("aiohttp", "fastapi", "flask", "gunicorn", "psycopg", "psycopg_pool", "redis", "uvicorn")


def require_demo() -> None:
    require_bpf()
    missing = [m for m in SERVICE_PACKAGES if importlib.util.find_spec(m) is None]
    if missing:
        reason = f"the demo's services need {', '.join(missing)} (`make setup` installs them)"
        if os.environ.get("DEEPTRACE_REQUIRE_BPF") == "1":  # our machines: set up, so this must run
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


@dataclass
class Running:
    url: str
    token: str
    pids: dict[str, int]
    work: str
    output: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)  # every server's UI (two with --cluster)

    def api(self, path: str, **params):
        r = httpx.get(
            f"{self.url}api/v1/{path}",
            params=params,
            timeout=10,
            headers={"Authorization": f"Bearer {self.token}"},
        )
        r.raise_for_status()
        return r.json()

    def on(self, url: str) -> Running:
        """The same demo, asked through another of its servers."""
        return replace(self, url=url)


@contextmanager
def demo(*args: str, startup_s: float = 120):
    """The launcher, running until the block ends; then SIGTERM, and it must clean up."""
    argv = [sys.executable, "-m", "demo.launch", "--seconds", "600", "--seed", SEED, "--mix", MIX, *args]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    fresh: queue.Queue = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            fresh.put(lines[-1])
        fresh.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def output() -> str:
        return "\n".join(lines)

    try:
        url = None
        deadline = time.monotonic() + startup_s
        while not (url and any(line.startswith("Running") for line in lines)):
            try:
                line = fresh.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"the demo did not come up within {startup_s:.0f}s:\n{output()}", pytrace=False)
            if line is None:
                pytest.fail(
                    f"the demo exited (status {proc.wait()}) before it was up:\n{output()}", pytrace=False
                )
            if m := re.match(r"DeepTrace UI: (http://\S+/)$", line):
                url = m.group(1)
        text = output()
        running = Running(
            url,
            re.search(r"token (\S+)", text).group(1),
            {name: int(pid) for name, pid in re.findall(r"([\w.-]+)\[(\d+)\]", text)},
            re.search(r"work dir (\S+)", text).group(1),
            lines,
            re.findall(r"^DeepTrace UI: (http://\S+/)$", text, re.MULTILINE),
        )
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            status = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"the demo did not stop within 120s of SIGTERM:\n{output()}", pytrace=False)
        reader.join(10)  # its last lines
    assert status == 0, output()
    assert lines[-1] == "demo: stopped, its files removed", output()
    left = {name: pid for name, pid in running.pids.items() if Path(f"/proc/{pid}").exists()}
    assert not left, f"still running after the demo stopped: {left}"
    assert not Path(running.work).exists(), f"{running.work} was not removed"


# -- what the traces must look like


def tree(spans: list[dict]) -> tuple[list[dict], dict[str, list[dict]]]:
    kids: dict[str, list[dict]] = {}
    for s in spans:
        kids.setdefault(s["parent_span_id"], []).append(s)
    return kids.get(None, []), kids


def shape_problems(server: dict, call: Call, kids: dict, where: str = "") -> list[str]:
    """How the subtree under a SERVER span differs from what the call graph says this call
    does: its own name and service, every call it made declared, every required call made
    (calls to services joined to one SERVER span each, recursively), no stray spans."""
    where = f"{where}/{call.callee}"
    if (server["kind"], server["service"], server["name"]) != ("SERVER", call.callee, call.name):
        got = f"{server['kind']} {server['service']} {server['name']!r}"
        return [f"{where}: expected SERVER {call.callee} {call.name!r}, got {got}"]
    problems = []
    made = kids.get(server["span_id"], [])
    for client in made:
        declared = [c for c in call.calls if (c.name, c.protocol) == (client["name"], client["protocol"])]
        if client["kind"] != "CLIENT" or client["service"] != call.callee or not declared:
            problems.append(
                f"{where}: unexpected child {client['kind']} {client['service']} {client['name']!r}"
            )
            continue
        callee, below = declared[0], kids.get(client["span_id"], [])
        if callee.traced:
            if len(below) != 1:
                problems.append(f"{where}: {client['name']!r} is joined to {len(below)} SERVER spans, not 1")
            else:
                problems += shape_problems(below[0], callee, kids, where)
        else:
            if below:
                problems.append(f"{where}: the untraced {callee.callee} has spans under {client['name']!r}")
            if not (client.get("peer_service") or "").startswith(f"{callee.protocol} "):
                problems.append(
                    f"{where}: {client['name']!r} has peer_service {client.get('peer_service')!r}"
                )
    succeeded = server["status"] == "ok"
    for c in call.calls:
        required = c.when == ALWAYS or (c.when == ON_SUCCESS and succeeded)
        if required and not any(m["name"] == c.name and m["protocol"] == c.protocol for m in made):
            problems.append(f"{where}: no {c.callee} call {c.name!r}")
    return problems


def show(spans: list[dict]) -> str:
    roots, kids = tree(spans)
    out = []

    def walk(s: dict, depth: int) -> None:
        out.append(
            f"{'  ' * depth}{s['kind']} {s['service']}@{s['host']} {s['name']} {s['status']} "
            f"{s.get('status_code')} {s['link_method']}"
        )
        for k in kids.get(s["span_id"], []):
            walk(k, depth + 1)

    for r in roots:
        walk(r, 0)
    return "\n".join(out)


def traces_of(demo: Running, route: callgraph.Route, limit: int = 10, **filters) -> list[list[dict]]:
    """The newest complete traces of this route: spans of each."""
    found = demo.api(
        "traces",
        service="nginx",
        operation=route.entry.name,
        limit=limit,
        end_ns=time.time_ns() - MATURE_S * 10**9,
        **filters,
    )["traces"]
    return [demo.api(f"traces/{t['trace_id']}")["spans"] for t in found]


def check_routes(demo: Running, min_traces: int = 3, min_right: float = 0.9) -> list[str]:
    """Every route has traces, and nearly all of them have the call graph's shape (association
    may rarely pick a wrong parent; a broken join or naming breaks every trace)."""
    failures = []
    for route in callgraph.ROUTES:
        traces = traces_of(demo, route)
        if len(traces) < min_traces:
            failures.append(f"{route.key}: {len(traces)} complete traces, expected at least {min_traces}")
            continue
        wrong = []
        for spans in traces:
            roots, kids = tree(spans)
            problems = (
                [f"{len(roots)} roots"] if len(roots) != 1 else shape_problems(roots[0], route.entry, kids)
            )
            if problems:
                wrong.append("\n".join(problems) + "\n" + show(spans))
        if len(wrong) > (1 - min_right) * len(traces):
            failures.append(
                f"{route.key}: {len(wrong)} of {len(traces)} traces are not shaped like the call graph; "
                f"the first:\n{wrong[0]}"
            )
    return failures


def check_service_map(demo: Running) -> list[str]:
    got = {(e["source"], e["target"]) for e in demo.api("service-map")["edges"]}
    missing = []
    for caller, callee in sorted(callgraph.edges()):
        # An untraced datastore is named by what the calls went to: `postgresql 127.0.0.1:5432`.
        hit = (
            (caller, callee) in got
            if callee in callgraph.SERVICES
            else any(s == caller and t.startswith(f"{callee} ") for s, t in got)
        )
        if not hit:
            missing.append(f"{caller} -> {callee}")
    return [f"service map lacks {', '.join(missing)}; it has {sorted(got)}"] if missing else []


def eventually(check, timeout_s: float, every_s: float = 3.0) -> None:
    """check() returns failures; poll until there are none, fail with the last ones."""
    deadline = time.monotonic() + timeout_s
    while True:
        failures = check()
        if not failures:
            return
        if time.monotonic() > deadline:
            pytest.fail("\n\n".join(failures), pytrace=False)
        time.sleep(every_s)


def out_of_stock_traces(demo: Running) -> list[str]:
    """The 409 path: checkout asked catalog, refused, wrote no order; the error reaches nginx."""
    traces = traces_of(demo, callgraph.ROUTE["checkout"], status="error")
    refused = [
        s
        for s in traces
        if any(d["service"] == "checkout" and d["kind"] == "SERVER" and d["status_code"] == "409" for d in s)
    ]
    if not refused:
        return [f"no out-of-stock checkout among {len(traces)} failed checkout traces"]
    spans = refused[0]
    names = {(d["service"], d["kind"], d["name"]) for d in spans}
    problems = []
    if ("checkout", "CLIENT", "INSERT orders") in names:
        problems.append("a refused checkout wrote an order")
    if not ("checkout", "CLIENT", "GET /products/{id}") in names:
        problems.append("a refused checkout did not ask catalog")
    root = tree(spans)[0][0]
    if (root["service"], root["status_code"]) != ("nginx", "409"):
        problems.append(f"the 409 did not reach nginx: root {root['service']} {root['status_code']}")
    return [f"{p}:\n{show(spans)}" for p in problems]


def test_demo_traces_follow_the_call_graph():
    require_demo()
    with demo() as d:
        time.sleep(20)  # traffic, and the first traces maturing
        assert {"nginx", "gateway", "catalog", "cart", "checkout"} <= set(d.api("services")["services"])
        eventually(lambda: check_routes(d) + check_service_map(d) + out_of_stock_traces(d), timeout_s=45)


def namespaces() -> list[str]:
    """The two-host demo's network namespaces that exist now."""
    listing = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True).stdout
    return [line.split()[0] for line in listing.splitlines() if line.startswith("deeptrace-host")]


def test_two_host_demo_traces_cross_hosts():
    require_demo()
    if namespaces():
        pytest.skip("a two-host demo is running on this machine (its namespaces exist)")
    with demo("--two-hosts") as d:
        time.sleep(12)
        hosts = {a["host"] for a in d.api("agents")["agents"]}
        assert {"hostA", "hostB"} <= hosts, hosts

        def crossing() -> list[str]:
            failures = check_routes(d, min_traces=2)
            for spans in traces_of(d, callgraph.ROUTE["checkout"], limit=5):
                wrong = [
                    s for s in spans if s["host"] != ("hostA" if s["service"] in callgraph.FRONT else "hostB")
                ]
                if wrong:
                    failures.append(f"spans on the wrong host:\n{show(spans)}")
                if {s["host"] for s in spans} != {"hostA", "hostB"}:
                    failures.append(f"a checkout trace that does not cross both hosts:\n{show(spans)}")
            return failures + check_service_map(d)

        eventually(crossing, timeout_s=40)
    assert not namespaces(), f"namespaces left behind: {namespaces()}"


def logs(demo: Running, *names: str) -> str:
    """The end of these processes' logs, read while the demo runs (it removes them when it stops)."""
    out = []
    for name in names:
        path = Path(demo.work, f"{name}.log")
        try:
            text = path.read_text(errors="replace")[-6000:]
        except OSError as e:
            text = f"(unreadable: {e})"
        out.append(f"--- {path}:\n{text.rstrip() or '(empty)'}")
    return "\n".join(out)


def whole_problems(spans: list[dict], trace_id: str) -> list[str]:
    """One root, every parent present, every span of this trace; a call from one host to the
    other joined by seq-join (the caller's CLIENT span and the callee's SERVER span)."""
    problems = []
    ids = {s["span_id"]: s for s in spans}
    roots = [s for s in spans if s["parent_span_id"] is None]
    if len(roots) != 1:
        problems.append(f"{len(roots)} roots")
    for s in spans:
        parent = ids.get(s["parent_span_id"]) if s["parent_span_id"] is not None else None
        if s["trace_id"] != trace_id:
            problems.append(f"{s['service']} {s['name']!r} is of trace {s['trace_id']}")
        if s["parent_span_id"] is not None and parent is None:
            problems.append(
                f"{s['service']} {s['name']!r}: its parent {s['parent_span_id']} is not in the trace"
            )
        if parent is not None and parent["host"] != s["host"] and s["link_method"] != "seq-join":
            problems.append(
                f"{parent['service']}@{parent['host']} -> {s['service']}@{s['host']} {s['name']!r} "
                f"joined by {s['link_method']!r}, not 'seq-join'"
            )
    return problems


def same_on_both(servers: list[Running], min_crossing: int = 10) -> list[str]:
    """Both servers list the same complete traces of every route, and each trace that crosses
    the hosts comes back whole and the same from both."""
    failures, crossing = [], 0
    end_ns = time.time_ns() - MATURE_S * 10**9
    for route in callgraph.ROUTES:
        query = {"service": "nginx", "operation": route.entry.name, "limit": 10, "end_ns": end_ns}
        listed = [[t["trace_id"] for t in s.api("traces", **query)["traces"]] for s in servers]
        if set(listed[0]) != set(listed[1]):
            failures.append(
                f"{route.key}: the servers list different traces: only on {servers[0].url}: "
                f"{sorted(set(listed[0]) - set(listed[1]))}; only on {servers[1].url}: "
                f"{sorted(set(listed[1]) - set(listed[0]))}"
            )
        for trace_id in listed[0]:
            got = [sorted(s.api(f"traces/{trace_id}")["spans"], key=lambda x: x["span_id"]) for s in servers]
            if {s["host"] for s in got[0]} != {"hostA", "hostB"}:
                continue
            crossing += 1
            if got[0] != got[1]:
                failures.append(
                    f"{route.key}: trace {trace_id} differs between the servers:\n{servers[0].url}:\n"
                    f"{show(got[0])}\n{servers[1].url}:\n{show(got[1])}"
                )
            problems = whole_problems(got[0], trace_id)
            if problems:
                failures.append(
                    f"{route.key}: trace {trace_id}: " + "; ".join(problems) + f"\n{show(got[0])}"
                )
    if crossing < min_crossing:
        failures.append(f"{crossing} complete traces cross the hosts, expected at least {min_crossing}")
    return failures


def test_cluster_demo_serves_each_trace_whole_from_both_servers():
    """--cluster: two servers on one ClickHouse store, hostA's agent shipping to one and
    hostB's to the other; a trace asked of either server is the same whole tree."""
    require_demo()
    if namespaces():
        pytest.skip("a two-host demo is running on this machine (its namespaces exist)")
    with demo("--cluster") as d:
        assert len(d.urls) == 2, "\n".join(d.output)
        servers, failure = [d.on(url) for url in d.urls], None
        try:
            time.sleep(15)  # a new owner waits 3 s before it links an agent: a little longer than one server
            for s in servers:
                status = s.api("status")
                cluster = status["cluster"]
                assert cluster["shared_store"] and len(cluster["servers"]) == 2, f"{s.url}: {cluster}"
                assert status["ingest"]["batches"] > 0, f"{s.url} took no batch: {status['ingest']}"
                hosts = {a["host"] for a in s.api("agents")["agents"]}
                assert {"hostA", "hostB"} <= hosts, f"{s.url}: {hosts}"

            def whole() -> list[str]:
                # The shapes on one server: same_on_both has the other serve the very same traces.
                return same_on_both(servers) + check_routes(servers[0], min_traces=2)

            eventually(whole, timeout_s=60)
        except (AssertionError, httpx.HTTPError, pytest.fail.Exception) as e:
            names = ("server-1", "server-2", "clickhouse-server", "agent-hostA", "agent-hostB")
            failure = f"{e}\n\n{logs(d, *names)}"
        if failure:
            pytest.fail(failure, pytrace=False)
    assert not namespaces(), f"namespaces left behind: {namespaces()}"


@pytest.mark.skipif(os.geteuid() == 0, reason="checks the refusal without root")
def test_demo_refuses_to_run_without_root():
    r = subprocess.run(
        [sys.executable, "-m", "demo.launch", "--seconds", "1"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "needs root" in r.stdout, r.stdout + r.stderr


def test_traffic_sends_what_the_call_graph_describes():
    """Without root: every request the driver makes is named, once the agent templates its
    path, as its route's entry in the call graph, and the mix covers every route."""
    import random

    from demo.traffic import DEFAULT_MIX, make_request

    from deeptrace.protocols.http1 import template_path

    assert set(DEFAULT_MIX) == set(callgraph.ROUTE)
    rng = random.Random(1)
    for _ in range(200):
        for key, route in callgraph.ROUTE.items():
            method, path, _body = make_request(key, rng)
            assert f"{method} {template_path(path)}" == route.entry.name
    assert callgraph.edges() >= {
        ("nginx", "gateway"),
        ("gateway", "checkout"),
        ("checkout", "catalog"),
        ("checkout", "cart"),
        ("catalog", "postgresql"),
        ("cart", "redis"),
    }
