"""The baseline association algorithms on hand-built processes: what each one decides,
and the trap each one falls into."""

from __future__ import annotations

import math
import random
import statistics
from array import array

import pytest

from deeptrace.association.baselines import (
    TRAFFIC_WINDOW,
    _Density,
    _entropy_weights,
    _Traffic,
    fifo,
    txn,
    vpath,
    wap5,
)
from deeptrace.association.model import INFERRED, ROOT, THREAD, Link, ProcessSpans, SpanRef

ALL = [fifo, wap5, vpath, txn]


class Proc:
    """One process's spans, made by hand. Times in µs; SpanRefs carry ns."""

    def __init__(self) -> None:
        self.spans: list[SpanRef] = []
        self.known: dict[int, int] = {}

    def _add(self, kind, start, end, name, tid, req, protocol, rport=None) -> SpanRef:
        i = len(self.spans)
        ref = SpanRef(i, f"{i + 1:016x}", kind, name, protocol, "svc", "h1", 1, tid, tid, int(start * 1000),
                      int(end * 1000), "10.0.0.1", 8080, "10.0.0.2", rport or 40000 + i, None, None, {}, req,
                      b"")  # fmt: skip
        self.spans.append(ref)
        return ref

    def server(self, start, end, name="GET /a", tid=1, req=b"", protocol="http1") -> SpanRef:
        return self._add("SERVER", start, end, name, tid, req, protocol)

    def client(
        self, start, end, name="redis GET", tid=1, req=b"", protocol="redis", known: SpanRef | None = None,
        rport: int | None = None,
    ):
        c = self._add("CLIENT", start, end, name, tid, req, protocol, rport or 6379)  # one callee unless said
        if known is not None:
            self.known[c.index] = known.index
        return c

    def process(self) -> ProcessSpans:
        by_start = sorted(self.spans, key=lambda s: s.start_ns)
        servers = [s for s in by_start if s.kind == "SERVER"]
        clients = [s for s in by_start if s.kind == "CLIENT"]
        open_clients = [c for c in clients if c.index not in self.known]
        return ProcessSpans(("h1", 1), servers, clients, dict(self.known), open_clients)


def user_request(user: int) -> bytes:
    return f"GET /u/{user} HTTP/1.1\r\nHost: shop\r\n\r\n".encode()


def user_lookup(user: int) -> bytes:
    return f"*2\r\n$3\r\nGET\r\n$10\r\nuser:{user}\r\n".encode()


def two_overlapping_requests():
    """a is read at 0 on thread 1, b at 100 on thread 2; both are open for the call."""
    p = Proc()
    a = p.server(0, 1000, tid=1)
    b = p.server(100, 1000, tid=2)
    return p, a, b


# FIFO and WAP5: one rule each about time


def test_fifo_takes_the_oldest_request_even_when_the_newer_one_made_the_call():
    p, a, b = two_overlapping_requests()
    call = p.client(200, 300, tid=2)  # made by b: its thread, right after it was read
    assert fifo(p.process()) == {call.index: Link(a.index, INFERRED, 0.5)}
    assert vpath(p.process())[call.index].parent == b.index


def test_fifo_gives_a_request_at_most_one_call_per_callee_address():
    """The original DeepTrace's rule: the oldest request has called B already, so the next
    call to B goes to the next oldest; a call to C may go to the oldest again."""
    p, a, b = two_overlapping_requests()
    to_b = p.client(200, 300, rport=8001)
    to_b_again = p.client(400, 500, rport=8001)
    to_c = p.client(600, 700, rport=8002)
    links = fifo(p.process())
    assert [links[c.index].parent for c in (to_b, to_b_again, to_c)] == [a.index, b.index, a.index]
    assert links[to_b_again.index].confidence == 1.0  # one request was left that had not called B


def test_fifo_counts_exactly_linked_calls_as_made():
    p, a, b = two_overlapping_requests()
    p.client(150, 180, rport=8001, known=a)  # a's call to B, joined by its bytes
    call = p.client(200, 300, rport=8001)
    assert fifo(p.process())[call.index].parent == b.index


def test_wap5_takes_the_latest_request_even_when_the_older_one_made_the_call():
    p, a, b = two_overlapping_requests()
    call = p.client(200, 300, tid=1)  # made by a: its thread, b just happened to arrive before
    assert wap5(p.process()) == {call.index: Link(b.index, INFERRED, 0.5)}
    assert vpath(p.process())[call.index].parent == a.index


# vPath: the thread


def test_vpath_follows_the_thread_not_the_clock():
    p, a, b = two_overlapping_requests()
    on_a = p.client(200, 300, tid=1)
    on_b = p.client(400, 500, tid=2)
    links = vpath(p.process())
    assert links[on_a.index] == Link(a.index, THREAD, 1.0)
    assert links[on_b.index] == Link(b.index, THREAD, 1.0)
    assert wap5(p.process())[on_a.index].parent == b.index  # the clock alone would say b


def test_vpath_in_a_thread_pool_makes_every_call_a_root():
    """The trap: the request's thread hands the call to a pool thread, so no request was
    read on the thread that made it."""
    p, _a, _b = two_overlapping_requests()
    pooled = p.client(200, 300, tid=99)
    assert vpath(p.process()) == {pooled.index: Link(None, ROOT, 1 / 3)}  # root, or a, or b


def test_vpath_on_an_event_loop_takes_the_latest_request_on_the_thread():
    """One thread reads every request: thread affinity says nothing, and the latest
    start wins as in WAP5."""
    p = Proc()
    a = p.server(0, 1000, tid=7)
    b = p.server(100, 1000, tid=7)
    p.server(150, 1000, tid=8)  # another thread's request is no candidate
    call = p.client(200, 300, tid=7)
    assert vpath(p.process()) == {call.index: Link(b.index, THREAD, 0.5)}
    assert a.index not in {lk.parent for lk in vpath(p.process()).values()}


# Every algorithm


@pytest.mark.parametrize("algo", ALL, ids=lambda f: f.__name__)
def test_a_call_no_request_contains_is_a_root(algo):
    p = Proc()
    p.server(0, 100)
    after = p.client(200, 300)
    outlives = p.client(50, 150)  # starts inside the request but outlives it
    before = p.client(-50, -10)
    links = algo(p.process())
    assert links == {c.index: Link(None, ROOT, 1.0) for c in (after, outlives, before)}


@pytest.mark.parametrize("algo", ALL, ids=lambda f: f.__name__)
def test_every_open_call_gets_one_link_to_a_request_that_contains_it(algo):
    rnd = random.Random(4)
    p = Proc()
    servers = []
    for _ in range(60):
        start = rnd.uniform(0, 20_000)
        servers.append(p.server(start, start + rnd.uniform(100, 3000), name=rnd.choice(["GET /a", "POST /b"]),
                                tid=rnd.randint(1, 4), req=user_request(rnd.randint(1000, 1020))))  # fmt: skip
    calls = []
    for _ in range(150):
        start = rnd.uniform(-500, 21_000)
        end = start + rnd.uniform(10, 800)
        known = rnd.choice(servers) if rnd.random() < 0.2 else None
        calls.append(p.client(start, end, name=rnd.choice(["redis GET", "SELECT"]), tid=rnd.randint(1, 6),
                              req=user_lookup(rnd.randint(1000, 1020)), known=known))  # fmt: skip
    process = p.process()
    links = algo(process)
    assert set(links) == {c.index for c in process.open_clients}  # known calls are not decided again
    by_index = {s.index: s for s in p.spans}
    roots = 0
    for i, lk in links.items():
        c = by_index[i]
        assert 0.0 <= lk.confidence <= 1.0
        if lk.parent is None:
            assert lk.method == ROOT
            roots += 1
        else:
            s = by_index[lk.parent]
            assert s.kind == "SERVER" and s.start_ns <= c.start_ns and c.end_ns <= s.end_ns
            assert lk.method in (INFERRED, THREAD)
    assert 0 < roots < len(links)  # the process has both kinds of call


# txn: the original DeepTrace's transaction-based association


def _learn_the_gap(p: Proc, n: int = 30, gap: float = 100, t0: float = -100_000) -> None:
    """Requests alone in time, each with one call `gap` µs after it was read, linked
    exactly: what this process's delays look like."""
    rnd = random.Random(1)
    for i in range(n):
        start = t0 + i * 3000
        s = p.server(start, start + 1000)
        c0 = start + gap + rnd.uniform(-5, 5)
        p.client(c0, c0 + 300, known=s)


def test_txn_follows_a_shared_user_id_against_the_timing():
    """Eight requests overlap, each with a call carrying its user id. The last call is
    the first request's, but it went out just when the eighth request's call usually
    would: the timing says the eighth, the user id the first."""

    def build(with_ids: bool):
        p = Proc()
        _learn_the_gap(p)
        users = [70_001 + 17 * i for i in range(8)]
        reqs = [
            p.server(10 * i, 10_000, req=user_request(u) if with_ids else b"") for i, u in enumerate(users)
        ]
        for i, u in enumerate(users):
            p.client(10 * i + 100, 10 * i + 400, req=user_lookup(u) if with_ids else b"")
        late = p.client(170, 900, req=user_lookup(users[0]) if with_ids else b"")
        return p.process(), reqs, late

    process, reqs, late = build(with_ids=True)
    link = txn(process)[late.index]
    assert link.parent == reqs[0].index and link.method == INFERRED
    assert 1 / len(reqs) < link.confidence <= 1.0
    assert wap5(process)[late.index].parent == reqs[7].index
    process, reqs, late = build(with_ids=False)
    assert txn(process)[late.index].parent == reqs[7].index  # the timing alone


def test_txn_learns_the_delay_from_exact_links_where_wap5_takes_the_nearest():
    p = Proc()
    _learn_the_gap(p, gap=500)
    a = p.server(0, 5000)
    b = p.server(450, 5000)
    call = p.client(500, 800)  # 500 µs after a was read, as every call here is
    process = p.process()
    assert txn(process)[call.index].parent == a.index
    assert wap5(process)[call.index].parent == b.index


@pytest.mark.parametrize("home_first", [False, True])
def test_txn_api_affinity_prefers_the_operation_whose_traffic_rises_with_the_call(home_first):
    """Windows of 100 spans: /cart requests each making a SELECT; /home requests each
    making one, with the same delays; /home requests making nothing. SELECT traffic rises
    and falls with /cart, not /home. A SELECT made while a /cart and a /home request are
    both open, read and answered at the same instants, has the same delays to both:
    only the affinity tells them apart."""
    p = Proc()
    for phase, name in enumerate(["GET /cart", "GET /home"]):
        rnd = random.Random(3)  # the same delays in both phases
        for i in range(50):
            t = phase * 100_000 + i * 1000
            s = p.server(t, t + 500, name=name)
            c0 = t + rnd.randint(50, 150)  # whole µs: the delays are equal to the ns in both phases
            p.client(c0, c0 + rnd.randint(100, 300), name="SELECT cart", known=s)
    for i in range(100):
        p.server(200_000 + i * 1000, 200_000 + i * 1000 + 500, name="GET /home")
    names = ["GET /home", "GET /cart"] if home_first else ["GET /cart", "GET /home"]
    made = {name: p.server(400_000, 410_000, name=name) for name in names}  # creation order breaks time ties
    call = p.client(403_000, 404_000, name="SELECT cart")
    assert txn(p.process())[call.index] == Link(made["GET /cart"].index, INFERRED, 1.0)


def test_txn_decides_each_call_alone_so_two_can_take_one_request():
    """The trap: every request here makes one call, 100 µs after it is read. a and b
    were read 30 µs apart and each made its call; the two calls went out 10 µs apart, so
    both sit nearer 100 µs after a than after b, and both go to a. Assigning the calls
    together (one per request) would give b its own."""
    p = Proc()
    _learn_the_gap(p)
    a = p.server(0, 5000)
    b = p.server(30, 5000)
    x = p.client(100, 600)  # a's
    y = p.client(110, 700)  # b's
    links = txn(p.process())
    assert links[x.index].parent == a.index
    assert links[y.index].parent == a.index  # and b, which made a call, has none
    assert b.index not in {lk.parent for lk in links.values()}


def test_txn_learns_each_callee_its_own_delay_though_both_are_asked_the_same():
    """`GET /` to b goes out 100 µs after the request is read, `GET /` to c 600 µs after
    (and only every third request calls c). A call to c 600 µs after a was read and 100
    µs after b was: a's, though 100 µs is the delay most calls named `GET /` have."""
    p = Proc()
    rnd = random.Random(4)
    for i in range(30):
        t = -100_000 + i * 3000
        s = p.server(t, t + 1000)
        b0, c0 = t + 100 + rnd.uniform(-5, 5), t + 600 + rnd.uniform(-5, 5)
        p.client(b0, b0 + 300, name="GET /", rport=8001, known=s)
        if i % 3 == 0:
            p.client(c0, c0 + 300, name="GET /", rport=8002, known=s)
    a = p.server(0, 5000)
    b = p.server(500, 5000)
    to_c = p.client(600, 900, name="GET /", rport=8002)
    assert txn(p.process())[to_c.index].parent == a.index


def test_txn_with_a_single_candidate_is_sure_of_it():
    p = Proc()
    s = p.server(0, 1000)
    c = p.client(100, 200)
    assert txn(p.process()) == {c.index: Link(s.index, INFERRED, 1.0)}


def test_txn_variance_weighting_of_the_public_code_also_runs():
    p, a, b = two_overlapping_requests()
    call = p.client(200, 300)
    assert txn(p.process(), weighting="variance")[call.index].parent in (a.index, b.index)
    with pytest.raises(ValueError):
        txn(p.process(), weighting="uniform")


# txn's parts


def _exact_kde(samples, weights, x):
    total = sum(weights)
    mean = sum(w * s for s, w in zip(samples, weights)) / total
    var = sum(w * (s - mean) ** 2 for s, w in zip(samples, weights)) / (
        total - sum(w * w for w in weights) / total
    )
    h = math.sqrt(var) * (total**2 / sum(w * w for w in weights)) ** -0.2
    return sum(w * math.exp(-0.5 * ((x - s) / h) ** 2) for s, w in zip(samples, weights)) / (
        total * h * math.sqrt(2 * math.pi)
    )


def test_gridded_density_matches_the_exact_gaussian_kde():
    rnd = random.Random(2)
    samples = [rnd.lognormvariate(8, 0.7) for _ in range(400)] + [rnd.gauss(50_000, 2000) for _ in range(100)]
    weights = [rnd.choice([1.0, 0.5, 0.25]) for _ in samples]
    d = _Density()
    for s, w in zip(samples, weights):
        d.observe(s, w)
    d.place()
    for s, w in zip(samples, weights):
        d.add(s, w)
    d.smooth()
    for x in (500, 2000, 3000, 8000, 20_000, 48_000, 52_000):
        exact = _exact_kde(samples, weights, x)
        assert d(x) == pytest.approx(exact, rel=0.02, abs=1e-3 * max(d.grid)), x
    assert d(-1e9) == 0.0 and d(1e9) == 0.0


def test_a_delay_that_never_varies_has_no_density():
    d = _Density()
    for _ in range(5):
        d.observe(100, 1.0)
    d.place()
    for _ in range(5):
        d.add(100, 1.0)
    d.smooth()
    assert d(100) == 0.0


def test_entropy_weights_favour_a_feature_concentrated_on_few_pairs():
    one_hot = array("d", [0, 0, 0, 1, 0, 0])
    spread = array("d", [0.2, 0.9, 0.5, 1.0, 0.7, 0.0])
    even = array("d", [1, 1, 1, 1, 1, 1])
    w_hot, w_spread, w_even = _entropy_weights([one_hot, spread, even])
    assert w_hot > w_spread > w_even
    assert w_even == pytest.approx(0.0, abs=1e-12)
    assert w_hot + w_spread == pytest.approx(1.0)


def test_api_affinity_is_the_pearson_correlation_of_windowed_counts():
    rnd = random.Random(5)
    p = Proc()
    for i in range(1000):
        kind = rnd.choice(["SERVER", "CLIENT"])
        # /a busy early and quiet late; SELECTs follow it, GETs do not care.
        early = i < 500
        if kind == "SERVER":
            p.server(i, i + 1, name="GET /a" if rnd.random() < (0.8 if early else 0.2) else "GET /b")
        else:
            p.client(i, i + 1, name="SELECT" if rnd.random() < (0.7 if early else 0.3) else "redis GET")
    traffic = _Traffic(p.spans)
    windows = len(p.spans) // TRAFFIC_WINDOW

    def counts(kind, name):
        ordered = sorted(p.spans, key=lambda s: s.start_ns)
        out = [0] * windows
        for i, s in enumerate(ordered):
            out[i // TRAFFIC_WINDOW] += s.kind == kind and s.name == name
        return out

    def op(name):  # a call's operation names its callee, every call here the same one
        return f"{name} -> 10.0.0.2:6379"

    for request_op, call in [("GET /a", "SELECT"), ("GET /b", "SELECT"), ("GET /a", "redis GET")]:
        expected = statistics.correlation(counts("SERVER", request_op), counts("CLIENT", call))
        assert traffic.affinity(request_op, op(call)) == pytest.approx(expected, abs=1e-9)
    assert traffic.affinity("GET /a", op("SELECT")) > 0.5 > -0.5 > traffic.affinity("GET /b", op("SELECT"))
    assert traffic.affinity("GET /a", op("never called")) == 0.0
