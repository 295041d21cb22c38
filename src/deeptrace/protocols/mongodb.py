"""MongoDB wire protocol: OP_MSG (and the legacy opcodes), command and collection of
requests, `ok: 0` and write errors of replies, OP_COMPRESSED named by its inner opcode
(zlib bodies are read: cheap, and bounded); requests pair with replies by requestID /
responseTo. A small bounded BSON reader of top-level keys; nothing recurses.

Spec: https://www.mongodb.com/docs/manual/reference/mongodb-wire-protocol/ ("Standard
Message Header", "OP_MSG", "OP_COMPRESSED", "Legacy Opcodes") and https://bsonspec.org.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections import OrderedDict

from deeptrace.protocols.base import Message, message_from
from deeptrace.protocols.framing import INVALID, NEED_MORE, DirectionFramer, Frame, Framed, FramedConnection

PROTOCOL = "mongodb"
MAX_MESSAGE = 64 << 20  # servers allow 48 MB (maxMessageSizeBytes)
WANT = 1024  # bytes of a long message to wait for before framing it (command and collection come first)
MAX_ELEMENTS = 64  # top-level BSON elements looked at
MAX_SECTIONS = 16
MAX_PENDING = 1024
INFLATE_LIMIT = 4096  # bytes of a zlib-compressed message inflated to read its command

_HEADER = struct.Struct("<iiii")  # messageLength requestID responseTo opCode
_I32, _I64, _F64 = struct.Struct("<i"), struct.Struct("<q"), struct.Struct("<d")
OP_REPLY, OP_UPDATE, OP_INSERT, OP_QUERY = 1, 2001, 2002, 2004
OP_GET_MORE, OP_DELETE, OP_KILL_CURSORS, OP_COMPRESSED, OP_MSG = 2005, 2006, 2007, 2012, 2013
OPCODES = {OP_REPLY: "OP_REPLY", OP_UPDATE: "OP_UPDATE", OP_INSERT: "OP_INSERT", OP_QUERY: "OP_QUERY",
           OP_GET_MORE: "OP_GET_MORE", OP_DELETE: "OP_DELETE", OP_KILL_CURSORS: "OP_KILL_CURSORS",
           OP_COMPRESSED: "OP_COMPRESSED", OP_MSG: "OP_MSG"}  # fmt: skip
REQUEST_OPS = frozenset({OP_UPDATE, OP_INSERT, OP_QUERY, OP_GET_MORE, OP_DELETE, OP_KILL_CURSORS,
                         OP_COMPRESSED, OP_MSG})  # fmt: skip
REPLY_OPS = frozenset({OP_REPLY, OP_COMPRESSED, OP_MSG})
# Legacy opcodes (removed in 6.0) other than OP_QUERY: their operation name. All but OP_GET_MORE are
# one-way: the server never replies to them.
LEGACY = {OP_UPDATE: "update", OP_INSERT: "insert", OP_DELETE: "delete", OP_GET_MORE: "getMore",
          OP_KILL_CURSORS: "killCursors"}  # fmt: skip
LEGACY_ONE_WAY = frozenset({"OP_INSERT", "OP_UPDATE", "OP_DELETE", "OP_KILL_CURSORS"})
COMPRESSORS = {0: "noop", 1: "snappy", 2: "zlib", 3: "zstd"}
# OP_MSG flagBits: checksumPresent, moreToCome, exhaustAllowed; other bits must be 0 (spec "flagBits").
CHECKSUM, MORE_TO_COME, EXHAUST_ALLOWED = 1, 2, 1 << 16
_FLAGS_KNOWN = CHECKSUM | MORE_TO_COME | EXHAUST_ALLOWED

# Credentials in heads (SCRAM payloads, pwd, nonce, ...) are cut by redaction.mongodb_head, by key.
# Commands whose first value is a string but not a collection (a user's or a role's name).
NOT_COLLECTION = frozenset({"createuser", "updateuser", "dropuser", "usersinfo", "grantrolestouser",
                            "revokerolesfromuser", "createrole", "updaterole", "droprole", "rolesinfo",
                            "grantprivilegestorole", "revokeprivilegesfromrole", "grantrolestorole",
                            "revokerolesfromrole"})  # fmt: skip

# ---- BSON (bsonspec.org), top level only ----

_FIXED = {0x01: 8, 0x06: 0, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x10: 4, 0x11: 8, 0x12: 8, 0x13: 16,
          0xFF: 0, 0x7F: 0}  # fmt: skip
# Types with an int32 length first -> bytes past that length (strings count their NUL, not the int32).
_LENGTH_PREFIXED = {0x02: 4, 0x0D: 4, 0x0E: 4, 0x03: 0, 0x04: 0, 0x0F: 0, 0x05: 5}


def _value_size(buf: bytes, kind: int, pos: int) -> int | None:
    """Bytes of a value of this type at pos, or None when unknown or cut before its size."""
    if kind in _FIXED:
        return _FIXED[kind]
    if kind in _LENGTH_PREFIXED:
        if pos + 4 > len(buf):
            return None
        n = _I32.unpack_from(buf, pos)[0]
        if n < 0 or n > MAX_MESSAGE:
            return None
        # strings: int32 + bytes (with NUL); binary: int32 + subtype + bytes; documents: total
        return n + _LENGTH_PREFIXED[kind] if kind in (0x02, 0x0D, 0x0E, 0x05) else n
    if kind == 0x0B:  # regex: two cstrings
        first = buf.find(b"\0", pos)
        second = buf.find(b"\0", first + 1) if first >= 0 else -1
        return None if second < 0 else second + 1 - pos
    if kind == 0x0C:  # DBPointer: string + 12-byte id
        size = _value_size(buf, 0x02, pos)
        return None if size is None else size + 12
    return None


def elements(buf: bytes, pos: int) -> list[tuple[str, int, int, int | None]]:
    """(key, type, value offset, value end or None) of the top-level elements of the
    document at pos, as far as its bytes are here (at most MAX_ELEMENTS)."""
    out: list[tuple[str, int, int, int | None]] = []
    if pos < 0 or pos + 4 > len(buf):
        return out
    size = _I32.unpack_from(buf, pos)[0]
    if size < 5:
        return out
    end = min(pos + size, len(buf))
    p = pos + 4
    while p < end and len(out) < MAX_ELEMENTS:
        kind = buf[p]
        if kind == 0:
            break
        key_end = buf.find(b"\0", p + 1, end)
        if key_end < 0:
            break
        start = key_end + 1
        n = _value_size(buf, kind, start)
        key = buf[p + 1 : key_end].decode("utf-8", "replace")
        out.append((key, kind, start, None if n is None else start + n))
        if n is None:
            break
        p = start + n
    return out


def _string(buf: bytes, kind: int, start: int, end: int | None) -> str | None:
    if kind != 0x02 or end is None or end > len(buf) or end - start < 5:
        return None
    return buf[start + 4 : end - 1].decode("utf-8", "replace")


def _code(value) -> int | None:
    """An error code as an int: a double one too, but not a string, NaN or infinity (hostile bytes)."""
    if value.__class__ is float and not math.isfinite(value):
        return None
    return int(value) if value.__class__ in (int, float) else None


def _number(buf: bytes, kind: int, start: int) -> float | None:
    try:
        if kind == 0x10:
            return _I32.unpack_from(buf, start)[0]
        if kind == 0x12:
            return _I64.unpack_from(buf, start)[0]
        if kind == 0x01:
            return _F64.unpack_from(buf, start)[0]
        if kind == 0x08:
            return buf[start]
    except (struct.error, IndexError):
        pass
    return None


def _doc(buf: bytes, pos: int) -> dict:
    """Strings and numbers of a document's top level: {key: (type, value or None, offset)}."""
    out: dict = {}
    for key, kind, start, end in elements(buf, pos):
        value = _string(buf, kind, start, end) if kind == 0x02 else _number(buf, kind, start)
        out.setdefault(key, (kind, value, start))
    return out


# ---- detection ----

def _plausible_doc(data: bytes, pos: int, room: int) -> bool:
    """A BSON document starts at pos: sane size, a known first element type, a printable key."""
    if pos + 6 > len(data):
        return False
    size = _I32.unpack_from(data, pos)[0]
    if not 5 <= size <= room:
        return False
    kind = data[pos + 4]
    if kind not in _FIXED and kind not in _LENGTH_PREFIXED and kind not in (0x0B, 0x0C):
        return False
    key = data[pos + 5 : pos + 5 + 64].split(b"\0", 1)[0]
    return 0 < len(key) and all(0x20 < b < 0x7F for b in key)


def _plausible_name(data: bytes, pos: int, dotted: bool = True) -> bool:
    """A printable cstring: a legacy fullCollectionName ("db.collection") or an identifier."""
    name = data[pos : pos + 256].split(b"\0", 1)
    if len(name) != 2 or not name[0] or (dotted and b"." not in name[0]):
        return False
    return all(0x20 < b < 0x7F for b in name[0])


def _starts(data: bytes, ops: frozenset, is_request: bool) -> bool:
    if len(data) < 21:
        return False
    length, _, response_to, op = _HEADER.unpack_from(data)
    if not 21 <= length <= MAX_MESSAGE or op not in ops or (response_to == 0) != is_request:
        return False
    if op == OP_MSG:
        flags = _I32.unpack_from(data, 16)[0]
        if flags & ~_FLAGS_KNOWN or data[20] not in (0, 1):
            return False
        if data[20] == 1:  # a document sequence first: size, then its identifier ("documents")
            return _plausible_name(data, 25, dotted=False)
        return _plausible_doc(data, 21, length - 21)
    if op == OP_COMPRESSED:
        inner = _I32.unpack_from(data, 16)[0]
        return len(data) >= 25 and inner in ops and inner != OP_COMPRESSED and data[24] in COMPRESSORS
    if op == OP_REPLY:  # responseFlags (4 bits defined), cursorID, startingFrom, numberReturned
        if len(data) < 36:
            return False
        return 0 <= _I32.unpack_from(data, 16)[0] < 16 and _I32.unpack_from(data, 32)[0] >= 0
    if op == OP_QUERY:
        return 0 <= _I32.unpack_from(data, 16)[0] < 256 and _plausible_name(data, 20)
    if op == OP_INSERT:
        return 0 <= _I32.unpack_from(data, 16)[0] < 2 and _plausible_name(data, 20)
    # OP_UPDATE, OP_DELETE, OP_GET_MORE: int32 ZERO then the collection name; OP_KILL_CURSORS: ZERO, count
    return _I32.unpack_from(data, 16)[0] == 0 and (op == OP_KILL_CURSORS or _plausible_name(data, 20))


def starts_request(data: bytes) -> bool:
    return _starts(data, REQUEST_OPS, True)


def starts_response(data: bytes) -> bool:
    return _starts(data, REPLY_OPS, False)


# ---- messages ----

def _inflate(buf: bytes) -> tuple[int, str, bytes] | None:
    """OP_COMPRESSED: (original opcode, compressor, the start of the original message with its
    header) where the body can be read cheaply (noop, zlib), else with an empty body."""
    if len(buf) < 25:
        return None
    op, _ = struct.unpack_from("<ii", buf, 16)
    compressor = COMPRESSORS.get(buf[24], str(buf[24]))
    body = b""
    try:
        if buf[24] == 0:
            body = buf[25 : 25 + INFLATE_LIMIT]
        elif buf[24] == 2:
            body = zlib.decompressobj().decompress(buf[25:], INFLATE_LIMIT)
    except zlib.error:
        body = b""
    return op, compressor, buf[:12] + struct.pack("<i", op) + body


def _body_offsets(buf: bytes, length: int) -> tuple[int, list[str]]:
    """OP_MSG sections: the body (kind 0) document's offset (-1: not here), and the
    identifiers of document sequences (kind 1)."""
    flags = _I32.unpack_from(buf, 16)[0]
    end = min(length - (4 if flags & CHECKSUM else 0), len(buf))
    pos, body, sequences = 20, -1, []
    for _ in range(MAX_SECTIONS):
        if pos >= end:
            break
        kind = buf[pos]
        if kind == 0:
            body = pos + 1
            size = _value_size(buf, 0x03, pos + 1)
        elif kind == 1 and pos + 5 <= len(buf):
            size = _I32.unpack_from(buf, pos + 1)[0]
            ident = buf[pos + 5 : pos + 5 + 64].split(b"\0", 1)[0]
            sequences.append(ident.decode("utf-8", "replace"))
        else:
            break
        if size is None or size < 4:
            break
        pos += 1 + size
    return body, sequences


def _command(buf: bytes, pos: int, fields: dict) -> None:
    """The command name (first key), its collection and database."""
    els = elements(buf, pos)
    if not els:
        return
    command, kind, start, end = els[0]
    fields["command"] = command
    collection = _string(buf, kind, start, end) if command.lower() not in NOT_COLLECTION else None
    by_key = {key: (k, s, e) for key, k, s, e in els}
    if command == "getMore" and "collection" in by_key:
        collection = _string(buf, *by_key["collection"])
    if collection:
        fields["collection"] = collection
    if "$db" in by_key:
        fields["db"] = _string(buf, *by_key["$db"])


def _reply(buf: bytes, pos: int, fields: dict) -> None:
    """ok, code, codeName, errmsg of a command reply; the first write error."""
    doc = _doc(buf, pos)
    ok = doc.get("ok", (0, None, 0))[1]
    code = _code(doc.get("code", (0, None, 0))[1])
    if "$err" in doc:  # a legacy query failure
        fields["error"] = True
        fields["errmsg"] = doc["$err"][1]
    if ok is not None and ok == 0 and "ok" in doc:
        fields["error"] = True
        fields["errmsg"] = doc.get("errmsg", (0, None, 0))[1]
    if fields.get("error"):
        if code is not None:
            fields["code"] = code
        fields["code_name"] = doc.get("codeName", (0, None, 0))[1]
    if "writeErrors" in doc and doc["writeErrors"][0] == 0x04:  # [{index, code, errmsg}, ...]
        start = doc["writeErrors"][2]
        # The array's first element: type 0x03, key "0", then the document.
        first = _doc(buf, start + 7) if buf[start + 4 : start + 7] == b"\x030\x00" else {}
        fields["error"] = True
        code = _code(first.get("code", (0, None))[1])
        if code is not None:
            fields["code"] = code
        fields["errmsg"] = first.get("errmsg", (0, None))[1]
        fields["write_errors"] = True


def parse(buf: bytes, is_request: bool) -> dict | None:
    """Fields of a message from as many of its bytes as are here; None if its header is not
    MongoDB's."""
    if len(buf) < 16:
        return None
    length, request_id, response_to, op = _HEADER.unpack_from(buf)
    if not 16 <= length <= MAX_MESSAGE or op not in (REQUEST_OPS if is_request else REPLY_OPS):
        return None
    fields: dict = {"request_id": request_id, "response_to": response_to, "op": OPCODES[op]}
    try:
        if op == OP_COMPRESSED:
            inflated = _inflate(buf)
            if inflated is None:
                return fields
            op, fields["compressor"], buf = inflated
            fields["op"] = OPCODES.get(op, str(op))
            fields["compressed"] = True
            length = MAX_MESSAGE  # the original length is not this message's
        if op == OP_MSG:
            flags = _I32.unpack_from(buf, 16)[0]
            fields["more_to_come"] = bool(flags & MORE_TO_COME)
            body, sequences = _body_offsets(buf, length)
            if sequences:
                fields["sequences"] = sequences
            if body >= 0:
                (_command if is_request else _reply)(buf, body, fields)
        elif op == OP_REPLY:
            flags = _I32.unpack_from(buf, 16)[0]
            if flags & 2:  # QueryFailure: the one document is {$err, code}
                fields["error"] = True
            if flags & 1:
                fields["error"] = True
                fields["code_name"] = "CursorNotFound"
            _reply(buf, 36, fields)
        elif op == OP_QUERY:
            _legacy_query(buf, fields)
        elif op in LEGACY:
            fields["command"] = LEGACY[op]
            if op != OP_KILL_CURSORS:
                name = buf[20 : 20 + 256].split(b"\0", 1)[0].decode("utf-8", "replace")
                fields["db"], _, fields["collection"] = name.partition(".")
    except (struct.error, IndexError):
        pass
    return fields


def _legacy_query(buf: bytes, fields: dict) -> None:
    # OP_QUERY: flags fullCollectionName numberToSkip numberToReturn query [returnFieldsSelector]
    end = buf.find(b"\0", 20, 20 + 512)
    if end < 0:
        return
    db, _, collection = buf[20:end].decode("utf-8", "replace").partition(".")
    fields["db"] = db
    query = end + 1 + 8
    if collection == "$cmd":  # a command: its name is the query's first key ($query wraps it at times)
        els = elements(buf, query)
        if els and els[0][0] == "$query" and els[0][1] == 0x03:
            query = els[0][2]
        _command(buf, query, fields)
        fields["db"] = db
    else:
        fields["command"], fields["collection"] = "find", collection


def _frame(buf: bytes, is_request: bool) -> Frame | str:
    if len(buf) < 16:
        return NEED_MORE
    length, _, _, op = _HEADER.unpack_from(buf)
    if not 16 <= length <= MAX_MESSAGE or op not in (REQUEST_OPS if is_request else REPLY_OPS):
        return INVALID
    if len(buf) < min(length, WANT):
        return NEED_MORE
    return Frame(length, parse(buf[:length], is_request))


def frame_request(buf: bytes) -> Frame | str:
    return _frame(buf, True)


def frame_response(buf: bytes) -> Frame | str:
    return _frame(buf, False)


class MongoConnection(FramedConnection):
    protocol = PROTOCOL

    def __init__(self) -> None:
        super().__init__(
            DirectionFramer(frame_request, starts_request, lambda b: parse(b, True)),
            DirectionFramer(frame_response, starts_response, lambda b: parse(b, False)),
        )
        # requestID -> command, of requests awaiting replies
        self._commands: OrderedDict[int, str] = OrderedDict()
        # requestID -> command, of exhaust replies (moreToCome): the next reply answers that reply
        self._streams: OrderedDict[int, str] = OrderedDict()

    @staticmethod
    def _remember(table: OrderedDict, request_id: int, command: str) -> None:
        table[request_id] = command
        while len(table) > MAX_PENDING:
            table.popitem(last=False)

    def _request(self, f: Framed) -> Message:
        fields = f.fields
        command = fields.get("command") or fields["op"]
        attrs = {"db.system": "mongodb", "db.operation.name": command, "db.mongodb.opcode": fields["op"]}
        name = f"mongodb {command}"
        if fields.get("collection"):
            attrs["db.collection.name"] = fields["collection"]
            name += " " + fields["collection"]
        if fields.get("db"):
            attrs["db.namespace"] = fields["db"]
        if fields.get("compressor"):
            attrs["db.mongodb.compressor"] = fields["compressor"]
        if fields.get("sequences"):
            attrs["db.mongodb.document_sequences"] = ",".join(fields["sequences"])
        # moreToCome on a request: an unacknowledged write (w: 0); legacy writes never get a reply.
        one_way = fields.get("more_to_come", False) or fields["op"] in LEGACY_ONE_WAY
        if not one_way:
            self._remember(self._commands, fields["request_id"], command)
        return message_from(f, PROTOCOL, True, name=name, attributes=attrs, pair_key=fields["request_id"],
                            head=f.head, expects_response=not one_way)  # fmt: skip

    def _response(self, f: Framed) -> Message | None:
        fields = f.fields
        streamed = self._streams.pop(fields["response_to"], None)
        command = streamed or self._commands.pop(fields["response_to"], None)
        if fields.get("more_to_come") and command is not None:
            self._remember(self._streams, fields["request_id"], command)  # an exhaust stream goes on
        attrs: dict = {}
        code = fields.get("code")
        status = None
        if fields.get("error"):
            status = fields.get("code_name") or (str(code) if code is not None else "error")
            attrs["error.type"] = status
            if code is not None:
                attrs["db.response.status_code"] = str(code)
            if fields.get("errmsg"):
                attrs["db.mongodb.errmsg"] = str(fields["errmsg"])[:256]
        if streamed is not None:
            # A later reply of an exhaust stream (a streamed hello, an exhaust cursor) answers no
            # request of its own: a one-way message from the server.
            attrs.update({"db.system": "mongodb", "db.operation.name": streamed, "db.mongodb.exhaust": True})
            return message_from(f, PROTOCOL, True, name=f"mongodb {streamed}", attributes=attrs, head=f.head,
                                expects_response=False)  # fmt: skip
        return message_from(f, PROTOCOL, False, error=bool(fields.get("error")), status_code=status,
                            pair_key=fields["response_to"], attributes=attrs, head=f.head)  # fmt: skip
