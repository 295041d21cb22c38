"""Protocol parsers, one module each: detection by content, framing, fields.

`detect` picks the protocol of a connection from its first bytes in either
direction; the port is never consulted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from deeptrace.protocols import (
    amqp,
    dns,
    dubbo,
    http1,
    http2,
    kafka,
    memcached,
    mongodb,
    mqtt,
    mysql,
    nats,
    postgres,
    redis,
    thrift,
)
from deeptrace.protocols.base import Chunk, ConnectionParser, Message


@dataclass(frozen=True)
class ProtocolSpec:
    name: str
    transports: frozenset[str]  # "tcp", "udp"
    is_request: Callable[[bytes], bool]  # do these first bytes look like this protocol's request?
    is_response: Callable[[bytes], bool]  # ... its response (only where that is unmistakable)
    parser: Callable[[str], ConnectionParser]  # transport -> a parser for one connection


# Most specific first.
PROTOCOLS: tuple[ProtocolSpec, ...] = (
    # First: an unfinished `CONNECT {` line is not HTTP's CONNECT, and NATS lines are not Redis inline commands.
    ProtocolSpec(nats.PROTOCOL, frozenset({"tcp"}), nats.starts_request, nats.starts_response,
                 lambda l4: nats.NatsConnection()),
    ProtocolSpec(http1.PROTOCOL, frozenset({"tcp"}), http1.starts_request, http1.starts_response,
                 lambda l4: http1.Http1Connection()),
    ProtocolSpec(http2.PROTOCOL, frozenset({"tcp"}), http2.starts_request, http2.starts_response,
                 lambda l4: http2.Http2Connection()),
    # Before memcached (its binary check takes a strict-binary unframed Thrift call) and Kafka (its
    # check takes an old-binary framed Thrift message).
    ProtocolSpec(thrift.PROTOCOL, frozenset({"tcp"}), thrift.starts_request, thrift.starts_response,
                 lambda l4: thrift.ThriftConnection()),
    ProtocolSpec(dubbo.PROTOCOL, frozenset({"tcp"}), dubbo.starts_request, dubbo.starts_response,
                 lambda l4: dubbo.DubboConnection()),
    # Before PostgreSQL: Kafka Metadata v0 (key 3, version 0) reads as PostgreSQL's protocol 3.0.
    ProtocolSpec(kafka.PROTOCOL, frozenset({"tcp"}), kafka.starts_request, kafka.starts_response,
                 lambda l4: kafka.KafkaConnection()),
    # Before MySQL: a short MongoDB message can look like a MySQL command packet.
    ProtocolSpec(mongodb.PROTOCOL, frozenset({"tcp"}), mongodb.starts_request, mongodb.starts_response,
                 lambda l4: mongodb.MongoConnection()),
    # Before Redis: "get k" is memcached; Redis clients send arrays, and inline Redis is upper case.
    ProtocolSpec(memcached.PROTOCOL, frozenset({"tcp"}), memcached.starts_request, memcached.starts_response,
                 lambda l4: memcached.MemcachedConnection()),
    # Frames checked to their end octet; before MySQL's and DNS's looser length checks.
    ProtocolSpec(amqp.PROTOCOL, frozenset({"tcp"}), amqp.starts_request, amqp.starts_response,
                 lambda l4: amqp.AmqpConnection()),
    # Before PostgreSQL and MySQL: a PUBLISH with a short topic can read as a MySQL COM_QUERY.
    ProtocolSpec(mqtt.PROTOCOL, frozenset({"tcp"}), mqtt.starts_request, mqtt.starts_response,
                 lambda l4: mqtt.MqttConnection()),
    ProtocolSpec(postgres.PROTOCOL, frozenset({"tcp"}), postgres.starts_request, lambda data: False,
                 lambda l4: postgres.PostgresConnection()),
    ProtocolSpec(mysql.PROTOCOL, frozenset({"tcp"}), mysql.starts_request, mysql.starts_response,
                 lambda l4: mysql.MysqlConnection()),
    # Its `+PONG` decides a connection that opened with inline PINGs alone (see detect).
    ProtocolSpec(redis.PROTOCOL, frozenset({"tcp"}), redis.starts_request, redis.unmistakable_response,
                 lambda l4: redis.RedisConnection()),
    ProtocolSpec(dns.PROTOCOL, frozenset({"tcp", "udp"}), lambda data: dns.looks_like(data) is True,
                 lambda data: dns.looks_like(data) is False, lambda l4: dns.DnsConnection(tcp=l4 == "tcp")),
)  # fmt: skip


def detect(data: bytes, is_request: bool | None, l4: str = "tcp") -> tuple[str, ConnectionParser, bool] | None:
    """(protocol, parser, whether data is a request) for a connection's first bytes, or None.

    is_request is None when the connection's role is unknown (it predates the agent,
    or it is an unconnected UDP socket): then the bytes tell which side they are."""
    # Bytes that more than one protocol could have sent: wait for the bytes that tell them apart.
    # HTTP/2 frames joined mid-stream that either side sends; PING/PONG lines alone, as much a Redis
    # inline PING as a NATS keep-alive (nats-py flushes with a PING before its publishes): the answer
    # decides then, Redis's `+PONG` or the NATS line after a bare `PONG`.
    if l4 == "tcp" and (http2.frames_of_either_side(data) or nats.keepalives_only(data)):
        return None
    for spec in PROTOCOLS:
        if l4 not in spec.transports:
            continue
        if is_request is not False and spec.is_request(data):
            return spec.name, spec.parser(l4), True
        if is_request is not True and spec.is_response(data):
            return spec.name, spec.parser(l4), False
    return None


def parser_for(name: str, l4: str = "tcp") -> ConnectionParser:
    """A parser for a connection whose protocol is known without looking (the kernel framed it)."""
    return next(spec for spec in PROTOCOLS if spec.name == name).parser(l4)


__all__ = ["PROTOCOLS", "Chunk", "ConnectionParser", "Message", "ProtocolSpec", "detect", "parser_for"]
