"""Jaeger's query API (`/api/...`) over the store, in Jaeger's response shapes, so Jaeger's
UI conventions and Grafana's Jaeger data source read DeepTrace as they read Jaeger.

Jaeger speaks microseconds and milliseconds where we store nanoseconds; every answer is
wrapped as `{"data", "total", "limit", "offset", "errors"}`.
"""

from __future__ import annotations

import json
import re
import time
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from deeptrace.server.api import MAX_DURATION_NS, MAX_ROWS, MAX_TIME_NS, attr_key_ok
from deeptrace.server.errors_http import answering_400
from deeptrace.server.store.base import TraceQuery

router = APIRouter(prefix="/api", route_class=answering_400(lambda msg: error(400, msg)))
MAX_TRACES = 1500  # a larger limit is clamped to it, not refused
TimeUs = Annotated[int | None, Query(ge=0, le=MAX_TIME_NS // 10**3)]
TimeMs = Annotated[int | None, Query(ge=0, le=MAX_TIME_NS // 10**6)]
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)")
_UNIT_NS = {"ns": 1, "us": 10**3, "µs": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9,
            "d": 86400 * 10**9}  # fmt: skip
# Our span keys that become Jaeger tags, besides the span's attributes.
TAG_KEYS = ("protocol", "status_code", "peer_service", "link_method", "link_confidence", "host", "tid",
            "laddr", "lport", "raddr", "rport", "req_size", "resp_size")  # fmt: skip


class BadQuery(ValueError):
    pass


def envelope(data, total: int | None = None, errors=None, status: int = 200):
    body = {"data": data, "total": total if total is not None else (len(data) if isinstance(data, list) else 0),
            "limit": 0, "offset": 0, "errors": errors}  # fmt: skip
    return JSONResponse(body, status_code=status)


def error(status: int, msg: str):
    return envelope(None, 0, [{"code": status, "msg": msg}], status)


def parse_duration_ns(text: str, name: str) -> int:
    """Go-style durations as Jaeger takes them: `1.5ms`, `100us`, `1m30s`."""
    text = text.strip()
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise BadQuery(f"{name}: bad duration {text!r}: use e.g. 1.2ms, 100us, 2s, 1h")
    ns = sum(float(n) * _UNIT_NS[u] for n, u in parts)  # inf for a long enough run of digits
    if not ns <= MAX_DURATION_NS:
        raise BadQuery(f"{name}: at most {MAX_DURATION_NS // (86400 * 10**9)}d")
    return int(ns)


def tag(key: str, value) -> dict:
    if isinstance(value, bool):
        return {"key": key, "type": "bool", "value": value}
    if isinstance(value, int):
        return {"key": key, "type": "int64", "value": value}
    if isinstance(value, float):
        return {"key": key, "type": "float64", "value": value}
    if not isinstance(value, str):
        value = json.dumps(value)
    return {"key": key, "type": "string", "value": value}


def to_jaeger_trace(trace_id: str, spans: list[dict]) -> dict:
    processes: dict[tuple, str] = {}
    out_spans, out_processes = [], {}
    for d in spans:
        proc_key = (d.get("service"), d.get("host"), d.get("pid"))
        pid = processes.get(proc_key)
        if pid is None:
            pid = processes[proc_key] = f"p{len(processes) + 1}"
            out_processes[pid] = {"serviceName": d.get("service") or "unknown",
                                  "tags": [tag("hostname", d.get("host") or ""), tag("pid", d.get("pid") or 0)]}  # fmt: skip
        tags = [tag("span.kind", d["kind"].lower())]
        if d.get("status") == "error":
            tags.append(tag("error", True))
        tags += [tag(f"deeptrace.{k}" if k in ("link_method", "link_confidence", "peer_service") else k, d[k])
                 for k in TAG_KEYS if d.get(k) is not None]  # fmt: skip
        tags += [tag(k, v) for k, v in (d.get("attributes") or {}).items()]
        refs = ([{"refType": "CHILD_OF", "traceID": trace_id, "spanID": d["parent_span_id"]}]
                if d.get("parent_span_id") else [])  # fmt: skip
        out_spans.append({"traceID": trace_id, "spanID": d["span_id"], "flags": 1, "operationName": d["name"],
                          "references": refs, "startTime": d["start_ns"] // 1000,
                          "duration": (d["end_ns"] - d["start_ns"]) // 1000, "tags": tags, "logs": [],
                          "processID": pid, "warnings": None})  # fmt: skip
    return {"traceID": trace_id, "spans": out_spans, "processes": out_processes, "warnings": None}


def _store(request: Request):
    return request.app.state.server.store


@router.get("/services")
def services(request: Request):
    return envelope(_store(request).services())


@router.get("/services/{service}/operations")
def service_operations(service: str, request: Request):
    return envelope(sorted({name for name, _ in _store(request).operations(service)}))


@router.get("/operations")
def operations(request: Request, service: str, spanKind: str | None = None):
    ops = [{"name": n, "spanKind": k.lower()} for n, k in _store(request).operations(service)
           if spanKind in (None, "", k.lower())]  # fmt: skip
    return envelope(ops)


@router.get("/traces/{trace_id}")
def get_trace(trace_id: str, request: Request):
    spans = _store(request).trace(trace_id)
    if not spans:
        return error(404, "trace not found")
    return envelope([to_jaeger_trace(trace_id, spans)])


@router.get("/traces")
def find_traces(request: Request, service: str | None = None, operation: str | None = None, tags: str | None = None,
                tag_pairs: list[str] = Query(default=[], alias="tag"), start: TimeUs = None,
                end: TimeUs = None, lookback: str | None = None, minDuration: str | None = None,
                maxDuration: str | None = None, limit: int = Query(20, ge=0, le=MAX_ROWS)):
    try:
        q = _trace_query(service, operation, tags, tag_pairs, start, end, lookback, minDuration, maxDuration, limit)
    except BadQuery as e:
        return error(400, str(e))
    store = _store(request)
    summaries, _ = store.search(q)
    spans = store.traces([s.trace_id for s in summaries])
    return envelope([to_jaeger_trace(s.trace_id, spans[s.trace_id]) for s in summaries])


def _trace_query(service, operation, tags, tag_pairs, start, end, lookback, min_d, max_d, limit) -> TraceQuery:
    now_us = time.time_ns() // 1000
    end_us = end if end is not None else now_us
    if start is not None:
        start_us = start
    elif lookback and lookback != "custom":
        start_us = max(0, end_us - parse_duration_ns(lookback, "lookback") // 1000)
    else:
        start_us = max(0, end_us - 3600 * 10**6)
    attrs: dict[str, str] = {}
    if tags:
        try:
            parsed = json.loads(tags)
        except (ValueError, RecursionError) as e:  # also too many digits, or too deep a nesting
            raise BadQuery(f"tags: must be a JSON object: {e}") from None
        if not isinstance(parsed, dict) or any(isinstance(v, (dict, list)) for v in parsed.values()):
            raise BadQuery("tags: must be a JSON object of strings, numbers or booleans")
        if not all(attr_key_ok(k) for k in parsed):
            raise BadQuery("tags: a key must not be empty nor hold a backslash")
        attrs.update({str(k): str(v) for k, v in parsed.items()})
    for pair in tag_pairs:  # the older tag=key:value form
        key, sep, value = pair.partition(":")
        if not sep or not attr_key_ok(key):
            raise BadQuery(f"tag: must be key:value, the key not empty nor holding a backslash: {pair!r}")
        attrs[key] = value
    return TraceQuery(
        start_us * 1000, end_us * 1000, service or None, operation or None, None,
        parse_duration_ns(min_d, "minDuration") if min_d else None,
        parse_duration_ns(max_d, "maxDuration") if max_d else None,
        attrs, "start", True, max(1, min(limit or 20, MAX_TRACES)), 0,
    )  # fmt: skip


@router.get("/dependencies")
def dependencies(request: Request, endTs: TimeMs = None,
                 lookback: int | None = Query(None, ge=0, le=MAX_DURATION_NS // 10**6)):  # fmt: skip
    end_ms = endTs if endTs is not None else time.time_ns() // 10**6
    back_ms = lookback if lookback is not None else 24 * 3600 * 1000
    m = _store(request).service_map(max(0, end_ms - back_ms) * 10**6, end_ms * 10**6)
    return envelope([{"parent": e.source, "child": e.target, "callCount": e.red.requests} for e in m.edges])
