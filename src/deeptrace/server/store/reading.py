"""Reading spans, for every SQL engine: the queries of sql.py run through `_rows`, and what
the engine does not do itself (RED from counts and percentiles, the service map put
together from its three queries, empty time buckets filled in) done here, once."""

from __future__ import annotations

import json
from abc import abstractmethod

from deeptrace.server.store import sql
from deeptrace.server.store.base import (
    MapEdge,
    MapNode,
    Red,
    ServiceMap,
    SpanReader,
    TraceQuery,
    TraceSummary,
)
from deeptrace.server.store.schema import COLUMN_NAMES, row_to_span

EMPTY_RED = (0, 0, None, None, None)


class SqlSpanReader(SpanReader):
    dialect: sql.Dialect

    @abstractmethod
    def _rows(self, query: str, params: list) -> list[tuple]:
        """The rows of a query written with `?` placeholders, read beside any writer."""

    def trace(self, trace_id: str) -> list[dict]:
        return self.traces([trace_id]).get(trace_id, [])

    def traces(self, trace_ids: list[str]) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        if trace_ids:
            within = self._trace_times(trace_ids)
            if within is None:
                query, params = sql.traces(len(trace_ids), ", ".join(COLUMN_NAMES)), trace_ids
            elif within[0] is None:
                return out  # none of them is stored
            else:
                query, params = sql.traces(len(trace_ids), ", ".join(COLUMN_NAMES), True), [*trace_ids, *within]
            for r in self._rows(query, params):
                d = row_to_span(r)
                out.setdefault(d["trace_id"], []).append(d)
        return out

    def _trace_times(self, trace_ids: list[str]) -> tuple[int | None, int | None] | None:
        """(first start, last end) of these traces from an index of trace ids, where the store
        keeps one (ordered by time, it would otherwise read every span to find a trace)."""
        return None

    def span(self, span_id: str) -> dict | None:
        rows = self._rows(f"SELECT {', '.join(COLUMN_NAMES)} FROM spans WHERE span_id = ? LIMIT 1", [span_id])
        return row_to_span(rows[0]) if rows else None

    def search(self, q: TraceQuery) -> tuple[list[TraceSummary], int]:
        page_sql, page_params, count_sql, count_params = sql.search(self.dialect, q)
        ((total,),) = self._rows(count_sql, count_params)
        total = total or 0  # ClickHouse counts nothing as NULL
        ids = [r[0] for r in self._rows(page_sql, page_params)]
        if not ids:
            return [], total
        members: dict[str, list[tuple]] = {i: [] for i in ids}
        for tid, *rest in self._rows(sql.trace_members(len(ids)), ids):
            members[tid].append(rest)
        return [_summary(tid, members[tid]) for tid in ids], total

    def services(self) -> list[str]:
        return [r[0] for r in self._rows("SELECT DISTINCT service FROM spans ORDER BY service", [])]

    def operations(self, service: str) -> list[tuple[str, str]]:
        rows = self._rows(
            "SELECT DISTINCT name, kind FROM spans WHERE service = ? ORDER BY name, kind", [service]
        )
        return [tuple(r) for r in rows]

    def service_map(self, start_ns: int, end_ns: int) -> ServiceMap:
        seconds, rng = max((end_ns - start_ns) / 1e9, 1e-9), [start_ns, end_ns]
        nodes = {
            r[0]: MapNode(r[0], red(r[1:], seconds)) for r in self._rows(sql.node_red(self.dialect), rng)
        }
        edges = [
            MapEdge(r[0], r[1], red(r[2:], seconds))
            for r in self._rows(sql.edge_red(self.dialect), rng)
            if r[1]
        ]
        for r in self._rows(sql.peer_red(self.dialect), rng):
            if r[0] and r[0] not in nodes:  # a peer nothing traced answers for: its callers' view
                nodes[r[0]] = MapNode(r[0], red(r[1:], seconds))
        for e in edges:  # callers that answer nothing themselves (load generators, jobs)
            nodes.setdefault(e.source, MapNode(e.source, red(EMPTY_RED, seconds)))
        return ServiceMap(sorted(nodes.values(), key=lambda n: n.service), edges)

    def timeseries(self, start_ns: int, end_ns: int, step_ns: int, service: str | None = None,
                   edge: tuple[str, str] | None = None) -> list[tuple[int, Red]]:  # fmt: skip
        as_peer = edge is None and not self._rows(sql.answers_requests(), [service, start_ns, end_ns])[0][0]
        query, who = sql.timeseries(self.dialect, service, edge, as_peer)
        rows = self._rows(query, [start_ns, step_ns, *who, start_ns, end_ns])
        by_bucket = {int(r[0]): red(r[1:], step_ns / 1e9) for r in rows}
        n = max(0, -(-(end_ns - start_ns) // step_ns))
        return [(start_ns + i * step_ns, by_bucket.get(i) or red(EMPTY_RED, step_ns / 1e9)) for i in range(n)]


def _summary(trace_id: str, spans: list[tuple]) -> TraceSummary:
    """spans: (service, name, start_ns, end_ns, parent_span_id, status, attributes) of one trace."""
    roots = [s for s in spans if s[4] is None] or spans
    root = min(roots, key=lambda s: s[2])
    t0, t1 = min(s[2] for s in spans), max(s[3] for s in spans)
    namespace, workload = _where(root[6])
    return TraceSummary(trace_id, root[0], root[1], t0, t1 - t0, len(spans), sum(s[5] == "error" for s in spans),
                        sorted({s[0] for s in spans}), namespace, workload)  # fmt: skip


def _where(attributes: str | None) -> tuple[str, str]:
    """The Kubernetes namespace and workload in a span's attributes (JSON text), "" if none."""
    if not attributes or '"k8s.' not in attributes:  # most spans: no parse
        return "", ""
    try:
        a = json.loads(attributes)
    except ValueError:
        return "", ""
    namespace, workload = a.get("k8s.namespace.name"), a.get("k8s.workload.name")
    return (namespace if isinstance(namespace, str) else "", workload if isinstance(workload, str) else "")


def red(row, seconds: float) -> Red:
    """Red from (count, errors, p50, p90, p99 in ns) over `seconds`."""
    n, errors, p50, p90, p99 = row
    n, errors = int(n or 0), int(errors or 0)
    return Red(n, errors, errors / n if n else 0.0, n / seconds, _ms(p50), _ms(p90), _ms(p99))


def _ms(ns) -> float:
    return round(ns / 1e6, 3) if ns is not None else 0.0
