"""Exchanges the kernel assembled -> spans, a batch at a time.

For the protocols it can frame (agent/bpf/deeptrace.bpf.c: HTTP/1, Redis), the kernel pairs
each request with its response and writes one fixed-size event for both
(records.EXCHANGE_FIELDS), with the first bytes of each. A batch of them arrives as one numpy
array; its columns become Python lists once per batch, and names, status and attributes come
from the heads through the same protocol code as records take, once per distinct head: heads
repeat (the same routes and commands, the same responses), so most spans cost a dictionary
lookup, not a parse.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import numpy as np

from deeptrace.capture.records import EXCHANGE_PROTOCOLS
from deeptrace.capture.spans import Endpoint, Span
from deeptrace.protocols import http1, redis
from deeptrace.protocols.redaction import redact_span_parts

_CACHE_LIMIT = 4096  # distinct heads (and connections) remembered
_SEQ = 0xFFFFFFFF
_ROLE_SERVER = 2  # enum dt_role

# What a span takes from each side of an exchange, made once per distinct head:
# request -> (protocol, name, attributes, redacted head);
# response -> (status, status code, attributes, redacted head).
Request = tuple[str, str, dict, bytes]
Response = tuple[str, str | None, dict, bytes]


def _http_request(head: bytes) -> Request:
    fields = http1.request_head_fields(head)
    name, attrs = (http1.request_name(fields), http1.request_attributes(fields)) if fields else ("http", {})
    redacted, _ = redact_span_parts(http1.PROTOCOL, attrs, head, b"")
    return http1.PROTOCOL, name, attrs, redacted


def _http_response(head: bytes, status: int) -> Response:
    fields = http1.response_head_fields(head)
    attrs = http1.response_attributes(fields) if fields else {"http.response.status_code": status}
    _, redacted = redact_span_parts(http1.PROTOCOL, attrs, b"", head)
    return "error" if status >= 400 else "ok", str(status), attrs, redacted


def _redis_request(head: bytes) -> Request:
    fields = redis.request_head_fields(head)
    name, attrs = (f"redis {fields['command']}", redis.request_attributes(fields)) if fields else ("redis", {})
    redacted, _ = redact_span_parts(redis.PROTOCOL, attrs, head, b"")
    return redis.PROTOCOL, name, attrs, redacted


def _redis_response(head: bytes, error: int) -> Response:
    fields = redis.reply_head_fields(head) or {"type": "error" if error else "?"}
    attrs = redis.reply_attributes(fields)
    _, redacted = redact_span_parts(redis.PROTOCOL, attrs, b"", head)
    if fields["type"] == "error":
        return "error", fields.get("error_code", "ERR"), attrs, redacted
    return "ok", None, attrs, redacted


# By enum dt_xproto.
_SIDES: dict[int, tuple[Callable[[bytes], Request], Callable[[bytes, int], Response]]] = {
    EXCHANGE_PROTOCOLS.index("http1"): (_http_request, _http_response),
    EXCHANGE_PROTOCOLS.index("redis"): (_redis_request, _redis_response),
}


class ExchangeSpans:
    """Turns arrays of exchange events into spans; keeps bounded caches between batches."""

    def __init__(self, host: str, service_name: Callable[[int, str], str]) -> None:
        self.host = host
        self.service_name = service_name
        self._endpoints: dict[tuple[int, int], tuple[Endpoint, str]] = {}  # -> (endpoint, span kind)
        self._requests: dict[tuple[int, bytes], Request] = {}
        self._responses: dict[tuple[int, bytes, int], Response] = {}

    def spans(self, events: np.ndarray, wall_offset_ns: int) -> list[Span]:
        if not len(events):
            return []
        wall = np.int64(wall_offset_ns)
        start = (events["start_ns"].astype(np.int64) + wall).tolist()
        end = (events["end_ns"].astype(np.int64) + wall).tolist()
        tgid, conn = events["tgid"].tolist(), events["conn_id"].tolist()
        req_tid, resp_tid = events["req_tid"].tolist(), events["resp_tid"].tolist()
        req_seq, resp_seq = events["req_seq"].tolist(), events["resp_seq"].tolist()
        req_size, resp_size = events["req_size"].tolist(), events["resp_size"].tolist()
        protocol, status = events["protocol"].tolist(), events["status"].tolist()
        req_heads, resp_heads = events["req_head"].tolist(), events["resp_head"].tolist()
        req_len, resp_len = events["req_captured"].tolist(), events["resp_captured"].tolist()
        endpoints, requests, responses = self._endpoints, self._requests, self._responses
        out = []
        for i in range(len(start)):
            key = (tgid[i], conn[i])
            endpoint, kind = endpoints.get(key) or self._endpoint(key, events[i])
            req_key = (protocol[i], req_heads[i][: req_len[i]])
            req = requests.get(req_key) or self._request(req_key)
            resp_key = (protocol[i], resp_heads[i][: resp_len[i]], status[i])
            resp = responses.get(resp_key) or self._response(resp_key)
            out.append(Span(kind, req[1], req[0], endpoint, start[i], end[i], resp[0], resp[1], req_tid[i], resp_tid[i],
                            req_size[i], resp_size[i], (req_seq[i], (req_seq[i] + req_size[i]) & _SEQ),
                            (resp_seq[i], (resp_seq[i] + resp_size[i]) & _SEQ), {**req[2], **resp[2]}, req[3],
                            resp[3]))  # fmt: skip
        return out

    def _endpoint(self, key: tuple[int, int], event) -> tuple[Endpoint, str]:
        if len(self._endpoints) >= _CACHE_LIMIT:
            self._endpoints.clear()
        family = socket.AF_INET6 if int(event["family"]) == socket.AF_INET6 else socket.AF_INET
        width = 16 if family == socket.AF_INET6 else 4
        comm = bytes(event["comm"]).split(b"\0", 1)[0].decode(errors="replace")
        endpoint = Endpoint(self.service_name(key[0], comm), self.host, key[0],
                            socket.inet_ntop(family, bytes(event["laddr"])[:width]), int(event["lport"]),
                            socket.inet_ntop(family, bytes(event["raddr"])[:width]), int(event["rport"]), key[1])  # fmt: skip
        self._endpoints[key] = known = (endpoint, "SERVER" if int(event["role"]) == _ROLE_SERVER else "CLIENT")
        return known

    def _request(self, key: tuple[int, bytes]) -> Request:
        if len(self._requests) >= _CACHE_LIMIT:
            self._requests.clear()
        self._requests[key] = parts = _SIDES[key[0]][0](key[1])
        return parts

    def _response(self, key: tuple[int, bytes, int]) -> Response:
        if len(self._responses) >= _CACHE_LIMIT:
            self._responses.clear()
        self._responses[key] = parts = _SIDES[key[0]][1](key[1], key[2])
        return parts
