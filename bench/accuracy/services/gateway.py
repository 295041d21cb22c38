"""gateway (aiohttp, asyncio): the entry point.

POST /checkout: users, then inventory for each of the 3 items in parallel, then orders.
GET /profile/{user_id}: users only.
Clients: httpx for users, one aiohttp session for inventory and orders; both keep
connections alive in pools, which is what makes linking calls to requests hard.
"""

from __future__ import annotations

import asyncio

import aiohttp
import httpx
from aiohttp import web
from common import CONFIG, now_ns, truth

PORTS = CONFIG["ports"]
LOG = truth("gateway")


class ConnectionRecordingRequest(aiohttp.ClientRequest):
    """Notes on the response which pooled connection the request went out on (local port)
    and when it got it: a call may wait for a free connection first, and while it waits
    the connection it will get serves other calls. (aiohttp gives the connection back to
    its pool as soon as a short body is in: `resp.connection` is often gone by then.)"""

    async def send(self, conn):
        sent_ns = now_ns()
        resp = await super().send(conn)
        resp.lport, resp.sent_ns = conn.transport.get_extra_info("sockname")[1], sent_ns
        return resp


def url(service: str, path: str) -> str:
    return f"http://127.0.0.1:{PORTS[service]}{path}"


async def get_user(app, user_id: int) -> dict:
    with LOG.calling("GET /users", PORTS["users"], key=f"user:{user_id}") as rec:

        async def connected(event: str, info: dict) -> None:  # httpcore's trace hook
            if event == "http11.send_request_headers.started":
                rec["t_conn"] = now_ns()  # the pool gave the call its connection

        resp = await app["users"].get(url("users", f"/users/{user_id}"), extensions={"trace": connected})
        rec["lport"] = resp.extensions["network_stream"].get_extra_info("client_addr")[1]
        resp.raise_for_status()
        return resp.json()


async def get_stock(app, sku: str) -> dict:
    with LOG.calling("GET /stock", PORTS["inventory"], key=f"stock:{sku}") as rec:
        async with app["http"].get(url("inventory", f"/stock/{sku}")) as resp:
            rec["lport"], rec["t_conn"] = resp.lport, resp.sent_ns
            resp.raise_for_status()
            return await resp.json()


async def place_order(app, order: dict) -> dict:
    key = f"order:{order['user_id']}:{','.join(order['items'])}"
    with LOG.calling("POST /orders", PORTS["orders"], key=key) as rec:
        async with app["http"].post(url("orders", "/orders"), json=order) as resp:
            rec["lport"], rec["t_conn"] = resp.lport, resp.sent_ns
            resp.raise_for_status()
            return await resp.json()


def peer_port(request: web.Request) -> int:
    return request.transport.get_extra_info("peername")[1]


async def checkout(request: web.Request) -> web.Response:
    with LOG.serving("POST /checkout", PORTS["gateway"], peer_port(request)) as rec:
        body = await request.json()
        rec["key"] = f"checkout:{body['user_id']}"
        user = await get_user(request.app, body["user_id"])
        stock = await asyncio.gather(*(get_stock(request.app, sku) for sku in body["items"]))
        if any(s["qty"] <= 0 for s in stock):
            return web.json_response({"error": "out of stock"}, status=409)
        order = await place_order(request.app, {"user_id": user["id"], "items": body["items"],
                                                "address": body["address"]})  # fmt: skip
        return web.json_response({"order_id": order["id"], "total": order["total"], "name": user["name"]})


async def profile(request: web.Request) -> web.Response:
    user_id = int(request.match_info["user_id"])
    with LOG.serving("GET /profile", PORTS["gateway"], peer_port(request), key=f"profile:{user_id}"):
        user = await get_user(request.app, user_id)
        return web.json_response({"name": user["name"], "tier": user["tier"], "bio": user["bio"]})


async def clients(app: web.Application):
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100, keepalive_expiry=60)
    connector = aiohttp.TCPConnector(limit=200, limit_per_host=100, keepalive_timeout=60)
    async with httpx.AsyncClient(limits=limits, timeout=10) as users, \
            aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10),
                                  request_class=ConnectionRecordingRequest) as http:  # fmt: skip
        app["users"], app["http"] = users, http
        yield


def main() -> None:
    app = web.Application()
    app.router.add_post("/checkout", checkout)
    app.router.add_get("/profile/{user_id}", profile)
    app.cleanup_ctx.append(clients)
    web.run_app(app, host="127.0.0.1", port=PORTS["gateway"], access_log=None, print=None)


if __name__ == "__main__":
    main()
