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
from deeptrace.protocols import http1, http2, redis

# An id-like token: 3-64 token characters with a digit or an @ among them. The lookahead
# finds the digit within the token's reach, so the regex engine skips the rest (version
# strings, words) without a Python-level test per token.
_TOKEN = re.compile(rb"(?=[A-Za-z0-9_.@-]{0,63}[0-9@])[A-Za-z0-9_.@-]{3,64}")
# What carries no transaction data: RESP's length lines, and propagated ids, which link only
# as header ids (exact.py) so that `--no-header-ids` really leaves them out. Other HTTP headers
# stay: a service may pass a user or tenant id along in one.
_RESP_LENGTHS = re.compile(rb"(?m)^[*$][0-9-]+\r?$")
_PROPAGATED = re.compile(rb"(?im)^(?:" + b"|".join(h.encode() for h in PROPAGATION_HEADERS) + rb")[ \t]*:[^\n]*")


def fields_of(span: SpanRef, head: bytes) -> frozenset[str]:
    if span.protocol in (http1.PROTOCOL, http2.PROTOCOL):
        return _fields(_PROPAGATED, b"", head)
    if span.protocol == redis.PROTOCOL:
        return _fields(_RESP_LENGTHS, b" ", head)
    return _fields(None, b"", head)


@lru_cache(maxsize=1 << 14)
def _fields(skip: re.Pattern | None, blank: bytes, head: bytes) -> frozenset[str]:
    """Cached: a service's requests of one route are often the same bytes, every one of
    them when nothing but timing tells them apart."""
    data = head if skip is None else skip.sub(blank, head)
    return frozenset(map(bytes.decode, _TOKEN.findall(data)))


def request_fields(span: SpanRef) -> frozenset[str]:
    """Fields in the request a span carried."""
    if span.req_fields is None:
        span.req_fields = fields_of(span, span.req_head)
    return span.req_fields


def span_fields(span: SpanRef) -> frozenset[str]:
    """Fields in the request and the response (an order id made by a call comes back in
    its response and goes on in the parent's)."""
    if span.all_fields is None:
        span.all_fields = request_fields(span) | fields_of(span, span.resp_head)
    return span.all_fields


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
