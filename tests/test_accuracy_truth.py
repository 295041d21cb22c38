"""bench/accuracy/truth.py: ground truth placed on spans from records built by hand.

The case here is Java's: a CLIENT record names the client that made the call (an HttpClient
per pool thread, whose calls to one peer go one at a time) but not the local port."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench/accuracy"))

import truth  # noqa: E402

MS = 1_000_000
A, B = 10, 20  # pids of the caller a and the callee b
B_PORT = 9000


def call(rid: str, client: int | None, t0: float, t1: float, parent: str = "a-root") -> dict:
    return {"kind": "CLIENT", "service": "a", "pid": A, "id": rid, "parent": parent, "op": "/b",
            "peer_port": B_PORT, "lport": None, "client": client, "key": None, "ok": True,
            "t0": int(t0 * MS), "t1": int(t1 * MS)}  # fmt: skip


def handled(rid: str, peer_port: int, t0: float, t1: float) -> dict:
    return {"kind": "SERVER", "service": "b", "pid": B, "id": rid, "op": "/b", "port": B_PORT,
            "peer_port": peer_port, "key": None, "ok": True, "t0": int(t0 * MS), "t1": int(t1 * MS)}  # fmt: skip


def span(sid: str, kind: str, pid: int, lport: int, rport: int, start: float, end: float) -> dict:
    return {"span_id": sid, "kind": kind, "pid": pid, "lport": lport, "rport": rport, "name": "GET /b",
            "start_ns": int(start * MS), "end_ns": int(end * MS)}  # fmt: skip


def _placed(records, spans) -> tuple[dict[str, str], int]:
    primary, _, ambiguous = truth.map_records(records, spans)
    return {records[r]["id"]: spans[s]["span_id"] for r, s in primary.items()}, ambiguous


def test_a_clients_calls_go_to_its_connection_as_a_sequence_where_time_alone_swaps_them():
    # Clients 1 and 2 call b at about the same time, 1 on its connection from port 5001, 2
    # on 5002. By time alone r2's exchange [2, 98] fits r1 [0, 100] better than r1's own
    # [30, 70] fits it: the least squared delays would swap them. Each client's later call
    # fits only its own connection's later exchange, so the sequences decide.
    records = [call("r1", 1, 0, 100), call("r2", 2, 1, 99), call("r3", 1, 200, 300), call("r4", 2, 400, 500)]
    spans = [span("s1", "CLIENT", A, 5001, B_PORT, 30, 70), span("s2", "CLIENT", A, 5002, B_PORT, 2, 98),
             span("s3", "CLIENT", A, 5001, B_PORT, 210, 290), span("s4", "CLIENT", A, 5002, B_PORT, 410, 490)]  # fmt: skip
    placed, ambiguous = _placed(records, spans)
    assert placed == {"r1": "s1", "r2": "s2", "r3": "s3", "r4": "s4"}
    assert ambiguous == 0
    # The same records without the client: time alone, and it swaps r1 and r2.
    anonymous = [{**rec, "client": None} for rec in records]
    placed, ambiguous = _placed(anonymous, spans)
    assert (placed["r1"], placed["r2"]) == ("s2", "s1")
    assert ambiguous == 2


def test_the_callee_finds_its_caller_by_the_port_of_the_connection_the_call_was_placed_on():
    # b's handlers are timed so that the least squared delays would swap their callers.
    records = [call("r1", 1, 0, 100), call("r2", 2, 1, 99), call("r3", 1, 200, 300), call("r4", 2, 400, 500),
               handled("h1", 5001, 31, 69), handled("h2", 5002, 3, 97),
               handled("h3", 5001, 211, 289), handled("h4", 5002, 411, 489)]  # fmt: skip
    spans = [span("s1", "CLIENT", A, 5001, B_PORT, 30, 70), span("s2", "CLIENT", A, 5002, B_PORT, 2, 98),
             span("s3", "CLIENT", A, 5001, B_PORT, 210, 290), span("s4", "CLIENT", A, 5002, B_PORT, 410, 490),
             span("x1", "SERVER", B, B_PORT, 5001, 30.5, 69.5), span("x2", "SERVER", B, B_PORT, 5002, 2.5, 97.5),
             span("x3", "SERVER", B, B_PORT, 5001, 210.5, 289.5), span("x4", "SERVER", B, B_PORT, 5002, 410.5, 489.5)]  # fmt: skip
    placed = truth._Records(records, spans, root_service="a")
    assert {records[h]["id"]: records[c]["id"] for h, c in placed.caller.items()} == {
        "h1": "r1", "h2": "r2", "h3": "r3", "h4": "r4"}  # fmt: skip
    assert placed.ambiguous_callers == 0 and placed.ambiguous_spans == 0
    parent, _ = placed.span_parents()
    assert parent["x1"] == "s1" and parent["x2"] == "s2"
    # Without the ports of the connections, by time alone: h1 and h2 swap their callers.
    by_time, ambiguous = truth.callers(records, "a")
    assert {records[h]["id"]: records[c]["id"] for h, c in by_time.items()}["h1"] == "r2" and ambiguous == 2


def test_calls_taken_by_a_certain_connection_rule_its_client_out_for_the_others():
    # Connection 5001 fits only client 1 (its second exchange), taking r1; 5002's single
    # exchange fits r1 and r2, so with r1 taken it is client 2's: no guess.
    records = [call("r1", 1, 0, 100), call("r2", 2, 0, 100), call("r3", 1, 200, 300)]
    spans = [span("s1", "CLIENT", A, 5001, B_PORT, 10, 90), span("s3", "CLIENT", A, 5001, B_PORT, 210, 290),
             span("s2", "CLIENT", A, 5002, B_PORT, 20, 80)]  # fmt: skip
    placed, ambiguous = _placed(records, spans)
    assert placed == {"r1": "s1", "r3": "s3", "r2": "s2"}
    assert ambiguous == 0


def test_connections_more_than_one_client_could_own_are_counted_ambiguous():
    # Two single-exchange connections inside two identical calls: either way round fits.
    records = [call("r1", 1, 0, 100), call("r2", 2, 0, 100)]
    spans = [span("s1", "CLIENT", A, 5001, B_PORT, 10, 90), span("s2", "CLIENT", A, 5002, B_PORT, 20, 80)]
    placed, ambiguous = _placed(records, spans)
    assert sorted(placed) == ["r1", "r2"] and sorted(placed.values()) == ["s1", "s2"]
    assert ambiguous == 2


def test_an_exchange_no_client_fits_as_a_whole_is_placed_by_time():
    # 5001's second exchange is in no call (say the agent saw it late): the connection fits
    # no client, and its exchanges are placed one by one, by time.
    records = [call("r1", 1, 0, 100), call("r2", 2, 150, 250)]
    spans = [span("s1", "CLIENT", A, 5001, B_PORT, 10, 90), span("s9", "CLIENT", A, 5001, B_PORT, 120, 140),
             span("s2", "CLIENT", A, 5002, B_PORT, 160, 240)]  # fmt: skip
    placed, _ = _placed(records, spans)
    assert placed == {"r1": "s1", "r2": "s2"}


def test_an_id_logged_twice_gives_no_truth_rather_than_a_wrong_one():
    # Two threads of b once opened the truth log together, each with its own counter: both
    # requests were logged as "b-1" and both of their calls as "b-2" with parent "b-1". Which
    # request each call served cannot be read from them, so neither is truth for anything.
    def sql(rid, lport, t0, t1, parent):
        return {"kind": "CLIENT", "service": "b", "pid": B, "id": rid, "parent": parent, "op": "SQL",
                "peer_port": 5432, "lport": lport, "key": None, "ok": True, "t0": int(t0 * MS), "t1": int(t1 * MS)}  # fmt: skip

    records = [handled("b-1", 7001, 0, 100), handled("b-1", 7002, 5, 105), sql("b-2", 6001, 10, 20, "b-1"),
               sql("b-2", 6002, 30, 40, "b-1"), handled("b-3", 7003, 200, 300), sql("b-4", 6001, 210, 220, "b-3")]  # fmt: skip
    spans = [span("s1", "SERVER", B, B_PORT, 7001, 0, 100), span("s2", "SERVER", B, B_PORT, 7002, 5, 105),
             span("c1", "CLIENT", B, 6001, 5432, 11, 19), span("c2", "CLIENT", B, 6002, 5432, 31, 39),
             span("s3", "SERVER", B, B_PORT, 7003, 200, 300), span("c3", "CLIENT", B, 6001, 5432, 211, 219)]  # fmt: skip
    t = truth.build(spans, records, root_service="b")
    assert t.coverage["records_with_duplicate_ids"] == 4
    assert "c1" not in t.parent and "c2" not in t.parent
    assert t.parent["c3"] == "s3"
