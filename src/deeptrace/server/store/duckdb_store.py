"""The embedded store: one DuckDB file, nothing to install or run.

Writes go through one lock (DuckDB takes one writer at a time anyway); reads use their own
cursors and run beside them. Span batches are inserted column-wise through Arrow: a row at
a time would cost more than the association that produced them.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path

import duckdb
import pyarrow as pa

from deeptrace.server.store import sql
from deeptrace.server.store.base import (
    AgentInfo,
    DeadLetter,
    DuplicateBatch,
    Store,
    StoreStats,
    StoreUnavailable,
)
from deeptrace.server.store.reading import SqlSpanReader
from deeptrace.server.store.schema import COLUMN_NAMES, SPAN_COLUMNS, span_to_columns

ARROW_TYPES = {"VARCHAR": pa.string(), "BIGINT": pa.int64(), "DOUBLE": pa.float64()}
SCHEMA_VERSION = 1


class DuckDBDialect(sql.Dialect):
    def percentile(self, expr: str, q: float) -> str:
        return f"quantile_cont({expr}, {q})"

    def json_field_is(self, column: str, key: str, value: str) -> tuple[str, list]:
        return f"json_extract_string({column}, ?) = ?", ['$."' + key.replace('"', '\\"') + '"', value]

    def like(self, column: str) -> str:
        return f"{column} LIKE ? ESCAPE '\\'"


class DuckDBStore(SqlSpanReader, Store):
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = duckdb.connect(self.path)
        except duckdb.IOException as e:
            raise OSError(f"cannot open the store {self.path}: {e}") from e
        self._write = threading.Lock()
        self.dialect = DuckDBDialect()
        self._arrow_schema = pa.schema([(c, ARROW_TYPES[t]) for c, t in SPAN_COLUMNS])
        self._create()

    def _create(self) -> None:
        cols = ", ".join(f"{c} {t}" for c, t in SPAN_COLUMNS)
        with self._write:
            self._db.execute(f"CREATE TABLE IF NOT EXISTS spans ({cols})")
            self._db.execute("CREATE TABLE IF NOT EXISTS batches (agent_id VARCHAR, batch_id VARCHAR, "
                             "received_ns BIGINT, n_spans BIGINT, PRIMARY KEY (agent_id, batch_id))")  # fmt: skip
            self._db.execute("CREATE TABLE IF NOT EXISTS incoming (agent_id VARCHAR, batch_id VARCHAR, "
                             "received_ns BIGINT, body_gz BLOB)")  # fmt: skip
            self._db.execute("CREATE TABLE IF NOT EXISTS agents (agent_id VARCHAR PRIMARY KEY, host VARCHAR, "
                             "kernel VARCHAR, version VARCHAR, started_ns BIGINT, last_seen_ns BIGINT, "
                             "stats VARCHAR)")  # fmt: skip
            self._db.execute("CREATE TABLE IF NOT EXISTS dead_letters (agent_id VARCHAR, batch_id VARCHAR, "
                             "span_id VARCHAR, failed_ns BIGINT, reason VARCHAR, span VARCHAR)")  # fmt: skip
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])

    def _read(self) -> duckdb.DuckDBPyConnection:
        return self._db.cursor()

    def _rows(self, query: str, params: list) -> list[tuple]:
        return self._read().execute(query, params).fetchall()

    # --- ingest ---
    def accept_batch(self, agent_id: str, batch_id: str, body_gz: bytes, n_spans: int, now_ns: int) -> None:
        with self._write:
            db = self._db
            if db.execute("SELECT 1 FROM batches WHERE agent_id = ? AND batch_id = ?", [agent_id, batch_id]).fetchone():
                raise DuplicateBatch(f"{agent_id}/{batch_id}")
            db.execute("BEGIN")
            try:
                db.execute("INSERT INTO batches VALUES (?, ?, ?, ?)", [agent_id, batch_id, now_ns, n_spans])
                db.execute("INSERT INTO incoming VALUES (?, ?, ?, ?)", [agent_id, batch_id, now_ns, body_gz])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def incoming(self) -> list[tuple[str, str, bytes]]:
        rows = self._read().execute("SELECT agent_id, batch_id, body_gz FROM incoming ORDER BY received_ns")
        return rows.fetchall()

    def write_spans(self, spans: list[dict], done_batches: list[tuple[str, str]],
                    dead: list[DeadLetter] = ()) -> None:  # fmt: skip
        table = pa.table(span_to_columns(spans), schema=self._arrow_schema) if spans else None
        with self._write:
            db = self._db
            try:
                db.execute("BEGIN")
                try:
                    if table is not None:
                        # By name: a file made by an older version may hold the columns in another order.
                        columns = ", ".join(COLUMN_NAMES)
                        db.register("new_spans", table)
                        db.execute(f"INSERT INTO spans ({columns}) SELECT {columns} FROM new_spans")
                        db.unregister("new_spans")
                    if dead:
                        # Once per span (or batch), even when a crash makes it fail again after a restart.
                        db.executemany("DELETE FROM dead_letters WHERE agent_id = ? AND batch_id = ? AND span_id = ?",
                                       [[x.agent_id, x.batch_id, x.span_id] for x in dead])  # fmt: skip
                        db.executemany("INSERT INTO dead_letters VALUES (?, ?, ?, ?, ?, ?)",
                                       [[x.agent_id, x.batch_id, x.span_id, x.failed_ns, x.reason, x.span]
                                        for x in dead])  # fmt: skip
                    if done_batches:
                        db.executemany("DELETE FROM incoming WHERE agent_id = ? AND batch_id = ?", done_batches)
                    try:
                        db.execute("COMMIT")
                    except duckdb.Error as e:  # the data went in: what failed is writing it out
                        raise StoreUnavailable(str(e)) from e
                except BaseException:
                    # A failed COMMIT has rolled back already: the ROLLBACK's own error must not
                    # hide why the write failed (a full disk would look like bad data).
                    with contextlib.suppress(duckdb.Error):
                        db.execute("ROLLBACK")
                    raise
            except (duckdb.IOException, duckdb.OutOfMemoryException, duckdb.FatalException, OSError) as e:
                raise StoreUnavailable(str(e)) from e

    def stored_span_ids(self, span_ids: list[str]) -> set[str]:
        if not span_ids:
            return set()
        cur = self._read()
        cur.register("wanted", pa.table({"span_id": pa.array(span_ids, pa.string())}))
        rows = cur.execute("SELECT s.span_id FROM spans s JOIN wanted w ON s.span_id = w.span_id UNION "
                           "SELECT d.span_id FROM dead_letters d JOIN wanted w ON d.span_id = w.span_id").fetchall()  # fmt: skip
        return {r[0] for r in rows}

    def dead_letters(self, limit: int, offset: int = 0) -> tuple[list[DeadLetter], int]:
        cur = self._read()
        (total,) = cur.execute("SELECT count(*) FROM dead_letters").fetchone()
        rows = cur.execute("SELECT agent_id, batch_id, span_id, failed_ns, reason, span FROM dead_letters "
                           "ORDER BY failed_ns DESC LIMIT ? OFFSET ?", [limit, offset]).fetchall()  # fmt: skip
        return [DeadLetter(*r) for r in rows], total

    # --- agents ---
    def upsert_agent(self, agent: AgentInfo) -> None:
        with self._write:
            self._db.execute("INSERT OR REPLACE INTO agents VALUES (?, ?, ?, ?, ?, ?, ?)",
                             [agent.agent_id, agent.host, agent.kernel, agent.version, agent.started_ns,
                              agent.last_seen_ns, json.dumps(agent.stats)])  # fmt: skip

    def agents(self) -> list[AgentInfo]:
        rows = self._read().execute("SELECT agent_id, host, kernel, version, started_ns, last_seen_ns, stats "
                                    "FROM agents ORDER BY host, agent_id").fetchall()  # fmt: skip
        return [AgentInfo(*r[:6], json.loads(r[6]) if r[6] else {}) for r in rows]

    # --- housekeeping ---
    def apply_retention(self, now_ns: int, max_age_ns: int | None, max_bytes: int | None) -> int:
        deleted = 0
        with self._write:
            db = self._db
            if max_age_ns is not None:
                cut = now_ns - max_age_ns
                deleted += db.execute("DELETE FROM spans WHERE end_ns < ?", [cut]).fetchone()[0]
                db.execute("DELETE FROM batches WHERE received_ns < ?", [cut])
                db.execute("DELETE FROM dead_letters WHERE failed_ns < ?", [cut])
            if max_bytes is not None and self._bytes() > max_bytes:
                # Freed blocks are reused, not returned: the file stops growing rather than
                # shrinking, so a tenth of the spans goes each time the limit is crossed.
                (n,) = db.execute("SELECT count(*) FROM spans").fetchone()
                if n:
                    (cut,) = db.execute("SELECT quantile_disc(end_ns, 0.1) FROM spans").fetchone()
                    deleted += db.execute("DELETE FROM spans WHERE end_ns <= ?", [cut]).fetchone()[0]
                    db.execute("CHECKPOINT")
        return deleted

    def _bytes(self) -> int:
        if self.path == ":memory:":
            return 0
        wal = self.path + ".wal"
        return os.path.getsize(self.path) + (os.path.getsize(wal) if os.path.exists(wal) else 0)

    def stats(self) -> StoreStats:
        cur = self._read()
        (spans,) = cur.execute("SELECT count(*) FROM spans").fetchone()
        (incoming,) = cur.execute("SELECT count(*) FROM incoming").fetchone()
        (dead,) = cur.execute("SELECT count(*) FROM dead_letters").fetchone()
        return StoreStats(spans, incoming, self._bytes(), dead)

    def close(self) -> None:
        with self._write:
            self._db.close()

