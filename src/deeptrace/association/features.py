"""Persistent transaction fields: the user ids, order ids and SKUs that a request and
the calls made for it both carry. Fields are tokens, not n-grams: an id-like token
(3-64 characters with a digit in it, or an e-mail-like one) taken from the parts of a
payload that hold data (request line, body, command arguments), weighted by how rare
it is (inverse document frequency), so that "HTTP/1.1" or a common status weighs
nothing and a user id weighs a lot."""

from __future__ import annotations

import math
import re
from collections import Counter
from functools import lru_cache

import numpy as np
from scipy.sparse import csr_matrix

from deeptrace.association.exact import PROPAGATION_HEADERS
from deeptrace.association.model import SpanRef
from deeptrace.protocols import http1, http2, postgres, redis

# An id-like token: 3-64 token characters with a digit or an @ among them. The lookahead
# finds the digit within the token's reach, so the regex engine skips the rest (version
# strings, words) without a Python-level test per token.
_TOKEN = re.compile(rb"(?=[A-Za-z0-9_.@-]{0,63}[0-9@])[A-Za-z0-9_.@-]{3,64}")
# What carries no transaction data: RESP's length lines, and propagated ids, which link only
# as header ids (exact.py) so that `--no-header-ids` really leaves them out. Other HTTP headers
# stay: a service may pass a user or tenant id along in one.
_RESP_LENGTHS = re.compile(rb"(?m)^[*$][0-9-]+\r?$")
_PROPAGATED = re.compile(rb"(?im)^(?:" + b"|".join(h.encode() for h in PROPAGATION_HEADERS) + rb")[ \t]*:[^\n]*")


def fields_of(protocol: str, head: bytes) -> frozenset[str]:
    if protocol in (http1.PROTOCOL, http2.PROTOCOL):
        return _fields(_PROPAGATED, b"", head)
    if protocol == redis.PROTOCOL:
        return _fields(_RESP_LENGTHS, b" ", head)
    if protocol == postgres.PROTOCOL:
        return _postgres_fields(head)
    return _fields(None, b"", head)


@lru_cache(maxsize=1 << 14)
def _postgres_fields(head: bytes) -> frozenset[str]:
    """Each wire message's fields on its own (a row's last value is followed by the next
    message's type byte, which is no part of it), and the integer parameters a Bind sends
    in binary (psycopg 3 and asyncpg do) as the decimal text a literal in the SQL would
    have: "WHERE id = $1" with 31337 in binary carries the same user id as a request for
    /users/31337."""
    bodies, values = [], []
    at = 0
    while at + 5 <= len(head):
        kind, length = head[at : at + 1], int.from_bytes(head[at + 1 : at + 5], "big")
        if length < 4:
            break
        body = head[at + 5 : at + 1 + length]
        bodies.append(body)
        if kind == b"B":
            values += _bind_integers(body)
        at += 1 + length
    bodies.append(head[at:])  # what does not frame as messages, as it is
    numbers = (str(v).encode() for v in values)
    return _fields(None, b"", b"\n".join(bodies)) | frozenset(v.decode() for v in numbers if _TOKEN.fullmatch(v))


def _bind_integers(body: bytes) -> list[int]:
    """A Bind's 2-, 4- and 8-byte binary parameters as signed integers (the body may be cut
    short by the head's end: what is whole is read)."""
    at = body.find(b"\0") + 1  # the portal's name
    at = body.find(b"\0", at) + 1 if at else 0  # the statement's
    if not at or at + 2 > len(body):
        return []
    n_formats = int.from_bytes(body[at : at + 2], "big")
    formats = [int.from_bytes(body[at + 2 + 2 * i : at + 4 + 2 * i], "big") for i in range(n_formats)]
    at += 2 + 2 * n_formats
    if at + 2 > len(body):
        return []
    count, at, out = int.from_bytes(body[at : at + 2], "big"), at + 2, []
    for i in range(count):
        if at + 4 > len(body):
            break
        size = int.from_bytes(body[at : at + 4], "big", signed=True)
        at += 4
        binary = (formats[0] if n_formats == 1 else formats[i] if i < n_formats else 0) == 1  # else text
        if size in (2, 4, 8) and binary and at + size <= len(body):
            out.append(int.from_bytes(body[at : at + size], "big", signed=True))
        at += max(size, 0)
    return out


@lru_cache(maxsize=1 << 14)
def _fields(skip: re.Pattern | None, blank: bytes, head: bytes) -> frozenset[str]:
    """Cached: a service's requests of one route are often the same bytes, every one of
    them when nothing but timing tells them apart."""
    data = head if skip is None else skip.sub(blank, head)
    return frozenset(map(bytes.decode, _TOKEN.findall(data)))


def request_fields(span: SpanRef) -> frozenset[str]:
    """Fields in the request a span carried."""
    if span.req_fields is None:
        span.req_fields = fields_of(span.protocol, span.req_head)
    return span.req_fields


def span_fields(span: SpanRef) -> frozenset[str]:
    """Fields in the request and the response (an order id made by a call comes back in
    its response and goes on in the parent's)."""
    if span.all_fields is None:
        span.all_fields = _request_and_response_fields(span.protocol, span.req_head, span.resp_head)
    return span.all_fields


@lru_cache(maxsize=1 << 14)
def _request_and_response_fields(protocol: str, req: bytes, resp: bytes) -> frozenset[str]:
    """Cached whole: identical heads are the rule where only timing tells requests apart,
    and a million spans are read at a time (one lookup, not two parses and a union)."""
    return fields_of(protocol, req) | fields_of(protocol, resp)


class FieldWeights:
    """Inverse document frequency of each field over a set of spans."""

    def __init__(self, field_sets: list[frozenset[str]]) -> None:
        self.documents = max(1, len(field_sets))
        self.frequency: Counter[str] = Counter()
        for fields in field_sets:
            self.frequency.update(fields)
        self._log_n = math.log(self.documents + 1)
        self._idf = {f: self._log_n - math.log(n + 1) for f, n in self.frequency.items()}

    def idf(self, field: str) -> float:
        weight = self._idf.get(field)
        return self._log_n if weight is None else weight

    def similarity(self, a: frozenset[str], b: frozenset[str]) -> float:
        """TF-IDF cosine similarity of two field sets (each field counted once)."""
        shared = a & b
        if not shared:
            return 0.0
        num = sum(self.idf(f) ** 2 for f in shared)
        na = math.sqrt(sum(self.idf(f) ** 2 for f in a))
        nb = math.sqrt(sum(self.idf(f) ** 2 for f in b))
        return num / (na * nb) if na and nb else 0.0


def shared_weights(a: list[frozenset[str]], b: list[frozenset[str]], pa: np.ndarray, pb: np.ndarray) -> np.ndarray:
    """For each pair k, the summed IDF weight of the fields both a[pa[k]] and b[pb[k]] carry
    (IDF over a + b): evidence that they belong together. Sparse products, not a loop per
    pair: a busy process has millions of candidate pairs in a window."""
    vocabulary: dict[str, int] = {}
    cols = [[vocabulary.setdefault(f, len(vocabulary)) for fields in sets for f in fields] for sets in (a, b)]
    if not vocabulary or not len(pa):
        return np.zeros(len(pa))
    ma, mb = (csr_matrix((np.ones(len(c)), (np.repeat(np.arange(len(sets)), [len(f) for f in sets]), c)),
                         shape=(len(sets), len(vocabulary))) for sets, c in zip((a, b), cols))  # fmt: skip
    frequency = np.asarray(ma.sum(axis=0)).ravel() + np.asarray(mb.sum(axis=0)).ravel()
    idf = np.log(len(a) + len(b) + 1) - np.log(frequency + 1)
    return np.asarray(ma[pa].multiply(mb[pb]) @ idf).ravel()
