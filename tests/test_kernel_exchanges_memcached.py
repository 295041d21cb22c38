"""Memcached text exchanges the kernel assembles, against the records path (tests/twins.py).

The kernel frames a command line it knows (get, gets, set, add, replace, append, prepend,
cas, delete, touch), a storage command's data block by its length, and a reply that is one
line or VALUE blocks up to END, whole in the reply's first call. Anything else (other
commands, noreply, pipelining, a reply longer than the first 1024 bytes of its call, an
unknown command) hands the connection to user space, which then parses it as memcached
whatever its next bytes are. The rule: the same spans either way, never a wrong pairing.

Traffic: pymemcache and memcaslap (clients we did not write) and raw sockets, against a real
memcached.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import Counter

import pytest
from servers import free_port, memcached, need
from twins import Twin, assembling_collector, assert_same_spans, summary


@pytest.fixture(scope="module")
def assembling():
    c = assembling_collector(("memcached",))
    yield c
    c.close()


@pytest.fixture(scope="module")
def server():
    with memcached() as (pid, port):
        yield pid, port



def client(twin: Twin, port: int, script: str, raw: bool = False) -> None:
    """A Python client traced from its start (so its connections are seen from connect);
    raw: with a socket `s` and ask(bytes, until) that sends and reads up to `until`."""
    code = f"import socket, sys\nport = {port}\nsys.stdin.readline()\n" + (RAW if raw else "") + textwrap.dedent(script)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, text=True)
    twin.trace(proc.pid)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    twin.run(proc)
    assert proc.wait() == 0


RAW = """
s = socket.create_connection(("127.0.0.1", port))
def ask(data, until):
    s.sendall(data)
    got = b""
    while not got.endswith(until):
        more = s.recv(65536)
        assert more, got
        got += more
    return got
"""


def test_pymemcache_commands_are_all_exchanges_and_the_same_spans(twin, server):
    pid, port = server
    twin.trace(pid)
    client(twin, port, """
        from pymemcache.client.base import Client
        c = Client(("127.0.0.1", port), default_noreply=False)
        c.set("user:1", b"alice")
        assert c.get("user:1") == b"alice"
        assert c.get("nobody") is None
        value, cas = c.gets("user:1")
        assert c.cas("user:1", b"bob", cas) is True
        assert c.cas("user:1", b"eve", cas) is False
        assert c.add("user:1", b"x") is False and c.add("user:2", b"x") is True
        assert c.replace("user:2", b"y") is True and c.append("user:2", b"z") and c.prepend("user:2", b"w")
        assert c.get_many(["user:1", "user:2", "user:3"]) == {"user:1": b"bob", "user:2": b"wyz"}
        assert c.touch("user:1", 60) is True and c.touch("nobody", 60) is False
        assert c.delete("user:2") is True and c.delete("user:2") is False
        c.close()
    """)  # fmt: skip
    twin.close()
    assert_same_spans(twin)
    got = summary([s for s in twin.exchange_spans if s.kind == "SERVER"])
    assert len(twin.exchange_spans) == 2 * len(got)  # the client's span of each too
    assert [name for name, _, _ in got] == ["memcached " + c for c in (
        "set", "get", "get", "gets", "cas", "cas", "add", "add", "replace", "append", "prepend", "get", "touch",
        "touch", "delete", "delete")]  # fmt: skip
    assert [code for _, _, code in got] == ["STORED", "VALUE", "END", "VALUE", "STORED", "EXISTS", "NOT_STORED",
                                            "STORED", "STORED", "STORED", "STORED", "VALUE", "TOUCHED", "NOT_FOUND",
                                            "DELETED", "NOT_FOUND"]  # fmt: skip
    multi = [s for s in twin.exchange_spans if s.attributes["db.memcached.values"] == 2]
    assert len(multi) == 2 and all(s.attributes["db.memcached.key"] == "user:1" for s in multi)
    assert not twin.record_spans
    d = twin.check_counters()
    assert d["conn_assembled"] == 2 and d["conn_handed_over"] == 0, d  # both ends of the one connection


def test_memcaslap_load_is_all_exchanges_and_the_same_spans(twin, server):
    """libmemcached's load tool (its keys start with control bytes, its commands are written
    with sendmsg in pieces): 5,000 gets and sets on 2 connections (a count, not a time, so that
    a slow machine does not pile up more than the rings hold)."""
    pid, port = server
    twin.trace(pid)
    proc = subprocess.Popen([need("memcaslap"), "-s", f"127.0.0.1:{port}", "-T", "1", "-c", "2", "-x", "5000",
                             "-X", "10"], stdout=subprocess.DEVNULL)  # fmt: skip
    twin.run(proc)
    assert proc.returncode == 0
    twin.close()
    assert_same_spans(twin)
    by_name = Counter(s.name for s in twin.exchange_spans)
    assert set(by_name) == {"memcached get", "memcached set"} and by_name["memcached get"] > 1000, by_name
    assert not twin.record_spans
    d = twin.check_counters()
    assert d["conn_assembled"] == 2 and d["conn_handed_over"] == 0, d


def test_commands_the_kernel_does_not_frame_hand_over_and_stay_memcached(twin, server):
    """incr, stats, a noreply set, a meta command and an unknown one: the connection goes to
    user space at the first of them, and is parsed as memcached from there (an unknown
    command first would otherwise read as a Redis inline command)."""
    pid, port = server
    twin.trace(pid)
    client(twin, port, raw=True, script="""
        ask(b"set n 0 0 1\\r\\n5\\r\\n", b"STORED\\r\\n")
        ask(b"bogus command\\r\\n", b"ERROR\\r\\n")
        ask(b"incr n 2\\r\\n", b"7\\r\\n")
        ask(b"set q 0 0 1 noreply\\r\\nx\\r\\nget q\\r\\n", b"END\\r\\n")
        ask(b"mg n v\\r\\n", b"\\r\\n7\\r\\n")
        ask(b"stats\\r\\n", b"END\\r\\n")
        ask(b"get n\\r\\n", b"END\\r\\n")
    """)  # fmt: skip
    twin.close()
    assert_same_spans(twin)
    assert [s.name for s in twin.exchange_spans] == ["memcached set"] * 2
    assert all(s.protocol == "memcached" for s in twin.record_spans), summary(twin.record_spans)
    assert "memcached get" in {s.name for s in twin.record_spans}
    d = twin.check_counters()
    assert d["conn_handed_over"] == 2, d


def test_a_storage_command_sent_in_two_writes_is_one_exchange(twin, server):
    """Its head is its first call's bytes, as user space's (which frames it by the line's length)."""
    pid, port = server
    twin.trace(pid)
    client(twin, port, raw=True, script="""
        s.sendall(b"set split 0 0 11\\r\\n")
        ask(b"hello world\\r\\n", b"STORED\\r\\n")
        ask(b"get split\\r\\n", b"END\\r\\n")
    """)  # fmt: skip
    twin.close()
    assert_same_spans(twin)
    first = min(twin.exchange_spans, key=lambda s: s.start_ns)
    assert first.req_head.startswith(b"set split 0 0 11\r\n") and first.req_size == 31
    assert len(twin.exchange_spans) == 4 and not twin.record_spans  # two commands, seen from both ends
    assert twin.check_counters()["conn_handed_over"] == 0


def test_a_value_past_the_scan_window_and_pipelined_gets_are_handed_over_alike(twin, server):
    pid, port = server
    twin.trace(pid)
    client(twin, port, raw=True, script="""
        ask(b"set big 0 0 3000\\r\\n" + b"v" * 3000 + b"\\r\\n", b"STORED\\r\\n")
        ask(b"get big\\r\\n", b"END\\r\\n")
        ask(b"get big\\r\\nget nope\\r\\n", b"END\\r\\nEND\\r\\n")
    """)  # fmt: skip
    client(twin, port, raw=True, script="""
        ask(b"get a\\r\\nget b\\r\\n", b"END\\r\\nEND\\r\\n")
    """)  # fmt: skip
    twin.close()
    assert_same_spans(twin)
    big = [s for s in twin.asm_spans if s.name == "memcached get" and s.resp_size > 3000]
    assert big and all(s.status_code == "VALUE" for s in big)
    assert twin.check_counters()["conn_handed_over"] >= 2


def test_hostile_replies_from_a_fake_server_never_pair_wrongly(twin):
    """Replies a real memcached does not send: a VALUE with a bad length, a reply to no
    command, garbage, a reply split before its END."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import socket, time
        srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", {port})); srv.listen(); print("listening", flush=True)
        replies = [b"VALUE k 0 zz\\r\\nab\\r\\nEND\\r\\n", b"STORED\\r\\nSTORED\\r\\n", b"\\x00\\xff garbage\\r\\n",
                   b"VALUE k 0 2\\r\\nab\\r\\n", b"END\\r\\n", b"DELETED\\r\\n"]
        c, _ = srv.accept()
        for r in replies:
            if r == b"END\\r\\n":
                c.sendall(r)
                continue
            c.recv(65536)
            c.sendall(r)
            time.sleep(0.05)
        c.close()
    """)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert server.stdout.readline() == "listening\n"
        twin.trace(server.pid)
        client(twin, port, """
            s = socket.create_connection(("127.0.0.1", port))
            for cmd in (b"get k\\r\\n", b"set k 0 0 1\\r\\nx\\r\\n", b"get k\\r\\n", b"get k\\r\\n", b"delete k\\r\\n"):
                s.sendall(cmd)
                import time; time.sleep(0.15)
                s.recv(65536)
        """)  # fmt: skip
    finally:
        server.wait(10)
    twin.close()
    assert_same_spans(twin)
    d = twin.check_counters()
    assert d["conn_handed_over"] >= 1, d


# ---- found by review: each gave different spans on the two paths before its fix ----


def test_keys_named_q_and_noreply_are_keys(twin, server):
    """`q` ends a meta command quietly, `noreply` a storage command: as a text command's key,
    each is answered (the records path took `get q` as one-way)."""
    pid, port = server
    twin.trace(pid)
    client(twin, port, raw=True, script="""
        ask(b"set q 0 0 1\\r\\nx\\r\\n", b"STORED\\r\\n")
        ask(b"get q\\r\\n", b"END\\r\\n")
        ask(b"get noreply\\r\\n", b"END\\r\\n")
        ask(b"delete q\\r\\n", b"DELETED\\r\\n")
    """)  # fmt: skip
    twin.close()
    assert_same_spans(twin)
    assert all("deeptrace.one_way" not in s.attributes for s in twin.asm_spans)
    assert sum(s.name == "memcached get" and s.status_code in ("VALUE", "END") for s in twin.plain_spans) == 4


def fake_server(twin: Twin, replies: list[bytes], requests: list[bytes]) -> None:
    """A server that answers each request with the next of `replies`, whatever it was."""
    port = free_port()
    srv = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import socket, sys, time
        srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", {port})); srv.listen(); print("listening", flush=True)
        sys.stdin.readline()
        c, _ = srv.accept()
        for r in {replies!r}:
            c.recv(65536)
            c.sendall(r)
            time.sleep(0.05)
        time.sleep(0.3)
        c.close()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert srv.stdout.readline() == "listening\n"
        twin.trace(srv.pid)
        srv.stdin.write("go\n")
        srv.stdin.flush()
        client(twin, port, f"""
            import time
            s = socket.create_connection(("127.0.0.1", port))
            for cmd in {requests!r}:
                s.sendall(cmd)
                time.sleep(0.15)
                s.recv(65536)
            time.sleep(0.5)
        """)  # fmt: skip
    finally:
        srv.wait(10)
    twin.close()


@pytest.mark.parametrize("reply", [b"NOT_FOUNDX\r\n", b"SERVER_ERRORX\r\n", b"CLIENT_EXX\r\n"])
def test_a_reply_word_is_read_whole(twin, reply):
    fake_server(twin, [b"STORED\r\n", reply, b"DELETED\r\n"], [b"set k 0 0 1\r\nx\r\n", b"delete k\r\n", b"delete j\r\n"])  # fmt: skip
    assert_same_spans(twin)


@pytest.mark.parametrize("reply", [b"VALUE k 0 2 5\r\nab\r\nEND\r\nEND\r\n", b"VALUE 0\r\n\r\nEND\r\n",
                                   b"VALUE a b 0 2\r\nab\r\nEND\r\n", b"VALUE k\t0 2\r\nab\r\nEND\r\n"],
                         ids=["cas-to-a-get", "too-few-words", "five-words", "tab"])  # fmt: skip
def test_a_value_line_of_another_shape_is_read_as_user_space_reads_it(twin, reply):
    fake_server(twin, [b"STORED\r\n", reply, b"DELETED\r\n"], [b"set k 0 0 1\r\nx\r\n", b"get k\r\n", b"delete k\r\n"])  # fmt: skip
    assert_same_spans(twin)


def test_a_data_length_past_32_bits_is_not_wrapped(twin):
    fake_server(twin, [b"STORED\r\n", b"DELETED\r\n"], [b"set k 0 0 4294967301\r\nhello\r\n", b"delete k\r\n"])  # fmt: skip
    assert_same_spans(twin)

