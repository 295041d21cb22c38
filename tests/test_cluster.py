"""Several servers on one ClickHouse store (a real clickhouse-server, Debian's 18.16): they
write the traces one server writes, hand agents over when one stops without linking a span
twice or losing one, and answer for the same traces through their APIs."""

from __future__ import annotations

import copy
import random
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
import spanmaker as sm
from clickhouse import clickhouse_server
from clusterreplay import SECOND, differences, linked, replay, servers_on
from serverproc import ServerProcess

from deeptrace.server.cluster import owner
from deeptrace.server.store.clickhouse_store import ClickHouseStore
from deeptrace.server.store.duckdb_store import DuckDBStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "server"))
from synth import shop_spans  # noqa: E402

T0 = 1_750_000_000 * SECOND


@pytest.fixture(scope="module")
def clickhouse_port():
    with clickhouse_server() as port:
        yield port


def url(port: int) -> str:
    return f"clickhouse://127.0.0.1:{port}/c_{uuid.uuid4().hex[:12]}"


def agent(d: dict) -> str:
    return f"agent-{d['host']}"


def chain(n: int, rng: random.Random) -> list[dict]:
    """Requests through three hosts, front -> mid -> back, many in flight at once so that
    the mid tier's calls must be inferred; every hop's SERVER span is seq-joined to the
    CLIENT span on the host before it."""
    spans, t = [], T0 // 1000  # µs
    for _ in range(n):
        t += int(rng.expovariate(1 / 3000))
        dur = 2000 + int(rng.expovariate(1 / 4000))
        root = sm.server(10, t, t + dur, name="GET /front", host="front", laddr="10.1.0.1", lport=80,
                         raddr="10.9.9.9", req_seq=[rng.randrange(2**31)] * 2)  # fmt: skip
        hop1 = sm.call_pair(10, 20, t + dur // 10, t + dur * 8 // 10, rng.randrange(2**31), name="GET /mid",
                            caller_host="front", callee_host="mid")  # fmt: skip
        a, b = hop1[1]["start_ns"] // 1000, hop1[1]["end_ns"] // 1000
        hop2 = sm.call_pair(20, 30, a + (b - a) // 5, a + (b - a) * 3 // 5, rng.randrange(2**31), name="GET /back",
                            caller_host="mid", callee_host="back")  # fmt: skip
        spans += [root, *hop1, *hop2]
    for d in spans:
        d["trace_id"] = uuid.uuid4().hex
    return spans


def spread(spans: list[dict], hosts: int) -> list[dict]:
    """The shop's two hosts made `hosts`: each trace's pair of hosts picked in turn."""
    for k in range(0, len(spans), 4):
        for d in spans[k:k + 4]:
            d["host"] = f"{d['host']}-{(k // 4) % (hosts // 2)}"
    return spans


@pytest.mark.parametrize("workload", ["shop", "chain"])
def test_two_servers_write_the_traces_one_server_writes(clickhouse_port, workload):
    rng = random.Random(7)
    spans = spread(shop_spans(400, T0, T0 + 30 * SECOND, rng), 8) if workload == "shop" else chain(600, rng)
    one = DuckDBStore(":memory:")
    replay(servers_on([one]), copy.deepcopy(spans), agent)
    single = linked(one, spans)
    location = url(clickhouse_port)
    stores = [ClickHouseStore(location), ClickHouseStore(location)]
    servers = servers_on(stores)
    agents = {agent(d) for d in spans}
    assert {owner(a, ["s0", "s1"]) for a in agents} == {"s0", "s1"}, "both servers must link some agents"
    replay(servers, copy.deepcopy(spans), agent)
    both = linked(stores[0], spans)
    assert len(single) == len(both) == len(spans)
    assert differences(single, both) == []
    assert sum(s.linker.stats.remote_callers for s in servers) > 0  # joins across servers happened
    assert all(s.linker.stats.callers_never_stored == 0 for s in servers)
    traces = {d["trace_id"] for d in both.values()}
    assert len(traces) == (400 if workload == "shop" else 600)  # whole trees: one trace per request
    for s in stores:
        s.close()


@pytest.mark.parametrize("how", ["crashed", "cut off"])
def test_a_server_that_stops_hands_its_agents_over_nothing_linked_twice_or_lost(clickhouse_port, how):
    """s1 stops in the middle without a last pass (a crash), or goes on running without
    getting a heartbeat through (cut off from the store, as the others see it): s0 sees it
    gone, takes its agents' batches from the store, and every span is written once."""
    spans = spread(shop_spans(600, T0, T0 + 40 * SECOND, random.Random(3)), 8)
    location = url(clickhouse_port)
    stores = [ClickHouseStore(location), ClickHouseStore(location)]
    s0, s1 = servers_on(stores)
    crash_at = T0 + 20 * SECOND

    def alive(now: int):
        if now < crash_at:
            return [s0, s1]
        s0.membership.servers = ["s0"]
        if how == "crashed":
            return [s0]
        s1.membership._last_beat = s1.membership.clock() - 3600  # its heartbeats fail from here on
        return [s0, s1]

    replay([s0, s1], copy.deepcopy(spans), agent, alive=alive)
    assert s1.linker.stats.spans_published > 0 and s0.linker.stats.spans_taken_over > 0
    got = linked(stores[0], spans)  # fails if a span was stored twice
    assert len(got) == len(spans)
    assert stores[0].stats().incoming_batches == 0
    for s in stores:
        s.close()


def test_two_server_processes_answer_for_the_same_traces(tmp_path, clickhouse_port):
    """Two `deeptrace server` processes on one store: a caller's span posted to one, its
    callee's to the other, one trace from either; then one is killed, and the other takes
    its agents within seconds."""
    location = url(clickhouse_port)
    servers = [ServerProcess(tmp_path / f"s{k}.duckdb", args=("--hold", "0.5"), store=location).start()
               for k in range(2)]  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while any(len(s.get("/api/v1/status").json()["cluster"]["servers"]) < 2 for s in servers):
            assert time.monotonic() < deadline, "the servers do not see each other"
            time.sleep(0.2)

        def call(k: int) -> tuple[dict, dict]:
            t0 = time.time_ns() // 1000 - 2_000_000
            caller, callee = sm.call_pair(1, 2, t0, t0 + 900, seq=1000 + k, caller_host="host-a", callee_host="host-b")
            assert servers[0].post([caller], agent_id="host-a").status_code == 200
            assert servers[-1].post([callee], agent_id="host-b").status_code == 200
            return caller, callee

        def joined(caller: dict, callee: dict, via: list[ServerProcess], timeout_s: float = 30) -> None:
            deadline = time.monotonic() + timeout_s
            while True:
                got = [s.get(f"/api/v1/spans/{callee['span_id']}") for s in via]
                if all(r.status_code == 200 for r in got):
                    break
                assert time.monotonic() < deadline, f"not linked in {timeout_s} s: {[r.text for r in got]}"
                time.sleep(0.2)
            for s in via:
                span = s.get(f"/api/v1/spans/{callee['span_id']}").json()
                assert span["parent_span_id"] == caller["span_id"] and span["link_method"] == "seq-join"
                trace = s.get(f"/api/v1/traces/{span['trace_id']}").json()
                assert sorted(d["span_id"] for d in trace["spans"]) == sorted([caller["span_id"], callee["span_id"]])

        joined(*call(1), via=servers)
        servers[1].stop(signal.SIGKILL)
        servers = servers[:1]
        t_killed = time.monotonic()
        joined(*call(2), via=servers)  # both ends now on the one server left
        assert time.monotonic() - t_killed < 30
    finally:
        for s in servers:
            s.stop()


class FakeClusterStore:
    """Only what Membership asks of a shared store: heartbeats and who is alive."""

    def __init__(self) -> None:
        self.live: list[str] = []
        self.beats: list[tuple[str, bool]] = []

    def heartbeat(self, server_id: str, address: str, leaving: bool = False) -> None:
        self.beats.append((server_id, leaving))

    def live_servers(self, timeout_s: float) -> list[str]:
        return list(self.live)


def membership(store, server_id: str, clock):
    from deeptrace.server.cluster import Membership
    from deeptrace.server.store.base import Cluster

    Cluster.register(FakeClusterStore)  # a virtual subclass: what the linker checks for
    return Membership(store, "here:1", server_id, clock=clock)


def test_rendezvous_moves_only_the_agents_a_new_server_wins():
    agents = [f"agent-{k}" for k in range(400)]
    before = {a: owner(a, ["s0", "s1"]) for a in agents}
    after = {a: owner(a, ["s0", "s1", "s2"]) for a in agents}
    moved = [a for a in agents if before[a] != after[a]]
    assert all(after[a] == "s2" for a in moved)  # nobody else's agents change hands
    assert 90 < len(moved) < 180  # about a third
    assert 150 < sum(v == "s0" for v in before.values()) < 250


def test_a_server_waits_before_taking_an_agent_and_lets_go_when_the_store_is_away():
    from deeptrace.server.cluster import HANDOFF_S, SERVER_TIMEOUT_S

    now = [100.0]
    store = FakeClusterStore()
    store.live = ["s0"]
    m = membership(store, "s0", lambda: now[0])
    m.beat()
    assert not m.owns("agent-a")  # its last owner may still be writing
    now[0] += HANDOFF_S
    assert m.owns("agent-a")
    store.live = ["s0", "s1"]
    m.beat()
    mine = [a for a in (f"agent-{k}" for k in range(20)) if owner(a, ["s0", "s1"]) == "s0"]
    theirs = [a for a in (f"agent-{k}" for k in range(20)) if owner(a, ["s0", "s1"]) == "s1"]
    assert theirs and not any(m.owns(a) for a in theirs)
    now[0] += SERVER_TIMEOUT_S  # no heartbeat got through since: the others take everything
    assert not any(m.owns(a) for a in mine)
    m.close()
    assert store.beats[-1] == ("s0", True)


def test_one_server_on_the_embedded_store_links_every_agent_and_asks_nobody(tmp_path):
    from deeptrace.server.cluster import Membership

    m = Membership(DuckDBStore(tmp_path / "s.duckdb"))
    m.start()
    assert not m.shared and m.owns("any-agent")


def test_call_ends_are_found_by_key_and_dropped_after_two_hours(clickhouse_port):
    from deeptrace.server.cluster import call_rows

    store = ClickHouseStore(url(clickhouse_port))
    try:
        caller, callee = sm.call_pair(1, 2, T0 // 1000, T0 // 1000 + 900, seq=4242)
        now = time.time_ns()
        store.record_call_ends(call_rows([caller]), now - 3 * 3600 * SECOND)  # accepted 3 hours ago
        store.record_call_ends(call_rows([callee]), now)
        key = "seq 4242 4342"
        assert [r.span_id for r in store.call_ends([key], "CLIENT")] == [caller["span_id"]]
        assert [r.span_id for r in store.call_ends([key], "SERVER")] == [callee["span_id"]]
        store.apply_retention(now, None, None)
        assert store.call_ends([key], "CLIENT") == []
        assert [r.span_id for r in store.call_ends([key], "SERVER")] == [callee["span_id"]]
    finally:
        store.close()
