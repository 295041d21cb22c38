"""Synthetic shop traffic in the agent's span format, for the server benchmark: each trace is
a gateway request, its call to a backend (client and server span, same TCP bytes) and the
backend's Redis call. Sizes of attributes and payload heads are like the agent's."""

from __future__ import annotations

import base64
import random

from deeptrace.capture.spans import new_id

OPERATIONS = [("GET /products/{id}", "catalog", 0.01), ("POST /checkout", "checkout", 0.05),
              ("GET /cart/{id}", "cart", 0.01)]  # fmt: skip


def _head(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def shop_spans(n_traces: int, start_ns: int, end_ns: int, rng: random.Random, linked: bool = False) -> list[dict]:
    spans = []
    for _ in range(n_traces):
        op, backend, error_rate = rng.choice(OPERATIONS)
        t0 = rng.randrange(start_ns, end_ns - 10**9)
        dur = int(rng.lognormvariate(15.5, 0.8))  # ~5 ms median, a long tail
        failed = rng.random() < error_rate
        seq = rng.randrange(1, 2**31)
        port = rng.randrange(30000, 60000)
        trace = new_id(16)
        root = _span(trace, "SERVER", op, "gateway", "h1", 100, t0, t0 + dur, failed, "10.0.0.1", 80, "10.0.0.99",
                     rng.randrange(30000, 60000), None)  # fmt: skip
        call = _span(trace, "CLIENT", op, "gateway", "h1", 100, t0 + dur // 10, t0 + dur * 9 // 10, failed,
                     "10.0.0.1", port, "10.0.0.2", 8000, (seq, seq + 180))  # fmt: skip
        served = _span(trace, "SERVER", op, backend, "h2", 200, t0 + dur // 10 + 50_000, t0 + dur * 9 // 10 - 50_000,
                       failed, "10.0.0.2", 8000, "10.0.0.1", port, (seq, seq + 180))  # fmt: skip
        cache = _span(trace, "CLIENT", "redis GET", backend, "h2", 200, t0 + dur // 5, t0 + dur // 5 + 200_000,
                      False, "10.0.0.2", rng.randrange(30000, 60000), "10.0.0.9", 6379, None, protocol="redis")  # fmt: skip
        if linked:
            call["parent_span_id"], served["parent_span_id"] = root["span_id"], call["span_id"]
            cache["parent_span_id"] = served["span_id"]
            call["peer_service"], served["peer_service"], cache["peer_service"] = backend, "gateway", "redis 10.0.0.9:6379"
            for d, method in ((root, "root"), (call, "inferred"), (served, "seq-join"), (cache, "inferred")):
                d["link_method"], d["link_confidence"] = method, 1.0 if method != "inferred" else 0.93
        else:
            for d in (call, served, cache):
                d["trace_id"] = new_id(16)
        spans += [root, call, served, cache]
    return spans


def _span(trace, kind, name, service, host, pid, start, end, failed, laddr, lport, raddr, rport, seq,
          protocol="http") -> dict:  # fmt: skip
    code = ("409" if failed else "200") if protocol == "http" else None
    attrs = ({"http.request.method": name.split()[0], "url.path": name.split()[1], "http.response.status_code": int(code),
              "server.address": raddr} if protocol == "http" else {"db.system": "redis", "db.operation.name": "GET"})  # fmt: skip
    return {
        "trace_id": trace, "span_id": new_id(8), "parent_span_id": None, "kind": kind, "name": name,
        "protocol": protocol, "service": service, "host": host, "pid": pid, "tid": pid + 1, "resp_tid": pid + 1,
        "start_ns": start, "end_ns": end, "duration_ns": end - start, "status": "error" if failed else "ok",
        "status_code": code, "laddr": laddr, "lport": lport, "raddr": raddr, "rport": rport, "conn_id": lport,
        "req_size": 180, "resp_size": 950, "req_seq": list(seq) if seq else None,
        "resp_seq": [seq[0] + 10**6, seq[0] + 10**6 + 950] if seq else None, "attributes": attrs,
        "req_head": _head(f"{name.split()[0]} /x HTTP/1.1\r\nHost: {raddr}\r\nUser-Agent: shop\r\nAccept: */*\r\n\r\n"),
        "resp_head": _head("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 950\r\n\r\n{\"id\": 1}"),
    }  # fmt: skip
