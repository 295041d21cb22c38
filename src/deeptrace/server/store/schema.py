"""The stored span: one flat row per span, columns in portable SQL types.

Flat columns for everything queries filter or group on; attributes stay a JSON text
column (engines index JSON differently; only the Dialect reaches into it). Sequence
ranges are split into start/end columns so no engine needs array types.
"""

from __future__ import annotations

import json

# (column, portable SQL type)
SPAN_COLUMNS: list[tuple[str, str]] = [
    ("trace_id", "VARCHAR"),
    ("span_id", "VARCHAR"),
    ("parent_span_id", "VARCHAR"),
    ("kind", "VARCHAR"),
    ("name", "VARCHAR"),
    ("protocol", "VARCHAR"),
    ("service", "VARCHAR"),
    ("peer_service", "VARCHAR"),
    ("host", "VARCHAR"),
    ("pid", "BIGINT"),
    ("tid", "BIGINT"),
    ("resp_tid", "BIGINT"),
    ("start_ns", "BIGINT"),
    ("end_ns", "BIGINT"),
    ("duration_ns", "BIGINT"),
    ("status", "VARCHAR"),
    ("status_code", "VARCHAR"),
    ("laddr", "VARCHAR"),
    ("lport", "BIGINT"),
    ("raddr", "VARCHAR"),
    ("rport", "BIGINT"),
    ("conn_id", "BIGINT"),
    ("req_size", "BIGINT"),
    ("resp_size", "BIGINT"),
    ("req_seq_start", "BIGINT"),
    ("req_seq_end", "BIGINT"),
    ("resp_seq_start", "BIGINT"),
    ("resp_seq_end", "BIGINT"),
    ("link_method", "VARCHAR"),
    ("link_confidence", "DOUBLE"),
    ("attributes", "VARCHAR"),
    ("req_head", "VARCHAR"),
    ("resp_head", "VARCHAR"),
]
COLUMN_NAMES = [c for c, _ in SPAN_COLUMNS]
# Columns a search may filter on by name (besides span attributes).
FILTERABLE = {"kind", "protocol", "host", "status_code", "peer_service", "link_method", "pid", "name", "service"}


def span_to_columns(spans: list[dict]) -> dict[str, list]:
    """Column-major values for a batch insert."""
    cols: dict[str, list] = {c: [] for c in COLUMN_NAMES}
    for d in spans:
        req_seq, resp_seq = d.get("req_seq") or (None, None), d.get("resp_seq") or (None, None)
        row = dict(d)
        row["req_seq_start"], row["req_seq_end"] = req_seq
        row["resp_seq_start"], row["resp_seq_end"] = resp_seq
        row["attributes"] = json.dumps(d.get("attributes") or {}, separators=(",", ":"), ensure_ascii=False)
        row["duration_ns"] = d["end_ns"] - d["start_ns"]
        for c in COLUMN_NAMES:
            cols[c].append(row.get(c))
    return cols


def row_to_span(row: tuple) -> dict:
    d = dict(zip(COLUMN_NAMES, row))
    d["req_seq"] = _range(d, "req_seq")
    d["resp_seq"] = _range(d, "resp_seq")
    d["attributes"] = json.loads(d["attributes"]) if d["attributes"] else {}
    return d


def _range(d: dict, prefix: str) -> list[int] | None:
    start, end = d.pop(f"{prefix}_start"), d.pop(f"{prefix}_end")
    return [start, end] if start is not None else None
