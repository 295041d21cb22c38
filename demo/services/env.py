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
