"""PostgreSQL on hand-built messages, and live: psql and pgbench against a real server."""

from __future__ import annotations

import struct
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from parsing import chunk, feed_alternating

from deeptrace.capture.pipeline import SpanPipeline
from deeptrace.protocols import detect
from deeptrace.protocols.framing import HEAD_BYTES
from deeptrace.protocols.postgres import PostgresConnection


def msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


STARTUP = struct.pack("!ii", 8 + 22, 196608) + b"user\0alice\0database\0x\0\0"[:22]
READY = msg(b"Z", b"I")
AUTH_OK = msg(b"R", struct.pack("!i", 0)) + msg(b"S", b"server_version\x0015\0") + READY
ROWS = msg(b"T", b"\0\x01id\0" + bytes(18)) + msg(b"D", b"\0\x01\0\0\0\x011") * 3 + msg(b"C", b"SELECT 3\0") + READY
ERROR = msg(b"E", b"SERROR\0C42P01\0Mrelation \"nope\" does not exist\0\0") + READY


def connected() -> PostgresConnection:
    conn = PostgresConnection()
    assert conn.feed(True, chunk(STARTUP)) == [] and conn.feed(False, chunk(AUTH_OK)) == []
    return conn


def test_simple_query_and_rows():
    conn = connected()
    (req,) = conn.feed(True, chunk(msg(b"Q", b"select id from orders where id = 1\0"), t=5))
    (resp,) = conn.feed(False, chunk(ROWS, t=6))
    assert req.name == "SELECT orders" and req.attributes["db.query.text"].startswith("select id")
    assert (resp.error, resp.attributes["db.response.tag"], resp.attributes["db.response.returned_rows"]) == (
        False, "SELECT 3", 3)  # fmt: skip
    assert resp.size == len(ROWS)


def test_extended_query_names_from_the_prepared_statement():
    conn = connected()
    parse = msg(b"P", b"s1\0UPDATE accounts SET b = $1\0\0\0")
    batch = parse + msg(b"B", b"\0s1\0" + bytes(6)) + msg(b"E", b"\0" + bytes(4)) + msg(b"S", b"")
    (req,) = conn.feed(True, chunk(batch))
    assert req.name == "UPDATE accounts" and req.size == len(batch)
    # Later executions only Bind the statement by name.
    (again,) = conn.feed(True, chunk(msg(b"B", b"\0s1\0" + bytes(6)) + msg(b"E", b"\0" + bytes(4)) + msg(b"S", b"")))
    assert again.name == "UPDATE accounts"
    resp = conn.feed(False, chunk(msg(b"1", b"") + msg(b"2", b"") + msg(b"C", b"UPDATE 1\0") + READY +
                                  msg(b"2", b"") + msg(b"C", b"UPDATE 1\0") + READY))  # fmt: skip
    assert [r.attributes["db.response.tag"] for r in resp] == ["UPDATE 1", "UPDATE 1"]


def test_heads_hold_the_bind_and_the_first_rows_not_the_parse_alone():
    """A request's head is what association reads its fields from: the parameters are in
    the Bind and the values in the rows, not in the Parse that comes first."""
    conn = connected()
    bind = msg(b"B", b"\0\0" + struct.pack("!hhhih", 1, 1, 1, 2, 4242))
    batch = msg(b"P", b"\0SELECT name FROM users WHERE id = $1\0\0\0") + bind + msg(b"E", bytes(5)) + msg(b"S", b"")
    (req,) = conn.feed(True, chunk(batch))
    reply = msg(b"1", b"") + msg(b"2", b"") + msg(b"D", b"\0\x01\0\0\0\x08user4242") + msg(b"C", b"SELECT 1\0") + READY
    (resp,) = conn.feed(False, chunk(reply))
    assert bind in req.head and b"user4242" in resp.head
    assert len(req.head) <= HEAD_BYTES


def test_joined_mid_connection_the_first_exchange_is_whole():
    """An agent started after the session opened sees no startup: the first query's reply
    (a row count, or an error) once went to the startup's account and the query became an
    error span "agent stopped" with no response."""
    conn = PostgresConnection()
    (req,) = conn.feed(True, chunk(msg(b"Q", b"delete from test;\0"), t=5))
    (resp,) = conn.feed(False, chunk(msg(b"C", b"DELETE 0\0") + READY, t=6))
    assert (req.name, resp.error, resp.attributes["db.response.tag"]) == ("DELETE test", False, "DELETE 0")
    (req,) = conn.feed(True, chunk(msg(b"Q", b"selec 1;\0"), t=7))
    (resp,) = conn.feed(False, chunk(msg(b"E", b"SERROR\0C42601\0Msyntax error\0\0") + READY, t=8))
    assert (resp.error, resp.status_code) == (True, "42601")


def test_error_whose_ready_for_query_never_came_is_paired_at_close():
    """A capture (or an agent) that stopped after the ErrorResponse and before ReadyForQuery:
    the query was an error span "agent stopped" with no response."""
    conn = PostgresConnection()
    (req,) = conn.feed(True, chunk(msg(b"Q", b"asdsdfdsf;\0"), t=1))
    assert req.name == "ASDSDFDSF"
    error = msg(b"E", b"SERROR\0VERROR\0C42601\0Msyntax error at or near \"asdsdfdsf\"\0P1\0\0")
    assert conn.feed(False, chunk(error, t=2)) == []
    (resp,) = conn.close(end_ns=9)
    assert (resp.error, resp.status_code, resp.partial, resp.size) == (True, "42601", True, len(error))
    assert conn.close(end_ns=10) == []


def test_last_reply_of_a_long_session_in_the_pipeline():
    """Through the pipeline: the last reply (rows, no ReadyForQuery yet) when the agent stops."""
    from test_pipeline import Conn

    c = Conn()
    pipeline = SpanPipeline()
    spans = pipeline.push([c.rec("ingress", msg(b"Q", b"select 1\0")), c.rec("egress", ROWS)])
    spans += pipeline.push([c.rec("ingress", msg(b"Q", b"select id from orders\0")), c.rec("egress", ROWS[:-6])])
    spans += pipeline.close_all(0)
    assert [(s.name, s.status, s.attributes["db.response.returned_rows"]) for s in spans] == [
        ("SELECT", "ok", 3), ("SELECT orders", "ok", 3)]  # fmt: skip


def test_bind_of_a_statement_prepared_before_we_joined_is_named_by_the_statement():
    conn = PostgresConnection()
    batch = msg(b"B", b"\0S_18\0\0\x01\0\0\0\0\x0eIOE-BD-2025325\0\0") + msg(b"E", bytes(5)) + msg(b"S", b"")
    (req,) = conn.feed(True, chunk(batch))
    (resp,) = conn.feed(False, chunk(msg(b"2", b"") + ROWS[ROWS.index(b"D"):], t=2))
    assert (req.name, req.attributes["db.postgresql.statement"]) == ("EXECUTE S_18", "S_18")
    assert b"IOE-BD-2025325" in req.head and resp.attributes["db.response.returned_rows"] == 3


def test_error_response_gives_sqlstate():
    conn = connected()
    conn.feed(True, chunk(msg(b"Q", b"select * from nope\0")))
    (resp,) = conn.feed(False, chunk(ERROR))
    assert (resp.error, resp.status_code) == (True, "42P01")


@pytest.mark.parametrize("cut", range(1, len(ROWS), 7))
def test_response_split_anywhere(cut):
    conn = connected()
    conn.feed(True, chunk(msg(b"Q", b"select 1\0")))
    out = conn.feed(False, chunk(ROWS[:cut], t=2)) + conn.feed(False, chunk(ROWS[cut:], t=3))
    assert [m.size for m in out] == [len(ROWS)]


def test_large_result_skipped_through_a_hole():
    conn = connected()
    conn.feed(True, chunk(msg(b"Q", b"select big\0")))
    big = msg(b"D", b"x" * 20000) + msg(b"C", b"SELECT 1\0") + READY
    assert conn.feed(False, chunk(big[:1024], size=20005)) == []
    (resp,) = conn.feed(False, chunk(big[20005:], t=4))
    assert not resp.partial and resp.size == len(big)  # every byte counted


def big_insert_batch(value_bytes: int) -> bytes:
    """psycopg's extended query: Parse, Bind (the parameters), Describe, Execute, Sync in one write."""
    value = b"x" * value_bytes
    parse = msg(b"P", b"\0INSERT INTO notes (body) VALUES ($1)\0\0\0")
    bind = msg(b"B", b"\0\0\0\0\0\x01" + struct.pack("!i", len(value)) + value + b"\0\0")
    return parse + bind + msg(b"D", b"P\0") + msg(b"E", b"\0" + bytes(4)) + msg(b"S", b"")


INSERTED = msg(b"1", b"") + msg(b"2", b"") + msg(b"n", b"") + msg(b"C", b"INSERT 0 1\0") + READY


@pytest.mark.parametrize("captured", [1024, 200, 60])
def test_bind_larger_than_the_capture_still_makes_its_request(captured):
    """The capture ends inside the Bind: Execute and Sync were never seen. The reply ends the batch."""
    conn = connected()
    batch = big_insert_batch(20_000)
    assert conn.feed(True, chunk(batch[:captured], size=len(batch))) == []
    req, resp = conn.feed(False, chunk(INSERTED, t=3))
    assert (req.is_request, req.name, req.partial) == (True, "INSERT notes", True)
    # Parse and Bind by their lengths; Describe, Execute and Sync were in the uncaptured bytes.
    assert len(batch) - 30 < req.size <= len(batch)
    assert req.attributes["db.postgresql.protocol"] == "extended"
    assert resp.attributes["db.response.tag"] == "INSERT 0 1"
    # In step again: the next exchange is whole.
    (nxt,) = conn.feed(True, chunk(msg(b"Q", b"select 1\0"), t=4))
    (done,) = conn.feed(False, chunk(msg(b"C", b"SELECT 1\0") + READY, t=5))
    assert nxt.name == "SELECT" and done.attributes["db.response.tag"] == "SELECT 1"


def test_reply_longer_than_the_capture_is_ended_by_the_next_request():
    conn = connected()
    conn.feed(True, chunk(msg(b"Q", b"select body from notes\0"), t=1))
    row = msg(b"D", b"\0\x01" + struct.pack("!i", 20_000) + b"x" * 20_000)
    reply = msg(b"T", b"\0\x01body\0" + bytes(18)) + row + msg(b"C", b"SELECT 1\0") + READY
    assert conn.feed(False, chunk(reply[:1024], size=len(reply), t=2)) == []  # CommandComplete, Ready: not seen
    first, nxt = conn.feed(True, chunk(msg(b"Q", b"select 1\0"), t=4))
    assert (first.is_request, first.partial, first.attributes["db.response.returned_rows"]) == (False, True, 1)
    assert nxt.is_request and nxt.name == "SELECT"
    (done,) = conn.feed(False, chunk(msg(b"C", b"SELECT 1\0") + READY, t=5))
    assert done.attributes["db.response.tag"] == "SELECT 1"


def test_pipelined_requests_do_not_cut_a_reply_short():
    """In step, a request sent while a reply is still coming is pipelining, not a lost end."""
    conn = connected()
    conn.feed(True, chunk(msg(b"Q", b"select 1\0"), t=1))
    assert conn.feed(False, chunk(ROWS[:40], t=2)) == []
    (second,) = conn.feed(True, chunk(msg(b"Q", b"select 2\0"), t=3))
    assert second.is_request
    out = conn.feed(False, chunk(ROWS[40:] + msg(b"C", b"SELECT 1\0") + READY, t=4))
    assert [m.attributes["db.response.returned_rows"] for m in out] == [3, 0]


def test_ssl_request_then_tls_is_left_alone():
    conn = PostgresConnection()
    conn.feed(True, chunk(struct.pack("!ii", 8, 80877103)))
    conn.feed(False, chunk(b"S"))
    assert conn.tls and conn.feed(True, chunk(b"\x16\x03\x01 tls bytes")) == []


def test_detection():
    assert detect(STARTUP, None)[0:3:2] == ("postgresql", True)
    assert detect(msg(b"Q", b"SELECT 1\0"), True)[0] == "postgresql"


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_arbitrary_bytes_never_raise(parts):
    for conn in (PostgresConnection(), connected()):
        feed_alternating(conn, parts)


def test_live_insert_larger_than_the_capture(collector, store):
    """psycopg sends a 20 kB parameter; the agent captures 1,024 bytes of each write."""
    psycopg = pytest.importorskip("psycopg", reason="the live INSERT test needs psycopg (pip install -e '.[test]')")
    from servers import postgres

    with postgres() as (pid, port):
        collector.trace(pid)
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True) as db:
            db.execute("CREATE TABLE notes (body text)")
            for _ in range(3):
                db.execute("INSERT INTO notes (body) VALUES (%s)", ["x" * 20_000])
            assert len(db.execute("SELECT body FROM notes").fetchall()) == 3  # 60 kB of rows
            assert db.execute("SELECT count(*) FROM notes").fetchone() == (3,)
        store.wait_for(pid, lambda rs: False, timeout_s=0.5)
        recs = [r for rs in store.by_tgid.values() for r in rs if r.lport == port]
    assert any(r.size > len(r.payload) for r in recs)  # writes really were cut by the capture
    spans = SpanPipeline().push(recs)
    inserts = [s for s in spans if s.name == "INSERT notes"]
    assert len(inserts) == 3
    assert all(s.status == "ok" and s.attributes["db.response.tag"] == "INSERT 0 1" for s in inserts)
    assert all(s.req_size > 20_000 for s in inserts)
    # The long rows' reply lost its end (ReadyForQuery) to the capture; the next query ends it.
    rows, count = [s for s in spans if s.name == "SELECT notes"]
    assert rows.status == "ok" and rows.resp_size > 20_000  # what could be framed before the cut
    assert count.status == "ok" and count.attributes["db.response.tag"] == "SELECT 1"


def test_live_psql_and_pgbench_and_their_capture(collector, store, tmp_path):
    from servers import need, postgres, replayed_spans, span_key, tshark_capture

    with postgres() as (pid, port):
        base = ["-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
        subprocess.run([need("pgbench"), *base, "-i", "-s", "1", "-q", "postgres"], check=True, capture_output=True)
        collector.trace(pid)  # backends forked from here on are traced from their first instruction
        with tshark_capture(tmp_path / "pg.pcapng", [port]) as cap:
            subprocess.run([need("pgbench"), *base, "-M", "prepared", "-S", "-c", "2", "-t", "50", "-n", "postgres"],
                           check=True, capture_output=True)  # fmt: skip
            bad = subprocess.run([need("psql"), *base, "-X", "-c", "select * from missing_table", "postgres"],
                                 check=False, capture_output=True, text=True)  # fmt: skip
            assert "does not exist" in bad.stderr
        # The backends have exited by now: take every process's records on the server's port.
        store.wait_for(pid, lambda rs: False, timeout_s=0.5)
        recs = [r for rs in store.by_tgid.values() for r in rs if r.lport == port]
    assert any(b"42P01" in r.payload for r in recs)
    spans = SpanPipeline().push(recs)
    assert sorted(map(span_key, replayed_spans(cap))) == sorted(map(span_key, spans))
    names = [s.name for s in spans]
    assert names.count("SELECT pgbench_accounts") == 100  # 2 clients x 50 transactions of one SELECT
    assert names.count("PREPARE SELECT pgbench_accounts") == 2
    (err,) = [s for s in spans if s.name == "SELECT missing_table"]
    assert (err.status, err.status_code, err.kind) == ("error", "42P01", "SERVER")
    assert all(s.status == "ok" and s.kind == "SERVER" for s in spans if "pgbench_accounts" in s.name)


def test_a_statement_prepared_alone_is_connection_set_up():
    """psycopg prepares a statement it runs often (Parse, Describe, Sync) right before the Bind
    that executes it: the PREPARE serves the request the execution serves."""
    from deeptrace.protocols.base import CONNECTION_SETUP

    conn = connected()
    (prep,) = conn.feed(True, chunk(msg(b"P", b"s1\0SELECT 1\0\0\0") + msg(b"D", b"Ss1\0") + msg(b"S", b"")))
    (run,) = conn.feed(True, chunk(msg(b"B", b"\0s1\0" + bytes(6)) + msg(b"E", b"\0" + bytes(4)) + msg(b"S", b"")))
    assert prep.name == "PREPARE SELECT" and prep.attributes[CONNECTION_SETUP]
    assert CONNECTION_SETUP not in run.attributes
