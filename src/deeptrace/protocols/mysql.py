"""MySQL / MariaDB client/server protocol.

Packets (3-byte length, sequence id) are framed one by one, so a large row is
skipped through holes by its length. In the command phase a client packet with
sequence id 0 starts a command (COM_QUERY, COM_STMT_PREPARE with the statement
text, COM_STMT_EXECUTE named after the prepared text, ...); the server's packets
up to the end of its reply are the response: OK or ERR (code, SQLSTATE,
message), or a result set (column count, definitions, rows, terminator) whose row
count is kept. The connection handshake (and its credentials) is skipped.
"""

from __future__ import annotations

from deeptrace.protocols import sql
from deeptrace.protocols.base import Message, message_from, message_from_parts
from deeptrace.protocols.framing import INVALID, NEED_MORE, DirectionFramer, Frame, Framed, FramedConnection

PROTOCOL = "mysql"
COM_QUIT, COM_INIT_DB, COM_QUERY, COM_PING = 0x01, 0x02, 0x03, 0x0E
COM_STMT_PREPARE, COM_STMT_EXECUTE, COM_STMT_SEND_LONG_DATA, COM_STMT_CLOSE = 0x16, 0x17, 0x18, 0x19
COMMANDS = {0x01: "QUIT", 0x02: "INIT_DB", 0x03: "QUERY", 0x04: "FIELD_LIST", 0x09: "STATISTICS", 0x0E: "PING",
            0x11: "CHANGE_USER", 0x16: "STMT_PREPARE", 0x17: "STMT_EXECUTE", 0x18: "STMT_SEND_LONG_DATA",
            0x19: "STMT_CLOSE", 0x1A: "STMT_RESET", 0x1B: "SET_OPTION", 0x1C: "STMT_FETCH", 0x1F: "RESET_CONNECTION"}  # fmt: skip
NO_REPLY = (COM_QUIT, COM_STMT_SEND_LONG_DATA, COM_STMT_CLOSE)
MAX_PAYLOAD = 0xFFFFFF
READ_BYTES = 2048  # of a packet, enough for the fields we read


def frame(buf: bytes) -> Frame | str:
    if len(buf) < 4:
        return NEED_MORE
    length = int.from_bytes(buf[:3], "little")
    if length == 0 and buf[3] != 0:
        return INVALID
    if len(buf) < min(4 + length, 4 + READ_BYTES, 5):
        return NEED_MORE
    return Frame(4 + length, {"seq": buf[3], "length": length, "payload": buf[4 : 4 + min(length, READ_BYTES)]})


def starts_request(data: bytes) -> bool:
    """A command packet: sequence 0 and a known command; for COM_QUERY, text follows."""
    if len(data) < 5 or data[3] != 0 or data[4] not in COMMANDS:
        return False
    length = int.from_bytes(data[:3], "little")
    if data[4] == COM_QUERY:
        return 1 < length < 1 << 24 and data[5:6].isalpha()
    return length < 64


def starts_response(data: bytes) -> bool:
    """The server's greeting: protocol version 10 and a version string."""
    return len(data) >= 6 and data[3] == 0 and data[4] == 10 and data[5:6].isdigit()


def _lenenc(buf: bytes, pos: int) -> tuple[int, int]:
    first = buf[pos] if pos < len(buf) else 0
    if first < 0xFB:
        return first, pos + 1
    width = {0xFC: 2, 0xFD: 3, 0xFE: 8}.get(first, 0)
    return int.from_bytes(buf[pos + 1 : pos + 1 + width], "little"), pos + 1 + width


CLIENT_DEPRECATE_EOF = 1 << 24


def _greeting_capabilities(payload: bytes) -> int | None:
    """Capability flags of the server's greeting (protocol 10)."""
    end = payload.find(b"\0", 1)
    pos = end + 1 + 4 + 8 + 1  # version string, thread id, auth data part 1, filler
    if end < 0 or len(payload) < pos + 7:
        return None
    return int.from_bytes(payload[pos : pos + 2], "little") | int.from_bytes(payload[pos + 5 : pos + 7], "little") << 16


def _is_eof(payload: bytes) -> bool:
    return payload[:1] == b"\xfe" and len(payload) < 9


class MysqlConnection(FramedConnection):
    protocol = PROTOCOL

    def __init__(self) -> None:
        self._command_phase = False  # until the server's OK after the handshake
        self._server_caps: int | None = None
        # Whether definition blocks end without an EOF packet; from the handshake, or
        # (joined mid-connection) assumed, and a stray EOF is then skipped.
        self._deprecate_eof: bool | None = None
        self._pending: list[int] = []  # commands awaiting a reply, oldest first
        self._statements: dict[int, str] = {}  # statement id -> text
        self._prepare_text: list[str] = []  # texts of STMT_PREPAREs awaiting their OK
        self._reply: list[Framed] = []
        self._left = 0  # packets the current reply still needs, where that is counted
        self._phase = ""
        self._last_was_prepare = False
        super().__init__(DirectionFramer(frame, starts_request),
                         DirectionFramer(frame, lambda data: len(data) >= 5 and data[3] != 0))  # fmt: skip

    # ---- client ----

    def _request(self, f: Framed) -> Message | list[Message] | None:
        msg = self._command(f)
        if msg is not None and self._reply and not self._responses.in_step:
            # The reply in progress lost its end in bytes never captured (a row longer than
            # the capture, then the terminator): the next command says it is over.
            reply, self._reply = self._reply, []
            command = self._pending.pop(0)
            self._last_was_prepare = command == COM_STMT_PREPARE
            return [self._reply_message(reply, command), msg]
        return msg

    def _command(self, f: Framed) -> Message | None:
        payload = f.fields["payload"]
        if not payload:
            return None
        if not self._command_phase:
            if f.fields["seq"] == 1 and self._server_caps is not None and len(payload) >= 4:
                client_caps = int.from_bytes(payload[:4], "little")  # the handshake response
                self._deprecate_eof = bool(client_caps & self._server_caps & CLIENT_DEPRECATE_EOF)
                return None
            if f.fields["seq"] != 0 or payload[0] not in COMMANDS or self._server_caps is not None:
                return None
            self._command_phase = True  # joined mid-connection: a command is a command
        if f.fields["seq"] != 0:
            return None  # continuation of a large command
        command = payload[0]
        name = COMMANDS.get(command, f"0x{command:02x}")
        attrs = {"db.system": "mysql", "db.operation.name": name}
        text = ""
        if command in (COM_QUERY, COM_STMT_PREPARE):
            text = payload[1:].decode("utf-8", "replace")
            attrs["db.query.text"] = text[:1024]
        elif command == COM_STMT_EXECUTE and len(payload) >= 5:
            stmt = int.from_bytes(payload[1:5], "little")
            text = self._statements.get(stmt, "")
            attrs["db.mysql.statement_id"] = stmt
            if text:
                attrs["db.query.text"] = text[:1024]
        elif command == COM_INIT_DB:
            attrs["db.namespace"] = payload[1:].decode("utf-8", "replace")
        if command == COM_STMT_PREPARE:
            self._prepare_text.append(text)
            span_name = f"PREPARE {sql.name(text)}"
        elif text:
            span_name = sql.name(text)
        else:
            span_name = f"mysql {name}"
        if command not in NO_REPLY:
            self._pending.append(command)
        return message_from(f, PROTOCOL, True, name=span_name, attributes=attrs, head=f.head,
                            expects_response=command not in NO_REPLY)  # fmt: skip

    # ---- server ----

    def _response(self, f: Framed) -> Message | None:
        payload = f.fields["payload"]
        if not payload:
            return None
        if not self._command_phase:
            if f.fields["seq"] == 0 and payload[:1] == b"\x0a":
                self._server_caps = _greeting_capabilities(payload) or 0
            elif self._server_caps is not None and payload[:1] == b"\x00":
                self._command_phase = True  # authentication succeeded
            return None
        if not self._pending:
            return None
        if not self._reply and self._last_was_prepare and _is_eof(payload):
            return None  # the EOF closing a prepare reply we ended at its last definition
        self._reply.append(f)
        if not self._reply_complete(payload):
            return None
        reply, self._reply = self._reply, []
        command = self._pending.pop(0)
        self._last_was_prepare = command == COM_STMT_PREPARE
        return self._reply_message(reply, command)

    def _reply_complete(self, payload: bytes) -> bool:
        """Whether this packet ends the reply to the oldest pending command."""
        if len(self._reply) == 1:  # first packet of the reply
            command = self._pending[0]
            if payload[0] == 0xFF or (payload[0] == 0x00 and command != COM_STMT_PREPARE):
                return True  # ERR, or OK
            if command == COM_STMT_PREPARE:  # STMT_PREPARE_OK: statement id, columns, params
                stmt = int.from_bytes(payload[1:5], "little")
                columns, params = int.from_bytes(payload[5:7], "little"), int.from_bytes(payload[7:9], "little")
                if self._prepare_text:
                    self._statements[stmt] = self._prepare_text.pop(0)
                    if len(self._statements) > 1024:
                        self._statements.pop(next(iter(self._statements)))
                self._phase, self._left = "prepare", params + columns
                return self._left == 0
            self._phase, self._left = "columns", _lenenc(payload, 0)[0]
            return False
        if self._phase == "prepare":
            if _is_eof(payload):
                return self._left == 0
            self._left -= 1
            return self._left == 0 and self._deprecate_eof is not False
        if self._phase == "columns":
            self._left -= 1
            if self._left < 0:  # past the definitions: their EOF, or already a row
                self._phase = "rows"
            return False
        # Rows until the terminator: EOF, or an OK packet with the 0xFE header (rows of
        # 16 MiB would be needed for a row to start with 0xFE), or an error.
        return (payload[0] == 0xFE and len(payload) < MAX_PAYLOAD) or payload[0] == 0xFF

    @staticmethod
    def _reply_message(reply: list[Framed], command: int) -> Message:
        first = reply[0].fields["payload"]
        attrs: dict = {}
        code = None
        err = next((p.fields["payload"] for p in reply if p.fields["payload"][:1] == b"\xff"), None)
        if err is not None:
            state = err[4:9].decode("latin-1") if err[3:4] == b"#" else ""
            code = str(int.from_bytes(err[1:3], "little"))
            attrs.update({"db.response.status_code": code, "db.mysql.sqlstate": state,
                          "db.response.error": (err[9:] if state else err[3:]).decode("utf-8", "replace")})  # fmt: skip
        elif first[:1] == b"\x00" and command != COM_STMT_PREPARE:
            attrs["db.response.affected_rows"] = _lenenc(first, 1)[0]
        elif command != COM_STMT_PREPARE:
            attrs["db.response.returned_rows"] = _rows(reply)
        return message_from_parts(reply, PROTOCOL, False, error=err is not None, status_code=code, attributes=attrs,
                                  head=reply[0].head)  # fmt: skip


def _rows(reply: list[Framed]) -> int:
    """Rows of a finished result set: packets after the definitions, less EOFs and the terminator."""
    count = _lenenc(reply[0].fields["payload"], 0)[0]
    rest = [p.fields["payload"] for p in reply[1 + count :]]
    return sum(1 for p in rest if p[:1] not in (b"\xfe", b"\xff") or len(p) >= MAX_PAYLOAD)
