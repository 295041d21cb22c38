"""`deeptrace record` end to end, and the errors a user gets instead of tracebacks."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TRACEE, require_bpf

DEEPTRACE = [sys.executable, "-m", "deeptrace.cli"]
KEYS = {
    "tgid", "tid", "comm", "syscall", "direction", "family", "l4", "laddr", "lport", "raddr", "rport",
    "conn_id", "enter_ns", "exit_ns", "enter_seq", "exit_seq", "size", "captured", "payload_b64",
}  # fmt: skip


def test_record_writes_json_lines_and_a_summary(tmp_path):
    require_bpf()
    tracee = subprocess.Popen([sys.executable, str(TRACEE), "io", "sendmsg", "ipv6", "tcp", "200"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert tracee.stdout.readline().startswith("ready")
    out = tmp_path / "records.jsonl"
    rec = subprocess.Popen([*DEEPTRACE, "record", "--pid", str(tracee.pid), "--duration", "6", "--out", str(out)],
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    # Release the tracee once the recorder says it is tracing.
    assert "tracing pid" in rec.stderr.readline()
    tracee.stdin.write("go\n")
    tracee.stdin.flush()
    done = json.loads(tracee.stdout.readline()[5:])
    tracee.wait(10)
    _, err = rec.communicate(timeout=30)
    assert rec.returncode == 0, err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines and all(KEYS <= set(d) for d in lines)
    sent = next(d for d in lines if d["syscall"] == "sendmsg")
    assert base64.b64decode(sent["payload_b64"]) == bytes.fromhex(done["messages"][0])
    assert (sent["laddr"], sent["lport"]) == tuple(done["sender"])
    assert sent["family"] == "ipv6" and sent["l4"] == "tcp" and sent["direction"] == "egress"
    assert f"{len(lines)} records" in err and "drops: 0" in err


def test_stops_cleanly_on_sigint(tmp_path):
    require_bpf()
    rec = subprocess.Popen([*DEEPTRACE, "record", "--pid", str(os.getpid()), "--out", str(tmp_path / "o")],
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert "tracing" in rec.stderr.readline()
    rec.send_signal(2)
    _, err = rec.communicate(timeout=20)
    assert rec.returncode == 0 and "records" in err and "Traceback" not in err


def _run(*args, env=None, user=None):
    cmd = [*DEEPTRACE, *args]
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=60)


def test_no_selection_is_a_usage_error():
    r = _run("record")
    assert r.returncode == 2 and "--pid PID, --comm NAME or --all" in r.stderr and "Traceback" not in r.stderr


def test_not_root_is_a_clear_error():
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")
    src = Path(__file__).resolve().parents[1] / "src"
    r = _run("record", "--all", "--duration", "1", user=65534, env={"PYTHONPATH": str(src)})
    assert r.returncode == 2, r.stderr
    assert "must run as root" in r.stderr and "Traceback" not in r.stderr


def test_missing_bpf_object_says_how_to_build_it(tmp_path):
    require_bpf()
    r = _run("record", "--all", "--duration", "1", env={"DEEPTRACE_BPF_OBJECT": str(tmp_path / "none.bpf.o")})
    assert r.returncode == 2 and "make bpf" in r.stderr and "Traceback" not in r.stderr


def test_verifier_rejection_shows_the_verifier_log(tmp_path):
    require_bpf()
    obj = tmp_path / "rejected.bpf.o"
    src = Path(__file__).parent / "bpf" / "rejected.bpf.c"
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", "-I/usr/include/x86_64-linux-gnu",
                    "-c", str(src), "-o", str(obj)], check=True)  # fmt: skip
    r = _run("record", "--all", "--duration", "1", env={"DEEPTRACE_BPF_OBJECT": str(obj)})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "verifier rejected" in r.stderr
    assert "invalid mem access" in r.stderr  # the verifier's own words, from its log


def test_bad_options_are_refused():
    assert "power of two" in _run("record", "--all", "--ring-size", "5000").stderr
    assert "between 0 and 16384" in _run("record", "--all", "--capture", "20000").stderr
    assert "no process with pid" in _run("record", "--pid", "999999999").stderr
    assert "longer than the 15" in _run("record", "--comm", "a-very-long-process-name").stderr
