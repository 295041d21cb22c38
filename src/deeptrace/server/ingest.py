"""Span batches from agents: decompress, parse, check, or say exactly what is wrong.

A batch is all or nothing: the first bad span rejects it whole, so a half-stored batch can
never be re-sent and stored twice.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass

import orjson

MAX_BODY_BYTES = 32 << 20  # decompressed
MAX_ID_CHARS = 128

_STR = (str,)
_INT = (int,)
_OPT_STR = (str, type(None))
_OPT_INT = (int, type(None))
REQUIRED: tuple[tuple[str, tuple], ...] = (
    ("span_id", _STR), ("kind", _STR), ("name", _STR), ("pid", _INT), ("start_ns", _INT), ("end_ns", _INT),
)  # fmt: skip
OPTIONAL: tuple[tuple[str, tuple], ...] = (
    ("trace_id", _OPT_STR), ("parent_span_id", _OPT_STR), ("protocol", _OPT_STR), ("service", _OPT_STR),
    ("host", _OPT_STR), ("tid", _OPT_INT), ("resp_tid", _OPT_INT), ("status", _OPT_STR), ("status_code", _OPT_STR),
    ("laddr", _OPT_STR), ("lport", _OPT_INT), ("raddr", _OPT_STR), ("rport", _OPT_INT), ("conn_id", _OPT_INT),
    ("req_size", _OPT_INT), ("resp_size", _OPT_INT), ("req_seq", (list, type(None))),
    ("resp_seq", (list, type(None))), ("attributes", (dict, type(None))), ("req_head", _OPT_STR),
    ("resp_head", _OPT_STR),
)  # fmt: skip
KINDS = {"SERVER", "CLIENT", "PRODUCER", "CONSUMER"}


class BadBatch(ValueError):
    """The batch can never be accepted; the message says why."""


class TooLarge(BadBatch):
    pass


@dataclass
class Batch:
    agent_id: str
    batch_id: str
    spans: list[dict]
    body_gz: bytes  # the batch as received, gzip-compressed, kept for replay after a crash


def read_batch(raw: bytes, content_encoding: str | None) -> Batch:
    """A request body as it came, to a checked batch."""
    encoding = (content_encoding or "identity").strip().lower()
    body = decode(raw, encoding)
    # Kept compressed: a durable copy of each batch is written before it is acknowledged.
    return parse(body, raw if encoding == "gzip" else gzip.compress(body, 1))


def decode(raw: bytes, encoding: str) -> bytes:
    """The body, decompressed; encoding is the Content-Encoding, lower case."""
    if encoding == "gzip":
        try:
            # Bounded: a small gzip bomb must not take the server's memory.
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out = d.decompress(raw, MAX_BODY_BYTES + 1)
        except (zlib.error, EOFError, gzip.BadGzipFile) as e:
            raise BadBatch(f"body is not valid gzip: {e}") from None
        if len(out) > MAX_BODY_BYTES or d.unconsumed_tail:
            raise TooLarge(f"body is larger than {MAX_BODY_BYTES} bytes decompressed")
        raw = out
    elif encoding != "identity":
        raise BadBatch(f"unsupported Content-Encoding {encoding!r}: use gzip or none")
    if len(raw) > MAX_BODY_BYTES:
        raise TooLarge(f"body is larger than {MAX_BODY_BYTES} bytes")
    return raw


def parse(body: bytes, body_gz: bytes) -> Batch:
    try:
        doc = orjson.loads(body)  # several times json's speed, and ingest is mostly parsing
    except orjson.JSONDecodeError as e:
        raise BadBatch(f"body is not JSON (UTF-8): {e}") from None
    if not isinstance(doc, dict):
        raise BadBatch("body must be a JSON object with agent_id, batch_id and spans")
    agent_id, batch_id, spans = doc.get("agent_id"), doc.get("batch_id"), doc.get("spans")
    for key, value in (("agent_id", agent_id), ("batch_id", batch_id)):
        if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
            raise BadBatch(f"{key} must be a non-empty string of at most {MAX_ID_CHARS} characters")
    if not isinstance(spans, list):
        raise BadBatch("spans must be a list")
    for i, span in enumerate(spans):
        problem = check_span(span)
        if problem:
            raise BadBatch(f"span {i}: {problem}")
    return Batch(agent_id, batch_id, spans, body_gz)


def check_span(span) -> str | None:
    """What is wrong with one span, or None."""
    if not isinstance(span, dict):
        return "not a JSON object"
    for key, types in REQUIRED:
        value = span.get(key)
        if not isinstance(value, types) or isinstance(value, bool):
            return f"{key} is required and must be {types[0].__name__}"
    for key, types in OPTIONAL:
        if key in span and not isinstance(span[key], types):
            return f"{key} must be {' or '.join('null' if t is type(None) else t.__name__ for t in types)}"
    if span["kind"] not in KINDS:
        return f"kind must be one of {', '.join(sorted(KINDS))}"
    if span["end_ns"] < span["start_ns"]:
        return "end_ns is before start_ns"
    for key in ("req_seq", "resp_seq"):
        seq = span.get(key)
        if seq is not None and (len(seq) != 2 or not all(isinstance(x, int) for x in seq)):
            return f"{key} must be [start, end] integers or null"
    return None
