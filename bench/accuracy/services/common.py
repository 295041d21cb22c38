"""What every service shares: its configuration and its ground-truth log.

Ground truth is written by the services themselves, to files: the agent only sees inet
sockets, so nothing here is visible to it, and nothing here is derived from what it saw.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import socket
import threading
import time
import weakref
from contextlib import contextmanager
from contextvars import ContextVar

CONFIG = json.loads(os.environ.get("ACCURACY_CONFIG", "{}"))  # ports and paths, from workload.py

def now_ns() -> int:
    """CLOCK_MONOTONIC, as the agent's kernel stamps; records say so ("clock") and the
    benchmark adds the agent's offset: this VM's wall clock can move by tens of ms in a run."""
    return time.monotonic_ns()


# The SERVER record of the request being handled. A ContextVar is per asyncio task (copied into
# gather's children) and per thread, so one mechanism fits every framework used here.
_current: ContextVar[str | None] = ContextVar("current_request", default=None)


class TruthLog:
    """One JSON line per request handled and per call made, in a file of this process."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.pid = os.getpid()
        path = os.path.join(CONFIG["truth_dir"], f"{service}-{self.pid}.jsonl")
        # Buffered, flushed at exit: a write per record would add a syscall per call in the
        # traced process, and the services are shut down cleanly (SIGTERM).
        self._file = open(path, "a", buffering=1 << 20)  # noqa: SIM115  (closed at exit)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        atexit.register(self.close)

    def _write(self, rec: dict) -> None:
        line = json.dumps(rec) + "\n"
        with self._lock:
            self._file.write(line)

    def close(self) -> None:
        with self._lock:
            self._file.flush()

    @contextmanager
    def serving(self, op: str, port: int, peer_port: int, key: str | None = None, on_done=None):
        """Around a request handler; calls made inside are its children. `on_done(callback)`,
        when the framework has such a hook, has the record also say when the response was
        out (t_done): a bound on the exchange's end, which tells apart requests that share
        a connection (HTTP/2) when their responses leave in another order than their
        handlers finished."""
        rec = {"kind": "SERVER", "service": self.service, "pid": self.pid, "id": f"{self.pid}-{next(self._ids)}",
               "op": op, "port": port, "peer_port": peer_port, "key": key, "ok": True, "clock": "monotonic", "t0": now_ns()}  # fmt: skip
        token = _current.set(rec["id"])
        try:
            with _outcome(rec):
                yield rec
        finally:
            _current.reset(token)
            if on_done is None or not on_done(lambda: self._write({**rec, "t_done": now_ns()})):
                self._write(rec)

    @contextmanager
    def calling(self, op: str, peer_port: int, key: str | None = None):
        """Around one outgoing call; the caller fills in rec["lport"] when it can learn it, and
        rec["t_conn"] when the call may wait for a pooled connection inside the window.
        `key` names what the callee will see (e.g. "user:42"), so that the callee's own
        record can be matched to this one without the wire."""
        rec = {"kind": "CLIENT", "service": self.service, "pid": self.pid, "id": f"{self.pid}-{next(self._ids)}",
               "parent": _current.get(), "op": op, "peer_port": peer_port, "lport": None, "key": key, "ok": True,
               "clock": "monotonic", "t0": now_ns()}  # fmt: skip
        try:
            with _outcome(rec):
                yield rec
        finally:
            self._write(rec)


@contextmanager
def _outcome(rec: dict):
    """Whether the block raised, and when it ended."""
    try:
        yield rec
    except BaseException:
        rec["ok"] = False
        raise
    finally:
        rec["t1"] = now_ns()


_logs: dict[int, TruthLog] = {}
_logs_lock = threading.Lock()


def truth(service: str) -> TruthLog:
    """This process's log (gunicorn forks workers after import: one log per pid)."""
    log = _logs.get(os.getpid())
    if log is None:
        with _logs_lock:  # a threaded worker's first requests come together: one log, one id counter
            log = _logs.get(os.getpid())
            if log is None:
                log = _logs[os.getpid()] = TruthLog(service)
    return log


def fd_lport(fd: int) -> int:
    """Local port of a socket we only have the fd of. detach(), not close(): closing even a
    dup would show the agent a close on a connection that is still in use."""
    s = socket.socket(fileno=fd)
    try:
        return s.getsockname()[1]
    finally:
        s.detach()


_pg_ports: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def pg_lport(conn) -> int:
    """Local port of a psycopg connection (asked once per connection)."""
    port = _pg_ports.get(conn)
    if port is None:
        port = _pg_ports[conn] = fd_lport(conn.pgconn.socket)
    return port


def redis_lport(client) -> int:
    """Local port of a single-connection redis client, asyncio or threaded. redis-py has no
    public accessor for its socket, hence the private attributes."""
    conn = client.connection
    sock = getattr(conn, "_sock", None)
    if sock is not None:
        return sock.getsockname()[1]
    return conn._writer.get_extra_info("sockname")[1]


def redis_options() -> dict:
    # No CLIENT SETINFO on connect: those calls belong to no request and would only be noise.
    return {"host": "127.0.0.1", "port": CONFIG["redis_port"], "driver_info": None}


def redis_pool():
    """An asyncio Redis client whose calls wait for a free pooled connection (up to 10 s)
    rather than fail when all 64 are busy."""
    import redis.asyncio as aioredis

    return aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool(**redis_options(), max_connections=64,
                                                                          timeout=10))  # fmt: skip


def pg_dsn() -> str:
    return f"host=127.0.0.1 port={CONFIG['pg_port']} user=postgres dbname=shop"
