"""Association over a sliding time window, for spans that keep arriving.

A span is held for `hold_s` after it ended: calls finish before the requests that made
them, and a caller's span may come late from another host, so its links are revised at
every pass while it waits. Once published, a span keeps its trace id, and spans that
link to it later inherit that id, so a trace is not split at a window border. Published
spans stay as context for `context_s` so that late spans can still link to them; their
links are kept as published and are evidence for the held spans, not decided again
(`relink_published` decides them again every pass: slower, and no more accurate on
bench/accuracy's workload). A held call is decided afresh at every pass, but inference
starts from the parent the last pass chose, so that what earlier passes learnt carries
over although each learns only from the calls it holds.

Spans of other hosts may be linked by another server (server/cluster.py): then a SERVER
span whose caller is not here may have been called from a host linked elsewhere, and its
trace is that caller's. `resolve` says, for such roots, whether a caller with its call key
was accepted and, once it is stored, who it is and in which trace. A span whose trace hangs
on a caller not yet stored waits, its links decided and kept as they are (so that they are
the links a single server would have published), until the caller is stored or
`max_wait_s` has passed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from deeptrace.association.associate import DEFAULT_ALGORITHM, link_spans
from deeptrace.association.exact import CallEnd, span_call_key
from deeptrace.association.model import SEQ_JOIN, Link, SpanRef
from deeptrace.association.traces import components, trace_ids

WAIT = "wait"  # resolve's answer for a root whose caller was accepted and is not stored yet
CALLER = "_caller"  # where a span keeps its caller stored by another server
_WAITING_SINCE = "_waiting_since"
_NO_CALLER = "_no_caller"  # asked: no caller was accepted
# roots -> span_id -> None (no caller was accepted), WAIT, or the caller as stored
Resolve = Callable[[list[SpanRef]], dict[str, "CallEnd | str | None"]]


@dataclass
class StreamStats:
    spans_in: int = 0
    spans_out: int = 0
    passes: int = 0
    late_links: int = 0  # spans linked to a parent or child already published
    split_traces: int = 0  # two published traces found to be one: they keep their ids
    remote_callers: int = 0  # roots whose caller another server linked
    callers_never_stored: int = 0  # roots that waited max_wait_s for an accepted caller in vain


class StreamingAssociator:
    def __init__(self, algorithm: str = DEFAULT_ALGORITHM, header_ids: bool = True, hold_s: float = 5.0,
                 context_s: float = 10.0, relink_published: bool = False, resolve: Resolve | None = None,
                 max_wait_s: float = 60.0) -> None:  # fmt: skip
        self.algorithm, self.header_ids = algorithm, header_ids
        self.relink_published = relink_published
        self.hold_ns, self.context_ns = int(hold_s * 1e9), int(context_s * 1e9)
        self.resolve, self.max_wait_ns = resolve, int(max_wait_s * 1e9)
        self.pending: list[dict] = []
        self.waiting: list[dict] = []  # links decided; the trace waits for a caller another server links
        self.published: list[dict] = []  # context: already out, ids fixed
        self.stats = StreamStats()
        self._splits_seen: set[str] = set()
        self._refs: dict[str, SpanRef] = {}  # decoded once per span, not once per pass
        self._previous: dict[str, str] = {}  # held call's span_id -> the parent the last pass chose

    def _ref(self, index: int, d: dict) -> SpanRef:
        ref = self._refs.get(d["span_id"])
        if ref is None:
            ref = self._refs[d["span_id"]] = SpanRef.from_json(index, d)
        ref.index = index
        return ref

    def push(self, spans: list[dict]) -> list[tuple[dict, str]]:
        """Hold spans for linking. Each is decoded now, so that one that cannot be is handed
        back with why (and not held) instead of failing every later pass."""
        rejected = []
        for d in spans:
            if d["span_id"] in self._refs:  # held or in the context window: ids must be unique there
                rejected.append((d, f"duplicate span_id {d['span_id']}: a span with that id is being linked"))
                continue
            try:
                self._ref(0, d)
            except Exception as e:  # noqa: BLE001 - whatever a bad span breaks, it stays out
                rejected.append((d, f"cannot be linked: {type(e).__name__}: {e}"))
                continue
            self.pending.append(d)
            self.stats.spans_in += 1
        return rejected

    def pop_unlinked(self, now_ns: int | None) -> list[dict]:
        """The spans due now (all with None), each its own trace: for when linking them
        failed. They are not kept as context, since they may be what made it fail."""
        cut = None if now_ns is None else now_ns - self.hold_ns
        out = self.waiting + [d for d in self.pending if cut is None or d["end_ns"] < cut]
        self.pending = [d for d in self.pending if not (cut is None or d["end_ns"] < cut)]
        self.waiting = []
        for d in out:
            d["parent_span_id"], d["link_method"], d["link_confidence"] = None, None, None
            self._refs.pop(d["span_id"], None)
        self.stats.spans_out += len(out)
        return out

    def pop_ready(self, now_ns: int) -> list[dict]:
        """Spans that ended more than hold_s ago, linked; call about once a second."""
        cut = now_ns - self.hold_ns
        if not self.waiting and not any(d["end_ns"] < cut for d in self.pending):
            return []
        return self._pass(lambda d: d["end_ns"] < cut, now_ns)

    def close(self, now_ns: int) -> list[dict]:
        """Everything still held (what waits for a caller is not waited for)."""
        if not self.pending and not self.waiting:
            return []
        resolve, self.resolve = self.resolve, None
        try:
            return self._pass(lambda d: True, now_ns)
        finally:
            self.resolve = resolve

    def drop(self, which: Callable[[dict], bool]) -> None:
        """Let go of held spans (another server links them now): the ones `which` picks."""
        dropped = [d for d in self.pending + self.waiting if which(d)]
        context = [d for d in self.published if which(d)]  # taken again later, they must not count as seen
        if dropped or context:
            self.pending = [d for d in self.pending if not which(d)]
            self.waiting = [d for d in self.waiting if not which(d)]
            self.published = [d for d in self.published if not which(d)]
            for d in dropped + context:
                self._refs.pop(d["span_id"], None)
                self._previous.pop(d["span_id"], None)

    def _pass(self, ready, now_ns: int) -> list[dict]:
        self.stats.passes += 1
        keep_from, context = now_ns - self.context_ns, []
        for d in self.published:
            if d["end_ns"] >= keep_from:
                context.append(d)
            else:  # out of the window: its decoded form goes with it
                self._refs.pop(d["span_id"], None)
                self._splits_seen.discard(d["span_id"])
        self.published = context
        spans = self.published + self.waiting + self.pending
        refs = [self._ref(i, d) for i, d in enumerate(spans)]
        n_old, n_decided = len(self.published), len(self.published) + len(self.waiting)
        fixed = {i: d["trace_id"] for i, d in enumerate(self.published)}
        position = {d["span_id"]: i for i, d in enumerate(spans)}
        pinned = self._pinned(spans, n_old if self.relink_published else 0, n_decided, position)
        last_pass = {position[c]: position[p] for c, p in self._previous.items() if c in position and p in position}
        links = link_spans(refs, self.algorithm, self.header_ids, pinned, last_pass)
        self._count_splits(spans, links, n_old, fixed)
        due = [i for i in range(n_decided, len(spans)) if ready(spans[i])]
        rep = components(len(spans), links)
        waits = self._resolve_roots(spans, refs, links, rep, fixed, list(range(n_old, n_decided)) + due, now_ns)
        traces = trace_ids(spans, links, fixed, rep)
        # Held spans with a child already out: counted as late links when they go out.
        parents_late = {lk.parent for c, lk in links.items()
                        if c < n_old and lk.parent is not None and lk.parent >= n_old}  # fmt: skip
        out, waiting, keep, previous = [], [], [], {}
        for i in range(n_old, len(spans)):
            d, link = spans[i], links[i]
            decided = i < n_decided
            if not decided and not ready(d):
                keep.append(d)
                if refs[i].kind == "CLIENT" and link.parent is not None:
                    previous[d["span_id"]] = refs[link.parent].span_id
                continue
            # A waiting root whose caller has come into this window since is joined to it.
            if not decided or (d["parent_span_id"] is None and link.parent is not None):
                d["parent_span_id"] = refs[link.parent].span_id if link.parent is not None else None
                d["link_method"] = link.method
                d["link_confidence"] = round(link.confidence, 4)
            if rep[i] in waits:
                waiting.append(d)
                continue
            if CALLER in d:
                d["parent_span_id"], d["link_method"], d["link_confidence"] = d[CALLER].span_id, SEQ_JOIN, 1.0
            d["trace_id"] = traces[i]
            if (link.parent is not None and link.parent < n_old) or i in parents_late:
                self.stats.late_links += 1
            out.append(d)
        self.pending, self.waiting = keep, waiting
        self._previous = previous
        self.published.extend(out)
        self.stats.spans_out += len(out)
        return out

    def _resolve_roots(self, spans: list[dict], refs: list[SpanRef], links: dict[int, Link], rep: list[int],
                       fixed: dict[int, str], due: list[int], now_ns: int) -> set[int]:  # fmt: skip
        """Ask `resolve` about the roots of the traces that have spans to write now; a root
        whose caller is stored lends it its trace id. Returns the traces (as components)
        that wait for a caller."""
        if self.resolve is None or not due:
            return set()
        wanted = {rep[i] for i in due}
        published = {rep[i] for i in fixed}  # traces out already, with their ids
        # A root that had no caller accepted is asked again only when it is due itself (its
        # caller, which ends after it, has been shipped by then): its trace's other spans
        # went out with its own trace id meanwhile, as on one server.
        due_now = set(due)
        roots = [i for i in range(len(fixed), len(spans))
                 if rep[i] in wanted and links[i].parent is None and CALLER not in spans[i]
                 and refs[i].kind == "SERVER" and span_call_key(refs[i]) is not None
                 and ((_NO_CALLER not in spans[i] and rep[i] not in published) or i in due_now)]  # fmt: skip
        if not roots:
            return set()
        answers = self.resolve([refs[i] for i in roots])
        waits = set()
        for i in roots:
            d, answer = spans[i], answers.get(refs[i].span_id)
            if rep[i] in published:
                # Its trace keeps the id it went out with; the root still gets its caller, and
                # the two traces are counted as one split (as one server does).
                if isinstance(answer, CallEnd):
                    d[CALLER] = answer
                    self.stats.remote_callers += 1
                    self.stats.split_traces += 1
            elif answer == WAIT:
                since = d.setdefault(_WAITING_SINCE, now_ns)
                if now_ns - since < self.max_wait_ns:
                    waits.add(rep[i])
                else:
                    self.stats.callers_never_stored += 1
            elif isinstance(answer, CallEnd):
                d[CALLER] = answer
                d["trace_id"] = answer.trace_id  # the root lends it to its trace
                self.stats.remote_callers += 1
            else:
                d[_NO_CALLER] = True
        return waits

    @staticmethod
    def _pinned(spans: list[dict], start: int, end: int, position: dict[str, int]) -> dict[int, Link]:
        """Decided spans' links (published, or waiting for their trace) as decided: evidence
        for the pending ones, not decided again."""
        return {i: Link(position.get(spans[i]["parent_span_id"]), spans[i]["link_method"], spans[i]["link_confidence"])
                for i in range(start, end)}  # fmt: skip

    def _count_splits(self, spans: list[dict], links, n_old: int, fixed: dict[int, str]) -> None:
        """A link between two published spans of different traces: counted once. Pinned,
        only a published root's link can change (its late caller, by the bytes), so the
        case is: the caller went out in its own request's trace, which was published too."""
        for child, link in links.items():
            if (link.parent is not None and child < n_old and link.parent < n_old
                    and fixed[child] != fixed[link.parent] and spans[child]["span_id"] not in self._splits_seen):
                    self._splits_seen.add(spans[child]["span_id"])
                    self.stats.split_traces += 1
