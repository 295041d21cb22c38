"""PostgreSQL frontend/backend protocol 3.0.

Wire messages are framed one by one (type byte + length, so a large result is
skipped through holes by its lengths) and grouped into exchanges: a simple query
('Q') or an extended-query batch up to Sync ('S') is one request; everything the
server sends up to ReadyForQuery ('Z') is its response. The startup (and its
authentication, passwords included) is skipped; after an accepted SSLRequest the
connection is TLS and is left alone.
"""

from __future__ import annotations

import struct

from deeptrace.protocols import sql
from deeptrace.protocols.base import CONNECTION_SETUP, Chunk, Message, message_from_parts
from deeptrace.protocols.framing import (
    HEAD_BYTES,
    INVALID,
    NEED_MORE,
    DirectionFramer,
    Frame,
    Framed,
    FramedConnection,
)

PROTOCOL = "postgresql"
PROTOCOL_3 = 196608
SSL_REQUEST, CANCEL_REQUEST, GSSENC_REQUEST = 80877103, 80877102, 80877104
FRONTEND_TYPES = frozenset(b"QPBEXSDCHFdcfp")
BACKEND_TYPES = frozenset(b"RSKZTDCEIN1235ntsAGHWVcdfv")
MAX_MESSAGE = 1 << 30
_READ_BODY = frozenset(b"QPBCE")  # query, parse, bind, command complete, error
_I32 = struct.Struct("!i")


def _startup_code(data: bytes) -> int | None:
    if len(data) < 8:
        return None
    length, code = struct.unpack_from("!ii", data)
    return code if 8 <= length <= 10_000 and code in (PROTOCOL_3, SSL_REQUEST, CANCEL_REQUEST, GSSENC_REQUEST) else None


def _ends_in_sync(data: bytes) -> bool:
    """Whether data is frontend messages end to end, the last a Sync: an extended-query batch
    (Bind, Execute, Sync) as a connection joined mid-way sees it, with no Parse or Query first."""
    pos = 0
    while pos + 5 <= len(data) and data[pos] in FRONTEND_TYPES:
        length = _I32.unpack_from(data, pos + 1)[0]
        if not 4 <= length < MAX_MESSAGE:
            return False
        if data[pos] == ord("S"):
            return length == 4 and pos + 5 == len(data) and pos > 0
        pos += 1 + length
    return False


def starts_request(data: bytes) -> bool:
    if _startup_code(data) is not None:
        return True
    if data[:1] in (b"B", b"D", b"E") and _ends_in_sync(data):
        return True
    if len(data) < 6 or data[0] not in b"QP":
        return False
    length = _I32.unpack_from(data, 1)[0]
    text = data[5:64] if data[0] == ord("Q") else data[5:64].split(b"\0", 1)[-1]
    return 4 < length < MAX_MESSAGE and text[:1].isalpha() and text[:16].isascii()


def _typed(buf: bytes, types: frozenset) -> Frame | str:
    if len(buf) < 5:
        return NEED_MORE
    if buf[0] not in types:
        return INVALID
    length = _I32.unpack_from(buf, 1)[0]
    if not 4 <= length < MAX_MESSAGE:
        return INVALID
    # Short messages whose fields we read wait to be whole. The rest (rows above all, and a
    # Query or Bind longer than we read) are framed from what is here, so a large one is
    # skipped by its length even when most of it was never captured.
    if buf[0] in _READ_BODY and 1 + length <= 1024 and len(buf) < 1 + length:
        return NEED_MORE
    return Frame(1 + length, {"type": chr(buf[0]), "body": buf[5 : min(1 + length, 1024)]})


def _salvage_frontend(buf: bytes) -> dict | None:
    """A message whose body we waited for, cut by bytes never captured (the capture ends
    inside a large Bind or Query): its start is still worth reading."""
    if len(buf) < 5 or buf[0] not in FRONTEND_TYPES or not 4 <= _I32.unpack_from(buf, 1)[0] < MAX_MESSAGE:
        return None
    return {"type": chr(buf[0]), "body": buf[5:1024]}


def _cstrings(body: bytes, n: int) -> list[str]:
    parts = body.split(b"\0", n)
    return [p.decode("utf-8", "replace") for p in parts[:n]]


def _error_fields(body: bytes) -> dict[str, str]:
    out = {}
    for field in body.split(b"\0"):
        if field:
            out[chr(field[0])] = field[1:].decode("utf-8", "replace")
    return out


class PostgresConnection(FramedConnection):
    protocol = PROTOCOL

    def __init__(self) -> None:
        self._startup = True  # the frontend's next message has no type byte
        self._ssl_answer_due = False  # the backend's next message is the one-byte SSL answer
        self._server_ready = False  # the backend has finished startup (first ReadyForQuery)
        self.tls = False
        self._statements: dict[str, str] = {}  # prepared statement name -> query text
        self._batch: list[Framed] = []  # frontend messages of an extended query, up to Sync
        self._reply: list[Framed] = []  # backend messages of the current response, up to ReadyForQuery
        super().__init__(DirectionFramer(self._frame_frontend, starts_request, _salvage_frontend),
                         DirectionFramer(self._frame_backend, lambda data: bool(data) and data[0] in BACKEND_TYPES))

    # ---- framing (one wire message at a time) ----

    def _frame_frontend(self, buf: bytes) -> Frame | str:
        if self._startup:
            if len(buf) < 8:
                return NEED_MORE
            code = _startup_code(buf)
            if code is None:
                # Joined mid-connection: typed messages from here, and the backend's startup
                # is long over (its next ReadyForQuery ends a reply, not the startup).
                self._startup = False
                self._server_ready = True
                return _typed(buf, FRONTEND_TYPES)
            return Frame(_I32.unpack_from(buf)[0], {"type": "startup", "code": code})
        return _typed(buf, FRONTEND_TYPES)

    def _frame_backend(self, buf: bytes) -> Frame | str:
        if self._ssl_answer_due:
            return Frame(1, {"type": "ssl-answer", "accepted": buf[:1] == b"S"})
        return _typed(buf, BACKEND_TYPES)

    # ---- grouping into exchanges ----

    def feed(self, is_request: bool, chunk: Chunk) -> list[Message]:
        return [] if self.tls else super().feed(is_request, chunk)

    def decrypted(self) -> None:
        self.tls = False

    def close(self, end_ns: int) -> list[Message]:
        """The connection closed, or the capture or the agent stopped, inside a reply whose
        ReadyForQuery never came: what came of it (rows, an ErrorResponse) is its response."""
        if not self._reply or self.tls:
            return []
        reply, self._reply = self._reply, []
        msg = self._reply_message(reply)
        msg.partial = True
        return [msg]

    def _request(self, f: Framed) -> Message | list[Message] | None:
        msg = self._request_part(f)
        if self._reply and not self._responses.in_step and f.fields["type"] in "QPBS":
            # The reply in progress lost its end in bytes never captured (a row longer than
            # the capture, then its ReadyForQuery): the next request says it is over.
            reply, self._reply = self._reply, []
            return [self._reply_message(reply)] + ([msg] if msg is not None else [])
        return msg

    def _request_part(self, f: Framed) -> Message | None:
        kind = f.fields["type"]
        if kind == "startup":
            if f.fields["code"] == SSL_REQUEST or f.fields["code"] == GSSENC_REQUEST:
                self._ssl_answer_due = True
            elif f.fields["code"] == PROTOCOL_3:
                self._startup = False
            return None
        body = f.fields["body"]
        if kind == "Q":
            return self._query([f], _cstrings(body, 1)[0], "simple")
        if kind in "PBEDCHF":
            if kind == "P":
                name, query = (_cstrings(body, 2) + ["", ""])[:2]
                self._statements[name] = query
                if len(self._statements) > 1024:
                    self._statements.pop(next(iter(self._statements)))
            self._batch.append(f)
            return None
        if kind == "S":
            self._batch.append(f)
            return self._end_batch()
        return None  # password, terminate, copy data: not requests of their own

    def _end_batch(self) -> Message:
        batch, self._batch = self._batch, []
        query, statement = self._batch_query(batch)
        # A Bind runs the statement too when the Execute after it was never captured.
        mode = "extended" if any(b.fields["type"] in "EB" for b in batch) else "prepare"  # Parse/Describe alone
        return self._query(batch, query, mode, statement)

    def _batch_query(self, batch: list[Framed]) -> tuple[str, str]:
        """The batch's SQL text, and the name of the prepared statement it binds (if any)."""
        for f in batch:
            if f.fields["type"] == "P":
                return (_cstrings(f.fields["body"], 2)[1] if b"\0" in f.fields["body"] else ""), ""
            if f.fields["type"] == "B":
                parts = _cstrings(f.fields["body"], 2)
                if len(parts) == 2:
                    return self._statements.get(parts[1], ""), parts[1]
        return "", ""

    def _query(self, parts: list[Framed], query: str, mode: str, statement: str = "") -> Message:
        attrs = {"db.system": "postgresql", "db.operation.name": sql.operation(query) or "SQL",
                 "db.query.text": query[:1024], "db.postgresql.protocol": mode}  # fmt: skip
        if statement:
            attrs["db.postgresql.statement"] = statement
        if mode == "prepare":  # a driver prepares a statement right before it executes it
            attrs[CONNECTION_SETUP] = True
        if not query and statement:
            name = f"EXECUTE {statement}"  # prepared before we joined the connection: its text was never seen
        else:
            name = sql.name(query)
        return _grouped(parts, True, name=f"PREPARE {name}" if mode == "prepare" else name, attributes=attrs)

    def _response(self, f: Framed) -> Message | None:
        kind = f.fields["type"]
        if kind == "ssl-answer":
            self._ssl_answer_due = False
            self.tls = f.fields["accepted"]
            return None
        if not self._server_ready:
            self._server_ready = kind == "Z"  # authentication and parameters: not an exchange
            return None
        if kind in "NAS" and not self._reply:
            return None  # notices, notifications, parameter changes arrive on their own
        self._reply.append(f)
        if len(self._reply) == 1 and self._batch and not self._requests.in_step and kind != "Z":
            # A reply has begun to a batch whose Sync we never saw: it was past the captured
            # bytes of the write (a Bind with large parameters). The reply ends the batch.
            return self._end_batch()
        if kind != "Z":
            return None
        reply, self._reply = self._reply, []
        return self._reply_message(reply)

    @staticmethod
    def _reply_message(reply: list[Framed]) -> Message:
        attrs: dict = {}
        error = None
        rows = 0
        for f in reply:
            kind, body = f.fields["type"], f.fields["body"]
            if kind == "E" and error is None:
                error = _error_fields(body)
            elif kind == "C":
                attrs["db.response.tag"] = _cstrings(body, 1)[0]
            elif kind == "D":
                rows += 1
        attrs["db.response.returned_rows"] = rows
        if error is not None:
            attrs["db.response.status_code"] = error.get("C", "")
            attrs["db.response.error"] = error.get("M", "")
            return _grouped(reply, False, error=True, status_code=error.get("C", "ERROR"), attributes=attrs)
        return _grouped(reply, False, attributes=attrs)


def _grouped(parts: list[Framed], is_request: bool, **kw) -> Message:
    """One message of several wire messages (Parse, Bind, Execute; or ParseComplete,
    RowDescription, DataRows): its head is theirs, in order, up to HEAD_BYTES, so that a
    Bind's parameters and a reply's first rows are in it, not the Parse alone."""
    head = b"".join(p.head for p in parts)[:HEAD_BYTES]
    return message_from_parts(parts, PROTOCOL, is_request, head=head, **kw)
