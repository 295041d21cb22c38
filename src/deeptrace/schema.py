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
# Computed by the server (linker, store): what an agent sends for them is ignored.
SERVER_KEYS = ("duration_ns", "peer_service", "link_method", "link_confidence")


class SpanError(ValueError):
    """A span no store can take; the message names the key."""


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(TRUNCATED)] + TRUNCATED


def _int(lo: int, hi: int):
    def check(key: str, v):
        if v.__class__ is not int or not lo <= v <= hi:
            raise SpanError(f"{key} must be an integer from {lo} to {hi}")
        return v

    return check


def _choice(choices: tuple[str, ...]):
    def check(key: str, v):
        if v not in choices:
            raise SpanError(f"{key} must be one of {', '.join(choices)}")
        return v

    return check


def _text(limit: int, cut: bool = False):
    def check(key: str, v):
        if v.__class__ is not str:
            raise SpanError(f"{key} must be a string")
        if len(v) > limit:
            if not cut:
                raise SpanError(f"{key} is longer than {limit} characters")
            return _cut(v, limit)
        return v

    return check


def _id(key: str, v):
    if v.__class__ is not str or not 0 < len(v) <= MAX_SPAN_ID_CHARS or not ID_CHARS.match(v):
        raise SpanError(f"{key} must be 1 to {MAX_SPAN_ID_CHARS} characters of [0-9A-Za-z._:@-]")
    return v


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


def _times(key: str, v):
    if v.__class__ is not int or not EARLIEST_NS <= v <= LATEST_NS:
        raise SpanError(f"{key} must be Unix nanoseconds between 2000-01-01 and 2100-01-01")
    return v


# key -> (check that returns the value as stored, may the value be null?). Keys not listed
# are dropped; REQUIRED keys must be present and not null.
FIELDS: dict[str, tuple] = {
    "span_id": (_id, False), "trace_id": (_id, True), "parent_span_id": (_id, True),
    "kind": (_choice(KINDS), False), "name": (_text(MAX_NAME_CHARS, cut=True), False),
    "protocol": (_text(MAX_PROTOCOL_CHARS), True), "service": (_text(MAX_LABEL_CHARS), True),
    "host": (_text(MAX_LABEL_CHARS), True), "pid": (_int(0, U32_MAX), False), "tid": (_int(0, U32_MAX), True),
    "resp_tid": (_int(0, U32_MAX), True), "start_ns": (_times, False), "end_ns": (_times, False),
    "status": (_choice(STATUSES), True), "status_code": (_text(MAX_STATUS_CODE_CHARS, cut=True), True),
    "laddr": (_text(MAX_ADDR_CHARS), True), "lport": (_int(0, 65535), True),
    "raddr": (_text(MAX_ADDR_CHARS), True), "rport": (_int(0, 65535), True),
    "conn_id": (_int(0, INT64_MAX), True), "req_size": (_int(0, INT64_MAX), True),
    "resp_size": (_int(0, INT64_MAX), True), "req_seq": (_seq, True), "resp_seq": (_seq, True),
    "attributes": (_attributes, True), "req_head": (_head, True), "resp_head": (_head, True),
}  # fmt: skip
REQUIRED = tuple(k for k, (_, nullable) in FIELDS.items() if not nullable)


def validate_span(span) -> dict:
    """The span as it will be stored: only known keys, long text cut with a marker; raises
    SpanError naming the first key that no store could take."""
    if span.__class__ is not dict:
        raise SpanError("not a JSON object")
    out = {}
    for key, (check, nullable) in FIELDS.items():
        v = span.get(key)
        if v is None:
            if not nullable:
                raise SpanError(f"{key} is required")
            if key in span:
                out[key] = None
            continue
        out[key] = check(key, v)
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
