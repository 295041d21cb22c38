"""Records -> ordered streams -> protocol messages -> paired spans, per connection.

Everything here is plain Python over plain data: the live agent feeds it records
from the kernel, tests feed it hand-made ones. Memory is bounded: connections
(least recently active dropped first), requests waiting per connection, bytes
buffered per direction by the parsers.
"""

from __future__ import annotations

import gc
import operator
import socket
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from deeptrace import protocols
from deeptrace.capture.exchanges import ExchangeSpans
from deeptrace.capture.records import (
    EXCHANGE_PROTOCOLS,
    FLAG_HANDED_OVER,
    FLAG_TLS,
    TLS_LIBRARIES,
    XFLAG_CLOSED,
    XFLAG_DATAGRAM,
    XFLAG_UNANSWERED,
    Record,
)
from deeptrace.capture.spans import (
    PEER_SERVICE,
    SAMPLING_WEIGHT,
    TLS,
    TLS_LIBRARY,
    Endpoint,
    Pairing,
    ProcessInfo,
    Span,
    SpanJson,
    comm_only,
    make_span,
)
from deeptrace.capture.streams import OrderedStream
from deeptrace.protocols.base import ConnectionParser, Message

MAX_CONNECTIONS = 65536
MAX_TIMED_OUT = 65536  # kernel-held requests reported as timed out, remembered to drop a late response
# Why a request has no response when a later one took its place (one of the same id, or past the bound),
# and when its connection closed first.
DISPLACED = "too many requests waiting"
CLOSED = "connection closed"
DETECT_GIVE_UP_BYTES = 4096
# A connection moves to the back of the eviction order at most this often: every
# record would be exact, and costs more than the order is worth.
RECENCY_NS = 1_000_000_000  # a connection none of the parsers recognised by then is ignored


@dataclass
class PipelineStats:
    records: int = 0
    exchanges: int = 0  # request/response pairs the kernel assembled
    messages: int = 0
    spans: int = 0
    unanswered: int = 0  # requests that got no response (timeout, close, bound)
    orphan_responses: int = 0  # responses with no request waiting
    connections_evicted: int = 0
    undetected_connections: int = 0
    holes: int = 0


@dataclass
class _Connection:
    endpoint: Endpoint
    l4: str
    streams: dict[str, OrderedStream]
    parser: ConnectionParser | None = None
    request_direction: str | None = None  # "ingress" on the server side, "egress" on the client side
    unknown_bytes: int = 0
    undetected: list = field(default_factory=list)  # (direction, chunk) seen before the protocol was known
    ignored: bool = False
    pairing: Pairing = field(default_factory=Pairing)
    last_ns: int = 0
    sample_shift: int = 0  # the kernel kept it with probability 1/2^sample_shift
    tls_library: str | None = None  # its bytes are a TLS library's plaintext ("openssl", "gnutls", "go")

    @property
    def kind(self) -> str:
        return "SERVER" if self.request_direction == "ingress" else "CLIENT"


class SpanPipeline:
    def __init__(self, host: str | None = None, timeout_ns: int = 30_000_000_000,
                 process_info: Callable[[int, str], ProcessInfo] = comm_only,
                 peer_name: Callable[[str], str | None] | None = None) -> None:  # fmt: skip
        self.host = host or socket.gethostname()
        self.process_info = process_info  # (pid, comm) -> service and where it runs
        self.peer_name = peer_name  # remote address -> its name (a Kubernetes pod or Service)
        self._with_peer: dict[tuple[int, str], tuple[tuple, tuple]] = {}  # (id(resource), peer) -> (resource, with it)
        self.timeout_ns = timeout_ns
        self.stats = PipelineStats()
        self._conns: OrderedDict[tuple, _Connection] = OrderedDict()
        # UDP: (tgid, conn id) -> the keys of its peers' connections, which its close ends.
        self._peers: dict[tuple[int, int], set[tuple]] = {}
        self._exchanges = ExchangeSpans(self.endpoint)
        self._timed_out: dict[tuple[int, int], None] = {}  # (conn id, request seq) of expire_exchanges

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def push(self, records: list[Record]) -> list[Span]:
        """Spans completed by these records (in any order; sorted by time here)."""
        # Messages and spans form no reference cycles; pausing the cyclic collector
        # while a batch is processed saves it scanning them again and again.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._push(records)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _push(self, records: list[Record]) -> list[Span]:
        spans: list[Span] = []
        conns = self._conns
        if any(rec.flags & FLAG_HANDED_OVER for rec in records):
            records = self._handed_over(records, spans)
        self.stats.records += len(records)
        for rec in _in_order(records):
            key = _key(rec)
            if rec.syscall == "close":
                # A UDP socket's close ends the exchanges of every peer it talked to.
                for closed in [key] if rec.l4 == "tcp" else self._peers.pop(key[:2], ()):
                    conn = conns.pop(closed, None)
                    if conn is not None:
                        self._close(conn, rec.exit_ns, spans)
                continue
            if rec.direction is None:
                continue  # connect / accept: the connection's role is in every record
            conn = conns.get(key)
            if conn is None:
                conn = self._open(key, rec, spans)
            elif rec.exit_ns - conn.last_ns > RECENCY_NS:
                conns.move_to_end(key)  # least recently active first, to within RECENCY_NS
            conn.last_ns = rec.exit_ns
            if rec.flags & FLAG_TLS and conn.tls_library is None:
                self._decrypted(conn, rec)
            if conn.ignored:
                continue
            for chunk in conn.streams[rec.direction].push(rec, rec.exit_ns):
                self._feed(conn, rec.direction, chunk, spans)
        return spans

    def _handed_over(self, records: list[Record], spans: list[Span]) -> list[Record]:
        """A connection the kernel framed and hands over from now on is parsed as the protocol
        it framed it as, whatever its next bytes look like. The marks go; the rest stays."""
        for rec in records:
            if rec.flags & FLAG_HANDED_OVER and rec.msg_index < len(EXCHANGE_PROTOCOLS):
                key = _key(rec)
                conn = self._conns.get(key) or self._open(key, rec, spans)
                if conn.parser is None and not conn.undetected:
                    conn.parser = protocols.parser_for(_FRAMED_AS[EXCHANGE_PROTOCOLS[rec.msg_index]])
        return [rec for rec in records if not rec.flags & FLAG_HANDED_OVER]

    def push_exchanges(self, events, wall_offset_ns: int) -> list[Span]:
        """Spans of exchanges the kernel assembled (an array of records.exchange_dtype; its
        times are CLOCK_MONOTONIC, which wall_offset_ns turns into wall-clock time)."""
        return self._from_exchanges(self._exchanges.spans, events, wall_offset_ns)

    def expire_exchanges(self, events, req_end_ns: list[int], wall_offset_ns: int,
                         reason: str = "timeout") -> list[Span]:  # fmt: skip
        """Error spans for requests the kernel holds that waited longer than the timeout, or
        that the agent stopping ends (Collector.waiting_exchanges); their responses, if they
        come after all, make no span (as a late response makes none on the records path).
        Each request is reported once, however many sweeps find it still waiting."""
        keys = list(zip(events["conn_id"].tolist(), events["req_seq"].tolist()))
        # A DNS query is taken out of the kernel when reported (Collector.waiting_exchanges);
        # a TCP request stays until its response or its connection's next exchange.
        stream = ((events["flags"] & XFLAG_DATAGRAM) == 0).tolist()
        new = [key not in self._timed_out for key in keys]
        events, req_end_ns = events[np.array(new, dtype=bool)], [e for e, n in zip(req_end_ns, new) if n]
        for key, n, s in zip(keys, new, stream):
            if n and s:
                self._timed_out[key] = None
        while len(self._timed_out) > MAX_TIMED_OUT:
            self._timed_out.pop(next(iter(self._timed_out)))
        spans = self._exchanges.unanswered(events, req_end_ns, wall_offset_ns, reason)
        self.stats.unanswered += len(spans)
        self.stats.spans += len(spans)
        return spans

    def push_exchanges_json(self, events, wall_offset_ns: int) -> list[SpanJson]:
        """The same spans as push_exchanges, as the agent writes them (Span.to_json), made
        without the Span objects: the fast path to JSON lines."""
        return self._from_exchanges(self._exchanges.json, events, wall_offset_ns)

    def _from_exchanges(self, make, events, wall_offset_ns: int) -> list:
        if self._timed_out and len(events):
            late = [(c, s) in self._timed_out for c, s in zip(events["conn_id"].tolist(), events["req_seq"].tolist())]
            if any(late):
                self.stats.orphan_responses += sum(late)
                events = events[~np.array(late)]
        alone: list[Span] = []
        unanswered = (events["flags"] & XFLAG_UNANSWERED) != 0
        if unanswered.any():  # requests the kernel ended alone, as _message and _close end them
            closed = (events["flags"] & XFLAG_CLOSED) != 0
            for which, reason in ((unanswered & ~closed, DISPLACED), (unanswered & closed, CLOSED)):
                held = events[which]
                alone += self._exchanges.unanswered(held, held["end_ns"].tolist(), wall_offset_ns, reason)
            self.stats.unanswered += len(alone)
            events = events[~unanswered]
            if make == self._exchanges.json:
                alone = [s.to_json() for s in alone]
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            spans = make(events, wall_offset_ns)
        finally:
            if gc_was_enabled:
                gc.enable()
        self.stats.exchanges += len(events) + len(alone)
        self.stats.spans += len(spans) + len(alone)
        return alone + spans

    def flush(self, now_ns: int) -> list[Span]:
        """Periodic work: overdue reorder waits become holes; unanswered requests time out."""
        spans: list[Span] = []
        for conn in list(self._conns.values()):
            for direction, stream in conn.streams.items():
                self._deliver(conn, direction, stream.expire(now_ns), spans)
            for req in conn.pairing.expired(now_ns, self.timeout_ns):
                self._unanswered(conn, req, "timeout", spans)
        return spans

    def close_all(self, now_ns: int) -> list[Span]:
        spans: list[Span] = []
        self._peers.clear()
        while self._conns:
            _, conn = self._conns.popitem(last=False)
            self._close(conn, now_ns, spans, reason="agent stopped")
        return spans

    # ---- internals ----

    def _open(self, key: tuple, rec: Record, spans: list[Span]) -> _Connection:
        if len(self._conns) >= MAX_CONNECTIONS:
            evicted, oldest = self._conns.popitem(last=False)
            self.stats.connections_evicted += 1
            self._forget_peer(evicted)
            self._close(oldest, rec.exit_ns, spans, reason="evicted")
        if len(key) > 2:
            self._peers.setdefault(key[:2], set()).add(key)
        endpoint = self.endpoint(rec.tgid, rec.comm, rec.laddr, rec.lport, rec.raddr, rec.rport, rec.conn_id,
                                 client=rec.role == "client")  # fmt: skip
        conn = _Connection(endpoint, rec.l4, {d: OrderedStream(self.stats) for d in ("ingress", "egress")},
                           sample_shift=rec.sample_shift)  # fmt: skip
        if rec.role in ("client", "server"):
            conn.request_direction = "ingress" if rec.role == "server" else "egress"
        self._conns[key] = conn
        return conn

    def endpoint(self, pid: int, comm: str, laddr: str, lport: int, raddr: str, rport: int, conn_id: int,
                 client: bool = False) -> Endpoint:  # fmt: skip
        """One side of a connection, named: its process's service and resource, and for a client
        its peer's name (OpenTelemetry's peer.service: the service a call went to)."""
        info = self.process_info(pid, comm)
        resource = info.resource
        peer = self.peer_name(raddr) if client and self.peer_name is not None else None
        if peer:
            # One tuple per (process resource, peer), not per connection: the exchange path
            # caches encoded attributes by resource.
            key = (id(resource), peer)
            hit = self._with_peer.get(key)
            if hit is None or hit[0] is not resource:
                if len(self._with_peer) >= 4096:
                    self._with_peer.clear()
                hit = self._with_peer[key] = (resource, (*resource, (PEER_SERVICE, peer)))
            resource = hit[1]
        return Endpoint(info.service, self.host, pid, laddr, lport, raddr, rport, conn_id, resource)

    def _decrypted(self, conn: _Connection, rec: Record) -> None:
        """The connection's first plaintext from a TLS library: what came before on it was the
        protocol's own request for TLS (read as such) or ciphertext (never recognised)."""
        conn.tls_library = TLS_LIBRARIES.get(rec.syscall, rec.syscall)
        if conn.parser is not None:
            conn.parser.decrypted()
        else:
            conn.ignored, conn.undetected, conn.unknown_bytes = False, [], 0

    def _forget_peer(self, key: tuple) -> None:
        peers = self._peers.get(key[:2]) if len(key) > 2 else None
        if peers is not None:
            peers.discard(key)
            if not peers:
                del self._peers[key[:2]]

    def _deliver(self, conn: _Connection, direction: str, chunks, spans: list[Span]) -> None:
        for chunk in chunks:
            self._feed(conn, direction, chunk, spans)

    def _feed(self, conn: _Connection, direction: str, chunk, spans: list[Span]) -> None:
        if conn.parser is not None:
            self._parse(conn, direction, chunk, spans)
            return
        # Not recognised yet: keep the first bytes (a message can start with a 1-byte
        # read), try again on all of them, and replay them once a parser is found.
        conn.undetected.append((direction, chunk))
        conn.unknown_bytes += chunk.size
        data = b"".join(c.data for d, c in conn.undetected if d == direction)
        if data and self._detect(conn, direction, data):
            waiting, conn.undetected = conn.undetected, []
            for d, c in waiting:
                self._parse(conn, d, c, spans)
        elif conn.unknown_bytes > DETECT_GIVE_UP_BYTES:
            conn.ignored = True
            conn.undetected = []
            self.stats.undetected_connections += 1

    def _parse(self, conn: _Connection, direction: str, chunk, spans: list[Span]) -> None:
        is_request = direction == conn.request_direction
        for msg in conn.parser.feed(is_request, chunk):
            self._message(conn, msg, spans)

    def _message(self, conn: _Connection, msg, spans: list[Span]) -> None:
        self.stats.messages += 1
        if msg.is_request and not msg.expects_response:
            self._emit(conn, make_span(conn.kind, conn.endpoint, msg, None), spans)
        elif msg.is_request:
            for dropped in conn.pairing.request(msg):
                self._unanswered(conn, dropped, DISPLACED, spans)
        else:
            self._response(conn, msg, spans)

    def _detect(self, conn: _Connection, direction: str, data: bytes) -> bool:
        if conn.request_direction is None:
            found = protocols.detect(data, None, conn.l4)
            if found is not None:
                conn.request_direction = direction if found[2] else _other(direction)
        else:
            found = protocols.detect(data, direction == conn.request_direction, conn.l4)
        if found is None:
            return False
        conn.parser = found[1]
        return True

    def _response(self, conn: _Connection, msg: Message, spans: list[Span]) -> None:
        req = conn.pairing.response(msg)
        if req is None:
            self.stats.orphan_responses += 1
            return
        self._emit(conn, make_span(conn.kind, conn.endpoint, req, msg), spans)

    def _unanswered(self, conn: _Connection, req: Message, reason: str, spans: list[Span]) -> None:
        self._emit(conn, make_span(conn.kind, conn.endpoint, req, None, reason), spans)
        self.stats.unanswered += 1

    def _emit(self, conn: _Connection, span: Span, spans: list[Span]) -> None:
        if conn.sample_shift:
            span.attributes[SAMPLING_WEIGHT] = 1 << conn.sample_shift
        if conn.tls_library:
            span.attributes[TLS] = True
            span.attributes[TLS_LIBRARY] = conn.tls_library
        if conn.endpoint.resource:
            span.attributes.update(conn.endpoint.resource)
        spans.append(span)
        self.stats.spans += 1

    def _close(self, conn: _Connection, now_ns: int, spans: list[Span], reason: str = CLOSED) -> None:
        for direction, stream in conn.streams.items():  # nothing more will come: all waits are over
            self._deliver(conn, direction, stream.expire(now_ns + 2 * 10**18), spans)
        if conn.parser is not None:
            for msg in conn.parser.close(now_ns):  # a message the close ended (a request, too)
                self._message(conn, msg, spans)
        for req in conn.pairing.drain():
            self._unanswered(conn, req, reason, spans)


_EXIT_NS = operator.attrgetter("exit_ns")


def _order_ns(rec: Record) -> int:
    # A TLS library's write returns to its caller some time after its bytes left (a goroutine
    # can be descheduled in between, and the answer read meanwhile): by its start, a request
    # comes before its response.
    return rec.enter_ns if rec.flags & FLAG_TLS and rec.direction == "egress" else rec.exit_ns


def _key(rec: Record) -> tuple:
    # An unconnected UDP socket talks to many peers: each is a connection of its own.
    return (rec.tgid, rec.conn_id) if rec.l4 == "tcp" else (rec.tgid, rec.conn_id, rec.raddr, rec.rport)


# The protocol module each kernel-framed protocol (records.EXCHANGE_PROTOCOLS) is parsed by.
_FRAMED_AS = {"http1": protocols.http1.PROTOCOL, "redis": protocols.redis.PROTOCOL,
              "memcached": protocols.memcached.PROTOCOL}  # fmt: skip


def _in_order(records: list[Record]) -> list[Record]:
    """Records by time, except that each TCP direction is in sequence order.

    Each direction's records keep the places its records hold in time order, but
    are put into those places by seq: a read that returned later on another CPU
    can have reached the ring first."""
    ordered = sorted(records, key=_order_ns if any(r.flags & FLAG_TLS for r in records) else _EXIT_NS)
    places: dict[tuple, list[int]] = {}
    for i, r in enumerate(ordered):
        if r.direction is not None and r.l4 == "tcp":
            key = (r.tgid, r.conn_id, r.direction)
            if key in places:
                places[key].append(i)
            else:
                places[key] = [i]
    for idxs in places.values():
        if len(idxs) > 1:
            base = ordered[idxs[0]].enter_seq
            by_seq = sorted((ordered[i] for i in idxs), key=lambda r: (r.enter_seq - base + 2**31) % 2**32)
            for i, r in zip(idxs, by_seq):
                ordered[i] = r
    return ordered


def _other(direction: str) -> str:
    return "egress" if direction == "ingress" else "ingress"
