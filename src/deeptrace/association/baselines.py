"""Baseline association algorithms, to measure ours (joint.py) against.

Each takes one process's spans and returns a Link for every call in
`process.open_clients`: a parent among the process's requests (SERVER spans) that
contain the call in time, or a root when none does.

- fifo: the oldest request still open (the earliest start among those containing the call)
  that has not yet made a call to the same callee address (IP and port): the original
  DeepTrace's FIFO rule, under which a request takes at most one call per callee. Where all
  of them have, the oldest.
- wap5: the nearest preceding request (the latest start). WAP5 scores candidates by an
  exponential density of the delay from parent to child; that density falls with the
  delay whatever its fitted mean, so its choice is always the shortest delay.
- vpath: the request read on the thread that made the call (latest start if several);
  a call on a thread serving none of its containing requests is a root. vPath assumes a
  thread serves one request at a time, which thread pools and event loops break.
- txn: the original DeepTrace's transaction-based association (see `txn` below).

Confidence. fifo, wap5 and vpath measure nothing about their own certainty, so their
confidence is 1/k for a choice among k possibilities: what a guess among them would
score. A call no request contains is a root with confidence 1 (nothing could be its
parent). txn reports the chosen parent's share of its candidates' scores.

txn: what it follows, and from where
------------------------------------
Sources: the DeepTrace paper (Geng, Zhang, Wu, ACM SIGCOMM 2025) as described in its
public repository's README (github.com/DeepShield-AI/DeepTrace) and the authors' pages
(deepshields.com), and the research code in that repository,
server/trace/association/src/deeptrace.py. I could not read the paper itself, so its
exact formulas (window sizes, the entropy formula, how the densities are trained) are
not confirmed from the paper; where the description and the code differ, that is said.

Confirmed from the description: "dual-phase transaction inference": nested API affinity
as traffic-intensity correlation (Pearson coefficient) between APIs, and persistent-field
similarity as TF-IDF-weighted cosine similarity, "fused with metrics (delays, durations)
via entropy-weighted adaptive scoring", with automatic, entropy-driven weights.

Confirmed from the code: candidates are the same process's incoming spans open at the
outgoing span's start; per candidate pair it scores (1) endpoint affinity from counts of each
endpoint per window of 100 consecutive spans, (2) TF-IDF cosine similarity of the two
spans' contents, (3) a Gaussian KDE (scipy's gaussian_kde, Scott's bandwidth) of the
start delay, child start - parent start, and (4) of the end delay, parent end - child
end, each per (parent endpoint, child endpoint), an endpoint being the request's Host
header (a call's names its callee), plus 2-D KDEs of the two durations and of the
two sizes. The KDEs are learnt without ground truth: every candidate pair is a
sample weighted 1/(number of candidates of its child). Each feature is min-max scaled
over the process's candidate pairs, the weighted sum scored, and each call takes its
best candidate independently of the others (a lone candidate is taken as is).

Where this re-implementation departs, and why:
- Candidates are the requests containing the whole call, as for the other baselines; the
  code takes every request open at the call's start. On the original's rps100 spans
  (ids wiped) that alone moves end-to-end accuracy from the code's 0.576 to 0.722.
- Endpoints are operations: a request's is its name, a call's its name and its callee's
  address (`model.call_op`), which tells apart calls the Host header tells apart (`GET /` to
  b and to c); keyed by name alone, their delays would share one density.
- Affinity is Pearson, as published; the code computes cosine similarity of the same
  count vectors (its Pearson line is commented out).
- Fields are the shared persistent transaction fields of the two requests
  (features.request_fields: id-like tokens), weighted by IDF; the code uses character
  n-grams (n = 4, later 7) of request and response with TF-IDF. Same idea, our extractor.
- Weights are the entropy weight method, as published; the code weighs each scaled
  feature by its share of the features' variances. `weighting="variance"` runs that.
- The duration and size KDEs are left out: SpanRef carries no sizes, and the two delays
  with the call's duration already fix the request's duration.
- Calls already linked exactly (`process.known`) join the delay samples with weight 1;
  the original had no exact links to learn from.
- The KDEs are evaluated on a grid (linear binning, the approximation R's density()
  makes) so that a million calls cost a million interpolations, not a million sums.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator

from deeptrace.association.candidates import Containment
from deeptrace.association.features import FieldWeights, request_fields
from deeptrace.association.model import INFERRED, ROOT, THREAD, Link, ProcessSpans, SpanRef, call_op

TRAFFIC_WINDOW = 100  # spans per window of the traffic counts (the original's interval)
_GRID_PER_BANDWIDTH = 8  # grid points per kernel bandwidth: interpolation off by ~1%
_KERNEL_REACH = 4.0  # bandwidths; beyond this a kernel adds less than e^-8 of its peak
_MAX_GRID = 4096  # grid points per density; coarser than that only past this


def fifo(process: ProcessSpans) -> dict[int, Link]:
    """The oldest containing request that has not called this callee address yet (calls in
    start order; calls linked exactly count as made). Only when every one has: the oldest."""
    within = Containment(process.servers)
    made = {(parent, c.raddr, c.rport) for c in process.clients if (parent := process.known.get(c.index)) is not None}
    links = {}
    for c in process.open_clients:
        found = within.containing(c.start_ns, c.end_ns)
        if not found:
            links[c.index] = Link(None, ROOT, 1.0)
            continue
        free = [s for s in found if (s.index, c.raddr, c.rport) not in made] or found
        parent = free[-1]  # `containing` lists the latest start first: the oldest is last
        made.add((parent.index, c.raddr, c.rport))
        links[c.index] = Link(parent.index, INFERRED, 1.0 / len(free))
    return links


def wap5(process: ProcessSpans) -> dict[int, Link]:
    return _pick_by_time(process, lambda found: found[0])


def _pick_by_time(process: ProcessSpans, choose: Callable[[list[SpanRef]], SpanRef]) -> dict[int, Link]:
    within = Containment(process.servers)
    links = {}
    for c in process.open_clients:
        found = within.containing(c.start_ns, c.end_ns)
        if found:
            links[c.index] = Link(choose(found).index, INFERRED, 1.0 / len(found))
        else:
            links[c.index] = Link(None, ROOT, 1.0)
    return links


def vpath(process: ProcessSpans) -> dict[int, Link]:
    within = Containment(process.servers)
    links = {}
    for c in process.open_clients:
        found = within.containing(c.start_ns, c.end_ns)
        same_thread = [s for s in found if s.tid == c.tid]
        if same_thread:
            links[c.index] = Link(same_thread[0].index, THREAD, 1.0 / len(same_thread))
        else:
            # vPath's answer is root; it was one of len(found) + 1 possibilities.
            links[c.index] = Link(None, ROOT, 1.0 / (len(found) + 1))
    return links


def txn(process: ProcessSpans, weighting: str = "entropy") -> dict[int, Link]:
    """The original DeepTrace's association (module docstring): each call's candidate
    requests scored by API affinity, shared persistent fields, and the densities of the
    start and end delays; features min-max scaled over the process's candidate pairs,
    combined with entropy weights (or, with weighting="variance", the public code's
    variance weights); the best candidate per call, each call on its own.
    Confidence: the chosen candidate's share of the sum of its candidates' scores."""
    if weighting not in ("entropy", "variance"):
        raise ValueError(f"unknown weighting {weighting!r}")
    within = Containment(process.servers)
    links: dict[int, Link] = {}
    children, candidates = [], []
    for c in process.open_clients:
        found = within.containing(c.start_ns, c.end_ns)
        if found:
            children.append(c)
            candidates.append(found)
        else:
            links[c.index] = Link(None, ROOT, 1.0)
    if not children:
        return links

    columns = [_min_max(col) for col in _feature_columns(process, children, candidates)]
    weights = _entropy_weights(columns) if weighting == "entropy" else _variance_weights(columns)
    w1, w2, w3, w4 = weights
    every = [w1 * a + w2 * b + w3 * c + w4 * d for a, b, c, d in zip(*columns)]
    row = 0
    for c, found in zip(children, candidates):
        scores = every[row : row + len(found)]
        row += len(found)
        best = max(range(len(found)), key=scores.__getitem__)  # ties: the latest start
        total = sum(scores)
        confidence = scores[best] / total if total > 0 else 1.0 / len(found)
        links[c.index] = Link(found[best].index, INFERRED, confidence)
    return links


def _feature_columns(
    process: ProcessSpans, children: list[SpanRef], candidates: list[list[SpanRef]]
) -> list[array]:
    """One column per feature, one row per (candidate, call) pair, calls in order."""
    spans = process.servers + process.clients
    fields = {s.index: request_fields(s) for s in spans}
    idf = FieldWeights(list(fields.values())).idf
    # FieldWeights.similarity's TF-IDF cosine, with each span's norm worked out once.
    norm = {i: math.sqrt(sum(idf(f) ** 2 for f in fs)) for i, fs in fields.items()}

    def similarity(a: int, b: int) -> float:
        shared = fields[a] & fields[b]
        if not shared or not norm[a] or not norm[b]:
            return 0.0
        return sum(idf(f) ** 2 for f in shared) / (norm[a] * norm[b])

    traffic = _Traffic(spans)
    delays = _delay_densities(process, children, candidates)
    affinity, shared, start, end = array("d"), array("d"), array("d"), array("d")
    for c, found in zip(children, candidates):
        for s in found:
            affinity.append(traffic.affinity(s.name, call_op(c)))
            shared.append(similarity(s.index, c.index))
            start_density, end_density = delays[(s.name, call_op(c))]
            start.append(start_density(c.start_ns - s.start_ns))
            end.append(end_density(s.end_ns - c.end_ns))
    return [affinity, shared, start, end]


def _delay_densities(process: ProcessSpans, children: list[SpanRef], candidates: list[list[SpanRef]]) -> dict:
    """(request op, call op) -> densities of the start delay and the end delay."""
    by_index = {s.index: s for s in process.servers}

    def samples() -> Iterator[tuple[SpanRef, SpanRef, float]]:
        for c, found in zip(children, candidates):
            for s in found:
                yield s, c, 1.0 / len(found)  # unsure which: each candidate a share
        for c in process.clients:
            s = by_index.get(process.known.get(c.index))
            if s is not None:
                yield s, c, 1.0

    densities: dict[tuple[str, str], tuple[_Density, _Density]] = defaultdict(
        lambda: (_Density(), _Density())
    )
    # Two passes: the first places each grid, the second fills it.
    for feed, finish in ((_Density.observe, _Density.place), (_Density.add, _Density.smooth)):
        for s, c, w in samples():
            start, end = densities[(s.name, call_op(c))]
            feed(start, c.start_ns - s.start_ns, w)
            feed(end, s.end_ns - c.end_ns, w)
        for pair in densities.values():
            for d in pair:
                finish(d)
    return densities


class _Density:
    """Weighted Gaussian kernel density with Scott's bandwidth, as scipy's gaussian_kde
    (which the original used) makes it, held on a grid. Built in passes because the grid
    depends on the samples' spread: observe() each sample, place(), add() each sample
    again, smooth(). Samples all equal (no spread) give no density: 0 everywhere, as the
    original then skipped the feature."""

    def __init__(self) -> None:
        self.shift: float | None = None  # first sample: sums of squares stay small
        self.sw = self.sw2 = self.swx = self.swxx = 0.0
        self.lo, self.hi = math.inf, -math.inf
        self.grid: list[float] | None = None

    def observe(self, x: float, w: float) -> None:
        if self.shift is None:
            self.shift = x
        d = x - self.shift
        self.sw += w
        self.sw2 += w * w
        self.swx += w * d
        self.swxx += w * d * d
        self.lo, self.hi = min(self.lo, x), max(self.hi, x)

    def place(self) -> None:
        if self.sw <= 0:
            return
        mean = self.swx / self.sw
        unbiased = self.sw - self.sw2 / self.sw  # numpy.cov's denominator for weighted samples
        var = (self.swxx - self.sw * mean * mean) / unbiased if unbiased > 0 else 0.0
        if var <= 0:
            return
        n_eff = self.sw * self.sw / self.sw2
        self.bandwidth = math.sqrt(var) * n_eff**-0.2
        self.step = max(self.bandwidth / _GRID_PER_BANDWIDTH, (self.hi - self.lo) / _MAX_GRID)
        self.reach = int(_KERNEL_REACH * self.bandwidth / self.step)
        self.origin = self.lo - (self.reach + 1) * self.step
        self.grid = [0.0] * (int((self.hi - self.lo) / self.step) + 2 * self.reach + 4)

    def add(self, x: float, w: float) -> None:
        if self.grid is None:
            return
        # Linear binning: a sample's weight split between its two grid neighbours.
        t = (x - self.origin) / self.step
        i = int(t)
        self.grid[i] += w * (i + 1 - t)
        self.grid[i + 1] += w * (t - i)

    def smooth(self) -> None:
        if self.grid is None:
            return
        h, reach = self.bandwidth, self.reach
        scale = 1.0 / (self.sw * h * math.sqrt(2 * math.pi))
        kernel = [scale * math.exp(-0.5 * (k * self.step / h) ** 2) for k in range(-reach, reach + 1)]
        out = [0.0] * len(self.grid)
        for i, g in enumerate(self.grid):
            if g:
                for k, kv in enumerate(kernel, i - reach):
                    out[k] += g * kv
        self.grid = out

    def __call__(self, x: float) -> float:
        if self.grid is None:
            return 0.0
        t = (x - self.origin) / self.step
        if t < 0 or t >= len(self.grid) - 1:
            return 0.0
        i = int(t)
        return self.grid[i] * (i + 1 - t) + self.grid[i + 1] * (t - i)


class _Traffic:
    """Requests served and calls made per operation in each window of TRAFFIC_WINDOW
    consecutive spans; API affinity of a request op and a call op is the Pearson
    correlation of their counts over the windows (ops that rise and fall together are
    nested). Counts are sparse; each pair of ops is computed once."""

    def __init__(self, spans: list[SpanRef]) -> None:
        ordered = sorted(spans, key=lambda s: s.start_ns)
        self.windows = max(1, -(-len(ordered) // TRAFFIC_WINDOW))
        self.counts: dict[tuple[str, str], Counter] = defaultdict(Counter)
        for i, s in enumerate(ordered):
            self.counts[(s.kind, call_op(s) if s.kind == "CLIENT" else s.name)][i // TRAFFIC_WINDOW] += 1
        self._cache: dict[tuple[str, str], float] = {}

    def affinity(self, request_op: str, called_op: str) -> float:
        key = (request_op, called_op)
        r = self._cache.get(key)
        if r is None:
            r = self._cache[key] = self._pearson(
                self.counts[("SERVER", request_op)], self.counts[("CLIENT", called_op)]
            )
        return r

    def _pearson(self, x: Counter, y: Counter) -> float:
        n = self.windows
        if len(x) > len(y):
            x, y = y, x
        sxy = sum(v * y.get(w, 0) for w, v in x.items())
        sx, sy = sum(x.values()), sum(y.values())
        vx = sum(v * v for v in x.values()) - sx * sx / n
        vy = sum(v * v for v in y.values()) - sy * sy / n
        if vx <= 0 or vy <= 0:
            return 0.0  # a constant count correlates with nothing
        return (sxy - sx * sy / n) / math.sqrt(vx * vy)


def _min_max(col: array) -> array:
    lo, hi = min(col), max(col)
    if hi <= lo:
        return array("d", bytes(8 * len(col)))  # a constant feature tells candidates apart by nothing
    span = hi - lo
    return array("d", ((v - lo) / span for v in col))


def _entropy_weights(columns: list[array]) -> list[float]:
    """Entropy weight method: a feature whose values are spread evenly over the pairs
    (high entropy) tells them apart little; one concentrated on few pairs, a lot."""
    m = len(columns[0])
    divergence = []
    for col in columns:
        total = sum(col)
        if total <= 0 or m < 2:
            divergence.append(0.0)
            continue
        entropy = -sum(p * math.log(p) for p in (v / total for v in col) if p > 0) / math.log(m)
        divergence.append(max(0.0, 1.0 - entropy))
    return _normalised(divergence)


def _variance_weights(columns: list[array]) -> list[float]:
    """The public code's weights: each scaled feature's share of the variances."""
    variances = []
    for col in columns:
        mean = sum(col) / len(col)
        variances.append(sum((v - mean) ** 2 for v in col) / len(col))
    return _normalised(variances)


def _normalised(values: list[float]) -> list[float]:
    total = sum(values)
    if total <= 0:
        return [1.0 / len(values)] * len(values)  # nothing tells pairs apart: every choice a tie
    return [v / total for v in values]
