"""Child processes of the launcher: each in its own process group with its own log file, so
that stopping one stops what it forked (nginx's and gunicorn's workers) and a failure can
show what the process said."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_launcher() -> None:
    # Should the launcher itself be killed outright (SIGKILL, OOM), its children get SIGTERM
    # instead of running on. A change of user clears this: see infra.postgres.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class StartError(Exception):
    """Something did not start; the message says what and shows the end of its log."""


class Proc:
    def __init__(
        self,
        name: str,
        argv: list[str],
        log: Path,
        env: dict | None = None,
        cwd: Path | None = None,
        stop_signal: int = signal.SIGTERM,
    ) -> None:
        self.name, self.argv, self.log, self.stop_signal = name, argv, log, stop_signal
        with open(log, "ab") as out:
            # A session of its own: Ctrl-C in the terminal reaches the launcher alone, which
            # then stops everything in order (traffic first, the agents before the services).
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_die_with_launcher,  # noqa: PLW1509  (the launcher has one thread)
            )
        self.pid = self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace").rstrip("\n").splitlines()[-lines:]
        except OSError:
            return "(no log)"
        return "\n".join(f"    {line}" for line in text) or "    (empty log)"

    def failed(self, why: str) -> StartError:
        return StartError(f"{self.name} {why}; the end of {self.log}:\n{self.tail()}")

    def wait_until(self, ready, what: str, timeout_s: float = 30.0) -> None:
        """Poll ready() until true; the process dying or the time running out is a StartError."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            if not self.running():
                raise self.failed(f"exited with status {self.popen.returncode} before {what}")
            if time.monotonic() > deadline:
                raise self.failed(f"did not get {what} within {timeout_s:.0f}s")
            time.sleep(0.1)

    def stop(self, timeout_s: float = 10.0) -> None:
        """The stop signal to the whole group, then SIGKILL for whatever is left of it."""
        self._signal_group(self.stop_signal)
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
        # Also after a clean exit: workers of a master that died first are still in the group.
        self._signal_group(signal.SIGKILL)
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
