"""Spans: one per request/response exchange, and the pairing that makes them.

The span is the one record everything downstream agrees on (DESIGN.md section 4);
`to_json_dict` is the agent's output format.
"""

from __future__ import annotations

import base64
import json
import random
import re
from collections import deque
from dataclasses import dataclass

import msgspec

from deeptrace.protocols.base import Message
from deeptrace.protocols.redaction import redact_span_parts
from deeptrace.schema import SpanJson

MAX_PENDING = 1024  # requests awaiting a response on one connection


class _HexPool:
    """Random hex digits made many at a time and handed out in slices: formatting one
    number per id cost a tenth of the agent's time per span (measured). Unique, not
    secret: ids need no cryptographic randomness."""

    _CHUNK = 1 << 16  # hex digits made at a time

    def __init__(self) -> None:
        self._digits, self._at = "", 0

    def take(self, ndigits: int) -> str:
        at = self._at
        if at + ndigits > len(self._digits):
            self._digits, at = random.randbytes(self._CHUNK // 2).hex(), 0
        self._at = at + ndigits
        return self._digits[at : at + ndigits]


_HEX = _HexPool()


def new_id(nbytes: int) -> str:
    return _HEX.take(nbytes * 2)


_B64: dict[bytes, str] = {}  # heads repeat (the same routes, the same responses): bounded cache


def b64_head(head: bytes) -> str:
    text = _B64.get(head)
    if text is None:
        if len(_B64) >= 4096:
            _B64.clear()
        text = _B64[head] = base64.b64encode(head).decode()
    return text


# Attribute of a span written under sampling: how many exchanges it stands for (2^level).
SAMPLING_WEIGHT = "sampling.weight"
# Attributes of a span read as plaintext at a TLS library: True, and which library.
TLS = "tls"
TLS_LIBRARY = "tls.library"
# OpenTelemetry's name of the service at the other end, where the agent knows it (Kubernetes).
PEER_SERVICE = "peer.service"
# Attribute of a request's span that got no response: why (timeout, connection closed, ...).
NO_RESPONSE = "deeptrace.no_response"


@dataclass(slots=True)
class Endpoint:
    """Who saw the exchange: the process and its side of the connection."""

    service: str
    host: str
    pid: int
    laddr: str
    lport: int
    raddr: str
    rport: int
    conn_id: int
    # Attributes every span of this side carries: where the process runs (container,
    # Kubernetes pod) and, where known, the peer's name. (key, value) pairs: hashable, shared.
    resource: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """What spans say about a process: its service name and where it runs (Endpoint.resource)."""

    service: str
    resource: tuple[tuple[str, str], ...] = ()


def comm_only(pid: int, comm: str) -> ProcessInfo:
    """Replays and tests: a process is its comm (the live agent reads /proc, agent/services.py)."""
    return ProcessInfo(comm)


@dataclass(slots=True)
class Span:
    kind: str  # SERVER (requests came in) or CLIENT (requests went out)
    name: str
    protocol: str
    endpoint: Endpoint
    start_ns: int
    end_ns: int
    status: str  # "ok" | "error"
    status_code: str | None
    tid: int  # thread that moved the request
    resp_tid: int | None  # thread that moved the response
    req_size: int
    resp_size: int
    req_seq: tuple[int, int] | None  # TCP byte ranges: the other side's span carries the same
    resp_seq: tuple[int, int] | None
    attributes: dict
    req_head: bytes
    resp_head: bytes
    # Ids are made when first asked for: most of a span's life is spent without them.
    _span_id: str | None = None
    _trace_id: str | None = None
    parent_span_id: str | None = None

    @property
    def span_id(self) -> str:
        if self._span_id is None:
            self._span_id = new_id(8)
        return self._span_id

    @span_id.setter
    def span_id(self, value: str) -> None:
        self._span_id = value

    @property
    def trace_id(self) -> str:
        if self._trace_id is None:
            self._trace_id = new_id(16)
        return self._trace_id

    @trace_id.setter
    def trace_id(self, value: str) -> None:
        self._trace_id = value

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    def to_json(self) -> SpanJson:
        e = self.endpoint
        if self._trace_id is None:
            self._trace_id = new_id(16)
        if self._span_id is None:
            self._span_id = new_id(8)
        return SpanJson(self._trace_id, self._span_id, self.parent_span_id, self.kind, self.name, self.protocol,
                        e.service, e.host, e.pid, self.tid, self.resp_tid, self.start_ns, self.end_ns,
                        self.end_ns - self.start_ns, self.status, self.status_code, e.laddr, e.lport, e.raddr,
                        e.rport, e.conn_id, self.req_size, self.resp_size,
                        list(self.req_seq) if self.req_seq else None, list(self.resp_seq) if self.resp_seq else None,
                        self.attributes, b64_head(self.req_head), b64_head(self.resp_head))  # fmt: skip

    def to_json_dict(self) -> dict:
        return msgspec.structs.asdict(self.to_json())


def _builtins(item: SpanJson | dict) -> dict:
    if item.__class__ is not SpanJson:
        return item
    d = msgspec.structs.asdict(item)
    if d["attributes"].__class__ is msgspec.Raw:
        d["attributes"] = json.loads(bytes(d["attributes"]))
    return d


_ENCODER = msgspec.json.Encoder()


_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def _escaped(m: re.Match) -> str:
    """A character as json.dumps escapes it (outside ASCII, JSON text has it only in strings)."""
    c = ord(m.group())
    if c > 0xFFFF:
        c -= 0x10000
        return f"\\u{0xD800 + (c >> 10):04x}\\u{0xDC00 + (c & 0x3FF):04x}"
    return f"\\u{c:04x}"


def json_lines(spans: list[SpanJson | dict]) -> str:
    """Spans (`to_json` or `to_json_dict`) as JSON lines, in ASCII. msgspec encodes in C, 3x
    json.dumps, which took a third of the agent's time per span, but writes text as UTF-8
    (escaped here as json.dumps escapes it, so that no reader splits a line at U+0085 or
    U+2028) and refuses lone surrogates (bytes kept with surrogateescape): a batch with one
    is written by json.dumps."""
    try:
        text = _ENCODER.encode_lines(spans).decode()
    except UnicodeEncodeError:
        return "".join(json.dumps(_builtins(d)) + "\n" for d in spans)
    if text.isascii():
        return text
    # Line by line: a regex crawls (~10 ns a character), isascii does not.
    return "\n".join(line if line.isascii() else _NON_ASCII.sub(_escaped, line) for line in text.split("\n"))


def format_text(span: Span) -> str:
    """One readable line per span."""
    e = span.endpoint
    arrow = "<-" if span.kind == "SERVER" else "->"
    code = f" {span.status_code}" if span.status_code else ""
    return (f"{span.kind:6} {e.service}[{e.pid}] {span.name} {span.status}{code} {span.duration_ns / 1e6:.3f} ms "
            f"{e.laddr}:{e.lport} {arrow} {e.raddr}:{e.rport} req {span.req_size}B resp {span.resp_size}B")  # fmt: skip


def _seq(msg: Message) -> tuple[int, int] | None:
    return None if msg.seq_start is None else (msg.seq_start, msg.seq_end)


def make_span(kind: str, endpoint: Endpoint, req: Message, resp: Message | None, reason: str = "") -> Span:
    """A span for a request and its response; without a response, an error span that says
    why (or an ok one for a request that expects none). Every span is redacted here, so no
    parser can let a secret out."""
    attrs = req.attributes  # the request message ends here: its dict becomes the span's
    if resp is not None:
        attrs.update(resp.attributes)
    req_head, resp_head = redact_span_parts(req.protocol, attrs, req.head, resp.head if resp is not None else b"")
    if resp is not None:
        if req.partial or resp.partial:
            attrs["deeptrace.partial"] = True
        return Span(kind, req.name or req.protocol, req.protocol, endpoint, req.start_ns, resp.end_ns,
                    "error" if resp.error else "ok", resp.status_code, req.tid_start, resp.tid_end, req.size,
                    resp.size, _seq(req), _seq(resp), attrs, req_head, resp_head)  # fmt: skip
    if not req.expects_response:  # one-way by design: done when sent
        attrs["deeptrace.one_way"] = True
        return Span(kind, req.name or req.protocol, req.protocol, endpoint, req.start_ns, req.end_ns, "ok", None,
                    req.tid_start, None, req.size, 0, _seq(req), None, attrs, req_head, b"")  # fmt: skip
    attrs[NO_RESPONSE] = reason
    return Span(kind, req.name or req.protocol, req.protocol, endpoint, req.start_ns, req.end_ns, "error", reason,
                req.tid_start, None, req.size, 0, _seq(req), None, attrs, req_head, b"")  # fmt: skip


class Pairing:
    """Requests waiting for responses on one connection: by protocol id where the
    protocol has one, first in first out otherwise."""

    def __init__(self) -> None:
        self._in_order: deque[Message] = deque()
        self._by_key: dict[object, Message] = {}

    def __len__(self) -> int:
        return len(self._in_order) + len(self._by_key)

    def request(self, msg: Message) -> list[Message]:
        """Queue a request; returns requests pushed out by the bound (unanswered)."""
        if msg.pair_key is not None:
            old = self._by_key.pop(msg.pair_key, None)
            self._by_key[msg.pair_key] = msg
            return [old] if old is not None else []
        self._in_order.append(msg)
        return [self._in_order.popleft()] if len(self._in_order) > MAX_PENDING else []

    def response(self, msg: Message) -> Message | None:
        """The request this response answers, or None."""
        if msg.pair_key is not None:
            return self._by_key.pop(msg.pair_key, None)
        # A response cannot answer a request that started after it.
        if self._in_order and self._in_order[0].start_ns > msg.start_ns:
            return None
        return self._in_order.popleft() if self._in_order else None

    def expired(self, now_ns: int, timeout_ns: int) -> list[Message]:
        out = []
        while self._in_order and now_ns - self._in_order[0].end_ns > timeout_ns:
            out.append(self._in_order.popleft())
        for key in [k for k, m in self._by_key.items() if now_ns - m.end_ns > timeout_ns]:
            out.append(self._by_key.pop(key))
        return out

    def drain(self) -> list[Message]:
        out = list(self._in_order) + list(self._by_key.values())
        self._in_order.clear()
        self._by_key.clear()
        return out
