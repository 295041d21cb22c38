"""Redis and PostgreSQL for the workload: the test suite's real servers (Debian packages,
free loopback ports), seeded with the shop's data. Neither is traced."""

from __future__ import annotations

import random
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import servers

USERS = 50_000
SKUS = range(10_000, 60_000)  # "SKU-10000" .. "SKU-59999"

SCHEMA = """
CREATE TABLE users (id int PRIMARY KEY, name text, email text, tier text, bio text);
CREATE TABLE stock (sku text PRIMARY KEY, qty int, warehouse text);
CREATE TABLE orders (id bigserial PRIMARY KEY, user_id int, items text[], address text,
                     created timestamptz DEFAULT now());
-- Bios of 0 to ~3 kB: user replies vary in size, as real ones do.
INSERT INTO users SELECT i, 'user ' || i, 'user' || i || '@example.org', (ARRAY['free', 'plus', 'pro'])[1 + i % 3],
                         repeat('lorem ipsum ', (i * 7919) % 250) FROM generate_series(1, {users}) i;
INSERT INTO stock SELECT 'SKU-' || i, 1 + (i * 31) % 500, 'wh-' || (i % 7) FROM generate_series({first}, {last}) i;
"""


@contextmanager
def datastores():
    """Yields {"redis_port", "pg_port"} while both servers run."""
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="deeptrace-acc-")))
        _, redis_port = stack.enter_context(servers.redis(tmp))
        _, pg_port = stack.enter_context(servers.postgres())
        seed_postgres(pg_port)
        yield {"redis_port": redis_port, "pg_port": pg_port}


def seed_postgres(port: int) -> None:
    import psycopg

    with psycopg.connect(
        f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True
    ) as conn:
        conn.execute("CREATE DATABASE shop")
    with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=shop", autocommit=True) as conn:
        conn.execute(SCHEMA.format(users=USERS, first=SKUS.start, last=SKUS.stop - 1))


def reset_redis(port: int) -> None:
    """Same start for every load level: an empty user cache, and the price list."""
    import redis

    rng = random.Random(7)
    with redis.Redis(host="127.0.0.1", port=port) as r:
        r.flushall()
        pipe = r.pipeline(transaction=False)
        for i in SKUS:
            pipe.set(f"price:SKU-{i}", rng.randint(99, 99_999))
        pipe.execute()
