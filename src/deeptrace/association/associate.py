"""The association pipeline: exact links first, then an algorithm for each process's
remaining calls, then trace ids.

    spans (agent JSON) -> SpanRef -> links -> traces -> spans with parent/trace ids
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from contextlib import contextmanager

from deeptrace.association import baselines, joint
from deeptrace.association.exact import header_links, seq_join
from deeptrace.association.model import ROOT, Link, ProcessSpans, SpanRef
from deeptrace.association.names import ALGORITHM_NAMES, DEFAULT_ALGORITHM
from deeptrace.association.traces import trace_ids

Algorithm = Callable[[ProcessSpans], dict[int, Link]]

ALGORITHMS: dict[str, Algorithm] = {
    "joint": joint.link,  # ours: thread affinity where measured sound, then joint inference
    "fifo": baselines.fifo,
    "wap5": baselines.wap5,
    "vpath": baselines.vpath,
    "txn": baselines.txn,  # the original DeepTrace's transaction-based method
}
assert tuple(ALGORITHMS) == ALGORITHM_NAMES


@contextmanager
def cycle_collection_paused():
    """Association allocates millions of small objects that die without cycles; the
    allocations set off Python's cycle collector, which walks them again and again and
    finds nothing (15% of joint's time on 300,000 spans, the same peak memory without it).
    Paused for the call, and resumed only by the call that paused it."""
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


def processes(spans: list[SpanRef], known: dict[int, Link], settled: frozenset[int] = frozenset(),
              previous: dict[int, int] | None = None) -> list[ProcessSpans]:  # fmt: skip
    """Each process's requests and calls; a call with a known parent is evidence, a settled
    one (decided earlier, its parent gone) is left out, the rest are open (with the parent
    an earlier pass chose, if `previous` has one)."""
    previous = previous or {}
    by_key: dict[tuple, ProcessSpans] = {}
    for s in spans:
        p = by_key.get(s.process)
        if p is None:
            p = by_key[s.process] = ProcessSpans(s.process)
        (p.servers if s.kind == "SERVER" else p.clients).append(s)
    for p in by_key.values():
        p.servers.sort(key=lambda s: s.start_ns)
        p.clients.sort(key=lambda s: s.start_ns)
        for c in p.clients:
            link = known.get(c.index)
            if link is not None and link.parent is not None:
                p.known[c.index] = link.parent
            elif c.index not in settled:
                p.open_clients.append(c)
                if c.index in previous:
                    p.previous[c.index] = previous[c.index]
    return list(by_key.values())


@cycle_collection_paused()
def link_spans(spans: list[SpanRef], algorithm: str = DEFAULT_ALGORITHM, header_ids: bool = True,
               fixed: dict[int, Link] | None = None, previous: dict[int, int] | None = None) -> dict[int, Link]:  # fmt: skip
    """A Link for every span. `fixed` holds links decided earlier (a streaming window's
    published spans): they are kept as they are and are evidence for the rest, except that
    a fixed root can still be seq-joined to its caller (a caller whose host shipped late).
    `previous` (call -> parent) holds what an earlier pass chose for calls still open:
    inference starts from it, and may change it."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown association algorithm {algorithm!r}: choose from {', '.join(ALGORITHMS)}")
    choose = ALGORITHMS[algorithm]
    fixed = fixed or {}
    links = seq_join(spans, skip={i for i, lk in fixed.items() if lk.parent is not None})
    exact_calls = header_links(spans, skip=fixed) if header_ids else {}
    links.update(exact_calls)
    known = {**exact_calls, **{i: lk for i, lk in fixed.items() if spans[i].kind == "CLIENT"}}
    for process in processes(spans, known, frozenset(fixed), previous):
        if process.open_clients:
            links.update(choose(process))
    for i, lk in fixed.items():
        if lk.parent is not None or i not in links:
            links[i] = lk
    for s in spans:
        if s.index not in links:
            links[s.index] = Link(None, ROOT, 1.0)
    return links


@cycle_collection_paused()
def associate(span_dicts: list[dict], algorithm: str = DEFAULT_ALGORITHM, header_ids: bool = True) -> list[dict]:
    """Fill in trace_id, parent_span_id, link_method and link_confidence of each span
    (in place; the same list is returned)."""
    refs = [SpanRef.from_json(i, d) for i, d in enumerate(span_dicts)]
    links = link_spans(refs, algorithm, header_ids)
    traces = trace_ids(span_dicts, links)
    for d, ref in zip(span_dicts, refs):
        link = links[ref.index]
        d["parent_span_id"] = refs[link.parent].span_id if link.parent is not None else None
        d["trace_id"] = traces[ref.index]
        d["link_method"] = link.method
        d["link_confidence"] = round(link.confidence, 4)
    return span_dicts
