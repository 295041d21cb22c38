"""The stored span: one flat row per span, columns in portable SQL types.

Flat columns for everything queries filter or group on; attributes stay a JSON text
column (engines index JSON differently; only the Dialect reaches into it). Sequence
ranges are split into start/end columns so no engine needs array types.
"""

from __future__ import annotations

import json

from deeptrace.schema import FIELDS

# (column, portable SQL type), from the one definition of a span's keys (deeptrace.schema).
SPAN_COLUMNS: list[tuple[str, str]] = [
    column
    for f in FIELDS
    for column in (((f"{f.name}_start", f.column), (f"{f.name}_end", f.column)) if f.range else ((f.name, f.column),))
]
RANGES = tuple(f.name for f in FIELDS if f.range)
COLUMN_NAMES = [c for c, _ in SPAN_COLUMNS]
# Columns a search may filter on by name (besides span attributes).
FILTERABLE = {"kind", "protocol", "host", "status_code", "peer_service", "link_method", "pid", "name", "service"}


def span_to_columns(spans: list[dict]) -> dict[str, list]:
    """Column-major values for a batch insert."""
    cols: dict[str, list] = {c: [] for c in COLUMN_NAMES}
    for d in spans:
        row = dict(d)
        for name in RANGES:
            row[f"{name}_start"], row[f"{name}_end"] = d.get(name) or (None, None)
        row["attributes"] = json.dumps(d.get("attributes") or {}, separators=(",", ":"), ensure_ascii=False)
        row["duration_ns"] = d["end_ns"] - d["start_ns"]
        for c in COLUMN_NAMES:
            cols[c].append(row.get(c))
    return cols


def row_to_span(row: tuple) -> dict:
    d = dict(zip(COLUMN_NAMES, row))
    for name in RANGES:
        d[name] = _range(d, name)
    d["attributes"] = json.loads(d["attributes"]) if d["attributes"] else {}
    return d


def _range(d: dict, prefix: str) -> list[int] | None:
    start, end = d.pop(f"{prefix}_start"), d.pop(f"{prefix}_end")
    return [start, end] if start is not None else None
