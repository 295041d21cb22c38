"""MySQL/MariaDB protocol on hand-built packets, and live: the mariadb client and a
Python driver with server-side prepared statements against a real MariaDB."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from parsing import chunk, feed_alternating

from deeptrace.pipeline import SpanPipeline
from deeptrace.protocols import detect
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
            bad = subprocess.run([*cli, "shop", "-e", "SELECT * FROM nope"], capture_output=True, text=True)
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
    (req,) = conn.feed(True, chunk(pkt(0, b"\x03SELECT body FROM notes"), t=1))
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
