"""A real `deeptrace server` in a subprocess, on a free loopback port, with its own store."""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx
from servers import free_port

TOKEN = "test-token"


class ServerProcess:
    def __init__(self, db: Path, port: int | None = None, args: tuple[str, ...] = (), token: str = TOKEN,
                 store: str | None = None) -> None:  # fmt: skip
        """db: the DuckDB file (and, beside it, the log); store: a store URL to use instead."""
        self.db, self.port, self.args, self.token, self.store = db, port or free_port(), args, token, store
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = db.with_suffix(".log")

    def start(self) -> ServerProcess:
        cmd = [sys.executable, "-m", "deeptrace.cli", "server", "--listen", f"127.0.0.1:{self.port}",
               *(("--store", self.store) if self.store else ("--db", str(self.db))), "--token", self.token,
               *self.args]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/api/v1/status", timeout=1).status_code in (200, 401):  # 401: --read-auth
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not come up: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def post(self, spans: list[dict], agent_id: str = "agent-1", batch_id: str | None = None,
             token: str | None = None, gz: bool = True) -> httpx.Response:  # fmt: skip
        body = json.dumps({"agent_id": agent_id, "batch_id": batch_id or uuid.uuid4().hex, "spans": spans}).encode()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token or self.token}"}
        if gz:
            body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
        return httpx.post(self.url + "/api/v1/spans", content=body, headers=headers, timeout=30)

    def get(self, path: str, **params) -> httpx.Response:
        return httpx.get(self.url + path, params=params, timeout=30)

    def wait_published(self, n: int, timeout_s: float = 30) -> dict:
        """Until the linker has written at least n spans; returns /api/v1/status."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.get("/api/v1/status").json()
            if status["store"]["spans"] >= n or time.monotonic() > deadline:
                return status
            time.sleep(0.1)


@contextmanager
def running_server(tmp: Path, args: tuple[str, ...] = ("--hold", "0.5"), **kw):
    server = ServerProcess(tmp / "store.duckdb", args=args, **kw).start()
    try:
        yield server
    finally:
        server.stop()
