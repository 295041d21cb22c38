"""MySQL / MariaDB client/server protocol, plain or compressed, from the handshake
or joined mid-connection.

Packets (3-byte length, sequence id) are framed one by one, so a large row is
skipped through holes by its length. In the command phase a client packet with
sequence id 0 starts a command (COM_QUERY, COM_STMT_PREPARE with the statement
text, COM_STMT_EXECUTE named after the prepared text, ...); the server's packets
up to the end of its reply are the response: OK or ERR (code, SQLSTATE,
message), or result sets (column count, definitions, rows, terminator) whose rows
are counted. The connection handshake (and its credentials) is skipped.

Joined mid-connection, what the handshake would have said is read from the bytes:
a command is a packet with sequence id 0 and a known command byte; whether column
definitions end with an EOF packet (no CLIENT_DEPRECATE_EOF) shows in the packet
after them (an EOF is 5 bytes, an OK-as-terminator at least 7); query attributes
(CLIENT_QUERY_ATTRIBUTES) show as a count before the text; and the compressed
protocol (CLIENT_COMPRESS) as its 7-byte header (compressed length, sequence,
uncompressed length) around whole packets or a zlib stream. Compressed packets are
inflated with a cap on the output and their packets framed as a stream of their own.
"""

from __future__ import annotations

import zlib

from deeptrace.protocols import sql
from deeptrace.protocols.base import CONNECTION_SETUP, Chunk, Message, message_from, message_from_parts
from deeptrace.protocols.framing import (
    HEAD_BYTES,
    INVALID,
    NEED_MORE,
    DirectionFramer,
    Frame,
    Framed,
    FramedConnection,
)

PROTOCOL = "mysql"
COM_QUIT, COM_INIT_DB, COM_QUERY, COM_FIELD_LIST, COM_STATISTICS = 0x01, 0x02, 0x03, 0x04, 0x09
COM_PING, COM_CHANGE_USER, COM_SET_OPTION, COM_DEBUG = 0x0E, 0x11, 0x1B, 0x0D
COM_STMT_PREPARE, COM_STMT_EXECUTE, COM_STMT_SEND_LONG_DATA, COM_STMT_CLOSE = 0x16, 0x17, 0x18, 0x19
COM_STMT_RESET, COM_STMT_FETCH = 0x1A, 0x1C
COMMANDS = {0x01: "QUIT", 0x02: "INIT_DB", 0x03: "QUERY", 0x04: "FIELD_LIST", 0x05: "CREATE_DB", 0x06: "DROP_DB",
            0x07: "REFRESH", 0x09: "STATISTICS", 0x0A: "PROCESS_INFO", 0x0C: "PROCESS_KILL", 0x0D: "DEBUG",
            0x0E: "PING", 0x11: "CHANGE_USER", 0x16: "STMT_PREPARE", 0x17: "STMT_EXECUTE",
            0x18: "STMT_SEND_LONG_DATA", 0x19: "STMT_CLOSE", 0x1A: "STMT_RESET", 0x1B: "SET_OPTION",
            0x1C: "STMT_FETCH", 0x1F: "RESET_CONNECTION"}  # fmt: skip
NO_REPLY = (COM_QUIT, COM_STMT_SEND_LONG_DATA, COM_STMT_CLOSE)
# Commands that carry SQL text, and commands of a fixed, small size (length of the payload).
_TEXT_COMMANDS = (COM_QUERY, COM_STMT_PREPARE)
_FIXED = {0x01: 1, 0x09: 1, 0x0E: 1, 0x1F: 1, 0x0D: 1, 0x0A: 1, 0x19: 5, 0x1A: 5, 0x1C: 9, 0x1B: 3, 0x0C: 5}
MAX_PAYLOAD = 0xFFFFFF
READ_BYTES = 2048  # of a packet, enough for the fields we read
CLIENT_COMPRESS, CLIENT_SSL = 0x20, 0x800
CLIENT_DEPRECATE_EOF, CLIENT_QUERY_ATTRIBUTES = 1 << 24, 1 << 27
MORE_RESULTS, CURSOR_EXISTS = 0x0008, 0x0040  # server status flags
# Compressed protocol: a compressed packet is framed whole up to this size before it is read
# (a larger one is read from what is here); its inflated bytes are capped at INFLATE_MAX.
COMPRESSED_READ = 64 << 10
INFLATE_MAX = 256 << 10


def frame(buf: bytes) -> Frame | str:
    if len(buf) < 4:
        return NEED_MORE
    length = int.from_bytes(buf[:3], "little")
    if length == 0 and buf[3] != 0:
        return INVALID
    if len(buf) < min(4 + length, 4 + READ_BYTES, 5):
        return NEED_MORE
    return Frame(4 + length, {"seq": buf[3], "length": length, "payload": buf[4 : 4 + min(length, READ_BYTES)]})


def frame_compressed(buf: bytes) -> Frame | str:
    """A compressed packet: its header and (up to COMPRESSED_READ) its compressed bytes."""
    if len(buf) < 7:
        return NEED_MORE
    clen, ulen = int.from_bytes(buf[:3], "little"), int.from_bytes(buf[4:7], "little")
    if clen == 0:
        return INVALID
    if len(buf) < min(7 + clen, COMPRESSED_READ):
        return NEED_MORE  # inflating wants the whole packet: wait for it, as far as is sensible
    return Frame(7 + clen, {"z": True, "clen": clen, "ulen": ulen, "payload": buf[7 : 7 + clen]})


def _salvage_compressed(buf: bytes) -> dict | None:
    """A compressed packet cut by bytes never captured: inflate what there is of it."""
    if len(buf) < 8:
        return None
    clen, ulen = int.from_bytes(buf[:3], "little"), int.from_bytes(buf[4:7], "little")
    return {"z": True, "clen": clen, "ulen": ulen, "payload": buf[7 : 7 + clen]} if clen else None


def _chains(data: bytes) -> bool:
    """Whether data is whole packets end to end."""
    pos = 0
    while pos + 4 <= len(data):
        pos += 4 + int.from_bytes(data[pos : pos + 3], "little")
    return pos == len(data)


def _inflate(payload: bytes, limit: int) -> bytes:
    try:
        return zlib.decompressobj().decompress(payload, limit)
    except zlib.error:
        return b""


def _is_command(packet: bytes) -> bool:
    return len(packet) >= 5 and packet[3] == 0 and packet[4] in COMMANDS


def looks_compressed(data: bytes, is_request: bool) -> bool:
    """Whether data starts with a compressed packet (a request: holding a command)."""
    if len(data) < 11:
        return False
    clen, ulen = int.from_bytes(data[:3], "little"), int.from_bytes(data[4:7], "little")
    if ulen == 0:  # stored as is (clients do so under 50 bytes): whole packets inside, end to end
        inner = data[7 : 7 + clen]
        return len(inner) == clen > 4 and _chains(inner) and (not is_request or _is_command(inner))
    if data[7] != 0x78 or (data[7] << 8 | data[8]) % 31 or ulen < 4:  # a zlib stream's header
        return False
    head = _inflate(data[7 : 7 + clen], 16)
    return len(head) >= 4 and 4 + int.from_bytes(head[:3], "little") <= ulen and (not is_request or _is_command(head))


def _plain_command(data: bytes) -> bool:
    """A command packet: sequence 0, a known command, and the shape that command has."""
    if len(data) < 5 or data[3] != 0 or data[4] not in COMMANDS:
        return False
    length, command = int.from_bytes(data[:3], "little"), data[4]
    # Joined mid-connection a first chunk decides the protocol: the packet must be whole in it
    # unless it is longer than a capture would keep.
    if 4 + length > len(data) and len(data) < 512:
        return False
    if command in _TEXT_COMMANDS:
        start = _text_start(data[4 : 4 + min(length, 256)], None)
        return 1 < length and start is not None and data[4 + start : 5 + start].isalpha()
    if command == COM_INIT_DB:
        name = data[5 : 4 + length]
        return 1 < length < 256 and all(0x20 < c < 0x7F for c in name)
    if command in _FIXED:
        return length == _FIXED[command]
    return length >= 5  # statement commands: a 4-byte id first (an execute, then its parameters)


def starts_request(data: bytes) -> bool:
    return _plain_command(data) or looks_compressed(data, True)


def starts_response(data: bytes) -> bool:
    """The server's greeting: protocol version 10 and a version string."""
    return len(data) >= 6 and data[3] == 0 and data[4] == 10 and data[5:6].isdigit()


def _lenenc(buf: bytes, pos: int) -> tuple[int, int]:
    first = buf[pos] if pos < len(buf) else 0
    if first < 0xFB:
        return first, pos + 1
    width = {0xFC: 2, 0xFD: 3, 0xFE: 8}.get(first, 0)
    return int.from_bytes(buf[pos + 1 : pos + 1 + width], "little"), pos + 1 + width


# Binary protocol values (query attributes): fixed widths by type; the rest are length-prefixed.
_FIXED_WIDTH = {0x01: 1, 0x02: 2, 0x03: 4, 0x04: 4, 0x05: 8, 0x08: 8, 0x09: 4, 0x0D: 2}
_DATE_TYPES = frozenset((0x07, 0x0A, 0x0B, 0x0C))  # one length byte, then that many


def _text_start(payload: bytes, attributes: bool | None) -> int | None:
    """Where the SQL text of a COM_QUERY / COM_STMT_PREPARE payload starts, past query
    attributes (CLIENT_QUERY_ATTRIBUTES: a count, a set count of 1, then typed values).
    attributes None: not known, so the bytes tell (no SQL starts with a control byte)."""
    if payload[0] != COM_QUERY or len(payload) < 3:
        return 1
    if attributes is False or (attributes is None and (payload[1] >= 0x20 or payload[1] in b"\t\n\r")):
        return 1
    count, pos = _lenenc(payload, 1)
    sets, pos = _lenenc(payload, pos)
    if sets != 1 or count > 64:
        return None if attributes is None else 1
    if count == 0:
        return pos
    nulls = payload[pos : pos + (count + 7) // 8]
    pos += (count + 7) // 8
    if payload[pos : pos + 1] != b"\x01":  # the new-params-bound flag: types and names follow
        return None
    pos += 1
    types = []
    for _ in range(count):
        types.append(payload[pos] if pos < len(payload) else 0)
        name_len, pos = _lenenc(payload, pos + 2)
        pos += name_len
    for i, kind in enumerate(types):
        if i // 8 < len(nulls) and nulls[i // 8] >> (i % 8) & 1:
            continue  # NULL: no value
        if kind in _FIXED_WIDTH:
            pos += _FIXED_WIDTH[kind]
        elif kind in _DATE_TYPES:
            pos += 1 + (payload[pos] if pos < len(payload) else 0)
        else:
            value_len, pos = _lenenc(payload, pos)
            pos += value_len
    return pos if pos < len(payload) else None


def _greeting_capabilities(payload: bytes) -> int | None:
    """Capability flags of the server's greeting (protocol 10)."""
    end = payload.find(b"\0", 1)
    pos = end + 1 + 4 + 8 + 1  # version string, thread id, auth data part 1, filler
    if end < 0 or len(payload) < pos + 7:
        return None
    return int.from_bytes(payload[pos : pos + 2], "little") | int.from_bytes(payload[pos + 5 : pos + 7], "little") << 16


def _is_eof(payload: bytes) -> bool:
    """An EOF packet (5 bytes); an OK packet with the 0xFE header, as CLIENT_DEPRECATE_EOF
    ends rows with, is 7 bytes or more."""
    return payload[:1] == b"\xfe" and len(payload) < 7


def _terminator_status(payload: bytes) -> int:
    """Server status flags of an EOF, or of an OK (0x00 or 0xFE header)."""
    if _is_eof(payload):
        return int.from_bytes(payload[3:5], "little")
    pos = _lenenc(payload, _lenenc(payload, 1)[1])[1]  # past affected rows and last insert id
    return int.from_bytes(payload[pos : pos + 2], "little")


class _Reply:
    """Where the server is in its reply to one command."""

    __slots__ = ("blocks", "command", "left", "packets", "phase", "rows")

    def __init__(self, command: int) -> None:
        self.command = command
        self.packets: list[Framed] = []
        self.phase = "first"
        self.left = 0  # definitions still due in the current block
        self.blocks: list[int] = []  # prepare: definition blocks still to come (columns)
        self.rows = 0


class MysqlConnection(FramedConnection):
    protocol = PROTOCOL

    def __init__(self) -> None:
        self._command_phase = False  # until the server's OK after the handshake
        self._server_caps: int | None = None
        self._client_caps: int | None = None
        self.tls = False
        # What the handshake agreed, or (joined mid-connection) None until the bytes show it.
        self._deprecate_eof: bool | None = None
        self._query_attributes: bool | None = None
        self._compress: bool | None = None
        self._pending: list[int] = []  # commands awaiting a reply, oldest first
        self._statements: dict[int, str] = {}  # statement id -> text
        self._prepare_text: list[str] = []  # texts of STMT_PREPAREs awaiting their OK
        self._reply: _Reply | None = None
        self._eof_may_follow = -1  # seq of a prepare reply's last packet, if an EOF may still follow it
        # Compressed protocol: per side, the packets inside compressed ones, framed as a stream,
        # and the wire bytes of compressed packets not yet given to a packet.
        self._inner: dict[bool, DirectionFramer] = {}
        self._carry: dict[bool, tuple[int, int | None]] = {True: (0, None), False: (0, None)}
        super().__init__(self._outer_framer(True), self._outer_framer(False))

    def _outer_framer(self, is_request: bool) -> DirectionFramer:
        return DirectionFramer(lambda buf: self._frame_outer(buf, is_request),
                               lambda data: self._starts_outer(data, is_request),
                               lambda buf: _salvage_compressed(buf) if self._compress else None)  # fmt: skip

    def _frame_outer(self, buf: bytes, is_request: bool) -> Frame | str:
        if self._compress is None and is_request and self._server_caps is None:
            if looks_compressed(buf, True):
                self._compress = True
                # Replies framed as plain packets so far may have left that side out of step.
                self._responses = self._outer_framer(False)
            elif not _plain_command(buf) and len(buf) < 7 + int.from_bytes(buf[:3], "little") and len(buf) < 64:
                # Servers read a compressed packet's 7-byte header first, then the rest: wait for
                # the rest before the bytes decide between plain and compressed.
                return NEED_MORE
        return frame_compressed(buf) if self._compress else frame(buf)

    def _starts_outer(self, data: bytes, is_request: bool) -> bool:
        if self._compress:
            # A compressed packet, or its 7-byte header alone (servers read that first).
            clen, ulen = int.from_bytes(data[:3], "little"), int.from_bytes(data[4:7], "little")
            return looks_compressed(data, is_request) or (len(data) == 7 and clen > 0 and (ulen == 0 or ulen >= 4))
        return starts_request(data) if is_request else len(data) >= 5 and data[3] != 0

    def feed(self, is_request: bool, chunk: Chunk) -> list[Message]:
        return [] if self.tls else super().feed(is_request, chunk)

    def decrypted(self) -> None:
        self.tls = False

    def close(self, end_ns: int) -> list[Message]:
        """The connection closed (or the capture ended) in a reply: what came of it is its response."""
        if self._reply is None or not self._reply.packets:
            return []
        reply, self._reply = self._reply, None
        self._pending.pop(0)
        msg = self._reply_message(reply)
        msg.partial = True
        return [msg]

    # ---- compressed packets ----

    def _request(self, f: Framed) -> Message | list[Message] | None:
        return self._unwrap(True, f) if "z" in f.fields else self._plain_request(f)

    def _response(self, f: Framed) -> Message | list[Message] | None:
        return self._unwrap(False, f) if "z" in f.fields else self._plain_response(f)

    def _unwrap(self, is_request: bool, f: Framed) -> list[Message]:
        """Inflate a compressed packet and handle the packets it completes."""
        fields = f.fields
        clen, ulen, payload = fields["clen"], fields["ulen"], fields["payload"]
        total = ulen or clen
        data = payload if ulen == 0 else _inflate(payload, min(ulen, INFLATE_MAX))
        inner = self._inner.get(is_request)
        if inner is None:
            starts = _plain_command if is_request else (lambda d: len(d) >= 5 and d[3] != 0)
            inner = self._inner[is_request] = DirectionFramer(frame, starts)
        # The inner stream's times and threads are the compressed packet's; bytes not inflated
        # (cut by the capture, or past the cap) are a hole in it.
        packets = inner.feed(Chunk(data[:total], total, f.start_ns, f.end_ns, f.tid_end))
        # Wire sizes and TCP sequence: each compressed packet's go to the first packet it
        # completes, so a message's size is the compressed bytes that carried it.
        size, seq = self._carry[is_request]
        size, seq = size + f.size, f.seq_start if seq is None else seq
        out: list[Message] = []
        for i, p in enumerate(packets):
            p.partial = p.partial or f.partial
            if i == 0:
                p.size, p.seq_start = size, seq
            else:
                p.size = 0
                p.seq_start = None if f.seq_start is None else (f.seq_start + f.size) & 0xFFFFFFFF
            got = self._plain_request(p) if is_request else self._plain_response(p)
            if got.__class__ is list:
                out += got
            elif got is not None:
                out.append(got)
        self._carry[is_request] = (size, seq) if not packets else (0, None)
        return out

    # ---- client ----

    def _responses_lost(self) -> bool:
        inner = self._inner.get(False)
        return not self._responses.in_step or (inner is not None and not inner.in_step)

    def _plain_request(self, f: Framed) -> Message | list[Message] | None:
        msg = self._command(f)
        if msg is not None and self._reply is not None and self._responses_lost():
            # The reply in progress lost its end in bytes never captured (a row longer than
            # the capture, then the terminator): the next command says it is over.
            reply, self._reply = self._reply, None
            self._pending.pop(0)
            return [self._reply_message(reply), msg] if reply.packets else msg
        return msg

    def _command(self, f: Framed) -> Message | None:
        payload = f.fields["payload"]
        if not payload:
            return None
        if not self._command_phase:
            if f.fields["seq"] == 1 and self._server_caps is not None and len(payload) >= 4:
                self._handshake_response(payload)
                return None
            if f.fields["seq"] != 0 or payload[0] not in COMMANDS or self._server_caps is not None:
                return None
            self._command_phase = True  # joined mid-connection: a command is a command
            if self._compress is None:
                self._compress = False
        if f.fields["seq"] != 0:
            return None  # continuation of a large command
        command = payload[0]
        name = COMMANDS.get(command, f"0x{command:02x}")
        attrs = {"db.system": "mysql", "db.operation.name": name}
        text = ""
        head = f.head
        if command in _TEXT_COMMANDS:
            start = _text_start(payload, self._query_attributes)
            text = payload[start or 1 :].decode("utf-8", "replace")
            attrs["db.query.text"] = text[:1024]
        elif command == COM_STMT_EXECUTE and len(payload) >= 5:
            stmt = int.from_bytes(payload[1:5], "little")
            text = self._statements.get(stmt, "")
            attrs["db.mysql.statement_id"] = stmt
            if text:
                attrs["db.query.text"] = text[:1024]
        elif command == COM_INIT_DB:
            attrs["db.namespace"] = payload[1:].decode("utf-8", "replace")
        elif command == COM_CHANGE_USER:
            head = head[:5]  # user name and authentication data: not for anyone to read
        if command == COM_STMT_PREPARE:
            self._prepare_text.append(text)
            span_name = f"PREPARE {sql.name(text)}"
            attrs[CONNECTION_SETUP] = True  # a driver prepares a statement right before it executes it
        elif text:
            span_name = sql.name(text)
        elif command == COM_STMT_EXECUTE and "db.mysql.statement_id" in attrs:
            span_name = f"EXECUTE stmt {attrs['db.mysql.statement_id']}"  # prepared before we joined
        elif command == COM_INIT_DB:
            span_name = f"USE {attrs['db.namespace']}"
        else:
            span_name = f"mysql {name}"
        if command not in NO_REPLY:
            self._pending.append(command)
        return message_from(f, PROTOCOL, True, name=span_name, attributes=attrs, head=head,
                            expects_response=command not in NO_REPLY)  # fmt: skip

    def _handshake_response(self, payload: bytes) -> None:
        caps = int.from_bytes(payload[:4], "little") & self._server_caps
        self._client_caps = caps
        self._deprecate_eof = bool(caps & CLIENT_DEPRECATE_EOF)
        self._query_attributes = bool(caps & CLIENT_QUERY_ATTRIBUTES)
        if caps & CLIENT_SSL and len(payload) == 32:
            self.tls = True  # an SSL request: TLS from here on, nothing for us to read

    # ---- server ----

    def _plain_response(self, f: Framed) -> Message | None:
        payload = f.fields["payload"]
        if not payload:
            return None
        if not self._command_phase:
            if f.fields["seq"] == 0 and payload[:1] == b"\x0a":
                self._server_caps = _greeting_capabilities(payload) or 0
            elif self._server_caps is not None and payload[:1] == b"\x00":
                self._command_phase = True  # authentication succeeded
                # Compression begins after it, if both sides asked for it.
                self._compress = bool((self._client_caps or 0) & CLIENT_COMPRESS)
            return None
        if self._eof_may_follow >= 0:
            after = self._eof_may_follow
            self._eof_may_follow = -1
            if _is_eof(payload) and f.fields["seq"] == (after + 1) & 0xFF:
                self._deprecate_eof = False  # the EOF closing a prepare reply we ended at its last definition
                return None
        if not self._pending:
            return None
        reply = self._reply
        if reply is None:
            reply = self._reply = _Reply(self._pending[0])
            if reply.command == COM_STMT_FETCH:
                reply.phase = "rows"  # binary rows straight away (they start with 0x00), then EOF
        reply.packets.append(f)
        if not self._advance(reply, payload, f.fields["seq"]):
            return None
        self._reply = None
        self._pending.pop(0)
        return self._reply_message(reply)

    def _advance(self, reply: _Reply, payload: bytes, seq: int) -> bool:
        """Take one more packet of the reply; whether it ends it."""
        phase = reply.phase
        head = payload[0]
        if phase == "first":
            command = reply.command
            if head == 0xFF:
                return True  # ERR
            if command == COM_STMT_PREPARE and head == 0x00 and len(payload) >= 9:  # STMT_PREPARE_OK
                stmt = int.from_bytes(payload[1:5], "little")
                columns, params = int.from_bytes(payload[5:7], "little"), int.from_bytes(payload[7:9], "little")
                if self._prepare_text:
                    self._statements[stmt] = self._prepare_text.pop(0)
                    if len(self._statements) > 1024:
                        self._statements.pop(next(iter(self._statements)))
                reply.blocks = [n for n in (params, columns) if n]
                return self._next_block(reply)
            if head == 0x00 or (head == 0xFE and command != COM_FIELD_LIST):
                # OK (EOF for SET_OPTION, DEBUG, an auth switch): more results may follow.
                return not _terminator_status(payload) & MORE_RESULTS
            if command == COM_STATISTICS:
                return True  # one string
            if command == COM_FIELD_LIST:
                reply.phase = "fields"  # definitions up to EOF, without a count first
                return False
            if head == 0xFB:
                return False  # LOCAL INFILE: the client sends the file, then the server's OK ends it
            reply.phase, reply.left = "columns", _lenenc(payload, 0)[0]
            return False
        if phase == "fields":
            return head in (0xFE, 0xFF)  # EOF (or OK with 0xFE header), or ERR: a definition starts "def"
        if phase == "columns":
            reply.left -= 1
            if reply.left <= 0:
                reply.phase = "after-columns"
            return False
        if phase == "after-columns":
            reply.phase = "rows"
            if head == 0xFF:
                return True
            if _is_eof(payload) and self._deprecate_eof is not True:
                self._deprecate_eof = False
                # A cursor was opened (COM_STMT_EXECUTE): rows come by COM_STMT_FETCH.
                return bool(_terminator_status(payload) & CURSOR_EXISTS)
            if self._deprecate_eof is None:
                self._deprecate_eof = True  # a row, or the terminator, straight after the definitions
        if phase == "prepare":
            if reply.left == 0:  # a block is all here: its EOF, or the next block's first definition
                if _is_eof(payload):
                    self._deprecate_eof = False
                    return self._next_block(reply)
                self._deprecate_eof = True
                if self._next_block(reply):
                    return True
            reply.left -= 1
            if reply.left > 0 or self._deprecate_eof is False:
                return False  # more definitions, or the block's EOF, to come
            if self._deprecate_eof is None:
                if reply.blocks:
                    return False  # the next packet tells: an EOF, or the next block
                self._eof_may_follow = seq  # ended at a definition: an EOF may yet close it
                return True
            return self._next_block(reply)
        # Rows until the terminator: EOF, or an OK with the 0xFE header (a row would need a
        # first value of 16 MiB to start with 0xFE), or an error.
        if head == 0xFF:
            return True
        if head == 0xFE and len(payload) < MAX_PAYLOAD:
            if _terminator_status(payload) & MORE_RESULTS:
                reply.phase = "first"
                return False
            return True
        reply.rows += 1
        return False

    @staticmethod
    def _next_block(reply: _Reply) -> bool:
        """Prepare replies: start the next block of definitions (parameters, columns), or end."""
        if reply.blocks:
            reply.phase, reply.left = "prepare", reply.blocks.pop(0)
            return False
        return True

    @staticmethod
    def _reply_message(reply: _Reply) -> Message:
        packets = reply.packets
        first = packets[0].fields["payload"]
        attrs: dict = {}
        code = None
        err = next((p.fields["payload"] for p in packets if p.fields["payload"][:1] == b"\xff"), None)
        if err is not None:
            state = err[4:9].decode("latin-1") if err[3:4] == b"#" else ""
            code = str(int.from_bytes(err[1:3], "little"))
            attrs.update({"db.response.status_code": code, "db.mysql.sqlstate": state,
                          "db.response.error": (err[9:] if state else err[3:]).decode("utf-8", "replace")})  # fmt: skip
        elif first[:1] == b"\x00" and reply.command != COM_STMT_PREPARE:
            attrs["db.response.affected_rows"] = _lenenc(first, 1)[0]
        elif reply.command not in (COM_STMT_PREPARE, COM_FIELD_LIST, COM_STATISTICS):
            attrs["db.response.returned_rows"] = reply.rows
        # Its head is its packets' in order (a count alone says nothing): the first rows are in it.
        head = b"".join(p.head for p in packets[:8])[:HEAD_BYTES] if len(packets) > 1 else packets[0].head
        return message_from_parts(packets, PROTOCOL, False, error=err is not None, status_code=code,
                                  attributes=attrs, head=head)  # fmt: skip
