"""Exchanges the kernel assembled -> spans, a batch at a time.

For the protocols it can frame (agent/bpf/deeptrace.bpf.c: HTTP/1, Redis, Memcached text, DNS over
UDP), the kernel pairs
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

import msgspec
import numpy as np

from deeptrace.capture.records import EXCHANGE_PROTOCOLS, XFLAG_DATAGRAM
from deeptrace.capture.spans import NO_RESPONSE, SAMPLING_WEIGHT, Endpoint, Span, SpanJson, b64_head, new_id
from deeptrace.protocols import dns, http1, memcached, redis
from deeptrace.protocols.redaction import redact_span_parts

_CACHE_LIMIT = 4096  # distinct heads (and connections) remembered
_ENCODER = msgspec.json.Encoder()
_ROLE_SERVER = 2  # enum dt_role

# What a span takes from each side of an exchange, made once per distinct head:
# request -> (protocol, name, attributes, redacted head);
# response -> (status, status code, attributes, redacted head).
Request = tuple[str, str, dict, bytes]
Response = tuple[str, str | None, dict, bytes]


def _request_side(protocol: str, head: bytes, name: str, attrs: dict) -> Request:
    redacted, _ = redact_span_parts(protocol, attrs, head, b"")
    return protocol, name, attrs, redacted


def _response_side(protocol: str, head: bytes, status: str, code: str | None, attrs: dict) -> Response:
    _, redacted = redact_span_parts(protocol, attrs, b"", head)
    return status, code, attrs, redacted


def _http_request(head: bytes) -> Request:
    fields = http1.request_head_fields(head)
    if not fields:
        return _request_side(http1.PROTOCOL, head, "http", {})
    return _request_side(http1.PROTOCOL, head, http1.request_name(fields), http1.request_attributes(fields))


def _http_response(head: bytes, status: int) -> Response:
    fields = http1.response_head_fields(head)
    attrs = http1.response_attributes(fields) if fields else {"http.response.status_code": status}
    return _response_side(http1.PROTOCOL, head, "error" if status >= 400 else "ok", str(status), attrs)


def _redis_request(head: bytes) -> Request:
    fields = redis.request_head_fields(head)
    if not fields:
        return _request_side(redis.PROTOCOL, head, "redis", {})
    return _request_side(redis.PROTOCOL, head, f"redis {fields['command']}", redis.request_attributes(fields))


def _redis_response(head: bytes, error: int) -> Response:
    fields = redis.reply_head_fields(head) or {"type": "error" if error else "?"}
    failed = fields["type"] == "error"
    return _response_side(redis.PROTOCOL, head, "error" if failed else "ok",
                     fields.get("error_code", "ERR") if failed else None, redis.reply_attributes(fields))  # fmt: skip


def _memcached_request(head: bytes) -> Request:
    fields = memcached.request_head_fields(head)
    if not fields:
        return _request_side(memcached.PROTOCOL, head, "memcached", {})
    name = f"memcached {fields['command'].lower()}"
    return _request_side(memcached.PROTOCOL, head, name, memcached.request_attributes(fields))


def _memcached_response(head: bytes, values: int) -> Response:
    fields = memcached.reply_head_fields(head, values) or {"reply": "?", "values": values}
    return _response_side(memcached.PROTOCOL, head, "error" if "error" in fields else "ok", fields["reply"],
                     memcached.reply_attributes(fields))  # fmt: skip


# DNS heads come without their first two bytes, the message id (see _Columns): the rest
# repeats query after query, the id does not; it goes back into each span's attributes and
# heads (_with_id).
_DNS_ID = "dns.id"


def _dns_fields(head: bytes) -> dict | None:
    # The kernel checked the header against the whole datagram; the head may be less of it.
    return dns.parse(b"\0\0" + head, size=0xFFFF)


def _dns_request(head: bytes) -> Request:
    fields = _dns_fields(head)
    if not fields:
        return _request_side(dns.PROTOCOL, head, "DNS", {})
    attrs = dns.request_attributes(fields)
    del attrs[_DNS_ID]
    return _request_side(dns.PROTOCOL, head, dns.span_name(fields), attrs)


def _dns_response(head: bytes, rcode: int) -> Response:
    fields = _dns_fields(head)
    attrs = dns.response_attributes(fields) if fields else {"dns.response.code": dns.RCODES.get(rcode, str(rcode))}
    attrs.pop(_DNS_ID, None)
    return _response_side(dns.PROTOCOL, head, "error" if rcode else "ok", attrs["dns.response.code"], attrs)


def _with_id(attrs: dict | msgspec.Raw, ident: int) -> dict | msgspec.Raw:
    """A DNS span's attributes with its id first, where the records path has it."""
    if isinstance(attrs, dict):
        return {_DNS_ID: ident, **attrs}
    rest = bytes(attrs)[1:]  # encoded: '{' and the rest
    return msgspec.Raw(b'{"dns.id":%d%s' % (ident, rest if rest == b"}" else b"," + rest))


_DNS = EXCHANGE_PROTOCOLS.index("dns")

# By enum dt_xproto.
_SIDES: dict[int, tuple[Callable[[bytes], Request], Callable[[bytes, int], Response]]] = {
    EXCHANGE_PROTOCOLS.index("http1"): (_http_request, _http_response),
    EXCHANGE_PROTOCOLS.index("redis"): (_redis_request, _redis_response),
    EXCHANGE_PROTOCOLS.index("memcached"): (_memcached_request, _memcached_response),
    _DNS: (_dns_request, _dns_response),
}


def _attributes(req: Request, resp: Response, sample_shift: int, resource: tuple = ()) -> dict:
    attrs = {**req[2], **resp[2]}
    if sample_shift:
        attrs[SAMPLING_WEIGHT] = 1 << sample_shift
    if resource:
        attrs.update(resource)
    return attrs


def _identified(ident: bytes, attrs, req_head: bytes, resp_head: bytes) -> tuple:
    """A DNS span's attributes and heads with its id, which the caches left out."""
    return (_with_id(attrs, int.from_bytes(ident, "big")), ident + req_head,
            ident + resp_head if resp_head else resp_head)  # fmt: skip


def _pair(r: list[int] | None) -> tuple[int, int] | None:
    return None if r is None else (r[0], r[1])


class _Columns:
    """A batch of events as Python lists, one per field the spans take: one conversion in C
    per column, not one Python object per event."""

    def __init__(self, events: np.ndarray, wall_offset_ns: int) -> None:
        wall = np.int64(wall_offset_ns)
        self.n = len(events)
        self.start = (events["start_ns"].astype(np.int64) + wall).tolist()
        self.end = (events["end_ns"].astype(np.int64) + wall).tolist()
        self.tgid, self.conn = events["tgid"].tolist(), events["conn_id"].tolist()
        self.req_tid, self.resp_tid = events["req_tid"].tolist(), events["resp_tid"].tolist()
        req_seq, resp_seq = events["req_seq"].tolist(), events["resp_seq"].tolist()
        self.req_size, self.resp_size = events["req_size"].tolist(), events["resp_size"].tolist()
        # Each message's TCP byte range (uint32 arithmetic wraps as sequence numbers do), and
        # the key of its connection's endpoint; a datagram has no range, and its socket's
        # peer is the one it came from or went to.
        req_ranges = [[s, e] for s, e in zip(req_seq, (events["req_seq"] + events["req_size"]).tolist())]
        resp_ranges = [[s, e] for s, e in zip(resp_seq, (events["resp_seq"] + events["resp_size"]).tolist())]
        self.key = list(zip(self.tgid, self.conn))
        datagrams = np.flatnonzero(events["flags"] & XFLAG_DATAGRAM).tolist()
        for i in datagrams:
            req_ranges[i] = resp_ranges[i] = None
            self.key[i] = (self.tgid[i], self.conn[i], int(events["rport"][i]), bytes(events["raddr"][i]))
        self.req_range, self.resp_range = req_ranges, resp_ranges
        self.protocol, self.status = events["protocol"].tolist(), events["status"].tolist()
        self.req_head, self.resp_head = events["req_head"].tolist(), events["resp_head"].tolist()
        self.req_len, self.resp_len = events["req_captured"].tolist(), events["resp_captured"].tolist()
        self.shift = events["sample_shift"].tolist()
        # DNS: each head without its id (kept here, as bytes), so that heads repeat and hit the caches.
        self.ident: list[bytes | None] | None = None
        dns_rows = np.flatnonzero(events["protocol"] == _DNS).tolist()
        if dns_rows:
            self.ident = [None] * self.n
            for i in dns_rows:
                self.ident[i] = self.req_head[i][:2]
                self.req_head[i], self.resp_head[i] = self.req_head[i][2:], self.resp_head[i][2:]
                self.req_len[i], self.resp_len[i] = max(0, self.req_len[i] - 2), max(0, self.resp_len[i] - 2)


class ExchangeSpans:
    """Turns arrays of exchange events into spans; keeps bounded caches between batches."""

    def __init__(self, endpoint: Callable[..., Endpoint]) -> None:
        self.endpoint = endpoint  # (pid, comm, laddr, lport, raddr, rport, conn id) -> Endpoint (the pipeline's)
        self._endpoints: dict[tuple[int, int], tuple[Endpoint, str]] = {}  # -> (endpoint, span kind)
        self._requests: dict[tuple[int, bytes], Request] = {}
        self._responses: dict[tuple[int, bytes, int], Response] = {}
        # (request key, response key, shift, id of the endpoint's resource) -> (that resource,
        # encoded): by id, as hashing a resource's tuple per span cost a fifth of this path; the
        # value holds the resource, so its id is not reused while the entry lives.
        self._attributes: dict[tuple, dict | msgspec.Raw] = {}

    def spans(self, events: np.ndarray, wall_offset_ns: int) -> list[Span]:
        c = _Columns(events, wall_offset_ns)
        out = []
        for i, endpoint, kind, _, req, _, resp in self._sides(c, events):
            attrs, req_head, resp_head = _attributes(req, resp, c.shift[i], endpoint.resource), req[3], resp[3]
            if c.ident is not None and c.ident[i] is not None:
                attrs, req_head, resp_head = _identified(c.ident[i], attrs, req_head, resp_head)
            out.append(Span(kind, req[1], req[0], endpoint, c.start[i], c.end[i], resp[0], resp[1], c.req_tid[i],
                            c.resp_tid[i], c.req_size[i], c.resp_size[i], _pair(c.req_range[i]),
                            _pair(c.resp_range[i]), attrs, req_head, resp_head))  # fmt: skip
        return out

    def json(self, events: np.ndarray, wall_offset_ns: int) -> list[SpanJson]:
        """What `[s.to_json() for s in self.spans(...)]` gives, without the Span objects, and
        with the attributes of each distinct pair of heads encoded once: the agent's path when
        it writes JSON lines."""
        c = _Columns(events, wall_offset_ns)
        attributes = self._attributes
        ids = new_id(24 * c.n)  # a trace id and a span id each
        out = []
        idents = c.ident
        for i, e, kind, req_key, req, resp_key, resp in self._sides(c, events):
            shift = c.shift[i]
            hit = attributes.get((req_key, resp_key, shift, id(e.resource)))
            attrs = hit[1] if hit is not None else self._encoded(req_key, resp_key, shift, e.resource, req, resp)
            req_head, resp_head = req[3], resp[3]
            if idents is not None and idents[i] is not None:
                attrs, req_head, resp_head = _identified(idents[i], attrs, req_head, resp_head)
            start, end, at = c.start[i], c.end[i], 48 * i
            out.append(SpanJson(ids[at : at + 32], ids[at + 32 : at + 48], None, kind, req[1], req[0], e.service,
                                e.host, e.pid, c.req_tid[i], c.resp_tid[i], start, end, end - start, resp[0],
                                resp[1], e.laddr, e.lport, e.raddr, e.rport, e.conn_id, c.req_size[i],
                                c.resp_size[i], c.req_range[i], c.resp_range[i], attrs, b64_head(req_head),
                                b64_head(resp_head)))  # fmt: skip
        return out

    def unanswered(self, events: np.ndarray, req_end_ns: list[int], wall_offset_ns: int, reason: str) -> list[Span]:
        """Error spans for requests the kernel holds with no response (events from
        Collector.waiting_exchanges, whose last request bytes moved at req_end_ns), as the
        records path makes them for a request that waited longer than its timeout."""
        c = _Columns(events, wall_offset_ns)
        out = []
        for i in range(c.n):
            key = c.key[i]
            endpoint, kind = self._endpoints.get(key) or self._endpoint(key, events[i])
            req_key = (c.protocol[i], c.req_head[i][: c.req_len[i]])
            req = self._requests.get(req_key) or self._request(req_key)
            attrs, req_head = {**req[2], NO_RESPONSE: reason}, req[3]
            if c.shift[i]:
                attrs[SAMPLING_WEIGHT] = 1 << c.shift[i]
            attrs.update(endpoint.resource)
            if c.ident is not None and c.ident[i] is not None:
                attrs, req_head, _ = _identified(c.ident[i], attrs, req_head, b"")
            out.append(Span(kind, req[1], req[0], endpoint, c.start[i], req_end_ns[i] + wall_offset_ns, "error",
                            reason, c.req_tid[i], None, c.req_size[i], 0, _pair(c.req_range[i]), None, attrs,
                            req_head, b""))  # fmt: skip
        return out

    def _sides(self, c: _Columns, events: np.ndarray):
        """Per event: (index, endpoint, span kind, request key, request, response key, response),
        each looked up in its cache, made on a miss."""
        endpoints, requests, responses = self._endpoints, self._requests, self._responses
        for i in range(c.n):
            key = c.key[i]
            endpoint, kind = endpoints.get(key) or self._endpoint(key, events[i])
            req_key = (c.protocol[i], c.req_head[i][: c.req_len[i]])
            req = requests.get(req_key) or self._request(req_key)
            resp_key = (c.protocol[i], c.resp_head[i][: c.resp_len[i]], c.status[i])
            resp = responses.get(resp_key) or self._response(resp_key)
            yield i, endpoint, kind, req_key, req, resp_key, resp

    def _encoded(self, req_key, resp_key, shift: int, resource: tuple, req: Request, resp: Response) -> dict | msgspec.Raw:
        if len(self._attributes) >= _CACHE_LIMIT:
            self._attributes.clear()
        attrs = _attributes(req, resp, shift, resource)
        try:
            attrs = msgspec.Raw(_ENCODER.encode(attrs))
        except UnicodeEncodeError:
            pass  # lone surrogates: json_lines writes this span as json.dumps does
        self._attributes[(req_key, resp_key, shift, id(resource))] = (resource, attrs)
        return attrs

    def _endpoint(self, key: tuple[int, int], event) -> tuple[Endpoint, str]:
        if len(self._endpoints) >= _CACHE_LIMIT:
            self._endpoints.clear()
        family = socket.AF_INET6 if int(event["family"]) == socket.AF_INET6 else socket.AF_INET
        width = 16 if family == socket.AF_INET6 else 4
        comm = bytes(event["comm"]).split(b"\0", 1)[0].decode(errors="replace")
        endpoint = self.endpoint(key[0], comm, socket.inet_ntop(family, bytes(event["laddr"])[:width]),
                                 int(event["lport"]), socket.inet_ntop(family, bytes(event["raddr"])[:width]),
                                 int(event["rport"]), key[1], client=int(event["role"]) != _ROLE_SERVER)  # fmt: skip
        self._endpoints[key] = known = (
            endpoint,
            "SERVER" if int(event["role"]) == _ROLE_SERVER else "CLIENT",
        )
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
