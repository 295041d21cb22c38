"""MongoDB: OP_MSG frames built by pymongo's own message helpers (pymongo.message), legacy
and compressed opcodes, documents by pymongo's bson; and live: pymongo's MongoClient against
a small server that answers with bson-encoded replies, traced with eBPF and captured."""

from __future__ import annotations

import struct
import textwrap

import bson
import pytest
from bson.codec_options import DEFAULT_CODEC_OPTIONS as OPTS
from hypothesis import given, settings
from hypothesis import strategies as st
from parsing import chunk, feed_alternating, feed_split
from pymongo import message
from pymongo.compression_support import ZlibContext

from deeptrace.capture.pipeline import SpanPipeline
from deeptrace.protocols.mongodb import MongoConnection, starts_request, starts_response
from deeptrace.protocols.redaction import redact_span_parts


def op_msg(command: dict, db: str = "shop", flags: int = 0, ctx=None) -> tuple[int, bytes]:
    """(requestID, bytes) as pymongo sends a command."""
    request_id, data, _, _ = message._op_msg(flags, command, db, None, OPTS, ctx)
    return request_id, bytes(data)


def reply(doc: dict, response_to: int, request_id: int = 500, flags: int = 0) -> bytes:
    """An OP_MSG reply as a server sends it: header, flagBits, one kind-0 section."""
    body = struct.pack("<i", flags) + b"\0" + bson.encode(doc)
    return struct.pack("<iiii", 16 + len(body), request_id, response_to, 2013) + body


def op_query(collection: str, query: dict, request_id: int = 9) -> bytes:
    body = struct.pack("<i", 0) + collection.encode() + b"\0" + struct.pack("<ii", 0, -1) + bson.encode(query)
    return struct.pack("<iiii", 16 + len(body), request_id, 0, 2004) + body


def op_reply(doc: dict, response_to: int, flags: int = 0) -> bytes:
    body = struct.pack("<iqii", flags, 0, 0, 1) + bson.encode(doc)
    return struct.pack("<iiii", 16 + len(body), 77, response_to, 1) + body


def shipped(msg) -> bytes:
    """A message's head as a span carries it off the host (spans.make_span redacts every head)."""
    return redact_span_parts(msg.protocol, {}, msg.head, b"")[0]


def exchange(conn: MongoConnection, request: bytes, response: bytes):
    (req,) = conn.feed(True, chunk(request))
    (resp,) = conn.feed(False, chunk(response, t=5))
    return req, resp


def test_find_command_collection_database_and_pairing():
    rid, data = op_msg({"find": "users", "filter": {"name": "ann"}, "limit": 1})
    req, resp = exchange(MongoConnection(), data, reply({"cursor": {"id": 0, "firstBatch": []}, "ok": 1.0}, rid))
    assert req.name == "mongodb find users" and req.pair_key == rid == resp.pair_key
    assert req.attributes == {"db.system": "mongodb", "db.operation.name": "find", "db.mongodb.opcode": "OP_MSG",
                              "db.collection.name": "users", "db.namespace": "shop"}  # fmt: skip
    assert not resp.error and resp.status_code is None and req.size == len(data)


def test_ok_0_reply_is_an_error_with_code_and_code_name():
    rid, data = op_msg({"frobnicate": 1})
    err = {"ok": 0.0, "errmsg": "no such command: 'frobnicate'", "code": 59, "codeName": "CommandNotFound"}
    req, resp = exchange(MongoConnection(), data, reply(err, rid))
    assert req.name == "mongodb frobnicate"
    assert (resp.error, resp.status_code) == (True, "CommandNotFound")
    assert resp.attributes["db.response.status_code"] == "59" and "no such command" in resp.attributes["db.mongodb.errmsg"]


def test_insert_document_sequence_and_write_error():
    rid, data = op_msg({"insert": "users", "documents": [{"_id": 1}, {"_id": 2}], "ordered": True})
    assert data[20:21] == b"\0" and b"\x01" in data  # pymongo moved the documents to a kind-1 section
    dup = {"n": 0, "writeErrors": [{"index": 0, "code": 11000, "errmsg": "E11000 duplicate key"}], "ok": 1.0}
    req, resp = exchange(MongoConnection(), data, reply(dup, rid))
    assert req.name == "mongodb insert users" and req.attributes["db.mongodb.document_sequences"] == "documents"
    assert (resp.error, resp.status_code, resp.attributes["db.response.status_code"]) == (True, "11000", "11000")


def test_get_more_names_its_collection():
    _, data = op_msg({"getMore": bson.Int64(123456789), "collection": "orders", "batchSize": 10})
    (req,) = MongoConnection().feed(True, chunk(data))
    assert req.name == "mongodb getMore orders"


def test_checksum_present_and_more_to_come():
    cmd = bson.encode({"insert": "logs", "documents": [{"x": 1}], "writeConcern": {"w": 0}, "$db": "shop"})
    body = struct.pack("<i", 0b11) + b"\0" + cmd + b"\xde\xad\xbe\xef"  # checksumPresent | moreToCome, CRC-32C
    data = struct.pack("<iiii", 16 + len(body), 41, 0, 2013) + body
    conn = MongoConnection()
    (req,) = conn.feed(True, chunk(data + op_msg({"ping": 1})[1]))[:1]
    assert req.name == "mongodb insert logs" and not req.expects_response and req.size == len(data)
    _, data = op_msg({"delete": "logs", "deletes": [{"q": {}, "limit": 0}]}, flags=2)  # pymongo's w=0 flag
    (req,) = conn.feed(True, chunk(data, t=2))
    assert req.name == "mongodb delete logs" and not req.expects_response


def test_exhaust_replies_after_the_first_are_one_way_server_messages():
    rid, data = op_msg({"hello": 1, "topologyVersion": {"counter": 0}, "maxAwaitTimeMS": 10000}, db="admin", flags=1 << 16)
    conn = MongoConnection()
    req, first = exchange(conn, data, reply({"isWritablePrimary": True, "ok": 1.0}, rid, request_id=600, flags=2))
    assert req.name == "mongodb hello" and first.pair_key == rid
    (pushed,) = conn.feed(False, chunk(reply({"isWritablePrimary": True, "ok": 1.0}, 600, request_id=601, flags=2)))
    assert pushed.is_request and not pushed.expects_response and pushed.name == "mongodb hello"
    (again,) = conn.feed(False, chunk(reply({"ok": 1.0}, 601, request_id=602)))
    assert again.is_request and again.attributes["db.mongodb.exhaust"]


def test_legacy_op_query_and_op_reply():
    conn = MongoConnection()
    req, resp = exchange(conn, op_query("admin.$cmd", {"isMaster": 1, "client": {"driver": {"name": "x"}}}),
                         op_reply({"ismaster": True, "ok": 1.0}, 9))  # fmt: skip
    assert (req.name, req.attributes["db.mongodb.opcode"], req.attributes["db.namespace"]) == \
        ("mongodb isMaster", "OP_QUERY", "admin")  # fmt: skip
    assert not resp.error and resp.pair_key == 9
    req, resp = exchange(conn, op_query("shop.users", {"$query": {"a": 1}}, request_id=10),
                         op_reply({"$err": "bad query", "code": 2}, 10, flags=2))  # fmt: skip
    assert req.name == "mongodb find users" and (resp.error, resp.status_code) == (True, "2")


def test_legacy_query_with_wrapped_command():
    (req,) = MongoConnection().feed(True, chunk(op_query("shop.$cmd", {"$query": {"count": "users"}, "$readPreference": {}})))
    assert req.name == "mongodb count users"


def test_legacy_writes_are_one_way():
    body = struct.pack("<i", 0) + b"shop.users\0" + bson.encode({"_id": 1})
    insert = struct.pack("<iiii", 16 + len(body), 3, 0, 2002) + body
    assert starts_request(insert)
    (req,) = MongoConnection().feed(True, chunk(insert))
    assert req.name == "mongodb insert users" and not req.expects_response


def test_op_compressed_zlib_is_read_and_others_are_named():
    rid, data = op_msg({"find": "users", "filter": {}}, ctx=ZlibContext(6))
    assert struct.unpack_from("<i", data, 12)[0] == 2012 and data[24] == 2  # pymongo compressed it with zlib
    conn = MongoConnection()
    req, resp = exchange(conn, data, reply({"ok": 1.0}, rid))
    assert req.name == "mongodb find users" and req.attributes["db.mongodb.compressor"] == "zlib"
    assert shipped(req) == data[:25] + b"[REDACTED]" and resp.pair_key == rid and not resp.error
    snappy_body = struct.pack("<iiB", 2013, 100, 1) + b"\x64\xf0\x61garbage-snappy-bytes"
    snappy = struct.pack("<iiii", 16 + len(snappy_body), 8, 0, 2012) + snappy_body
    assert starts_request(snappy)
    (req,) = conn.feed(True, chunk(snappy))
    assert req.name == "mongodb OP_MSG" and req.attributes["db.mongodb.compressor"] == "snappy"
    assert b"garbage" in req.head and b"garbage" not in shipped(req)  # snappy keeps literals as they were


SECRET = b"c2VjcmV0LXNjcmFtLXByb29m"


@pytest.mark.parametrize("command", [
    {"saslStart": 1, "mechanism": "SCRAM-SHA-256", "payload": SECRET, "autoAuthorize": 1},
    {"saslContinue": 1, "conversationId": 1, "payload": SECRET},
    {"createUser": "bob", "pwd": SECRET.decode(), "roles": []},
    {"updateUser": "bob", "pwd": SECRET.decode()},
    {"authenticate": 1, "user": "bob", "nonce": "n", "key": SECRET.decode(), "mechanism": "MONGODB-CR"},
    {"hello": 1, "speculativeAuthenticate": {"saslStart": 1, "payload": SECRET}, "client": {"app": "x"}},
    {"update": "users", "updates": [{"q": {"_id": 1}, "u": {"$set": {"password": SECRET.decode()}}}]},
])  # fmt: skip
def test_credentials_stay_out_of_heads(command):
    rid, data = op_msg(command, db="admin")
    conn = MongoConnection()
    (req,) = conn.feed(True, chunk(data))
    assert SECRET not in shipped(req) and b"[REDACTED]" in shipped(req)
    assert req.name.split()[1] == next(iter(command))
    answer = {"conversationId": 1, "done": False, "payload": SECRET, "ok": 1.0}
    if "hello" in command:
        answer = {"isWritablePrimary": True, "speculativeAuthenticate": {"payload": SECRET}, "ok": 1.0}
    (resp,) = conn.feed(False, chunk(reply(answer, rid)))
    assert SECRET not in shipped(resp)


def test_error_codes_of_any_bson_type_never_raise():
    for code in (float("nan"), float("inf"), "E11000", 11000.0):
        rid, data = op_msg({"insert": "users"})
        _, resp = exchange(MongoConnection(), data, reply({"ok": 0.0, "code": code}, rid))
        assert resp.error and resp.status_code == ("11000" if code == 11000.0 else "error")
        answer = reply({"ok": 1.0, "writeErrors": [{"index": 0, "code": code, "errmsg": "dup"}]}, rid)
        _, resp = exchange(MongoConnection(), data, answer)
        assert resp.error and resp.attributes.get("db.response.status_code") == ("11000" if code == 11000.0 else None)


@pytest.mark.parametrize("cut", range(1, 90, 4))
def test_split_anywhere(cut):
    rid, data = op_msg({"find": "users", "filter": {"name": "ann"}})
    conn = MongoConnection()
    assert [m.name for m in feed_split(conn, True, data, cut)] == ["mongodb find users"]
    err = reply({"ok": 0, "code": 13, "codeName": "Unauthorized"}, rid)
    assert [m.status_code for m in feed_split(conn, False, err, min(cut, len(err) - 1))] == ["Unauthorized"]


def test_message_larger_than_captured_is_skipped_through():
    rid, data = op_msg({"insert": "blobs", "documents": [{"b": b"x" * 200_000}]})
    conn = MongoConnection()
    (req,) = conn.feed(True, chunk(data[:1024], size=len(data)))
    assert req.name == "mongodb insert blobs" and req.size == len(data) and not req.partial
    big = reply({"cursor": {"firstBatch": [{"b": b"y" * 100_000}]}, "ok": 1.0}, rid)
    assert [m.size for m in conn.feed(False, chunk(big[:700], size=len(big)))] == [len(big)]
    (req,) = conn.feed(True, chunk(op_msg({"ping": 1})[1], t=3))
    assert req.name == "mongodb ping"


def test_detection():
    rid, data = op_msg({"find": "users"})
    assert starts_request(data) and not starts_response(data)
    answer = reply({"ok": 1.0}, rid)
    assert starts_response(answer) and not starts_request(answer)
    assert starts_response(op_reply({"ok": 1.0}, 5)) and starts_request(op_query("admin.$cmd", {"ping": 1}))
    assert not starts_request(data[:16] + struct.pack("<i", 1 << 20) + data[20:])  # unknown flag bits
    assert not starts_request(data[:12] + struct.pack("<i", 2003) + data[16:])  # no such opcode
    assert not starts_request(data[:21] + struct.pack("<i", 1 << 30) + data[25:])  # body larger than the message


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_arbitrary_bytes_never_raise(parts):
    feed_alternating(MongoConnection(), parts, missing=50)


@settings(max_examples=200)
@given(st.binary(max_size=64), st.integers(0, 80), st.booleans())
def test_corrupted_real_messages_never_raise(junk, at, compressed):
    rid, data = op_msg({"insert": "users", "documents": [{"_id": 1}]}, ctx=ZlibContext(1) if compressed else None)
    conn = MongoConnection()
    conn.feed(True, chunk(data[:at] + junk + data[at:]))
    answer = reply({"ok": 0, "writeErrors": [{"code": 1}], "codeName": "X"}, rid)
    conn.feed(False, chunk(answer[:at] + junk + answer[at:]))


# ---- live: pymongo's MongoClient against a server answering with bson documents ----

SERVER = textwrap.dedent("""
    import socket, struct, threading
    import bson

    HELLO = {"ismaster": True, "isWritablePrimary": True, "helloOk": True, "maxWireVersion": 21,
             "minWireVersion": 0, "maxBsonObjectSize": 16777216, "maxMessageSizeBytes": 48000000,
             "maxWriteBatchSize": 100000, "logicalSessionTimeoutMinutes": 30, "connectionId": 1, "ok": 1.0}

    def answer(cmd):
        name = next(iter(cmd))
        if name.lower() in ("ismaster", "hello"):
            return HELLO
        if name == "find":
            return {"cursor": {"id": 0, "ns": cmd["$db"] + "." + cmd["find"], "firstBatch": [{"_id": 1, "name": "ann"}]},
                    "ok": 1.0}
        if name == "insert":
            return {"n": 0, "writeErrors": [{"index": 0, "code": 11000, "errmsg": "E11000 duplicate key"}], "ok": 1.0}
        if name == "endSessions":
            return {"ok": 1.0}
        return {"ok": 0.0, "errmsg": f"no such command: '{name}'", "code": 59, "codeName": "CommandNotFound"}

    def serve(conn):
        next_id = 1000
        with conn:
            while True:
                head = conn.recv(16, socket.MSG_WAITALL)
                if len(head) < 16:
                    return
                length, rid, _, op = struct.unpack("<iiii", head)
                body = conn.recv(length - 16, socket.MSG_WAITALL)
                next_id += 1
                if op == 2004:  # OP_QUERY: flags, fullCollectionName, skip, return, query -> OP_REPLY
                    end = body.index(b"\\0", 4) + 9
                    doc = bson.decode(body[end : end + struct.unpack_from("<i", body, end)[0]])
                    payload = struct.pack("<iqii", 0, 0, 0, 1) + bson.encode(answer(doc))
                    conn.sendall(struct.pack("<iiii", 16 + len(payload), next_id, rid, 1) + payload)
                elif op == 2013:  # OP_MSG: flagBits, the kind-0 body first
                    doc = bson.decode(body[5 : 5 + struct.unpack_from("<i", body, 5)[0]])
                    payload = struct.pack("<i", 0) + b"\\0" + bson.encode(answer(doc))
                    conn.sendall(struct.pack("<iiii", 16 + len(payload), next_id, rid, 2013) + payload)
                else:
                    raise SystemExit(f"unexpected opcode {op}")

    srv = socket.create_server(("127.0.0.1", 0))
    print(srv.getsockname()[1], flush=True)
    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
""")
CLIENT = textwrap.dedent("""
    import sys
    from pymongo import MongoClient
    from pymongo.errors import DuplicateKeyError, OperationFailure
    sys.stdin.readline()
    client = MongoClient("127.0.0.1", int(sys.argv[1]), directConnection=True, serverSelectionTimeoutMS=5000)
    users = client.shop.users
    assert users.find_one({"name": "ann"})["name"] == "ann"
    try:
        users.insert_one({"_id": 1, "name": "ann"})
        raise SystemExit("expected a duplicate key error")
    except DuplicateKeyError:
        pass
    try:
        client.shop.command("frobnicate")
        raise SystemExit("expected CommandNotFound")
    except OperationFailure as e:
        assert e.code == 59
    client.close()
    print("done", flush=True)
""")
def test_live_pymongo_client_and_its_capture(collector, store, tmp_path):
    from servers import replayed_spans, scripted_pair, span_key

    with scripted_pair(collector, SERVER, CLIENT, tmp_path / "mongo.pcapng") as (server, client, cap):
        client_recs = store.settle(client, quiet_s=0.5)
        server_recs = store.wait_for(server, lambda rs: sum(r.syscall == "close" for r in rs) >= 2)
    for recs, kind in ((server_recs, "SERVER"), (client_recs, "CLIENT")):
        pipeline = SpanPipeline()
        spans = [s for s in pipeline.push(recs) + pipeline.close_all(0) if s.protocol == "mongodb"]
        app = sorted((s.name, s.status, s.status_code) for s in spans if "hello" not in s.name.lower()
                     and "ismaster" not in s.name.lower() and "endSessions" not in s.name)  # fmt: skip
        assert app == [("mongodb find users", "ok", None), ("mongodb frobnicate", "error", "CommandNotFound"),
                       ("mongodb insert users", "error", "11000")], (kind, app)  # fmt: skip
        handshakes = [s for s in spans if s.name.lower() in ("mongodb ismaster", "mongodb hello")]
        assert handshakes and all(s.status == "ok" for s in handshakes), kind
        assert all(s.kind == kind and s.attributes["db.system"] == "mongodb" for s in spans)
        assert all(s.attributes["db.namespace"] == "shop" for s in spans if "users" in s.name)
        if kind == "SERVER":
            assert sorted(map(span_key, replayed_spans(cap))) == sorted(map(span_key, spans))
