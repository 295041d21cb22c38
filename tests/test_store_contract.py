"""One contract, every store: the same calls give the same answers on the embedded DuckDB
file, on a real clickhouse-server (Debian's 18.16) started here on a temporary directory, and
on the current ClickHouse engine (chdb, in process), so the SQL holds on old and new releases."""

from __future__ import annotations

import gzip
import threading
import uuid

import pytest
import spanmaker as sm
from clickhouse import ChdbClient, clickhouse_server, clickhouse_shards, wait_until
from serverproc import ServerProcess

from deeptrace import schema
from deeptrace.server.store import open_store
from deeptrace.server.store.base import AgentInfo, DeadLetter, DuplicateBatch, TraceQuery
from deeptrace.server.store.clickhouse_store import ClickHouseDialect, ClickHouseStore, bind, parse_url
from deeptrace.server.store.duckdb_store import DuckDBStore

T0 = 1_800_000_000 * 10**9  # 2027-01-15: inside the schema's range
MS = 10**6


@pytest.fixture(scope="module")
def clickhouse_port():
    with clickhouse_server() as port:
        yield port


class ChdbStore(ClickHouseStore):
    """The ClickHouse store's SQL on today's ClickHouse engine, in process (chdb)."""

    def __init__(self, database: str) -> None:
        from clickhouse_driver import errors

        self._errors, self.database, self.dialect, self.cluster = errors, database, ClickHouseDialect(), None
        self._local, self._chdb = threading.local(), ChdbClient(database)
        self._create()

    def _client(self):
        return self._chdb


@pytest.fixture(scope="module")
def clickhouse_shard_ports():
    with clickhouse_shards("two_shards") as ports:
        yield ports


@pytest.fixture(params=["duckdb", "clickhouse", "clickhouse-2-shards", "clickhouse-today"])
def store(request, tmp_path):
    """The embedded store; ClickHouse 18.16 (Debian's server), alone and as two shards under
    a Distributed table; ClickHouse of today (chdb)."""
    if request.param == "duckdb":
        s = DuckDBStore(tmp_path / "store.duckdb")
    elif request.param == "clickhouse-today":
        s = ChdbStore(f"t_{uuid.uuid4().hex[:12]}")
    elif request.param == "clickhouse-2-shards":
        port = request.getfixturevalue("clickhouse_shard_ports")[0]
        s = ClickHouseStore(f"clickhouse://127.0.0.1:{port}/t_{uuid.uuid4().hex[:12]}?cluster=two_shards")
    else:
        s = ClickHouseStore(
            f"clickhouse://127.0.0.1:{request.getfixturevalue('clickhouse_port')}/t_{uuid.uuid4().hex[:12]}"
        )
    yield s
    s.close()


def make(trace: int, n: int, kind: str, service: str, start_ms: float, dur_ms: float, *, parent=None, peer=None,
         status="ok", name="GET /x", attributes=None, seq=None) -> dict:  # fmt: skip
    """A span as the linker hands it to the store: checked by the schema, then linked."""
    d = schema.validate_span({
        "trace_id": f"{trace:032x}", "span_id": f"{trace:08x}{n:08x}", "parent_span_id": parent, "kind": kind,
        "name": name, "protocol": "http", "service": service, "host": "h1", "pid": 100 + n, "tid": 7,
        "start_ns": T0 + int(start_ms * MS), "end_ns": T0 + int((start_ms + dur_ms) * MS), "status": status,
        "status_code": "500" if status == "error" else "200", "laddr": "10.0.0.1", "lport": 80,
        "raddr": "10.0.0.2", "rport": 40000 + n, "conn_id": n, "req_size": 10, "resp_size": 20,
        "req_seq": seq, "resp_seq": None, "attributes": attributes or {}, "req_head": "", "resp_head": "",
    })  # fmt: skip
    d.update(
        peer_service=peer,
        link_method="seq-join" if parent else "root",
        link_confidence=1.0 if parent else 0.9,
    )
    return d


def shop() -> list[dict]:
    """Three traces: front -> api -> db, one of them failing and slow."""
    spans = []
    for t, (start, status, slow) in enumerate([(0, "ok", 1), (100, "error", 5), (200, "ok", 1)], start=1):
        root = make(t, 1, "SERVER", "front", start, 10 * slow, status=status, name="GET /shop",
                    attributes={"http.route": "/shop", "user": f"u{t}", "n": t})  # fmt: skip
        call = make(
            t, 2, "CLIENT", "front", start + 1, 8 * slow, parent=root["span_id"], peer="api", seq=[t, t + 9]
        )
        api = make(
            t, 3, "SERVER", "api", start + 2, 6 * slow, parent=call["span_id"], status=status, seq=[t, t + 9]
        )
        db = make(
            t, 4, "CLIENT", "api", start + 3, 2 * slow, parent=api["span_id"], peer="postgres", name="SELECT"
        )
        spans += [root, call, api, db]
    return spans


def test_a_batch_is_kept_once_until_its_spans_are_written(store):
    store.accept_batch("agent-1", "b1", gzip.compress(b"one"), 4, T0)
    store.accept_batch("agent-1", "b2", gzip.compress(b"two"), 4, T0 + 1)
    store.accept_batch("agent-2", "b1", gzip.compress(b"three"), 4, T0 + 2)  # ids are per agent
    with pytest.raises(DuplicateBatch):
        store.accept_batch("agent-1", "b1", gzip.compress(b"again"), 4, T0 + 3)
    assert [(a, b, gzip.decompress(body)) for a, b, body in store.incoming()] == [
        ("agent-1", "b1", b"one"), ("agent-1", "b2", b"two"), ("agent-2", "b1", b"three")]  # fmt: skip
    spans = shop()
    store.write_spans(spans[:4], [("agent-1", "b1")])
    assert [(a, b) for a, b, _ in store.incoming()] == [("agent-1", "b2"), ("agent-2", "b1")]
    with pytest.raises(DuplicateBatch):  # linked and gone from the queue: still a duplicate
        store.accept_batch("agent-1", "b1", gzip.compress(b"one"), 4, T0 + 4)
    assert store.stored_span_ids([s["span_id"] for s in spans]) == {s["span_id"] for s in spans[:4]}
    st = store.stats()
    assert (st.spans, st.incoming_batches, st.dead_letters) == (4, 2, 0)


def test_dead_letters_are_kept_once_newest_first_and_count_as_stored(store):
    letters = [DeadLetter("agent-1", "b1", f"s{i}", T0 + i, f"why {i}", "{}") for i in range(3)]
    store.write_spans([], [], letters)
    store.write_spans(
        [], [], [DeadLetter("agent-1", "b1", "s0", T0 + 10, "why again", "{}")]
    )  # a replay fails again
    page, total = store.dead_letters(limit=2)
    assert total == 3 and [(x.span_id, x.reason) for x in page] == [("s0", "why again"), ("s2", "why 2")]
    assert [x.span_id for x in store.dead_letters(limit=2, offset=2)[0]] == ["s1"]
    assert store.stored_span_ids(["s1", "nope"]) == {"s1"}
    assert store.stats().dead_letters == 3


def test_spans_come_back_as_they_went_in(store):
    spans = shop()
    store.write_spans(spans[:6], [])
    store.write_spans(spans[6:], [])  # the second trace in two writes, as late links make it
    for d in spans:
        got = store.span(d["span_id"])
        assert set(got) == set(schema.FIELD_NAMES)
        assert got == {k: d.get(k) for k in schema.FIELD_NAMES} | {"duration_ns": d["end_ns"] - d["start_ns"]}
    trace = store.trace(spans[4]["trace_id"])
    assert [s["span_id"] for s in trace] == [s["span_id"] for s in spans[4:8]]  # by start
    both = store.traces([spans[0]["trace_id"], spans[8]["trace_id"], "0" * 32])
    assert sorted(both) == [spans[0]["trace_id"], spans[8]["trace_id"]]
    assert store.span("nope") is None and store.trace("nope") == []


def test_search_filters_sorts_pages_and_counts(store):
    spans = shop()
    store.write_spans(spans, [])
    everything = TraceQuery(T0, T0 + 10**12)
    found, total = store.search(everything)
    assert total == 3 and [t.trace_id for t in found] == [
        spans[i]["trace_id"] for i in (8, 4, 0)
    ]  # latest first
    first = found[-1]
    assert (first.root_service, first.root_name, first.span_count, first.error_count) == (
        "front",
        "GET /shop",
        4,
        0,
    )
    assert first.services == ["api", "front"] and first.duration_ns == 10 * MS
    assert store.search(TraceQuery(T0, T0 + 10**12, sort="duration"))[0][0].trace_id == spans[4]["trace_id"]
    assert store.search(TraceQuery(T0, T0 + 10**12, limit=1, offset=1))[0][0].trace_id == spans[4]["trace_id"]
    cases = {
        "status": (TraceQuery(T0, T0 + 10**12, status="error"), [spans[4]]),
        "service and operation": (
            TraceQuery(T0, T0 + 10**12, service="api", operation="SELECT"),
            spans[::4][::-1],
        ),
        "duration": (TraceQuery(T0, T0 + 10**12, min_duration_ns=20 * MS), [spans[4]]),
        "string attribute": (TraceQuery(T0, T0 + 10**12, attributes={"user": "u3"}), [spans[8]]),
        "number attribute": (TraceQuery(T0, T0 + 10**12, attributes={"n": "2"}), [spans[4]]),
        "column": (TraceQuery(T0, T0 + 10**12, attributes={"peer_service": "postgres"}), spans[::4][::-1]),
        "error flag": (TraceQuery(T0, T0 + 10**12, attributes={"error": "true"}), [spans[4]]),
        "a LIKE wildcard is no wildcard": (TraceQuery(T0, T0 + 10**12, attributes={"user": "u_"}), []),
        "time range": (TraceQuery(T0 + 50 * MS, T0 + 150 * MS), [spans[4]]),
    }
    for what, (q, want) in cases.items():
        found, total = store.search(q)
        assert [t.trace_id for t in found] == [s["trace_id"] for s in want] and total == len(want), what


def test_search_by_attributes_whose_names_hold_dots(store):
    """OpenTelemetry's names (k8s.namespace.name, container.id): each one key, matched whole. Not
    a path into the name's parts, nor a key that only ends or begins like it, nor a longer value."""
    where = [
        {"k8s.namespace.name": "shop", "k8s.workload.name": "checkout", "k8s.pod.name": "checkout-7d9f-x2k4q",
         "container.id": "c0ffee" + "1" * 58},
        {"k8s.namespace.name": "staging", "k8s.workload.name": "checkout", "namespace.name": "shop"},
        {"k8s.namespace": "shop", "k8s.workload.name": "checkout-v2"},
        {"k8s.namespace.name.old": "shop", "k8s_namespace_name": "shop"},
    ]  # fmt: skip
    spans = [make(t, 1, "SERVER", "front", 10 * t, 5, attributes=a) for t, a in enumerate(where, start=1)]
    store.write_spans(spans, [])
    cases = {
        "namespace": ({"k8s.namespace.name": "shop"}, [1]),
        "namespace and workload, on one span": ({"k8s.namespace.name": "shop", "k8s.workload.name": "checkout"}, [1]),
        "workload in any namespace": ({"k8s.workload.name": "checkout"}, [2, 1]),
        "a key that ends like another": ({"namespace.name": "shop"}, [2]),
        "pod": ({"k8s.pod.name": "checkout-7d9f-x2k4q"}, [1]),
        "container": ({"container.id": "c0ffee" + "1" * 58}, [1]),
        "no such namespace": ({"k8s.namespace.name": "checkout"}, []),
    }  # fmt: skip
    for what, (attributes, want) in cases.items():
        found, total = store.search(TraceQuery(T0, T0 + 10**12, attributes=attributes))
        assert [t.trace_id for t in found] == [spans[i - 1]["trace_id"] for i in want] and total == len(want), what
    # The trace list says where each root ran: its namespace and workload, "" where unknown.
    found, _ = store.search(TraceQuery(T0, T0 + 10**12, sort="start", descending=False))
    assert [(t.root_namespace, t.root_workload) for t in found] == [("shop", "checkout"), ("staging", "checkout"),
                                                                     ("", "checkout-v2"), ("", "")]  # fmt: skip


def test_services_operations_map_and_series(store):
    store.write_spans(shop(), [])
    assert store.services() == ["api", "front"]
    assert store.operations("api") == [("GET /x", "SERVER"), ("SELECT", "CLIENT")]
    m = store.service_map(T0, T0 + 300 * MS)
    assert [n.service for n in m.nodes] == ["api", "front", "postgres"]
    api = next(n for n in m.nodes if n.service == "api").red
    assert (api.requests, api.errors, api.p50_ms) == (3, 1, 6.0)
    edges = {(e.source, e.target): e.red for e in m.edges}
    assert sorted(edges) == [("api", "postgres"), ("front", "api")] and edges[("front", "api")].requests == 3
    assert next(n for n in m.nodes if n.service == "postgres").red.requests == 3  # as its callers saw it
    series = store.timeseries(T0, T0 + 300 * MS, 100 * MS, service="front")
    assert [(t - T0) // MS for t, _ in series] == [0, 100, 200]
    assert [r.requests for _, r in series] == [1, 1, 1] and [r.errors for _, r in series] == [0, 1, 0]
    gaps = store.timeseries(T0, T0 + 600 * MS, 100 * MS, edge=("front", "api"))
    assert [r.requests for _, r in gaps] == [1, 1, 1, 0, 0, 0]
    assert [r.requests for _, r in store.timeseries(T0, T0 + 300 * MS, 100 * MS, service="postgres")] == [
        1,
        1,
        1,
    ]


def test_agents_are_kept_by_id_with_their_latest_report(store):
    store.upsert_agent(AgentInfo("a1", "host-b", "6.1", "0.1", T0, T0 + 1, {"spans": 1}))
    store.upsert_agent(AgentInfo("a2", "host-a", "6.1", "0.1", T0, T0 + 1, {}))
    store.upsert_agent(AgentInfo("a1", "host-b", "6.1", "0.1", T0, T0 + 2, {"spans": 5}))
    assert [(a.agent_id, a.last_seen_ns - T0, a.stats) for a in store.agents()] == [
        ("a2", 1, {}),
        ("a1", 2, {"spans": 5}),
    ]


def test_retention_deletes_spans_older_than_the_age(store):
    spans = shop()
    store.write_spans(spans, [])
    deleted = store.apply_retention(T0 + 200 * MS + 30 * 10**9, 30 * 10**9, None)  # the first two traces
    assert deleted == 8
    wait_until(lambda: store.stats().spans == 4)  # ClickHouse deletes in the background
    assert {s["trace_id"] for s in [store.span(d["span_id"]) for d in spans[8:]]} == {spans[8]["trace_id"]}


def test_open_store_takes_a_url_or_a_path_and_refuses_what_it_does_not_know(tmp_path, clickhouse_port):
    assert isinstance(open_store(str(tmp_path / "a.duckdb")), DuckDBStore)
    assert isinstance(open_store(f"duckdb:///{tmp_path}/b.duckdb"), DuckDBStore)
    assert (tmp_path / "b.duckdb").exists()
    ch = open_store(f"clickhouse://127.0.0.1:{clickhouse_port}/t_{uuid.uuid4().hex[:12]}")
    assert isinstance(ch, ClickHouseStore)
    ch.close()
    for bad, why in [("postgres://x/y", "unknown store scheme 'postgres'"), ("clickhouse://host", "not a ClickHouse store URL"),
                     ("clickhouse://h/db-1", "letters, digits and '_' only")]:  # fmt: skip
        with pytest.raises(ValueError, match=why):
            open_store(bad)
    with pytest.raises(OSError, match="cannot open the store clickhouse://127.0.0.1:1/x"):
        open_store("clickhouse://127.0.0.1:1/x")


def test_clickhouse_urls_and_placeholders(monkeypatch):
    monkeypatch.setenv("CLICKHOUSE_PASSWORD", "from-env")
    assert parse_url("clickhouse://h/db") == {"host": "h", "port": 9000, "database": "db", "cluster": None,
                                              "user": "default", "password": "from-env"}  # fmt: skip
    assert parse_url("clickhouse://h/db?cluster=two")["cluster"] == "two"
    with pytest.raises(ValueError, match="unknown ClickHouse store option 'shards'"):
        parse_url("clickhouse://h/db?shards=2")
    assert parse_url("clickhouse://u:p%40ss@h:9440/db")["password"] == "p@ss"
    text, values = bind("SELECT '?', x FROM t WHERE a = ? AND b LIKE ? AND c = '%'", [1, "%a%"])
    assert text == "SELECT '?', x FROM t WHERE a = %(p0)s AND b LIKE %(p1)s AND c = '%%'"
    assert values == {"p0": 1, "p1": "%a%"}
    with pytest.raises(ValueError):
        bind("SELECT ?", [1, 2])


def test_the_server_links_into_clickhouse_and_serves_the_trace(tmp_path, clickhouse_port):
    """`deeptrace server --store clickhouse://...` for real: a caller's span and its callee's
    posted as two agents would, linked, written to ClickHouse, and read back through the API."""
    import time

    url = f"clickhouse://default:@127.0.0.1:{clickhouse_port}/t_{uuid.uuid4().hex[:12]}"
    srv = ServerProcess(tmp_path / "server.duckdb", args=("--hold", "0.5"), store=url).start()
    try:
        t0 = time.time_ns() // 1000 - 2_000_000
        caller, callee = sm.call_pair(1, 2, t0, t0 + 900, seq=77)
        assert srv.post([caller], agent_id="host-a").status_code == 200
        assert srv.post([callee], agent_id="host-b").status_code == 200
        status = srv.wait_published(2)
        assert status["store"]["spans"] == 2 and status["store"]["incoming_batches"] == 0
        got = srv.get(f"/api/v1/spans/{callee['span_id']}").json()
        assert got["parent_span_id"] == caller["span_id"] and got["link_method"] == "seq-join"
        trace = srv.get(f"/api/v1/traces/{got['trace_id']}").json()
        assert sorted(s["span_id"] for s in trace["spans"]) == sorted([caller["span_id"], callee["span_id"]])
    finally:
        srv.stop()
    assert f"store clickhouse://default:***@127.0.0.1:{clickhouse_port}/" in srv.log.read_text()


def test_a_batch_re_sent_to_another_server_at_once_is_linked_once(clickhouse_port):
    """Two servers on one ClickHouse database take copies of one batch; the second server's
    clock is behind, so its copy counts as the first. Whatever each answered, the queue
    holds the batch once, and the copy every server picks is the same."""
    url = f"clickhouse://127.0.0.1:{clickhouse_port}/t_{uuid.uuid4().hex[:12]}"
    a, b = ClickHouseStore(url), ClickHouseStore(url)
    try:
        a.accept_batch("agent-1", "b1", gzip.compress(b"copy at a"), 1, T0 + 5)
        b.accept_batch("agent-1", "b1", gzip.compress(b"copy at b"), 1, T0 + 1)  # first by time: accepted too
        with pytest.raises(DuplicateBatch):
            a.accept_batch("agent-1", "b1", gzip.compress(b"later"), 1, T0 + 9)
        for store in (a, b):
            assert [(x, y, gzip.decompress(body)) for x, y, body in store.incoming()] == [("agent-1", "b1", b"copy at b")]
        a.write_spans([], [("agent-1", "b1")])
        assert b.incoming() == [] and b.stats().incoming_batches == 0
    finally:
        a.close()
        b.close()


def test_spans_are_spread_over_the_shards_and_read_back_whole(clickhouse_shard_ports):
    from clickhouse_driver import Client

    database = f"t_{uuid.uuid4().hex[:12]}"
    store = ClickHouseStore(f"clickhouse://127.0.0.1:{clickhouse_shard_ports[0]}/{database}?cluster=two_shards")
    try:
        spans = shop()
        store.write_spans(spans, [])
        on_shard = [Client("127.0.0.1", port=p).execute(f"SELECT count() FROM {database}.spans_local")[0][0]
                    for p in clickhouse_shard_ports]  # fmt: skip
        assert sum(on_shard) == len(spans) and min(on_shard) > 0
        assert store.stats().spans == len(spans) and len(store.trace(spans[0]["trace_id"])) == 4
        with pytest.raises(OSError, match="knows no cluster 'nope'"):
            ClickHouseStore(f"clickhouse://127.0.0.1:{clickhouse_shard_ports[0]}/{database}?cluster=nope")
    finally:
        store.close()
