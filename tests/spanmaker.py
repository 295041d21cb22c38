"""Spans built by hand, in the agent's JSON format, for association tests."""

from __future__ import annotations

import base64
import itertools

_ids = itertools.count(1)
# Ports stay valid however many spans a session makes (the schema refuses a port past 65535,
# and the simulated services make tens of thousands of spans).
_ports = itertools.cycle(range(40000, 65536))


def span(kind: str, pid: int, start: int, end: int, name: str = "op", tid: int | None = None, host: str = "h1",
         req: bytes = b"", resp: bytes = b"", laddr: str = "10.0.0.1", lport: int = 8080, raddr: str = "10.0.0.2",
         rport: int | None = None, req_seq=None, resp_seq=None, attributes: dict | None = None,
         protocol: str = "http1", service: str | None = None) -> dict:  # fmt: skip
    """Times are in µs for readability; spans carry ns."""
    n = next(_ids)
    return {
        "trace_id": f"{n:032x}", "span_id": f"{n:016x}", "parent_span_id": None, "kind": kind, "name": name,
        "protocol": protocol, "service": service or f"svc{pid}", "host": host, "pid": pid,
        "tid": pid if tid is None else tid, "resp_tid": pid if tid is None else tid,
        "start_ns": start * 1000, "end_ns": end * 1000, "duration_ns": (end - start) * 1000, "status": "ok",
        "status_code": None, "laddr": laddr, "lport": lport, "raddr": raddr,
        "rport": next(_ports) if rport is None else rport, "conn_id": n, "req_size": len(req),
        "resp_size": len(resp), "req_seq": req_seq, "resp_seq": resp_seq, "attributes": attributes or {},
        "req_head": base64.b64encode(req).decode(), "resp_head": base64.b64encode(resp).decode(),
    }  # fmt: skip


def next_port() -> int:
    return next(_ports)


def server(pid: int, start: int, end: int, **kw) -> dict:
    return span("SERVER", pid, start, end, **kw)


def client(pid: int, start: int, end: int, **kw) -> dict:
    kw.setdefault("lport", next(_ports))
    kw.setdefault("rport", 6379)
    return span("CLIENT", pid, start, end, **kw)


def call_pair(caller_pid: int, callee_pid: int, start: int, end: int, seq: int, name: str = "GET /x",
              caller_host: str = "h1", callee_host: str = "h2") -> tuple[dict, dict]:  # fmt: skip
    """The CLIENT span and the SERVER span of one call over one connection."""
    port = next(_ports)
    c = client(caller_pid, start, end, name=name, host=caller_host, laddr="10.0.0.1", lport=port, raddr="10.0.0.2",
               rport=80, req_seq=[seq, seq + 100], resp_seq=[seq + 5000, seq + 5200])  # fmt: skip
    s = server(callee_pid, start + 10, end - 10, name=name, host=callee_host, laddr="10.0.0.2", lport=80,
               raddr="10.0.0.1", rport=port, req_seq=[seq, seq + 100], resp_seq=[seq + 5000, seq + 5200])  # fmt: skip
    return c, s


def by_id(spans: list[dict]) -> dict[str, dict]:
    return {d["span_id"]: d for d in spans}


def parent_of(spans: list[dict], child: dict) -> dict | None:
    pid = child["parent_span_id"]
    return by_id(spans)[pid] if pid else None
