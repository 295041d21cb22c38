"""pricing (gRPC, threaded server of 8 workers): shop.Pricing/Quote sums the items' prices,
read from Redis with one MGET on the worker thread's own connection. Messages are JSON
(generic handlers): the wire format is still real gRPC over HTTP/2."""

from __future__ import annotations

import json
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import redis
from calls import redis as redis_call
from common import CONFIG, redis_options, truth

PORT = CONFIG["ports"]["pricing"]
LOG = truth("pricing")
_local = threading.local()


def cache() -> redis.Redis:
    conn = getattr(_local, "redis", None)
    if conn is None:
        conn = _local.redis = redis.Redis(**redis_options(), single_connection_client=True)
    return conn


def quote(request: dict, context: grpc.ServicerContext) -> dict:
    peer_port = int(context.peer().rsplit(":", 1)[1])  # "ipv4:127.0.0.1:54321"
    key = f"quote:{request['user_id']}:{','.join(request['skus'])}"
    with LOG.serving("grpc Quote", PORT, peer_port, key=key, on_done=context.add_callback):
        prices = redis_call(LOG, cache(), "MGET", *(f"price:{sku}" for sku in request["skus"]))
        return {"total": sum(int(p or 0) for p in prices), "currency": "EUR"}


def main() -> None:
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    handler = grpc.unary_unary_rpc_method_handler(quote, request_deserializer=json.loads,
                                                  response_serializer=lambda m: json.dumps(m).encode())  # fmt: skip
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("shop.Pricing", {"Quote": handler}),)
    )
    server.add_insecure_port(f"127.0.0.1:{PORT}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    stop.wait()
    server.stop(grace=2).wait()


if __name__ == "__main__":
    main()
