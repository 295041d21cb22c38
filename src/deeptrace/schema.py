"""The span as agents send it and the server takes it: keys, types and bounds, in one place.

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
from typing import Annotated, Literal, NotRequired, Optional, Required, TypedDict, Union

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
_AttrValue = Union[str, Annotated[int, Meta(ge=-INT64_MAX - 1, le=INT64_MAX)], float, bool, None]
_Attributes = Annotated[dict[Annotated[str, Meta(max_length=MAX_ATTRIBUTE_KEY_CHARS)], _AttrValue],
                        Meta(max_length=MAX_ATTRIBUTES)]  # fmt: skip

# THE span as agents send it. Keys not listed are dropped, among them what the server
# computes itself (duration_ns, peer_service, link_method, link_confidence).
Span = TypedDict("Span", {
    "span_id": Required[_Id], "kind": Required[Literal[KINDS]], "name": Required[str], "pid": Required[_U32],
    "start_ns": Required[_Ns], "end_ns": Required[_Ns], "trace_id": NotRequired[Optional[_Id]],
    "parent_span_id": NotRequired[Optional[_Id]],
    "protocol": NotRequired[Optional[Annotated[str, Meta(max_length=MAX_PROTOCOL_CHARS)]]],
    "service": NotRequired[Optional[_Label]], "host": NotRequired[Optional[_Label]],
    "tid": NotRequired[Optional[_U32]], "resp_tid": NotRequired[Optional[_U32]],
    "status": NotRequired[Optional[Literal[STATUSES]]], "status_code": NotRequired[Optional[str]],
    "laddr": NotRequired[Optional[_Addr]], "lport": NotRequired[Optional[_Port]],
    "raddr": NotRequired[Optional[_Addr]], "rport": NotRequired[Optional[_Port]],
    "conn_id": NotRequired[Optional[_Count]], "req_size": NotRequired[Optional[_Count]],
    "resp_size": NotRequired[Optional[_Count]], "req_seq": NotRequired[Optional[_Seq]],
    "resp_seq": NotRequired[Optional[_Seq]], "attributes": NotRequired[Optional[_Attributes]],
    "req_head": NotRequired[Optional[str]], "resp_head": NotRequired[Optional[str]],
})  # fmt: skip


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
