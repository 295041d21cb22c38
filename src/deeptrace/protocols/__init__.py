"""Protocol parsers, one module each: detection by content, framing, fields.

`detect` picks the protocol of a connection from its first bytes in either
direction; the port is never consulted.
"""

from __future__ import annotations

from collections.abc import Callable

from deeptrace.protocols import http1, redis
from deeptrace.protocols.base import Chunk, ConnectionParser, Message

# (name, looks like its request, looks like its response, parser factory), most specific first.
PROTOCOLS: tuple[tuple[str, Callable[[bytes], bool], Callable[[bytes], bool], Callable[[], ConnectionParser]], ...] = (
    (http1.PROTOCOL, http1.starts_request, http1.starts_response, http1.Http1Connection),
    (redis.PROTOCOL, redis.starts_request, lambda data: False, redis.RedisConnection),
)


def detect(data: bytes, is_request: bool | None) -> tuple[str, ConnectionParser, bool] | None:
    """(protocol, parser, whether data is a request) for a connection's first bytes, or None.

    is_request is None when the connection's role is unknown (it predates the agent):
    then the bytes tell which side they are. Responses alone are only trusted for
    protocols whose responses are unmistakable (HTTP's status line)."""
    for name, req, resp, factory in PROTOCOLS:
        if is_request is not False and req(data):
            return name, factory(), True
        if is_request is not True and resp(data):
            return name, factory(), False
    return None


__all__ = ["PROTOCOLS", "Chunk", "ConnectionParser", "Message", "detect"]
