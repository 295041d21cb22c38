"""Span batches from agents: decompress, parse, check, or say exactly what is wrong.

A batch is all or nothing: the first bad span rejects it whole, so a half-stored batch can
never be re-sent and stored twice.
"""

from __future__ import annotations

import gzip
import time
import zlib
from dataclasses import dataclass

from deeptrace.schema import AGENT_ID, AGENT_ID_RULE, MAX_BODY_BYTES, decode_batch

MAX_AHEAD_NS = 900 * 10**9  # how far past the server's clock a span may end (clocks drift)


class BadBatch(ValueError):
    """The batch can never be accepted; the message says why."""


class TooLarge(BadBatch):
    pass


@dataclass
class Batch:
    agent_id: str
    batch_id: str
    spans: list[dict]  # as they will be stored (schema.decode_batch)
    body_gz: bytes  # the batch as received, gzip-compressed, kept for replay after a crash


def read_batch(raw: bytes, content_encoding: str | None) -> Batch:
    """A request body as it came, to a checked batch."""
    encoding = (content_encoding or "identity").strip().lower()
    body = decode(raw, encoding)
    # Kept compressed: a durable copy of each batch is written before it is acknowledged.
    return parse(body, raw if encoding == "gzip" else gzip.compress(body, 1), time.time_ns())


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


def parse(body: bytes, body_gz: bytes, now_ns: int | None = None) -> Batch:
    """A batch from its JSON; with now_ns, spans may not end more than MAX_AHEAD_NS after it."""
    try:
        doc = decode_batch(body)  # parsed and checked in one go, in C
    except ValueError as e:  # SpanError included: the message names span and key
        raise BadBatch(str(e)) from None
    for key, value in (("agent_id", doc.agent_id), ("batch_id", doc.batch_id)):
        if not AGENT_ID.match(value):
            raise BadBatch(f"{key} must be {AGENT_ID_RULE}")
    if now_ns is not None:
        # The linker holds a span until it has ended: one from the far future would wait (and
        # keep its batch waiting) until then.
        for i, d in enumerate(doc.spans):
            if d["end_ns"] > now_ns + MAX_AHEAD_NS:
                raise BadBatch(f"span {i}: end_ns is {(d['end_ns'] - now_ns) / 1e9:.0f} s after the server's clock "
                               f"(at most {MAX_AHEAD_NS // 10**9} s): check the agent host's clock")  # fmt: skip
    return Batch(doc.agent_id, doc.batch_id, doc.spans, body_gz)
