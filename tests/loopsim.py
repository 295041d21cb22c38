"""A simulated single-threaded event-loop service (like aiohttp or FastAPI on asyncio):
requests overlap on one thread, each makes its calls in order, some carrying the
request's user id and some (a counter) carrying nothing. The simulation knows every
call's true parent, which the spans do not."""

from __future__ import annotations

import random

from spanmaker import client, server

PID = 700


def event_loop_service(n_requests: int, rate_per_s: float, seed: int = 1, fan_out: int = 0, retries: float = 0.0):
    """Spans and {call span_id: true parent span_id}. Each request: GET user:<id> from
    Redis, `fan_out` parallel stock lookups (one SKU each), then INCR (no fields). With
    `retries`, that share of GETs loses its response (an error span that ends when it
    was sent) and is sent again a little later."""
    rnd = random.Random(seed)
    spans, truth = [], {}
    t = 1_000_000.0  # µs
    for _ in range(n_requests):
        t += rnd.expovariate(rate_per_s / 1e6)
        user = rnd.randint(1000, 99999)
        skus = [f"SKU-{rnd.randint(10000, 99999)}" for _ in range(fan_out)]
        body = f'{{"user_id": {user}, "items": {skus}}}'.encode()
        calls = []
        now = t + rnd.uniform(30, 300)
        get = f"*2\r\n$3\r\nGET\r\n$10\r\nuser:{user}\r\n".encode()
        if rnd.random() < retries:
            calls.append((now, now + 10, "redis GET", get))
            now += rnd.uniform(1000, 2000)
        end = now + rnd.lognormvariate(6, 0.6)
        calls.append((now, end, "redis GET", get))
        now = end + rnd.uniform(20, 200)
        if fan_out:
            ends = []
            for i, sku in enumerate(skus):
                start = now + i * rnd.uniform(5, 40)
                e = start + rnd.lognormvariate(6.5, 0.5)
                calls.append((start, e, "GET /stock/{id}", f"GET /stock/{sku} HTTP/1.1\r\n\r\n".encode()))
                ends.append(e)
            now = max(ends) + rnd.uniform(20, 200)
        end = now + rnd.lognormvariate(5.5, 0.5)
        calls.append((now, end, "redis INCR", b"*2\r\n$4\r\nINCR\r\n$6\r\norders\r\n"))
        finish = end + rnd.uniform(20, 300)
        s = server(PID, int(t), int(finish), name="POST /checkout", req=b"POST /checkout HTTP/1.1\r\n\r\n" + body)
        spans.append(s)
        for start, e, name, head in calls:
            c = client(PID, int(start), int(e), name=name, req=head, protocol="redis" if "redis" in name else "http1")
            spans.append(c)
            truth[c["span_id"]] = s["span_id"]
    rnd.shuffle(spans)  # arrival order is not time order
    return spans, truth


def accuracy(spans: list[dict], truth: dict[str, str]) -> float:
    by = {d["span_id"]: d for d in spans}
    return sum(by[c]["parent_span_id"] == p for c, p in truth.items()) / len(truth)
