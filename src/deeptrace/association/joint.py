"""Our association: thread affinity where the process is measured to be thread-per-
request, and joint inference for the rest.

Inference chooses, for each call a process made, the request it served at the time
(a SERVER span of the same process that contains the call). It learns from the data
itself, per process, how the true parent differs from the other candidates, as
likelihood ratios (true pairs against all candidate pairs) of:

- fields: the weight (IDF) of the transaction fields both carry (user ids, SKUs);
- operations: which call operations each request operation makes (API affinity);
- trigger gap: time from the parent's latest event before the call (its own start,
  or a sibling call's start or end) to the call's start: a handler issues its next call
  right after the previous step finished, an unrelated request's events are random;
- next gap: time from the call's end to the parent's next event (the next sibling's
  start or the parent's response);
- threads: whether the call was made on the thread that read the request, the one that
  answered it (worker pools: an I/O thread reads, a worker handles and answers), both or
  neither; an event loop does everything on one thread, and there this weighs nothing;
- thread chain: whether the call was sent on the thread of the request's step before it
  (a sibling's start or end) and its response read on the thread of the step after it:
  a runtime that moves a handler between threads (Go) still often runs its next step on
  the thread that woke it, given the event kinds (the gaps weigh those);
- thread pair: which thread read the call's response, for the thread that answered the
  request, given whether they are one thread (a pool thread with a client of its own, or
  an event loop with connections of its own, reads its calls' responses on a thread of
  its own); weighed only where it explains the chosen pairs by more than it has values;
- call count: how many calls of that operation the request operation makes.

It starts from the unambiguous calls (one candidate) and the fields, assigns every call
jointly (calls with a clear winner take it; the rest are a min-cost matching of calls
to request slots, a request's slots for each operation priced by its call pattern),
re-learns the ratios from that assignment and repeats. Gaps depend on the assignment,
so each round sees the sibling structure the last round found.

The work is done on arrays of candidate pairs (numpy), so that a million spans take
seconds, not minutes.
"""

from __future__ import annotations

from bisect import bisect_right

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from deeptrace.association.candidates import Containment
from deeptrace.association.features import shared_weights, span_fields
from deeptrace.association.gaps import BINS, gap_bins
from deeptrace.association.model import INFERRED, ROOT, Link, ProcessSpans, SpanRef, call_op
from deeptrace.association.refine import refine
from deeptrace.association.threads import ServingThreads, measure, thread_links
from deeptrace.protocols.base import CONNECTION_SETUP

ROUNDS = 4
TEMPERATURE = 1.4  # set on simulated event loops (tests/loopsim.py), checked by bench/accuracy
CLEAR_MARGIN = 6.0  # nats: a call this much surer of one request is not matched jointly
CHUNK = 500  # calls per joint matching: smaller matchings are faster, and as accurate on bench/accuracy
MATCH_CANDIDATES = 8  # best-scored candidates per call offered to the matching
KEEP = 16  # candidates per call kept after the first learning
PART_CALLS = 20_000  # calls of a process inferred together, at least, where the process is ever idle
MAX_SLOTS = 32  # calls of one operation a request can be priced for
_FIELD_BINS = np.array([0.5, 2.0, 4.0, 6.0, 9.0])
_LOG_UNSEEN = float(np.log(1e-3))  # a call count never observed
_OVERFLOW = 1e6


def link(process: ProcessSpans, inference: type[Inference] | None = None) -> dict[int, Link]:
    """Links for the process's open calls; `inference` replaces the inference (benchmarks
    run it with a model fitted on the truth)."""
    threads = ServingThreads(process.servers)
    use = measure(process, threads)
    links = thread_links(process, threads, use)
    rest = [c for c in process.open_clients if c.index not in links]
    if rest:
        fixed = dict(process.known)
        fixed.update({i: lk.parent for i, lk in links.items()})
        for part, calls in _independent_parts(process, rest):
            links.update((inference or Inference)(part, calls, fixed).run())
    _follow_setup(process, links)
    return links


def _follow_setup(process: ProcessSpans, links: dict[int, Link]) -> None:
    """A connection set-up exchange (CONNECTION_SETUP: Redis HELLO on a new connection, a
    statement prepared for its execution) serves the request that the next exchange on
    its connection serves, where that request was open when the set-up was sent. Timing
    alone cannot tell: an event loop's requests open their pool's new connections at one
    instant, and every HELLO looks alike."""
    if not any(c.attributes.get(CONNECTION_SETUP) for c in process.clients):
        return
    servers = {s.index: s for s in process.servers}
    by_connection: dict[tuple, list[SpanRef]] = {}
    for c in process.clients:  # sorted by start
        by_connection.setdefault((c.laddr, c.lport, c.raddr, c.rport), []).append(c)
    for calls in by_connection.values():
        served: Link | None = None  # the link of the next exchange that is not set-up
        for c in reversed(calls):
            if not c.attributes.get(CONNECTION_SETUP):
                served = links.get(c.index)
                if served is None and c.index in process.known:
                    served = Link(process.known[c.index], INFERRED, 1.0)
                continue
            if served is None or served.parent is None or c.index not in links:
                continue
            parent = servers.get(served.parent)
            if parent is not None and parent.start_ns <= c.start_ns and c.end_ns <= parent.end_ns:
                links[c.index] = Link(served.parent, INFERRED, served.confidence)


def _independent_parts(process: ProcessSpans, calls: list[SpanRef]) -> list[tuple[ProcessSpans, list[SpanRef]]]:
    """The calls in runs of at least PART_CALLS, each with the part of the process they
    fall in, cut only where none of its requests is open (no call can have a candidate on
    both sides): a long busy capture is inferred a part at a time, its memory and the cost
    of each learning round bounded by the part, while each part still has enough calls to
    learn from."""
    calls = sorted(calls, key=lambda c: c.start_ns)
    if len(calls) < 2 * PART_CALLS:
        return [(process, calls)]
    servers = process.servers  # sorted by start
    cuts, open_until = [], None  # (instant when no request is open, servers that started before it)
    for i, srv in enumerate(servers):
        if open_until is not None and srv.start_ns > open_until:
            cuts.append((open_until, i))
        open_until = srv.end_ns if open_until is None else max(open_until, srv.end_ns)
    cuts.append((float("inf"), len(servers)))
    parts, part, first_server, k = [], [], 0, 0
    for c in calls:
        while c.start_ns > cuts[k][0]:
            if len(part) >= PART_CALLS:
                parts.append((first_server, cuts[k], part))
                part, first_server = [], cuts[k][1]
            k += 1
        part.append(c)
    if parts and len(part) < PART_CALLS:
        first, _, last_part = parts.pop()  # a short tail learns with the part before it
        part, first_server = last_part + part, first
    parts.append((first_server, cuts[-1], part))
    client_starts = [c.start_ns for c in process.clients]
    out, since = [], float("-inf")
    for first, (until, end_server), part_calls in parts:
        clients = process.clients[bisect_right(client_starts, since) : bisect_right(client_starts, until)]
        inside = {c.index for c in clients}
        out.append((ProcessSpans(process.key, servers[first:end_server], clients,
                                 {c: s for c, s in process.known.items() if c in inside}, part_calls,
                                 {c: s for c, s in process.previous.items() if c in inside}), part_calls))  # fmt: skip
        since = until
    return out


def _codes(names: list[str], table: dict[str, int]) -> np.ndarray:
    return np.array([table.setdefault(n, len(table)) for n in names], dtype=np.int64)


def _tids(values: list[int | None], missing: int) -> np.ndarray:
    return np.array([missing if v is None else v for v in values], dtype=np.int64)


def _log_share(values: np.ndarray, size: int) -> np.ndarray:
    """Each value's log frequency among `values`, add-one smoothed."""
    counts = np.bincount(values, minlength=size).astype(float)
    return np.log((counts[values] + 1) / (counts.sum() + np.count_nonzero(counts) + 1))


def _log_ratio(values: np.ndarray, true: np.ndarray, size: int) -> np.ndarray:
    """Per value, log P(value | true pair) / P(value | candidate pair), add-one smoothed
    so that unseen values stay finite."""
    every = np.bincount(values, minlength=size).astype(float)
    hits = np.bincount(values[true], minlength=size).astype(float)
    k = np.count_nonzero(every) + 1
    return np.log((hits + 1) / (hits.sum() + k)) - np.log((every + 1) / (every.sum() + k))


def _log_ratio_given(values: np.ndarray, true: np.ndarray, size: int, group: int) -> np.ndarray:
    """Per value, log P(value | its group, true pair) / P(value | its group, candidate pair),
    the group being value // group (what another feature weighs already). A group's true
    pairs start from its candidates' frequencies, one pseudo-pair per value seen there, so
    that a value seen rarely (one of many thread pairs) weighs little either way."""
    every = np.bincount(values, minlength=size).astype(float)
    hits = np.bincount(values[true], minlength=size).astype(float)
    of = np.arange(size) // group
    seen = np.bincount(of, weights=every > 0, minlength=size // group)[of] + 1
    candidate = (every + 1) / (np.bincount(of, weights=every, minlength=size // group)[of] + seen)
    in_group = np.bincount(of, weights=hits, minlength=size // group)[of]
    return np.log((hits + seen * candidate) / (in_group + seen)) - np.log(candidate)


class Inference:
    TRIGGER_KINDS = 3  # what a call follows: its request's start, a sibling's start or end
    NEXT_KINDS = 2  # what follows a call: the response or a sibling's start
    SAME_THREAD = 4  # chain values per (trigger kind, next kind): made / answered on that event's thread or not

    def __init__(self, process: ProcessSpans, clients: list[SpanRef], fixed: dict[int, int]) -> None:
        servers = process.servers
        self.process = process
        self.server_index = np.array([s.index for s in servers], dtype=np.int64)
        row_of = {s.index: r for r, s in enumerate(servers)}
        starts = np.array([c.start_ns for c in clients], dtype=np.int64)
        ends = np.array([c.end_ns for c in clients], dtype=np.int64)
        call_of_pair, ps = Containment(servers).pairs(starts, ends)
        has = np.zeros(len(clients), dtype=bool)
        has[call_of_pair] = True
        self.roots = [c for c, h in zip(clients, has.tolist()) if not h]
        calls = self.calls = [c for c, h in zip(clients, has.tolist()) if h]
        pc = (np.cumsum(has) - 1)[call_of_pair]
        if not calls:
            return
        ops: dict[str, int] = {}
        self.s_op = _codes([s.name for s in servers], ops)
        self.c_op = _codes([call_op(c) for c in calls], ops)
        self.s_start = np.array([s.start_ns for s in servers], dtype=np.int64)
        self.s_end = np.array([s.end_ns for s in servers], dtype=np.int64)
        self.c_start = np.array([c.start_ns for c in calls], dtype=np.int64)
        self.c_end = np.array([c.end_ns for c in calls], dtype=np.int64)
        # Threads: a missing answering thread is -1 for a request, -2 for a call, so that two
        # unknowns never count as the same thread.
        s_tid = self.s_tid = np.array([s.tid for s in servers], dtype=np.int64)
        s_resp_tid = self.s_resp_tid = _tids([s.resp_tid for s in servers], -1)
        c_tid = self.c_tid = np.array([c.tid for c in calls], dtype=np.int64)
        self.c_resp_tid = _tids([c.resp_tid for c in calls], -2)
        # Calls whose parent is known (header ids, threads): their events and counts are evidence.
        known = [(row_of[s], process_call) for process_call, s in _known_calls(process, fixed) if s in row_of]
        self.f_row = np.array([r for r, _ in known], dtype=np.int64)
        self.f_start = np.array([c.start_ns for _, c in known], dtype=np.int64)
        self.f_end = np.array([c.end_ns for _, c in known], dtype=np.int64)
        self.f_op = _codes([call_op(c) for _, c in known], ops)
        self.f_tid = np.array([c.tid for _, c in known], dtype=np.int64)
        self.f_resp_tid = _tids([c.resp_tid for _, c in known], -2)
        self.n_ops = len(ops)
        self.pc, self.ps = pc, ps
        self._queries: tuple[_Queries, _Queries] | None = None
        self.t0 = int(min(self.s_start.min(), self.c_start.min()))
        self.width = int(max(self.s_end.max(), self.c_end.max())) - self.t0 + 2
        self.pair_op = self.s_op[self.ps] * self.n_ops + self.c_op[self.pc]
        self.field_bin = self._field_bins(servers, calls)
        # Which of the request's threads made the call: the one that read it, the one that
        # answered it (a worker pool: an I/O thread reads, a worker handles and answers), both, neither.
        self.thread_rel = 2 * (c_tid[self.pc] == s_tid[self.ps]) + (c_tid[self.pc] == s_resp_tid[self.ps])
        # Which thread read the call's response, for the thread that answered the request: a
        # pool thread with its own client, or an event loop with its own connections (Netty,
        # Vert.x), reads its calls' responses on a thread of its own. Weighed given whether
        # they are one thread and given thread_rel: those the thread chain and thread_rel
        # weigh already (Go's scheduler often answers on the thread that read the last call).
        s_answer, c_read = s_resp_tid[self.ps], self.c_resp_tid[self.pc]
        _, pair = np.unique(s_answer * (1 << 32) + c_read, return_inverse=True)
        self.n_thread_pairs = int(pair.max(initial=-1)) + 1
        self.thread_pair = (self.thread_rel * 2 + (s_answer == c_read)) * self.n_thread_pairs + pair.ravel()

    def _field_bins(self, servers: list[SpanRef], calls: list[SpanRef]) -> np.ndarray:
        s_fields = [span_fields(s) for s in servers]
        c_fields = [span_fields(c) for c in calls]
        shared = shared_weights(c_fields, s_fields, self.pc, self.ps)
        return np.searchsorted(_FIELD_BINS, shared, side="right")

    def run(self) -> dict[int, Link]:
        links = {c.index: Link(None, ROOT, 1.0 if not self.process.servers else 0.9) for c in self.roots}
        if not self.calls:
            return links
        assign, score, slots = self._infer()
        conf = self._confidence(score, slots, assign)
        for c, parent, p in zip(self.calls, self.server_index[assign].tolist(), conf.tolist()):
            links[c.index] = Link(parent, INFERRED, p)
        return links

    def _infer(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each call's request (a row of the servers), the pairs' scores and the slot prices."""
        # Learning from an assignment can settle where that assignment put it: start from
        # two unlike ones and keep the result that explains the data best (the features of
        # the pairs it chose most predictable, as a description length). Which start ends
        # best is not known from their first learning (on tests/loopsim.py's event loops
        # the start that fits worse at first ends better), so both go all the way.
        starts = [self._previous_or_latest_start(), self._first_come()]
        learnt = [self._learn(assign) for assign in starts]
        keep = self._worth_keeping(starts, [score for score, *_ in learnt])
        if not keep.all():
            self._keep_pairs(keep)
            learnt = [(score[keep], *rest) for score, *rest in learnt]
        best = None
        for assign, (score, slots, fit, tables) in zip(starts, learnt):
            candidates = [(fit, assign, score, slots, tables)]
            for _ in range(ROUNDS):
                previous, assign = assign, self._assign(score, slots)
                if np.array_equal(assign, previous):
                    break  # settled: another round would learn the same ratios
                score, slots, fit, tables = self._learn(assign)
                candidates.append((fit, assign, score, slots, tables))
            top = max(candidates, key=lambda c: c[0])
            if best is None or top[0] > best[0]:
                best = top
        _, assign, score, slots, tables = best
        margin = self._ranked(score)[2]
        if (margin < CLEAR_MARGIN).any():
            assign = refine(self, tables, assign, score, margin, CLEAR_MARGIN)
            score, slots, _, _ = self._learn(assign)
        return assign, score, slots

    def _worth_keeping(self, assigns: list[np.ndarray], scores: list[np.ndarray]) -> np.ndarray:
        """Per pair, whether it stays a candidate: among its call's KEEP best by either
        first model, or chosen by either start. Under load a call has tens to hundreds of
        candidates, every learning round costs in proportion, and the far ones never win."""
        keep = np.zeros(len(self.pc), dtype=bool)
        for assign, score in zip(assigns, scores):
            order, first, _ = self._ranked(score)
            run_start = np.flatnonzero(first)
            rank = np.arange(len(order)) - np.repeat(run_start, np.diff(np.r_[run_start, len(order)]))
            keep[order[rank < KEEP]] = True
            keep |= assign[self.pc] == self.ps
        return keep

    def _keep_pairs(self, keep: np.ndarray) -> None:
        """Drops the pairs not kept from every per-pair array."""
        for name in ("pc", "ps", "pair_op", "field_bin", "thread_rel", "thread_pair"):
            setattr(self, name, getattr(self, name)[keep])
        self._queries = None

    def _latest_start(self) -> np.ndarray:
        """The strongest shared field, then the latest start (a lone candidate wins anyway)."""
        order = np.lexsort((self.s_start[self.ps], self.field_bin, self.pc))
        last_of_call = np.r_[self.pc[order][1:] != self.pc[order][:-1], True]
        assign = np.empty(len(self.calls), dtype=np.int64)
        assign[self.pc[order][last_of_call]] = self.ps[order][last_of_call]
        return assign

    def _previous_or_latest_start(self) -> np.ndarray:
        """The parent an earlier pass chose, where there is one (ProcessSpans.previous),
        else `_latest_start`. A streaming window decides a held call at every pass, each
        time learning from the calls it holds; starting from the last pass's choice, a pass
        carries on from what the passes before it learnt instead of starting over (on
        bench/accuracy's Java at 400 req/s, streamed: 96.0% of traces right from the two
        fixed starts, 98.6% from this one, 98.8% in one pass over the whole recording)."""
        assign = self._latest_start()
        previous = self.process.previous
        if previous:
            row_of = {int(s): r for r, s in enumerate(self.server_index.tolist())}
            want = np.array([row_of.get(previous.get(c.index, -1), -1) for c in self.calls], dtype=np.int64)
            chosen = self.ps == want[self.pc]
            assign[self.pc[chosen]] = self.ps[chosen]
        return assign

    def _first_come(self) -> np.ndarray:
        """Calls in start order, each to the oldest candidate that has not yet made a call
        of its operation (its callee included), else the oldest: requests served in the
        order they came, each making each call once (the original DeepTrace's FIFO rule)."""
        made = set(zip(self.f_row.tolist(), self.f_op.tolist()))
        bounds = np.searchsorted(self.pc, np.arange(len(self.calls) + 1)).tolist()
        ps, c_op = self.ps.tolist(), self.c_op.tolist()
        assign = np.empty(len(self.calls), dtype=np.int64)
        for c in np.argsort(self.c_start, kind="stable").tolist():
            cands = ps[bounds[c] : bounds[c + 1]]  # latest start first
            free = [s for s in cands if (s, c_op[c]) not in made] or cands
            assign[c] = free[-1]
            made.add((free[-1], c_op[c]))
        return assign

    # -- learning: likelihood ratios of each feature, and call patterns -----------------

    def _gaps(self, assign: np.ndarray) -> tuple[np.ndarray, ...]:
        """Per pair, under `assign`: time from the parent's latest event before the call to
        the call's start, and which kind of event that was (its start: 0, a sibling call's
        start: 1, a sibling's end: 2); time from the call's end to the parent's next event,
        and which (its response: 0, a sibling's start: 1); and the thread chain: both kinds,
        whether the call was made on the thread of the sibling event before it, and whether
        its response was read on the thread of the event after it. A handler waiting for
        each call starts the next right after the last one ended; one that fans out starts
        them right after each other; gaps by kind tell them apart. A handler's steps follow
        each other on one thread more often than unrelated requests' do, even where the
        runtime moves them (Go), so the thread weighs too. (Whether the first call is made
        on the thread that read the request is `thread_rel`'s, not counted twice here.)"""
        t0, w = self.t0, self.width
        pc, ps = self.pc, self.ps
        c_start, c_end = self.c_start[pc], self.c_end[pc]
        n_s = len(self.s_start)
        rows = np.concatenate([np.arange(n_s), assign, assign, self.f_row, self.f_row])
        times = np.concatenate([self.s_start, self.c_start, self.c_end, self.f_start, self.f_end])
        tids = np.concatenate([self.s_tid, self.c_tid, self.c_resp_tid, self.f_tid, self.f_resp_tid])
        n_c, n_f = len(self.c_start), len(self.f_start)
        kinds = np.repeat(np.array([0, 1, 2, 1, 2]), [n_s, n_c, n_c, n_f, n_f])
        keys = rows * w + (times - t0)
        order = np.argsort(keys, kind="stable")
        keys, kinds, tids = keys[order], kinds[order], tids[order]
        before_query, after_query = self._pair_queries()
        i = before_query.find(keys, "left") - 1
        ii = np.maximum(i, 0)
        ok = (i >= 0) & (keys[ii] // w == ps)
        before = np.where(ok, keys[ii] % w + t0, self.s_start[ps])
        before_kind = np.where(ok, kinds[ii], 0)
        same_before = (before_kind > 0) & (tids[ii] == self.c_tid[pc])
        rows = np.concatenate([np.arange(n_s), assign, self.f_row])
        times = np.concatenate([self.s_end, self.c_start, self.f_start])
        tids = np.concatenate([self.s_resp_tid, self.c_tid, self.f_tid])
        kinds = np.repeat(np.array([0, 1, 1]), [n_s, n_c, n_f])
        keys = rows * w + (times - t0)
        order = np.argsort(keys, kind="stable")
        keys, kinds, tids = keys[order], kinds[order], tids[order]
        j = after_query.find(keys, "right")
        jj = np.minimum(j, len(keys) - 1)
        ok = (j < len(keys)) & (keys[jj] // w == ps)
        after = np.where(ok, keys[jj] % w + t0, self.s_end[ps])
        after_kind = np.where(ok, kinds[jj], 0)
        after_tid = np.where(ok, tids[jj], self.s_resp_tid[ps])
        same_after = after_tid == self.c_resp_tid[pc]
        chain = (before_kind * self.NEXT_KINDS + after_kind) * self.SAME_THREAD + 2 * same_before + same_after
        return c_start - before, before_kind, after - c_end, after_kind, chain

    def _pair_queries(self) -> tuple[_Queries, _Queries]:
        """Per pair, where `_gaps` looks up its call's start and end among its candidate's
        events; fixed while the pairs are, so sorted once, not in every round."""
        if self._queries is None:
            at = self.ps * self.width - self.t0
            self._queries = (_Queries(at + self.c_start[self.pc]), _Queries(at + self.c_end[self.pc]))
        return self._queries

    def _features(self, assign: np.ndarray) -> list[tuple[np.ndarray, int, int]]:
        """Per pair, each feature's value (an integer below its size), under `assign`, and
        the group size of a feature weighed given its group (value // group: the part
        another feature weighs already), else 0. First those that do not move with the
        assignment (`_static_features`), then the trigger gap, the next gap and the thread
        chain (the local search, refine.py, recomputes those three per request)."""
        trigger, trigger_kind, nxt, nxt_kind, chain = self._gaps(assign)
        c_op, n = self.c_op[self.pc], self.n_ops
        return [
            *self._static_features(),
            ((c_op * self.TRIGGER_KINDS + trigger_kind) * BINS + gap_bins(trigger), n * self.TRIGGER_KINDS * BINS, 0),
            ((c_op * self.NEXT_KINDS + nxt_kind) * BINS + gap_bins(nxt), n * self.NEXT_KINDS * BINS, 0),
            (chain, self.TRIGGER_KINDS * self.NEXT_KINDS * self.SAME_THREAD, self.SAME_THREAD),
        ]

    def _static_features(self) -> list[tuple[np.ndarray, int, int]]:
        """The features of `_features` that do not move with the assignment, in its order."""
        n = self.n_ops
        return [
            (self.field_bin, len(_FIELD_BINS) + 1, 0),
            (self.pair_op, n * n, 0),
            (self.thread_rel, 4, 0),
            (self.thread_pair, 8 * self.n_thread_pairs, self.n_thread_pairs),
        ]

    def _scored(self, tables: list[np.ndarray], assign: np.ndarray) -> np.ndarray:
        """Each pair's score by `tables` (of `_learn`), its features taken under `assign`."""
        return sum(table[values] for table, (values, *_) in zip(tables, self._features(assign)))

    def _learn(self, assign: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, list[np.ndarray]]:
        """Each pair's score (the sum of its features' log likelihood ratios), the slot
        prices, how well `assign` explains the data (a log-likelihood per call: the
        chosen pairs' features and every request's call counts under their own
        frequencies), and the ratio tables, one per feature of `_features`."""
        true = assign[self.pc] == self.ps
        score = np.zeros(len(self.pc))
        fit = 0.0
        tables = []
        for values, size, group in self._features(assign):
            table = _log_ratio_given(values, true, size, group) if group else _log_ratio(values, true, size)
            share = _log_share(values[true], size)
            if group:
                share -= _log_share(values[true] // group, size // group)
                # Weighed only where it explains the chosen pairs by more than it has values
                # to fit (an AIC test): many thread pairs, each seen a few times, fit noise.
                if table[values[true]].sum() < np.count_nonzero(np.bincount(values[true], minlength=size)):
                    table = np.zeros(size)
            tables.append(table)
            score += table[values]
            fit += share.sum()
        slots, counts_fit = self._slot_prices(assign)
        return score, slots, (fit + counts_fit) / len(self.calls), tables

    def _counts(self, assign: np.ndarray) -> np.ndarray:
        """Calls of each operation per request: (requests, operations)."""
        n = len(self.s_start)
        key = np.concatenate([assign * self.n_ops + self.c_op, self.f_row * self.n_ops + self.f_op])
        return np.bincount(key, minlength=n * self.n_ops).reshape(n, self.n_ops)

    def _slot_prices(self, assign: np.ndarray) -> tuple[np.ndarray, float]:
        """prices[request op, call op, k]: log of how likely a request of that operation
        makes at least k calls of that operation, given it made k-1 (k >= 1); and the
        log likelihood of every request's call counts under those frequencies."""
        counts = np.minimum(self._counts(assign), MAX_SLOTS)
        # How many requests of each op made exactly v calls of each op, then "at least k" from the top down.
        n, v = MAX_SLOTS + 1, self.n_ops
        key = (self.s_op[:, None] * v + np.arange(v)[None, :]) * n + counts
        exactly = np.bincount(key.ravel(), minlength=v * v * n).reshape(v, v, n)
        at_least = np.zeros((v, v, MAX_SLOTS + 2))
        at_least[:, :, :n] = np.cumsum(exactly[:, :, ::-1], axis=2)[:, :, ::-1]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = at_least[:, :, 1:] / at_least[:, :, :-1]
        prices = np.full((self.n_ops, self.n_ops, MAX_SLOTS + 2), _LOG_UNSEEN)
        prices[:, :, 1:] = np.log(np.maximum(np.nan_to_num(ratio, nan=0.0), np.exp(_LOG_UNSEEN)))
        return prices, float(_log_share(key.ravel(), v * v * n).sum())

    # -- joint assignment ------------------------------------------------------------

    def _ranked(self, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The pairs by call, best first; where each call's run of them begins; and per
        call, its best candidate's score less its second best's (inf: one candidate)."""
        # One sort on a composite key, not a lexsort: pc is sorted (Containment.pairs), so
        # each call's pairs keep their place and sort by score within it; spacing the calls
        # wider than the scores' range keeps them apart (float64 resolves the score to
        # ~1e-8 of a nat at a million calls: nothing the choice can hinge on).
        spread = float(score.max() - score.min()) + 1.0 if len(score) else 1.0
        order = np.argsort(self.pc * spread - score, kind="stable")
        first = np.r_[True, self.pc[order][1:] != self.pc[order][:-1]]
        second = np.full(len(self.calls), -np.inf)
        runner = np.flatnonzero(~first & np.r_[False, first[:-1]])  # each call's second best
        second[self.pc[order[runner]]] = score[order[runner]]
        return order, first, score[order[first]] - second

    def _assign(self, score: np.ndarray, prices: np.ndarray) -> np.ndarray:
        """Clear winners take their request at once; the rest are matched jointly, in
        time order, a chunk at a time (matching grows faster than linearly)."""
        order, first, margin = self._ranked(score)
        clear = margin >= CLEAR_MARGIN
        assign = self.ps[order[first]]
        counts = np.bincount(np.r_[self.f_row * self.n_ops + self.f_op,
                                   assign[clear] * self.n_ops + self.c_op[clear]],
                             minlength=len(self.s_start) * self.n_ops)  # fmt: skip
        hard = np.flatnonzero(~clear)
        hard = hard[np.argsort(self.c_start[hard], kind="stable")]
        if len(hard):
            # Each call's pairs are a run of `order`: where it begins and how long it is.
            # Only its best few are offered: under overload a call has hundreds of candidates,
            # and the matching's cost grows with its edges while the far ones never win.
            lengths = np.minimum(np.diff(np.r_[np.flatnonzero(first), len(order)]), MATCH_CANDIDATES)
            runs = (np.flatnonzero(first), lengths, order)
            for i in range(0, len(hard), CHUNK):
                self._match(hard[i : i + CHUNK], runs, score, prices, counts, assign)
        return assign

    def _match(self, calls: np.ndarray, runs: tuple, score: np.ndarray, prices: np.ndarray,
               counts: np.ndarray, assign: np.ndarray) -> None:  # fmt: skip
        """Min-cost matching of calls to request slots: each request has, per call
        operation, slots priced by its call pattern (the k-th slot costs what having k
        such calls costs); each call takes one slot; an overflow column per call keeps
        it feasible. Fills `assign` and `counts`."""
        run_start, run_len, order = runs
        lens = run_len[calls]
        row = np.repeat(np.arange(len(calls)), lens)
        pairs = order[np.repeat(run_start[calls] - np.r_[0, np.cumsum(lens)[:-1]], lens) + np.arange(lens.sum())]
        group = self.ps[pairs] * self.n_ops + self.c_op[self.pc[pairs]]  # (request, call op)
        groups, inverse, want = np.unique(group, return_inverse=True, return_counts=True)
        g_req, g_op = groups // self.n_ops, groups % self.n_ops
        taken = counts[groups]
        g_sop = self.s_op[g_req]
        # Slots past the most calls ever seen all cost the same: one of them is enough.
        seen = (prices[g_sop, g_op, 1:] > _LOG_UNSEEN).sum(axis=1)
        n_slots = np.clip(np.minimum(want, seen + 1 - taken), 1, None)
        starts = np.r_[0, np.cumsum(n_slots)[:-1]]  # each group's first slot, counted from the first slot
        first_col = len(calls) + starts
        k = np.repeat(taken + 1, n_slots) + (np.arange(n_slots.sum()) - np.repeat(starts, n_slots))
        raw = prices[np.repeat(g_sop, n_slots), np.repeat(g_op, n_slots), np.minimum(k, MAX_SLOTS + 1)]
        slot_price = _running_min_per_group(raw, starts)
        slot_owner = np.repeat(g_req, n_slots)
        # Edges: each pair to each slot of its group, plus each call's overflow column.
        per_pair = n_slots[inverse]
        e_row = np.repeat(row, per_pair)
        offsets = np.arange(per_pair.sum()) - np.repeat(np.r_[0, np.cumsum(per_pair)[:-1]], per_pair)
        e_col = np.repeat(first_col[inverse], per_pair) + offsets
        e_cost = -(np.repeat(score[pairs], per_pair) + slot_price[e_col - len(calls)])
        e_row = np.r_[np.arange(len(calls)), e_row]
        e_col = np.r_[np.arange(len(calls)), e_col]
        e_cost = np.r_[np.full(len(calls), _OVERFLOW), e_cost]
        e_cost = e_cost - e_cost.min() + 1.0  # the matcher reads zeros as missing edges
        graph = csr_matrix((e_cost, (e_row, e_col)), shape=(len(calls), len(calls) + int(n_slots.sum())))
        rows, cols = min_weight_full_bipartite_matching(graph)
        matched = cols >= len(calls)
        assign[calls[rows[matched]]] = slot_owner[cols[matched] - len(calls)]
        # A call left on its overflow column keeps its best candidate (already in assign).
        counts += np.bincount(assign[calls] * self.n_ops + self.c_op[calls], minlength=len(counts))

    def _confidence(self, score: np.ndarray, prices: np.ndarray, assign: np.ndarray) -> np.ndarray:
        """Softmax of the chosen parent's score among the call's alternatives. An
        alternative is another candidate taking the call, either as one more call there
        (priced for the slot it would take: a request whose calls of that operation are
        complete is an unlikely second home) or in exchange for its own call of that
        operation, which comes here: where two requests could have swapped their calls,
        confidence must say it."""
        n = len(self.calls)
        c_op = self.c_op[self.pc]
        own = assign[self.pc] == self.ps
        k = self._counts(assign)[self.ps, c_op] + 1 - own
        moved = score + prices[self.s_op[self.ps], c_op, np.minimum(k, MAX_SLOTS + 1)]
        # The swap: the candidate's call d of this operation and this call trade places.
        # d's pairs with its own parent and with this call's parent are looked up by key.
        n_s = len(self.s_start)
        slot_key = assign * self.n_ops + self.c_op
        by_slot = np.argsort(slot_key, kind="stable")
        found = np.searchsorted(slot_key[by_slot], self.ps * self.n_ops + c_op)
        found = np.minimum(found, n - 1)
        d = by_slot[found]
        has_d = (slot_key[d] == self.ps * self.n_ops + c_op) & ~own
        pair_key = self.pc * n_s + self.ps
        by_pair = np.argsort(pair_key, kind="stable")
        sorted_keys = pair_key[by_pair]

        def pair_of(calls: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            want = calls * n_s + rows
            at = np.minimum(np.searchsorted(sorted_keys, want), len(sorted_keys) - 1)
            return by_pair[at], sorted_keys[at] == want

        d_there, ok_there = pair_of(d, assign[self.pc])  # d under this call's parent
        d_home, _ = pair_of(d, self.ps)  # d where it is
        swap = has_d & ok_there
        own_price = np.zeros(n)
        own_price[self.pc[own]] = (moved - score)[own]
        swapped = score + np.where(swap, score[d_there] - score[d_home], 0) + own_price[self.pc]
        alt = np.where(swap, np.maximum(moved, swapped), moved)
        alt[own] = moved[own]
        top = np.full(n, -np.inf)
        np.maximum.at(top, self.pc, alt)
        weight = np.exp((alt - top[self.pc]) / TEMPERATURE)
        total = np.bincount(self.pc, weights=weight, minlength=n)
        chosen = np.zeros(n)
        chosen[self.pc[own]] = weight[own]
        return chosen / total


class _Queries:
    """Values looked up in sorted keys many times: searched in sorted order (about 5x
    faster than in pair order: the binary searches walk the same paths one after another)
    and handed back in pair order."""

    def __init__(self, values: np.ndarray) -> None:
        self.order = np.argsort(values, kind="stable")
        self.sorted = values[self.order]

    def find(self, keys: np.ndarray, side: str) -> np.ndarray:
        out = np.empty(len(self.order), dtype=np.int64)
        out[self.order] = np.searchsorted(keys, self.sorted, side=side)
        return out


def _running_min_per_group(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Running minimum that restarts at each group start (prices never rise with k): one
    accumulate over all groups, each lowered below every group before it (by more than
    the values' range), so that no minimum carries over a group's start."""
    if not len(values):
        return values.copy()
    step = float(values.max() - values.min()) + 1.0
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(values)]))
    return np.minimum.accumulate(values - group * step) + group * step


def _known_calls(process: ProcessSpans, fixed: dict[int, int]):
    by_index = {c.index: c for c in process.clients}
    return [(by_index[c], s) for c, s in fixed.items() if c in by_index]
