"""Query text for the store, in SQL that DuckDB and ClickHouse both read, with the pieces
they spell differently (percentiles, a JSON field, LIKE's escape) asked of a Dialect.

Every function returns (sql, params); values always travel as parameters.
"""

from __future__ import annotations

from deeptrace.server.store.base import TraceQuery
from deeptrace.server.store.schema import FILTERABLE

ERROR = "CASE WHEN status = 'error' THEN 1 ELSE 0 END"


class Dialect:
    """What engines spell differently. Queries are written with `?` placeholders."""

    def percentile(self, expr: str, q: float) -> str:
        raise NotImplementedError

    def json_field_is(self, column: str, key: str, value: str) -> tuple[str, list]:
        """A condition that the JSON object in column has `key` equal to `value` (text), and its params."""
        raise NotImplementedError

    def like(self, column: str) -> str:
        """`column LIKE ?` where the pattern escapes %, _ and \\ with a backslash."""
        raise NotImplementedError

    def as_text(self, column: str) -> str:
        """A column's value as text (NULL stays NULL)."""
        return f"CAST({column} AS VARCHAR)"


def red_columns(d: Dialect) -> str:
    """count, errors, p50/p90/p99 of duration_ns."""
    ps = ", ".join(d.percentile("duration_ns", q) for q in (0.5, 0.9, 0.99))
    return f"count(*), sum({ERROR}), {ps}"


def span_filter(d: Dialect, q: TraceQuery) -> tuple[str, list]:
    where, params = ["start_ns >= ?", "start_ns <= ?"], [q.start_ns, q.end_ns]
    if q.service:
        where.append("service = ?")
        params.append(q.service)
    if q.operation:
        where.append("name = ?")
        params.append(q.operation)
    if q.status:
        where.append("status = ?")
        params.append(q.status)
    if q.min_duration_ns is not None:
        where.append("duration_ns >= ?")
        params.append(q.min_duration_ns)
    if q.max_duration_ns is not None:
        where.append("duration_ns <= ?")
        params.append(q.max_duration_ns)
    for key, value in q.attributes.items():
        if key in FILTERABLE:  # a column, not an attribute: names come from a fixed set
            where.append(f"{d.as_text(key)} = ?")
            params.append(value)
        elif key == "error":  # Jaeger's convention for failed spans
            where.append("status = ?")
            params.append("error" if value.lower() == "true" else "ok")
        else:
            # The plain substring test goes first: far cheaper than parsing every row's JSON,
            # it leaves the JSON read only the rows that can match.
            if value.isprintable() and '"' not in value and "\\" not in value:  # JSON holds it as is
                where.append(d.like("attributes"))
                params.append(f"%{_like_escape(value)}%")
            condition, more = d.json_field_is("attributes", key, value)
            where.append(condition)
            params.extend(more)
    return " AND ".join(where), params


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def search(d: Dialect, q: TraceQuery) -> tuple[str, list, str, list]:
    """(page query, its params, count query, its params). Traces are ordered by their matching
    spans (earliest start, or longest duration), so a page needs no pass over whole traces;
    `trace_members` then fetches the page's traces."""
    where, params = span_filter(d, q)
    order = "t0" if q.sort == "start" else "dur"
    page = (f"SELECT trace_id, min(start_ns) AS t0, max(duration_ns) AS dur FROM spans WHERE {where} "
            f"GROUP BY trace_id ORDER BY {order} {'DESC' if q.descending else 'ASC'}, trace_id LIMIT ? OFFSET ?")  # fmt: skip
    return page, [*params, q.limit, q.offset], f"SELECT count(DISTINCT trace_id) FROM spans WHERE {where}", params


def trace_members(n: int) -> str:
    """Enough of each of n traces to sum it up: span count, errors, root, services, extent."""
    marks = ", ".join("?" * n)
    return (f"SELECT trace_id, service, name, start_ns, end_ns, parent_span_id, status, attributes FROM spans "
            f"WHERE trace_id IN ({marks})")  # fmt: skip


def traces(n: int, columns: str, within: bool = False) -> str:
    """n traces' spans; `within`: only those starting in a time range (two more parameters),
    for a store whose spans are ordered by time, not by trace."""
    marks = ", ".join("?" * n)
    when = " AND start_ns >= ? AND start_ns <= ?" if within else ""
    return f"SELECT {columns} FROM spans WHERE trace_id IN ({marks}){when} ORDER BY start_ns, span_id"


def answers_requests() -> str:
    return "SELECT count(*) FROM spans WHERE kind = 'SERVER' AND service = ? AND start_ns >= ? AND start_ns <= ?"


def node_red(d: Dialect) -> str:
    """RED of the requests each service answered (its SERVER spans)."""
    return (f"SELECT service, {red_columns(d)} FROM spans "
            f"WHERE kind = 'SERVER' AND start_ns >= ? AND start_ns <= ? GROUP BY service")  # fmt: skip


def edge_red(d: Dialect) -> str:
    """RED of calls from each service to each peer, measured by the caller."""
    return (f"SELECT service, peer_service, {red_columns(d)} FROM spans "
            f"WHERE kind = 'CLIENT' AND start_ns >= ? AND start_ns <= ? GROUP BY service, peer_service")  # fmt: skip


def peer_red(d: Dialect) -> str:
    """RED of peers as their callers saw them: for services with no SERVER spans of their own
    (a database, anything not traced)."""
    return (f"SELECT peer_service, {red_columns(d)} FROM spans "
            f"WHERE kind = 'CLIENT' AND start_ns >= ? AND start_ns <= ? GROUP BY peer_service")  # fmt: skip


def timeseries(d: Dialect, service: str | None, edge: tuple[str, str] | None, as_peer: bool = False
               ) -> tuple[str, list]:  # fmt: skip
    """Per-bucket RED of a service's SERVER spans, of an edge's CLIENT spans, or (as_peer) of
    the calls into a service nothing traced answers for, as the map measures such nodes."""
    if edge is not None:
        who, params = "kind = 'CLIENT' AND service = ? AND peer_service = ?", list(edge)
    elif as_peer:
        who, params = "kind = 'CLIENT' AND peer_service = ?", [service]
    else:
        who, params = "kind = 'SERVER' AND service = ?", [service]
    sql = (f"SELECT floor((start_ns - ?) / ?) AS bucket, {red_columns(d)} FROM spans "
           f"WHERE {who} AND start_ns >= ? AND start_ns < ? GROUP BY bucket ORDER BY bucket")  # fmt: skip
    return sql, params
