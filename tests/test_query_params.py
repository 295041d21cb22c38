"""Query parameters of the query API and Jaeger's API: out-of-range values get a 400 naming the
parameter, no input gets a 5xx, and an unexpected exception still leaves the keep-alive
connection usable. Against a real uvicorn server (in a thread) and a real DuckDB store."""

from __future__ import annotations

import http.client
import json
import math
import threading
import time
from contextlib import contextmanager
from urllib.parse import quote

import httpx
import pytest
import uvicorn
from hypothesis import given, settings
from hypothesis import strategies as st

import spanmaker as sm
from deeptrace.server import errors_http
from deeptrace.server.app import ServerConfig, create_app
from deeptrace.server.store.duckdb_store import DuckDBStore
from servers import free_port

NOW_US = time.time_ns() // 1000


@contextmanager
def serving(app):
    """The app under uvicorn on a free loopback port, in this process: tests can hand it any store."""
    errors_http.install(app)  # create_app may already have: then this changes nothing
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_config=None,
                                           log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield server.config.port
    finally:
        server.should_exit = True
        thread.join(30)


def some_spans() -> list[dict]:
    """A client call into svc2 and a redis call it makes, with an attribute to filter on."""
    call, served = sm.call_pair(1, 2, NOW_US - 10_000_000, NOW_US - 9_000_000, seq=1, name="GET /x")
    cache = sm.client(2, NOW_US - 9_800_000, NOW_US - 9_700_000, name="redis GET", host="h2", service="svc2",
                      protocol="redis", attributes={"db.system": "redis"})  # fmt: skip
    for d in (call, served, cache):
        d["trace_id"] = "a" * 32
    served["parent_span_id"], cache["parent_span_id"] = call["span_id"], served["span_id"]
    served["peer_service"] = "svc2"
    return [call, served, cache]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    store = DuckDBStore(tmp_path_factory.mktemp("params") / "store.duckdb")
    store.write_spans(some_spans(), [])
    app = create_app(ServerConfig(db="unused", token="t"), store)
    with serving(app) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
        yield c


# --- (a) the edge inputs of the issue, and their equivalents in Jaeger's API ---
V1_EDGES = [
    ("/api/v1/traces", {"offset": 2**70}, "offset"),
    ("/api/v1/traces", {"offset": -1}, "offset"),
    ("/api/v1/traces", {"min_duration_ms": 1e308}, "min_duration_ms"),
    ("/api/v1/traces", {"max_duration_ms": "inf"}, "max_duration_ms"),
    ("/api/v1/traces", {"max_duration_ms": "nan"}, "max_duration_ms"),
    ("/api/v1/traces", {"start_ns": 2**63}, "start_ns"),
    ("/api/v1/traces", {"limit": 2**70}, "limit"),
    ("/api/v1/traces", {"attr": "db\\=redis"}, "attr"),
    ("/api/v1/timeseries", {"service": "svc2", "step_s": "inf"}, "step_s"),
    ("/api/v1/timeseries", {"service": "svc2", "step_s": 1e-300}, "step_s"),
    ("/api/v1/timeseries", {"service": "svc2", "step_s": "nan"}, "step_s"),
    ("/api/v1/timeseries", {"service": "svc2", "start_ns": -(2**63), "end_ns": 2**63 - 1}, "start_ns"),
    ("/api/v1/timeseries", {"service": "svc2", "start_ns": 0, "end_ns": 2**63}, "end_ns"),
    ("/api/v1/service-map", {"start_ns": -(2**63)}, "start_ns"),
]
JAEGER_EDGES = [
    ("/api/traces", {"service": "svc2", "limit": 2**70}, "limit"),
    ("/api/traces", {"service": "svc2", "minDuration": "9" * 400 + "ms"}, "minDuration"),  # 1e308-ish ms
    ("/api/traces", {"service": "svc2", "maxDuration": "inf"}, "maxDuration"),
    ("/api/traces", {"service": "svc2", "start": -(2**63)}, "start"),
    ("/api/traces", {"service": "svc2", "end": 2**70}, "end"),
    ("/api/traces", {"service": "svc2", "lookback": "9" * 30 + "d"}, "lookback"),
    ("/api/traces", {"service": "svc2", "tags": "[" * 5000}, "tags"),
    ("/api/traces", {"service": "svc2", "tags": '{"db\\\\": "redis"}'}, "tags"),
    ("/api/dependencies", {"endTs": 2**70}, "endTs"),
    ("/api/dependencies", {"lookback": -1}, "lookback"),
    ("/api/dependencies", {"lookback": 2**63}, "lookback"),
    ("/api/operations", {}, "service"),
]


@pytest.mark.parametrize(("path", "params", "name"), V1_EDGES)
def test_query_api_refuses_out_of_range_parameters(client, path, params, name):
    r = client.get(path, params=params)
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith(f"{name}: "), r.text


@pytest.mark.parametrize(("path", "params", "name"), JAEGER_EDGES)
def test_jaeger_api_refuses_out_of_range_parameters_in_its_envelope(client, path, params, name):
    r = client.get(path, params=params)
    assert r.status_code == 400, r.text
    (err,) = r.json()["errors"]
    assert err["code"] == 400 and err["msg"].startswith(f"{name}: "), r.text


def test_the_bounds_themselves_are_accepted(client):
    ok = [("/api/v1/traces", {"offset": 1_000_000, "min_duration_ms": 0, "max_duration_ms": 10**12,
                              "start_ns": 0, "end_ns": 2**63 - 1, "limit": 1000}),
          ("/api/v1/timeseries", {"service": "svc2", "start_ns": 0, "end_ns": 2**63 - 1, "step_s": 10**9}),
          ("/api/v1/timeseries", {"service": "svc2", "start_ns": 0, "end_ns": 1, "step_s": 0.001}),
          ("/api/v1/service-map", {"start_ns": 0, "end_ns": 2**63 - 1}),
          ("/api/traces", {"service": "svc2", "start": 0, "end": (2**63 - 1) // 1000, "limit": 1_000_000,
                           "minDuration": "11574d", "lookback": "11574d"}),
          ("/api/dependencies", {"endTs": (2**63 - 1) // 10**6, "lookback": 10**12})]  # fmt: skip
    for path, params in ok:
        r = client.get(path, params=params)
        assert r.status_code == 200, (path, params, r.text)


def test_in_range_queries_still_find_the_spans(client):
    found = client.get("/api/v1/traces", params={"attr": "db.system=redis", "start_ns": 0}).json()
    assert found["total"] == 1
    points = client.get("/api/v1/timeseries", params={"service": "svc2", "start_ns": 0, "end_ns": 2**63 - 1,
                                                      "step_s": 10**9}).json()["points"]  # fmt: skip
    assert len(points) == 10 and sum(p["requests"] for p in points) == 1
    query = {"service": "svc2", "tags": '{"db.system": "redis"}'}
    found = client.get("/api/traces", params=query).json()["data"]
    assert len(found) == 1 and len(found[0]["spans"]) == 3


# --- (b) any parameters at all: never a 5xx ---
BIG_INTS = st.one_of(st.integers(), st.integers(-(2**80), 2**80),
                     st.sampled_from([0, -1, 2**63 - 1, 2**63, -(2**63), 2**64, 2**70]))  # fmt: skip
FLOATS = st.one_of(st.floats(), st.sampled_from([1e308, 1e-300, -0.0, math.inf, -math.inf, math.nan]))
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)  # httpx cannot send lone surrogates
ODD_TEXT = st.sampled_from(["", " ", "inf", "-inf", "nan", "NaN", "1e308", "1e-300", "0x10", "1_000",
                            "[" * 3000, "9" * 400, "9" * 400 + "ms", "{}", '{"a\\\\": 1}', '{"": "x"}', "=",
                            "\\=x", "custom", "start", "desc", "error", "svc2", "redis GET"])  # fmt: skip
ANYTHING = st.one_of(BIG_INTS.map(str), FLOATS.map(str), TEXT, ODD_TEXT)

# Values each parameter takes in range (so that some queries reach the store), or close to it.
TIMES = st.one_of(st.integers(0, 2**63 - 1), st.integers(NOW_US * 1000 - 10**13, NOW_US * 1000 + 10**12))
TIMES_US, TIMES_MS = TIMES.map(lambda ns: ns // 1000), TIMES.map(lambda ns: ns // 10**6)
MS = st.one_of(st.floats(0, 1e12), st.integers(0, 10**12))
SERVICES = st.one_of(st.sampled_from(["svc1", "svc2", "redis GET", "GET /x"]), TEXT)
DURATIONS = st.lists(st.tuples(st.integers(0, 10**30).map(str), st.sampled_from(["", ".5", ".000001"]),
                               st.sampled_from(["ns", "us", "µs", "ms", "s", "m", "h", "d", "x"])),
                     min_size=1, max_size=3).map(lambda ps: "".join(map("".join, ps)))  # fmt: skip
SCALARS = st.one_of(st.none(), st.booleans(), BIG_INTS, FLOATS, TEXT)
JSON_VALUES = st.recursive(SCALARS, lambda v: st.lists(v, max_size=3) | st.dictionaries(TEXT, v, max_size=3),
                           max_leaves=8)  # fmt: skip
KEYS = st.one_of(TEXT, st.sampled_from(["db.system", "error", "host"]))
TAGS = st.dictionaries(KEYS, JSON_VALUES, max_size=4).map(json.dumps)
PAIRS = st.lists(st.tuples(KEYS, st.one_of(TEXT, st.sampled_from(["redis", "true", "h2"]))), max_size=3)

V1_SEARCH = {"service": SERVICES, "operation": SERVICES, "status": st.sampled_from(["ok", "error"]),
             "min_duration_ms": MS, "max_duration_ms": MS, "start_ns": TIMES, "end_ns": TIMES,
             "sort": st.sampled_from(["start", "duration"]), "order": st.sampled_from(["asc", "desc"]),
             "limit": st.integers(1, 1000), "offset": st.integers(0, 1_000_000),
             "attr": PAIRS.map(lambda pairs: [f"{k}={v}" for k, v in pairs])}  # fmt: skip
RANGE = {"start_ns": TIMES, "end_ns": TIMES}
SERIES = {**RANGE, "service": SERVICES, "source": SERVICES, "target": SERVICES,
          "step_s": st.floats(1e-3, 1e9)}  # fmt: skip
JAEGER_SEARCH = {"service": SERVICES, "operation": SERVICES, "tags": TAGS, "start": TIMES_US, "end": TIMES_US,
                 "tag": PAIRS.map(lambda pairs: [f"{k}:{v}" for k, v in pairs]),
                 "lookback": st.one_of(DURATIONS, st.just("custom")), "minDuration": DURATIONS,
                 "maxDuration": DURATIONS, "limit": st.integers(0, 2000)}  # fmt: skip
IDS = st.one_of(st.sampled_from(["a" * 32, "0000000000000001", "svc2"]), TEXT, ODD_TEXT)
# (path, its path parameter or None, the query parameters it reads)
ENDPOINTS = [
    ("/api/v1/traces", None, V1_SEARCH),
    ("/api/v1/traces/{}", IDS, {}),
    ("/api/v1/spans/{}", IDS, {}),
    ("/api/v1/services", None, {}),
    ("/api/v1/services/{}/operations", IDS, {}),
    ("/api/v1/service-map", None, RANGE),
    ("/api/v1/timeseries", None, SERIES),
    ("/api/v1/agents", None, {}),
    ("/api/v1/dead-letters", None, {"limit": st.integers(1, 1000), "offset": st.integers(0, 1_000_000)}),
    ("/api/services", None, {}),
    ("/api/services/{}/operations", IDS, {}),
    ("/api/operations", None, {"service": SERVICES, "spanKind": st.sampled_from(["server", "client"])}),
    ("/api/traces", None, JAEGER_SEARCH),
    ("/api/traces/{}", IDS, {}),
    ("/api/dependencies", None, {"endTs": TIMES_MS, "lookback": st.integers(0, 10**12)}),
]


@st.composite
def queries(draw, params: dict) -> dict:
    """Parameters in range, up to two of them (or one nobody reads) replaced by anything at all:
    few enough that an out-of-range one does not often hide the others behind its 400."""
    query = draw(st.fixed_dictionaries({}, optional=params))
    for name in draw(st.lists(st.sampled_from([*params, "junk"]), max_size=2, unique=True)):
        query[name] = draw(st.one_of(ANYTHING, st.lists(ANYTHING, max_size=3)))
    return query


@pytest.mark.parametrize(("path", "path_param", "query"), ENDPOINTS, ids=[e[0] for e in ENDPOINTS])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_no_parameters_make_a_server_error(client, path, path_param, query, data):
    if path_param is not None:
        path = path.format(quote(data.draw(path_param, "path parameter"), safe=""))
    params = data.draw(queries(query), "query")
    r = client.get(path, params=params)
    assert r.status_code < 500, (path, params, r.text[:500])


# --- an unexpected exception: a 500, and the connection stays usable ---
class BrokenStore(DuckDBStore):
    def services(self) -> list[str]:
        raise RuntimeError("the disk is on fire")


def test_an_unexpected_error_answers_500_and_keeps_the_connection(tmp_path, caplog):
    app = create_app(ServerConfig(db="unused", token="t"), BrokenStore(tmp_path / "store.duckdb"))
    with serving(app) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/api/v1/services")
        failed = conn.getresponse()
        body, sock = failed.read(), conn.sock
        assert failed.status == 500 and sock is not None and failed.getheader("connection") != "close"
        conn.request("GET", "/api/v1/agents")  # the same keep-alive connection: was reset
        after = conn.getresponse()
        assert after.status == 200 and json.loads(after.read()) == {"agents": []}
        assert conn.sock is sock  # not a new connection
        conn.close()
    assert json.loads(body) == {"detail": "internal error"}
    assert "the disk is on fire" in caplog.text and "GET /api/v1/services failed" in caplog.text
