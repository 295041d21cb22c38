"""HTTP/1.0 and 1.1: framing (Content-Length, chunked, until close, HEAD, 1xx,
CONNECT), the fields an operator needs, and redaction of credentials.
Pure functions of bytes."""

from __future__ import annotations

import re
from collections import deque

from deeptrace.protocols.base import Chunk, Message, message_from
from deeptrace.protocols.framing import INVALID, NEED_MORE, DirectionFramer, Frame, Framed, FramedConnection

PROTOCOL = "http"
METHODS = frozenset(
    b"GET HEAD POST PUT DELETE CONNECT OPTIONS TRACE PATCH PROPFIND PROPPATCH MKCOL COPY MOVE LOCK UNLOCK".split()
)
# Headers kept as attributes: routing, content, and the ids that link traces.
KEPT_HEADERS = (
    "host", "user-agent", "content-type", "content-length", "transfer-encoding", "x-request-id",
    "x-correlation-id", "traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "uber-trace-id",
)  # fmt: skip
MAX_HEADER = 64 << 10
# Numbers, UUIDs, long hex, and codes with a run of 3+ digits (SKU-40079, order_1234);
# `v1` or `oauth2` stay as they are.
_ID_SEGMENT = re.compile(
    r"^(\d+|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|[0-9a-fA-F]{16,}"
    r"|[^/]*\d{3,}[^/]*)$"
)


# RFC 9110 token: any of these is a method (CCM_POST, VERSION-CONTROL, ...), not only the known ones.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_METHOD_SP = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,32} ")
# RFC 9112 2.2: a recipient may take a lone LF for a line end (and some senders use it).
_EOL = re.compile(rb"\r?\n")
# A chunk-size line; more than 16 hex digits overflows 64 bits, a smuggling trick (RFC 9112 7.1).
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\r?\n")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
CHUNK_PIECE = 16 << 10  # a chunked body buffered this far is framed piece by piece, not all held


def _first_line(data: bytes) -> bytes | None:
    eol = data.find(b"\n")
    return None if eol < 0 else data[:eol].removesuffix(b"\r")


def starts_request(data: bytes) -> bool:
    """Detection by content, so other protocols' bytes must not pass: a known method may be
    claimed on its first bytes; any other token only with a whole line ending in the version."""
    space = data.find(b" ", 0, 33)
    if space <= 0:
        return False
    line = _first_line(data)
    if data[:space] in METHODS:
        return line is None or line[-8:-3] == b"HTTP/"
    fields = None if line is None else _request_line(line)
    return fields is not None and fields["version"] != ""


def starts_response(data: bytes) -> bool:
    return data.startswith(b"HTTP/1.")


_FRAMING_HEADERS = ("content-length", "transfer-encoding")
_KEPT_ATTRIBUTE = {name: f"http.request.header.{name}" for name in KEPT_HEADERS}
# Only the headers we keep or frame by are looked at: one scan in C per message.
_WANTED = re.compile(
    rb"(?im)^("
    + b"|".join(re.escape(h.encode()) for h in KEPT_HEADERS + _FRAMING_HEADERS)
    + rb")[ \t]*:[ \t]*([^\r\n]*)"
)


def _headers(block: bytes) -> dict[str, str]:
    return {name.lower().decode(): value.rstrip().decode("latin-1") for name, value in _WANTED.findall(block)}


def _chunked_scan(buf: bytes, pos: int) -> tuple[int | None, bool] | str:
    """Walk a chunked body from buf[pos] (a chunk-size line). (end, True): the body ends at
    `end`. (mark, False): it goes on; `mark` is the end of the data of the last chunk begun
    (maybe past buf: its data is still coming), None when no chunk has begun. INVALID: not
    chunked framing."""
    mark = None
    while True:
        line = _CHUNK_LINE.match(buf, pos)
        if line is None:
            # Not a size line once its line end is here (or it is far too long to be one).
            bad = buf.find(b"\n", pos) >= 0 or len(buf) - pos > 1024
            return INVALID if bad else (mark, False)
        size, pos = int(line[1], 16), line.end()
        if size == 0:
            return _trailers_end(buf, pos, mark)
        mark = pos + size
        eol = _EOL.match(buf, mark)
        if eol is None:
            # The data must be followed by a line end, once two bytes of what follows are here.
            return INVALID if len(buf) >= mark + 2 else (mark, False)
        pos = eol.end()


def _trailers_end(buf: bytes, pos: int, mark: int | None) -> tuple[int | None, bool]:
    """After the last chunk: trailer lines up to an empty one."""
    while True:
        eol = buf.find(b"\n", pos)
        if eol < 0:
            return mark, False
        if buf[pos:eol] in (b"", b"\r"):
            return eol + 1, True
        pos = eol + 1


def _chunked_frame(buf: bytes, pos: int, fields: dict, first: bool) -> Frame | str:
    """The chunked body from buf[pos]: the whole message when it is here, else, once much is
    buffered, a piece up to the end of the last chunk's data (the next piece starts with the
    line end that follows it), so a body of any size is followed with bounded memory."""
    scan = _chunked_scan(buf, pos)
    if isinstance(scan, str):
        return scan
    end, done = scan
    if done:
        return Frame(end, fields if first else {"piece": "last"})
    if end is None or len(buf) < CHUNK_PIECE:
        return NEED_MORE
    return Frame(end, {**fields, "piece": "first"} if first else {"piece": "more"})


def frame_chunk_rest(buf: bytes) -> Frame | str | None:
    """The next piece of a chunked body framed piecewise, or None: buf does not go on one (a
    piece ends where a chunk's data ends, so a next one starts with a line end)."""
    eol = _EOL.match(buf)
    if eol is None:
        return None if buf not in (b"", b"\r") else NEED_MORE
    return _chunked_frame(buf, eol.end(), {}, False)


def _header_block(buf: bytes) -> tuple[int, bytes, dict[str, str]] | str:
    # The first empty line, its line ends CRLF or a lone LF: two finds in C (a regex search
    # for it cost as much as the rest of framing a message).
    crlf, lf = buf.find(b"\n\r\n"), buf.find(b"\n\n")
    if crlf < 0 and lf < 0:
        return NEED_MORE if len(buf) < MAX_HEADER else INVALID
    at, end = (crlf, crlf + 3) if lf < 0 or 0 <= crlf < lf else (lf, lf + 2)
    first, _, rest = buf[: at - (at > 0 and buf[at - 1] == 13)].partition(b"\n")
    return end, first.removesuffix(b"\r"), _headers(rest)


def _content_length(value: str) -> int | None:
    """RFC 9110 8.6: digits only (int() would also take "-1", "+1", "1_0"); a list of one
    value repeated is that value. A length past 2**63 - 1 is one no server can hold: a
    smuggling attempt by overflow, not a body."""
    values = {v.strip() for v in value.split(",")}
    if len(values) != 1:
        return None
    (v,) = values
    length = int(v) if v.isascii() and v.isdigit() else None
    return None if length is None or length >= 1 << 63 else length


def _body_end(buf: bytes, header_len: int, fields: dict) -> Frame | str | None:
    """The whole message's Frame from its header; None when it has no length of its own."""
    headers = fields["headers"]
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return _chunked_frame(buf, header_len, fields, True)
    if "content-length" in headers:
        length = _content_length(headers["content-length"])
        return INVALID if length is None else Frame(header_len + length, fields)
    return None


def _framed_body(buf: bytes, header_len: int, fields: dict, default: int | None) -> Frame | str:
    end = _body_end(buf, header_len, fields)
    if end is None:
        return Frame(default, fields)
    if end == INVALID:
        # The header was read but its body's length cannot be (negative, overflowing): the
        # recipient must take the connection as done (RFC 9112 6.3). The message is its header;
        # the bytes after it are no messages (that is how requests are smuggled).
        return Frame(header_len, {**fields, "discard_rest": True})
    return end


def _request_line(first: bytes) -> dict | None:
    """Method, target, version. Servers answer lines with no target, a space in it or no
    version ("GET HTTP/1.1", "CONNECT host:25 / HTTP/1.0", "GET /"): the request is there,
    its target is its first word (or none), its version "" when not given."""
    parts = first.split(b" ")
    if len(parts) < 2 or (parts[0] not in METHODS and not _TOKEN.fullmatch(parts[0])):
        return None
    has_version = parts[-1].startswith(b"HTTP/1.")
    if not has_version and len(parts) != 2:
        return None
    target = next((p for p in parts[1 : len(parts) - has_version] if p), b"")
    return {"method": parts[0].decode("latin-1"), "target": target.decode("latin-1", "replace"),
            "version": parts[-1].decode("latin-1") if has_version else ""}  # fmt: skip


def _status_line(first: bytes) -> dict | None:
    parts = first.split(b" ", 2)
    if not parts[0].startswith(b"HTTP/1.") or len(parts) < 2 or not parts[1].isdigit():
        return None
    return {"status": int(parts[1]), "reason": parts[2].decode("latin-1", "replace") if len(parts) > 2 else "",
            "version": parts[0].decode("latin-1")}  # fmt: skip


def _may_start(buf: bytes, first_line) -> bool:
    """An incomplete header block is worth waiting for: its start line is one once whole."""
    line = _first_line(buf)
    if line is not None:
        return first_line(line) is not None
    return starts_response(buf) if first_line is _status_line else _METHOD_SP.match(buf) is not None


def _head(buf: bytes, first_line) -> tuple[int, dict] | str:
    """(header length, fields of the start line and headers) of the message at buf[0]."""
    block = _header_block(buf)
    if isinstance(block, str):
        # Incomplete: wait for more only if it starts like a message (the start-line
        # parsers check complete ones, so this check stays off the usual path).
        return INVALID if block == NEED_MORE and len(buf) >= 12 and not _may_start(buf, first_line) else block
    header_len, first, headers = block
    fields = first_line(first)
    if fields is None:
        return INVALID
    fields["headers"] = headers
    return header_len, fields


def frame_request(buf: bytes) -> Frame | str:
    head = _head(buf, _request_line)
    if isinstance(head, str):
        return head
    header_len, fields = head
    return _framed_body(buf, header_len, fields, header_len)  # no length on a request: no body


def frame_response(buf: bytes, request_method: str | None) -> Frame | str:
    head = _head(buf, _status_line)
    if isinstance(head, str):
        return head
    header_len, fields = head
    status = fields["status"]
    if status == 101 or (request_method == "CONNECT" and 200 <= status < 300):
        fields["upgrade"] = True  # the connection now carries something else
        return Frame(header_len, fields)
    if 100 <= status < 200 or status in (204, 304) or request_method == "HEAD":
        return Frame(header_len, fields)
    return _framed_body(buf, header_len, fields, None)  # no length: the body runs until the connection closes


def salvage(buf: bytes, first_line) -> dict | None:
    """Fields of a message cut short by bytes never captured: a body across a hole, or a
    header block longer than the capture (a long query string, many headers), of which
    the start line (`_request_line` or `_status_line`: a side's own kind only) and the
    whole header lines before the cut are read."""
    head = _head(buf, first_line)
    if not isinstance(head, str):
        return head[1]
    if head == NEED_MORE and _may_start(buf, first_line):
        return _cut_head(buf, first_line)
    return None


def request_head_fields(head: bytes) -> dict | None:
    """Fields of a request from its first bytes (a head the kernel kept of a request it framed)."""
    return salvage(head, _request_line)


def response_head_fields(head: bytes) -> dict | None:
    return salvage(head, _status_line)


def _cut_head(buf: bytes, first_line) -> dict | None:
    eol = buf.find(b"\n")
    if eol < 0:
        # The request line itself is longer than what was captured: its method and the
        # start of its target are still worth a span. With no version seen to vouch for
        # the line, only a known method is taken.
        method, _, target = buf.partition(b" ")
        target = _WORD.match(target)[0]
        if first_line is not _request_line or method not in METHODS or not target:
            return None
        return {"method": method.decode("latin-1"), "target": target.decode("latin-1", "replace"),
                "version": "", "headers": {}}  # fmt: skip
    fields = first_line(buf[:eol].removesuffix(b"\r"))
    if fields is not None:
        fields["headers"] = _headers(buf[eol + 1 : buf.rfind(b"\n") + 1])  # whole lines only
    return fields


_WORD = re.compile(rb"[^\x00-\x20\x7f]*")  # up to a space, a line end or another control byte


class _Framer(DirectionFramer):
    def __init__(self, frame, starts_message, salvage_fn) -> None:
        super().__init__(self._frame_piece, starts_message, salvage_fn)
        self._frame_message = frame
        self._chunking = False  # a chunked body framed piecewise has more pieces to come
        self._discarding = False  # a message of unknown length was framed: the rest is not parsed

    def _frame_piece(self, buf: bytes) -> Frame | str:
        if self._discarding:
            return Frame(None, {"piece": "discard"})
        # A next piece starts with a line end, a message never does: content tells them apart,
        # so framing the same bytes twice (as the framer may) gives the same answer.
        if self._chunking:
            rest = frame_chunk_rest(buf)
            if rest is not None:
                if rest.__class__ is Frame:
                    self._chunking = rest.fields["piece"] == "more"
                return rest
        result = self._frame_message(buf)
        if result.__class__ is Frame:
            self._chunking = result.fields.get("piece") == "first"
            self._discarding = "discard_rest" in result.fields
        return result

    def cut_short(self, chunk: Chunk, finish_open: bool = False) -> list[Framed]:
        """Nothing more of the message being framed will come (its other side has moved on, or
        the connection ended): what is here of it is the message. finish_open: also one whose
        body is being skipped (else its body may still come: after a 100 Continue)."""
        op = self._open
        if op is not None:
            if not finish_open or op.remaining is None:
                return []
            op.partial = True  # the connection ended before the length its header declared
            self._open = None
            self._lose_step()  # what follows it is not known
            return [self._finish(op)]
        if not self._buf:
            return []
        out: list[Framed] = []
        self.hole(0, chunk, out)
        return out


def _extend(whole: Framed, piece: Framed) -> None:
    whole.size += piece.size
    whole.end_ns, whole.tid_end = piece.end_ns, piece.tid_end
    whole.partial |= piece.partial


_TEMPLATES: dict[str, str] = {}  # paths repeat: remember their templates (bounded)


def template_path(path: str) -> str:
    """`/users/42/orders/9f1c...` -> `/users/{id}/orders/{id}`: one name per route."""
    name = _TEMPLATES.get(path)
    if name is None:
        if len(_TEMPLATES) >= 4096:
            _TEMPLATES.clear()
        name = _TEMPLATES[path] = "/".join("{id}" if _ID_SEGMENT.match(seg) else seg for seg in path.split("/"))
    return name


def request_name(fields: dict) -> str:
    # A name is one line of text: a control byte in a target is shown as its percent escape.
    target = _CONTROL.sub(lambda c: f"%{ord(c[0]):02X}", fields["target"])
    if not target:  # a request line with no target ("OPTIONS HTTP/1.1"): do not invent "/"
        return fields["method"]
    if fields["method"] == "CONNECT":
        return f"CONNECT {target}"
    path = target.split("?", 1)[0]
    if "://" in path:  # absolute form, as sent to proxies
        path = "/" + path.split("://", 1)[1].partition("/")[2]
    return f"{fields['method']} {template_path(path) or '/'}"


def request_attributes(fields: dict) -> dict:
    path, _, query = fields["target"].partition("?")
    attrs = {"http.request.method": fields["method"], "url.path": path}
    if fields["version"]:  # not known when the request line was cut by the capture
        attrs["network.protocol.version"] = fields["version"].removeprefix("HTTP/")
    if query:
        attrs["url.query"] = query
    for name, value in fields["headers"].items():  # the few parsed, not every kept name
        if name in _KEPT_ATTRIBUTE:
            attrs[_KEPT_ATTRIBUTE[name]] = value
    return attrs


def response_attributes(fields: dict) -> dict:
    attrs = {"http.response.status_code": fields["status"]}
    for name in ("content-type", "content-length", "transfer-encoding"):
        if name in fields["headers"]:
            attrs[f"http.response.header.{name}"] = fields["headers"][name]
    return attrs


class Http1Connection(FramedConnection):
    protocol = PROTOCOL

    def __init__(self) -> None:
        self._methods: deque[str] = deque(maxlen=4096)  # requests awaiting their response, in order
        super().__init__(
            _Framer(frame_request, starts_request, lambda buf: salvage(buf, _request_line)),
            _Framer(lambda buf: frame_response(buf, self._methods[0] if self._methods else None),
                    starts_response, lambda buf: salvage(buf, _status_line)),
        )  # fmt: skip
        self.upgraded = False  # after 101 / CONNECT the bytes are another protocol's
        self._last: dict[bool, Chunk] = {}  # the latest chunk of each side
        # Per side, a message whose chunked body is framed piecewise: its pieces so far, as one.
        self._pending: dict[bool, Framed | None] = {True: None, False: None}

    def feed(self, is_request: bool, chunk: Chunk) -> list[Message]:
        if self.upgraded:
            return []
        out: list[Message] = []
        if not is_request and not self._methods and True in self._last:
            # A response while no request is complete: the request's end never reached us (a
            # header block cut in TCP fragments the capture lacks). The server answered, so it
            # was whole: take what we have of it.
            out += self._messages(True, self._requests.cut_short(self._last[True])) + self._out_of_step(True)
        self._last[is_request] = chunk
        return out + super().feed(is_request, chunk) + self._out_of_step(is_request)

    def close(self, end_ns: int) -> list[Message]:
        framed = self._responses.close(end_ns)
        last = self._last.get(False)
        if last is not None:  # a response whose header block or declared length never ended
            framed += self._responses.cut_short(last, finish_open=True)
        return self._messages(False, framed) + self._flush(False)

    def _out_of_step(self, is_request: bool) -> list[Message]:
        """A body framed piecewise whose side lost step: its end will not be seen."""
        framer = self._requests if is_request else self._responses
        return [] if framer.in_step else self._flush(is_request)

    def _flush(self, is_request: bool) -> list[Message]:
        whole = self._pending[is_request]
        if whole is None:
            return []
        self._pending[is_request] = None
        whole.partial = True
        if is_request:
            return [self._request_message(whole)]
        return [m for m in (self._response_message(whole),) if m is not None]

    def _messages(self, is_request: bool, framed: list[Framed]) -> list[Message]:
        handle = self._request if is_request else self._response
        return [m for f in framed for m in handle(f)]

    def _whole(self, is_request: bool, f: Framed) -> list[Framed]:
        """The messages a framed piece ends: itself, or, for a chunked body framed piecewise,
        its first pieces and this one as one (and one cut short by a new message)."""
        piece = f.fields.get("piece")
        if piece == "discard":
            return []
        whole = self._pending[is_request]
        if piece == "more" or piece == "last":
            if whole is None:
                return []
            _extend(whole, f)
            if piece == "more":
                return []
            self._pending[is_request] = None
            return [whole]
        out = []
        if whole is not None:  # a new message while one was unfinished
            whole.partial = True
            out.append(whole)
        self._pending[is_request] = f if piece == "first" else None
        if piece != "first":
            out.append(f)
        return out

    def _request(self, f: Framed) -> list[Message]:
        return [self._request_message(w) for w in self._whole(True, f)]

    def _response(self, f: Framed) -> list[Message]:
        return [m for w in self._whole(False, f) if (m := self._response_message(w)) is not None]

    def _request_message(self, f: Framed) -> Message:
        self._methods.append(f.fields["method"])
        # With a length that cannot be read, its end is not known: it is its header, flagged.
        msg = message_from(f, PROTOCOL, True, name=request_name(f.fields), attributes=request_attributes(f.fields),
                           head=f.head)  # fmt: skip
        msg.partial |= "discard_rest" in f.fields
        return msg

    def _response_message(self, f: Framed) -> Message | None:
        status = f.fields["status"]
        if 100 <= status < 200 and status != 101:
            return None  # interim (100 Continue): the final response follows
        if self._methods:
            self._methods.popleft()
        if f.fields.get("upgrade"):
            self.upgraded = True
        return message_from(f, PROTOCOL, False, error=status >= 400, status_code=str(status),
                            attributes=response_attributes(f.fields), head=f.head)  # fmt: skip
