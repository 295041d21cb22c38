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


def starts_request(data: bytes) -> bool:
    space = data.find(b" ", 0, 12)
    if space <= 0 or data[:space] not in METHODS:
        return False
    eol = data.find(b"\r\n")  # once the request line is whole, it must end in the version
    return eol < 0 or data[eol - 8 : eol - 3] == b"HTTP/"


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


def _chunked_length(buf: bytes, start: int) -> int | str:
    """Bytes from buf[0] to the end of a chunked body that begins at `start`."""
    pos = start
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return NEED_MORE if len(buf) - pos < 1024 else INVALID
        try:
            size = int(buf[pos:eol].split(b";", 1)[0].strip(), 16)
        except ValueError:
            return INVALID
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n", pos)  # trailers end with an empty line
            while end >= 0 and end != pos:
                pos = end + 2
                end = buf.find(b"\r\n", pos)
            return NEED_MORE if end < 0 else end + 2
        pos += size + 2
        if pos > len(buf):
            return NEED_MORE


def _header_block(buf: bytes) -> tuple[int, bytes, dict[str, str]] | str:
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return NEED_MORE if len(buf) < MAX_HEADER else INVALID
    first, _, rest = buf[:end].partition(b"\r\n")
    return end + 4, first, _headers(rest)


def _body_end(buf: bytes, header_len: int, headers: dict[str, str]) -> int | None | str:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return _chunked_length(buf, header_len)
    if "content-length" in headers:
        try:
            return header_len + int(headers["content-length"])
        except ValueError:
            return INVALID
    return None


def _request_line(first: bytes) -> dict | None:
    parts = first.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or parts[0] not in METHODS:
        return None
    return {"method": parts[0].decode("latin-1"), "target": parts[1].decode("latin-1", "replace"),
            "version": parts[2].decode("latin-1")}  # fmt: skip


def _status_line(first: bytes) -> dict | None:
    parts = first.split(b" ", 2)
    if not parts[0].startswith(b"HTTP/1.") or len(parts) < 2 or not parts[1].isdigit():
        return None
    return {"status": int(parts[1]), "reason": parts[2].decode("latin-1", "replace") if len(parts) > 2 else "",
            "version": parts[0].decode("latin-1")}  # fmt: skip


def _head(buf: bytes, starts, first_line) -> tuple[int, dict] | str:
    """(header length, fields of the start line and headers) of the message at buf[0]."""
    block = _header_block(buf)
    if isinstance(block, str):
        # Incomplete: wait for more only if it starts like a message (the start-line
        # parsers check complete ones, so this check stays off the usual path).
        return INVALID if block == NEED_MORE and len(buf) >= 12 and not starts(buf[:12]) else block
    header_len, first, headers = block
    fields = first_line(first)
    if fields is None:
        return INVALID
    fields["headers"] = headers
    return header_len, fields


def frame_request(buf: bytes) -> Frame | str:
    head = _head(buf, starts_request, _request_line)
    if isinstance(head, str):
        return head
    header_len, fields = head
    end = _body_end(buf, header_len, fields["headers"])
    if isinstance(end, str):
        return end
    return Frame(header_len if end is None else end, fields)  # no length on a request: no body


def frame_response(buf: bytes, request_method: str | None) -> Frame | str:
    head = _head(buf, starts_response, _status_line)
    if isinstance(head, str):
        return head
    header_len, fields = head
    status = fields["status"]
    if status == 101 or (request_method == "CONNECT" and 200 <= status < 300):
        fields["upgrade"] = True  # the connection now carries something else
        return Frame(header_len, fields)
    if 100 <= status < 200 or status in (204, 304) or request_method == "HEAD":
        return Frame(header_len, fields)
    end = _body_end(buf, header_len, fields["headers"])
    if isinstance(end, str):
        return end
    return Frame(end, fields)  # end None: body runs until the connection closes


def salvage(buf: bytes) -> dict | None:
    """Fields of a message cut short by bytes never captured: a body across a hole, or a
    header block longer than the capture (a long query string, many headers), of which
    the start line and the whole header lines before the cut are read."""
    for starts, first_line in ((starts_response, _status_line), (starts_request, _request_line)):
        head = _head(buf, starts, first_line)
        if not isinstance(head, str):
            return head[1]
        if head == NEED_MORE and starts(buf[:12]):
            return _cut_head(buf, first_line)
    return None


def _cut_head(buf: bytes, first_line) -> dict | None:
    eol = buf.find(b"\r\n")
    if eol < 0:
        # The request line itself is longer than what was captured: its method and the
        # start of its target are still worth a span.
        method, _, target = buf.partition(b" ")
        if first_line is not _request_line or method not in METHODS or not target:
            return None
        return {"method": method.decode("latin-1"), "target": target.split(b" ", 1)[0].decode("latin-1", "replace"),
                "version": "", "headers": {}}  # fmt: skip
    fields = first_line(buf[:eol])
    if fields is not None:
        fields["headers"] = _headers(buf[eol + 2 : buf.rfind(b"\r\n") + 2])  # whole lines only
    return fields


class _Framer(DirectionFramer):
    def cut_short(self, chunk: Chunk) -> list[Framed]:
        """Nothing more of the message being buffered will come (its other side has moved
        on, or the connection ended): salvage what is here of it."""
        if not self._buf or self._open is not None:
            return []
        out: list[Framed] = []
        self.hole(0, chunk, out)
        return out


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
    target = fields["target"]
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
            _Framer(frame_request, starts_request, salvage),
            _Framer(lambda buf: frame_response(buf, self._methods[0] if self._methods else None),
                    starts_response, salvage),
        )  # fmt: skip
        self.upgraded = False  # after 101 / CONNECT the bytes are another protocol's
        self._last: dict[bool, Chunk] = {}  # the latest chunk of each side

    def feed(self, is_request: bool, chunk: Chunk) -> list[Message]:
        if self.upgraded:
            return []
        out: list[Message] = []
        if not is_request and not self._methods and True in self._last:
            # A response while no request is complete: the request's end never reached us (a
            # header block cut in TCP fragments the capture lacks). The server answered, so it
            # was whole: take what we have of it.
            out += [self._request(f) for f in self._requests.cut_short(self._last[True])]
        self._last[is_request] = chunk
        return out + super().feed(is_request, chunk)

    def close(self, end_ns: int) -> list[Message]:
        out = [m for f in self._responses.close(end_ns) if (m := self._response(f)) is not None]
        last = self._last.get(False)
        if last is not None:  # a response whose header block never ended (the capture stopped in it)
            out += [m for f in self._responses.cut_short(last) if (m := self._response(f)) is not None]
        return out

    def _request(self, f: Framed) -> Message:
        self._methods.append(f.fields["method"])
        return message_from(f, PROTOCOL, True, name=request_name(f.fields), attributes=request_attributes(f.fields),
                            head=f.head)  # fmt: skip

    def _response(self, f: Framed) -> Message | None:
        status = f.fields["status"]
        if 100 <= status < 200 and status != 101:
            return None  # interim (100 Continue): the final response follows
        if self._methods:
            self._methods.popleft()
        if f.fields.get("upgrade"):
            self.upgraded = True
        return message_from(f, PROTOCOL, False, error=status >= 400, status_code=str(status),
                            attributes=response_attributes(f.fields), head=f.head)  # fmt: skip
