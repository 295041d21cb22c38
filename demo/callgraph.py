"""Who calls whom in the shop, written once.

The traffic driver reads it to know what to ask, the end-to-end test to know what the
traces and the service map must show. Operation names are written as the agent names
them: numeric path segments become `{id}`, SQL is `VERB table`, Redis is `redis COMMAND`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# When a call happens within its parent's request.
ALWAYS = "always"
ON_SUCCESS = "on success"  # skipped when the request fails early (e.g. out of stock)
SOMETIMES = "sometimes"  # a path taken now and then (the slow fraud review)

FRONT = ("nginx", "gateway")  # the front half; the rest is the back half (two-host demo)
SERVICES = ("nginx", "gateway", "catalog", "cart", "checkout")
DATASTORES = ("postgresql", "redis")


@dataclass(frozen=True)
class Call:
    """A request one component makes of another. A traced callee answers it in a SERVER
    span and makes calls of its own; a datastore is not traced, so only the caller's
    CLIENT span shows the call."""

    callee: str  # a service, or a datastore's protocol name
    name: str  # the operation, as both ends' spans name it
    protocol: str = "http"
    calls: tuple[Call, ...] = ()
    when: str = ALWAYS

    @property
    def traced(self) -> bool:
        return self.callee in SERVICES


@dataclass(frozen=True)
class Route:
    """A request of the public API, as the traffic driver sends it to nginx."""

    key: str
    method: str
    path: str  # placeholders: {user}, {product}
    entry: Call  # nginx's part and everything below it


_PLACEHOLDER = re.compile(r"{\w+}")


def span_name(method: str, path: str) -> str:
    return f"{method} {_PLACEHOLDER.sub('{id}', path)}"


def http(callee: str, method: str, path: str, *calls: Call, when: str = ALWAYS) -> Call:
    return Call(callee, span_name(method, path), "http", calls, when)


def sql(name: str, when: str = ALWAYS) -> Call:
    return Call("postgresql", name, "postgresql", (), when)


def redis(command: str, when: str = ALWAYS) -> Call:
    return Call("redis", f"redis {command}", "redis", (), when)


def _route(key: str, method: str, path: str, backend: Call) -> Route:
    """A public request: nginx proxies /api/X to the gateway's /X, which makes one backend call."""
    inner = path.removeprefix("/api")
    return Route(key, method, path, http("nginx", method, path, http("gateway", method, inner, backend)))


PRODUCTS = http("catalog", "GET", "/products", sql("SELECT products"))
PRODUCT = http("catalog", "GET", "/products/{product}", sql("SELECT products"))
CART = http("cart", "GET", "/cart/{user}", redis("HGETALL"))
ADD_TO_CART = http("cart", "POST", "/cart/{user}/items", redis("HINCRBY"), redis("EXPIRE"))
ORDER = http(
    "checkout", "POST", "/orders",
    PRODUCT,  # once per item, in parallel
    sql("SELECT orders", when=SOMETIMES),  # the slow fraud review
    sql("INSERT orders", when=ON_SUCCESS),
    http("cart", "DELETE", "/cart/{user}", redis("DEL"), when=ON_SUCCESS),
)  # fmt: skip

ROUTES: tuple[Route, ...] = (
    _route("browse", "GET", "/api/products", PRODUCTS),
    _route("product", "GET", "/api/products/{product}", PRODUCT),
    _route("view_cart", "GET", "/api/cart/{user}", CART),
    _route("add_to_cart", "POST", "/api/cart/{user}/items", ADD_TO_CART),
    _route("checkout", "POST", "/api/checkout", ORDER),
)

ROUTE = {r.key: r for r in ROUTES}


def walk(call: Call, caller: str | None = None):
    """(caller, call) for this call and every call below it."""
    yield caller, call
    for c in call.calls:
        yield from walk(c, call.callee)


def edges() -> set[tuple[str, str]]:
    """(caller, callee) for every call any route makes: the service map's edges."""
    return {(caller, call.callee) for r in ROUTES for caller, call in walk(r.entry) if caller is not None}
