"""The server against hostile or broken input: every span field bounded at ingest, a span that
still cannot be linked or written moved aside without holding up anyone else's, an unavailable
store waited out, and bodies refused while they stream in."""

from __future__ import annotations

import base64
import gzip
import json
import os
import socket
import time
import uuid

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import spanmaker as sm
from deeptrace import schema
from deeptrace.association import streaming
from deeptrace.server.app import ServerConfig, create_app
from deeptrace.server.store.base import StoreUnavailable
from deeptrace.server.store.duckdb_store import DuckDBStore
from serverproc import ServerProcess, running_server

TOKEN = "test-token"


def recent_pair(seq: int = 1, name: str = "GET /x") -> list[dict]:
    t0 = time.time_ns() // 1000 - 2_000_000
    return list(sm.call_pair(1, 2, t0, t0 + 900, seq=seq, name=name))


def body(spans: list[dict], agent_id: str = "agent-1") -> bytes:
    return gzip.compress(json.dumps({"agent_id": agent_id, "batch_id": uuid.uuid4().hex, "spans": spans}).encode())


HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Encoding": "gzip", "Content-Type": "application/json"}


# --- ingest refuses what no store could take, naming span and key ---

REFUSED = [
    ("pid", 2**63, "pid: expected `int` <= 4294967295"),
    ("conn_id", 2**64 - 1, "conn_id: expected `int` <= 9223372036854775807"),
    ("start_ns", -5, "start_ns: expected `int` >= 946684800000000000"),
    ("end_ns", 2**63 - 1, "end_ns: expected `int` <= 4102444800000000000"),
    ("lport", 70000, "lport: expected `int` <= 65535"),
    ("tid", True, "tid: expected `int | null`, got `bool`"),
    ("span_id", "x" * 10_000, "span_id: expected `str` matching regex"),
    ("trace_id", "a b", "trace_id: expected `str` matching regex"),
    ("kind", "SIDEWAYS", "kind: invalid enum value 'SIDEWAYS'"),
    ("status", "meh", "status: invalid enum value 'meh'"),
    ("service", "s" * 300, "service: expected `str` of length <= 255"),
    ("req_seq", [1, 2**40], "req_seq[1]: expected `int` <= 4294967295"),
    ("req_seq", [1, 2, 3], "req_seq: expected `array` of length <= 2"),
    ("req_head", "not base64!", "req_head: must be base64"),
    ("attributes", {"x": {"nested": 1}}, "attributes[...]: expected `bool | int | float | str | null`, got `object`"),
    ("attributes", {f"k{i}": i for i in range(65)}, "attributes: expected `object` of length <= 64"),
    ("attributes", {"k" * 300: 1}, "attributes (a key): expected `str` of length <= 256"),
]


def test_values_json_cannot_carry_are_refused_in_process():
    """What the agent checks before it sends: Python values no JSON parser would give."""
    good = recent_pair()[0]
    assert schema.check_span(good) is None
    assert schema.check_span({**good, "attributes": {"n": 2**70}}) == "attributes[...]: expected `int` <= 9223372036854775807"
    assert schema.check_span({**good, "attributes": {"f": float("nan")}}) == "attributes.f: is not a finite number"
    assert schema.check_span({**good, "end_ns": good["start_ns"] - 1}) == "end_ns: is before start_ns"
    assert schema.check_span([good]) == "expected `object`, got `array`"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("hardening")) as srv:
        yield srv


@pytest.mark.parametrize("key,value,message", REFUSED, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(REFUSED)])
def test_ingest_refuses_values_no_column_can_hold(live, key, value, message):
    spans = recent_pair(seq=1000)
    spans[1][key] = value
    r = live.post(spans)
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith(f"span 1: {message}")


def test_ingest_refuses_bad_agent_and_batch_ids(live):
    r = live.post(recent_pair(), agent_id="a" * 5000)
    assert r.status_code == 400 and "agent_id must be 1-128 letters" in r.json()["detail"]
    r = live.post(recent_pair(), batch_id="../../etc")
    assert r.status_code == 400 and "batch_id must be" in r.json()["detail"]


def test_long_text_is_cut_with_a_marker_and_server_keys_are_ignored(live):
    spans = recent_pair(seq=2000)
    huge = "v" * (30 << 20)  # 30 MiB in one attribute: it was stored whole and served back
    spans[0]["attributes"] = {"big": huge, "small": "ok"}
    spans[0]["name"] = "GET /" + "p" * 5000
    spans[0]["req_head"] = base64.b64encode(b"h" * 100_000).decode()
    spans[0]["link_confidence"] = "not a number"  # the server's to compute: ignored, not a poison
    assert live.post(spans).status_code == 200
    live.wait_published(live.get("/api/v1/status").json()["store"]["spans"] + 2)
    stored = live.get(f"/api/v1/spans/{spans[0]['span_id']}").json()
    assert stored["attributes"]["small"] == "ok"
    assert len(stored["attributes"]["big"]) == schema.MAX_ATTRIBUTE_CHARS
    assert stored["attributes"]["big"].endswith(schema.TRUNCATED)
    assert len(stored["name"]) == schema.MAX_NAME_CHARS and stored["name"].endswith(schema.TRUNCATED)
    head = base64.b64decode(stored["req_head"])
    assert len(head) == schema.MAX_HEAD_BYTES and head.endswith(schema.TRUNCATED_BYTES)
    assert isinstance(stored["link_confidence"], float | None)


# --- bodies refused while they stream in ---

def _raw_request(port: int, head: bytes, chunks: list[bytes], read_timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(head)
        try:
            for c in chunks:
                s.sendall(c)
        except OSError:
            pass  # the server answered and closed: what it said is still to be read
        out = b""
        while True:
            try:
                got = s.recv(65536)
            except OSError:
                break
            if not got:
                break
            out += got
        return out


def test_an_oversized_body_is_refused_before_it_is_read(live):
    declared = (b"POST /api/v1/spans HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-token\r\n"
                b"Content-Type: application/json\r\nContent-Length: 104857600\r\n\r\n")  # fmt: skip
    t0 = time.monotonic()
    answer = _raw_request(live.port, declared, [b"{" * 65536])
    assert answer.startswith(b"HTTP/1.1 413") and b"larger than" in answer
    assert time.monotonic() - t0 < 5  # not 100 MiB read first
    chunked = (b"POST /api/v1/spans HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-token\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
    piece = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
    answer = _raw_request(live.port, chunked, [piece] * 40)  # 40 MiB, no length given
    assert answer.startswith(b"HTTP/1.1 413")
    status = live.get("/api/v1/status").json()
    assert status["ingest"]["rejected"] >= 2


def test_agent_reports_are_bounded(live):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    import httpx

    r = httpx.put(f"{live.url}/api/v1/agents/{'a' * 5000}", json={"host": "h"}, headers=auth)
    assert r.status_code == 400 and "agent id must be" in r.json()["detail"]
    r = httpx.put(f"{live.url}/api/v1/agents/a1", json={"host": "h", "stats": {"x": "y" * (20 << 20)}}, headers=auth)
    assert r.status_code == 413
    r = httpx.put(f"{live.url}/api/v1/agents/a1", json={"host": "h", "started_ns": 2**70}, headers=auth)
    assert 400 <= r.status_code < 500
    r = httpx.put(f"{live.url}/api/v1/agents/a1", json={"host": "h", "stats": {"spans": 10**400}}, headers=auth)
    assert r.status_code == 200
    assert live.get("/metrics").status_code == 200  # a huge counter does not break the scrape


# --- a span that cannot be written or linked holds up nobody else ---

class RefusingStore(DuckDBStore):
    """Refuses any write holding a span named 'poison', as a store refuses a value it cannot
    hold; optionally unavailable for the first few writes, as a full disk is."""

    def __init__(self, path, unavailable_writes: int = 0) -> None:
        super().__init__(path)
        self.unavailable_writes = unavailable_writes

    def write_spans(self, spans, done_batches, dead=()):
        if self.unavailable_writes > 0 and (spans or dead):
            self.unavailable_writes -= 1
            raise StoreUnavailable("No space left on device")
        if any(d["name"] == "poison" for d in spans):
            raise OverflowError("int too big to convert")
        return super().write_spans(spans, done_batches, dead)


def _client(store, **config) -> TestClient:
    return TestClient(create_app(ServerConfig(token=TOKEN, hold_s=0.2, **config), store=store))


def _wait(client: TestClient, n: int, key: str = "spans", timeout_s: float = 20) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get("/api/v1/status").json()
        if status["store"][key] >= n or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def _metric(client: TestClient, name: str) -> float:
    for fam in text_string_to_metric_families(client.get("/metrics").text):
        for sample in fam.samples:
            if sample.name == name:
                return sample.value
    raise KeyError(name)


def test_an_unwritable_span_is_dead_lettered_and_everyone_elses_spans_are_written(tmp_path):
    store = RefusingStore(tmp_path / "s.duckdb")
    with _client(store) as client:
        poisoned = recent_pair(seq=10) + recent_pair(seq=20)
        poisoned[2]["name"] = "poison"
        others = recent_pair(seq=30) + recent_pair(seq=40)
        assert client.post("/api/v1/spans", content=body(poisoned, "agent-a"), headers=HEADERS).status_code == 200
        assert client.post("/api/v1/spans", content=body(others, "agent-b"), headers=HEADERS).status_code == 200
        _wait(client, 7)
        status = _wait(client, 1, "dead_letters")  # the good spans are written before the dead letter is
        assert status["store"]["spans"] == 7 and status["store"]["dead_letters"] == 1
        assert status["store"]["incoming_batches"] == 0 and status["backlog_spans"] == 0
        assert status["linker"]["dead_letters"] == 1 and status["linker"]["write_errors"] >= 1
        for d in others + [d for d in poisoned if d["name"] != "poison"]:
            assert client.get(f"/api/v1/spans/{d['span_id']}").status_code == 200
        page = client.get("/api/v1/dead-letters").json()
        assert page["total"] == 1
        letter = page["dead_letters"][0]
        assert letter["span_id"] == poisoned[2]["span_id"] and letter["agent_id"] == "agent-a"
        assert "OverflowError" in letter["reason"] and json.loads(letter["span"])["name"] == "poison"
        assert _metric(client, "deeptrace_server_linker_dead_letters_total") == 1
        assert _metric(client, "deeptrace_server_store_dead_letters") == 1


def test_an_unavailable_store_loses_nothing_and_dead_letters_nothing(tmp_path):
    store = RefusingStore(tmp_path / "s.duckdb", unavailable_writes=3)
    with _client(store) as client:
        spans = recent_pair(seq=10) + recent_pair(seq=20)
        assert client.post("/api/v1/spans", content=body(spans), headers=HEADERS).status_code == 200
        status = _wait(client, 4)
        assert status["store"]["spans"] == 4 and status["store"]["dead_letters"] == 0
        assert status["linker"]["write_errors"] == 3 and status["store"]["incoming_batches"] == 0


def test_a_pass_whose_linking_fails_still_writes_its_spans_unlinked(tmp_path, monkeypatch):
    real, calls = streaming.link_spans, []

    def breaks_once(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in linking")
        return real(*args, **kw)

    monkeypatch.setattr(streaming, "link_spans", breaks_once)
    with _client(DuckDBStore(tmp_path / "s.duckdb")) as client:
        first = recent_pair(seq=10)
        assert client.post("/api/v1/spans", content=body(first), headers=HEADERS).status_code == 200
        _wait(client, 2)
        later = recent_pair(seq=50)
        assert client.post("/api/v1/spans", content=body(later), headers=HEADERS).status_code == 200
        status = _wait(client, 4)
        assert status["store"]["spans"] == 4 and status["linker"]["link_errors"] == 1
        assert client.get(f"/api/v1/spans/{first[1]['span_id']}").json()["link_method"] is None
        assert client.get(f"/api/v1/spans/{later[1]['span_id']}").json()["link_method"] == "seq-join"


def test_a_poison_batch_accepted_by_an_older_server_no_longer_blocks_after_a_restart(tmp_path):
    """The issue's reproduction: a batch with pid 2^63 sat in `incoming` and failed every pass,
    across restarts, taking other agents' spans with it."""
    db = tmp_path / "store.duckdb"
    poison = recent_pair(seq=10)
    poison[0]["pid"] = 2**63
    raw = body(poison, "old-agent")
    store = DuckDBStore(db)
    store.accept_batch("old-agent", "b-poison", raw, 2, time.time_ns())  # as an older server did
    store.close()
    srv = ServerProcess(db, args=("--hold", "0.5")).start()
    try:
        good = recent_pair(seq=90)
        assert srv.post(good, agent_id="agent-2").status_code == 200
        status = srv.wait_published(2)
        assert status["store"]["spans"] == 2 and status["store"]["incoming_batches"] == 0
        assert status["store"]["dead_letters"] == 1
        letters = srv.get("/api/v1/dead-letters").json()["dead_letters"]
        assert letters[0]["batch_id"] == "b-poison" and "pid: expected `int` <=" in letters[0]["reason"]
    finally:
        srv.stop()
    srv = ServerProcess(db, port=srv.port, args=("--hold", "0.5")).start()  # and after another restart
    try:
        assert srv.post(recent_pair(seq=190), agent_id="agent-3").status_code == 200
        assert srv.wait_published(4)["store"]["spans"] == 4
        assert srv.get("/api/v1/status").json()["store"]["dead_letters"] == 1
    finally:
        srv.stop()


# --- what a review found ---

def test_a_span_from_the_far_future_is_refused_naming_the_clock(live):
    spans = recent_pair(seq=3000)
    spans[1]["end_ns"] = time.time_ns() + 3600 * 10**9  # would be held, with its batch, for an hour
    r = live.post(spans)
    assert r.status_code == 400 and "after the server's clock" in r.json()["detail"]
    assert r.json()["detail"].startswith("span 1: end_ns")


def test_a_duplicate_span_id_is_a_dead_letter_and_links_nothing_wrong(tmp_path):
    with _client(DuckDBStore(tmp_path / "s.duckdb")) as client:
        first = recent_pair(seq=10)
        again = [dict(first[0])]  # the same id once more, in another batch
        assert client.post("/api/v1/spans", content=body(first + again), headers=HEADERS).status_code == 200
        status = _wait(client, 2)
        _wait(client, 1, key="dead_letters")
        status = client.get("/api/v1/status").json()
        assert status["store"]["spans"] == 2 and status["store"]["dead_letters"] == 1
        assert status["linker"]["link_errors"] == 0 and status["backlog_spans"] == 0
        assert "duplicate span_id" in client.get("/api/v1/dead-letters").json()["dead_letters"][0]["reason"]
        assert client.get(f"/api/v1/spans/{first[1]['span_id']}").json()["link_method"] == "seq-join"


def test_whole_batch_dead_letters_do_not_replace_each_other(tmp_path):
    from deeptrace.server.store.base import DeadLetter

    store = DuckDBStore(tmp_path / "s.duckdb")
    for batch in ("b1", "b2"):
        store.write_spans([], [], [DeadLetter("a", batch, "", time.time_ns(), "batch: bad", "{}")])
    assert store.dead_letters(10)[1] == 2
    store.close()


def test_an_unauthenticated_upload_is_refused_before_its_body_is_read(live):
    head = (b"POST /api/v1/spans HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 20000000\r\n\r\n")  # fmt: skip
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as s:
        s.sendall(head + b"{")  # 20 MB announced, one byte sent: a reader of the body would wait
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 401")


def test_a_full_disk_is_waited_out_not_dead_lettered(tmp_path):
    """A store on a 4 MiB tmpfs fills up: its writes fail with DuckDB's I/O error (and the
    ROLLBACK after a failed COMMIT with one of its own). Nothing may be dead-lettered, the
    linker must live on, and once there is room again everything is written."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)]).returncode != 0:
        pytest.fail("mounting a tmpfs failed: this test needs root (make test runs as root)", pytrace=False)
    try:
        store = DuckDBStore(disk / "s.duckdb")
        with _client(store) as client:
            spans = [d for i in range(300) for d in recent_pair(seq=10_000 + i * 10_000)]
            for d in spans:  # a few MB that neither gzip nor DuckDB can squeeze: more than the disk holds
                d["attributes"] = {"pad": base64.b64encode(os.urandom(3000)).decode()}
            codes = [client.post("/api/v1/spans", content=body(spans[i:i + 50]), headers=HEADERS).status_code
                     for i in range(0, len(spans), 50)]  # fmt: skip
            assert set(codes) <= {200, 500}, codes  # 500: the disk was full when the batch came
            deadline = time.monotonic() + 20
            while client.get("/api/v1/status").json()["linker"]["write_errors"] == 0 and time.monotonic() < deadline:
                time.sleep(0.2)
            status = client.get("/api/v1/status").json()
            assert status["linker"]["write_errors"] >= 1, "the disk never filled: nothing was tested"
            assert status["linker"]["dead_letters"] == 0
            accepted = status["ingest"]["spans"]
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # room again
            status = _wait(client, accepted, timeout_s=60)
            assert status["store"]["spans"] == accepted and status["store"]["dead_letters"] == 0
            assert status["backlog_spans"] == 0
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_a_store_file_with_the_columns_in_an_older_order_still_takes_and_gives_spans(tmp_path):
    """The columns come from deeptrace.schema.FIELDS; a file an older version made holds
    them in the order of then (peer_service and the link columns among the others), and
    spans are written by column name, so they land in the right columns all the same."""
    import duckdb

    from deeptrace.server.store.schema import SPAN_COLUMNS

    older = ["trace_id", "span_id", "parent_span_id", "kind", "name", "protocol", "service", "peer_service", "host",
             "pid", "tid", "resp_tid", "start_ns", "end_ns", "duration_ns", "status", "status_code", "laddr", "lport",
             "raddr", "rport", "conn_id", "req_size", "resp_size", "req_seq_start", "req_seq_end", "resp_seq_start",
             "resp_seq_end", "link_method", "link_confidence", "attributes", "req_head", "resp_head"]  # fmt: skip
    types = dict(SPAN_COLUMNS)
    assert sorted(older) == sorted(types) and older != list(types)
    db = tmp_path / "old.duckdb"
    with duckdb.connect(str(db)) as con:
        con.execute(f"CREATE TABLE spans ({', '.join(f'{c} {types[c]}' for c in older)})")
    spans = [schema.validate_span(d) for d in recent_pair(seq=7)]
    for d in spans:
        d.update(peer_service="b", link_method="seq-join", link_confidence=0.5)
    store = DuckDBStore(db)
    try:
        store.write_spans(spans, [])
        for d in spans:
            got = store.span(d["span_id"])
            assert got["peer_service"] == "b" and got["link_method"] == "seq-join" and got["link_confidence"] == 0.5
            assert (got["host"], got["pid"], got["req_seq"], got["attributes"]) == (
                d["host"], d["pid"], d["req_seq"], d.get("attributes") or {})  # fmt: skip
    finally:
        store.close()
