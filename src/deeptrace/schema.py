"""The span: its keys, types and bounds, in one place (`FIELDS`), and what is made of them:
the agent's JSON layout (`SpanJson`), what ingest takes (`Span`, `decode_batch`), the
store's columns (server/store/schema.py) and the keys a span file must have (`REQUIRED_KEYS`).
This module needs msgspec only: agents import it, and none of the server's libraries.

Every value that reaches the store fits its column (integers in int64, ids of bounded length
and charset, times in a plausible range), so one span can never make a batch unwritable. Text
that may grow with the traffic (names, status codes, attribute values, payload heads) is cut
with a marker; what identifies a span (ids, service, host, addresses) is refused instead,
because a cut id would be a different id. The limits are documented in docs/server.md.

The types are checked by msgspec while it parses (in C: ingest parses and checks a batch in
about the time a plain JSON parse takes); what it cannot say (cuts, base64, end after start)
is `_finish`, in Python, per span.
"""

import binascii
import math
import re
from dataclasses import dataclass
from typing import Annotated, Literal, NotRequired, Required, TypedDict

import msgspec
from msgspec import Meta

INT64_MAX = (1 << 63) - 1
U32_MAX = (1 << 32) - 1
KINDS = ("SERVER", "CLIENT", "PRODUCER", "CONSUMER")
STATUSES = ("ok", "error")
# Spans outside these times are a clock or a bug, not traffic: 2000-01-01 to 2100-01-01.
EARLIEST_NS = 946_684_800 * 10**9
LATEST_NS = 4_102_444_800 * 10**9
MAX_SPAN_ID_CHARS = 64  # span, trace and parent ids
# Who sent a batch, and which batch: what agents are named by and deduplicated on.
AGENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
AGENT_ID_RULE = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
MAX_BODY_BYTES = 32 << 20  # a batch's body, decompressed, and as sent
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

_Id = Annotated[str, Meta(pattern=rf"^[0-9A-Za-z._:@-]{{1,{MAX_SPAN_ID_CHARS}}}$")]
_U32 = Annotated[int, Meta(ge=0, le=U32_MAX)]
_Count = Annotated[int, Meta(ge=0, le=INT64_MAX)]
_Ns = Annotated[int, Meta(ge=EARLIEST_NS, le=LATEST_NS)]
_Port = Annotated[int, Meta(ge=0, le=65535)]
_Seq = Annotated[list[_U32], Meta(min_length=2, max_length=2)]  # [start, end] TCP sequence numbers
_Label = Annotated[str, Meta(max_length=MAX_LABEL_CHARS)]
_Addr = Annotated[str, Meta(max_length=MAX_ADDR_CHARS)]
_AttrValue = str | Annotated[int, Meta(ge=-INT64_MAX - 1, le=INT64_MAX)] | float | bool | None
_Attributes = Annotated[dict[Annotated[str, Meta(max_length=MAX_ATTRIBUTE_KEY_CHARS)], _AttrValue],
                        Meta(max_length=MAX_ATTRIBUTES)]  # fmt: skip


@dataclass(frozen=True)
class Field:
    """One key of a span: the type the agent writes it as, the type (bounds included) ingest
    checks, and the portable SQL type of its stored column. A `range` is a [start, end]
    pair of that type, stored as two columns (`<name>_start`, `<name>_end`) so that no
    engine needs array types."""

    name: str
    written: object  # in the agent's JSON (SpanJson); None: not written by the agent
    checked: object  # as ingest takes it (Span); None: dropped at ingest (the server computes it)
    column: str  # portable SQL type
    required: bool = False
    range: bool = False


# Span attributes that say where its process runs (container, Kubernetes pod, cgroup): the
# same on every span of the process, so OTLP export moves them to the span's Resource.
RESOURCE_ATTRIBUTE_PREFIXES = ("k8s.", "container.", "deeptrace.cgroup.")

# THE span, one definition: every key, in the order the agent writes them. The agent's
# layout (SpanJson), what ingest takes (Span), the store's columns (server/store/schema.py)
# and the CLI's check of a span file all come from here.
FIELDS: tuple[Field, ...] = (
    Field("trace_id", str, _Id | None, "VARCHAR"),
    Field("span_id", str, _Id, "VARCHAR", required=True),
    Field("parent_span_id", str | None, _Id | None, "VARCHAR"),
    Field("kind", str, Literal[KINDS], "VARCHAR", required=True),
    Field("name", str, str, "VARCHAR", required=True),
    Field("protocol", str, Annotated[str, Meta(max_length=MAX_PROTOCOL_CHARS)] | None, "VARCHAR"),
    Field("service", str, _Label | None, "VARCHAR"),
    Field("host", str, _Label | None, "VARCHAR"),
    Field("pid", int, _U32, "BIGINT", required=True),
    Field("tid", int, _U32 | None, "BIGINT"),
    Field("resp_tid", int | None, _U32 | None, "BIGINT"),
    Field("start_ns", int, _Ns, "BIGINT", required=True),
    Field("end_ns", int, _Ns, "BIGINT", required=True),
    Field("duration_ns", int, None, "BIGINT"),  # end_ns - start_ns: the server computes it again
    Field("status", str, Literal[STATUSES] | None, "VARCHAR"),
    Field("status_code", str | None, str | None, "VARCHAR"),
    Field("laddr", str, _Addr | None, "VARCHAR"),
    Field("lport", int, _Port | None, "BIGINT"),
    Field("raddr", str, _Addr | None, "VARCHAR"),
    Field("rport", int, _Port | None, "BIGINT"),
    Field("conn_id", int, _Count | None, "BIGINT"),
    Field("req_size", int, _Count | None, "BIGINT"),
    Field("resp_size", int, _Count | None, "BIGINT"),
    Field("req_seq", list[int] | None, _Seq | None, "BIGINT", range=True),  # TCP sequence numbers
    Field("resp_seq", list[int] | None, _Seq | None, "BIGINT", range=True),
    # Raw: encoded already (the kernel's exchanges repeat the same attributes, encoded once).
    Field("attributes", dict | msgspec.Raw, _Attributes | None, "VARCHAR"),  # JSON text when stored
    Field("req_head", str, str | None, "VARCHAR"),  # base64
    Field("resp_head", str, str | None, "VARCHAR"),
    # Decided by association, on the agent (--associate) or the server, after the span is
    # made: the agent writes them only on linked spans, and the server links again itself.
    Field("peer_service", None, None, "VARCHAR"),
    Field("link_method", None, None, "VARCHAR"),
    Field("link_confidence", None, None, "DOUBLE"),
)
FIELD_NAMES = tuple(f.name for f in FIELDS)
REQUIRED_KEYS = tuple(f.name for f in FIELDS if f.required)

# The span as agents send it and ingest takes it. Keys not listed are dropped, among them
# what the server computes itself (duration_ns, peer_service, link_method, link_confidence).
Span = TypedDict("Span", {f.name: (Required if f.required else NotRequired)[f.checked]
                          for f in FIELDS if f.checked is not None})  # fmt: skip

# A span as the agent writes it, one JSON object per line, and ships it (key order included).
SpanJson = msgspec.defstruct("SpanJson", [(f.name, f.written) for f in FIELDS if f.written is not None],
                             module=__name__)  # fmt: skip


class Batch(msgspec.Struct):
    """What an agent posts: who, which batch (the pair is deduplicated on), and the spans."""

    agent_id: str  # both must match AGENT_ID: ingest says so in its own words
    batch_id: str
    spans: list[Span]


class SpanError(ValueError):
    """A span no store can take; the message names the key."""


_BATCH_DECODER = msgspec.json.Decoder(Batch)
_WHERE = re.compile(r" - at (`key` in )?`\$(?:\.spans\[(\d+)\])?\.?([^`]*)`$")


def _message(e: msgspec.ValidationError) -> tuple[int | None, str]:
    """(span index or None, `key: what is wrong`) from msgspec's `Expected ... - at `$.spans[3].pid``."""
    text = str(e)
    text = text[:1].lower() + text[1:]
    m = _WHERE.search(text)
    if m is None:
        return None, text
    what, key, index, path = text[: m.start()], m.group(1), m.group(2), m.group(3)
    if key:
        path += " (a key)"
    return (int(index) if index else None), (f"{path}: {what}" if path else what)


def decode_batch(body: bytes) -> Batch:
    """A batch's JSON, checked and as it will be stored; raises SpanError (span and key named)
    or ValueError (not JSON, or not a batch)."""
    try:
        batch = _BATCH_DECODER.decode(body)
    except msgspec.ValidationError as e:
        index, what = _message(e)
        raise SpanError(what if index is None else f"span {index}: {what}") from None
    except msgspec.DecodeError as e:
        raise ValueError(f"body is not JSON (UTF-8): {e}") from None
    for i, span in enumerate(batch.spans):
        try:
            _finish(span)
        except SpanError as e:
            raise SpanError(f"span {i}: {e}") from None
    return batch


def validate_span(span) -> dict:
    """One span (a Python dict, as the agent makes them) as it would be stored; raises SpanError."""
    try:
        out = msgspec.convert(span, Span)
    except msgspec.ValidationError as e:
        raise SpanError(_message(e)[1]) from None
    return _finish(out)


def check_span(span) -> str | None:
    """What is wrong with one span (why the server would refuse it), or None."""
    try:
        validate_span(span)
    except SpanError as e:
        return str(e)
    return None


def _finish(d: dict) -> dict:
    """What the types cannot say, in place: long text cut, heads base64, end after start."""
    if d["end_ns"] < d["start_ns"]:
        raise SpanError("end_ns: is before start_ns")
    if len(d["name"]) > MAX_NAME_CHARS:
        d["name"] = _cut(d["name"], MAX_NAME_CHARS)
    code = d.get("status_code")
    if code is not None and len(code) > MAX_STATUS_CODE_CHARS:
        d["status_code"] = _cut(code, MAX_STATUS_CODE_CHARS)
    attributes = d.get("attributes")
    if attributes:
        for k, v in attributes.items():
            if v.__class__ is str:
                if len(v) > MAX_ATTRIBUTE_CHARS:
                    attributes[k] = _cut(v, MAX_ATTRIBUTE_CHARS)
            elif v.__class__ is float and not math.isfinite(v):  # JSON has none; a Python caller may
                raise SpanError(f"attributes.{k}: is not a finite number")
    for key in ("req_head", "resp_head"):
        head = d.get(key)
        if head:
            d[key] = _head(key, head)
    return d


def _cut(text: str, limit: int) -> str:
    return text[: limit - len(TRUNCATED)] + TRUNCATED


def _head(key: str, text: str) -> str:
    try:
        raw = binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        raise SpanError(f"{key}: must be base64") from None
    if len(raw) > MAX_HEAD_BYTES:
        raw = raw[: MAX_HEAD_BYTES - len(TRUNCATED_BYTES)] + TRUNCATED_BYTES
        return binascii.b2a_base64(raw, newline=False).decode()
    return text
