"""checkout (aiohttp): turns a basket into an order. Asks catalog for each item (in
parallel), refuses out-of-stock items (409), now and then runs a slow fraud review, writes
the order to PostgreSQL and empties the user's cart."""

from __future__ import annotations

import asyncio
import random

import aiohttp
from aiohttp import web
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from demo.services import env

# The latency outliers the UI should show, and the span that explains them.
SLOW_REVIEW_RATE = 0.03
SLOW_REVIEW_S = (0.4, 0.9)

routes = web.RouteTableDef()
HTTP = web.AppKey("http", aiohttp.ClientSession)
DB = web.AppKey("db", AsyncConnectionPool)


class Refused(Exception):
    def __init__(self, status: int, **body) -> None:
        super().__init__(body)
        self.status, self.body = status, body


async def product(app: web.Application, product_id: int) -> dict:
    async with app[HTTP].get(f"{env.url('catalog')}/products/{product_id}") as resp:
        if resp.status == 404:
            raise Refused(400, error="no such product", product=product_id)
        resp.raise_for_status()
        return await resp.json()


async def place(app: web.Application, user: int, items: list[dict]) -> dict:
    found = await asyncio.gather(*(product(app, it["product"]) for it in items))
    short = [p["id"] for p, it in zip(found, items) if p["stock"] < it["qty"]]
    if short:
        raise Refused(409, error="out of stock", products=short)
    total = sum(p["price_cents"] * it["qty"] for p, it in zip(found, items))
    async with app[DB].connection() as conn:
        if random.random() < SLOW_REVIEW_RATE:
            await conn.execute(
                "SELECT count(*) FROM orders, pg_sleep(%s) WHERE user_id = %s",
                (random.uniform(*SLOW_REVIEW_S), user),
            )
        cur = await conn.execute(
            "INSERT INTO orders (user_id, items, total_cents) VALUES (%s, %s, %s) RETURNING id",
            (user, Jsonb(items), total),
        )
        (order_id,) = await cur.fetchone()
    async with app[HTTP].delete(f"{env.url('cart')}/cart/{user}") as resp:
        resp.raise_for_status()
    return {"order": order_id, "total_cents": total}


@routes.post("/orders")
async def orders(request: web.Request) -> web.Response:
    try:
        body = await request.json()
        user = int(body["user"])
        items = [{"product": int(it["product"]), "qty": int(it.get("qty", 1))} for it in body["items"]]
    except (ValueError, KeyError, TypeError):
        return web.json_response({"error": "expected {user, items: [{product, qty}]}"}, status=400)
    if not items:
        return web.json_response({"error": "empty basket"}, status=400)
    try:
        return web.json_response(await place(request.app, user, items), status=201)
    except Refused as r:
        return web.json_response(r.body, status=r.status)


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def clients(app: web.Application):
    connector = aiohttp.TCPConnector(limit=64, keepalive_timeout=30)
    # min_size=0: connections are opened on first use, after the agent is tracing.
    pool = AsyncConnectionPool(
        env.url("database"), min_size=0, max_size=4, open=False, kwargs={"autocommit": True}
    )
    await pool.open()
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=15)) as session:
        app[HTTP], app[DB] = session, pool
        yield
    await pool.close()


def main() -> None:
    env.run_aiohttp(routes, clients)


if __name__ == "__main__":
    main()
