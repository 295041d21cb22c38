"""The web UI in a real browser against a real server.

A `deeptrace server` subprocess is filled through its ingest API with the traces of
tests/ui_seed.py (nginx -> gateway -> users/redis/postgres, a 2,000-span batch trace, some
failures, a few traces from Kubernetes pods and a Docker container), then headless Chromium
drives every page: search, scatter, waterfall, span detail, service map, agents.
Screenshots of each page go to tests/artifacts/ui/.

The browser is Debian's chromium (Playwright's own download is not used). Where it cannot
run the tests are skipped with the reason, except under DEEPTRACE_REQUIRE_BROWSER=1 (CI),
where that is a failure.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
import ui_seed
from browser import browser_unavailable_reason, chromium
from conftest import require
from serverproc import running_server

TESTS = Path(__file__).parent
ARTIFACTS = TESTS / "artifacts" / "ui"
TOKEN = "ui-test-token"
WAIT_MS = 15_000


def require_browser() -> None:
    require(browser_unavailable_reason(), "DEEPTRACE_REQUIRE_BROWSER")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_browser()
    with running_server(tmp_path_factory.mktemp("ui-server"), token=TOKEN) as srv:
        yield srv.url


@pytest.fixture(scope="module")
def seed(server):
    s = ui_seed.build()
    ui_seed.send(server, TOKEN, s)
    ui_seed.wait_published(server, s)
    return s


@pytest.fixture(scope="module")
def browser(server):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser, server, seed):
    ctx = browser.new_context(viewport={"width": 1440, "height": 900}, base_url=server)
    pg = ctx.new_page()
    pg.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    ctx.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def api(server: str, path: str, **params):
    r = httpx.get(f"{server}/api/v1/{path}", params=params, timeout=30)
    r.raise_for_status()
    return r.json()


def shot(pg, name: str, full_page: bool = True) -> None:
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full_page)


def open_view(pg, hash_: str, ready: str) -> None:
    pg.goto("/" + hash_)
    pg.wait_for_selector(ready)


def result_ids(pg) -> list[str]:
    return pg.eval_on_selector_all("#results tr[data-trace-id]", "rows => rows.map(r => r.dataset.traceId)")


def search_ready(pg) -> None:
    pg.wait_for_selector("#results[data-state=ready]")


def search_and_wait(pg, action) -> None:
    """Run an action that starts a search and wait until its answer is drawn (not the previous one)."""
    pg.evaluate("document.getElementById('results').dataset.state = 'stale'")
    action()
    search_ready(pg)


def users_traces(seed, errors: bool | None = None) -> list[str]:
    return [t for t, e in seed.traces.items()
            if e["kind"] == "users" and (errors is None or (e["errors"] > 0) == errors)]  # fmt: skip


# --- Search -------------------------------------------------------------------------------


def test_search_lists_the_newest_page_and_plots_it(page, server, seed):
    open_view(page, "#/traces", "#results[data-state=ready]")
    want = api(server, "traces", limit=20)
    assert want["total"] == len(seed.traces)
    assert result_ids(page) == [t["trace_id"] for t in want["traces"]]
    assert f"of {len(seed.traces)}" in page.inner_text("#results-summary")
    # The scatter draws exactly the page, errors in red.
    assert page.locator("svg.scatter circle.dot").count() == 20
    errors = sum(1 for t in want["traces"] if t["error_count"] > 0)
    assert errors > 0
    assert page.locator("svg.scatter circle.dot.error").count() == errors
    first = want["traces"][0]
    row = page.locator(f"#results tr[data-trace-id='{first['trace_id']}']")
    assert first["root_service"] in row.inner_text() and first["root_name"] in row.inner_text()
    assert all(s in row.inner_text() for s in first["services"])
    shot(page, "search")


def test_search_filters_sort_paging_and_url_state(page, server, seed):
    open_view(page, "#/traces", "#results[data-state=ready]")
    # Operations are loaded for the chosen service.
    page.select_option("#search-form select[name=service]", "users")
    page.wait_for_selector("#search-form select[name=operation] option[value='GET /users/{id}']", state="attached")
    page.select_option("#search-form select[name=status]", "error")
    search_and_wait(page, lambda: page.click("#search-button"))
    assert "service=users" in page.url and "status=error" in page.url
    assert sorted(result_ids(page)) == sorted(users_traces(seed, errors=True))

    # The URL is the state: a reload gives the same filters and results.
    page.reload()
    search_ready(page)
    assert page.input_value("#search-form select[name=service]") == "users"
    assert page.input_value("#search-form select[name=status]") == "error"
    assert sorted(result_ids(page)) == sorted(users_traces(seed, errors=True))

    # Attribute filter: one user's page.
    target = users_traces(seed, errors=False)[3]
    path = seed.traces[target]["url_path"]
    page.goto("/#/traces")
    search_ready(page)
    page.fill("#search-form input[name=attr]", f"url.path={path}")
    page.press("#search-form input[name=attr]", "Enter")
    assert f"url.path={path}" in page.inner_text("#attr-chips")
    search_and_wait(page, lambda: page.click("#search-button"))
    assert result_ids(page) == [target]

    # Duration filter and sort by duration (header click), longest first.
    page.goto("/#/traces?min=100")
    search_ready(page)
    slow = api(server, "traces", min_duration_ms=100, sort="duration", limit=100)
    assert len(result_ids(page)) == slow["total"] > 0
    search_and_wait(page, lambda: page.click("th[data-sort=duration] button"))
    assert "sort=duration" in page.url
    assert result_ids(page) == [t["trace_id"] for t in slow["traces"]]
    assert seed.traces[result_ids(page)[0]]["kind"] == "report"

    # Paging: 47 traces are three pages of 20.
    page.goto("/#/traces")
    search_ready(page)
    seen = set(result_ids(page))
    search_and_wait(page, lambda: page.click("#page-next"))
    assert "offset=20" in page.url
    assert f"21–40 of {len(seed.traces)}" in page.inner_text("#results-summary")
    seen |= set(result_ids(page))
    search_and_wait(page, lambda: page.click("#page-next"))
    seen |= set(result_ids(page))
    assert len(result_ids(page)) == len(seed.traces) - 40 and page.is_disabled("#page-next")
    assert seen == set(seed.traces)

    # A time range with nothing in it says so.
    page.goto("/#/traces?range=custom&from=2001-01-01T00:00&to=2001-01-01T01:00")
    search_ready(page)
    assert "No traces match" in page.inner_text("#results")


def test_scatter_dot_opens_its_trace(page, seed):
    open_view(page, "#/traces?status=error", "#results[data-state=ready]")
    dot = page.locator("svg.scatter circle.dot.error").first
    trace_id = dot.get_attribute("data-trace-id")
    dot.click()
    page.wait_for_selector("#waterfall[data-state=ready]")
    assert page.url.endswith(f"#/trace/{trace_id}")


# --- Waterfall ----------------------------------------------------------------------------


def rows(page) -> list[dict]:
    return page.eval_on_selector_all(".wf-rows .wf-row", """rows => rows.map(r => ({
        depth: Number(r.dataset.depth), id: r.dataset.spanId, hidden: r.hidden,
        error: r.classList.contains('error'), text: r.innerText}))""")


def test_waterfall_tree_detail_panel_and_collapse(page, server, seed):
    trace_id = users_traces(seed, errors=True)[0]
    open_view(page, f"#/trace/{trace_id}", "#waterfall[data-state=ready]")
    got = rows(page)
    # nginx SERVER > nginx CLIENT > gateway SERVER > (redis CLIENT, users CLIENT > users SERVER > postgres CLIENT)
    assert [r["depth"] for r in got] == [0, 1, 2, 3, 3, 4, 5]
    assert [r["text"].split()[0] for r in got] == ["nginx", "nginx", "gateway", "gateway", "gateway", "users", "users"]
    assert sum(r["error"] for r in got) == seed.traces[trace_id]["errors"] == 6
    assert "57014" in got[6]["text"]
    assert "seq-join 1.00" in got[2]["text"]
    head = page.inner_text(".trace-head")
    assert "7" in head and "gateway" in head and "users" in head

    # The gateway's SERVER span: linked to nginx's CLIENT span by the TCP bytes.
    page.click(f".wf-row[data-span-id='{got[2]['id']}'] .wf-op")
    page.wait_for_selector("#span-detail:not([hidden])")
    assert page.inner_text("#detail-link") == "seq-join 1.00"
    detail = page.inner_text("#span-detail")
    for text in ["gw-1", "2301", "10.1.0.20:8080", "SERVER", "http1", "http.request.header.x-request-id"]:
        assert text in detail, text
    req = page.inner_text("#req-head")
    assert req.startswith("GET /api/users/") and "\\r\\n" in req and "X-Request-ID:" in req
    assert f"span={got[2]['id']}" in page.url

    # The postgres call: binary heads shown with escapes, inferred link with its confidence.
    page.click(f".wf-row[data-span-id='{got[6]['id']}'] .wf-op")
    page.wait_for_function(f"document.querySelector('#span-detail').innerText.includes('{got[6]['id']}')")
    assert re.fullmatch(r"(inferred|thread|header-id) \d\.\d\d", page.inner_text("#detail-link"))
    assert page.inner_text("#req-head").startswith("Q\\x00\\x00\\x00")
    resp = page.inner_text("#resp-head")
    assert resp.startswith("E\\x00") and "C57014\\x00" in resp and "statement timeout" in resp
    shot(page, "trace")

    # Reload keeps the selected span open.
    page.reload()
    page.wait_for_selector("#span-detail:not([hidden])")
    assert got[6]["id"] in page.inner_text("#span-detail")

    # Folding the gateway SERVER hides its 4 descendants; unfolding brings them back.
    page.click(f".wf-row[data-span-id='{got[2]['id']}'] .wf-toggle")
    assert [r["hidden"] for r in rows(page)] == [False, False, False, True, True, True, True]
    page.click(f".wf-row[data-span-id='{got[2]['id']}'] .wf-toggle")
    assert not any(r["hidden"] for r in rows(page))
    page.click("#collapse-all")
    assert [r["hidden"] for r in rows(page)] == [False] + [True] * 6
    page.click("#expand-all")
    assert not any(r["hidden"] for r in rows(page))

    # Escape closes the panel.
    page.keyboard.press("Escape")
    page.wait_for_selector("#span-detail", state="hidden")


def test_waterfall_of_2000_spans_stays_responsive(page, seed):
    trace_id = next(t for t, e in seed.traces.items() if e["kind"] == "report")
    assert seed.traces[trace_id]["spans"] == 2000
    t0 = time.monotonic()
    open_view(page, f"#/trace/{trace_id}", "#waterfall[data-state=ready]")
    loaded_s = time.monotonic() - t0
    assert page.get_attribute("#waterfall", "data-rows") == "2000"
    depths = page.eval_on_selector_all(".wf-rows .wf-row", "rows => rows.map(r => Number(r.dataset.depth))")
    assert depths == [0, 1, 2] + [3] * 1997
    render_ms = page.evaluate("window.__deeptrace.lastWaterfallMs")
    # Building the rows is one pass: well under a second even on a slow CI machine.
    assert render_ms < 1500, f"drawing 2,000 rows took {render_ms:.0f} ms"
    assert loaded_s < 10
    # The page still answers at once: fold the 1,997 calls, open a detail.
    t1 = time.monotonic()
    page.click(".wf-rows .wf-row[data-depth='2'] .wf-toggle")
    assert page.locator(".wf-rows .wf-row:not([hidden])").count() == 3
    page.click(".wf-rows .wf-row[data-depth='2'] .wf-op")
    page.wait_for_selector("#span-detail:not([hidden])")
    assert time.monotonic() - t1 < 3
    page.click(".wf-rows .wf-row[data-depth='2'] .wf-toggle")
    shot(page, "trace-2000", full_page=False)


def test_spans_whose_parent_is_missing_are_roots(page):
    """A trace with a hole (a parent not stored, e.g. aged out): its orphans are drawn as roots."""
    base = {"kind": "SERVER", "protocol": "http1", "host": "h", "pid": 1, "tid": 1, "status": "ok",
            "status_code": None, "attributes": {}, "req_head": "", "resp_head": "", "link_method": "seq-join",
            "link_confidence": 1.0}  # fmt: skip
    t = 1_700_000_000_000_000_000
    spans = [
        {**base, "span_id": "a", "parent_span_id": None, "service": "edge", "name": "GET /", "start_ns": t,
         "end_ns": t + 9_000_000, "duration_ns": 9_000_000, "link_method": "root"},
        {**base, "span_id": "b", "parent_span_id": "a", "service": "api", "name": "GET /x", "start_ns": t + 10**6,
         "end_ns": t + 5_000_000, "duration_ns": 4_000_000},
        {**base, "span_id": "c", "parent_span_id": "gone", "service": "db", "name": "SELECT t", "start_ns": t + 2 * 10**6,
         "end_ns": t + 3_000_000, "duration_ns": 1_000_000, "link_method": "inferred", "link_confidence": 0.83},
        {**base, "span_id": "d", "parent_span_id": "c", "service": "db", "name": "FETCH", "start_ns": t + 2_500_000,
         "end_ns": t + 2_900_000, "duration_ns": 400_000},
    ]  # fmt: skip
    page.route(re.compile(r"/api/v1/traces/holey$"),
               lambda route: route.fulfill(json={"trace_id": "holey", "spans": spans}))  # fmt: skip
    open_view(page, "#/trace/holey", "#waterfall[data-state=ready]")
    got = rows(page)
    assert [(r["id"], r["depth"]) for r in got] == [("a", 0), ("b", 1), ("c", 0), ("d", 1)]
    assert "parent missing" in got[2]["text"] and "inferred 0.83" in got[2]["text"]
    page.click(".wf-row[data-span-id='c'] .wf-op")
    assert page.inner_text("#detail-link") == "inferred 0.83"
    assert "not in this trace" in page.inner_text("#span-detail")


# --- Service map --------------------------------------------------------------------------


def test_service_map_nodes_edges_and_time_series(page, server, seed):
    open_view(page, "#/map", "#service-map[data-state=ready]")
    want = api(server, "service-map")
    services = {n["service"] for n in want["nodes"]} | {e[k] for e in want["edges"] for k in ("source", "target")}
    assert {"nginx", "gateway", "users", "reports"} <= services
    assert page.get_attribute("#service-map", "data-node-count") == str(len(services))
    graph = page.evaluate("""() => { const cy = window.__deeptrace.cy;
        return {nodes: cy.nodes().map(n => n.id()).sort(), edges: cy.edges().map(e => e.id()).sort()}; }""")
    assert graph["nodes"] == sorted(services)
    assert graph["edges"] == sorted(f"{e['source']}>{e['target']}" for e in want["edges"])
    calls = {(e["source"], e["target"]) for e in want["edges"]}
    assert {("nginx", "gateway"), ("gateway", "users"), ("nginx", "reports")} <= calls
    # The same figures as tables.
    assert page.locator("#map-nodes tbody tr").count() == len(want["nodes"])
    assert page.locator("#map-edges tbody tr").count() == len(want["edges"])
    users = next(n for n in want["nodes"] if n["service"] == "users")
    assert users["requests"] == len(users_traces(seed))

    # A real click on the users node: its time series and a link to its traces.
    pos = page.evaluate("() => window.__deeptrace.cy.getElementById('users').renderedPosition()")
    box = page.locator("#service-map").bounding_box()
    page.mouse.click(box["x"] + pos["x"], box["y"] + pos["y"])
    page.wait_for_selector("#map-charts[data-points]")
    assert int(page.get_attribute("#map-charts", "data-points")) > 0
    assert page.locator("#map-charts svg.chart").count() == 3
    assert "node=users" in page.url
    side = page.inner_text("#map-side")
    assert "Requests" in side and "null" not in side and "undefined" not in side
    shot(page, "map")

    # Redis is only seen through its clients: drawn dashed, its charts are its busiest caller's calls.
    redis = next(n["service"] for n in want["nodes"] if n["service"].startswith("redis"))
    assert page.evaluate(f"() => window.__deeptrace.cy.getElementById({redis!r}).hasClass('untraced')")
    assert not page.evaluate("() => window.__deeptrace.cy.getElementById('users').hasClass('untraced')")
    page.click(f"#map-nodes a:text-is({redis!r})")
    page.wait_for_function("document.querySelector('#map-side h2').innerText.includes('redis')")
    page.wait_for_selector("#map-charts[data-points]")
    assert "calls from reports" in page.inner_text("#map-side")
    assert "service=reports" in page.get_attribute("#map-search-link", "href")

    page.click("#map-nodes a:text-is('users')")
    page.wait_for_selector("#map-charts[data-points]")
    page.click("#map-search-link")
    search_ready(page)
    assert "service=users" in page.url
    assert len(result_ids(page)) == 20 and set(result_ids(page)) <= set(users_traces(seed))
    assert f"of {len(users_traces(seed))}" in page.inner_text("#results-summary")


# --- Read authentication ------------------------------------------------------------------


def test_with_read_auth_the_ui_works_after_logging_in(browser, tmp_path):
    """--read-auth: without credentials the page is refused; with them (as a browser sends them
    after its password prompt) every view and its API calls work."""
    creds = ("viewer", "pw-123")
    with running_server(tmp_path, args=("--hold", "0.5", "--read-auth", ":".join(creds)), token=TOKEN) as srv:
        s = ui_seed.build(n_users=3, n_catalog=2, big_calls=5)
        ui_seed.send(srv.url, TOKEN, s)
        ui_seed.wait_published(srv.url, s, auth=creds)
        anonymous = browser.new_context(base_url=srv.url)
        assert anonymous.request.get("/").status == 401  # (a page would wait for the password prompt)
        anonymous.close()
        ctx = browser.new_context(base_url=srv.url, http_credentials={"username": creds[0], "password": creds[1]})
        pg = ctx.new_page()
        pg.set_default_timeout(WAIT_MS)
        open_view(pg, "#/traces", "#results[data-state=ready]")
        assert sorted(result_ids(pg)) == sorted(s.traces)
        open_view(pg, f"#/trace/{result_ids(pg)[0]}", "#waterfall[data-state=ready]")
        open_view(pg, "#/map", "#service-map[data-state=ready]")
        open_view(pg, "#/agents", "#agents[data-state=ready]")
        ctx.close()


# --- Agents -------------------------------------------------------------------------------


def test_agents_table(page, seed):
    open_view(page, "#/agents", "#agents[data-state=ready]")
    rows_ = page.locator("#agents tr.agent-row")
    assert rows_.count() == len(seed.agents) == 7
    text = page.inner_text("#agents")
    for host in ["web-1", "gw-1", "users-1", "batch-1", "node-a", "node-b", "docker-1"]:
        assert host in text
    assert "6.8.0-45-generic" in text and "48 MiB" in text and "1,998" in text
    assert "disk refused 2 batches, 140 spans" in text  # batch-1's spool writes that failed
    assert page.locator("#agents tr[data-stale='1']").count() == 0
    shot(page, "agents")


def test_stale_agents_are_marked(page):
    now = time.time_ns()
    agents = [
        {"agent_id": "fresh", "host": "a", "kernel": "6.1", "version": "0.1.0", "started_ns": now - 10**12,
         "last_seen_ns": now - 2 * 10**9, "stats": {"spans": 5}},
        {"agent_id": "old", "host": "b", "kernel": "6.1", "version": "0.1.0", "started_ns": now - 10**12,
         "last_seen_ns": now - 95 * 10**9, "stats": {"spans": 7, "drops": 2, "spool_batches": 3,
                                                     "spool_bytes": 4096, "spool_dropped_batches": 1}},
    ]  # fmt: skip
    page.route(re.compile(r"/api/v1/agents$"), lambda route: route.fulfill(json={"agents": agents}))
    open_view(page, "#/agents", "#agents[data-state=ready]")
    assert page.get_attribute("#agents tr[data-agent-id='fresh']", "data-stale") == "0"
    old = page.locator("#agents tr[data-agent-id='old']")
    assert old.get_attribute("data-stale") == "1"
    assert "stale" in old.inner_text() and "1 min ago" in old.inner_text()
    assert "1 stale" in page.inner_text("#agents-summary")


# --- Kubernetes and containers ------------------------------------------------------------


def placed_traces(seed, namespace=None, workload=None, pod=None) -> list[str]:
    """The seeded traces with a span in that namespace, workload and pod (those given, on one span)."""
    want = [namespace, workload, pod]
    return [t for t, e in seed.traces.items()
            if any(all(w is None or w == p for w, p in zip(want, place)) for place in e.get("places", []))]  # fmt: skip


def test_search_by_namespace_workload_and_pod_in_the_url(page, seed):
    open_view(page, "#/traces", "#results[data-state=ready]")
    page.fill("#search-form input[name=namespace]", "shop")
    page.fill("#search-form input[name=workload]", "checkout")
    search_and_wait(page, lambda: page.click("#search-button"))
    assert "namespace=shop" in page.url and "workload=checkout" in page.url
    shop_checkouts = placed_traces(seed, "shop", "checkout")
    assert len(shop_checkouts) == 4  # not staging's workload of the same name
    assert sorted(result_ids(page)) == sorted(shop_checkouts)
    # Each row says where its root ran.
    assert page.locator("#results .k8s-where").all_inner_texts() == ["shop/checkout"] * 4

    # The URL is the state: a reload gives the same filters and results.
    page.reload()
    search_ready(page)
    assert page.input_value("#search-form input[name=namespace]") == "shop"
    assert page.input_value("#search-form input[name=workload]") == "checkout"
    assert sorted(result_ids(page)) == sorted(shop_checkouts)

    # A workload is found by its name in every namespace, and on any span of a trace (cart answers checkout).
    page.fill("#search-form input[name=namespace]", "")
    search_and_wait(page, lambda: page.click("#search-button"))
    assert "namespace=" not in page.url
    assert sorted(result_ids(page)) == sorted(placed_traces(seed, workload="checkout")) and len(result_ids(page)) == 5
    page.fill("#search-form input[name=workload]", "cart")
    search_and_wait(page, lambda: page.press("#search-form input[name=workload]", "Enter"))
    assert sorted(result_ids(page)) == sorted(shop_checkouts)

    # One of checkout's two pods, from a link.
    pod = ui_seed.PODS["checkout-a"].name
    page.goto(f"/#/traces?pod={pod}")
    search_ready(page)
    assert page.input_value("#search-form input[name=pod]") == pod
    assert page.input_value("#search-form input[name=workload]") == ""
    assert sorted(result_ids(page)) == sorted(placed_traces(seed, pod=pod)) and len(result_ids(page)) == 2

    # Beside a typed attribute filter: both apply.
    page.goto(f"/#/traces?namespace=shop&attr=k8s.pod.name%3D{ui_seed.PODS['checkout-b'].name}")
    search_ready(page)
    assert ui_seed.PODS["checkout-b"].name in page.inner_text("#attr-chips")
    assert sorted(result_ids(page)) == sorted(placed_traces(seed, "shop", pod=ui_seed.PODS["checkout-b"].name))
    page.goto("/#/traces?namespace=nowhere")
    search_ready(page)
    assert "No traces match" in page.inner_text("#results")


def test_span_detail_says_which_pod_and_container_it_ran_in(page, seed):
    pod, cart = ui_seed.PODS["checkout-b"], ui_seed.PODS["cart"]
    trace_id = placed_traces(seed, pod=pod.name)[0]
    open_view(page, f"#/trace/{trace_id}", "#waterfall[data-state=ready]")
    assert page.inner_text("#trace-k8s") == "shop/cart · shop/checkout"
    got = rows(page)  # checkout SERVER > checkout CLIENT > cart SERVER
    assert [r["text"].split()[0] for r in got] == ["checkout", "checkout", "cart"]
    page.click(f".wf-row[data-span-id='{got[0]['id']}'] .wf-op")
    page.wait_for_selector("#span-detail:not([hidden])")
    assert page.text_content("#detail-k8s h3") == "Kubernetes"
    k8s = page.inner_text("#detail-k8s")
    for text in ["shop", "deployment/checkout", pod.name, pod.uid, "node-b", "Burstable"]:
        assert text in k8s, text
    container = page.inner_text("#detail-container")
    assert "containerd" in container and pod.container_id[:12] in container and pod.container_id not in container
    assert page.get_attribute("#detail-container span[title]", "title") == pod.container_id
    shot(page, "trace-k8s")

    # The callee: a StatefulSet's pod. Its workload links to the workload's traces in its namespace.
    page.click(f".wf-row[data-span-id='{got[2]['id']}'] .wf-op")
    page.wait_for_function(f"document.querySelector('#span-detail').innerText.includes('{got[2]['id']}')")
    k8s = page.inner_text("#detail-k8s")
    assert "statefulset/cart" in k8s and cart.name in k8s and "Guaranteed" in k8s and pod.name not in k8s
    page.click("#detail-k8s a:text-is('statefulset/cart')")
    search_ready(page)
    assert "namespace=shop" in page.url and "workload=cart" in page.url
    assert sorted(result_ids(page)) == sorted(placed_traces(seed, "shop", "cart"))

    # A span of no container: neither group.
    plain = users_traces(seed, errors=False)[0]
    open_view(page, f"#/trace/{plain}", "#waterfall[data-state=ready]")
    page.click(f".wf-row[data-span-id='{rows(page)[0]['id']}'] .wf-op")
    page.wait_for_selector("#span-detail:not([hidden])")
    assert page.locator("#detail-k8s, #detail-container, #trace-k8s").count() == 0

    # A container on a plain Docker host: the container group alone.
    docker = next(t for t, e in seed.traces.items() if e["kind"] == "docker")
    open_view(page, f"#/trace/{docker}", "#waterfall[data-state=ready]")
    page.click(".wf-rows .wf-row .wf-op")
    page.wait_for_selector("#span-detail:not([hidden])")
    assert page.locator("#detail-k8s, #trace-k8s").count() == 0
    container = page.inner_text("#detail-container")
    cid = ui_seed.INVOICES_CONTAINER["container.id"]
    assert "invoices" in container and "docker" in container and cid[:12] in container


# --- Errors -------------------------------------------------------------------------------


def test_failed_api_calls_show_a_message(page):
    page.route(re.compile(r"/api/v1/traces\?"),
               lambda route: route.fulfill(status=500, json={"detail": "store is on fire"}))  # fmt: skip
    open_view(page, "#/traces", "#results[data-state=error]")
    msg = page.inner_text("#results .error-box")
    assert "500" in msg and "store is on fire" in msg

    open_view(page, "#/trace/0123456789abcdef0123456789abcdef", "#waterfall[data-state=error]")
    assert "not in the store" in page.inner_text("#waterfall")

    page.route(re.compile(r"/api/v1/service-map"), lambda route: route.abort())
    open_view(page, "#/map", "#service-map[data-state=error]")
    assert "Cannot reach" in page.inner_text("#service-map")


def test_payload_heads_are_decoded_with_escapes(page):
    """Printable text kept, UTF-8 kept, control bytes and invalid UTF-8 escaped."""
    open_view(page, "#/agents", "#agents[data-state=ready]")
    out = page.evaluate("""async () => {
        const { headToText } = await import('./js/util.js');
        const b64 = (bytes) => btoa(String.fromCharCode(...bytes));
        return [headToText(b64([0x47, 0x45, 0x54, 0x0d, 0x0a, 0x00, 0xff, 0x5c])),
                headToText(b64([0xc3, 0xa9, 0x74, 0xc3, 0x28])),
                headToText('%%%')];
    }""")
    assert out[0] == "GET\\r\\n\n\\x00\\xff\\\\"
    assert out[1] == "ét\\xc3("
    assert out[2].startswith("(not valid base64")


def test_a_module_that_fails_to_load_is_reported(page):
    page.route(re.compile(r"/js/trace\.js$"), lambda route: route.fulfill(status=404, body="not found"))
    page.goto("/#/traces")
    page.wait_for_selector("#banner:not([hidden])")
    assert "could not start" in page.inner_text("#banner")
