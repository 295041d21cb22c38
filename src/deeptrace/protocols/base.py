"""What every protocol parser produces and consumes: plain data, no I/O.

A parser sees one connection as two byte streams, the request side and the
response side, delivered in order as `Chunk`s (the bytes one syscall moved) and
`Hole`s (bytes that moved but were not captured). It returns `Message`s.
"""

from __future__ import annotations

from dataclasses import dataclass, field


# A request attribute: this exchange readies its connection for the exchange that follows
# (Redis HELLO/AUTH on a new connection, a statement prepared just before its execution),
# so it serves whichever request that next exchange serves (association reads it).
CONNECTION_SETUP = "deeptrace.connection_setup"


@dataclass(slots=True)
class Chunk:
    """Bytes of one direction of a connection, as one syscall moved them."""

    data: bytes  # captured bytes; the call moved `size` bytes in all
    size: int
    start_ns: int  # when the first byte moved (write enter, or read exit)
    end_ns: int  # when the call returned
    tid: int
    seq: int | None = None  # TCP sequence number of data[0], if TCP


@dataclass(slots=True)
class Message:
    """One request or one response, framed from a stream."""

    protocol: str
    is_request: bool
    start_ns: int
    end_ns: int
    size: int  # bytes on the wire, captured or not
    tid_start: int  # thread that moved the first byte
    tid_end: int  # thread that moved the last byte
    seq_start: int | None = None
    seq_end: int | None = None
    # Request: an operation name as an operator reads it ("GET /users/{id}", "redis GET").
    # Response: None.
    name: str | None = None
    error: bool = False  # responses: the protocol says the request failed
    status_code: str | None = None  # "404", "ERR", "NXDOMAIN", ...
    pair_key: object | None = None  # protocol id that pairs request and response; None = in order
    attributes: dict = field(default_factory=dict)
    head: bytes = b""  # first captured bytes, secrets redacted
    partial: bool = False  # some of its bytes were not captured
    expects_response: bool = True  # False: a one-way request (memcached noreply, quiet commands)


def message_from(framed, protocol: str, is_request: bool, **kw) -> Message:
    """A Message for a framed stretch of stream (`framing.Framed`)."""
    seq = framed.seq_start
    # Positional: this runs for every message, and keyword passing costs more.
    return Message(protocol, is_request, framed.start_ns, framed.end_ns, framed.size, framed.tid_start,
                   framed.tid_end, seq, None if seq is None else (seq + framed.size) & 0xFFFFFFFF,
                   partial=framed.partial, **kw)  # fmt: skip


def message_from_parts(parts: list, protocol: str, is_request: bool, **kw) -> Message:
    """One Message for several framed pieces (wire messages, packets, frames) in order:
    from the first byte's time to the last byte's, sizes added up."""
    first, last = parts[0], parts[-1]
    msg = message_from(first, protocol, is_request, **kw)
    msg.end_ns, msg.tid_end = last.end_ns, last.tid_end
    msg.size = sum(p.size for p in parts)
    msg.partial = any(p.partial for p in parts)
    if msg.seq_start is not None:
        msg.seq_end = (msg.seq_start + msg.size) & 0xFFFFFFFF
    return msg


class ConnectionParser:
    """One connection's protocol state: both directions, and what one tells the other."""

    protocol = "?"

    def feed(self, is_request: bool, chunk: Chunk) -> list[Message]:
        raise NotImplementedError

    def close(self, end_ns: int) -> list[Message]:
        return []

    def decrypted(self) -> None:
        """What follows is the plaintext a TLS library handed over, after the protocol's own
        switch to TLS (PostgreSQL's SSLRequest, MySQL's SSL request), from which on a parser of
        the wire bytes sees only ciphertext and reads nothing."""
