"""Realistic traces for the web UI, sent to a running server through its ingest API.

A small shop behind nginx, spans in the agent's JSON format as agents on four hosts would
send them (each span is its own trace; the server links them):

    client -> nginx (web-1) -> gateway (gw-1) -> redis            (untraced, seen as CLIENT spans)
                                              -> users (users-1) -> postgres (untraced)
    client -> nginx -> reports (batch-1) -> redis x 1997           (one 2,000-span trace)
    ingress -> checkout (2 pods) -> cart                           (Kubernetes: namespace shop)
    ingress -> checkout                                            (namespace staging)
    client -> invoices                                             (a container on a plain Docker host)

Each nginx->gateway, gateway->users and nginx->reports call has a CLIENT span and a SERVER
span on mirrored 4-tuples of one keep-alive connection with the same req_seq, so the server's
seq-join links them exactly; gateway->users also carries x-request-id in and out (header-id);
the other calls out of a process are left to inference. Some traces fail: a statement timeout
in postgres turns into 500/502 up the chain, a Redis WRONGTYPE error stays local.

The Kubernetes and Docker traces carry the agent's attributes of where a process runs (pod,
workload, namespace, container), on hosts of their own, so the shop's traces and figures stay
as they are.

Run by hand against a server: python tests/ui_seed.py http://127.0.0.1:8700 TOKEN
"""

from __future__ import annotations

import base64
import gzip
import itertools
import json
import sys
import time
from dataclasses import dataclass, field

import httpx

MS = 1_000_000

HOSTS = {  # service -> (host, pid, address, listening port)
    "nginx": ("web-1", 1201, "10.1.0.10", 80),
    "gateway": ("gw-1", 2301, "10.1.0.20", 8080),
    "users": ("users-1", 3401, "10.1.0.30", 8000),
    "reports": ("batch-1", 4501, "10.1.0.60", 9000),
    "postgres": (None, None, "10.1.0.40", 5432),
    "redis": (None, None, "10.1.0.50", 6379),
    "checkout": ("node-a", 5101, "10.244.1.12", 8080),  # pod checkout-...-7xk2p; the others in PODS
    "cart": ("node-b", 6101, "10.244.2.23", 8080),
    "invoices": ("docker-1", 7101, "172.17.0.3", 8000),
}
KERNELS = {"web-1": "6.1.0-27-amd64", "gw-1": "6.1.0-27-amd64", "users-1": "6.8.0-45-generic",
           "batch-1": "5.15.0-119-generic", "node-a": "6.6.54-cos", "node-b": "6.6.54-cos",
           "docker-1": "6.1.0-27-amd64"}  # fmt: skip


@dataclass(frozen=True)
class Pod:
    namespace: str
    kind: str  # of its workload
    workload: str
    name: str
    uid: str
    node: str
    pid: int
    ip: str
    container_id: str
    qos: str = "Burstable"

    def attributes(self) -> dict:
        """What the agent adds to the spans of a process in this pod."""
        return {"k8s.namespace.name": self.namespace, "k8s.pod.name": self.name, "k8s.pod.uid": self.uid,
                "k8s.node.name": self.node, f"k8s.{self.kind}.name": self.workload, "k8s.workload.kind": self.kind,
                "k8s.workload.name": self.workload, "k8s.pod.qos_class": self.qos, "k8s.container.name": self.workload,
                "container.id": self.container_id, "container.runtime": "containerd"}  # fmt: skip


PODS = {
    "checkout-a": Pod("shop", "deployment", "checkout", "checkout-6b7f9c8d4-7xk2p", "3f1c2a7e-8b4d-4e6f-9a1b-2c3d4e5f6a7b",
                      "node-a", 5101, "10.244.1.12", "5c0ffee" + "1" * 57),
    "checkout-b": Pod("shop", "deployment", "checkout", "checkout-6b7f9c8d4-m9q4z", "8e2d4b6c-1a3f-4b5d-8c7e-9f0a1b2c3d4e",
                      "node-b", 5201, "10.244.2.17", "5c0ffee" + "2" * 57),
    "cart": Pod("shop", "statefulset", "cart", "cart-0", "0b1c2d3e-4f5a-4b6c-8d7e-8f9a0b1c2d3e",
                "node-b", 6101, "10.244.2.23", "ca47" + "3" * 60, qos="Guaranteed"),
    "checkout-staging": Pod("staging", "deployment", "checkout", "checkout-5f4d7c9b8-q2w3e",
                            "6a5b4c3d-2e1f-4a0b-9c8d-7e6f5a4b3c2d", "node-a", 5301, "10.244.1.40", "5747" + "4" * 60),
}  # fmt: skip
INVOICES_CONTAINER = {"container.name": "invoices", "container.id": "d0c4e7" + "5" * 58, "container.runtime": "docker"}


@dataclass
class Seed:
    spans: list[dict]
    agents: dict[str, dict]  # agent_id -> PUT body
    traces: dict[str, dict] = field(default_factory=dict)  # root trace_id -> what to expect

    @property
    def span_total(self) -> int:
        return len(self.spans)


class _Conn:
    """One keep-alive TCP connection: both ends' addresses and the byte counters that become req_seq."""

    _ports = itertools.count(41000)

    def __init__(self, caller: str, callee: str, seq0: int) -> None:
        self.caller, self.callee = caller, callee
        self.cport = next(self._ports)
        self.req_seq, self.resp_seq = seq0, seq0 * 3 + 7
        self.conn_id = self.cport

    def advance(self, req: bytes, resp: bytes) -> tuple[list[int], list[int]]:
        r = [self.req_seq, self.req_seq + len(req)]
        s = [self.resp_seq, self.resp_seq + len(resp)]
        self.req_seq, self.resp_seq = r[1], s[1]
        return r, s


class _Builder:
    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.ids = itertools.count(1)
        self.tids = itertools.count(100)

    def span(self, kind: str, service: str, name: str, protocol: str, start: int, end: int, *, laddr: str,
             lport: int, raddr: str, rport: int, conn_id: int, req: bytes, resp: bytes, req_seq=None, resp_seq=None,
             status: str = "ok", status_code: str | None = None, attributes: dict | None = None,
             trace_id: str | None = None, tid: int | None = None) -> dict:  # fmt: skip
        host, pid = HOSTS[service][0], HOSTS[service][1]
        n = next(self.ids)
        tid = tid if tid is not None else pid + 1 + n % 4
        d = {
            "trace_id": trace_id or f"{n:032x}", "span_id": f"{n:016x}", "parent_span_id": None, "kind": kind,
            "name": name, "protocol": protocol, "service": service, "host": host, "pid": pid, "tid": tid,
            "resp_tid": tid, "start_ns": start, "end_ns": end, "duration_ns": end - start, "status": status,
            "status_code": status_code, "laddr": laddr, "lport": lport, "raddr": raddr, "rport": rport,
            "conn_id": conn_id, "req_size": len(req), "resp_size": len(resp), "req_seq": req_seq,
            "resp_seq": resp_seq, "attributes": attributes or {},
            "req_head": base64.b64encode(req[:1024]).decode(), "resp_head": base64.b64encode(resp[:1024]).decode(),
        }  # fmt: skip
        self.spans.append(d)
        return d

    def call(self, conn: _Conn, name: str, protocol: str, c_start: int, c_end: int, req: bytes, resp: bytes,
             *, server: bool, status: str = "ok", code: str | None = None, c_attrs: dict | None = None,
             s_attrs: dict | None = None, s_status: str | None = None, s_code: str | None = None) -> list[dict]:  # fmt: skip
        """The caller's CLIENT span and, when the callee is traced, its SERVER span of one exchange."""
        caddr = HOSTS[conn.caller][2]
        saddr, sport = HOSTS[conn.callee][2], HOSTS[conn.callee][3]
        rseq, sseq = conn.advance(req, resp)
        out = [self.span("CLIENT", conn.caller, name, protocol, c_start, c_end, laddr=caddr, lport=conn.cport,
                         raddr=saddr, rport=sport, conn_id=conn.conn_id, req=req, resp=resp, req_seq=rseq,
                         resp_seq=sseq, status=status, status_code=code, attributes=c_attrs)]  # fmt: skip
        if server:
            # The callee reads the request a little after it was sent and answers a little before it arrives.
            out.append(self.span("SERVER", conn.callee, name, protocol, c_start + 120_000, c_end - 90_000,
                                 laddr=saddr, lport=sport, raddr=caddr, rport=conn.cport, conn_id=conn.conn_id + 500,
                                 req=req, resp=resp, req_seq=rseq, resp_seq=sseq, status=s_status or status,
                                 status_code=s_code if s_status else code, attributes=s_attrs or c_attrs))  # fmt: skip
        return out


def _http_req(method: str, path: str, host: str, extra: dict | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "User-Agent: shop-frontend/2.3", "Accept: application/json"]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _http_resp(code: int, reason: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def _http_attrs(method: str, path: str, code: int, rid: str | None = None) -> dict:
    a = {"http.request.method": method, "url.path": path, "network.protocol.version": "1.1",
         "http.response.status_code": code}  # fmt: skip
    if rid:
        a["http.request.header.x-request-id"] = rid
    return a


def _redis(*args: str) -> bytes:
    out = f"*{len(args)}\r\n"
    for a in args:
        out += f"${len(a.encode())}\r\n{a}\r\n"
    return out.encode()


def _pg_query(sql: str) -> bytes:
    body = sql.encode() + b"\x00"
    return b"Q" + (len(body) + 4).to_bytes(4, "big") + body


def _pg_rows(user_id: int) -> bytes:
    # RowDescription of (id int4, name varchar): per column name, table oid, attnum, type oid, size, typmod, format.
    cols = (b"\x00\x02" + b"id\x00" + b"\x00\x00\x40\x01\x00\x01\x00\x00\x00\x17\x00\x04\xff\xff\xff\xff\x00\x00"
            + b"name\x00" + b"\x00\x00\x40\x01\x00\x02\x00\x00\x04\x13\xff\xff\xff\xff\xff\xff\x00\x00")  # fmt: skip
    name = f"user-{user_id} \u00e9l\u00e8ve".encode()
    ident = str(user_id).encode()
    row = b"\x00\x02" + len(ident).to_bytes(4, "big") + ident + len(name).to_bytes(4, "big") + name
    return (b"T" + (len(cols) + 4).to_bytes(4, "big") + cols + b"D" + (len(row) + 4).to_bytes(4, "big") + row
            + b"C\x00\x00\x00\x0dSELECT 1\x00Z\x00\x00\x00\x05I")  # fmt: skip


def _pg_error() -> bytes:
    fields = b"SERROR\x00C57014\x00Mcanceling statement due to statement timeout\x00\x00"
    return b"E" + (len(fields) + 4).to_bytes(4, "big") + fields + b"Z\x00\x00\x00\x05I"


def build(now_ns: int | None = None, n_users: int = 28, n_catalog: int = 12, big_calls: int = 1997) -> Seed:
    """The spans of n_users + n_catalog + 1 traces in the last ten minutes, and what each should become."""
    now_ns = now_ns or time.time_ns()
    b = _Builder()
    nginx_gw = _Conn("nginx", "gateway", 1_000_000)
    gw_users = _Conn("gateway", "users", 5_000_000)
    gw_redis = _Conn("gateway", "redis", 9_000_000)
    users_pg = _Conn("users", "postgres", 13_000_000)
    nginx_reports = _Conn("nginx", "reports", 17_000_000)
    reports_redis = _Conn("reports", "redis", 21_000_000)
    client_ports = itertools.count(52000)
    traces: dict[str, dict] = {}

    def edge_span(name, path, method, start, end, req, resp, code, trace_id, rid=None):
        """nginx's SERVER span for a request from a browser, the root of its trace."""
        status = "error" if code >= 500 else "ok"
        return b.span("SERVER", "nginx", name, "http1", start, end, laddr=HOSTS["nginx"][2], lport=80,
                      raddr=f"203.0.113.{17 + start % 200}", rport=next(client_ports), conn_id=next(client_ports),
                      req=req, resp=resp, status=status, status_code=str(code) if status == "error" else None,
                      attributes=_http_attrs(method, path, code, rid), trace_id=trace_id)  # fmt: skip

    # The two kinds spread evenly, so every page and the scatter show both.
    n = n_users + n_catalog
    kinds = ["users"] * n
    for k in range(n_catalog):
        kinds[(k * n) // n_catalog + 1] = "catalog"
    span_every = 600 * 10**9 // (n + 2)
    # Every fifth catalog request finds the wrong type under its Redis key.
    catalog_failures = set([s for s in range(n) if kinds[s] == "catalog"][2::5])
    for slot, kind in enumerate(kinds):
        t = now_ns - 600 * 10**9 + (slot + 2) * span_every
        trace_id = f"{0xD7000000 + slot:08x}{slot:024x}"
        first = len(b.spans)
        if kind == "users":
            uid = 1000 + slot
            fail = slot % 6 == 5
            dur = (9 + (slot * 37) % 23) * MS + (180 * MS if fail else 0)
            rid = f"{slot:08x}-5eed-4c1d-9a0b-{slot * 7919:012x}"
            path, name = f"/api/users/{uid}", "GET /api/users/{id}"
            body = json.dumps({"id": uid, "name": f"user-{uid}"}).encode()
            err_body = b'{"error":"upstream timed out"}'
            ok_resp, bad_resp = _http_resp(200, "OK", body), _http_resp(502, "Bad Gateway", err_body)
            resp = bad_resp if fail else ok_resp
            code = 502 if fail else 200
            ext = _http_req("GET", path, "shop.example", {"Cookie": "[redacted]"})
            edge_span(name, path, "GET", t, t + dur, ext, resp, code, trace_id)
            fwd = _http_req("GET", path, "gateway.internal", {"X-Forwarded-For": "203.0.113.9", "X-Request-ID": rid})
            b.call(nginx_gw, name, "http1", t + 200_000, t + dur - 200_000, fwd, resp, server=True,
                   status="error" if fail else "ok", code="502" if fail else None,
                   c_attrs=_http_attrs("GET", path, code), s_attrs=_http_attrs("GET", path, code, rid))  # fmt: skip
            g0 = t + 500_000
            b.call(gw_redis, "redis GET", "redis", g0, g0 + 350_000, _redis("GET", f"session:{uid}"), b"$-1\r\n",
                   server=False, c_attrs={"db.system": "redis", "db.operation.name": "GET", "db.redis.key": f"session:{uid}",
                                          "db.redis.reply_type": "null"})  # fmt: skip
            u0, u1 = g0 + 700_000, t + dur - 700_000
            upath = f"/users/{uid}"
            ureq = _http_req("GET", upath, "users.internal", {"X-Request-ID": rid})
            ucode = 500 if fail else 200
            uresp = _http_resp(500, "Internal Server Error", b'{"error":"database timeout"}') if fail else ok_resp
            b.call(gw_users, "GET /users/{id}", "http1", u0, u1, ureq, uresp, server=True,
                   status="error" if fail else "ok", code="500" if fail else None,
                   c_attrs=_http_attrs("GET", upath, ucode, rid))  # fmt: skip
            q0, q1 = u0 + 500_000, u1 - 900_000
            sql = f"SELECT id, name FROM users WHERE id = {uid}"
            pg_attrs = {"db.system": "postgresql", "db.operation.name": "SELECT", "db.query.text": sql,
                        "db.postgresql.protocol": "simple"}  # fmt: skip
            if fail:
                pg_attrs |= {"db.response.status_code": "57014",
                             "db.response.error": "canceling statement due to statement timeout"}  # fmt: skip
            else:
                pg_attrs |= {"db.response.tag": "SELECT 1", "db.response.returned_rows": 1}
            b.call(users_pg, "SELECT users", "postgresql", q0, q1, _pg_query(sql),
                   _pg_error() if fail else _pg_rows(uid), server=False,
                   status="error" if fail else "ok", code="57014" if fail else None, c_attrs=pg_attrs)  # fmt: skip
            errors = 6 if fail else 0
        else:
            fail = slot in catalog_failures
            dur = (3 + (slot * 13) % 7) * MS
            path, name = "/api/catalog", "GET /api/catalog"
            body = json.dumps({"items": [{"sku": f"sku-{k}", "price": 10 + k} for k in range(3)]}).encode()
            resp = _http_resp(200, "OK", body)
            edge_span(name, path, "GET", t, t + dur, _http_req("GET", path, "shop.example"), resp, 200, trace_id)
            b.call(nginx_gw, name, "http1", t + 150_000, t + dur - 150_000,
                   _http_req("GET", path, "gateway.internal", {"X-Forwarded-For": "203.0.113.9"}), resp, server=True,
                   c_attrs=_http_attrs("GET", path, 200))  # fmt: skip
            g0 = t + 400_000
            key = "catalog:v1:all"
            wrongtype = "WRONGTYPE Operation against a key holding the wrong kind of value"
            rresp = f"-{wrongtype}\r\n".encode() if fail else b"$62\r\n" + body[:62] + b"\r\n"
            rattrs = {"db.system": "redis", "db.operation.name": "GET", "db.redis.key": key,
                      "db.redis.reply_type": "error" if fail else "bulk"}  # fmt: skip
            if fail:
                rattrs["db.response.error"] = wrongtype
            b.call(gw_redis, "redis GET", "redis", g0, g0 + 600_000, _redis("GET", key), rresp, server=False,
                   status="error" if fail else "ok", code="WRONGTYPE" if fail else None, c_attrs=rattrs)  # fmt: skip
            errors = 1 if fail else 0
        traces[trace_id] = {"kind": kind, "spans": len(b.spans) - first, "errors": errors,
                            "root_name": b.spans[first]["name"], "url_path": path}  # fmt: skip

    # The batch report: its own time slot, so its nginx call can only belong to its own request.
    t = now_ns - 600 * 10**9 + span_every // 4
    trace_id = f"{0xB16B16:08x}{0:024x}"
    first = len(b.spans)
    calls_end = t + 2 * MS + big_calls * 420_000
    dur = calls_end - t + 3 * MS
    body = b'{"report":"daily","rows":1997}'
    resp = _http_resp(200, "OK", body)
    path = "/api/reports/daily"
    edge_span("POST /api/reports/{name}", path, "POST", t, t + dur,
              _http_req("POST", path, "shop.example", body=b'{"day":"yesterday"}'), resp, 200, trace_id)
    b.call(nginx_reports, "POST /api/reports/{name}", "http1", t + 300_000, t + dur - 300_000,
           _http_req("POST", path, "reports.internal", body=b'{"day":"yesterday"}'), resp, server=True,
           c_attrs=_http_attrs("POST", path, 200))  # fmt: skip
    rtid = HOSTS["reports"][1] + 1
    for k in range(big_calls):
        c0 = t + 2 * MS + k * 420_000
        key = f"order:{k}"
        b.call(reports_redis, "redis HGETALL", "redis", c0, c0 + 300_000, _redis("HGETALL", key),
               b"*4\r\n$6\r\namount\r\n$4\r\n12.5\r\n$6\r\nstatus\r\n$4\r\npaid\r\n", server=False,
               c_attrs={"db.system": "redis", "db.operation.name": "HGETALL", "db.redis.key": key,
                        "db.redis.reply_type": "array"})  # fmt: skip
        b.spans[-1]["tid"] = b.spans[-1]["resp_tid"] = rtid
    traces[trace_id] = {"kind": "report", "spans": len(b.spans) - first, "errors": 0,
                        "root_name": "POST /api/reports/{name}", "url_path": path}  # fmt: skip
    traces |= _placed_traces(b, now_ns, span_every, n)

    agents = {}
    for host, *_ in HOSTS.values():
        if host is None:
            continue
        n = sum(1 for s in b.spans if s["host"] == host)
        agents[f"{host}-agent"] = {
            "host": host, "kernel": KERNELS[host], "version": "0.1.0", "started_ns": now_ns - 3600 * 10**9,
            "stats": {"records": n * 4, "spans": n, "drops": 3 if host == "batch-1" else 0, "cpu_seconds": 12.5,
                      "rss_bytes": 48 << 20, "spool_batches": 0, "spool_bytes": 0, "spool_dropped_batches": 0,
                      "spool_dropped_spans": 0, "spool_write_failed_batches": 2 if host == "batch-1" else 0,
                      "spool_write_failed_spans": 140 if host == "batch-1" else 0, "sent_batches": 12,
                      "sent_spans": n, "send_failures": 0},
        }  # fmt: skip
    return Seed(b.spans, agents, traces)


def _placed_traces(b: _Builder, now_ns: int, span_every: int, n: int) -> dict[str, dict]:
    """Traces from Kubernetes pods and a Docker container, half a slot after shop traces spread
    over the ten minutes: four checkouts in namespace shop (two checkout pods taking turns, each
    calling cart), one in namespace staging (a workload of the same name), one from a plain
    Docker host (a container, no pod). Each expectation lists (namespace, workload, pod) per span."""
    ingress = "10.244.0.5"  # the ingress controller's pod: not traced
    ports = itertools.count(47000)
    traces: dict[str, dict] = {}

    def place(d: dict, pod: Pod, *, local: bool = True) -> None:
        """A span as the pod's process gives it: its node, pid and address, and the agent's attributes.
        `local`: the span's own end is in the pod (else the pod is the remote end, its caller)."""
        if local:
            d.update(host=pod.node, pid=pod.pid, tid=pod.pid + 1, resp_tid=pod.pid + 1, laddr=pod.ip)
            d["attributes"] = {**d["attributes"], **pod.attributes()}
        else:
            d["raddr"] = pod.ip

    def root(service: str, name: str, path: str, start: int, end: int, body: bytes, trace_id: str, attrs: dict) -> dict:
        req = _http_req("POST", path, "shop.example", body=body)
        return b.span("SERVER", service, name, "http1", start, end, laddr=HOSTS[service][2], lport=HOSTS[service][3],
                      raddr=ingress, rport=next(ports), conn_id=next(ports), req=req, resp=_http_resp(200, "OK", b"{}"),
                      attributes=_http_attrs("POST", path, 200) | attrs, trace_id=trace_id)  # fmt: skip

    for j, key in enumerate(["checkout-a", "checkout-b", "checkout-a", "checkout-b", "checkout-staging", "invoices"]):
        t = now_ns - 600 * 10**9 + (2 + j * n // 6) * span_every + span_every // 2
        trace_id = f"{0xC8500000 + j:08x}{j:024x}"
        first = len(b.spans)
        dur = (6 + 3 * j) * MS
        if key == "invoices":
            path = "/api/invoices"
            root("invoices", "POST /api/invoices", path, t, t + dur, b'{"order":42}', trace_id, INVOICES_CONTAINER)
            places = [(None, None, None)]
        else:
            pod = PODS[key]
            path = "/api/checkout"
            place(root("checkout", "POST /api/checkout", path, t, t + dur, b'{"cart":"c-17"}', trace_id, {}), pod)
            places = [(pod.namespace, pod.workload, pod.name)]
            if pod.namespace == "shop":
                cart = PODS["cart"]
                conn = _Conn("checkout", "cart", 25_000_000 + j * 1_000_000)
                creq = _http_req("GET", "/carts/c-17", "cart.shop.svc")
                client, server = b.call(conn, "GET /carts/{id}", "http1", t + 1 * MS, t + dur - 1 * MS, creq,
                                        _http_resp(200, "OK", b'{"items":3}'), server=True,
                                        c_attrs=_http_attrs("GET", "/carts/c-17", 200))  # fmt: skip
                place(client, pod)
                place(server, cart)
                place(server, pod, local=False)
                places += [places[0], (cart.namespace, cart.workload, cart.name)]
        traces[trace_id] = {"kind": "docker" if key == "invoices" else "k8s", "spans": len(b.spans) - first,
                            "errors": 0, "root_name": b.spans[first]["name"], "url_path": path,
                            "places": places}  # fmt: skip
    return traces


def send(base_url: str, token: str, seed: Seed) -> None:
    """Register the four hosts' agents, then post all spans in one gzip batch."""
    auth = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base_url, timeout=30) as c:
        for agent_id, report in seed.agents.items():
            r = c.put(f"/api/v1/agents/{agent_id}", json=report, headers=auth)
            r.raise_for_status()
        # One batch, not one per host: these spans ended minutes ago, so the linker publishes them at its
        # next pass and keeps no context for later arrivals; a pass between two batches would split traces.
        body = {"agent_id": "ui-seed", "batch_id": f"seed-{time.time_ns()}", "spans": seed.spans}
        raw = gzip.compress(json.dumps(body).encode())
        r = c.post("/api/v1/spans", content=raw,
                   headers={**auth, "Content-Type": "application/json", "Content-Encoding": "gzip"})  # fmt: skip
        r.raise_for_status()
        assert r.json()["accepted"] == len(seed.spans), r.text


def wait_published(base_url: str, seed: Seed, timeout_s: float = 60.0, auth: tuple[str, str] | None = None) -> dict:
    """Poll the search until every seeded trace is there with all its spans; returns the last answer.
    `auth`: the server's --read-auth user and password."""
    start_ns = min(s["start_ns"] for s in seed.spans) - 10**9
    end_ns = max(s["end_ns"] for s in seed.spans) + 10**9
    deadline = time.monotonic() + timeout_s
    last = None
    with httpx.Client(base_url=base_url, timeout=30, auth=auth) as c:
        while time.monotonic() < deadline:
            r = c.get("/api/v1/traces", params={"start_ns": start_ns, "end_ns": end_ns, "limit": 1000})
            if r.status_code == 200:
                last = r.json()
                spans = sum(t["span_count"] for t in last["traces"])
                if last["total"] >= len(seed.traces) and spans >= seed.span_total:
                    return last
            time.sleep(0.3)
    got = None if last is None else f"{last['total']} traces / {sum(t['span_count'] for t in last['traces'])} spans"
    raise AssertionError(f"the server did not publish the seeded traces within {timeout_s} s: "
                         f"want {len(seed.traces)} traces / {seed.span_total} spans, last answer {got}")  # fmt: skip


if __name__ == "__main__":
    url, tok = sys.argv[1], sys.argv[2]
    s = build()
    send(url, tok, s)
    wait_published(url, s)
    print(f"seeded {len(s.traces)} traces, {s.span_total} spans")
