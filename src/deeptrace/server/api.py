"""The query API the web UI uses (docs/server.md): traces, spans, services, the service
map and time series. Times are Unix nanoseconds."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from deeptrace.schema import INT64_MAX
from deeptrace.server.errors_http import answering_400
from deeptrace.server.store.base import Red, TraceQuery

router = APIRouter(prefix="/api/v1",
                   route_class=answering_400(lambda msg: JSONResponse({"detail": msg}, status_code=400)))  # fmt: skip
HOUR_NS = 3600 * 10**9
MAX_POINTS = 2000

# The bounds of every query parameter, here and in Jaeger's API (jaeger.py); docs/server.md
# lists them. Times are int64 nanoseconds as the store keeps them (0 to the year 2262), so
# any two subtract in SQL's BIGINT without overflow. Durations and steps stay far enough
# inside int64 that converting them from float ms or s cannot round past it.
MAX_TIME_NS = INT64_MAX
MAX_DURATION_NS = 10**18  # about 31.7 years
MAX_LIMIT = 1000
MAX_ROWS = 1_000_000  # the most traces a query may skip (offset) or ask for before clamping
MIN_STEP_S = 0.001

TimeNs = Annotated[int | None, Query(ge=0, le=MAX_TIME_NS)]
DurationMs = Annotated[float | None, Query(ge=0, le=MAX_DURATION_NS / 1e6, allow_inf_nan=False)]


def time_range(start_ns: int | None, end_ns: int | None) -> tuple[int, int]:
    """The given range, or the last hour; refuses a range that ends before it starts."""
    end = end_ns if end_ns is not None else time.time_ns()
    start = start_ns if start_ns is not None else max(0, end - HOUR_NS)
    if end < start:
        raise HTTPException(400, "end_ns is before start_ns")
    return start, end


def attr_key_ok(key: str) -> bool:
    # The store finds an attribute by a JSON path, which cannot spell an empty key, nor a
    # backslash before the closing quote; no attribute name plausibly holds one.
    return bool(key) and "\\" not in key


def parse_attrs(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise HTTPException(400, f"attr: must be KEY=VALUE, got {pair!r}")
        if not attr_key_ok(key):
            raise HTTPException(400, f"attr: a key must not hold a backslash, got {key!r}")
        out[key] = value.strip()
    return out


def red_dict(red: Red) -> dict:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(red).items()}


def _store(request: Request):
    return request.app.state.server.store


@router.get("/traces/{trace_id}")
def get_trace(trace_id: str, request: Request):
    spans = _store(request).trace(trace_id)
    if not spans:
        raise HTTPException(404, f"no trace {trace_id}")
    return {"trace_id": trace_id, "spans": spans}


@router.get("/traces")
def search_traces(request: Request, service: str | None = None, operation: str | None = None,
                  status: str | None = Query(None, pattern="^(ok|error)$"),
                  min_duration_ms: DurationMs = None, max_duration_ms: DurationMs = None,
                  start_ns: TimeNs = None, end_ns: TimeNs = None, attr: list[str] = Query(default=[]),
                  sort: str = Query("start", pattern="^(start|duration)$"),
                  order: str = Query("desc", pattern="^(asc|desc)$"),
                  limit: int = Query(20, ge=1, le=MAX_LIMIT),
                  offset: int = Query(0, ge=0, le=MAX_ROWS)):  # fmt: skip
    start, end = time_range(start_ns, end_ns)
    q = TraceQuery(start, end, service or None, operation or None, status,
                   int(min_duration_ms * 1e6) if min_duration_ms is not None else None,
                   int(max_duration_ms * 1e6) if max_duration_ms is not None else None,
                   parse_attrs(attr), sort, order == "desc", limit, offset)  # fmt: skip
    traces, total = _store(request).search(q)
    return {"traces": [asdict(t) for t in traces], "total": total, "limit": limit, "offset": offset}


@router.get("/spans/{span_id}")
def get_span(span_id: str, request: Request):
    span = _store(request).span(span_id)
    if span is None:
        raise HTTPException(404, f"no span {span_id}")
    return span


@router.get("/services")
def services(request: Request):
    return {"services": _store(request).services()}


@router.get("/services/{service}/operations")
def operations(service: str, request: Request):
    return {"operations": [{"name": n, "kind": k} for n, k in _store(request).operations(service)]}


@router.get("/service-map")
def service_map(request: Request, start_ns: TimeNs = None, end_ns: TimeNs = None):
    start, end = time_range(start_ns, end_ns)
    m = _store(request).service_map(start, end)
    return {"start_ns": start, "end_ns": end,
            "nodes": [{"service": n.service, **red_dict(n.red)} for n in m.nodes],
            "edges": [{"source": e.source, "target": e.target, **red_dict(e.red)} for e in m.edges]}  # fmt: skip


@router.get("/timeseries")
def timeseries(request: Request, service: str | None = None, source: str | None = None, target: str | None = None,
               start_ns: TimeNs = None, end_ns: TimeNs = None,
               step_s: float = Query(60, ge=MIN_STEP_S, le=MAX_DURATION_NS / 1e9,
                                     allow_inf_nan=False)):  # fmt: skip
    if (service is None) == (source is None or target is None):
        raise HTTPException(400, "give either service, or source and target")
    start, end = time_range(start_ns, end_ns)
    step = int(step_s * 1e9)
    if (end - start) // step > MAX_POINTS:
        raise HTTPException(400, f"too many points: at most {MAX_POINTS}; raise step_s")
    edge = (source, target) if service is None else None
    points = _store(request).timeseries(start, end, step, service=service, edge=edge)
    return {"points": [{"t_ns": t, **red_dict(r)} for t, r in points]}


@router.get("/agents")
def agents(request: Request):
    return {"agents": [asdict(a) for a in _store(request).agents()]}


@router.get("/dead-letters")
def dead_letters(request: Request, limit: int = Query(50, ge=1, le=MAX_LIMIT),
                 offset: int = Query(0, ge=0, le=MAX_ROWS)):  # fmt: skip
    """Spans accepted but impossible to link or write, newest first, with why."""
    letters, total = _store(request).dead_letters(limit, offset)
    return {"dead_letters": [asdict(x) for x in letters], "total": total, "limit": limit, "offset": offset}
