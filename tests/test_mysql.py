"""MySQL/MariaDB protocol on hand-built packets, and live: the mariadb client and a
Python driver with server-side prepared statements against a real MariaDB."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from parsing import chunk, feed_alternating

from deeptrace.capture.pipeline import SpanPipeline
from deeptrace.protocols import detect
from deeptrace.protocols.base import CONNECTION_SETUP
from deeptrace.protocols.mysql import CLIENT_DEPRECATE_EOF, MysqlConnection


def pkt(seq: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "little") + bytes([seq]) + payload


def greeting(caps: int) -> bytes:
    return pkt(0, b"\x0a" + b"10.11.6-MariaDB\0" + bytes(4) + bytes(8) + b"\0" + (caps & 0xFFFF).to_bytes(2, "little")
               + b"\x21" + bytes(2) + (caps >> 16).to_bytes(2, "little") + bytes(11))  # fmt: skip


OK = b"\x00\x01\x00\x02\x00\x00\x00"
EOF_PKT = b"\xfe\x00\x00\x02\x00"
ERR = b"\xff\x7a\x04#42S02Table 'shop.nope' doesn't exist"


def connected(deprecate_eof: bool) -> MysqlConnection:
    caps = 0x0200 | (CLIENT_DEPRECATE_EOF if deprecate_eof else 0)
    conn = MysqlConnection()
    conn.feed(False, chunk(greeting(caps | CLIENT_DEPRECATE_EOF)))
    conn.feed(True, chunk(pkt(1, caps.to_bytes(4, "little") + bytes(28) + b"root\0")))
    conn.feed(False, chunk(pkt(2, OK)))
    return conn


def result_set(deprecate_eof: bool, rows: int) -> bytes:
    out = pkt(1, b"\x02") + pkt(2, b"\x03def" + bytes(20)) + pkt(3, b"\x03def" + bytes(20))
    seq = 4
    if not deprecate_eof:
        out += pkt(seq, EOF_PKT)
        seq += 1
    for i in range(rows):
        out += pkt(seq, b"\x011\x05alice")
        seq += 1
    return out + pkt(seq, EOF_PKT if not deprecate_eof else b"\xfe\x00\x00\x02\x00\x00\x00")


@pytest.mark.parametrize("deprecate_eof", [False, True])
def test_query_and_result_set(deprecate_eof):
    conn = connected(deprecate_eof)
    (req,) = conn.feed(True, chunk(pkt(0, b"\x03SELECT id, name FROM users WHERE id > 0"), t=5))
    rs = result_set(deprecate_eof, 3)
    (resp,) = conn.feed(False, chunk(rs, t=6))
    assert req.name == "SELECT users" and req.attributes["db.query.text"].startswith("SELECT id")
    assert (resp.error, resp.attributes["db.response.returned_rows"], resp.size) == (False, 3, len(rs))


@pytest.mark.parametrize("cut", range(1, 120, 5))
def test_result_set_split_anywhere(cut):
    conn = connected(False)
    conn.feed(True, chunk(pkt(0, b"\x03SELECT 1")))
    rs = result_set(False, 2)
    msgs = conn.feed(False, chunk(rs[:cut], t=2)) + conn.feed(False, chunk(rs[cut:], t=3))
    assert [m.size for m in msgs] == [len(rs)]


def test_error_and_ok():
    conn = connected(True)
    conn.feed(True, chunk(pkt(0, b"\x03select * from nope")))
    (err,) = conn.feed(False, chunk(pkt(1, ERR)))
    assert (err.error, err.status_code, err.attributes["db.mysql.sqlstate"]) == (True, "1146", "42S02")
    conn.feed(True, chunk(pkt(0, b"\x03INSERT INTO users VALUES (1)")))
    (ok,) = conn.feed(False, chunk(pkt(1, OK)))
    assert ok.attributes["db.response.affected_rows"] == 1 and not ok.error


@pytest.mark.parametrize("deprecate_eof", [False, True])
def test_prepared_statement_execute_named_after_its_text(deprecate_eof):
    conn = connected(deprecate_eof)
    (prep,) = conn.feed(True, chunk(pkt(0, b"\x16SELECT name FROM users WHERE id = ?")))
    reply = pkt(1, b"\x00" + (7).to_bytes(4, "little") + (1).to_bytes(2, "little") + (1).to_bytes(2, "little") + bytes(3))
    reply += pkt(2, b"\x03def" + bytes(20))  # the parameter
    seq = 3
    if not deprecate_eof:
        reply += pkt(seq, EOF_PKT)
        seq += 1
    reply += pkt(seq, b"\x03def" + bytes(20))  # the column
    if not deprecate_eof:
        reply += pkt(seq + 1, EOF_PKT)
    (prep_ok,) = conn.feed(False, chunk(reply))
    assert prep.name == "PREPARE SELECT users" and not prep_ok.error
    assert prep.attributes[CONNECTION_SETUP]  # it serves the execution that follows on its connection
    (ex,) = conn.feed(True, chunk(pkt(0, b"\x17" + (7).to_bytes(4, "little") + bytes(5))))
    assert ex.name == "SELECT users" and ex.attributes["db.mysql.statement_id"] == 7
    (rows,) = conn.feed(False, chunk(result_set(deprecate_eof, 1)))
    assert rows.attributes["db.response.returned_rows"] == 1


def test_close_is_one_way_and_detection():
    (close,) = connected(True).feed(True, chunk(pkt(0, b"\x19" + (7).to_bytes(4, "little"))))
    assert not close.expects_response
    assert detect(pkt(0, b"\x03SELECT 1"), True)[0] == "mysql"
    assert detect(greeting(0), None)[0:3:2] == ("mysql", False)


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_arbitrary_bytes_never_raise(parts):
    for conn in (MysqlConnection(), connected(False)):
        feed_alternating(conn, parts)


DRIVER = textwrap.dedent("""
    import sys
    import mysql.connector
    sys.stdin.readline()
    db = mysql.connector.connect(host="127.0.0.1", port=int(sys.argv[1]), user="root", database="shop",
                                 use_pure=True)
    cur = db.cursor(prepared=True)
    for uid in (1, 2, 3):
        cur.execute("SELECT name FROM users WHERE id = %s", (uid,))
        cur.fetchall()
    cur.close()
    db.close()
    print("done", flush=True)
""")


def test_live_mariadb_client_and_prepared_statements_and_their_capture(collector, store, tmp_path):
    from servers import mariadb, need, replayed_spans, span_key, tshark_capture

    with mariadb() as (pid, port):
        cli = [need("mariadb"), "-h", "127.0.0.1", "-P", str(port), "-u", "root"]
        setup = ("CREATE DATABASE shop; CREATE TABLE shop.users (id INT PRIMARY KEY, name TEXT);"
                 "INSERT INTO shop.users VALUES (1, 'alice'), (2, 'bob'), (3, 'carol')")  # fmt: skip
        subprocess.run([*cli, "-e", setup], check=True)
        collector.trace(pid)
        with tshark_capture(tmp_path / "mysql.pcapng", [port]) as cap:
            out = subprocess.run([*cli, "shop", "-e", "SELECT * FROM users"], check=True, capture_output=True,
                                 text=True)  # fmt: skip
            assert "carol" in out.stdout
            bad = subprocess.run([*cli, "shop", "-e", "SELECT * FROM nope"], check=False, capture_output=True,
                                 text=True)  # fmt: skip
            assert "doesn't exist" in bad.stderr
            driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(port)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)  # fmt: skip
            assert driver.communicate("go\n", timeout=60)[0].strip() == "done"
        # Three client connections, all closed: everything the server did is in.
        store.wait_for(pid, lambda rs: sum(r.syscall == "close" and r.l4 == "tcp" for r in rs) >= 3)
        recs = store.settle(pid, quiet_s=0.5)
    spans = [s for s in SpanPipeline().push(recs) if s.protocol == "mysql"]
    assert sorted(map(span_key, replayed_spans(cap))) == sorted(map(span_key, spans))
    names = [s.name for s in spans]
    select = [s for s in spans if s.name == "SELECT users" and s.attributes.get("db.response.returned_rows") == 3]
    assert select, names
    (err,) = [s for s in spans if s.name == "SELECT nope"]
    assert (err.status, err.status_code, err.attributes["db.mysql.sqlstate"]) == ("error", "1146", "42S02")
    assert names.count("PREPARE SELECT users") >= 1
    executed = [s for s in spans if s.attributes.get("db.operation.name") == "STMT_EXECUTE"]
    assert [s.name for s in executed] == ["SELECT users"] * 3
    assert all(s.attributes["db.response.returned_rows"] == 1 and s.status == "ok" for s in executed)


def test_row_longer_than_the_capture_is_ended_by_the_next_command():
    conn = connected(True)
    conn.feed(True, chunk(pkt(0, b"\x03SELECT body FROM notes"), t=1))
    row = pkt(3, b"\xfc" + (20_000).to_bytes(2, "little") + b"y" * 20_000)
    reply = pkt(1, b"\x01") + pkt(2, b"\x03def" + bytes(20)) + row + pkt(4, b"\xfe\x00\x00\x02\x00\x00\x00")
    assert conn.feed(False, chunk(reply[:1024], size=len(reply), t=2)) == []  # the terminator was not captured
    ended, nxt = conn.feed(True, chunk(pkt(0, b"\x03SELECT 1"), t=3))
    assert (ended.is_request, ended.partial, nxt.is_request, nxt.name) == (False, True, True, "SELECT")
    (ok,) = conn.feed(False, chunk(pkt(1, OK), t=4))
    assert ok.attributes["db.response.affected_rows"] == 1


def test_live_statements_longer_than_the_capture(collector, store):
    """A 20 kB INSERT and a 20 kB row; the agent captures 1,024 bytes of each read and write."""
    from servers import mariadb, need

    with mariadb() as (pid, port):
        cli = [need("mariadb"), "-h", "127.0.0.1", "-P", str(port), "-u", "root"]
        subprocess.run([*cli, "-e", "CREATE DATABASE shop; CREATE TABLE shop.notes (body MEDIUMTEXT)"], check=True)
        collector.trace(pid)
        script = f"INSERT INTO notes VALUES ('{'x' * 20_000}');\nSELECT body FROM notes;\nSELECT 1;\n"
        out = subprocess.run([*cli, "shop"], input=script, check=True, capture_output=True, text=True)
        assert "x" * 20_000 in out.stdout
        store.wait_for(pid, lambda rs: any(r.syscall == "close" and r.l4 == "tcp" for r in rs))
        recs = store.settle(pid, quiet_s=0.5)
    assert any(r.size > len(r.payload) for r in recs)  # really cut by the capture
    spans = [s for s in SpanPipeline().push(recs) if s.protocol == "mysql"]
    by_name = {s.name: s for s in spans}
    assert by_name["INSERT notes"].status == "ok" and by_name["INSERT notes"].req_size > 20_000
    assert by_name["SELECT notes"].status == "ok" and by_name["SELECT notes"].resp_size > 20_000
    assert by_name["SELECT"].status == "ok"


# ---- joined mid-connection: no handshake seen ----

QA = b"\x00\x01"  # query attributes (CLIENT_QUERY_ATTRIBUTES) with none set, as MySQL 8 clients send


def rows_reply(deprecate_eof: bool, rows: int, first_seq: int = 1, columns: int = 1, status: int = 2) -> bytes:
    """A text result set: column count, definitions, [EOF], rows, terminator."""
    out, seq = pkt(first_seq, bytes([columns])), first_seq + 1
    for _ in range(columns):
        out, seq = out + pkt(seq, b"\x03def" + bytes(20)), seq + 1
    if not deprecate_eof:
        out, seq = out + pkt(seq, EOF_PKT), seq + 1
    for i in range(rows):
        out, seq = out + pkt(seq & 0xFF, b"\x05row-" + str(i).encode()), seq + 1
    end = (b"\xfe\x00\x00" + status.to_bytes(2, "little") + b"\x00\x00") if deprecate_eof else (
        b"\xfe\x00\x00" + status.to_bytes(2, "little"))  # fmt: skip
    return out + pkt(seq & 0xFF, end)


@pytest.mark.parametrize("deprecate_eof", [False, True])
@pytest.mark.parametrize("prefix", [b"", QA])
def test_mid_connection_statements_are_named_and_paired(deprecate_eof, prefix):
    """No handshake: whether definitions end with an EOF, and whether query attributes come
    first, are read from the bytes; every statement is named, none is dropped."""
    conn = MysqlConnection()
    statements = [(b"select * from test_table", "SELECT test_table", 3), (b"select @@version_comment limit 1", "SELECT", 1),
                  (b"SELECT DATABASE()", "SELECT", 1), (b"show tables", "SHOW TABLES", 2),
                  (b"select * from empty_table", "SELECT empty_table", 0)]  # fmt: skip
    for i, (text, name, rows) in enumerate(statements):
        (req,) = conn.feed(True, chunk(pkt(0, b"\x03" + prefix + text), t=10 * i))
        reply = rows_reply(deprecate_eof, rows)
        (resp,) = conn.feed(False, chunk(reply, t=10 * i + 1))
        assert (req.name, req.attributes["db.query.text"]) == (name, text.decode())
        assert (resp.size, resp.attributes["db.response.returned_rows"], resp.error) == (len(reply), rows, False)
    for text, name in ((b"create table `test_table_2`( `id` int unsigned auto_increment, primary key(`id`))",
                        "CREATE test_table_2"), (b"use test", "USE test"), (b"DROP TABLE IF EXISTS t9", "DROP t9")):
        (req,) = conn.feed(True, chunk(pkt(0, b"\x03" + prefix + text), t=100))
        (ok,) = conn.feed(False, chunk(pkt(1, OK), t=101))
        assert req.name == name and ok.attributes["db.response.affected_rows"] == 1


def test_query_attributes_with_values_before_the_text():
    """A query attribute set by the client (a name and a typed value) precedes the SQL."""
    attrs = b"\x01\x01" + b"\x00" + b"\x01" + b"\xfe\x00" + b"\x04trid" + b"\x05abcde"  # 1 attr: string "abcde"
    conn = connected(True)
    conn._query_attributes = True  # as the handshake would have said
    (req,) = conn.feed(True, chunk(pkt(0, b"\x03" + attrs + b"SELECT id FROM orders")))
    assert req.name == "SELECT orders" and req.attributes["db.query.text"] == "SELECT id FROM orders"


def test_mid_connection_init_db_ping_statistics_field_list():
    conn = MysqlConnection()
    (use,) = conn.feed(True, chunk(pkt(0, b"\x02shop"), t=1))
    (ok,) = conn.feed(False, chunk(pkt(1, OK), t=2))
    assert (use.name, use.attributes["db.namespace"], ok.error) == ("USE shop", "shop", False)
    (ping,) = conn.feed(True, chunk(pkt(0, b"\x0e"), t=3))
    (pong,) = conn.feed(False, chunk(pkt(1, OK), t=4))
    assert ping.name == "mysql PING" and not pong.error
    (stats,) = conn.feed(True, chunk(pkt(0, b"\x09"), t=5))
    (text,) = conn.feed(False, chunk(pkt(1, b"Uptime: 35  Threads: 1  Questions: 9"), t=6))
    assert stats.name == "mysql STATISTICS" and text.size == 4 + 36
    field_list = pkt(1, b"\x03def\x04shop\x05users" + bytes(30)) + pkt(2, b"\x03def\x04shop\x05users" + bytes(30))
    conn.feed(True, chunk(pkt(0, b"\x04users\0"), t=7))
    (fields,) = conn.feed(False, chunk(field_list + pkt(3, EOF_PKT), t=8))
    assert fields.size == len(field_list) + 9
    conn.feed(True, chunk(pkt(0, b"\x03SELECT 1"), t=9))  # still in step
    assert [m.attributes["db.response.returned_rows"] for m in conn.feed(False, chunk(rows_reply(True, 1), t=10))] == [1]


def test_multiple_result_sets_are_one_response():
    """CALL of a procedure: result sets flagged SERVER_MORE_RESULTS_EXISTS, then the final OK."""
    conn = connected(False)
    conn.feed(True, chunk(pkt(0, b"\x03CALL report()")))
    first = rows_reply(False, 2, status=0x0A)
    second = rows_reply(False, 1, first_seq=first.count(b"def") + 5, status=0x0A)
    reply = first + second + pkt(20, b"\x00\x00\x00\x02\x00\x00\x00")
    (resp,) = conn.feed(False, chunk(reply))
    assert resp.size == len(reply) and resp.attributes["db.response.returned_rows"] == 3


def prepare_ok(stmt: int, params: int, columns: int, deprecate_eof: bool) -> bytes:
    out = pkt(1, b"\x00" + stmt.to_bytes(4, "little") + columns.to_bytes(2, "little") + params.to_bytes(2, "little")
              + bytes(3))  # fmt: skip
    seq = 2
    for block in (params, columns):
        for _ in range(block):
            out, seq = out + pkt(seq, b"\x03def" + bytes(20)), seq + 1
        if block and not deprecate_eof:
            out, seq = out + pkt(seq, EOF_PKT), seq + 1
    return out


@pytest.mark.parametrize("deprecate_eof", [False, True])
@pytest.mark.parametrize("params,columns", [(1, 2), (0, 2), (2, 0), (0, 0)])
def test_mid_connection_prepare_then_execute(deprecate_eof, params, columns):
    conn = MysqlConnection()
    (prep,) = conn.feed(True, chunk(pkt(0, b"\x16SELECT a, b FROM t WHERE id = ?"), t=1))
    reply = prepare_ok(9, params, columns, deprecate_eof)
    out = conn.feed(False, chunk(reply, t=2))
    # One block of definitions and no handshake seen: nothing says whether an EOF follows the
    # last one, so the reply ends there and an EOF after it is skipped (not a reply of its own).
    eof_unseen = 9 if not deprecate_eof and (params == 0) != (columns == 0) else 0
    assert prep.name == "PREPARE SELECT t" and [m.size for m in out] == [len(reply) - eof_unseen]
    (ex,) = conn.feed(True, chunk(pkt(0, b"\x17" + (9).to_bytes(4, "little") + bytes(5)), t=3))
    assert ex.name == "SELECT t" and ex.attributes["db.query.text"].startswith("SELECT a")
    rows = rows_reply(deprecate_eof, 2)
    assert [m.size for m in conn.feed(False, chunk(rows, t=4))] == [len(rows)]
    (close,) = conn.feed(True, chunk(pkt(0, b"\x19" + (9).to_bytes(4, "little")), t=5))
    assert not close.expects_response


def test_execute_of_a_statement_prepared_before_we_joined_names_it_by_id_and_keeps_its_parameters():
    conn = MysqlConnection()
    # COM_STMT_EXECUTE as mysql-connector sends it: statement 3, one LONGLONG parameter 4242.
    execute = pkt(0, b"\x17" + (3).to_bytes(4, "little") + b"\x00" + (1).to_bytes(4, "little") + b"\x00\x01\x08\x00"
                  + (4242).to_bytes(8, "little"))  # fmt: skip
    (ex,) = conn.feed(True, chunk(execute))
    assert (ex.name, ex.attributes["db.mysql.statement_id"]) == ("EXECUTE stmt 3", 3)
    assert (4242).to_bytes(8, "little") in ex.head and ex.head == execute
    binary_rows = pkt(1, b"\x01") + pkt(2, b"\x03def" + bytes(20)) + pkt(3, b"\x00\x00\x05alice")
    (resp,) = conn.feed(False, chunk(binary_rows + pkt(4, b"\xfe\x00\x00\x02\x00\x00\x00")))
    assert resp.attributes["db.response.returned_rows"] == 1 and b"alice" in resp.head


def test_reply_cut_by_the_end_of_the_capture_is_a_partial_response():
    conn = MysqlConnection()
    conn.feed(True, chunk(pkt(0, b"\x03SELECT * FROM big")))
    assert conn.feed(False, chunk(rows_reply(True, 5)[:60], t=2)) == []
    (resp,) = conn.close(end_ns=9)
    assert resp.partial and not resp.is_request and conn.close(10) == []


def test_detection_of_mid_connection_commands_only():
    assert detect(pkt(0, b"\x03" + QA + b"select 1"), True)[0] == "mysql"
    assert detect(pkt(0, b"\x16INSERT INTO t VALUES (?)" + b" " * 1100), True)[0] == "mysql"  # a long prepare
    assert detect(pkt(0, b"\x02test"), True)[0] == "mysql"
    assert detect(pkt(0, b"\x17" + bytes(9)), True)[0] == "mysql"
    # A packet that does not fit its command's shape, or a first chunk shorter than its length, is not claimed.
    assert detect(pkt(0, b"\x0e\x00\x00"), True) is None
    assert detect(pkt(0, b"\x03SELECT 1")[:8], True) is None


# ---- the compressed protocol (CLIENT_COMPRESS) ----

# mysql-connector-python 9 with compress=True against MariaDB 11, recorded at the socket:
# `SELECT * FROM users` (2 rows) and its zlib-compressed reply; a prepared statement, its
# reset, its execution with id = 2, and `SELECT REPEAT('x', 100000)` whose 100 kB row spans
# two compressed packets.
Z_QUERY = bytes.fromhex("18000000000000140000000353454c454354202a2046524f4d207573657273")
Z_ROWS = bytes.fromhex(
    "6c000001890000789c6364606064d2606060624e494d6329cec82f602d2d4e2d2a86904c992940c463cfc0cdc0c0c0cc1c002475400c"
    "6c6a59f2127353c1048f2ec39fffcc0c7f0480ca1958191858fe313028327000d98c86ac893999c9a96c0c0c6c8c46cc49f949406976"
    "b034005b831dfb"
)
Z_PREPARE = bytes.fromhex("28000000000000240000001653454c454354206e616d652046524f4d207573657273205748455245206964203d203f")
Z_PREPARE_OK = bytes.fromhex(
    "530000016d0000789ce3616060044218c920cec0c0c49c929a0612b167e0b1078931b0358048560606e67f20853a0c0c2c20352cc519"
    "f905aca5c5a945c51092252f3137154cf0e832fcf9cfccf04700aa9115ac1100e0fb1298"
)
Z_RESET = bytes.fromhex("09000000000000050000001a01000000")
Z_OK = bytes.fromhex("0b0000010000000700000100000001000000")
Z_EXECUTE = bytes.fromhex("130000000000000f000000170100000000010000000001018002")
Z_EXECUTE_ROWS = bytes.fromhex(
    "49000001510000789c6364606064d4616060624e494d6329cec82f602d2d4e2d2a86902c7989b9a960824797e1cf7f66863f020c40c0"
    "cac0c0fc0fa891818d818105c84eca4f020ab18285000c2d116d"
)
Z_REPEAT = bytes.fromhex("1f0000000000001b0000000353454c45435420524550454154282778272c2031303030303029")
Z_BIG_ROW = [
    bytes.fromhex(
        "6c000001004000789cedcbb10d01610006d0ef77743a8d52f7bb84e48ca0b85ec408284c7013dc1c0a534a0866d0bed7bf9294d22693"
        "e67cb926591cfb43bf3fadeb5037ab5df7d366be4d6ecb3c939acc92e6fd5d798c65faba8f6500000000000000000000000000000000"
        "fef301f832ee3a"
    ),
    bytes.fromhex(
        "68000002e34601789cedc13101000000c2a0da8b6f0a3fa0000000000000000000000000000000000000000000000000000000000000"
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000006e0649"
        "9a4360"
    ),
    bytes.fromhex("0900000300000005000005fe00000100"),
]
Z_SESSION = [(True, Z_QUERY), (False, Z_ROWS), (True, Z_PREPARE), (False, Z_PREPARE_OK), (True, Z_RESET), (False, Z_OK),
             (True, Z_EXECUTE), (False, Z_EXECUTE_ROWS), (True, Z_REPEAT)] + [(False, z) for z in Z_BIG_ROW]  # fmt: skip


def zpkt(seq: int, inner: bytes, level: int = 6) -> bytes:
    """A compressed packet holding inner (zlib-compressed, or stored as is at level 0)."""
    body, ulen = (inner, 0) if level == 0 else (zlib.compress(inner, level), len(inner))
    return len(body).to_bytes(3, "little") + bytes([seq]) + ulen.to_bytes(3, "little") + body


def test_compressed_session_from_a_real_client_joined_mid_connection():
    assert detect(Z_QUERY, True)[0] == "mysql" and detect(Z_EXECUTE, True)[0] == "mysql"
    conn = MysqlConnection()
    msgs = [m for i, (is_req, data) in enumerate(Z_SESSION) for m in conn.feed(is_req, chunk(data, t=i, seq=1000 * i))]
    reqs, resps = [m for m in msgs if m.is_request], [m for m in msgs if not m.is_request]
    assert [m.name for m in reqs] == ["SELECT users", "PREPARE SELECT users", "mysql STMT_RESET", "SELECT users",
                                      "SELECT"]  # fmt: skip
    assert [m.attributes.get("db.response.returned_rows") for m in resps] == [2, None, None, 1, 1]
    # Sizes and TCP sequence ranges are the compressed bytes on the wire.
    assert [m.size for m in reqs] == [len(Z_QUERY), len(Z_PREPARE), len(Z_RESET), len(Z_EXECUTE), len(Z_REPEAT)]
    assert resps[-1].size == sum(map(len, Z_BIG_ROW)) and resps[-1].seq_start == 9000
    assert resps[0].seq_start == 1000 and resps[0].seq_end == 1000 + len(Z_ROWS)
    # Heads are the inflated packets, so redaction sees the SQL and a response shows its rows.
    assert b"SELECT * FROM users" in reqs[0].head and b"alice" in resps[0].head


@pytest.mark.parametrize("level", [0, 6])
def test_compressed_handshake_then_commands(level):
    conn = MysqlConnection()
    conn.feed(False, chunk(greeting(0x0200 | 0x20 | CLIENT_DEPRECATE_EOF)))
    conn.feed(True, chunk(pkt(1, (0x0200 | 0x20 | CLIENT_DEPRECATE_EOF).to_bytes(4, "little") + bytes(28) + b"root\0")))
    conn.feed(False, chunk(pkt(2, OK)))  # the last plain packet: compression starts after it
    (req,) = conn.feed(True, chunk(zpkt(0, pkt(0, b"\x03SELECT name FROM users")), t=3))
    rows = rows_reply(True, 4)
    (resp,) = conn.feed(False, chunk(zpkt(1, rows, level), t=4))
    assert req.name == "SELECT users" and resp.attributes["db.response.returned_rows"] == 4


@pytest.mark.parametrize("cut", [3, 7, 20, 41])
def test_packets_split_across_compressed_packets_and_syscalls(cut):
    conn = MysqlConnection()
    conn.feed(True, chunk(zpkt(0, pkt(0, b"\x03SELECT 1")), t=1))
    rows = rows_reply(False, 3)
    wire = zpkt(1, rows[:cut]) + zpkt(2, rows[cut:])
    out = conn.feed(False, chunk(wire[:cut + 5], t=2)) + conn.feed(False, chunk(wire[cut + 5 :], t=3))
    assert [(m.size, m.attributes["db.response.returned_rows"]) for m in out] == [(len(wire), 3)]


def test_compressed_reply_cut_by_the_capture_is_ended_by_the_next_command():
    conn = MysqlConnection()
    conn.feed(True, chunk(zpkt(0, pkt(0, b"\x03SELECT body FROM notes")), t=1))
    big = zpkt(1, rows_reply(True, 400), level=0)  # stored: 4 kB of packets, 1,024 bytes captured
    assert conn.feed(False, chunk(big[:1024], size=len(big), t=2)) == []
    ended, nxt = conn.feed(True, chunk(zpkt(0, pkt(0, b"\x03SELECT 1")), t=3))
    assert (ended.is_request, ended.partial, nxt.name) == (False, True, "SELECT")
    (ok,) = conn.feed(False, chunk(zpkt(1, pkt(1, OK)), t=4))
    assert ok.attributes["db.response.affected_rows"] == 1


def test_inflating_is_capped():
    """A compressed packet that inflates to 16 MB: at most INFLATE_MAX bytes are made."""
    from deeptrace.protocols import mysql

    conn = MysqlConnection()
    conn.feed(True, chunk(zpkt(0, pkt(0, b"\x03SELECT big FROM t")), t=1))
    row = b"\xfd" + (0xFF0000).to_bytes(3, "little") + bytes(0xFF0000)
    inner = pkt(1, b"\x01") + pkt(2, b"\x03def" + bytes(20)) + pkt(3, row) + pkt(4, b"\xfe\x00\x00\x02\x00\x00\x00")
    bomb = zpkt(1, inner, level=9)
    assert len(bomb) < 40_000 and mysql.INFLATE_MAX < 1 << 20
    calls = []
    real = zlib.decompressobj

    class Spy:
        def __init__(self):
            self.d = real()

        def decompress(self, data, limit):
            out = self.d.decompress(data, limit)
            calls.append(len(out))
            return out

    mysql.zlib.decompressobj = Spy
    try:
        assert conn.feed(False, chunk(bomb, t=2)) == []
    finally:
        mysql.zlib.decompressobj = real
    assert calls and max(calls) <= mysql.INFLATE_MAX
    (ended, nxt) = conn.feed(True, chunk(zpkt(0, pkt(0, b"\x03SELECT 2")), t=3))
    assert ended.partial and nxt.name == "SELECT"


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_arbitrary_bytes_never_raise_compressed(parts):
    conn = MysqlConnection()
    conn.feed(True, chunk(Z_QUERY))
    feed_alternating(conn, parts)
    conn = MysqlConnection()
    conn.feed(True, chunk(Z_QUERY))
    feed_alternating(conn, [zpkt(i, p, level=6 * (i % 2)) for i, p in enumerate(parts)])


def test_compressed_header_read_apart_from_its_payload():
    """A server reads a compressed packet's 7-byte header, then its payload: two records."""
    ping = bytes.fromhex("050000000000000100000" + "00e")
    conn = MysqlConnection()
    assert conn.feed(True, chunk(ping[:7], t=1)) == []
    (req,) = conn.feed(True, chunk(ping[7:], t=2))
    (resp,) = conn.feed(False, chunk(Z_OK, t=3))
    assert (req.name, req.size, req.start_ns, resp.size) == ("mysql PING", len(ping), 1, len(Z_OK))
    for part in (Z_QUERY[:7], Z_QUERY[7:]):
        conn.feed(True, chunk(part, t=4))
    (rows,) = conn.feed(False, chunk(Z_ROWS, t=5))
    assert rows.attributes["db.response.returned_rows"] == 2
