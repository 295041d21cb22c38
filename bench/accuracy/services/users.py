"""users (FastAPI on uvicorn, asyncio): GET /users/{id} reads the cache in Redis and, on a
miss, the row in PostgreSQL, then caches it for 30 s."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager

import uvicorn
from calls import apg, aredis
from common import CONFIG, pg_dsn, redis_pool, truth
from fastapi import FastAPI, HTTPException, Request
from psycopg_pool import AsyncConnectionPool

PORT = CONFIG["ports"]["users"]
LOG = truth("users")


@asynccontextmanager
async def lifespan(app: FastAPI):
    app.state.redis = redis_pool()
    app.state.pg = AsyncConnectionPool(
        pg_dsn(), min_size=2, max_size=10, kwargs={"autocommit": True}, open=False
    )
    await app.state.pg.open()
    yield
    await app.state.pg.close()
    await app.state.redis.aclose()
    LOG.close()  # uvicorn re-raises SIGTERM once shut down: atexit would not run


app = FastAPI(lifespan=lifespan)


@app.get("/users/{user_id}")
async def get_user(user_id: int, request: Request) -> dict:
    with LOG.serving("GET /users", PORT, request.client.port, key=f"user:{user_id}"):
        cached = await aredis(LOG, app.state.redis, "GET", f"user:{user_id}")
        if cached is not None:
            return json.loads(cached)
        row = await apg(
            LOG, app.state.pg, "SELECT id, name, email, tier, bio FROM users WHERE id = %s", (user_id,)
        )
        if row is None:
            raise HTTPException(404, "no such user")
        user = dict(zip(("id", "name", "email", "tier", "bio"), row))
        await aredis(LOG, app.state.redis, "SET", f"user:{user_id}", json.dumps(user), "EX", 30)
        return user


if __name__ == "__main__":
    uvicorn.run(
        app, host="127.0.0.1", port=PORT, timeout_keep_alive=75, access_log=False, log_level="warning"
    )
