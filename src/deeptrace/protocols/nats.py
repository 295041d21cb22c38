"""NATS client protocol (text, docs.nats.io "Client Protocol"): publishes, subscriptions,
deliveries, keep-alives and verbose acknowledgements. Pure functions of bytes.

Every operation is one control line ending in CRLF; PUB, HPUB, MSG and HMSG carry a
payload whose length is on that line (then CRLF). What becomes a span:

- PUB/HPUB, SUB, UNSUB, CONNECT: one-way, unless the client asked for verbose mode in
  CONNECT: then the server answers each of them, in order, with +OK or -ERR.
- PING from the client pairs with the server's next PONG (keep-alives the server starts,
  its PING and the client's PONG, are not spans).
- MSG/HMSG: deliveries the server pushes to a subscriber: one-way, from the server's side.
- -ERR that answers nothing (non-verbose mode: auth failures, permission violations, stale
  connections): an error span of its own, with the server's text.

Pairing keys are handed out here, not left to the pipeline's one FIFO, because PONG only
answers PING and +OK/-ERR only answer the other operations: two queues in one stream.
"""

from __future__ import annotations

import json
from collections import deque

from deeptrace.protocols.base import Message, message_from
from deeptrace.protocols.framing import INVALID, NEED_MORE, DirectionFramer, Frame, Framed, FramedConnection
from deeptrace.protocols.redaction import REDACTED, http_head

PROTOCOL = "nats"
MAX_LINE = 32 << 10  # the server's max_control_line is 4 KB; INFO lines of big clusters run longer
MAX_PAYLOAD = 64 << 20  # the largest max_payload a server accepts
MAX_PENDING = 1024  # requests awaiting PONG or +OK/-ERR
MAX_SIDS = 4096  # subscription id -> subject, to name UNSUB
# CONNECT fields a span may show; everything else (user, pass, auth_token, jwt, sig, nkey) is dropped.
CONNECT_SHOWN = ("verbose", "pedantic", "tls_required", "name", "lang", "version", "protocol", "echo", "headers",
                 "no_responders")  # fmt: skip

CLIENT_OPS = frozenset((b"CONNECT", b"PUB", b"HPUB", b"SUB", b"UNSUB", b"PING", b"PONG"))
SERVER_OPS = frozenset((b"INFO", b"MSG", b"HMSG", b"PING", b"PONG", b"+OK", b"-ERR"))
# Operations no other protocol's first bytes look like; PING, PONG, +OK and -ERR alone are
# also Redis (inline commands, simple replies), so they never decide a connection by themselves.
CLIENT_SURE = frozenset(("CONNECT", "PUB", "HPUB", "SUB", "UNSUB"))
SERVER_SURE = frozenset(("INFO", "MSG", "HMSG"))


def _number(word: bytes) -> int | None:
    return int(word) if word.isdigit() and len(word) <= 12 else None


def _subject(word: bytes) -> str | None:
    """A subject or reply subject: printable, no spaces (the control line was split on them)."""
    try:
        text = word.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text and text.isprintable() else None


def _payload_frame(line_end: int, op: str, subject: str | None, sid: bytes | None, reply: bytes | None,
                   sizes: list[bytes]) -> Frame | str:  # fmt: skip
    """A PUB/HPUB/MSG/HMSG whose control line ends at line_end: framed by its byte counts."""
    numbers = [_number(w) for w in sizes]
    if subject is None or None in numbers or numbers[-1] > MAX_PAYLOAD or numbers[0] > numbers[-1]:
        return INVALID
    reply_to = _subject(reply) if reply is not None else None
    if reply is not None and reply_to is None:
        return INVALID
    fields = {"op": op, "subject": subject, "body": numbers[-1] - (numbers[0] if len(numbers) == 2 else 0),
              "line": line_end}  # fmt: skip
    if reply_to is not None:
        fields["reply_to"] = reply_to
    if sid is not None:
        fields["sid"] = sid.decode("latin-1")
    return Frame(line_end + numbers[-1] + 2, fields)


def _frame(buf: bytes, ops: frozenset) -> Frame | str:
    eol = buf.find(b"\n", 0, MAX_LINE)
    if eol < 0:
        return NEED_MORE if len(buf) < MAX_LINE else INVALID
    line = buf[: eol - 1] if eol and buf[eol - 1] == 13 else buf[:eol]
    end = eol + 1
    words = line.split()
    if not words:
        return INVALID
    op = words[0].upper()  # the protocol is case-insensitive; clients write upper case
    if op not in ops:
        return INVALID
    name = op.decode()
    args = words[1:]
    n = len(args)
    if op in (b"PING", b"PONG", b"+OK"):
        return Frame(end, {"op": name}) if n == 0 else INVALID
    if op == b"-ERR":
        return Frame(end, {"op": name, "error": line[4:].strip().strip(b"'").decode("utf-8", "replace")[:256]})
    if op in (b"CONNECT", b"INFO"):
        rest = line[len(op) :].strip()
        return Frame(end, {"op": name, "json": rest}) if rest[:1] == b"{" else INVALID
    if op == b"PUB" and n in (2, 3):
        return _payload_frame(end, name, _subject(args[0]), None, args[1] if n == 3 else None, args[-1:])
    if op == b"HPUB" and n in (3, 4):
        return _payload_frame(end, name, _subject(args[0]), None, args[1] if n == 4 else None, args[-2:])
    if op == b"MSG" and n in (3, 4):
        return _payload_frame(end, name, _subject(args[0]), args[1], args[2] if n == 4 else None, args[-1:])
    if op == b"HMSG" and n in (4, 5):
        return _payload_frame(end, name, _subject(args[0]), args[1], args[2] if n == 5 else None, args[-2:])
    if op == b"SUB" and n in (2, 3):
        subject = _subject(args[0])
        if subject is None:
            return INVALID
        fields = {"op": name, "subject": subject, "sid": args[-1].decode("latin-1")}
        if n == 3:
            fields["queue"] = args[1].decode("utf-8", "replace")
        return Frame(end, fields)
    if op == b"UNSUB" and n in (1, 2):
        fields = {"op": name, "sid": args[0].decode("latin-1")}
        if n == 2:
            if _number(args[1]) is None:
                return INVALID
            fields["max"] = int(args[1])
        return Frame(end, fields)
    return INVALID


def frame_request(buf: bytes) -> Frame | str:
    return _frame(buf, CLIENT_OPS)


def frame_response(buf: bytes) -> Frame | str:
    return _frame(buf, SERVER_OPS)


def _claims(data: bytes, frame, sure: frozenset) -> bool:
    """Whether data starts with this side's NATS operations, one of them unmistakable:
    every whole operation here must parse (a few at most are looked at)."""
    pos = 0
    for _ in range(8):
        if pos >= len(data):
            return False
        rest = data[pos : pos + MAX_LINE]
        # A CONNECT or INFO line longer than was captured is still unmistakable.
        start = rest[:9].upper()
        if ("CONNECT" in sure and start == b"CONNECT {") or ("INFO" in sure and start[:6] == b"INFO {"):
            return True
        result = frame(rest)
        if result.__class__ is not Frame:
            return False
        if result.fields["op"] in sure:
            return True
        pos += result.length
    return False


def starts_request(data: bytes) -> bool:
    return _claims(data, frame_request, CLIENT_SURE)


def starts_response(data: bytes) -> bool:
    return _claims(data, frame_response, SERVER_SURE)


def keepalives_only(data: bytes) -> bool:
    """data is PING/PONG lines and at most an unfinished line after them: as much a Redis inline
    PING as a NATS keep-alive. Detection waits on these (protocols.detect) so that a
    NATS connection joined mid-stream is not taken for Redis on its first keep-alive; the line
    that follows decides (a PUB, SUB, ... is NATS; anything else is Redis again)."""
    pos = lines = 0
    while pos < len(data):
        eol = data.find(b"\n", pos, pos + 64)
        if eol < 0:
            return lines > 0  # the next line is not finished yet
        if data[pos:eol].rstrip(b"\r").upper() not in (b"PING", b"PONG"):
            return False
        lines += 1
        pos = eol + 1
    return lines > 0


def _starts_op(data: bytes, ops: frozenset) -> bool:
    """Cheap: does a syscall's data begin with an operation word (to get back in step)?"""
    word = data[:8].split(None, 1)[0].upper() if data[:8].strip() else b""
    return word in ops


def _salvage_request(buf: bytes) -> dict | None:
    """A CONNECT whose line was not all captured: still a CONNECT (its JSON unread)."""
    return {"op": "CONNECT", "json": b""} if buf[:8].upper() == b"CONNECT " else None


def connect_head(line_json: bytes) -> bytes:
    """CONNECT's head shows only the harmless fields: credentials never leave."""
    try:
        options = json.loads(line_json)
    except ValueError:
        options = None
    if not isinstance(options, dict):
        return b"CONNECT " + REDACTED.encode()
    shown = {k: options[k] for k in CONNECT_SHOWN if k in options}
    return b"CONNECT " + json.dumps(shown, separators=(",", ":")).encode()[:200]


def _headers_head(head: bytes, line_end: int) -> bytes:
    """HPUB/HMSG: the NATS/1.0 header block is read as HTTP headers are, and redacted the same way."""
    if line_end >= len(head):
        return head
    return head[:line_end] + http_head(head[line_end:])


class NatsConnection(FramedConnection):
    protocol = PROTOCOL

    def __init__(self) -> None:
        super().__init__(
            DirectionFramer(frame_request, lambda d: _starts_op(d, CLIENT_OPS), _salvage_request),
            DirectionFramer(frame_response, lambda d: _starts_op(d, SERVER_OPS)),
        )
        # None: CONNECT not seen (joined mid-stream); a +OK from the server then says it is verbose.
        self.verbose: bool | None = None
        self._pings: deque[tuple[int, int]] = deque()  # (pair key, start_ns) awaiting PONG
        self._acks: deque[tuple[int, int]] = deque()  # ... awaiting +OK/-ERR (verbose)
        self._keys = 0
        self._sids: dict[str, str] = {}

    def _key(self) -> int:
        self._keys += 1
        return self._keys

    def _wait(self, queue: deque, f: Framed) -> int:
        key = self._key()
        queue.append((key, f.start_ns))
        if len(queue) > MAX_PENDING:
            queue.popleft()  # the pipeline reports it unanswered by its own bound and timeout
        return key

    @staticmethod
    def _answered(queue: deque, f: Framed) -> int | None:
        """The key of the oldest request waiting in this queue that began before this answer."""
        if queue and queue[0][1] <= f.start_ns:
            return queue.popleft()[0]
        return None

    def _request(self, f: Framed) -> Message | None:
        fields = f.fields
        op = fields["op"]
        if op == "PONG":
            return None  # answers the server's keep-alive PING
        attrs = {"messaging.system": "nats", "messaging.operation.name": op}
        head = f.head
        name = f"nats {op}"
        if op == "PING":
            return message_from(f, PROTOCOL, True, name=name, attributes=attrs, head=head,
                                pair_key=self._wait(self._pings, f))  # fmt: skip
        if op == "CONNECT":
            head = connect_head(fields["json"])
            try:
                options = json.loads(fields["json"])
            except ValueError:
                options = None
            if isinstance(options, dict):
                self.verbose = options.get("verbose") is True
                if isinstance(options.get("name"), str):
                    attrs["messaging.client.id"] = options["name"][:128]
                for key in ("lang", "version"):
                    if isinstance(options.get(key), str):
                        attrs[f"messaging.nats.client.{key}"] = options[key][:64]
        elif op in ("PUB", "HPUB"):
            name = f"nats {op} {fields['subject']}"
            attrs["messaging.operation.type"] = "send"
            self._destination(attrs, fields)
            if op == "HPUB":
                head = _headers_head(head, fields["line"])
        elif op == "SUB":
            name = f"nats SUB {fields['subject']}"
            attrs["messaging.destination.name"] = fields["subject"]
            attrs["messaging.nats.sid"] = fields["sid"]
            if "queue" in fields:
                attrs["messaging.consumer.group.name"] = fields["queue"]
            if len(self._sids) < MAX_SIDS or fields["sid"] in self._sids:
                self._sids[fields["sid"]] = fields["subject"]
        elif op == "UNSUB":
            attrs["messaging.nats.sid"] = fields["sid"]
            subject = self._sids.get(fields["sid"]) if "max" in fields else self._sids.pop(fields["sid"], None)
            if subject is not None:
                name = f"nats UNSUB {subject}"
                attrs["messaging.destination.name"] = subject
        if self.verbose:
            return message_from(f, PROTOCOL, True, name=name, attributes=attrs, head=head,
                                pair_key=self._wait(self._acks, f))  # fmt: skip
        return message_from(f, PROTOCOL, True, name=name, attributes=attrs, head=head, expects_response=False)

    def _response(self, f: Framed) -> Message | list[Message] | None:
        fields = f.fields
        op = fields["op"]
        if op in ("INFO", "PING"):
            return None  # the server's greeting and keep-alives answer no request
        if op in ("MSG", "HMSG"):  # a delivery: the server's one-way message to a subscriber
            attrs = {"messaging.system": "nats", "messaging.operation.name": op, "messaging.operation.type": "receive",
                     "messaging.nats.sid": fields["sid"]}  # fmt: skip
            self._destination(attrs, fields)
            head = _headers_head(f.head, fields["line"]) if op == "HMSG" else f.head
            return message_from(f, PROTOCOL, True, name=f"nats {op} {fields['subject']}", attributes=attrs,
                                head=head, expects_response=False)  # fmt: skip
        if op == "PONG":
            key = self._answered(self._pings, f)
            return None if key is None else message_from(f, PROTOCOL, False, pair_key=key, head=f.head)
        key = self._answered(self._acks, f)
        if op == "+OK":
            if key is None:
                self.verbose = True  # only a verbose connection hears +OK: what follows waits for it
                return None
            return message_from(f, PROTOCOL, False, pair_key=key, head=f.head)
        # -ERR
        error = fields["error"]
        attrs = {"messaging.nats.error": error}
        code = error.split(" for ", 1)[0][:64] or "ERR"
        if key is not None:
            return message_from(f, PROTOCOL, False, error=True, status_code=code, pair_key=key, attributes=attrs,
                                head=f.head)  # fmt: skip
        # Answers nothing we saw: a span of its own, its request empty, so the error is not lost.
        key = self._key()
        req = message_from(f, PROTOCOL, True, name="nats -ERR", pair_key=key,
                           attributes={"messaging.system": "nats", "messaging.operation.name": "-ERR"})  # fmt: skip
        req.size, req.end_ns, req.seq_start, req.seq_end = 0, f.start_ns, None, None
        resp = message_from(f, PROTOCOL, False, error=True, status_code=code, pair_key=key, attributes=attrs,
                            head=f.head)  # fmt: skip
        return [req, resp]

    @staticmethod
    def _destination(attrs: dict, fields: dict) -> None:
        attrs["messaging.destination.name"] = fields["subject"]
        attrs["messaging.message.body.size"] = fields["body"]
        if "reply_to" in fields:
            attrs["messaging.nats.reply_to"] = fields["reply_to"]
