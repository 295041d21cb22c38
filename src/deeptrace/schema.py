"""The span as agents send it and the server takes it: keys, types and bounds, in one place.

Every value that reaches the store fits its column (integers in int64, ids of bounded length
and charset, times in a plausible range), so one span can never make a batch unwritable. Text
that may grow with the traffic (names, status codes, attribute values, payload heads) is cut
with a marker; what identifies a span (ids, service, host, addresses) is refused instead,
because a cut id would be a different id. The limits are documented in docs/server.md.
"""

from __future__ import annotations

import binascii
import math
import re

INT64_MAX = (1 << 63) - 1
U32_MAX = (1 << 32) - 1
KINDS = ("SERVER", "CLIENT", "PRODUCER", "CONSUMER")
STATUSES = ("ok", "error")
# Spans outside these times are a clock or a bug, not traffic: 2000-01-01 to 2100-01-01.
EARLIEST_NS = 946_684_800 * 10**9
LATEST_NS = 4_102_444_800 * 10**9
# Span, trace and parent ids; agent and batch ids (ingest) have their own, longer bound.
MAX_SPAN_ID_CHARS = 64
ID_CHARS = re.compile(r"[0-9A-Za-z._:@-]+\Z")
# Who sent a batch, and which batch: what agents are named by and deduplicated on.
AGENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
AGENT_ID_RULE = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
MAX_NAME_CHARS = 512
MAX_LABEL_CHARS = 255  # service, host
MAX_ADDR_CHARS = 64
MAX_PROTOCOL_CHARS = 32
MAX_STATUS_CODE_CHARS = 64
MAX_ATTRIBUTES = 64
MAX_ATTRIBUTE_KEY_CHARS = 256
MAX_ATTRIBUTE_CHARS = 4096  # a string attribute value
MAX_HEAD_BYTES = 4096  # a payload head, decoded
TRUNCATED = "…[truncated]"
TRUNCATED_BYTES = b"...[truncated]"


class SpanError(ValueError):
    """A span no store can take; the message names the key."""


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(TRUNCATED)] + TRUNCATED


def _seq(key: str, v):
    if v.__class__ is not list or len(v) != 2 or not all(x.__class__ is int and 0 <= x <= U32_MAX for x in v):
        raise SpanError(f"{key} must be [start, end], TCP sequence numbers from 0 to {U32_MAX}")
    return v


def _head(key: str, v):
    if v.__class__ is not str:
        raise SpanError(f"{key} must be a base64 string")
    try:
        raw = binascii.a2b_base64(v, strict_mode=True)
    except (binascii.Error, ValueError):
        raise SpanError(f"{key} must be base64") from None
    if len(raw) > MAX_HEAD_BYTES:
        raw = raw[: MAX_HEAD_BYTES - len(TRUNCATED_BYTES)] + TRUNCATED_BYTES
        return binascii.b2a_base64(raw, newline=False).decode()
    return v


def _attributes(key: str, v):
    if v.__class__ is not dict:
        raise SpanError(f"{key} must be an object")
    if len(v) > MAX_ATTRIBUTES:
        raise SpanError(f"{key} has more than {MAX_ATTRIBUTES} keys")
    out = None
    for k, x in v.items():
        if len(k) > MAX_ATTRIBUTE_KEY_CHARS:
            raise SpanError(f"{key}: a key is longer than {MAX_ATTRIBUTE_KEY_CHARS} characters")
        cls = x.__class__
        if cls is str:
            if len(x) > MAX_ATTRIBUTE_CHARS:
                out = out or dict(v)
                out[k] = _cut(x, MAX_ATTRIBUTE_CHARS)
        elif cls is int:
            if not -INT64_MAX - 1 <= x <= INT64_MAX:
                raise SpanError(f"{key}.{k} is outside the int64 range")
        elif cls is float:
            if not math.isfinite(x):
                raise SpanError(f"{key}.{k} is not a finite number")
        elif cls is not bool and x is not None:
            raise SpanError(f"{key}.{k} must be a string, number, boolean or null")
    return v if out is None else out


# How each key is checked: (kind, bound, bound, may it be null?). INT: from lo to hi; TEXT: at
# most n characters, cut with the marker or refused; CHOICE: one of a set; ID: a span id;
# CHECK: a function that returns the value as stored. Plain tuples, tested inline: ingest
# runs this for every span.
INT, TEXT, CHOICE, ID, CHECK = range(5)
_RANGE_NAMES = {EARLIEST_NS: "2000-01-01", LATEST_NS: "2100-01-01"}
FIELDS: dict[str, tuple] = {
    "span_id": (ID, None, None, False), "trace_id": (ID, None, None, True),
    "parent_span_id": (ID, None, None, True), "kind": (CHOICE, KINDS, None, False),
    "name": (TEXT, MAX_NAME_CHARS, True, False), "protocol": (TEXT, MAX_PROTOCOL_CHARS, False, True),
    "service": (TEXT, MAX_LABEL_CHARS, False, True), "host": (TEXT, MAX_LABEL_CHARS, False, True),
    "pid": (INT, 0, U32_MAX, False), "tid": (INT, 0, U32_MAX, True), "resp_tid": (INT, 0, U32_MAX, True),
    "start_ns": (INT, EARLIEST_NS, LATEST_NS, False), "end_ns": (INT, EARLIEST_NS, LATEST_NS, False),
    "status": (CHOICE, STATUSES, None, True), "status_code": (TEXT, MAX_STATUS_CODE_CHARS, True, True),
    "laddr": (TEXT, MAX_ADDR_CHARS, False, True), "lport": (INT, 0, 65535, True),
    "raddr": (TEXT, MAX_ADDR_CHARS, False, True), "rport": (INT, 0, 65535, True),
    "conn_id": (INT, 0, INT64_MAX, True), "req_size": (INT, 0, INT64_MAX, True),
    "resp_size": (INT, 0, INT64_MAX, True), "req_seq": (CHECK, _seq, None, True),
    "resp_seq": (CHECK, _seq, None, True), "attributes": (CHECK, _attributes, None, True),
    "req_head": (CHECK, _head, None, True), "resp_head": (CHECK, _head, None, True),
}  # fmt: skip
REQUIRED = frozenset(k for k, spec in FIELDS.items() if not spec[3])


def validate_span(span) -> dict:
    """The span as it will be stored: only known keys, long text cut with a marker; raises
    SpanError naming the first key that no store could take."""
    if span.__class__ is not dict:
        raise SpanError("not a JSON object")
    out = {}
    for key, v in span.items():
        spec = FIELDS.get(key)
        if spec is None:
            continue
        kind = spec[0]
        if v is None:
            if not spec[3]:
                break  # a required key: reported as missing below
            out[key] = None
        elif kind is INT:
            if v.__class__ is not int or not spec[1] <= v <= spec[2]:
                if spec[1] in _RANGE_NAMES:
                    raise SpanError(f"{key} must be Unix nanoseconds between {_RANGE_NAMES[spec[1]]} and "
                                    f"{_RANGE_NAMES[spec[2]]}")  # fmt: skip
                raise SpanError(f"{key} must be an integer from {spec[1]} to {spec[2]}")
            out[key] = v
        elif kind is ID:
            if v.__class__ is not str or not 0 < len(v) <= MAX_SPAN_ID_CHARS or not ID_CHARS.match(v):
                raise SpanError(f"{key} must be 1 to {MAX_SPAN_ID_CHARS} characters of [0-9A-Za-z._:@-]")
            out[key] = v
        elif kind is TEXT:
            if v.__class__ is not str:
                raise SpanError(f"{key} must be a string")
            if len(v) > spec[1]:
                if not spec[2]:
                    raise SpanError(f"{key} is longer than {spec[1]} characters")
                v = _cut(v, spec[1])
            out[key] = v
        elif kind is CHOICE:
            if v not in spec[1]:
                raise SpanError(f"{key} must be one of {', '.join(spec[1])}")
            out[key] = v
        else:
            out[key] = spec[1](key, v)
    if not REQUIRED <= out.keys():
        raise SpanError(f"{next(k for k in FIELDS if k in REQUIRED and k not in out)} is required")
    if out["end_ns"] < out["start_ns"]:
        raise SpanError("end_ns is before start_ns")
    return out


def check_span(span) -> str | None:
    """What is wrong with one span (why the server would refuse it), or None."""
    try:
        validate_span(span)
    except SpanError as e:
        return str(e)
    return None
