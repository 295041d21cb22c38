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
- call count: how many calls of that operation the request operation makes.

It starts from the unambiguous calls (one candidate) and the fields, assigns every call
jointly (best pairs first, a request's slots for each operation filling up as its
pattern says), re-learns the ratios from that assignment and repeats. Gaps depend on
the assignment, so each round sees the sibling structure the last round found.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, bisect_right
from collections import Counter, defaultdict

from deeptrace.association.candidates import Containment
from deeptrace.association.features import FieldWeights, span_fields
from deeptrace.association.model import INFERRED, ROOT, Link, ProcessSpans, SpanRef
from deeptrace.association.threads import ServingThreads, measure, thread_links

ROUNDS = 4
MATCHING = True  # exact min-cost matching (True) or best pairs first (False)
TEMPERATURE = 1.0  # softmax temperature turning scores into confidences
_FIELD_BINS = (0.5, 2.0, 4.0, 6.0, 9.0)
_UNSEEN = 1e-3  # probability floor for a call count never observed
_LOG_UNSEEN = math.log(_UNSEEN)
_OVERFLOW = 1e6
CLEAR_MARGIN = 6.0  # nats: a call this much surer of one request is not matched jointly
CHUNK = 2000  # calls per joint matching


def link(process: ProcessSpans) -> dict[int, Link]:
    threads = ServingThreads(process.servers)
    use = measure(process, threads)
    links = thread_links(process, threads, use)
    rest = [c for c in process.open_clients if c.index not in links]
    if rest:
        fixed = dict(process.known)
        fixed.update({i: lk.parent for i, lk in links.items()})
        links.update(Inference(process, rest, fixed).run())
    return links


def _log_bin(gap_ns: int) -> int:
    return max(0, gap_ns).bit_length()  # log2 bins: 1 ns .. 2^40 ns


def _field_bin(weight: float) -> int:
    return bisect_right(_FIELD_BINS, weight)


class _Ratio:
    """Likelihood ratio P(value | true pair) / P(value | candidate pair) of one discrete
    feature, with add-one smoothing so unseen values stay finite."""

    def __init__(self, true_values, all_values) -> None:
        true, every = Counter(true_values), Counter(all_values)
        nt, na, k = sum(true.values()), sum(every.values()), len(every) + 1
        self.table = {v: math.log(((true.get(v, 0) + 1) / (nt + k)) / ((n + 1) / (na + k))) for v, n in every.items()}
        self.unseen = math.log((1 / (nt + k)) / (1 / (na + k)))

    def log(self, value) -> float:
        return self.table.get(value, self.unseen)


class Inference:
    def __init__(self, process: ProcessSpans, clients: list[SpanRef], fixed: dict[int, int]) -> None:
        self.process = process
        self.servers = {s.index: s for s in process.servers}
        self.clients = clients
        self.fixed = fixed  # calls whose parent is already known: evidence, not decided here
        self.calls = {c.index: c for c in process.clients}
        contain = Containment(process.servers)
        self.candidates = {c.index: [s.index for s in contain.containing(c.start_ns, c.end_ns)] for c in clients}
        fields = {s.index: span_fields(s) for s in process.servers}
        fields.update({c.index: span_fields(c) for c in clients})
        weights = FieldWeights(list(fields.values()))
        self.field_bin = {}
        for c in clients:
            fc = fields[c.index]
            for s in self.candidates[c.index]:
                self.field_bin[(c.index, s)] = _field_bin(weights.shared_weight(fc, fields[s]))

    def run(self) -> dict[int, Link]:
        links: dict[int, Link] = {}
        decide = []
        for c in self.clients:
            cands = self.candidates[c.index]
            if not cands:
                links[c.index] = Link(None, ROOT, 1.0 if not self.process.servers else 0.9)
            else:
                decide.append(c)
        if not decide:
            return links
        # Round 0: unambiguous calls, then the strongest shared field, then the nearest start.
        assign = {}
        for c in decide:
            cands = self.candidates[c.index]
            assign[c.index] = max(cands, key=lambda s: (self.field_bin[(c.index, s)], self.servers[s].start_ns))
        scores: dict[int, dict[int, float]] = {}
        for _ in range(ROUNDS):
            model = self._learn(decide, assign)
            scores = self._score(decide, model)
            assign = (_match if MATCHING else Inference._assign)(self, decide, scores, model)
        for c in decide:
            chosen = assign[c.index]
            links[c.index] = Link(chosen, INFERRED, _confidence(scores[c.index], chosen))
        return links

    # -- learning --------------------------------------------------------------------

    def _children(self, assign: dict[int, int]) -> dict[int, list[SpanRef]]:
        kids: dict[int, list[SpanRef]] = defaultdict(list)
        for c, s in list(assign.items()) + list(self.fixed.items()):
            if s in self.servers:
                kids[s].append(self.calls[c])
        return kids

    def _events(self, kids: dict[int, list[SpanRef]]) -> tuple[dict, dict]:
        """Per request, sorted times of what it did (for trigger gaps) and of what it did
        next (for next gaps)."""
        before, after = {}, {}
        for s_index, s in self.servers.items():
            ks = kids.get(s_index, ())
            before[s_index] = sorted([s.start_ns] + [k.start_ns for k in ks] + [k.end_ns for k in ks])
            after[s_index] = sorted([s.end_ns] + [k.start_ns for k in ks])
        return before, after

    def _features(self, c: SpanRef, s_index: int, before: dict, after: dict) -> tuple:
        s = self.servers[s_index]
        evb = before[s_index]
        i = bisect_left(evb, c.start_ns) - 1
        trigger = c.start_ns - evb[i] if i >= 0 else c.start_ns - s.start_ns
        eva = after[s_index]
        j = bisect_right(eva, c.end_ns)
        nxt = eva[j] - c.end_ns if j < len(eva) else s.end_ns - c.end_ns
        return (self.field_bin[(c.index, s_index)], (s.name, c.name), (c.name, _log_bin(trigger)),
                (c.name, _log_bin(nxt)))  # fmt: skip

    def _learn(self, decide: list[SpanRef], assign: dict[int, int]) -> dict:
        kids = self._children(assign)
        before, after = self._events(kids)
        features = {}
        true_rows, all_rows = [], []
        for c in decide:
            chosen = assign[c.index]
            for s in self.candidates[c.index]:
                feats = features[(c.index, s)] = self._features(c, s, before, after)
                all_rows.append(feats)
                if chosen == s:
                    true_rows.append(feats)
        true_f = list(zip(*true_rows)) if true_rows else [(), (), (), ()]
        all_f = list(zip(*all_rows))
        counts: dict[tuple, Counter] = defaultdict(Counter)  # (request op, call op) -> Counter(calls per request)
        ops_of = defaultdict(set)
        for s_index, ks in kids.items():
            per_op = Counter(k.name for k in ks)
            ops_of[self.servers[s_index].name].update(per_op)
            for op, n in per_op.items():
                counts[(self.servers[s_index].name, op)][n] += 1
        # Requests of an operation that made no call of an op still count (as zero).
        served = Counter(s.name for s in self.servers.values())
        for (sop, cop), ctr in counts.items():
            ctr[0] += served[sop] - sum(ctr.values())
        slots = {}
        for key, ctr in counts.items():
            # slots[key][k-1]: log of how likely a request of this operation makes at
            # least k calls of that operation, given it made k-1.
            top = max(ctr)
            at_least = [sum(n for c, n in ctr.items() if c >= k) for k in range(top + 2)]
            slots[key] = [math.log(max(_UNSEEN, at_least[k] / at_least[k - 1] if at_least[k - 1] else 0.0))
                          for k in range(1, top + 2)]  # fmt: skip
        return {"ratios": [_Ratio(t, a) for t, a in zip(true_f, all_f)], "slots": slots, "features": features}

    def _slot(self, model: dict, s_index: int, op: str, k: int) -> float:
        table = model["slots"].get((self.servers[s_index].name, op))
        if not table:
            return _LOG_UNSEEN
        return table[k - 1] if k <= len(table) else _LOG_UNSEEN

    # -- scoring and assignment ------------------------------------------------------

    def _score(self, decide: list[SpanRef], model: dict) -> dict[int, dict[int, float]]:
        f, o, t, n = (r.table for r in model["ratios"])
        fu, ou, tu, nu = (r.unseen for r in model["ratios"])
        features = model["features"]
        scores = {}
        for c in decide:
            row = {}
            for s in self.candidates[c.index]:
                a, b, g, h = features[(c.index, s)]
                row[s] = f.get(a, fu) + o.get(b, ou) + t.get(g, tu) + n.get(h, nu)
            scores[c.index] = row
        return scores

    def _assign(self, decide: list[SpanRef], scores: dict[int, dict[int, float]], model: dict) -> dict[int, int]:
        """Best pairs first; a request's k-th call of an operation costs what its call
        pattern says about having k of them."""
        taken: Counter = Counter()  # (request, call op) -> calls assigned
        for c, s in self.fixed.items():
            if s in self.servers:
                taken[(s, self.calls[c].name)] += 1
        heap = []
        for c in decide:
            for s, sc in scores[c.index].items():
                k = taken[(s, c.name)] + 1
                heap.append((-(sc + self._slot(model, s, c.name, k)), c.index, s, k))
        heapq.heapify(heap)
        assign: dict[int, int] = {}
        while heap:
            _, c, s, k = heapq.heappop(heap)
            if c in assign:
                continue
            op = self.calls[c].name
            now = taken[(s, op)] + 1
            if now != k:  # the slot filled up meanwhile: re-price and queue again
                heapq.heappush(heap, (-(scores[c][s] + self._slot(model, s, op, now)), c, s, now))
                continue
            assign[c] = s
            taken[(s, op)] = now
        return assign


def _match(self: Inference, decide: list[SpanRef], scores: dict[int, dict[int, float]], model: dict) -> dict[int, int]:
    """Clear winners take their request at once; the rest are matched jointly, in time
    order, a chunk at a time (the matching grows faster than linearly)."""
    taken: Counter = Counter()  # (request, call op) -> calls it has
    for c, s in self.fixed.items():
        if s in self.servers:
            taken[(s, self.calls[c].name)] += 1
    assign: dict[int, int] = {}
    hard = []
    for c in decide:
        row = scores[c.index]
        best = max(row, key=row.get)
        if len(row) == 1 or row[best] - heapq.nlargest(2, row.values())[1] >= CLEAR_MARGIN:
            assign[c.index] = best
            taken[(best, c.name)] += 1
        else:
            hard.append(c)
    for i in range(0, len(hard), CHUNK):
        assign.update(_match_chunk(self, hard[i : i + CHUNK], scores, model, taken))
    return assign


def _match_chunk(self: Inference, calls: list[SpanRef], scores: dict, model: dict, taken: Counter) -> dict[int, int]:
    """Min-cost matching of calls to request slots: each request has, per call
    operation, slots priced by its call pattern (the k-th slot costs what having k such
    calls costs); each call takes one slot. An overflow column per call keeps it
    feasible. `taken` is updated with the result."""
    import numpy as np
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    want: Counter = Counter()
    for c in calls:
        for s in scores[c.index]:
            want[(s, c.name)] += 1
    slot_cols: dict[tuple, list[tuple[int, float]]] = {}
    owner = {}
    n_cols = len(calls)  # columns 0..len(calls)-1: overflow, one per call
    for (s, op), n in want.items():
        cols, price = [], 0.0
        # Slots past the most calls ever seen all cost the same: one of them is enough.
        pattern = model["slots"].get((self.servers[s].name, op), ())
        first = taken[(s, op)] + 1
        for k in range(first, first + min(n, max(1, len(pattern) + 1 - taken[(s, op)]))):
            price = min(price, self._slot(model, s, op, k)) if cols else self._slot(model, s, op, k)
            cols.append((n_cols, price))
            owner[n_cols] = s
            n_cols += 1
        slot_cols[(s, op)] = cols
    rows, cols, costs = [], [], []
    for r, c in enumerate(calls):
        rows.append(r)
        cols.append(r)
        costs.append(_OVERFLOW)
        for s, sc in scores[c.index].items():
            for col, price in slot_cols[(s, c.name)]:
                rows.append(r)
                cols.append(col)
                costs.append(-(sc + price))
    costs = np.asarray(costs)
    costs = costs - costs.min() + 1.0  # the matcher reads zeros as missing edges
    graph = csr_matrix((costs, (rows, cols)), shape=(len(calls), n_cols))
    row_ind, col_ind = min_weight_full_bipartite_matching(graph)
    col_of_row = dict(zip(row_ind.tolist(), col_ind.tolist()))
    assign = {}
    for r, c in enumerate(calls):
        row = scores[c.index]
        s = owner.get(col_of_row.get(r, -1), max(row, key=row.get))
        assign[c.index] = s
        taken[(s, c.name)] += 1
    return assign


def _confidence(row: dict[int, float], chosen: int) -> float:
    top = max(row.values())
    total = sum(math.exp((v - top) / TEMPERATURE) for v in row.values())
    return math.exp((row[chosen] - top) / TEMPERATURE) / total
