"""Redis RESP2/RESP3 framing and fields on hand-built messages."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from parsing import chunk, feed_alternating, feed_split

from deeptrace.protocols.redaction import redis_head
from deeptrace.protocols.redis import RedisConnection

SET = b"*3\r\n$3\r\nSET\r\n$7\r\nuser:42\r\n$5\r\nalice\r\n"
GET = b"*2\r\n$3\r\nGET\r\n$7\r\nuser:42\r\n"
REPLIES = [b"+OK\r\n", b"$5\r\nalice\r\n", b"-WRONGTYPE Operation against a key\r\n", b":12\r\n", b"$-1\r\n",
           b"*2\r\n$1\r\na\r\n*1\r\n:1\r\n", b"%1\r\n+k\r\n#t\r\n", b"_\r\n", b",3.14\r\n", b"(12345678901234567890\r\n",
           b"~2\r\n+a\r\n+b\r\n", b"=8\r\ntxt:abcd\r\n", b"!5\r\noops!\r\n", b"|1\r\n+ttl\r\n:3\r\n+OK\r\n"]  # fmt: skip


def test_command_key_and_name():
    (msg,) = RedisConnection().feed(True, chunk(SET))
    assert msg.name == "redis SET" and msg.attributes["db.redis.key"] == "user:42" and msg.size == len(SET)


@pytest.mark.parametrize("cut", range(1, len(SET)))
def test_request_split_at_every_byte(cut):
    assert [m.name for m in feed_split(RedisConnection(), True, SET, cut)] == ["redis SET"]


@pytest.mark.parametrize("reply", REPLIES)
def test_every_reply_type_frames_whole(reply):
    for cut in range(1, len(reply)):
        msgs = feed_split(RedisConnection(), False, reply, cut)
        assert [m.size for m in msgs] == [len(reply)]


def test_pipelined_commands_and_replies():
    conn = RedisConnection()
    reqs = conn.feed(True, chunk(SET + GET + b"PING\r\n"))
    resps = conn.feed(False, chunk(b"".join(REPLIES[:3]), t=5))
    assert [m.name for m in reqs] == ["redis SET", "redis GET", "redis PING"]
    assert [(m.error, m.status_code) for m in resps] == [(False, None), (False, None), (True, "WRONGTYPE")]


def test_large_bulk_reply_skips_what_was_not_captured():
    conn = RedisConnection()
    value = b"v" * 10000
    reply = b"$10000\r\n" + value + b"\r\n"
    (msg,) = conn.feed(False, chunk(reply[:1024], size=len(reply)))
    assert msg.size == len(reply) and msg.partial
    assert [m.size for m in conn.feed(False, chunk(b"+OK\r\n", t=3))] == [5]


def test_auth_password_is_redacted():
    (msg,) = RedisConnection().feed(True, chunk(b"*2\r\n$4\r\nAUTH\r\n$6\r\nhunter\r\n"))
    assert b"hunter" not in redis_head(msg.head) and "db.redis.key" not in msg.attributes


def test_resp3_push_is_not_a_response():
    conn = RedisConnection()
    assert [m.size for m in conn.feed(False, chunk(b">3\r\n+message\r\n+ch\r\n+hi\r\n+OK\r\n"))] == [5]


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_arbitrary_bytes_never_raise(parts):
    feed_alternating(RedisConnection(), parts, missing=50)


def test_connection_set_up_commands_are_marked():
    from deeptrace.protocols.base import CONNECTION_SETUP

    hello = b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n"
    setinfo = b"*4\r\n$6\r\nCLIENT\r\n$7\r\nSETINFO\r\n$8\r\nLIB-NAME\r\n$8\r\nredis-py\r\n"
    msgs = RedisConnection().feed(True, chunk(hello + setinfo + GET))
    assert [m.attributes.get(CONNECTION_SETUP, False) for m in msgs] == [True, True, False]
