"""Calls to Redis and PostgreSQL that write their own ground-truth record, with the local
port of the pooled connection they went out on (what lets the scorer find their span)."""

from __future__ import annotations

from common import CONFIG, pg_lport, redis_lport


async def aredis(log, client, *command):
    """One Redis command on a connection taken from the asyncio client's pool."""
    async with client.client() as conn:  # one pooled connection, released on exit
        with log.calling(f"redis {command[0]}", CONFIG["redis_port"]) as rec:
            result = await conn.execute_command(*command)
            rec["lport"] = redis_lport(conn)
    return result


def redis(log, conn, *command):
    """One Redis command on this thread's own connection."""
    with log.calling(f"redis {command[0]}", CONFIG["redis_port"]) as rec:
        result = conn.execute_command(*command)
        rec["lport"] = redis_lport(conn)
    return result


async def apg(log, pool, sql: str, params: tuple):
    """One query on a connection of a psycopg async pool (autocommit: no BEGIN/COMMIT calls)."""
    async with pool.connection() as conn:
        with log.calling(f"SQL {sql.split()[0]}", CONFIG["pg_port"]) as rec:
            rec["lport"] = pg_lport(conn)
            cur = await conn.execute(sql, params)
            return await cur.fetchone()


def pg(log, conn, sql: str, params: tuple):
    """One query on this thread's own psycopg connection."""
    with log.calling(f"SQL {sql.split()[0]}", CONFIG["pg_port"]) as rec:
        rec["lport"] = pg_lport(conn)
        return conn.execute(sql, params).fetchone()
