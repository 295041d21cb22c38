"""cart (FastAPI on uvicorn): each user's cart, a Redis hash of product -> quantity."""

from __future__ import annotations

from contextlib import asynccontextmanager

import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI, Response
from pydantic import BaseModel, Field

from demo.services import env

CART_TTL_S = 3600


@asynccontextmanager
async def lifespan(app: FastAPI):
    # No HELLO (RESP2) and no CLIENT SETINFO when a connection opens: calls that belong to the
    # connection, not to the request that happened to open it, would only clutter its trace.
    app.state.redis = aioredis.Redis.from_url(
        env.url("redis"), protocol=2, driver_info=None, decode_responses=True
    )
    yield
    await app.state.redis.aclose()


app = FastAPI(lifespan=lifespan)


class Item(BaseModel):
    product: int = Field(gt=0)
    qty: int = Field(default=1, gt=0, le=10)


@app.get("/health")
async def health() -> dict:
    return {"ok": True}


@app.get("/cart/{user}")
async def view(user: int) -> dict:
    items = await app.state.redis.hgetall(f"cart:{user}")
    return {"user": user, "items": {int(k): int(v) for k, v in items.items()}}


@app.post("/cart/{user}/items", status_code=201)
async def add(user: int, item: Item) -> dict:
    key = f"cart:{user}"
    qty = await app.state.redis.hincrby(key, str(item.product), item.qty)
    await app.state.redis.expire(key, CART_TTL_S)
    return {"user": user, "product": item.product, "qty": qty}


@app.delete("/cart/{user}", status_code=204)
async def clear(user: int) -> Response:
    await app.state.redis.delete(f"cart:{user}")
    return Response(status_code=204)


def main() -> None:
    addr, port = env.listen()
    uvicorn.run(app, host=addr, port=port, log_level="warning", access_log=False, timeout_keep_alive=75)


if __name__ == "__main__":
    main()
