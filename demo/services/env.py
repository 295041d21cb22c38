"""Where a service listens and where its peers are: environment variables the launcher sets,
as an orchestrator would."""

from __future__ import annotations

import os


def listen() -> tuple[str, int]:
    addr, _, port = os.environ["SHOP_LISTEN"].rpartition(":")
    return addr, int(port)


def url(peer: str) -> str:
    """CATALOG_URL, CART_URL, CHECKOUT_URL, DATABASE_URL, REDIS_URL."""
    return os.environ[f"{peer.upper()}_URL"]


def run_aiohttp(routes, clients) -> None:
    """Serve an aiohttp service on its SHOP_LISTEN address; `clients` opens and closes what it
    calls (an aiohttp cleanup context)."""
    from aiohttp import web

    app = web.Application()
    app.add_routes(routes)
    app.cleanup_ctx.append(clients)
    addr, port = listen()
    web.run_app(app, host=addr, port=port, access_log=None, print=None)
