"""The store on ClickHouse, for more than one machine: `--store clickhouse://HOST:PORT/DATABASE`.

The server talks ClickHouse's native protocol (clickhouse-driver). The SQL runs on Debian's
ClickHouse 18.16 and on current releases: JSON fields are read with visitParamExtract*
(the JSONExtract functions came later), retention deletes with ALTER TABLE ... DELETE
(TTL came later), and rows that change (an agent's last report, a dead letter written
again) live in ReplacingMergeTree tables read with FINAL.

ClickHouse has no transactions and no unique keys, so the batch queue is built to need
neither:
- Every copy of a batch that arrives is written with its time and a random token; of the
  copies of one (agent, batch), the first received (the token breaks ties) is the batch, and
  a server whose copy is not it once written answers "duplicate". Two servers that take the
  same re-sent batch at once may both answer "accepted", but only one copy is ever linked.
- A batch is done when a row in `done_batches` says so, written after its spans. A crash
  between the two replays the batch, and spans already stored are skipped (stored_span_ids),
  as after any crash.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
from urllib.parse import parse_qs, unquote, urlsplit

from deeptrace.association.exact import CallEnd
from deeptrace.schema import FIELDS
from deeptrace.server.store import sql
from deeptrace.server.store.base import (
    AgentInfo,
    Cluster,
    DeadLetter,
    DuplicateBatch,
    Store,
    StoreStats,
    StoreUnavailable,
)
from deeptrace.server.store.reading import SqlSpanReader
from deeptrace.server.store.schema import COLUMN_NAMES, SPAN_COLUMNS, span_to_columns

DEFAULT_PORT = 9000  # the native protocol's
TYPES = {"VARCHAR": "String", "BIGINT": "Int64", "DOUBLE": "Float64"}
# Columns every stored span has: the sorting key and partition may use them.
NOT_NULL = {f.name for f in FIELDS if f.required} | {"duration_ns"}
# The batches not yet linked: no row of done_batches says they are.
_NOT_DONE = "(agent_id, batch_id) NOT IN (SELECT agent_id, batch_id FROM done_batches)"
_PLACEHOLDER = re.compile(r"'(?:[^'\\]|\\.)*'|\?")
IN_LIST_CHUNK = 2000  # values per IN (...): a query's text is at most 256 KiB by default
CALL_ENDS_HOUR_NS = 3600 * 10**9  # the calls table's partitions: an hour of accepted batches each
CALL_ENDS_KEPT_HOURS = 2  # a batch not linked by then has lost its cross-server joins


class ClickHouseDialect(sql.Dialect):
    def percentile(self, expr: str, q: float) -> str:
        return f"quantile({q})({expr})"

    def json_field_is(self, column: str, key: str, value: str) -> tuple[str, list]:
        # A string value, or a number or boolean as its JSON text (as DuckDB's json_extract_string gives it).
        return (f"(visitParamExtractString({column}, ?) = ? OR visitParamExtractRaw({column}, ?) = ?)",
                [key, value, key, value])  # fmt: skip

    def like(self, column: str) -> str:
        return f"{column} LIKE ?"  # a backslash escapes in ClickHouse's LIKE without being asked

    def as_text(self, column: str) -> str:
        return f"toString({column})"  # CAST of a Nullable column to String fails on a NULL in 18.16


def bind(query: str, params: list) -> tuple[str, dict | None]:
    """A query with `?` placeholders as clickhouse-driver takes it: %(pN)s and a dict (and,
    with parameters, every other % doubled, since the driver fills them in with Python's %)."""
    if not params:
        return query, None
    values: dict = {}

    def mark(m: re.Match) -> str:
        if m.group() != "?":
            return m.group()  # a string literal: a ? in it is no placeholder
        name = f"p{len(values)}"
        values[name] = params[len(values)]
        return f"%({name})s"

    text = _PLACEHOLDER.sub(mark, query.replace("%", "%%"))
    if len(values) != len(params):
        raise ValueError(f"{len(params)} parameters for {len(values)} placeholders")
    return text, values


def parse_url(url: str) -> dict:
    """clickhouse://[USER[:PASSWORD]@]HOST[:PORT]/DATABASE[?cluster=NAME] -> connection
    settings. User and password may come from CLICKHOUSE_USER and CLICKHOUSE_PASSWORD instead
    (kept out of `ps`). With a cluster (one of the server's <remote_servers>), spans are
    sharded over it."""
    parts = urlsplit(url)
    database = parts.path.strip("/")
    if parts.scheme != "clickhouse" or not parts.hostname or not database or "/" in database:
        raise ValueError(f"not a ClickHouse store URL: {url!r} (clickhouse://HOST[:PORT]/DATABASE)")
    options = parse_qs(parts.query)
    cluster = options.pop("cluster", [None])[-1]
    if options:
        raise ValueError(f"unknown ClickHouse store option {min(options)!r} in {url!r} (known: cluster)")
    for what, name in (("database", database), ("cluster", cluster)):
        if name is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"{what} name {name!r}: letters, digits and '_' only")
    return {"host": parts.hostname, "port": parts.port or DEFAULT_PORT, "database": database, "cluster": cluster,
            "user": unquote(parts.username) if parts.username else os.environ.get("CLICKHOUSE_USER", "default"),
            "password": unquote(parts.password) if parts.password else os.environ.get("CLICKHOUSE_PASSWORD", "")}  # fmt: skip


def _column(name: str, portable: str) -> str:
    t = TYPES[portable]
    return f"{name} {t if name in NOT_NULL else f'Nullable({t})'}"


class ClickHouseStore(SqlSpanReader, Store, Cluster):
    def __init__(self, url: str) -> None:
        from clickhouse_driver import Client, errors

        self._errors = errors
        self.settings = parse_url(url)
        self.database = self.settings["database"]
        self.dialect = ClickHouseDialect()
        self._local = threading.local()  # a client per thread: one is not safe to share
        s = self.settings
        self.cluster = s["cluster"]
        self._connect = lambda db, host=s["host"], port=s["port"]: Client(
            host, port=port, user=s["user"], password=s["password"], database=db, settings={"use_numpy": False})  # fmt: skip
        try:
            self._connect("default").execute(f"CREATE DATABASE IF NOT EXISTS {self.database}")
        except (errors.Error, OSError, EOFError) as e:
            raise OSError(
                f"cannot open the store clickhouse://{s['host']}:{s['port']}/{self.database}: {e}"
            ) from e
        self._create()

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._connect(self.database)
        return client

    def _execute(self, query: str, params=None, **kw):
        try:
            return self._client().execute(query, params, **kw)
        except (OSError, EOFError, self._errors.NetworkError, self._errors.SocketTimeoutError) as e:
            self._local.client = None  # reconnect next time
            raise StoreUnavailable(str(e)) from e

    def _rows(self, query: str, params: list) -> list[tuple]:
        text, values = bind(query, params)
        return self._execute(text, values)

    def _shards(self) -> list:
        """A client on each shard, this thread's (this server alone without a cluster); name
        tables with their database. The shards are looked up once, when the store opens."""
        if not self.cluster:
            return [self._client()]
        clients = getattr(self._local, "shards", None)
        if clients is None:  # on "default": the database may not be there yet
            clients = self._local.shards = [self._connect("default", host, port) for host, port in self._shard_at]
        return clients

    def _create(self) -> None:
        if self.cluster:
            self._shard_at = self._rows("SELECT host_address, port FROM system.clusters WHERE cluster = ? "
                                        "AND replica_num = 1 ORDER BY shard_num", [self.cluster])  # fmt: skip
            if not self._shard_at:
                raise OSError(f"ClickHouse knows no cluster {self.cluster!r} (its config's <remote_servers>)")
        columns = ", ".join(_column(c, t) for c, t in SPAN_COLUMNS)
        day = "toDate(intDiv(start_ns, 1000000000))"
        local = "spans_local" if self.cluster else "spans"
        for shard in self._shards():
            if self.cluster:
                shard.execute(f"CREATE DATABASE IF NOT EXISTS {self.database}")
            shard.execute(f"CREATE TABLE IF NOT EXISTS {self.database}.{local} ({columns}) ENGINE = MergeTree "
                          f"PARTITION BY {day} ORDER BY (start_ns, span_id)")  # fmt: skip
        if self.cluster:
            # Reads fan out to every shard; a span goes to the shard its id hashes to.
            self._execute(f"CREATE TABLE IF NOT EXISTS spans ({columns}) "
                          f"ENGINE = Distributed({self.cluster}, {self.database}, spans_local, sipHash64(span_id))")  # fmt: skip
        # Spans are ordered by time; a trace is found by id through this small table, one row
        # per trace per write (its first start and last end), ordered by trace id.
        self._execute("CREATE TABLE IF NOT EXISTS trace_index (trace_id String, start_ns Int64, end_ns Int64) "
                      "ENGINE = MergeTree ORDER BY trace_id")  # fmt: skip
        self._execute("CREATE TABLE IF NOT EXISTS batches (agent_id String, batch_id String, token String, "
                      "received_ns Int64, n_spans Int64, body_gz String) ENGINE = MergeTree "
                      "ORDER BY (agent_id, batch_id)")  # fmt: skip
        self._execute("CREATE TABLE IF NOT EXISTS done_batches (agent_id String, batch_id String, done_ns Int64) "
                      "ENGINE = MergeTree ORDER BY (agent_id, batch_id)")  # fmt: skip
        self._execute("CREATE TABLE IF NOT EXISTS dead_letters (agent_id String, batch_id String, span_id String, "
                      "failed_ns Int64, reason String, span String) ENGINE = ReplacingMergeTree(failed_ns) "
                      "ORDER BY (agent_id, batch_id, span_id)")  # fmt: skip
        self._execute("CREATE TABLE IF NOT EXISTS agents (agent_id String, host String, kernel String, "
                      "version String, started_ns Int64, last_seen_ns Int64, stats String) "
                      "ENGINE = ReplacingMergeTree(last_seen_ns) ORDER BY agent_id")  # fmt: skip
        # The servers sharing this store, by their last heartbeat (the store's clock, seconds).
        self._execute("CREATE TABLE IF NOT EXISTS servers (server_id String, address String, seen_s UInt64, "
                      "leaving UInt8) ENGINE = ReplacingMergeTree(seen_s) ORDER BY server_id")  # fmt: skip
        # Both ends of every accepted call, by call key: a server finds the other end of a
        # call that another server links here. Kept two hours, dropped an hour at a time.
        self._execute("CREATE TABLE IF NOT EXISTS calls (key String, kind String, span_id String, service String, "
                      "start_ns Int64, end_ns Int64, conn String, received_ns Int64) ENGINE = MergeTree "
                      f"PARTITION BY intDiv(received_ns, {CALL_ENDS_HOUR_NS}) ORDER BY (key, kind)")  # fmt: skip

    # --- ingest ---
    def accept_batch(self, agent_id: str, batch_id: str, body_gz: bytes, n_spans: int, now_ns: int) -> None:
        token = secrets.token_hex(16)
        # The body as bytes in a String column: clickhouse-driver writes bytes as they are.
        self._execute("INSERT INTO batches (agent_id, batch_id, token, received_ns, n_spans, body_gz) VALUES",
                      [(agent_id, batch_id, token, now_ns, n_spans, body_gz)])  # fmt: skip
        # Of the copies of this batch, the first received is the batch (the token breaks a tie
        # the same way on every server): a later copy, or one that lost a race, is a duplicate.
        ((first,),) = self._rows("SELECT argMin(token, (received_ns, token)) FROM batches "
                                 "WHERE agent_id = ? AND batch_id = ?", [agent_id, batch_id])  # fmt: skip
        if first != token:
            raise DuplicateBatch(f"{agent_id}/{batch_id}")

    def incoming(self) -> list[tuple[str, str, bytes]]:
        rows = self._execute(
            "SELECT agent_id, batch_id, argMin(body_gz, (received_ns, token)), min(received_ns) AS t FROM batches "
            f"WHERE {_NOT_DONE} GROUP BY agent_id, batch_id ORDER BY t", settings={"strings_as_bytes": True})  # fmt: skip
        return [(a.decode(), b.decode(), body) for a, b, body, _ in rows]

    def batches_of(self, agent_ids: list[str], keys: list[tuple[str, str]] = ()) -> list[tuple[str, str, bytes]]:
        out = []
        body = "argMin(body_gz, (received_ns, token)), min(received_ns) AS t"
        if agent_ids:
            out += self._execute(
                f"SELECT agent_id, batch_id, {body} FROM batches WHERE agent_id IN %(values)s AND (agent_id, batch_id) "
                "NOT IN (SELECT agent_id, batch_id FROM done_batches WHERE agent_id IN %(values)s) "
                "GROUP BY agent_id, batch_id", {"values": tuple(agent_ids)}, settings={"strings_as_bytes": True})  # fmt: skip
        for i in range(0, len(keys), IN_LIST_CHUNK):
            chunk = {"values": tuple(keys[i:i + IN_LIST_CHUNK])}
            out += self._execute(
                f"SELECT agent_id, batch_id, {body} FROM batches WHERE (agent_id, batch_id) IN %(values)s AND "
                "(agent_id, batch_id) NOT IN (SELECT agent_id, batch_id FROM done_batches WHERE (agent_id, batch_id) "
                "IN %(values)s) GROUP BY agent_id, batch_id", chunk, settings={"strings_as_bytes": True})  # fmt: skip
        return [(a.decode(), b.decode(), body) for a, b, body, _ in sorted(out, key=lambda r: r[3])]

    def recent_batches(self, since_ns: int) -> list[tuple[str, str]]:
        # A batch received since then was done since then, too.
        return [tuple(r) for r in self._rows(
            "SELECT DISTINCT agent_id, batch_id FROM batches WHERE received_ns >= ? AND (agent_id, batch_id) "
            "NOT IN (SELECT agent_id, batch_id FROM done_batches WHERE done_ns >= ?)", [since_ns, since_ns])]  # fmt: skip

    def write_spans(self, spans: list[dict], done_batches: list[tuple[str, str]],
                    dead: list[DeadLetter] = ()) -> None:  # fmt: skip
        # Spans first, the batches' "done" last: a crash between them replays the batches,
        # and the spans already here are skipped then.
        if spans:
            cols = span_to_columns(spans)
            # Into the shards before this returns: a write acknowledged is a write stored.
            self._execute(f"INSERT INTO spans ({', '.join(COLUMN_NAMES)}) VALUES", [cols[c] for c in COLUMN_NAMES],
                          columnar=True, settings={"insert_distributed_sync": 1})  # fmt: skip
            extent: dict[str, list[int]] = {}
            for d in spans:
                if d.get("trace_id"):
                    e = extent.setdefault(d["trace_id"], [d["start_ns"], d["end_ns"]])
                    e[0], e[1] = min(e[0], d["start_ns"]), max(e[1], d["end_ns"])
            self._execute("INSERT INTO trace_index (trace_id, start_ns, end_ns) VALUES",
                          [(t, lo, hi) for t, (lo, hi) in extent.items()])  # fmt: skip
        if dead:
            self._execute("INSERT INTO dead_letters (agent_id, batch_id, span_id, failed_ns, reason, span) VALUES",
                          [(x.agent_id, x.batch_id, x.span_id, x.failed_ns, x.reason, x.span) for x in dead])  # fmt: skip
        if done_batches:
            now = time.time_ns()
            self._execute("INSERT INTO done_batches (agent_id, batch_id, done_ns) VALUES",
                          [(a, b, now) for a, b in done_batches])  # fmt: skip

    def stored_span_ids(self, span_ids: list[str]) -> set[str]:
        rows = self._in_chunks("SELECT span_id FROM spans WHERE span_id IN %(values)s UNION ALL "
                               "SELECT span_id FROM dead_letters WHERE span_id IN %(values)s", span_ids)  # fmt: skip
        return {r[0] for r in rows}

    def _trace_times(self, trace_ids: list[str]) -> tuple[int | None, int | None]:
        marks = ", ".join("?" * len(trace_ids))
        ((lo, hi),) = self._rows(f"SELECT min(start_ns), max(end_ns) FROM trace_index WHERE trace_id IN ({marks})",
                                 trace_ids)  # fmt: skip
        return (lo, hi) if lo is not None and hi is not None else (None, None)

    def dead_letters(self, limit: int, offset: int = 0) -> tuple[list[DeadLetter], int]:
        ((total,),) = self._rows("SELECT count() FROM dead_letters FINAL", [])
        rows = self._rows("SELECT agent_id, batch_id, span_id, failed_ns, reason, span FROM dead_letters FINAL "
                          "ORDER BY failed_ns DESC LIMIT ? OFFSET ?", [limit, offset])  # fmt: skip
        return [DeadLetter(*r) for r in rows], total

    # --- agents ---
    def upsert_agent(self, agent: AgentInfo) -> None:
        self._execute("INSERT INTO agents (agent_id, host, kernel, version, started_ns, last_seen_ns, stats) VALUES",
                      [(agent.agent_id, agent.host, agent.kernel, agent.version, agent.started_ns,
                        agent.last_seen_ns, json.dumps(agent.stats))])  # fmt: skip

    def agents(self) -> list[AgentInfo]:
        rows = self._rows("SELECT agent_id, host, kernel, version, started_ns, last_seen_ns, stats "
                          "FROM agents FINAL ORDER BY host, agent_id", [])  # fmt: skip
        return [AgentInfo(*r[:6], json.loads(r[6]) if r[6] else {}) for r in rows]

    # --- servers sharing the store ---
    def heartbeat(self, server_id: str, address: str, leaving: bool = False) -> None:
        self._rows("INSERT INTO servers SELECT ?, ?, toUInt64(now()), ?", [server_id, address, int(leaving)])

    def live_servers(self, timeout_s: float) -> list[str]:
        # The last row of each server decides (a "leaving" row wins a tie within its second).
        rows = self._rows("SELECT server_id FROM servers GROUP BY server_id HAVING argMax(leaving, (seen_s, leaving)) = 0 "
                          "AND max(seen_s) + ? >= toUInt64(now()) ORDER BY server_id", [int(timeout_s)])  # fmt: skip
        return [r[0] for r in rows]

    def record_call_ends(self, rows: list[CallEnd], now_ns: int) -> None:
        if rows:
            self._execute("INSERT INTO calls (key, kind, span_id, service, start_ns, end_ns, conn, received_ns) VALUES",
                          [(r.key, r.kind, r.span_id, r.service, r.start_ns, r.end_ns, r.conn, now_ns) for r in rows])  # fmt: skip

    def call_ends(self, keys: list[str], kind: str) -> list[CallEnd]:
        rows = self._in_chunks("SELECT span_id, start_ns, end_ns, conn, service, key FROM calls "
                               "WHERE key IN %(values)s AND kind = %(kind)s", keys, kind=kind)  # fmt: skip
        return [CallEnd(span_id, start, end, conn, service=service, key=key, kind=kind)
                for span_id, start, end, conn, service, key in rows]  # fmt: skip

    def stored_trace_ids(self, span_ids: list[str], start_ns: int, end_ns: int) -> dict[str, str]:
        return dict(self._in_chunks("SELECT span_id, trace_id FROM spans WHERE start_ns >= %(lo)s "
                                    "AND start_ns <= %(hi)s AND span_id IN %(values)s", span_ids,
                                    lo=start_ns, hi=end_ns))  # fmt: skip

    def _in_chunks(self, query: str, values: list, **params) -> list[tuple]:
        """A query with `IN %(values)s`, run for a chunk of the values at a time."""
        rows = []
        for i in range(0, len(values), IN_LIST_CHUNK):
            rows += self._execute(query, {**params, "values": tuple(values[i:i + IN_LIST_CHUNK])})
        return rows

    # --- housekeeping ---
    def apply_retention(self, now_ns: int, max_age_ns: int | None, max_bytes: int | None) -> int:
        """Deletes are mutations, carried out in the background: what is deleted is counted
        when asked for, and disappears from queries once the mutation has run."""
        self._drop_old_call_ends(now_ns)
        cuts = []
        if max_age_ns is not None:
            cuts.append(now_ns - max_age_ns)
        if max_bytes is not None and self._bytes() > max_bytes:
            ((n, cut),) = self._rows("SELECT count(), quantileExact(0.1)(end_ns) FROM spans", [])
            if n:
                cuts.append(cut + 1)
        if not cuts:
            return 0
        cut = max(cuts)
        ((deleted,),) = self._rows("SELECT count() FROM spans WHERE end_ns < ?", [cut])
        if deleted:  # on each shard's own table: a Distributed table takes no ALTER
            table = "spans_local" if self.cluster else "spans"
            for shard in self._shards():
                shard.execute(*bind(f"ALTER TABLE {self.database}.{table} DELETE WHERE end_ns < ?", [cut]))
        if max_age_ns is not None:
            age_cut = now_ns - max_age_ns
            for table, column in (("trace_index", "end_ns"), ("batches", "received_ns"), ("done_batches", "done_ns"),
                                  ("dead_letters", "failed_ns")):  # fmt: skip
                # Only where there is something to delete: a mutation rewrites parts even when
                # it deletes nothing, and retention runs every minute.
                if self._rows(f"SELECT count() FROM {table} WHERE {column} < ?", [age_cut])[0][0]:
                    self._rows(f"ALTER TABLE {table} DELETE WHERE {column} < ?", [age_cut])
        return deleted

    def _drop_old_call_ends(self, now_ns: int) -> None:
        """A partition at a time: no mutation to wait for."""
        oldest_kept = now_ns // CALL_ENDS_HOUR_NS - CALL_ENDS_KEPT_HOURS
        for (partition,) in self._rows("SELECT DISTINCT partition FROM system.parts WHERE active AND database = ? "
                                       "AND table = 'calls'", [self.database]):  # fmt: skip
            if int(partition) < oldest_kept:
                self._execute(f"ALTER TABLE calls DROP PARTITION {int(partition)}")

    def _bytes(self) -> int:
        query = bind("SELECT sum(bytes_on_disk) FROM system.parts WHERE active AND database = ?", [self.database])
        return sum(int(shard.execute(*query)[0][0] or 0) for shard in self._shards())

    def stats(self) -> StoreStats:
        ((spans,),) = self._rows("SELECT count() FROM spans", [])
        ((incoming,),) = self._rows(f"SELECT count() FROM (SELECT DISTINCT agent_id, batch_id FROM batches "
                                    f"WHERE {_NOT_DONE})", [])  # fmt: skip
        ((dead,),) = self._rows("SELECT count() FROM dead_letters FINAL", [])
        return StoreStats(spans, incoming, self._bytes(), dead)

    def close(self) -> None:
        for client in [getattr(self._local, "client", None), *getattr(self._local, "shards", [])]:
            if client is not None:
                client.disconnect()
