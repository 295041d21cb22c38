"""Open-loop load on the gateway: Poisson arrivals at a fixed rate, whatever the latency.

Run as its own process, started by the benchmark and not by the traced launcher, so its
calls are not traced. The shop's payloads are realistic and carry no request id: a user
id from a large range, three random SKUs, an address of random length. The mesh's
(`--mesh MIX MODE`) are a route of the mix, with a random id (`fields`) or without one
(`timing`: every request of a route the same bytes).

    python load.py PORT RATE SECONDS SEED OUT.json [--mesh MIX MODE]
"""

from __future__ import annotations

import asyncio
import json
import random
import string
import sys
import time

import aiohttp

from workloads import MIXES

CHECKOUT_SHARE = 0.7


def request(rng: random.Random) -> tuple[str, str, dict | None]:
    user_id = rng.randint(1, 50_000)
    if rng.random() >= CHECKOUT_SHARE:
        return "GET", f"/profile/{user_id}", None
    items = [f"SKU-{rng.randint(10_000, 59_999)}" for _ in range(3)]
    address = "".join(rng.choices(string.ascii_letters + " ", k=rng.randint(20, 2000)))
    return "POST", "/checkout", {"user_id": user_id, "items": items, "address": address}


def mesh_request(rng: random.Random, mix: str, mode: str) -> tuple[str, str, None]:
    routes = MIXES[mix]
    route = rng.choices(list(routes), weights=list(routes.values()))[0]
    return "GET", route if mode == "timing" else f"{route}?id={rng.randint(1, 10**9)}", None


class InFlight:
    """Requests sent and not yet answered: peak, and mean over time."""

    def __init__(self) -> None:
        self.now = self.peak = 0
        self.area = 0.0
        self.since = self.start = time.monotonic()

    def change(self, delta: int) -> None:
        t = time.monotonic()
        self.area += self.now * (t - self.since)
        self.since = t
        self.now += delta
        self.peak = max(self.peak, self.now)

    def mean(self) -> float:
        return self.area / max(1e-9, self.since - self.start)


async def drive(port: int, rate: float, seconds: float, seed: int, mesh: tuple[str, str] | None) -> dict:
    rng = random.Random(seed)
    make = request if mesh is None else lambda rng: mesh_request(rng, *mesh)
    inflight, latencies, errors = InFlight(), [], []

    async def one(session: aiohttp.ClientSession, method: str, path: str, body) -> None:
        inflight.change(+1)
        t0 = time.monotonic()
        try:
            async with session.request(method, f"http://127.0.0.1:{port}{path}", json=body) as resp:
                await resp.read()
                if resp.status != 200 and not (mesh and resp.status == 503):  # /retry may give up: an answer
                    errors.append(f"HTTP {resp.status}")
                else:
                    latencies.append(time.monotonic() - t0)
        except Exception as e:  # noqa: BLE001  (a timeout or a reset under overload is a result, not a crash)
            errors.append(type(e).__name__)
        finally:
            inflight.change(-1)

    connector = aiohttp.TCPConnector(limit=1000, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=20)) as session:
        loop = asyncio.get_running_loop()
        tasks = set()
        start = due = loop.time()
        while (due := due + rng.expovariate(rate)) < start + seconds:
            await asyncio.sleep(due - loop.time())  # negative when late: go at once, stay on schedule
            task = asyncio.create_task(one(session, *make(rng)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        sent_for = loop.time() - start
        await asyncio.gather(*tasks)
    latencies.sort()
    sent = len(latencies) + len(errors)

    def pct(p: float) -> float | None:
        return (
            round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 1)
            if latencies
            else None
        )

    return {"target_rps": rate, "seconds": round(sent_for, 2), "sent": sent, "ok": len(latencies),
            "errors": len(errors), "error_kinds": sorted(set(errors)), "achieved_rps": round(len(latencies) / sent_for, 1),
            "p50_ms": pct(0.5), "p99_ms": pct(0.99), "inflight_peak": inflight.peak,
            "inflight_mean": round(inflight.mean(), 2), "driver_cpu_seconds": round(time.process_time(), 2)}  # fmt: skip


def main() -> None:
    port, rate, seconds, seed, out = (
        int(sys.argv[1]),
        float(sys.argv[2]),
        float(sys.argv[3]),
        int(sys.argv[4]),
        sys.argv[5],
    )
    mesh = (sys.argv[7], sys.argv[8]) if sys.argv[6:7] == ["--mesh"] else None
    result = asyncio.run(drive(port, rate, seconds, seed, mesh))
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
