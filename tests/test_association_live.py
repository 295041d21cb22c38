"""Association on spans from the real agent: two "hosts" (network namespaces), an
agent for each, and the exact join of a call's two ends across them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
from conftest import require_bpf
from servers import need

A_ADDR, B_ADDR = "10.231.0.1", "10.231.0.2"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextmanager
def two_hosts():
    """Namespaces a and b joined by a veth pair; yields the `ip netns exec` prefixes."""
    tag = str(os.getpid())
    a, b = f"dt-a-{tag}", f"dt-b-{tag}"
    try:
        _ip("netns", "add", a)
        _ip("netns", "add", b)
        _ip("link", "add", f"dta{tag}", "netns", a, "type", "veth", "peer", "name", f"dtb{tag}", "netns", b)
        for ns, dev, addr in ((a, f"dta{tag}", A_ADDR), (b, f"dtb{tag}", B_ADDR)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        pytest.fail(f"cannot make network namespaces (need root and iproute2): {e}", pytrace=False)
    try:
        yield ["ip", "netns", "exec", a], ["ip", "netns", "exec", b]
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _agent(out, *args: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "deeptrace.cli", "agent", "--out", str(out), "--stats-interval", "1",
                          *args], stderr=subprocess.PIPE, text=True)  # fmt: skip
    line = p.stderr.readline()
    assert "tracing" in line, line + p.stderr.read()
    return p


def _spans(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_listening(in_ns: list[str], addr: str, port: int) -> None:
    wait = (f"import socket,time\nfor _ in range(100):\n try:\n  socket.create_connection(('{addr}', {port}),"
            " 0.2).close(); break\n except OSError: time.sleep(0.05)")
    subprocess.run([*in_ns, sys.executable, "-c", wait], check=True)


def stop(*agents: subprocess.Popen) -> None:
    """SIGINT, as a user's Ctrl-C: each writes out what it holds and exits cleanly."""
    for agent in agents:
        agent.send_signal(2)
        _, err = agent.communicate(timeout=30)
        assert agent.returncode == 0, err


def associated(tmp_path, spans: list[dict]) -> dict[str, dict]:
    """`deeptrace associate` over these spans from several agents: the linked spans by id."""
    merged = tmp_path / "both.jsonl"
    merged.write_text("".join(json.dumps(d) + "\n" for d in spans))
    r = subprocess.run([sys.executable, "-m", "deeptrace.cli", "associate", str(merged), "--out", "-"],
                       capture_output=True, text=True, check=True)  # fmt: skip
    return {d["span_id"]: d for d in map(json.loads, r.stdout.splitlines())}


def test_seq_join_across_two_namespaces_with_an_agent_each(tmp_path):
    require_bpf()
    with two_hosts() as (in_a, in_b):
        server = subprocess.Popen([*in_b, sys.executable, "-m", "http.server", "--bind", B_ADDR, "8631"],
                                  cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            wait_listening(in_b, B_ADDR, 8631)
            agent_b = _agent(tmp_path / "b.jsonl", "--pid", str(server.pid), "--host", "host-b", "--associate",
                             "--hold", "0.2")  # fmt: skip
            agent_a = _agent(tmp_path / "a.jsonl", "--comm", "curl", "--host", "host-a")
            for path in ("/", "/missing/7", "/"):
                subprocess.run([*in_a, need("curl"), "-s", "-o", "/dev/null", f"http://{B_ADDR}:8631{path}"], check=True)
            stop(agent_a, agent_b)
        finally:
            server.kill()
            server.wait()
    a, b = _spans(tmp_path / "a.jsonl"), _spans(tmp_path / "b.jsonl")
    assert [(d["kind"], d["host"]) for d in a] == [("CLIENT", "host-a")] * 3
    assert [(d["kind"], d["host"], d["link_method"]) for d in b] == [("SERVER", "host-b", "root")] * 3
    assert all(d["laddr"] == A_ADDR and d["raddr"] == B_ADDR for d in a)

    linked = associated(tmp_path, a + b)
    servers = [d for d in linked.values() if d["kind"] == "SERVER"]
    assert len(servers) == 3 and all(d["link_method"] == "seq-join" for d in servers)
    for s in servers:
        c = linked[s["parent_span_id"]]
        assert c["host"] == "host-a" and c["kind"] == "CLIENT" and c["req_seq"] == s["req_seq"]
        assert (c["lport"], c["rport"]) == (s["rport"], s["lport"]) and c["name"] == s["name"]
        assert c["trace_id"] == s["trace_id"]
    assert sorted(d["name"] for d in servers) == ["GET /", "GET /", "GET /missing/{id}"]
