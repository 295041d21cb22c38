#!/usr/bin/env python3
"""What the agent costs a saturated application, and whether it keeps up with it.

Three cases, each with its own server on a free loopback port, loaded to saturation:

  nginx      1 worker, a static ~600-byte page, keep-alive, no access log;
             load: wrk -t1 -c16 -d<seconds>s
  nginx-https  the same over TLS (`listen ... ssl`, a self-signed P-256 certificate made
             with the openssl CLI; Debian's nginx and wrk both use OpenSSL, libssl3);
             load: wrk -t1 -c16 -d<seconds>s https://...
  redis      redis-server --save '' --appendonly no;
             load: redis-benchmark -t get,set -c 16 -P 1 -n 20000, run again and again
             until the phase has lasted <seconds> (it has no duration option)
  memcached  1 worker thread; load: memcaslap -T1 -c16 -t<seconds>s -X100 (libmemcached's
             tool: 90% get, 10% set of 100-byte values)

Each case runs three phases on the same server process: A1 without the agent, B with
`deeptrace agent --comm <server> --out <file>` (its spans written to a file), A2 without
the agent again. A1 and A2 bracket B, so drift of the machine shows as A1 != A2. For B:
requests/s against the mean of A1 and A2, the server's spans in the agent's file against
the requests the load tool completed, the agent's ring-buffer drops, and its CPU (cores
while the load ran, seconds over its whole life) and peak RSS. Targets: spans >= 0.99 x
requests with no drops, and B's throughput >= 95% of the baselines' mean. Nothing is
pinned to a CPU: server, load tool and agent share the machine's cores as they would.
A phase during which another process had BPF tracing programs loaded (a test run, another
agent) is flagged with a WARNING: those slow every syscall, baselines included.

Run as root from the repository root (about 40 seconds per case at 10-second phases):

    .venv/bin/python bench/app_impact/run.py [--seconds 10] [--cases nginx,nginx-https,redis,memcached] [--quick]
        [--json FILE]
        [--agent-cores N] [--agent-args "..."]

Progress goes to stderr; the table and, last, one JSON object with every figure to stdout.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from servers import nginx_conf  # the test suite's nginx set-up, with this benchmark's lines

AGENT = ROOT / ".venv/bin/deeptrace"
CONNECTIONS = 16
TARGET_SPANS = 0.99  # spans per request, with no drops
TARGET_THROUGHPUT = 0.95  # B against the mean of A1 and A2


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Load:
    """What a load tool completed in one phase, by its own count and clock."""

    requests: int
    seconds: float
    errors: int | None = None  # None: the tool does not report them

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


# ---- nginx + wrk ----

# sendfile off: the page goes out with its headers in one writev, a syscall the agent
# traces (it does not trace sendfile). keepalive_requests is raised so that wrk's 16
# connections live for the whole phase: the load is requests, not connection set-ups.
NGINX_HTTP = "access_log off; sendfile off; keepalive_timeout 65; keepalive_requests 1000000;"
PAGE = (  # 592 bytes
    "<!doctype html>\n<html><head><title>app impact</title></head><body>\n"
    + "<p>lorem ipsum dolor sit amet</p>\n" * 15
    + "</body></html>\n"
)


def nginx_server(tmp: Path, port: int) -> list[str]:
    (tmp / "page.html").write_text(PAGE)
    (tmp / "nginx.conf").write_text(nginx_conf(tmp, port, http=NGINX_HTTP, server="root {dir};"))
    return [need("nginx"), "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "error.log")]


def nginx_https_server(tmp: Path, port: int) -> list[str]:
    """nginx_server's page over TLS; the agent sees its plaintext at OpenSSL's SSL_read and
    SSL_write (uprobes), its ciphertext syscalls are counted, not written."""
    (tmp / "page.html").write_text(PAGE)
    run_tool([need("openssl"), "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
              "-subj", "/CN=localhost", "-days", "2", "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "cert.pem")],
             timeout=60)  # fmt: skip
    # TLS 1.3 as Debian's own nginx.conf enables it (nginx 1.22's default is TLS 1.2 at most).
    server = "root {dir}; ssl_certificate {dir}/cert.pem; ssl_certificate_key {dir}/key.pem; ssl_protocols TLSv1.2 TLSv1.3;"
    conf = nginx_conf(tmp, port, http=NGINX_HTTP, server=server)
    listen = f"listen 127.0.0.1:{port};"
    if conf.count(listen) != 1:
        raise RuntimeError(f"the test suite's nginx.conf has no single '{listen}' line to add ssl to")
    (tmp / "nginx.conf").write_text(conf.replace(listen, f"listen 127.0.0.1:{port} ssl;"))
    return [need("nginx"), "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "error.log")]


def wrk_https_load(port: int, seconds: float) -> Load:
    return wrk_load(port, seconds, "https")


def wrk_load(port: int, seconds: float, scheme: str = "http") -> Load:
    out = run_tool([need("wrk"), "-t1", f"-c{CONNECTIONS}", f"-d{round(seconds)}s",
                    f"{scheme}://127.0.0.1:{port}/page.html"], timeout=seconds + 60)  # fmt: skip
    requests, rps = re.search(r"(\d+) requests in ", out), re.search(r"Requests/sec:\s+([\d.]+)", out)
    if requests is None or rps is None:
        raise RuntimeError(f"wrk: no 'N requests in' or 'Requests/sec:' line in its output:\n{out}")
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = sum(map(int, socket_errors.groups())) if socket_errors else 0
    # Its time from Requests/sec, which it prints with more digits than the "in 10.10s".
    n = int(requests[1])
    return Load(n, n / float(rps[1]), errors + (int(non_2xx[1]) if non_2xx else 0))


# ---- redis-server + redis-benchmark ----

REDIS_CHUNK = 20_000  # -n per test and run: 40,000 commands, about a second here


def redis_server(tmp: Path, port: int) -> list[str]:
    return [need("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(tmp), "--logfile", str(tmp / "redis.log")]  # fmt: skip


def redis_load(port: int, seconds: float) -> Load:
    """redis-benchmark runs until `seconds` have passed. Time is its own (n / rps per test),
    so its start-up and connection set-up between runs do not count against the server."""
    requests, busy, started = 0, 0.0, time.monotonic()
    while time.monotonic() - started < seconds:
        out = run_tool([need("redis-benchmark"), "-h", "127.0.0.1", "-p", str(port), "-t", "get,set",
                        "-n", str(REDIS_CHUNK), "-c", str(CONNECTIONS), "-P", "1", "--csv"], timeout=600)  # fmt: skip
        rows = list(csv.DictReader(out.splitlines()))
        if {r["test"] for r in rows} != {"GET", "SET"}:
            raise RuntimeError(f"redis-benchmark: expected a GET and a SET row in its CSV:\n{out}")
        requests += REDIS_CHUNK * len(rows)
        busy += sum(REDIS_CHUNK / float(r["rps"]) for r in rows)
    return Load(requests, busy)


# ---- memcached + memcaslap ----


def memcached_server(tmp: Path, port: int) -> list[str]:
    # One worker thread, as nginx runs one worker; UDP off.
    return [need("memcached"), "-u", "nobody", "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-t", "1"]


def memcaslap_load(port: int, seconds: float) -> Load:
    """libmemcached's load tool: 90% get, 10% set of 100-byte values, 16 connections."""
    out = run_tool([need("memcaslap"), "-s", f"127.0.0.1:{port}", "-T", "1", "-c", str(CONNECTIONS),
                    "-t", f"{round(seconds)}s", "-X", "100"], timeout=seconds + 60)  # fmt: skip
    m = re.search(r"Run time: ([\d.]+)s Ops: (\d+) TPS: (\d+)", out)
    if m is None:
        raise RuntimeError(f"memcaslap: no 'Run time: ... Ops: ... TPS:' line in its output:\n{out}")
    return Load(int(m[2]), float(m[1]))


# ---- the cases ----


@dataclass(frozen=True)
class Case:
    name: str
    comm: str  # the server's process name, as the agent selects it
    tools: dict[str, str]  # binary -> Debian package
    server: Callable[[Path, int], list[str]]  # (temp dir, port) -> argv, run in the foreground
    load: Callable[[int, float], Load]  # (port, seconds) -> what the load completed
    span_names: frozenset[str]  # names of the spans that are the load's requests


CASES = {
    "nginx": Case("nginx", "nginx", {"nginx": "nginx", "wrk": "wrk"}, nginx_server, wrk_load,
                  frozenset({"GET /page.html"})),
    "nginx-https": Case("nginx-https", "nginx", {"nginx": "nginx", "wrk": "wrk", "openssl": "openssl"},
                        nginx_https_server, wrk_https_load, frozenset({"GET /page.html"})),
    "redis": Case("redis", "redis-server", {"redis-server": "redis-server", "redis-benchmark": "redis-tools"},
                  redis_server, redis_load, frozenset({"redis GET", "redis SET"})),
    "memcached": Case("memcached", "memcached", {"memcached": "memcached", "memcaslap": "libmemcached-tools"},
                      memcached_server, memcaslap_load, frozenset({"memcached get", "memcached set"})),
}  # fmt: skip


# ---- processes ----


def need(binary: str) -> str:
    # nginx lives in /usr/sbin, which a non-login root shell may not have on its PATH.
    path = shutil.which(binary, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if path is None:
        raise SystemExit(f"{binary} is not installed: apt-get install {package_of(binary)} (or `make setup`)")
    return path


def package_of(binary: str) -> str:
    return next((c.tools[binary] for c in CASES.values() if binary in c.tools), binary)


def run_tool(argv: list[str], timeout: float) -> str:
    """A load tool's stdout. subprocess.run kills it if we are interrupted meanwhile."""
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(
            f"{Path(argv[0]).name} failed ({done.returncode}): {done.stderr.strip() or done.stdout}"
        )
    return done.stdout


class Processes:
    """Everything started in a block, each in its own process group (so Ctrl-C reaches only
    this script, which stops them in order); what still runs at the end is terminated,
    then killed, children included."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Self:
        return self

    def start(self, argv: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=out, start_new_session=True)
        self.procs.append(proc)
        return proc

    def __exit__(self, *exc) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is not None:
                continue
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:  # its group is gone: it exited just now
                proc.wait()


def wait_for(
    what: str, ready: Callable[[], bool], proc: subprocess.Popen, log: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            state = "not ready" if proc.returncode is None else f"exited with {proc.returncode}"
            raise RuntimeError(f"{what} {state}; its log ends:\n{tail}")
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepting(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def other_tracers() -> int | None:
    """BPF programs on syscall tracepoints (or kprobes) loaded now by someone else: another
    agent, a test run. They slow every syscall of the server in every phase, so a run says
    when there were any. None: bpftool could not tell."""
    try:
        out = subprocess.run(
            ["bpftool", "prog", "show", "-j"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    tracing = {"tracepoint", "raw_tracepoint", "tracing", "kprobe"}
    # "iter" is bpftool's own pid iterator, loaded only while it lists programs.
    return sum(p["type"] in tracing and p.get("name") != "iter" for p in json.loads(out or "[]"))


# ---- the agent ----


def cpu_seconds(pid: int) -> float:
    """user + system time of a running process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_agent(proc: subprocess.Popen, timeout_s: float = 300) -> tuple[os.struct_rusage, float]:
    """SIGINT, as Ctrl-C: the agent drains its ring, writes the last spans and prints its
    summary. Reaped with wait4 for its whole life's CPU time and peak RSS. Returns (rusage,
    seconds it took to exit)."""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage, time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:  # then killed: its spans are incomplete
            progress(f"agent did not exit {timeout_s:.0f} s after SIGINT; killing it")
            os.killpg(proc.pid, signal.SIGKILL)
            timeout_s = float("inf")
        time.sleep(0.1)


STATS = re.compile(r"deeptrace: records (\d+) exchanges (\d+) spans (\d+) drops (\d+) sampled away (\d+) "
                   r"\(level (\d+)\) open connections (\d+)")  # fmt: skip
SUMMARY = re.compile(
    r"deeptrace: (\d+) records \(kernel submitted (\d+), truncated (\d+)\), (\d+) exchanges \(kernel submitted "
    r"(\d+); connections assembled (\d+), handed over (\d+)\); drops: (\d+)"
    r"(?:; sampled away: [^;]*; level now \d+\))?(?: \(([^)]*)\))?"  # the reasons come after the sampling part
)
TLS_SUMMARY = re.compile(r"; TLS: (\d+) plaintext records, (\d+) ciphertext calls not written")
SAMPLED = re.compile(r"sampled away: (\d+) records, (\d+) exchanges \((\d+) connections left out when first seen; "
                     r"level now (\d+)\)")  # fmt: skip


def agent_counters(log: str) -> dict:
    """Records and drops from the agent's stderr: its exit summary, else its last stats line."""
    levels = [int(m[5]) for m in STATS.findall(log)]
    sampled = {"max_sample_level": max(levels, default=0)}
    if m := TLS_SUMMARY.search(log):  # TLS connections' records: the plaintext, read at the library's calls
        sampled.update(tls_plaintext_records=int(m[1]), tls_ciphertext_calls=int(m[2]))
    if m := SAMPLED.search(log):
        sampled.update(sampled_records=int(m[1]), sampled_exchanges=int(m[2]), connections_left_out=int(m[3]),
                       final_sample_level=int(m[4]))  # fmt: skip
    if m := SUMMARY.search(log):
        reasons = dict(part.rsplit(" ", 1) for part in m[9].split(", ")) if m[9] else {}
        return {"records": int(m[1]), "kernel_submitted": int(m[2]), "truncated": int(m[3]), "exchanges": int(m[4]),
                "kernel_exchanges": int(m[5]), "connections_assembled": int(m[6]),
                "connections_handed_over": int(m[7]), "drops": int(m[8]),
                "drops_by_reason": {k: int(v) for k, v in reasons.items()}, "summary_seen": True, **sampled}  # fmt: skip
    records, exchanges, _, drops, *_ = (STATS.findall(log) or [("0",) * 7])[-1]
    return {"records": int(records), "exchanges": int(exchanges), "drops": int(drops), "drops_by_reason": {},
            "summary_seen": False, **sampled}  # fmt: skip


def count_spans(path: Path, port: int, names: frozenset[str]) -> dict:
    """The server's spans (SERVER kind, on our port): those named as the load's requests,
    by status, with the exchanges they stand for (their sampling.weight, else 1) and how
    many are not whole (marked partial, or without a response); any others by name (e.g.
    redis-benchmark's CONFIG GET at start-up)."""
    counted, weighted, not_whole, statuses, others = 0, 0, 0, Counter(), Counter()
    with open(path) as f:
        for line in f:
            span = json.loads(line)
            if span["kind"] != "SERVER" or span["lport"] != port:
                continue
            if span["name"] in names:
                attrs = span["attributes"]
                counted += 1
                weighted += attrs.get("sampling.weight", 1)
                not_whole += "deeptrace.partial" in attrs or "deeptrace.no_response" in attrs
                statuses[span["status"]] += 1
            else:
                others[span["name"]] += 1
    return {"spans": counted, "weighted_spans": weighted, "spans_not_whole": not_whole, "by_status": dict(statuses),
            "other_server_spans": dict(others)}  # fmt: skip


# ---- phases ----


def plain_phase(case: Case, port: int, seconds: float, label: str) -> dict:
    progress(f"{case.name} {label}: {seconds:.0f} s of load without the agent")
    tracers = other_tracers()
    load = case.load(port, seconds)
    progress(f"{case.name} {label}: {load.requests} requests, {load.rps:,.0f}/s")
    return {"requests": load.requests, "seconds": round(load.seconds, 3), "rps": round(load.rps, 1),
            "errors": load.errors, "other_tracers": max_known(tracers, other_tracers())}  # fmt: skip


def max_known(*counts: int | None) -> int | None:
    return max((c for c in counts if c is not None), default=None)


def agent_phase(case: Case, port: int, seconds: float, tmp: Path, procs: Processes, agent_args: list[str],
                agent_cores: float | None) -> dict:  # fmt: skip
    spans_file, log = tmp / "spans.jsonl", tmp / "agent.log"
    argv = [str(AGENT), "agent", "--comm", case.comm, "--out", str(spans_file), "--stats-interval", "1", *agent_args]
    limit = f", limited to {agent_cores} cores" if agent_cores else ""
    progress(f"{case.name} B: starting the agent ({' '.join(argv[1:])}{limit})")
    tracers = other_tracers()  # before ours are loaded
    agent = procs.start(argv, log)
    if agent_cores:
        cpu_limit(agent.pid, agent_cores)
    # Its first stats line comes after the programs are attached and its loop runs.
    wait_for("the agent", lambda: STATS.search(log.read_text()) is not None, agent, log, 120)
    progress(f"{case.name} B: agent attached; {seconds:.0f} s of load with the agent")
    cpu0, t0 = cpu_seconds(agent.pid), time.monotonic()
    load = case.load(port, seconds)
    load_cpu, load_wall = cpu_seconds(agent.pid) - cpu0, time.monotonic() - t0
    progress(f"{case.name} B: {load.requests} requests, {load.rps:,.0f}/s; stopping the agent")
    usage, exit_s = stop_agent(agent)
    tracers = max_known(tracers, other_tracers())
    counters = agent_counters(log.read_text(errors="replace"))
    progress(f"{case.name} B: agent exited ({agent.returncode}) after {exit_s:.1f} s; counting spans")
    spans = count_spans(spans_file, port, case.span_names) if spans_file.exists() else {"spans": 0}
    spans_file.unlink(missing_ok=True)  # up to a few hundred MB at 10 s
    return {
        "requests": load.requests, "seconds": round(load.seconds, 3), "rps": round(load.rps, 1),
        "errors": load.errors, "other_tracers": tracers, **spans,
        "spans_per_request": round(spans["spans"] / load.requests, 4),
        "weighted_spans_per_request": round(spans.get("weighted_spans", 0) / load.requests, 4),
        "agent": {
            **counters, "exit_code": agent.returncode, "exit_seconds": round(exit_s, 2),
            "cpu_seconds_during_load": round(load_cpu, 2), "cores_during_load": round(load_cpu / load_wall, 3),
            "cpu_seconds_total": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # ru_maxrss is in KiB on Linux
        },
    }  # fmt: skip


def cpu_limit(pid: int, cores: float) -> None:
    """Hold a process (and the threads it starts) to `cores` CPUs, as a container's CPU limit
    does: a cgroup with a CPU quota (cgroup v2 cpu.max, or v1's cpu controller)."""
    period = 100_000
    quota = max(1000, round(cores * period))
    v2, v1 = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/cpu")
    if (v2 / "cgroup.controllers").exists() and "cpu" in (v2 / "cgroup.controllers").read_text().split():
        root, settings = v2, {"cpu.max": f"{quota} {period}"}
    elif (v1 / "cpu.cfs_quota_us").exists():
        root, settings = v1, {"cpu.cfs_period_us": str(period), "cpu.cfs_quota_us": str(quota)}
    else:
        raise SystemExit("--agent-cores needs a cgroup CPU controller (cgroup v2 with cpu, or v1 mounted at "
                         f"{v1})")  # fmt: skip
    group = root / f"deeptrace-app-impact-{pid}"
    group.mkdir(exist_ok=True)
    CGROUPS.append(group)
    for name, value in settings.items():
        (group / name).write_text(value)
    (group / "cgroup.procs").write_text(str(pid))


CGROUPS: list[Path] = []  # made by cpu_limit; removed once their process is gone


def remove_cgroups() -> None:
    while CGROUPS:
        try:
            CGROUPS.pop().rmdir()
        except OSError:
            pass


def run_case(case: Case, seconds: float, agent_args: list[str], agent_cores: float | None) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"deeptrace-app-impact-{case.name}-") as d, Processes() as procs:
        tmp = Path(d)
        tmp.chmod(0o755)  # nginx's worker runs as nobody and reads the page from here
        port = free_port()
        log = tmp / "server.log"
        server = procs.start(case.server(tmp, port), log)
        wait_for(case.name, lambda: accepting(port), server, log, 15)
        progress(f"{case.name}: serving on 127.0.0.1:{port} (pid {server.pid})")
        phases = {
            "A1": plain_phase(case, port, seconds, "A1"),
            "B": agent_phase(case, port, seconds, tmp, procs, agent_args, agent_cores),
            "A2": plain_phase(case, port, seconds, "A2"),
        }
    baseline = (phases["A1"]["rps"] + phases["A2"]["rps"]) / 2
    b = phases["B"]
    throughput_ratio = b["rps"] / baseline
    return {
        "phases": phases,
        "baseline_rps": round(baseline, 1),
        "baseline_spread": round(abs(phases["A1"]["rps"] - phases["A2"]["rps"]) / baseline, 3),
        "throughput_ratio": round(throughput_ratio, 3),
        "spans_per_request": b["spans_per_request"],
        "weighted_spans_per_request": b["weighted_spans_per_request"],
        "spans_not_whole": b.get("spans_not_whole", 0),
        "drops": b["agent"]["drops"],
        "spans_target_met": b["spans_per_request"] >= TARGET_SPANS and b["agent"]["drops"] == 0,
        "throughput_target_met": throughput_ratio >= TARGET_THROUGHPUT,
    }


# ---- report ----


def print_table(results: dict[str, dict]) -> None:
    w = max(6, *map(len, results))
    head = (f"{'case':{w}} {'A1 req/s':>10} {'B req/s':>10} {'A2 req/s':>10} {'B/mean(A)':>9} {'B requests':>11} "
            f"{'spans':>10} {'spans/req':>9} {'drops':>9} {'agent cores':>11} {'agent CPU s':>11} {'agent RSS MiB':>13}")  # fmt: skip
    print(head)
    for name, r in results.items():
        p, agent = r["phases"], r["phases"]["B"]["agent"]
        print(f"{name:{w}} {p['A1']['rps']:>10,.0f} {p['B']['rps']:>10,.0f} {p['A2']['rps']:>10,.0f} "
              f"{r['throughput_ratio']:>9.3f} {p['B']['requests']:>11,} {p['B']['spans']:>10,} "
              f"{r['spans_per_request']:>9.3f} {r['drops']:>9,} {agent['cores_during_load']:>11.2f} "
              f"{agent['cpu_seconds_total']:>11.1f} {agent['peak_rss_mib']:>13.1f}")  # fmt: skip
    print(
        "agent cores: its CPU time while the load ran / that time; CPU s: its whole life (attach and drain included)"
    )
    for name, r in results.items():
        p = r["phases"]
        notes = [f"A1/A2 spread {r['baseline_spread']:.1%}"]
        notes += [f"{ph} load errors {p[ph]['errors']}" for ph in ("A1", "B", "A2") if p[ph]["errors"]]
        if p["B"]["agent"]["drops_by_reason"]:
            notes.append(
                "drops " + ", ".join(f"{k} {v:,}" for k, v in p["B"]["agent"]["drops_by_reason"].items())
            )
        if others := p["B"].get("other_server_spans"):
            notes.append("other server spans " + ", ".join(f"{k} {v}" for k, v in others.items()))
        if busy := {ph: p[ph]["other_tracers"] for ph in ("A1", "B", "A2") if p[ph]["other_tracers"]}:
            notes.append(f"WARNING: BPF tracing programs of another process were loaded (per phase: {busy})")
        if errors := {k: v for k, v in p["B"].get("by_status", {}).items() if k != "ok"}:
            notes.append(f"spans not ok {errors}")
        agent = p["B"]["agent"]
        if agent.get("max_sample_level"):
            notes.append(f"sampled: level up to {agent['max_sample_level']} (keeps 1 in {2 ** agent['max_sample_level']}), "
                         f"{agent.get('sampled_exchanges', 0):,} exchanges and {agent.get('sampled_records', 0):,} records "
                         f"left out; spans weighted by sampling.weight / requests {r['weighted_spans_per_request']:.3f}")  # fmt: skip
        if "tls_plaintext_records" in agent:
            notes.append(f"TLS: {agent['tls_plaintext_records']:,} plaintext records, "
                         f"{agent['tls_ciphertext_calls']:,} ciphertext calls not written")  # fmt: skip
        notes.append(f"spans not whole (partial or no response) {r['spans_not_whole']:,}")
        print(f"{name}: " + "; ".join(notes))
        print(f"{name}: target spans >= {TARGET_SPANS} x requests with no drops -> "
              f"{'met' if r['spans_target_met'] else 'NOT met'}; target throughput >= {TARGET_THROUGHPUT:.0%} "
              f"of baseline -> {'met' if r['throughput_target_met'] else 'NOT met'}")  # fmt: skip


def preflight(cases: list[Case]) -> None:
    if os.geteuid() != 0:
        raise SystemExit(
            "run as root: the agent loads eBPF programs (sudo .venv/bin/python bench/app_impact/run.py)"
        )
    if not AGENT.exists():
        raise SystemExit(f"{AGENT} is missing: run `make setup`")
    for case in cases:
        for binary in case.tools:
            need(binary)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    ap.add_argument(
        "--cases", default="nginx,nginx-https,redis,memcached", help="comma-separated: " + ", ".join(CASES)
    )
    ap.add_argument("--quick", action="store_true", help="3-second phases")
    ap.add_argument("--json", type=Path, help="also write the JSON result to this file")
    ap.add_argument("--agent-cores", type=float, default=None,
                    help="hold the agent to this many CPUs (a cgroup quota, as a container limit): load past "
                         "what it can follow, to see sampling at work")
    ap.add_argument("--agent-args", default="", help="more arguments for `deeptrace agent`, e.g. '--no-sampling'")
    args = ap.parse_args()
    if args.quick:
        args.seconds = 3.0
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    cases = [CASES[c] for c in args.cases.split(",")]
    preflight(cases)
    # SIGTERM unwinds like Ctrl-C, through every finally that stops what was started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))

    try:
        results = {case.name: run_case(case, args.seconds, args.agent_args.split(), args.agent_cores)
                   for case in cases}  # fmt: skip
    except KeyboardInterrupt:
        raise SystemExit("interrupted: everything started was stopped") from None
    finally:
        remove_cgroups()

    print_table(results)
    out = {
        "benchmark": "app_impact", "phase_seconds": args.seconds, "connections": CONNECTIONS,
        "cpus": os.cpu_count(), "agent_cores_limit": args.agent_cores, "agent_args": args.agent_args,
        "target_spans_per_request": TARGET_SPANS,
        "target_throughput_ratio": TARGET_THROUGHPUT, "cases": results,
    }  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
