"""orders (aiohttp, asyncio): POST /orders inserts the order in PostgreSQL, asks pricing
for the total over gRPC, then records it in Redis (recent orders list, a counter)."""

from __future__ import annotations

import json

import grpc
from aiohttp import web
from calls import apg, aredis
from common import CONFIG, pg_dsn, redis_pool, truth
from psycopg_pool import AsyncConnectionPool

PORTS = CONFIG["ports"]
LOG = truth("orders")


async def create(request: web.Request) -> web.Response:
    peer_port = request.transport.get_extra_info("peername")[1]
    with LOG.serving("POST /orders", PORTS["orders"], peer_port) as rec:
        order = await request.json()
        user_id, items = order["user_id"], order["items"]
        rec["key"] = f"order:{user_id}:{','.join(items)}"
        app = request.app
        (order_id,) = await apg(LOG, app["pg"], "INSERT INTO orders (user_id, items, address) VALUES (%s, %s, %s) "
                                "RETURNING id", (user_id, items, order["address"]))  # fmt: skip
        with LOG.calling("grpc Quote", PORTS["pricing"], key=f"quote:{user_id}:{','.join(items)}"):
            quote = await app["quote"]({"user_id": user_id, "skus": items}, timeout=10)
        await aredis(LOG, app["redis"], "LPUSH", f"recent:{user_id}", order_id)
        await aredis(LOG, app["redis"], "INCRBY", "revenue:cents", quote["total"])
        return web.json_response({"id": order_id, "total": quote["total"]})


async def clients(app: web.Application):
    app["redis"] = redis_pool()
    app["pg"] = AsyncConnectionPool(
        pg_dsn(), min_size=2, max_size=10, kwargs={"autocommit": True}, open=False
    )
    await app["pg"].open()
    # One channel: gRPC multiplexes concurrent calls on one HTTP/2 connection.
    channel = grpc.aio.insecure_channel(f"ipv4:127.0.0.1:{PORTS['pricing']}")
    app["quote"] = channel.unary_unary("/shop.Pricing/Quote", request_serializer=lambda m: json.dumps(m).encode(),
                                       response_deserializer=json.loads)  # fmt: skip
    yield
    await channel.close()
    await app["pg"].close()
    await app["redis"].aclose()


def main() -> None:
    app = web.Application()
    app.router.add_post("/orders", create)
    app.cleanup_ctx.append(clients)
    web.run_app(app, host="127.0.0.1", port=PORTS["orders"], access_log=None, print=None)


if __name__ == "__main__":
    main()
