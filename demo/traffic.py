"""The shop's users: a steady mix of requests sent through nginx, open loop (arrivals do not
wait for answers, as real users don't), until stopped or for --seconds.

    python -m demo.traffic --url http://127.0.0.1:8080 [--rate 20] [--seconds N] [--seed S]
                           [--mix browse=30,product=30,view_cart=10,add_to_cart=18,checkout=12]

Not traced: its requests are the roots of the traces. The same seed gives the same sequence
of requests.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import time
from collections import Counter

import aiohttp

from demo import data
from demo.callgraph import ROUTE

DEFAULT_MIX = {"browse": 30, "product": 30, "view_cart": 10, "add_to_cart": 18, "checkout": 12}
MISSING_PRODUCT_RATE = 0.03  # product pages of ids that do not exist: 404s
MAX_IN_FLIGHT = 200  # past this the shop is overloaded: arrivals are dropped, and counted


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in filter(None, text.split(",")):
        key, _, weight = part.partition("=")
        if key not in ROUTE:
            raise argparse.ArgumentTypeError(f"unknown request kind {key!r} (known: {', '.join(ROUTE)})")
        mix[key] = float(weight or 1)
    if not mix or sum(mix.values()) <= 0:
        raise argparse.ArgumentTypeError("the mix needs a positive weight")
    return mix


def make_request(key: str, rng: random.Random) -> tuple[str, str, dict | None]:
    """(method, path, JSON body) of one request of this kind."""
    route = ROUTE[key]
    user, product = rng.choice(data.USERS), rng.choice(data.PRODUCTS)
    body = None
    if key == "product" and rng.random() < MISSING_PRODUCT_RATE:
        product = data.PRODUCTS.stop + rng.randrange(1000)
    elif key == "add_to_cart":
        body = {"product": product, "qty": rng.randint(1, 3)}
    elif key == "checkout":
        basket = [product] if rng.random() < 0.8 else rng.sample(data.PRODUCTS, 2)
        body = {"user": user, "items": [{"product": p, "qty": rng.randint(1, 2)} for p in basket]}
    return route.method, route.path.format(user=user, product=product), body


class Stats:
    def __init__(self) -> None:
        self.by_status: Counter = Counter()
        self.sent = self.dropped = 0
        self.started = time.monotonic()

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        statuses = " ".join(f"{k}:{v}" for k, v in sorted(self.by_status.items()))
        return (
            f"traffic: {self.sent} requests in {elapsed:.0f}s ({self.sent / max(elapsed, 1e-9):.1f}/s), "
            f"status {statuses or '-'}, dropped {self.dropped}"
        )


async def send(session: aiohttp.ClientSession, base: str, request: tuple, stats: Stats) -> None:
    method, path, body = request
    try:
        async with session.request(method, base + path, json=body) as resp:
            await resp.read()
            stats.by_status[str(resp.status)] += 1
    except (TimeoutError, aiohttp.ClientError) as e:
        stats.by_status[type(e).__name__] += 1


async def run(
    base: str, rate: float, seconds: float | None, seed: int | None, mix: dict[str, float]
) -> Stats:
    rng = random.Random(seed)
    keys, weights = list(mix), list(mix.values())
    stats = Stats()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if seconds is not None:
        loop.call_later(seconds, stop.set)
    in_flight: set[asyncio.Task] = set()
    connector = aiohttp.TCPConnector(limit=MAX_IN_FLIGHT)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        next_at, next_report = time.monotonic(), time.monotonic() + 10
        while not stop.is_set():
            next_at += rng.expovariate(rate)  # Poisson arrivals at the mean rate
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.monotonic()))
                break
            except TimeoutError:
                pass
            request = make_request(rng.choices(keys, weights)[0], rng)
            if len(in_flight) >= MAX_IN_FLIGHT:
                stats.dropped += 1
                continue
            stats.sent += 1
            task = asyncio.create_task(send(session, base, request, stats))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            if time.monotonic() >= next_report:
                next_report += 10
                print(stats.line(), flush=True)
        if in_flight:
            await asyncio.wait(in_flight, timeout=10)
    return stats


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m demo.traffic", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="nginx's address, e.g. http://127.0.0.1:8080")
    p.add_argument("--rate", type=float, default=20.0, help="requests per second (mean; default 20)")
    p.add_argument(
        "--seconds", type=float, default=None, help="stop after this long (default: until stopped)"
    )
    p.add_argument("--seed", type=int, default=None, help="the same seed, the same requests")
    p.add_argument(
        "--mix",
        type=parse_mix,
        default=DEFAULT_MIX,
        help="relative weights of the kinds of request (default: "
        + ",".join(f"{k}={v}" for k, v in DEFAULT_MIX.items())
        + ")",
    )
    args = p.parse_args(argv)
    if args.rate <= 0:
        p.error("--rate must be positive")
    stats = asyncio.run(run(args.url.rstrip("/"), args.rate, args.seconds, args.seed, args.mix))
    print(stats.line(), flush=True)


if __name__ == "__main__":
    main()
