"""Memcached text (classic and meta commands) and binary protocols: command, key,
status; binary requests pair with responses by opaque. Pure functions of bytes.

Binary quiet commands (GETQ, SETQ, ...) are answered only sometimes (a GETQ on a hit,
a SETQ on a failure): they are held until their answer comes, or until the server
answers a later request (it answers in order, so a quiet one passed over succeeded
silently), or until the connection ends. QUITQ and text `quit` are never answered."""

from __future__ import annotations

import struct

from deeptrace.protocols.base import Message, message_from
from deeptrace.protocols.framing import INVALID, NEED_MORE, DirectionFramer, Frame, Framed, FramedConnection

PROTOCOL = "memcached"
MAX_LINE = 8 << 10

# Text commands; the number is the index of the <bytes> field when a data block follows.
STORAGE = {b"set": 4, b"add": 4, b"replace": 4, b"append": 4, b"prepend": 4, b"cas": 4, b"ms": 2}
OTHER = frozenset(b"get gets gat gats delete incr decr touch stats flush_all version verbosity quit "
                  b"mg md ma mn me shutdown cache_memlimit lru_crawler slabs watch".split())  # fmt: skip
RETRIEVAL = frozenset(("get", "gets", "gat", "gats"))
META = frozenset(("mg", "ms", "md", "ma", "mn", "me"))
ERRORS = (b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR")
MISSES = (b"NOT_FOUND", b"NOT_STORED", b"EXISTS", b"NF", b"NS", b"EX", b"EN")
REPLY_WORDS = frozenset(b"STORED NOT_STORED EXISTS NOT_FOUND DELETED TOUCHED OK ERROR CLIENT_ERROR SERVER_ERROR "
                        b"VERSION VALUE STAT END HD VA EN NF NS EX MN ME RESET".split())  # fmt: skip

# ---- binary protocol ----
_BIN = struct.Struct("!BBHBBHIIQ")  # magic opcode keylen extlen datatype vbucket/status bodylen opaque cas
BIN_REQUEST, BIN_RESPONSE = 0x80, 0x81
OPCODES = {0x00: "GET", 0x01: "SET", 0x02: "ADD", 0x03: "REPLACE", 0x04: "DELETE", 0x05: "INCREMENT",
           0x06: "DECREMENT", 0x07: "QUIT", 0x08: "FLUSH", 0x09: "GETQ", 0x0A: "NOOP", 0x0B: "VERSION",
           0x0C: "GETK", 0x0D: "GETKQ", 0x0E: "APPEND", 0x0F: "PREPEND", 0x10: "STAT", 0x11: "SETQ",
           0x12: "ADDQ", 0x13: "REPLACEQ", 0x14: "DELETEQ", 0x15: "INCREMENTQ", 0x16: "DECREMENTQ",
           0x17: "QUITQ", 0x18: "FLUSHQ", 0x19: "APPENDQ", 0x1A: "PREPENDQ", 0x1B: "VERBOSITY", 0x1C: "TOUCH",
           0x1D: "GAT", 0x1E: "GATQ", 0x20: "SASL_LIST_MECHS", 0x21: "SASL_AUTH", 0x22: "SASL_STEP",
           0x23: "GATK", 0x24: "GATKQ"}  # fmt: skip
QUIET = frozenset(("GETQ", "GETKQ", "SETQ", "ADDQ", "REPLACEQ", "DELETEQ", "INCREMENTQ", "DECREMENTQ", "FLUSHQ",
                   "APPENDQ", "PREPENDQ", "GATQ", "GATKQ"))  # fmt: skip
NEVER_ANSWERED = frozenset(("QUITQ",))
SASL = frozenset(("SASL_AUTH", "SASL_STEP"))  # their values are credentials
STATUSES = {0: "OK", 1: "KEY_NOT_FOUND", 2: "KEY_EXISTS", 3: "VALUE_TOO_LARGE", 4: "INVALID_ARGUMENTS",
            5: "ITEM_NOT_STORED", 6: "NON_NUMERIC", 7: "WRONG_VBUCKET", 8: "AUTH_STALE", 0x20: "AUTH_ERROR",
            0x21: "AUTH_CONTINUE", 0x22: "OUT_OF_RANGE", 0x81: "UNKNOWN_COMMAND", 0x82: "OUT_OF_MEMORY",
            0x83: "NOT_SUPPORTED", 0x84: "INTERNAL_ERROR", 0x85: "BUSY", 0x86: "TEMPORARY_FAILURE"}  # fmt: skip
_NOT_ERRORS = ("OK", "KEY_NOT_FOUND", "KEY_EXISTS", "ITEM_NOT_STORED", "AUTH_CONTINUE")


def _key_text(key: bytes) -> str:
    """A key as text: UTF-8, and any other byte as \\xNN, so that keys of random bytes (as
    load generators make) stay told apart, and ASCII."""
    return key.decode("utf-8", "backslashreplace")


def _first_word(data: bytes) -> bytes:
    return data[:16].split(b" ", 1)[0].split(b"\r\n", 1)[0]


def starts_request(data: bytes) -> bool:
    if data[:1] == bytes([BIN_REQUEST]):
        return len(data) >= 24 and data[1] in OPCODES
    word = _first_word(data)
    return (word in STORAGE or word in OTHER) and (b" " in data[:16] or b"\r\n" in data[:16])


def starts_response(data: bytes) -> bool:
    if data[:1] == bytes([BIN_RESPONSE]):
        return len(data) >= 24 and data[1] in OPCODES
    return _first_word(data) in REPLY_WORDS


def _binary(buf: bytes, is_request: bool) -> Frame | str:
    if len(buf) < 24:
        return NEED_MORE
    magic, opcode, keylen, extlen, _, status, body, opaque, _ = _BIN.unpack_from(buf)
    if magic != (BIN_REQUEST if is_request else BIN_RESPONSE) or keylen + extlen > body:
        return INVALID
    fields = {"binary": True, "command": OPCODES.get(opcode, f"0x{opcode:02x}"), "opaque": opaque}
    if is_request and keylen:
        fields["key"] = _key_text(buf[24 + extlen : 24 + extlen + keylen])
    if not is_request:
        fields["status"] = STATUSES.get(status, str(status))
    return Frame(24 + body, fields)


def frame_request(buf: bytes) -> Frame | str:
    if buf[:1] == bytes([BIN_REQUEST]):
        return _binary(buf, True)
    end = buf.find(b"\r\n")
    if end < 0:
        return NEED_MORE if len(buf) < MAX_LINE else INVALID
    words = buf[:end].split()
    if not words or not (words[0] in STORAGE or words[0] in OTHER):
        return INVALID
    command = words[0].decode()
    # Only the commands that take it are made one-way by `noreply` (a meta command by its q flag):
    # `get noreply` asks for a key named noreply, and is answered.
    last = words[-1] if len(words) > 1 else b""
    noreply = last == b"q" if command in META else last == b"noreply" and command not in RETRIEVAL
    fields = {"binary": False, "command": command, "noreply": noreply}
    if len(words) > 1 and command not in ("stats", "verbosity", "flush_all", "gat", "gats"):
        fields["key"] = _key_text(words[1])
    elif command in ("gat", "gats") and len(words) > 2:
        fields["key"] = _key_text(words[2])
    length = end + 2
    if words[0] in STORAGE:
        try:
            length += int(words[STORAGE[words[0]]]) + 2  # the data block and its CRLF
        except (IndexError, ValueError):
            return INVALID
    return Frame(length, fields)


def frame_response(buf: bytes) -> Frame | str:
    if buf[:1] == bytes([BIN_RESPONSE]):
        return _binary(buf, False)
    pos, values = 0, 0
    first = None
    while True:  # a reply is one line, or VALUE/STAT/VA blocks up to END (or the VA block alone)
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return NEED_MORE if len(buf) - pos < MAX_LINE else INVALID
        words = buf[pos:end].split()
        if not words or words[0] not in REPLY_WORDS:
            return INVALID
        first = first or words
        pos = end + 2
        if words[0] in (b"VALUE", b"VA"):
            try:
                pos += int(words[3] if words[0] == b"VALUE" else words[1]) + 2
            except (IndexError, ValueError):
                return INVALID
            values += 1
            if words[0] == b"VA":
                break
        elif words[0] != b"STAT":
            break
    word = first[0]
    fields = {"binary": False, "reply": word.decode(), "values": values}
    if word in ERRORS:
        fields["error"] = buf[: buf.find(b"\r\n")].decode("utf-8", "replace")
    return Frame(pos, fields)


def request_attributes(fields: dict) -> dict:
    attrs = {"db.system": "memcached", "db.operation.name": fields["command"]}
    if "key" in fields:
        attrs["db.memcached.key"] = fields["key"]
    return attrs


def reply_attributes(fields: dict) -> dict:
    attrs = {"db.response.status_code": fields["reply"], "db.memcached.values": fields["values"]}
    if "error" in fields:
        attrs["db.response.error"] = fields["error"]
    return attrs


def request_head_fields(head: bytes) -> dict | None:
    """Fields of a text command from its first bytes (its line whole in them; a storage
    command's data block may run past them)."""
    frame = frame_request(head)
    return frame.fields if frame.__class__ is Frame and not frame.fields["binary"] else None


def reply_head_fields(head: bytes, values: int) -> dict | None:
    """Fields of a text reply from its first bytes, its first line whole in them, with the
    number of VALUE blocks counted by whoever saw all of it."""
    end = head.find(b"\r\n")
    words = head[:end].split() if end >= 0 else None
    if not words or words[0] not in REPLY_WORDS:
        return None
    fields = {"binary": False, "reply": words[0].decode(), "values": values}
    if words[0] in ERRORS:
        fields["error"] = head[:end].decode("utf-8", "replace")
    return fields


def _reply_salvage(buf: bytes) -> dict | None:
    """A text reply whose rest was not captured (a value past the capture): its word, and the
    VALUE blocks whose lines were seen."""
    pos, values = 0, 0
    while (end := buf.find(b"\r\n", pos)) >= 0:
        words = buf[pos:end].split()
        if len(words) < 4 or words[0] != b"VALUE" or not words[3].isdigit():
            break
        values += 1
        pos = end + 2 + int(words[3]) + 2
    return reply_head_fields(buf, values) if buf[:1] != bytes([BIN_RESPONSE]) else None


class MemcachedConnection(FramedConnection):
    protocol = PROTOCOL

    def __init__(self) -> None:
        # Binary requests in the order sent: quiet ones not answered yet (opaque -> (order, request)),
        # and the order of the others, whose answer tells which quiet ones were passed over.
        self._quiet: dict[int, tuple[int, Message]] = {}
        self._order: dict[int, int] = {}
        self._sent = 0
        super().__init__(DirectionFramer(frame_request, starts_request),
                         DirectionFramer(frame_response, starts_response, salvage=_reply_salvage))  # fmt: skip

    def close(self, end_ns: int) -> list[Message]:
        return self._passed_over(None)

    def _request(self, f: Framed) -> Message | list[Message] | None:
        fields = f.fields
        command = fields["command"]
        attrs = request_attributes(fields)
        binary = fields["binary"]
        # `noreply` text commands, `quit` and QUITQ are never answered.
        one_way = fields.get("noreply", False) or command == "quit" or command in NEVER_ANSWERED
        head = f.head[: 24 + len(fields.get("key", ""))] if command in SASL else f.head  # no password in heads
        msg = message_from(f, PROTOCOL, True, name=f"memcached {command.lower()}", attributes=attrs, head=head,
                           pair_key=fields["opaque"] if binary else None, expects_response=not one_way)  # fmt: skip
        if not binary:
            return msg
        self._sent += 1
        if command not in QUIET:
            self._order[fields["opaque"]] = self._sent
            if len(self._order) > 4096:
                self._order.pop(next(iter(self._order)))
            return msg
        self._quiet[fields["opaque"]] = (self._sent, msg)
        if len(self._quiet) > 1024:  # bounded: the oldest is taken as passed over
            oldest = self._quiet.pop(next(iter(self._quiet)))[1]
            oldest.expects_response = False
            return oldest
        return None

    def _passed_over(self, before: int | None) -> list[Message]:
        """Quiet requests sent before the one the server has just answered (all of them at
        the end) that got no answer: they succeeded silently (or a GETQ missed)."""
        out = []
        for opaque, (order, msg) in list(self._quiet.items()):
            if before is not None and order > before:
                break
            del self._quiet[opaque]
            msg.expects_response = False
            out.append(msg)
        return out

    def _response(self, f: Framed) -> Message | list[Message]:
        fields = f.fields
        if fields["binary"]:
            code = fields["status"]
            attrs = {"db.response.status_code": code}
            msg = message_from(f, PROTOCOL, False, error=code not in _NOT_ERRORS, status_code=code,
                               pair_key=fields["opaque"], attributes=attrs, head=f.head)  # fmt: skip
            held = self._quiet.pop(fields["opaque"], None)
            if held is not None:
                return [held[1], msg]  # a quiet request answered: a hit, or a failure
            order = self._order.pop(fields["opaque"], None)
            return self._passed_over(order) + [msg] if order is not None and self._quiet else msg
        reply = fields["reply"]
        error = reply.encode() in ERRORS
        return message_from(f, PROTOCOL, False, error=error, status_code=reply, attributes=reply_attributes(fields),
                            head=f.head)  # fmt: skip
