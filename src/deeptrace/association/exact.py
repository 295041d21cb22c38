"""Links that need no guessing.

- seq-join: the CLIENT span of a call and the SERVER span that answered it carry the
  same TCP byte range (the request's bytes, numbered by the connection's sequence
  numbers) on the same connection seen from both ends. HTTP/2 interleaves streams on a
  connection, so there the key is the connection and the stream id.
- header-id: a propagated trace id (W3C traceparent, b3, uber-trace-id, X-Request-ID)
  that a request came in with and a call went out with.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Container
from dataclasses import dataclass

from deeptrace.association.model import HEADER_ID, SEQ_JOIN, Link, SpanRef

_HEADER = "http.request.header."


SEQ_SLACK_NS = 5_000_000_000  # clock skew between hosts that a seq-join tolerates


def call_key(kind: str, req_seq, laddr: str, lport: int, raddr: str, rport: int, attributes: dict) -> str | None:
    """What a call's CLIENT span and the SERVER span that answered it have in common: the
    request's TCP byte range, or on HTTP/2 (streams interleave) the connection, seen from the
    client, and the stream id. The same text from either end; None when neither is known.
    (A server does not know the client side's ports behind a NAT: those calls join on the
    bytes alone.)"""
    if req_seq is not None:
        return f"seq {req_seq[0]} {req_seq[1]}"
    stream = attributes.get("http2.stream_id")
    if stream is None:
        return None
    return f"h2 {conn(kind, laddr, lport, raddr, rport)} {stream}"


def span_call_key(s: SpanRef) -> str | None:
    return call_key(s.kind, s.req_seq, s.laddr, s.lport, s.raddr, s.rport, s.attributes)


def json_call_key(d: dict) -> str | None:
    """call_key of a span as JSON (schema.Span)."""
    return call_key(d["kind"], d.get("req_seq"), d.get("laddr", ""), d.get("lport", 0), d.get("raddr", ""),
                    d.get("rport", 0), d.get("attributes") or {})  # fmt: skip


def conn(kind: str, laddr: str, lport: int, raddr: str, rport: int) -> str:
    """A call's connection seen from its client, from either end's addresses."""
    if kind == "CLIENT":
        return f"{laddr}:{lport}>{raddr}:{rport}"
    return f"{raddr}:{rport}>{laddr}:{lport}"


def client_conn(s: SpanRef) -> str:
    return conn(s.kind, s.laddr, s.lport, s.raddr, s.rport)


def json_client_conn(d: dict) -> str:
    return conn(d["kind"], d.get("laddr", ""), d.get("lport", 0), d.get("raddr", ""), d.get("rport", 0))


@dataclass(slots=True)
class CallEnd:
    """One end of a call (its CLIENT or its SERVER span) as the other end needs it to
    choose among several with its key; also what a shared store keeps of each accepted
    span (server/store/base.py Cluster)."""

    span_id: str
    start_ns: int
    end_ns: int
    conn: str  # client_conn
    index: int | None = None  # its position, when it is in the window being linked
    service: str = ""
    trace_id: str | None = None  # once it is stored
    key: str = ""  # call_key
    kind: str = ""  # CLIENT | SERVER


def seq_join(spans: list[SpanRef], slack_ns: int = SEQ_SLACK_NS, skip: Container[int] = ()) -> dict[int, Link]:
    """Parent CLIENT span for each SERVER span whose caller we saw (but those in `skip`).
    Hosts' clocks may differ, so time only breaks ties (`slack_ns` of skew is tolerated); a
    join whose addresses do not mirror (NAT in between) is still a join, on the bytes alone."""
    callers: dict[str, list[CallEnd]] = defaultdict(list)
    for s in spans:
        if s.kind == "CLIENT" and (key := span_call_key(s)) is not None:
            callers[key].append(CallEnd(s.span_id, s.start_ns, s.end_ns, client_conn(s), s.index))
    links: dict[int, Link] = {}
    for s in spans:
        if s.kind != "SERVER" or s.index in skip or (key := span_call_key(s)) is None:
            continue
        best = best_partner(s.start_ns, s.end_ns, client_conn(s), callers.get(key, ()), slack_ns)
        if best is not None:
            links[s.index] = Link(best.index, SEQ_JOIN, 1.0)
    return links


def best_partner(start_ns: int, end_ns: int, span_conn: str, others, slack_ns: int = SEQ_SLACK_NS) -> CallEnd | None:
    """Of the spans at the other end with a span's call key, the other end of its call: near
    it in time, the mirrored connection (the span's client_conn) first, then the closest
    start (a reused port, a wrapped seq)."""
    near = [c for c in others if c.start_ns <= end_ns + slack_ns and start_ns <= c.end_ns + slack_ns]
    if not near:
        return None
    return min(near, key=lambda c: (c.conn != span_conn, abs(c.start_ns - start_ns)))


def propagated_id(span: SpanRef) -> str | None:
    """The trace-wide id a request carries, whichever convention it uses."""
    if span.header_id == "":  # not looked for yet: a streaming window asks at every pass
        span.header_id = _propagated_id(span.attributes)
    return span.header_id


# The request headers that carry a propagated id: a trace's, or a request's own.
REQUEST_ID_HEADERS = ("x-request-id", "x-correlation-id")
PROPAGATION_HEADERS = ("traceparent", "x-b3-traceid", "b3", "uber-trace-id", *REQUEST_ID_HEADERS)


def _propagated_id(a: dict) -> str | None:
    if (v := a.get(_HEADER + "traceparent")) and v.count("-") >= 3:
        return v.split("-")[1]
    if v := a.get(_HEADER + "x-b3-traceid"):
        return v
    if (v := a.get(_HEADER + "b3")) and "-" in v:
        return v.split("-")[0]
    if (v := a.get(_HEADER + "uber-trace-id")) and ":" in v:
        return v.split(":")[0]
    for name in REQUEST_ID_HEADERS:
        if v := a.get(_HEADER + name):
            return v
    return None


def header_links(spans: list[SpanRef], skip: Container[int] = ()) -> dict[int, Link]:
    """Parent SERVER span for each CLIENT span (but those in `skip`) that went out with the
    id its process's request came in with, and that ran inside that request."""
    servers: dict[tuple, list[SpanRef]] = defaultdict(list)
    for s in spans:
        if s.kind == "SERVER" and (pid := propagated_id(s)) is not None:
            servers[(s.process, pid)].append(s)
    links: dict[int, Link] = {}
    for c in spans:
        if c.kind != "CLIENT" or c.index in skip or (pid := propagated_id(c)) is None:
            continue
        inside = [s for s in servers.get((c.process, pid), ()) if s.start_ns <= c.start_ns and c.end_ns <= s.end_ns]
        if inside:
            # One trace can visit a process twice; the innermost request is the one serving.
            parent = max(inside, key=lambda s: s.start_ns)
            links[c.index] = Link(parent.index, HEADER_ID, 1.0 if len(inside) == 1 else 0.9)
    return links
