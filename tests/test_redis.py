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
    assert msg.size == len(reply) and not msg.partial  # every byte counted: whole, not all captured
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


def _push(*elements: bytes | int, kind: bytes = b">") -> bytes:
    out = kind + b"%d\r\n" % len(elements)
    for e in elements:
        out += b":%d\r\n" % e if isinstance(e, int) else b"$%d\r\n%s\r\n" % (len(e), e)
    return out


def _command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


@pytest.mark.parametrize("kind", [b">", b"*"])  # RESP3 pushes, RESP2 arrays
def test_subscription_is_answered_by_its_first_confirmation(kind):
    """One confirmation per channel: the first answers the command, the others nothing; a message
    pushed meanwhile answers nothing either, so GET still gets its own reply."""
    conn = RedisConnection()
    reqs = conn.feed(True, chunk(_command(b"SUBSCRIBE", b"a", b"b") + _command(b"PSUBSCRIBE", b"p*") + GET))
    replies = (_push(b"subscribe", b"a", 1, kind=kind) + _push(b"subscribe", b"b", 2, kind=kind)
               + _push(b"psubscribe", b"p*", 3, kind=kind) + _push(b"message", b"a", b"hi") + b"$5\r\nalice\r\n")
    resps = conn.feed(False, chunk(replies, t=5))
    assert [m.name for m in reqs] == ["redis SUBSCRIBE", "redis PSUBSCRIBE", "redis GET"]
    assert [(m.size, m.attributes["db.redis.reply_type"]) for m in resps] == [
        (len(_push(b"subscribe", b"a", 1)), "push" if kind == b">" else "array"),
        (len(_push(b"psubscribe", b"p*", 3)), "push" if kind == b">" else "array"), (11, "bulk")]


def test_unsubscribe_from_all_is_answered_once_and_ends_with_none_left():
    conn = RedisConnection()
    conn.feed(True, chunk(_command(b"UNSUBSCRIBE") + b"PING\r\n"))
    replies = _push(b"unsubscribe", b"a", 1) + _push(b"unsubscribe", b"b", 0) + b"+PONG\r\n"
    assert [m.attributes["db.redis.reply_type"] for m in conn.feed(False, chunk(replies, t=5))] == ["push", "simple"]


def test_inline_pings_are_redis_once_answered_with_a_plus_pong():
    """Inline PINGs alone could be NATS keep-alives; Redis's `+PONG` (NATS says `PONG`) decides."""
    from deeptrace.capture.pipeline import SpanPipeline
    from deeptrace.capture.records import Record
    from deeptrace.protocols import detect

    assert detect(b"PING\r\nPING\r\n", True) is None and detect(b"PONG\r\n", False) is None
    assert detect(b"+PONG\r\n", False)[::2] == ("redis", False) and detect(b"+PONG\r\n", None)[::2] == ("redis", False)
    recs, seq = [], {"ingress": 1000, "egress": 5000}
    for t, (direction, data) in enumerate([("ingress", b"PING\r\nPING\r\n"), ("egress", b"+PONG\r\n+PONG\r\n")]):
        recs.append(Record(10, 11, "svc", "read" if direction == "ingress" else "write", direction, "ipv4", "tcp",
                           "127.0.0.1", 6379, "127.0.0.1", 5555, "server", 7, 3, 1000 * t, 1000 * t + 10,
                           seq[direction], seq[direction] + len(data), len(data), len(data), 0, 0, data))  # fmt: skip
    spans = SpanPipeline().push(recs)
    assert [(s.name, s.status) for s in spans] == [("redis PING", "ok")] * 2
