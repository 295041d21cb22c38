"""The server against a real running process and its real embedded store: ingest, auth,
idempotency, restarts, the query API, Jaeger's API shapes and the metrics."""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
import threading
import time
from typing import Literal

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict

import spanmaker as sm
from serverproc import ServerProcess, running_server


def shop_trace(t0_us: int, seq: int, error: bool = False, slow: bool = False) -> list[dict]:
    """gateway SERVER -> gateway CLIENT -> users SERVER -> users CLIENT (redis), one host each."""
    extra = 50_000 if slow else 0
    root = sm.server(10, t0_us, t0_us + 2000 + extra, name="GET /orders/{id}", host="h1", service="gateway",
                     attributes={"http.request.method": "GET", "http.response.status_code": 500 if error else 200})
    if error:
        root["status"], root["status_code"] = "error", "500"
    call, served = sm.call_pair(10, 20, t0_us + 100, t0_us + 1800 + extra, seq=seq, name="GET /users/{id}",
                                caller_host="h1", callee_host="h2")
    call["service"], served["service"] = "gateway", "users"
    cache = sm.client(20, t0_us + 300, t0_us + 500, name="redis GET", host="h2", service="users",
                      protocol="redis", raddr="10.0.0.9", rport=6379)
    return [root, call, served, cache]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """A server holding 30 shop traces: every 10th an error, every 7th slow."""
    with running_server(tmp_path_factory.mktemp("server")) as srv:
        now = time.time_ns() // 1000
        spans = []
        for i in range(30):
            spans += shop_trace(now - 60_000_000 + i * 1_000_000, seq=1000 + i * 10_000, error=i % 10 == 3,
                                slow=i % 7 == 0)
        assert srv.post(spans[:60]).json() == {"accepted": 60, "duplicate": False}
        assert srv.post(spans[60:]).json() == {"accepted": 60, "duplicate": False}
        assert srv.wait_published(120)["store"]["spans"] == 120
        yield srv, spans


def test_traces_are_linked_across_hosts(loaded):
    srv, spans = loaded
    page = srv.get("/api/v1/traces", service="gateway", limit=100).json()
    assert page["total"] == 30
    t = page["traces"][0]
    assert t["span_count"] == 4 and t["root_service"] == "gateway" and t["root_name"] == "GET /orders/{id}"
    assert t["services"] == ["gateway", "users"]
    trace = srv.get(f"/api/v1/traces/{t['trace_id']}").json()["spans"]
    by_name = {(d["kind"], d["name"]): d for d in trace}
    served, call = by_name[("SERVER", "GET /users/{id}")], by_name[("CLIENT", "GET /users/{id}")]
    assert served["parent_span_id"] == call["span_id"] and served["link_method"] == "seq-join"
    assert served["host"] == "h2" and call["host"] == "h1"
    assert call["peer_service"] == "users"
    assert by_name[("CLIENT", "redis GET")]["peer_service"] == "redis 10.0.0.9:6379"
    assert srv.get(f"/api/v1/spans/{served['span_id']}").json()["span_id"] == served["span_id"]


def test_search_filters_sort_and_pages(loaded):
    srv, _ = loaded
    errors = srv.get("/api/v1/traces", status="error").json()
    assert errors["total"] == 3 and all(t["error_count"] == 1 for t in errors["traces"])
    slow = srv.get("/api/v1/traces", min_duration_ms=40).json()
    assert slow["total"] == 5  # i = 0, 7, 14, 21, 28
    fast = srv.get("/api/v1/traces", max_duration_ms=40, operation="GET /orders/{id}").json()
    assert fast["total"] == 25
    assert srv.get("/api/v1/traces", attr="http.response.status_code=500").json()["total"] == 3
    assert srv.get("/api/v1/traces", attr="host=h2").json()["total"] == 30
    by_duration = srv.get("/api/v1/traces", sort="duration", limit=5).json()["traces"]
    assert [t["duration_ns"] for t in by_duration] == sorted((t["duration_ns"] for t in by_duration), reverse=True)
    first, second = (srv.get("/api/v1/traces", limit=10, offset=o).json()["traces"] for o in (0, 10))
    assert not {t["trace_id"] for t in first} & {t["trace_id"] for t in second}
    assert [t["start_ns"] for t in first] == sorted((t["start_ns"] for t in first), reverse=True)
    assert srv.get("/api/v1/traces", start_ns=1, end_ns=2).json()["total"] == 0
    assert srv.get("/api/v1/traces", attr="novalue").status_code == 400
    assert srv.get("/api/v1/traces/ffffffffffffffffffffffffffffffff").status_code == 404


def test_services_operations_map_and_timeseries(loaded):
    srv, _ = loaded
    assert srv.get("/api/v1/services").json()["services"] == ["gateway", "users"]
    ops = srv.get("/api/v1/services/users/operations").json()["operations"]
    assert {"name": "GET /users/{id}", "kind": "SERVER"} in ops and {"name": "redis GET", "kind": "CLIENT"} in ops
    m = srv.get("/api/v1/service-map").json()
    nodes = {n["service"]: n for n in m["nodes"]}
    assert set(nodes) == {"gateway", "users", "redis 10.0.0.9:6379"}
    assert nodes["gateway"]["requests"] == 30 and nodes["gateway"]["errors"] == 3
    assert nodes["gateway"]["error_rate"] == pytest.approx(0.1)
    assert nodes["gateway"]["p50_ms"] <= nodes["gateway"]["p90_ms"] <= nodes["gateway"]["p99_ms"]
    edges = {(e["source"], e["target"]): e for e in m["edges"]}
    assert set(edges) == {("gateway", "users"), ("users", "redis 10.0.0.9:6379")}
    assert edges[("gateway", "users")]["requests"] == 30
    now = time.time_ns()
    points = srv.get("/api/v1/timeseries", service="gateway", start_ns=now - 120 * 10**9, end_ns=now,
                     step_s=10).json()["points"]  # fmt: skip
    assert len(points) == 12 and sum(p["requests"] for p in points) == 30
    edge_points = srv.get("/api/v1/timeseries", source="gateway", target="users", step_s=600).json()["points"]
    assert sum(p["requests"] for p in edge_points) == 30
    redis = srv.get("/api/v1/timeseries", service="redis 10.0.0.9:6379", step_s=600).json()["points"]
    assert sum(p["requests"] for p in redis) == 30  # not traced: measured by its callers, as on the map
    assert srv.get("/api/v1/timeseries").status_code == 400


# --- Jaeger: response models after Jaeger's JSON model (model/json in jaegertracing/jaeger) ---
class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class KeyValue(Strict):
    key: str
    type: Literal["string", "bool", "int64", "float64", "binary"]
    value: str | bool | int | float


class Reference(Strict):
    refType: Literal["CHILD_OF", "FOLLOWS_FROM"]  # noqa: N815 (Jaeger's names)
    traceID: str  # noqa: N815
    spanID: str  # noqa: N815


class JSpan(Strict):
    traceID: str  # noqa: N815
    spanID: str  # noqa: N815
    flags: int
    operationName: str  # noqa: N815
    references: list[Reference]
    startTime: int  # noqa: N815  (µs)
    duration: int  # µs
    tags: list[KeyValue]
    logs: list
    processID: str  # noqa: N815
    warnings: list[str] | None


class Process(Strict):
    serviceName: str  # noqa: N815
    tags: list[KeyValue]


class JTrace(Strict):
    traceID: str  # noqa: N815
    spans: list[JSpan]
    processes: dict[str, Process]
    warnings: list[str] | None


class Envelope(Strict):
    data: object
    total: int
    limit: int
    offset: int
    errors: list | None


def test_jaeger_api_shapes(loaded):
    srv, _ = loaded
    services = Envelope.model_validate(srv.get("/api/services").json())
    assert services.data == ["gateway", "users"]
    ops = Envelope.model_validate(srv.get("/api/services/users/operations").json())
    assert "GET /users/{id}" in ops.data
    kinds = srv.get("/api/operations", service="users", spanKind="server").json()["data"]
    assert kinds == [{"name": "GET /users/{id}", "spanKind": "server"}]
    now_us = time.time_ns() // 1000
    found = Envelope.model_validate(srv.get("/api/traces", service="gateway", start=now_us - 3600 * 10**6,
                                            end=now_us, limit=5, minDuration="40ms").json())  # fmt: skip
    traces = [JTrace.model_validate(t) for t in found.data]
    assert 1 <= len(traces) <= 5 and all(len(t.spans) == 4 for t in traces)
    for t in traces:
        ids = {s.spanID for s in t.spans}
        assert all(r.spanID in ids for s in t.spans for r in s.references)
        assert {p.serviceName for p in t.processes.values()} == {"gateway", "users"}
        assert all(s.processID in t.processes for s in t.spans)
        assert all(s.duration >= 40_000 for s in t.spans if not s.references)
    tagged = srv.get("/api/traces", service="gateway", tags=json.dumps({"error": "true"})).json()["data"]
    assert len(tagged) == 3
    one = Envelope.model_validate(srv.get(f"/api/traces/{traces[0].traceID}").json())
    assert JTrace.model_validate(one.data[0]).traceID == traces[0].traceID
    missing = srv.get("/api/traces/abcdef")
    assert missing.status_code == 404 and Envelope.model_validate(missing.json()).errors[0]["code"] == 404
    deps = Envelope.model_validate(srv.get("/api/dependencies", endTs=now_us // 1000, lookback=3600_000).json())
    assert {"parent": "gateway", "child": "users", "callCount": 30} in deps.data
    assert srv.get("/api/traces", service="gateway", minDuration="fast").status_code == 400


def test_metrics_in_prometheus_format(loaded):
    srv, _ = loaded
    srv.put_agent = httpx.put(srv.url + "/api/v1/agents/a1", headers={"Authorization": "Bearer test-token"},
                              json={"host": "h1", "kernel": "6.1", "version": "0.1.0", "started_ns": 1,
                                    "stats": {"spans": 120, "drops": 2, "spool_batches": 0}})  # fmt: skip
    assert srv.put_agent.json() == {"ok": True}
    families = {f.name: f for f in text_string_to_metric_families(srv.get("/metrics").text)}
    requests = {s.labels["service"]: s.value for s in families["deeptrace_service_requests"].samples
                if s.labels.get("operation") == "GET /orders/{id}"}  # fmt: skip
    assert requests == {"gateway": 30}
    errors = sum(s.value for s in families["deeptrace_service_errors"].samples if s.labels["service"] == "gateway")
    assert errors == 3
    calls = {(s.labels["source"], s.labels["target"]): s.value for s in families["deeptrace_edge_calls"].samples}
    assert calls[("gateway", "users")] == 30
    assert "deeptrace_edge_duration_seconds" in families
    assert families["deeptrace_server_ingest_spans_total"].samples[0].value == 120
    assert families["deeptrace_server_linker_backlog_spans"].samples[0].value == 0
    (drops,) = families["deeptrace_agent_drops"].samples
    assert drops.labels == {"agent_id": "a1", "host": "h1"} and drops.value == 2
    agents = srv.get("/api/v1/agents").json()["agents"]
    assert agents[0]["agent_id"] == "a1" and agents[0]["stats"]["spans"] == 120 and agents[0]["last_seen_ns"] > 0


def test_auth_is_required_for_ingest(tmp_path):
    with running_server(tmp_path) as srv:
        spans = shop_trace(time.time_ns() // 1000, seq=5)
        assert srv.post(spans, token="wrong").status_code == 401
        no_header = httpx.post(srv.url + "/api/v1/spans", json={"agent_id": "a", "batch_id": "b", "spans": spans})
        assert no_header.status_code == 401 and "token" in no_header.json()["detail"]
        assert httpx.put(srv.url + "/api/v1/agents/x", json={"host": "h"}).status_code == 401
        status = srv.get("/api/v1/status").json()
        assert status["ingest"]["unauthorized"] == 3 and status["store"]["incoming_batches"] == 0
        assert srv.get("/api/v1/agents").json()["agents"] == []


def test_reads_ask_for_the_password_with_read_auth(tmp_path):
    """With --read-auth the UI, the query and Jaeger APIs, /metrics and the status ask for HTTP
    Basic credentials; agents still write with their token alone."""
    args = ("--hold", "0.5", "--read-auth", "alice:s3cret")
    with running_server(tmp_path, args=args) as srv:
        t0 = time.time_ns() // 1000
        s, c = sm.call_pair(1, 2, t0, t0 + 8000, seq=1)
        assert srv.post([s, c]).status_code == 200
        agent = {"host": "h", "kernel": "k", "version": "v", "started_ns": 1, "stats": {}}
        put = httpx.put(srv.url + "/api/v1/agents/a1", json=agent, timeout=30,
                        headers={"Authorization": f"Bearer {srv.token}"})  # fmt: skip
        assert put.status_code == 200
        def status() -> dict:
            return httpx.get(srv.url + "/api/v1/status", auth=("alice", "s3cret"), timeout=30).json()

        refused_before = status()["ingest"]["read_refused"]  # the start-up's own polls count too
        for path in ["/", "/js/main.js", "/api/v1/traces", "/api/v1/status", "/api/traces?service=svc1", "/metrics",
                     "/api/v1/agents"]:  # fmt: skip
            refused = httpx.get(srv.url + path, timeout=30)
            assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic"), path
            assert httpx.get(srv.url + path, auth=("alice", "wrong"), timeout=30).status_code == 401, path
            assert httpx.get(srv.url + path, auth=("bob", "s3cret"), timeout=30).status_code == 401, path
        assert httpx.get(srv.url + "/", auth=("alice", "s3cret"), timeout=30).status_code == 200
        ok = status()
        deadline = time.monotonic() + 30
        while ok["store"]["spans"] < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            ok = status()
        assert ok["store"]["spans"] == 2
        assert ok["ingest"]["read_refused"] - refused_before == 21 and ok["ingest"]["unauthorized"] == 0
        # The agents' token is not a way in for reads.
        assert httpx.get(srv.url + "/api/v1/traces", headers={"Authorization": f"Bearer {srv.token}"},
                         timeout=30).status_code == 401  # fmt: skip


def test_read_auth_must_be_user_and_password(tmp_path):
    r = subprocess.run([sys.executable, "-m", "deeptrace.cli", "server", "--db", str(tmp_path / "x.duckdb"),
                        "--token", "t", "--read-auth", "alice"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and "USER:PASSWORD" in r.stderr


def test_a_full_backlog_answers_503_and_stores_nothing_of_the_refused_batch(tmp_path):
    """More accepted spans waiting for the linker than --max-backlog-spans: the next batch is
    refused with Retry-After (agents keep it in their spool), counted, and not stored."""
    with running_server(tmp_path, args=("--hold", "3600", "--max-backlog-spans", "10")) as srv:
        t0 = time.time_ns() // 1000
        first = [d for i in range(4) for d in sm.call_pair(1, 2, t0 + 1000 * i, t0 + 1000 * i + 900, seq=100 + i)]
        assert srv.post(first).status_code == 200  # 8 waiting
        refused = srv.post([*sm.call_pair(1, 2, t0 + 9000, t0 + 9900, seq=200), sm.server(3, t0, t0 + 1)])  # 11 > 10
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert "backlog" in refused.json()["detail"]
        status = srv.get("/api/v1/status").json()
        assert status["ingest"]["refused_backlog"] == 1 and status["ingest"]["spans"] == 8
        assert status["backlog_spans"] == 8 and status["store"]["incoming_batches"] == 1
        assert srv.post(list(sm.call_pair(1, 2, t0 + 9000, t0 + 9900, seq=300))).status_code == 200  # 10 fit


def test_malformed_batches_are_rejected_whole(tmp_path):
    with running_server(tmp_path) as srv:
        good = shop_trace(time.time_ns() // 1000, seq=5)
        bad = [dict(d) for d in good]
        del bad[1]["start_ns"]
        r = srv.post(bad)
        assert r.status_code == 400 and r.json()["detail"] == "span 1: object missing required field `start_ns`"
        bad[1]["start_ns"], bad[2]["kind"] = good[1]["start_ns"], "SIDEWAYS"
        assert "span 2: kind: invalid enum value 'SIDEWAYS'" in srv.post(bad).json()["detail"]
        headers = {"Authorization": "Bearer test-token", "Content-Encoding": "gzip"}
        r = httpx.post(srv.url + "/api/v1/spans", content=b"not gzip", headers=headers)
        assert r.status_code == 400 and "gzip" in r.json()["detail"]
        r = httpx.post(srv.url + "/api/v1/spans", content=gzip.compress(b"{nope"), headers=headers)
        assert r.status_code == 400 and "JSON" in r.json()["detail"]
        bomb = gzip.compress(b" " * (40 << 20))  # 40 MiB of spaces in 40 kB
        assert httpx.post(srv.url + "/api/v1/spans", content=bomb, headers=headers).status_code == 413
        time.sleep(1)
        status = srv.get("/api/v1/status").json()
        assert status["store"] == {**status["store"], "spans": 0, "incoming_batches": 0}
        assert status["ingest"]["rejected"] == 5 and status["ingest"]["spans"] == 0


def test_a_resent_batch_is_stored_once(tmp_path):
    with running_server(tmp_path) as srv:
        spans = shop_trace(time.time_ns() // 1000, seq=5)
        assert srv.post(spans, batch_id="b-1").json() == {"accepted": 4, "duplicate": False}
        assert srv.post(spans, batch_id="b-1").json() == {"accepted": 0, "duplicate": True}
        other = shop_trace(time.time_ns() // 1000, seq=90_000)
        assert srv.post(other, batch_id="b-1", agent_id="agent-2").json()["duplicate"] is False  # ids are per agent
        status = srv.wait_published(8)
        assert status["store"]["spans"] == 8 and status["ingest"]["duplicates"] == 1


def test_accepted_spans_survive_a_server_crash(tmp_path):
    """Accepted = durable: a SIGKILL before the spans were linked loses none of them."""
    db = tmp_path / "store.duckdb"
    srv = ServerProcess(db, args=("--hold", "60")).start()  # nothing is linked for a minute
    spans = shop_trace(time.time_ns() // 1000, seq=5)
    assert srv.post(spans, batch_id="b-1").json()["accepted"] == 4
    srv.stop(signal.SIGKILL)
    srv = ServerProcess(db, port=srv.port, args=("--hold", "0.5")).start()
    try:
        assert srv.post(spans, batch_id="b-1").json()["duplicate"] is True  # still known after the crash
        status = srv.wait_published(4)
        assert status["store"] == {**status["store"], "spans": 4, "incoming_batches": 0}
        assert status["linker"]["spans_recovered"] == 4
    finally:
        srv.stop()


def test_nothing_lost_or_doubled_when_the_server_is_killed_mid_ingest(tmp_path):
    """An uploader that re-sends what was not acknowledged, as the agent does, against a
    server killed with SIGKILL while batches stream in."""
    db = tmp_path / "store.duckdb"
    srv = ServerProcess(db, args=("--hold", "0.5")).start()
    t0 = time.time_ns() // 1000
    batches = {f"b-{i:03}": shop_trace(t0 + i * 5000, seq=10_000 * (i + 1)) for i in range(150)}
    pending = list(batches)
    stop = threading.Event()

    def upload():
        while pending and not stop.is_set():
            try:
                if srv.post(batches[pending[0]], batch_id=pending[0]).status_code == 200:
                    pending.pop(0)
            except httpx.HTTPError:
                time.sleep(0.1)  # down: try the same batch again

    uploader = threading.Thread(target=upload)
    uploader.start()
    while len(pending) > 100:
        time.sleep(0.01)
    srv.stop(signal.SIGKILL)
    srv = ServerProcess(db, port=srv.port, args=("--hold", "0.5")).start()
    try:
        uploader.join(120)
        stop.set()
        assert not pending
        status = srv.wait_published(600)
        assert status["store"]["spans"] == 600 and status["store"]["incoming_batches"] == 0
        ids = {d["span_id"] for spans in batches.values() for d in spans}
        stored = set()
        for t in srv.get("/api/v1/traces", limit=1000, start_ns=0).json()["traces"]:
            stored |= {d["span_id"] for d in srv.get(f"/api/v1/traces/{t['trace_id']}").json()["spans"]}
        assert stored == ids
    finally:
        srv.stop()


def test_retention_deletes_old_spans(tmp_path):
    from deeptrace.server.store.duckdb_store import DuckDBStore

    store = DuckDBStore(tmp_path / "s.duckdb")
    old = shop_trace(1_000_000, seq=5)
    new = shop_trace(time.time_ns() // 1000, seq=50_000)
    for d in old + new:
        d["trace_id"] = "old" if d in old else "new"
    store.write_spans(old + new, [])
    assert store.apply_retention(time.time_ns(), max_age_ns=3600 * 10**9, max_bytes=None) == 4
    assert store.trace("old") == [] and len(store.trace("new")) == 4
    # Over the size limit: the oldest tenth goes each pass, newest kept.
    t0 = time.time_ns() // 1000
    many = [d for i in range(50) for d in shop_trace(t0 + i * 10_000, seq=100_000 * (i + 1))]
    store.write_spans(many, [])
    before = store.stats().spans
    deleted = store.apply_retention(time.time_ns(), max_age_ns=None, max_bytes=1)
    assert 0 < deleted <= before // 5 and store.stats().spans == before - deleted
    assert store.span(many[-1]["span_id"]) is not None and store.span(many[0]["span_id"]) is None
    store.close()


def test_server_refuses_to_start_without_a_token(tmp_path):
    r = subprocess.run([sys.executable, "-m", "deeptrace.cli", "server", "--db", str(tmp_path / "x.duckdb")],
                       capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})  # fmt: skip
    assert r.returncode == 2 and "token" in r.stderr



def test_the_store_is_given_once_and_a_store_nobody_knows_is_refused_naming_it(tmp_path):
    def serve(*args):
        return subprocess.run([sys.executable, "-m", "deeptrace.cli", "server", "--token", "t", *args],
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    r = serve("--store", "postgres://db/traces")
    assert r.returncode == 2 and "unknown store scheme 'postgres'" in r.stderr and "clickhouse://" in r.stderr
    r = serve("--store", f"duckdb:///{tmp_path}/a.duckdb", "--db", str(tmp_path / "b.duckdb"))
    assert r.returncode == 2 and "give the store once" in r.stderr
    r = serve("--store", "clickhouse://user:secret@127.0.0.1:1/traces")  # nothing listens on port 1
    assert r.returncode == 2 and "cannot open the store clickhouse://127.0.0.1:1/traces" in r.stderr
    assert "secret" not in r.stderr


def test_a_call_nothing_traced_answers_is_named_by_the_agent_given_peer_name():
    """An agent in Kubernetes names an address it knows (a Service's ClusterIP): the service
    map shows that name instead of the bare address, and a bad value falls back to it."""
    from deeptrace.server.linker import set_peer_services

    named = {"span_id": "a", "kind": "CLIENT", "protocol": "redis", "raddr": "10.96.0.12", "rport": 6379,
             "attributes": {"peer.service": "cache.shop"}}  # fmt: skip
    odd = {**named, "span_id": "b", "attributes": {"peer.service": 7}}
    plain = {**named, "span_id": "c", "attributes": {}}
    set_peer_services([named, odd, plain], [])
    assert [d["peer_service"] for d in (named, odd, plain)] == ["cache.shop"] + ["redis 10.96.0.12:6379"] * 2
