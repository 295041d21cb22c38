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

from deeptrace.association.model import HEADER_ID, SEQ_JOIN, Link, SpanRef

_HEADER = "http.request.header."


def _mirrored(client: SpanRef, server: SpanRef) -> bool:
    return (client.laddr, client.lport, client.raddr, client.rport) == (
        server.raddr, server.rport, server.laddr, server.lport)  # fmt: skip


def _overlap(a: SpanRef, b: SpanRef, slack_ns: int) -> bool:
    return a.start_ns <= b.end_ns + slack_ns and b.start_ns <= a.end_ns + slack_ns


def seq_join(spans: list[SpanRef], slack_ns: int = 5_000_000_000, skip: Container[int] = ()) -> dict[int, Link]:
    """Parent CLIENT span for each SERVER span whose caller we saw (but those in `skip`).
    Hosts' clocks may differ, so time only breaks ties (`slack_ns` of skew is tolerated); a
    join whose addresses do not mirror (NAT in between) is still a join, on the bytes alone."""
    by_seq: dict[tuple, list[SpanRef]] = defaultdict(list)
    by_stream: dict[tuple, list[SpanRef]] = defaultdict(list)
    for s in spans:
        if s.kind != "CLIENT":
            continue
        if s.req_seq is not None:
            by_seq[s.req_seq].append(s)
        elif "http2.stream_id" in s.attributes:
            by_stream[(s.laddr, s.lport, s.raddr, s.rport, s.attributes["http2.stream_id"])].append(s)
    links: dict[int, Link] = {}
    for s in spans:
        if s.kind != "SERVER" or s.index in skip:
            continue
        if s.req_seq is not None:
            callers = by_seq.get(s.req_seq, ())
        elif "http2.stream_id" in s.attributes:
            callers = by_stream.get((s.raddr, s.rport, s.laddr, s.lport, s.attributes["http2.stream_id"]), ())
        else:
            continue
        best = _best_caller(s, callers, slack_ns)
        if best is not None:
            links[s.index] = Link(best.index, SEQ_JOIN, 1.0)
    return links


def _best_caller(server: SpanRef, callers, slack_ns: int) -> SpanRef | None:
    near = [c for c in callers if _overlap(c, server, slack_ns)]
    if not near:
        return None
    # Mirrored addresses first, then the closest in time (a reused port, a wrapped seq).
    return min(near, key=lambda c: (not _mirrored(c, server), abs(c.start_ns - server.start_ns)))


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
