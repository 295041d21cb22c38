"""Local search over whole requests, after joint inference has settled.

Inference scores a call against each candidate with the candidate's other calls where the
last assignment put them, so two requests that took each other's calls stay that way:
moving either call alone looks worse. Here a move is judged by both requests' complete
scores before and after it (every call's gaps and event kinds recomputed among its new
siblings, and each request's call counts): a call moves to another candidate, or trades
places with that candidate's call of the same operation, when the two requests together
score higher by GAIN. Only calls without a clear winner are tried, against their best few
candidates, in start order, until a pass moves nothing.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

import numpy as np

from deeptrace.association.gaps import BINS, gap_bin

PASSES = 3
ALTERNATIVES = 2  # candidates tried per call, best scored first
HOPELESS = 12.0  # nats below a call's best candidate: not tried
BUDGET = 8  # request evaluations per call of the process
GAIN = 1.0  # nats a move must win by: learnt tables are noisy on small windows, and a search that
# takes every tiny gain fits the noise (on the original DeepTrace's 288 requests it lost 5 points)
COUNT_PRIOR = 0.5  # pseudo-count of every call count, so an unseen count is unlikely, not impossible


def refine(inf, tables: list[np.ndarray], assign: np.ndarray, score: np.ndarray, margin: np.ndarray,
           unsure: float) -> np.ndarray:  # fmt: skip
    """A better assignment than `assign` by the learnt ratio tables (in the order of
    joint.Inference._features: those that do not move with the assignment, then the
    trigger gap by kind, the next gap by kind and the thread chain), as `score` was. Calls whose
    best candidate leads by less than `unsure` nats are tried, in start order (a request's
    earlier calls settled first give its later ones their siblings), within a budget of
    request evaluations per call of the process: under overload nearly every call is
    unsure, and the search must not cost more than the inference."""
    if not BUDGET:
        return assign
    calls = np.flatnonzero(margin < unsure)
    calls = calls[np.argsort(inf.c_start[calls], kind="stable")]
    return _Search(inf, tables, assign.copy(), score, BUDGET * len(margin)).run(calls)


class _Search:
    def __init__(self, inf, tables: list[np.ndarray], assign: np.ndarray, score: np.ndarray, budget: int) -> None:
        self.n = n = inf.n_ops
        self.budget = budget
        self.assign = assign
        static_features = inf._static_features()
        self.t_trigger, self.t_next, self.t_chain = (t.tolist() for t in tables[len(static_features) :])
        self.trigger_kinds, self.next_kinds, self.same_thread = inf.TRIGGER_KINDS, inf.NEXT_KINDS, inf.SAME_THREAD
        self.s_start, self.s_end, self.s_op = inf.s_start.tolist(), inf.s_end.tolist(), inf.s_op.tolist()
        self.c_op = inf.c_op.tolist()
        self.s_resp_tid = inf.s_resp_tid.tolist()
        # Each call's events as a request's known calls are kept: (start, end, op, tid, resp_tid).
        self.event = list(zip(inf.c_start.tolist(), inf.c_end.tolist(), self.c_op, inf.c_tid.tolist(),
                              inf.c_resp_tid.tolist()))  # fmt: skip
        static = sum(table[values] for table, (values, *_) in zip(tables, static_features))
        # Pairs by (call, request), as sorted keys (a call's candidates are a run of them) and
        # a table from key to the pair's static score (inference kept at most KEEP candidates
        # per call and the chosen ones, so this is a few per call, not the millions of pairs
        # a window holds under overload).
        n_s = len(inf.s_start)
        by_key = np.lexsort((inf.ps, inf.pc))
        self.n_s = n_s
        self.keys = (inf.pc[by_key] * n_s + inf.ps[by_key]).tolist()
        self.static_of = dict(zip(self.keys, static[by_key].tolist()))  # (call, request) key -> static score
        self.score = score[by_key].tolist()
        self.known: dict[int, list[tuple[int, int, int, int, int]]] = {}
        known = zip(inf.f_row.tolist(), inf.f_start.tolist(), inf.f_end.tolist(), inf.f_op.tolist(),
                    inf.f_tid.tolist(), inf.f_resp_tid.tolist())  # fmt: skip
        for r, *event in known:
            self.known.setdefault(r, []).append(tuple(event))
        self.members: dict[int, set[int]] = {}
        for c, s in enumerate(assign.tolist()):
            self.members.setdefault(s, set()).add(c)
        self.count_score = self._count_scores(inf._counts(assign), inf.s_op)
        self.no_calls = [sum(row[0] for row in by_op) for by_op in self.count_score]
        self.cache: dict[int, float] = {}
        self.candidates: dict[int, list[int]] = {}
        self.moves = 0  # moves made so far
        self.changed: dict[int, int] = {}  # request -> self.moves when its calls last changed

    def _count_scores(self, counts: np.ndarray, s_op: np.ndarray) -> list:
        """[request op][call op][m]: log share of requests of that operation making exactly m calls of it."""
        n, top = self.n, int(counts.max(initial=0)) + 2
        key = (s_op[:, None] * n + np.arange(n)[None, :]) * top + np.minimum(counts, top - 1)
        seen = np.bincount(key.ravel(), minlength=n * n * top).astype(float).reshape(n, n, top)
        return np.log((seen + COUNT_PRIOR) / (seen.sum(axis=2, keepdims=True) + COUNT_PRIOR * top)).tolist()

    def request_score(self, s: int, calls: set[int]) -> float:
        """Request s with exactly `calls` (and its known calls): every call's score among
        these siblings, and the likelihood of its call counts."""
        self.budget -= 1
        static_of, n_s = self.static_of, self.n_s
        statics = [static_of.get(c * n_s + s) for c in calls]
        if None in statics:
            return -np.inf  # s does not contain one of the calls
        event = self.event
        events = [event[c] for c in calls] + self.known.get(s, [])
        per_op: dict[int, int] = {}
        for ev in events:
            per_op[ev[2]] = per_op.get(ev[2], 0) + 1
        counts = self.count_score[self.s_op[s]]
        # Every operation's count: none, but for the operations the request did make.
        total = self.no_calls[self.s_op[s]] + sum(statics)
        for op, m in per_op.items():
            total += counts[op][min(m, len(counts[op]) - 1)] - counts[op][0]
        starts = sorted([(ev[0], ev[3]) for ev in events])
        ends = sorted([(ev[1], ev[4]) for ev in events])
        start_times, start_tids = [t for t, _ in starts], [tid for _, tid in starts]
        end_times, end_tids = [t for t, _ in ends], [tid for _, tid in ends]
        trigger_kinds, next_kinds, same_thread = self.trigger_kinds, self.next_kinds, self.same_thread
        t_chain, t_trigger, t_next = self.t_chain, self.t_trigger, self.t_next
        s_start, s_end, s_resp_tid = self.s_start[s], self.s_end[s], self.s_resp_tid[s]
        for c in calls:
            t, e, op, c_tid, c_resp_tid = event[c]
            # The latest event before the call's start (a sibling's start or end, else the
            # request's own start), and the first after its end (a sibling's start, else the
            # response), with their threads, as joint.Inference._gaps. The call's own start
            # and end are never strictly before / after itself.
            latest, kind, tid = s_start, 0, None
            i = bisect_left(start_times, t) - 1
            if i >= 0 and start_times[i] > latest:
                latest, kind, tid = start_times[i], 1, start_tids[i]
            i = bisect_left(end_times, t) - 1
            if i >= 0 and end_times[i] > latest:
                latest, kind, tid = end_times[i], 2, end_tids[i]
            same = 2 if tid == c_tid else 0
            nxt, next_kind, tid = s_end, 0, s_resp_tid
            i = bisect_right(start_times, e)
            if i < len(start_times) and start_times[i] < nxt:
                nxt, next_kind, tid = start_times[i], 1, start_tids[i]
            if tid == c_resp_tid:
                same += 1
            total += t_chain[(kind * next_kinds + next_kind) * same_thread + same]
            total += t_trigger[(op * trigger_kinds + kind) * BINS + gap_bin(t - latest)]
            total += t_next[(op * next_kinds + next_kind) * BINS + gap_bin(nxt - e)]
        return total

    def _score(self, s: int) -> float:
        if s not in self.cache:
            self.cache[s] = self.request_score(s, self.members.get(s, set()))
        return self.cache[s]

    def _candidates(self, c: int) -> list[int]:
        """The call's best few candidates, best first, but none hopelessly far behind."""
        if c in self.candidates:
            return self.candidates[c]
        lo, hi = bisect_left(self.keys, c * self.n_s), bisect_left(self.keys, (c + 1) * self.n_s)
        ranked = sorted(range(lo, hi), key=lambda i: -self.score[i])[: ALTERNATIVES + 1]
        top = self.score[ranked[0]]
        self.candidates[c] = [self.keys[i] - c * self.n_s for i in ranked if self.score[i] > top - HOPELESS]
        return self.candidates[c]

    def _try(self, c: int) -> bool:
        s1 = int(self.assign[c])
        mine = self.members[s1]
        without = mine - {c}
        alone = None  # s1 without c: the same for every candidate c might move to
        for s2 in self._candidates(c):
            if s2 == s1:
                continue
            theirs = self.members.get(s2, set())
            before = self._score(s1) + self._score(s2)
            best = None
            for d in [None] + [d for d in theirs if self.c_op[d] == self.c_op[c]]:
                if d is None:
                    a1, a2 = without, theirs | {c}
                    if alone is None:
                        alone = self.request_score(s1, without)
                    v1 = alone
                else:
                    a1, a2 = without | {d}, theirs - {d} | {c}
                    v1 = self.request_score(s1, a1)
                v2 = self.request_score(s2, a2)
                if v1 + v2 > before + GAIN and (best is None or v1 + v2 > best[0]):
                    best = (v1 + v2, d, a1, a2, v1, v2)
            if best is not None:
                _, d, a1, a2, v1, v2 = best
                self.members[s1], self.members[s2] = a1, a2
                self.cache[s1], self.cache[s2] = v1, v2
                self.assign[c] = s2
                if d is not None:
                    self.assign[d] = s1
                self.moves += 1
                self.changed[s1] = self.changed[s2] = self.moves
                return True
        return False

    def run(self, calls: np.ndarray) -> np.ndarray:
        # A call is tried again only if a request it could move between changed since its
        # last try: otherwise the try would find what it found then (nothing).
        tried: dict[int, int] = {}
        for _ in range(PASSES):
            moved = False
            for c in calls.tolist():
                if self.budget <= 0:
                    return self.assign
                last = tried.get(c)
                if last is not None and all(self.changed.get(s, -1) < last for s in self._around(c)):
                    continue
                tried[c] = self.moves
                moved |= self._try(c)
            if not moved:
                break
        return self.assign

    def _around(self, c: int) -> list[int]:
        return [int(self.assign[c]), *self._candidates(c)]
