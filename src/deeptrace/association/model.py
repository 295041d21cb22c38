"""What association reads of a span, and what it decides about it.

Association works on the agent's span JSON (spans.Span.to_json_dict), so that the CLI,
the agent and the server share one path. `SpanRef` keeps only what linking needs, with
the payload heads decoded once.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass, field
from functools import lru_cache

# How a link was made, most certain first.
SEQ_JOIN = "seq-join"  # CLIENT and SERVER span of one call: same TCP bytes on one connection
HEADER_ID = "header-id"  # a propagated id (traceparent, b3, uber-trace-id, x-request-id)
THREAD = "thread"  # the call went out on the thread that was serving the request
INFERRED = "inferred"  # chosen by an inference algorithm
ROOT = "root"  # no parent: nothing we saw called this span
_DIGITS = re.compile(r"\d+")


@dataclass(slots=True)
class SpanRef:
    index: int  # position in the input list
    span_id: str
    kind: str  # SERVER | CLIENT
    name: str  # the operation: digits folded, so an id left in a name does not make each call its own
    protocol: str
    service: str
    host: str
    pid: int
    tid: int
    resp_tid: int | None
    start_ns: int
    end_ns: int
    laddr: str
    lport: int
    raddr: str
    rport: int
    req_seq: tuple[int, int] | None
    resp_seq: tuple[int, int] | None
    attributes: dict
    req_head: bytes
    resp_head: bytes
    # Fields found in the heads (features.py), kept: a streaming window links a span many times.
    req_fields: frozenset[str] | None = None
    all_fields: frozenset[str] | None = None
    header_id: str | None = ""  # the propagated trace id (exact.py); "" until looked for

    @property
    def process(self) -> tuple[str, int]:
        return (self.host, self.pid)

    @classmethod
    def from_json(cls, index: int, d: dict) -> SpanRef:
        req_seq, resp_seq = d.get("req_seq"), d.get("resp_seq")
        return cls(
            index, d["span_id"], d["kind"], _fold_digits(d.get("name", "")), d.get("protocol", ""), d.get("service", ""),
            d.get("host", ""), d["pid"], d.get("tid", 0), d.get("resp_tid"), d["start_ns"], d["end_ns"],
            d.get("laddr", ""), d.get("lport", 0), d.get("raddr", ""), d.get("rport", 0),
            tuple(req_seq) if req_seq else None, tuple(resp_seq) if resp_seq else None,
            d.get("attributes") or {}, _b64(d.get("req_head")), _b64(d.get("resp_head")),
        )  # fmt: skip


def call_op(call: SpanRef) -> str:
    """A call's operation: what it asked and of whom. Two callees may serve the same path
    (`GET /` on b and on c: the original DeepTrace's Go test services do), and the
    original's endpoint, the Host header, tells them apart; the address does for every
    protocol."""
    return f"{call.name} -> {call.raddr}:{call.rport}"


@lru_cache(maxsize=1 << 14)
def _fold_digits(name: str) -> str:
    return _DIGITS.sub("#", name)


def _b64(text: str | None) -> bytes:
    # binascii directly: base64.b64decode's argument checks cost as much as the decoding.
    return binascii.a2b_base64(text) if text else b""


@dataclass(slots=True)
class Link:
    """The parent chosen for one span (None for a root), how, and how sure."""

    parent: int | None  # SpanRef.index of the parent
    method: str
    confidence: float


@dataclass(slots=True)
class ProcessSpans:
    """One process's spans as an algorithm sees them: the requests it served and the
    calls it made. Calls already linked exactly (header ids) are in `known`, so an
    algorithm can learn from them; it decides the parents of `open_clients`. `previous`
    holds what an earlier pass chose for some open calls (a streaming window decides a
    held call at every pass): a place to start from, not a decision."""

    key: tuple[str, int]  # (host, pid)
    servers: list[SpanRef] = field(default_factory=list)  # sorted by start_ns
    clients: list[SpanRef] = field(default_factory=list)  # every CLIENT span, sorted by start_ns
    known: dict[int, int] = field(default_factory=dict)  # client index -> server index
    open_clients: list[SpanRef] = field(default_factory=list)  # clients still to decide, sorted by start_ns
    previous: dict[int, int] = field(default_factory=dict)  # open client index -> server index
