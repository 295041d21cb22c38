"""gateway (aiohttp): the API behind nginx. Each request becomes one call to a backend,
over pooled keep-alive connections shared by all requests."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from demo.services import env

routes = web.RouteTableDef()
HTTP = web.AppKey("http", aiohttp.ClientSession)


async def relay(request: web.Request, backend: str, path: str) -> web.Response:
    """The backend's answer, status and body, as ours."""
    body = await request.read() if request.can_read_body else None
    headers = {"Content-Type": "application/json"} if body else None
    async with request.app[HTTP].request(
        request.method, env.url(backend) + path, data=body, headers=headers
    ) as resp:
        return web.Response(status=resp.status, body=await resp.read(), content_type="application/json")


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@routes.get("/products")
async def products(request: web.Request) -> web.Response:
    return await relay(request, "catalog", "/products")


@routes.get(r"/products/{product:\d+}")
async def product(request: web.Request) -> web.Response:
    return await relay(request, "catalog", f"/products/{request.match_info['product']}")


@routes.get(r"/cart/{user:\d+}")
async def view_cart(request: web.Request) -> web.Response:
    return await relay(request, "cart", f"/cart/{request.match_info['user']}")


@routes.post(r"/cart/{user:\d+}/items")
async def add_to_cart(request: web.Request) -> web.Response:
    return await relay(request, "cart", f"/cart/{request.match_info['user']}/items")


@routes.post("/checkout")
async def checkout(request: web.Request) -> web.Response:
    return await relay(request, "checkout", "/orders")


async def http_client(app: web.Application):
    # Shorter than the backends' keep-alive, so a pooled connection is never reused just as
    # the server closes it.
    connector = aiohttp.TCPConnector(limit=64, keepalive_timeout=30)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=15)) as session:
        app[HTTP] = session
        yield


def main() -> None:
    env.run_aiohttp(routes, http_client)


if __name__ == "__main__":
    main()
