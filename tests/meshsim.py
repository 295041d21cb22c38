"""A simulated service in a runtime that moves work between threads (like Go's goroutines
on OS threads), whose requests carry nothing that tells them apart: every request of a
route is the same bytes. Only timing says which request made a call. The shapes are those
of bench/accuracy's foreign mesh: sequential fan-out, parallel fan-out, a call count that
varies per request, a retry. The simulation knows every call's true parent, which the
spans do not."""

from __future__ import annotations

import random

from spanmaker import client, server

PID = 900
THREADS = 8  # OS threads the runtime spreads its work over
SHAPES = ("seq", "par", "var", "retry")
CALLEES = {"/b": "10.0.0.2", "/c": "10.0.0.3", "/flaky": "10.0.0.3"}


def _call(rnd: random.Random, start: float, callee: str, work_us: float) -> tuple[float, float, str]:
    return start, start + 60 + rnd.expovariate(1 / work_us), callee


def _handler(rnd: random.Random, shape: str, t: float, think_us: float, work_us: float):
    """The calls one request makes (start, end, callee) and when it answers; times in µs."""
    think = lambda: 5 + rnd.expovariate(1 / think_us)  # noqa: E731  (the scheduler's delay and the handler's own work)
    now, calls = t + think(), []
    if shape == "seq":
        for callee in ("/b", "/c"):
            calls.append(_call(rnd, now, callee, work_us))
            now = calls[-1][1] + think()
    elif shape == "par":
        calls = [_call(rnd, now, "/b", work_us), _call(rnd, now + rnd.uniform(2, 30), "/c", work_us)]
        now = max(e for _, e, _ in calls) + think()
    elif shape == "var":
        for _ in range(rnd.randint(1, 4)):
            calls.append(_call(rnd, now, "/b", work_us))
            now = calls[-1][1] + think()
    elif shape == "retry":
        for _ in range(3):
            calls.append(_call(rnd, now, "/flaky", work_us))
            now = calls[-1][1] + think()
            if rnd.random() >= 0.3:
                break
    return calls, now


def mesh_service(n_requests: int, rate_per_s: float, shapes=("seq",), seed: int = 1, think_us: float = 40.0,
                 work_us: float = 5000.0, stay: float = 0.0,
                 own_reader: bool = False) -> tuple[list[dict], dict[str, str], list[list[str]]]:  # fmt: skip
    """Spans of one service; {call span_id: true parent span_id}; each request's span ids.
    Any thread may run any step; with probability `stay` a step runs on the thread of the
    request's step before it (Go runs the goroutine a read wakes next, on the reader's
    thread: a call is often sent on the thread that read the last response). `own_reader`:
    a pool thread handles and answers each request, and its calls' responses are read by
    a thread of its own (a client per pool thread, as Java's HttpClient with its selector
    thread; an event loop's own connections), while any thread sends them."""
    rnd = random.Random(seed)
    spans, truth, trees = [], {}, []
    t = 1_000_000.0  # µs
    threads = random.Random(seed + 1)  # its own draws: `stay` changes the threads, not the traffic
    any_tid = lambda: PID + 1 + threads.randrange(THREADS)  # noqa: E731
    tid = lambda last: last if threads.random() < stay else any_tid()  # noqa: E731
    for _ in range(n_requests):
        t += rnd.expovariate(rate_per_s / 1e6)
        shape = rnd.choice(shapes)
        calls, done = _handler(rnd, shape, t, think_us, work_us)
        head = f"GET /{shape} HTTP/1.1\r\nHost: a\r\n\r\n".encode()
        s = server(PID, int(t), int(done + 20), name=f"GET /{shape}", req=head, tid=any_tid())
        spans.append(s)
        tree = [s["span_id"]]
        last = s["tid"]
        for start, end, callee in sorted(calls):
            # b and c serve the same path: only the address tells their calls apart.
            req = b"GET / HTTP/1.1\r\nHost: mesh\r\n\r\n"
            c = client(PID, int(start), int(end), name="GET /", req=req, tid=tid(last), protocol="http",
                       raddr=CALLEES[callee], rport=8080)  # fmt: skip
            c["resp_tid"] = last = any_tid()  # whichever thread's poller saw the response
            if own_reader:
                c["resp_tid"] = s["tid"] + 1000
            spans.append(c)
            truth[c["span_id"]] = s["span_id"]
            tree.append(c["span_id"])
        s["resp_tid"] = s["tid"] if own_reader else tid(last)
        trees.append(tree)
    rnd.shuffle(spans)  # arrival order is not time order
    return spans, truth, trees


def trace_accuracy(spans: list[dict], truth: dict[str, str], trees: list[list[str]]) -> float:
    """Share of requests all of whose calls went to them."""
    parent = {d["span_id"]: d["parent_span_id"] for d in spans}
    return sum(all(parent[c] == truth[c] for c in tree[1:]) for tree in trees) / len(trees)


def in_flight(spans: list[dict]) -> float:
    """Mean requests open at once, over the time any was open."""
    servers = [d for d in spans if d["kind"] == "SERVER"]
    busy = sum(d["end_ns"] - d["start_ns"] for d in servers)
    return busy / (max(d["end_ns"] for d in servers) - min(d["start_ns"] for d in servers))
