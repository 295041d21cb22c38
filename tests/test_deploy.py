"""The deployment files under deploy/ and the Dockerfile, checked offline.

- systemd: the units are read as systemd reads them, `systemd-analyze verify` and `systemd-analyze
  security --offline` judge them, and their ExecStart lines run for real: the agent under exactly
  the unit's capabilities (and read-only file systems but its spool) traces a real client and
  server and ships the spans to the server unit's ExecStart, which runs with no capabilities and
  makes only system calls its SystemCallFilter allows. Each capability is then taken away in
  turn to show what it is for. (No systemd runs as PID 1 here, so the units themselves are never
  started by systemd.)
- Kubernetes: every manifest and the Helm chart (rendered by deploy/helm/render, a Go
  text/template + sprig renderer, not helm) against the Kubernetes JSON schemas of
  kubernetes-validate (strict), yamllint, and the chart against the plain manifests.
- Dockerfile: parsed, and what it COPYs and runs exists in the repository (it is not built).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import bpf_unavailable_reason, require
from deploy_units import (
    allowed_syscalls,
    effective_capabilities,
    known_capabilities,
    own_bounding_set,
    read_unit,
    setpriv_argv,
    strace_summary_syscalls,
)
from servers import free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
AGENT_UNIT = DEPLOY / "systemd" / "deeptrace-agent.service"
SERVER_UNIT = DEPLOY / "systemd" / "deeptrace-server.service"
INSTALLED = "/opt/deeptrace/bin/deeptrace"  # where the units expect the installed command
DEEPTRACE = Path(sys.executable).parent / "deeptrace"  # this checkout's, used in its place
SYSTEM_PYTHON = "/usr/bin/python3"  # the traced services' interpreter (Debian's, linked to libssl)


# ---------------------------------------------------------------------------------------------
# systemd: static checks


def test_units_parse_and_name_real_options(tmp_path):
    """Every option ExecStart passes is one `deeptrace agent/server --help` lists, and every
    capability is one the kernel knows."""
    for path, command in ((AGENT_UNIT, "agent"), (SERVER_UNIT, "server")):
        unit = read_unit(path)
        empty = tmp_path / "empty.env"
        empty.write_text("")
        env = unit.environment({f: empty for f in unit.values("EnvironmentFile")})
        argv = unit.exec_start(env)
        assert argv[:2] == [INSTALLED, command], argv
        helptext = subprocess.run([str(DEEPTRACE), command, "--help"], check=True, capture_output=True,
                                  text=True).stdout  # fmt: skip
        for arg in argv[2:]:
            if arg.startswith("--"):
                assert (
                    f"  {arg.split('=')[0]} " in helptext or f"  {arg} " in helptext or f"{arg}\n" in helptext
                ), f"{path.name}: {arg} is not an option of deeptrace {command}"
        for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
            assert unit.capabilities(key) <= known_capabilities(), (path.name, key)
        assert unit.capabilities("CapabilityBoundingSet") == unit.capabilities("AmbientCapabilities"), (
            path.name
        )
        assert unit.value("NoNewPrivileges") == "yes"
    agent = read_unit(AGENT_UNIT)
    assert agent.capabilities("CapabilityBoundingSet") == {"bpf", "perfmon", "sys_admin", "sys_ptrace",
                                                           "dac_read_search"}  # fmt: skip
    assert agent.value("StateDirectory") == "deeptrace"
    spool = agent.exec_start({"DEEPTRACE_SERVER": "http://x:8700"})
    assert spool[spool.index("--spool-dir") + 1].startswith("/var/lib/deeptrace/"), (
        "the spool is in StateDirectory"
    )
    assert read_unit(SERVER_UNIT).capabilities("CapabilityBoundingSet") == set()


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    return path


def _units_with_real_command(tmp_path: Path) -> list[Path]:
    """The units with ExecStart pointing at this checkout's deeptrace: `verify` checks that the
    command exists and is executable."""
    out = []
    for unit in (AGENT_UNIT, SERVER_UNIT):
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace(INSTALLED, str(DEEPTRACE)))
        out.append(copy)
    return out


def test_systemd_analyze_verify(tmp_path):
    """`systemd-analyze verify` needs no running systemd: it loads the units offline and says
    what it does not understand (unknown keys, bad values it parses, missing commands)."""
    analyze = _systemd_analyze()
    units = _units_with_real_command(tmp_path)
    r = subprocess.run(
        [analyze, "verify", *map(str, units)], check=False, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stdout + r.stderr
    # and it does catch a mistake (so the check above can fail)
    bad = tmp_path / "bad-deeptrace.service"
    bad.write_text(units[0].read_text().replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"))
    r = subprocess.run([analyze, "verify", str(bad)], check=False, capture_output=True, text=True, timeout=60)
    assert "Unknown key" in r.stderr + r.stdout


def test_systemd_analyze_security(tmp_path):
    """systemd's own exposure score, offline: the server is locked down, the agent as far as
    loading eBPF programs and reading every process's /proc allow."""
    analyze = _systemd_analyze()
    scores = {}
    for unit in _units_with_real_command(tmp_path):
        r = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(unit)], check=False,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        line = next(x for x in r.stdout.splitlines() if "Overall exposure level" in x)
        scores[unit.name] = float(line.split(":")[1].split()[0])
    assert scores["deeptrace-server.service"] <= 2.0, scores
    assert scores["deeptrace-agent.service"] <= 5.0, scores


def test_server_unit_syscall_filter_parses():
    allowed = allowed_syscalls(read_unit(SERVER_UNIT).values("SystemCallFilter"))
    assert {"read", "accept4", "epoll_wait", "mbind"} <= allowed
    assert not {"mount", "bpf", "init_module", "reboot"} & allowed


# ---------------------------------------------------------------------------------------------
# systemd: the units' ExecStart run for real


def _live_unavailable_reason() -> str | None:
    reason = bpf_unavailable_reason()
    if reason:
        return reason
    for tool in ("setpriv", "unshare", "strace", "curl", "openssl", "systemd-analyze"):
        if shutil.which(tool) is None:
            return f"the systemd unit test needs {tool} (make setup installs it)"
    if not Path(SYSTEM_PYTHON).exists():
        return f"the systemd unit test runs its traced services with {SYSTEM_PYTHON} (Debian's python3)"
    try:
        import pwd

        pwd.getpwnam("nobody")
    except KeyError:
        return "the systemd unit test runs its traced services as the user nobody, which does not exist"
    missing = read_unit(AGENT_UNIT).capabilities("CapabilityBoundingSet") - own_bounding_set()
    if missing:
        return (f"this test process cannot hand on {sorted(missing)} (not in its own bounding set), which "
                "the agent unit gives")  # fmt: skip
    return None


def _localize(argv: list[str], paths: dict[str, str]) -> list[str]:
    """The unit's command line with its installed paths replaced by this test's."""
    out = []
    for arg in argv:
        for old, new in paths.items():
            if arg == old or arg.startswith(old + "/"):
                arg = new + arg[len(old) :]
                break
        out.append(arg)
    return out


def _get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(p) for p in (task / "children").read_text().split()]
    return out


def _wait_line(proc: subprocess.Popen, errfile: Path, text: str, timeout_s: float) -> bool:
    """Whether `text` appeared in the process's stderr (False if it exited first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in errfile.read_text(errors="replace"):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} after {timeout_s}s: {errfile.read_text(errors='replace')[-2000:]}")


def _spans(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# Make every mount read-only but the state directory, as ProtectSystem=strict, ProtectHome=read-only
# and ProtectKernelTunables=yes do (a private mount namespace; more is read-only here than there).
_READ_ONLY = r"""
mount --bind "$STATE" "$STATE"
for mp in $(awk '{print $5}' /proc/self/mountinfo | sort -u); do
    [ "$mp" = "$STATE" ] && continue
    mount -o remount,bind,ro "$mp" 2>/dev/null || echo "read-only: could not remount $mp" >&2
done
exec "$@"
"""


def test_units_run_with_their_capabilities(tmp_path):
    """The agent unit's ExecStart under exactly CapabilityBoundingSet/AmbientCapabilities and
    NoNewPrivileges, everything but its spool read-only, traces a plain HTTP service and a TLS
    one (both running as another user) and ships the spans to the server unit's ExecStart, which
    runs with no capabilities and NoNewPrivileges under strace. Then each capability is taken away
    in turn, and what breaks is what the unit's comment says."""
    require(_live_unavailable_reason(), "DEEPTRACE_REQUIRE_BPF")
    agent_unit, server_unit = read_unit(AGENT_UNIT), read_unit(SERVER_UNIT)
    caps = agent_unit.capabilities("CapabilityBoundingSet")
    assert caps == agent_unit.capabilities("AmbientCapabilities")

    # LimitMEMLOCK=infinity matters only before 5.11 (later kernels charge BPF maps to the cgroup).
    assert agent_unit.value("LimitMEMLOCK") == "infinity"
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError):
        major, minor = (int(x) for x in platform.release().split(".")[:2])
        if (major, minor) < (5, 11):
            pytest.skip(f"cannot apply the unit's LimitMEMLOCK=infinity here (no CAP_SYS_RESOURCE), and "
                        f"kernel {platform.release()} charges BPF maps to RLIMIT_MEMLOCK")  # fmt: skip

    # A directory the traced services (user nobody) can read; tmp_path is private to root.
    shared = Path(tempfile.mkdtemp(prefix="deeptrace-deploy-"))
    procs: list[subprocess.Popen] = []
    try:
        shared.chmod(0o755)
        _run_units(tmp_path, shared, procs, agent_unit, server_unit, caps)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        shutil.rmtree(shared, ignore_errors=True)


def _run_units(tmp_path, shared, procs, agent_unit, server_unit, caps):
    tag = uuid.uuid4().hex[:8]
    http_name, tls_name = f"deploy-http-{tag}", f"deploy-tls-{tag}"
    token = uuid.uuid4().hex
    server_port, http_port, tls_port = free_port(), free_port(), free_port()

    # --- the server unit: its ExecStart, no capabilities, NoNewPrivileges, under strace -c.
    server_state = tmp_path / "server-state"
    server_state.mkdir()
    server_env_file = tmp_path / "server.env"
    server_env_file.write_text(f"DEEPTRACE_TOKEN={token}\n")
    server_env = server_unit.environment({"/etc/deeptrace/server.env": server_env_file})
    server_argv = _localize(server_unit.exec_start(server_env),
                            {INSTALLED: str(DEEPTRACE), "/var/lib/deeptrace-server": str(server_state)})  # fmt: skip
    assert server_argv[server_argv.index("--listen") + 1] == "0.0.0.0:8700"
    server_argv[server_argv.index("--listen") + 1] = f"127.0.0.1:{server_port}"
    server_caps = server_unit.capabilities("CapabilityBoundingSet")
    strace_out = tmp_path / "server.strace"
    # uid 0 with no capabilities: this checkout's interpreter lives under /root (mode 0700),
    # where the unit's DynamicUser could not reach; without capabilities uid 0 is no more.
    server = subprocess.Popen(
        [*setpriv_argv(server_caps, no_new_privs=True), "strace", "-f", "-qq", "-c", "-o", str(strace_out),
         *server_argv],
        cwd=server_state, env={**_base_env(), **server_env}, stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "server.err", "w"))  # noqa: SIM115  # fmt: skip
    procs.append(server)

    # --- the traced services, as the user nobody: plain HTTP, and HTTPS through a private copy
    # of libssl (outside the system's library path, so it is found only through /proc/PID/root).
    (shared / "index.html").write_text("hello\n")
    libdir = shared / "lib"
    libdir.mkdir()
    libssl = next(p for p in (Path("/usr/lib/x86_64-linux-gnu/libssl.so.3"), Path("/lib/x86_64-linux-gnu/libssl.so.3"))
                  if p.exists())  # fmt: skip
    shutil.copy(libssl, libdir / "libssl.so.3")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", shared / "key.pem", "-out", shared / "cert.pem"], check=True, capture_output=True)  # fmt: skip
    for f in shared.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    (shared / "tls_server.py").write_text(_TLS_SERVER)
    nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    http_srv = subprocess.Popen(
        [*nobody, SYSTEM_PYTHON, "-m", "http.server", str(http_port), "--bind", "127.0.0.1", "--directory", shared],
        env={**_base_env(), "OTEL_SERVICE_NAME": http_name}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)  # fmt: skip
    procs.append(http_srv)
    tls_srv = subprocess.Popen(
        [*nobody, SYSTEM_PYTHON, shared / "tls_server.py", str(tls_port), shared / "cert.pem", shared / "key.pem"],
        env={**_base_env(), "OTEL_SERVICE_NAME": tls_name, "LD_LIBRARY_PATH": str(libdir)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    procs.append(tls_srv)
    wait_port(http_port)
    wait_port(tls_port)
    assert str(libdir / "libssl.so.3") in Path(f"/proc/{tls_srv.pid}/maps").read_text(), (
        "the copy is not used"
    )
    wait_port(server_port, timeout_s=60)

    # --- the agent unit: its ExecStart (paths and server URL localized), its environment file.
    agent_env_file = tmp_path / "agent.env"
    agent_env_file.write_text(f"DEEPTRACE_TOKEN={token}\nDEEPTRACE_SERVER=http://127.0.0.1:{server_port}\n")
    agent_env = agent_unit.environment({"/etc/deeptrace/agent.env": agent_env_file})
    no_new_privs = agent_unit.value("NoNewPrivileges") == "yes"

    def agent(name: str, without: set[str], ship: bool, read_only: bool = False):
        state = tmp_path / f"state-{name}"
        state.mkdir()
        argv = _localize(
            agent_unit.exec_start(agent_env), {INSTALLED: str(DEEPTRACE), "/var/lib/deeptrace": str(state)}
        )
        out = tmp_path / f"spans-{name}.jsonl"
        if not ship:  # the same agent writing its spans to a file instead of the server
            i = argv.index("--server")
            argv[i : i + 2] = ["--out", str(out)]
        argv = [*setpriv_argv(caps - without, no_new_privs), *argv]
        if read_only:
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-ec", _READ_ONLY, "sh", *argv]
        err = tmp_path / f"agent-{name}.err"
        p = subprocess.Popen(argv, env={**_base_env(), **agent_env, "STATE": str(state)}, stdout=subprocess.DEVNULL,
                             stderr=open(err, "w"))  # noqa: SIM115  # fmt: skip
        procs.append(p)
        return p, err, out, state

    runs = {
        "unit": agent("unit", set(), ship=True, read_only=True),
        "no-sys_admin": agent("no-sys_admin", {"sys_admin"}, ship=False),
        "no-sys_ptrace": agent("no-sys_ptrace", {"sys_ptrace"}, ship=False),
        "no-dac_read_search": agent("no-dac_read_search", {"dac_read_search"}, ship=False),
        "no-bpf": agent("no-bpf", {"sys_admin", "bpf"}, ship=False),
        "no-perfmon": agent("no-perfmon", {"sys_admin", "perfmon"}, ship=False),
    }
    started = {name: _wait_line(p, err, "deeptrace: tracing", 240) for name, (p, err, _o, _s) in runs.items()}

    # Without CAP_BPF (and CAP_SYS_ADMIN, which implies it) or CAP_PERFMON: a clear error, exit 2.
    for name in ("no-bpf", "no-perfmon"):
        p, err, _out, _state = runs[name]
        assert not started[name], f"{name}: the agent started without the capability"
        assert p.wait(60) == 2, name
        text = err.read_text()
        assert "deeptrace: error: loading deeptrace" in text and "EPERM" in text, text[-2000:]
    for name in ("unit", "no-sys_admin", "no-sys_ptrace", "no-dac_read_search"):
        assert started[name], f"{name}: {runs[name][1].read_text()[-3000:]}"

    unit_proc = runs["unit"][0]
    assert effective_capabilities(unit_proc.pid) == caps
    status = Path(f"/proc/{unit_proc.pid}/status").read_text()
    assert "NoNewPrivs:\t1" in status
    assert effective_capabilities(runs["no-sys_admin"][0].pid) == caps - {"sys_admin"}

    # The exchanges: plain HTTP and HTTPS, by curl (root, the system's libssl).
    for _ in range(6):
        subprocess.run(["curl", "-sf", "-o", "/dev/null", f"http://127.0.0.1:{http_port}/index.html"], check=True,
                       timeout=10)  # fmt: skip
        subprocess.run(
            ["curl", "-sfk", "-o", "/dev/null", f"https://127.0.0.1:{tls_port}/"], check=True, timeout=10
        )
        time.sleep(0.2)
    time.sleep(3)  # the agents' next refresh writes what is complete

    # The unit's agent shipped both services' spans to the server unit, which linked and stored
    # them: HTTP named from the process's environment, TLS read from the private libssl.
    base = f"http://127.0.0.1:{server_port}/api/v1"
    deadline = time.monotonic() + 60
    found: dict[str, list[dict]] = {}
    while time.monotonic() < deadline and len(found) < 2:
        for service in (http_name, tls_name):
            traces = _get_json(f"{base}/traces?service={service}&limit=50")["traces"]
            spans = [s for t in traces for s in _get_json(f"{base}/traces/{t['trace_id']}")["spans"]]
            if any(s["service"] == service and s["kind"] == "SERVER" for s in spans):
                found[service] = spans
        time.sleep(1)
    assert set(found) == {http_name, tls_name}, (found.keys(), runs["unit"][1].read_text()[-3000:])
    tls_server_spans = [s for s in found[tls_name] if s["service"] == tls_name and s["kind"] == "SERVER"]
    assert all(s["attributes"].get("tls") is True for s in tls_server_spans), tls_server_spans[0]
    assert any(s["name"] == "GET /index.html" for s in found[http_name] if s["service"] == http_name)
    state = runs["unit"][3]
    assert (state / "spool").is_dir(), "the spool is in the state directory"
    unit_err = runs["unit"][1].read_text()
    assert "read-only: could not remount" not in unit_err, unit_err

    # Stop the agents that write files (SIGTERM, as systemd stops them) and read what they saw.
    for name in ("no-sys_admin", "no-sys_ptrace", "no-dac_read_search"):
        runs[name][0].send_signal(signal.SIGTERM)
    for name in ("no-sys_admin", "no-sys_ptrace", "no-dac_read_search"):
        assert runs[name][0].wait(60) == 0, runs[name][1].read_text()[-3000:]
    spans = {name: _spans(runs[name][2]) for name in ("no-sys_admin", "no-sys_ptrace", "no-dac_read_search")}

    def exchanges(name, port, kind):
        return [s for s in spans[name] if s["kind"] == kind and port in (s["lport"], s["rport"])]

    # Without CAP_SYS_ADMIN: uprobes are refused, the agent says so, no TLS spans; the rest works.
    err = runs["no-sys_admin"][1].read_text()
    assert "TLS libraries not attached" in err and "EACCES" in err, err[-3000:]
    assert exchanges("no-sys_admin", http_port, "SERVER")
    assert not [s for s in spans["no-sys_admin"] if s["attributes"].get("tls")]
    # Without CAP_SYS_PTRACE: the system's libssl (curl's) is read, the private copy the server
    # maps is not: it is reached only through /proc/PID/root.
    assert [s for s in exchanges("no-sys_ptrace", tls_port, "CLIENT") if s["attributes"].get("tls")]
    assert not exchanges("no-sys_ptrace", tls_port, "SERVER")
    # Without CAP_DAC_READ_SEARCH: /proc/PID/environ (mode 0400, user nobody) is closed, so the
    # service is guessed from the command line instead of OTEL_SERVICE_NAME.
    plain = exchanges("no-dac_read_search", http_port, "SERVER")
    assert plain and all(s["service"] != http_name for s in plain), plain[:1]
    assert all(s["service"] == "server" for s in plain)  # `python3 -m http.server`

    # The server: stopped as systemd stops it; every system call it made is one its
    # SystemCallFilter allows (strace counted them).
    (server_pid,) = _children(server.pid)
    os.kill(server_pid, signal.SIGTERM)
    server.wait(60)
    used = strace_summary_syscalls(strace_out)
    assert {"accept4", "bind", "listen"} <= used, used  # it served
    allowed = allowed_syscalls(server_unit.values("SystemCallFilter"))
    assert used - allowed == set(), (
        f"the server made system calls its unit's filter refuses: {used - allowed}"
    )


_TLS_SERVER = """
import http.server, ssl, sys

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello over tls\\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
server = http.server.HTTPServer(("127.0.0.1", port), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"""


def _base_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C.UTF-8"}


# ---------------------------------------------------------------------------------------------
# Kubernetes manifests and the Helm chart

K8S_VERSION = "1.33.0"  # a recent release kubernetes-validate bundles schemas for
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
CHART = DEPLOY / "helm" / "deeptrace"
RENDER_SRC = DEPLOY / "helm" / "render" / "main.go"
GOPATH = "/usr/share/gocode"


def _documents(text: str) -> list[dict]:
    import yaml

    return [d for d in yaml.safe_load_all(text) if d]


def _validate(doc: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.fixture(scope="session")
def helm_render(tmp_path_factory) -> Path:
    """deploy/helm/render built with Debian's Go and sprig (not helm: see its header)."""
    go = shutil.which("go")
    sprig = Path(GOPATH, "src/github.com/Masterminds/sprig")
    yaml3 = Path(GOPATH, "src/gopkg.in/yaml.v3")
    missing = [str(p) for p in (sprig, yaml3) if not p.is_dir()]
    if go is None or missing:
        pytest.skip(f"rendering the chart needs Go and {', '.join(missing) or 'sprig'} (Debian: apt-get install "
                    "golang-go golang-github-masterminds-sprig-dev golang-gopkg-yaml.v3-dev; make setup does)")  # fmt: skip
    out = tmp_path_factory.mktemp("render") / "helm-render"
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": GOPATH, "GOFLAGS": ""}
    env.setdefault("GOCACHE", str(tmp_path_factory.mktemp("gocache")))
    subprocess.run([go, "build", "-o", str(out), str(RENDER_SRC)], check=True, env=env, timeout=300)
    return out


def _render(helm_render: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(helm_render), *args, str(CHART)], check=False, capture_output=True, text=True, timeout=60
    )


def _objects(docs: list[dict]) -> dict[tuple[str, str, str | None], dict]:
    return {(d["kind"], d["metadata"]["name"], d["metadata"].get("namespace")): d for d in docs}


def test_manifests_validate_against_kubernetes_schemas():
    docs = [d for m in MANIFESTS for d in _documents(m.read_text())]
    for doc in docs:
        _validate(doc)
    kinds = {(k, n) for k, n, _ns in _objects(docs)}
    assert kinds == {("Namespace", "deeptrace"), ("ServiceAccount", "deeptrace-agent"),
                     ("ClusterRole", "deeptrace-agent"), ("ClusterRoleBinding", "deeptrace-agent"),
                     ("Service", "clickhouse"), ("StatefulSet", "clickhouse"), ("Service", "deeptrace-server"),
                     ("Deployment", "deeptrace-server"), ("DaemonSet", "deeptrace-agent")}  # fmt: skip


def test_schema_validation_can_fail():
    import kubernetes_validate

    (ds,) = _documents((DEPLOY / "kubernetes" / "agent.yaml").read_text())
    ds["spec"]["template"]["spec"]["hostPid"] = True  # a misspelt field: strict mode refuses it
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(ds)


def test_agent_manifest_matches_the_unit_and_the_cli():
    (ds,) = _documents((DEPLOY / "kubernetes" / "agent.yaml").read_text())
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["capabilities"]["drop"] == ["ALL"]
    unit_caps = read_unit(AGENT_UNIT).capabilities("CapabilityBoundingSet")
    assert {x.lower() for x in sc["capabilities"]["add"]} == unit_caps | {"sys_resource"}
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["DEEPTRACE_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "token"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/sys/kernel/btf"]["readOnly"] and mounts["/sys/kernel/tracing"]["readOnly"]
    helptext = subprocess.run(
        [str(DEEPTRACE), "agent", "--help"], check=True, capture_output=True, text=True
    ).stdout
    for arg in c["args"][1:]:
        assert f"  {arg.split('=')[0]} " in helptext or f"/ {arg.split('=')[0]} " in helptext, arg
    server = next(a for a in c["args"] if a.startswith("--server="))
    assert server == "--server=http://deeptrace-server.deeptrace.svc:8700"
    (svc, dep) = _documents((DEPLOY / "kubernetes" / "server.yaml").read_text())
    assert svc["spec"]["ports"][0]["port"] == 8700
    server_args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    server_help = subprocess.run(
        [str(DEEPTRACE), "server", "--help"], check=True, capture_output=True, text=True
    ).stdout
    for arg in server_args[1:]:
        assert f"  {arg.split('=')[0]} " in server_help, arg
    assert "--store=clickhouse://deeptrace@clickhouse:9000/deeptrace" in server_args
    images = {c["image"] for d in _documents((DEPLOY / "kubernetes" / "server.yaml").read_text())[1:] + [ds]
              for c in d["spec"]["template"]["spec"]["containers"]}  # fmt: skip
    assert images == {"ghcr.io/deeptrace/deeptrace:0.1"}


def test_yamllint(helm_render, tmp_path):
    from yamllint import config, linter

    conf = config.YamlLintConfig(file=str(DEPLOY / ".yamllint.yaml"))
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(_render(helm_render).stdout)
    problems = []
    for path in [
        *MANIFESTS,
        CHART / "Chart.yaml",
        CHART / "values.yaml",
        DEPLOY / ".yamllint.yaml",
        rendered,
    ]:
        problems += [f"{path.name}:{p.line}: {p.desc}" for p in linter.run(path.read_text(), conf)]
    assert problems == []
    bad = linter.run("a:  1\nb: [1,2]\n", conf)  # the linter does find problems
    assert bad


@pytest.mark.parametrize(
    "args", [(), ("--set", "clickhouse.enabled=false")], ids=["default", "no-clickhouse"]
)
def test_chart_renders_the_manifests(helm_render, args):
    """The chart with default values renders exactly the plain manifests' objects (field by
    field); without ClickHouse, the same less ClickHouse's two objects, and one server on an
    embedded DuckDB file instead of two on ClickHouse."""
    r = _render(helm_render, *args)
    assert r.returncode == 0, r.stderr
    docs = _documents(r.stdout)
    for doc in docs:
        _validate(doc)
    rendered = _objects(docs)
    manifests = _objects([d for m in MANIFESTS for d in _documents(m.read_text())])
    if not args:
        assert rendered.keys() == manifests.keys()
        for key, obj in manifests.items():
            assert rendered[key] == obj, key
        return
    assert rendered.keys() == manifests.keys() - {("Service", "clickhouse", "deeptrace"),
                                                  ("StatefulSet", "clickhouse", "deeptrace")}  # fmt: skip
    dep = rendered[("Deployment", "deeptrace-server", "deeptrace")]
    assert dep["spec"]["replicas"] == 1
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert "--store=duckdb:////var/lib/deeptrace-server/traces.duckdb" in c["args"]
    assert "CLICKHOUSE_PASSWORD" not in {e["name"] for e in c["env"]}


def test_chart_values(helm_render):
    """Namespace, image, the Secret and required values."""
    r = _render(helm_render, "--set", "namespace.name=tracing", "--set", "image.repository=example.org/dt",
                "--set", "image.tag=9", "--set", "secret.create=true", "--set", "secret.token=t0k",
                "--set", "secret.clickhousePassword=pw")  # fmt: skip
    assert r.returncode == 0, r.stderr
    docs = _documents(r.stdout)
    for doc in docs:
        _validate(doc)
    objs = _objects(docs)
    assert {ns for _k, _n, ns in objs if ns} == {"tracing"}
    assert objs[("Secret", "deeptrace", "tracing")]["stringData"] == {
        "token": "t0k",
        "clickhouse-password": "pw",
    }
    ds = objs[("DaemonSet", "deeptrace-agent", "tracing")]["spec"]["template"]["spec"]["containers"][0]
    assert ds["image"] == "example.org/dt:9"
    assert "--server=http://deeptrace-server.tracing.svc:8700" in ds["args"]
    r = _render(helm_render, "--set", "secret.create=true")
    assert r.returncode != 0 and "secret.token is required" in r.stderr


# ---------------------------------------------------------------------------------------------
# Dockerfile (parsed, not built)

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"


def test_dockerfile_refers_to_what_exists():
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(path=str(DOCKERFILE))
    stages = [i for i in parser.structure if i["instruction"] == "FROM"]
    assert [s["value"] for s in stages] == ["debian:bookworm-slim AS bpf", "node:20-bookworm-slim AS web",
                                            "python:3.11-slim-bookworm"]  # fmt: skip
    copies = [i["value"].split() for i in parser.structure if i["instruction"] == "COPY"]
    for words in copies:
        if words[0].startswith("--from="):
            continue
        for src in words[:-1]:
            assert list(ROOT.glob(src.rstrip("/"))), f"COPY {src}: not in the repository"
    runs = " ".join(i["value"] for i in parser.structure if i["instruction"] == "RUN")
    assert "make bpf" in runs
    makefile = (ROOT / "Makefile").read_text()
    assert "\nbpf: $(BPF_OBJ) $(BPF_COMPAT)" in makefile
    # The objects the runtime stage takes from the bpf stage are the ones `make bpf` writes.
    (from_bpf,) = [w for w in copies if w[0] == "--from=bpf"]
    assert {Path(p).name for p in from_bpf[1:-1]} == {"deeptrace.bpf.o", "deeptrace-compat.bpf.o"}
    assert "BPF_OBJ   := $(BPF_DIR)/deeptrace.bpf.o" in makefile
    assert "BPF_COMPAT := $(BPF_DIR)/deeptrace-compat.bpf.o" in makefile
    # node_modules lands in the installed package's web directory, of the image's Python.
    (from_web,) = [w for w in copies if w[0] == "--from=web"]
    assert from_web[-1] == "/opt/deeptrace/lib/python3.11/site-packages/deeptrace/server/web/node_modules"
    assert parser.baseimage == "python:3.11-slim-bookworm"
    assert "/opt/deeptrace/bin" in parser.envs["PATH"]
    assert json.loads(next(i["value"] for i in parser.structure if i["instruction"] == "ENTRYPOINT")) == [
        "deeptrace"
    ]
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "**/node_modules", "**/*.bpf.o"} <= set(ignore)
