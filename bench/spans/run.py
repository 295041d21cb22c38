#!/usr/bin/env python3
"""Records per second through streams + parsers + pairing (records -> spans) on one core,
and spans per second from exchanges the kernel assembled (exchange events -> JSON lines).

Real traffic is captured first, by the real collector: wrk against nginx (HTTP/1
keep-alive), redis-benchmark against redis-server (with and without pipelining), and
for the message and RPC protocols a real client in a loop against a real server:
pika against rabbitmq-server (AMQP), nats-py against nats-server, paho-mqtt against
mosquitto, the Apache Thrift library's client and server, and the live tests' Dubbo
provider and consumer, Kafka broker (kafka-python's classes) with KafkaProducer, and
MongoDB server (pymongo's bson) with MongoClient. Each client is a process of its own.
The records are kept in memory and then replayed through a fresh SpanPipeline,
timed alone on one core, several times; the best run counts.

For HTTP/1 and Redis, whose exchanges the kernel assembles (`deeptrace agent`'s default),
the same loads are captured again as exchange events, and the agent's whole user-space
path is timed the same way: events -> JSON lines (what `deeptrace agent --out` writes),
against the target of 250,000 spans/s.

    .venv/bin/python bench/spans/run.py [--seconds 3] [--quick] [--exchanges-only]

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from brokers import PASSWORD, USER, mosquitto, nats_server
from rabbit import rabbitmq
from servers import dnsmasq, memcached, nginx, redis  # the test suite's real-server helpers

from deeptrace.agent.collector import Collector, CollectorConfig
from deeptrace.agent.selection import Selection
from deeptrace.capture.pipeline import SpanPipeline
from deeptrace.capture.records import EXCHANGE_PROTOCOLS
from deeptrace.capture.spans import json_lines

TARGET = 100_000
TARGET_EXCHANGE_SPANS = 250_000  # spans/s, exchange events to JSON lines


def capture(start_server, load, seconds: float) -> list:
    """Records of the server while `load(port, seconds)` runs."""
    config = CollectorConfig(selection=Selection(), ring_bytes=64 << 20)
    with tempfile.TemporaryDirectory() as d, start_server(Path(d)) as (pid, port), Collector(config) as c:
        c.trace(pid)
        proc = load(port, seconds)
        records = []
        while proc.poll() is None:
            records += c.poll(timeout_s=0.05)
        while batch := c.poll(timeout_s=0.2):
            records += batch
        drops = sum(c.drops().values())
    if drops:
        print(f"  (capture dropped {drops} records; the replay measures what was kept)", file=sys.stderr)
    return records


def capture_exchanges(start_server, load, seconds: float):
    """Exchange events the kernel assembled for the server while `load(port, seconds)` runs."""
    import numpy as np

    with tempfile.TemporaryDirectory() as d, start_server(Path(d)) as (pid, port), Collector(CollectorConfig(
            selection=Selection(), ring_bytes=64 << 20, exchange_ring_bytes=64 << 20,
            assemble=EXCHANGE_PROTOCOLS[1:], dns_ports=(port,))) as c:  # fmt: skip
        c.trace(pid)
        proc = load(port, seconds)
        batches = []
        while proc.poll() is None:
            c.poll(timeout_s=0.05)
            batches.append(c.poll_exchanges())
        time.sleep(0.2)
        c.poll(timeout_s=0)
        while len(batch := c.poll_exchanges()):  # a batch is bounded: drain them all
            batches.append(batch)
        wall, drops = c.wall_offset_ns, sum(c.drops().values())
    if drops:
        print(f"  (capture dropped {drops} records or exchanges; the replay measures what was kept)", file=sys.stderr)
    return np.concatenate(batches), wall


def replay_exchanges(events, wall: int, batch: int = 4096, runs: int = 3, new_pipeline=None) -> dict:
    """The agent's path for assembled exchanges when it writes JSON lines (`deeptrace agent
    --out`): events -> SpanJson -> JSON lines."""
    best = None
    for _ in range(runs):
        pipeline = new_pipeline() if new_pipeline else SpanPipeline(host="bench")
        n = written = 0
        t0 = time.perf_counter()
        for i in range(0, len(events), batch):
            spans = pipeline.push_exchanges_json(events[i : i + batch], wall)
            written += len(json_lines(spans))
            n += len(spans)
        dt = time.perf_counter() - t0
        if best is None or dt < best[0]:
            best = (dt, n, written)
    dt, n, written = best
    return {"exchanges": len(events), "spans": n, "seconds": round(dt, 3), "spans_per_s": round(n / dt),
            "us_per_span": round(dt / max(n, 1) * 1e6, 2), "bytes_per_span": round(written / max(n, 1))}  # fmt: skip


def wrk(port: int, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([shutil.which("wrk"), "-t1", "-c8", f"-d{max(1, int(seconds))}s",
                             f"http://127.0.0.1:{port}/hello"], stdout=subprocess.DEVNULL)  # fmt: skip


def redis_benchmark(pipeline: int):
    def run(port: int, seconds: float) -> subprocess.Popen:
        n = int(20_000 * seconds)
        return subprocess.Popen([shutil.which("redis-benchmark"), "-p", str(port), "-n", str(n), "-c", "8",
                                 "-P", str(pipeline), "-t", "set,get", "-q"], stdout=subprocess.DEVNULL)  # fmt: skip

    return run


# ---- the message and RPC protocols: servers of the test suite, a client process in a loop ----

THRIFTSVC = ROOT / "tests" / "thriftsvc"


def memcaslap(port: int, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([shutil.which("memcaslap"), "-s", f"127.0.0.1:{port}", "-T", "1", "-c", "8",
                             "-t", f"{max(1, round(seconds))}s", "-X", "100"], stdout=subprocess.DEVNULL)  # fmt: skip


@contextmanager
def port_printing(argv: list[str]):
    """A server that prints its port on its first line (the live tests' Kafka, MongoDB, Thrift and
    Dubbo servers); yields (pid, port). The line it is given lets run.py's Thrift server accept."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)  # fmt: skip
    try:
        port = int(proc.stdout.readline())
        proc.stdin.write("\n")
        proc.stdin.flush()
        yield proc.pid, port
    finally:
        proc.kill()
        proc.wait()


def kafka_broker(_tmp: Path):
    from test_kafka import BROKER  # kafka-python's response classes behind a socket

    return port_printing([sys.executable, "-c", BROKER])


def mongodb_server(_tmp: Path):
    from test_mongodb import SERVER  # bson replies to pymongo's OP_MSG and OP_QUERY commands

    return port_printing([sys.executable, "-c", SERVER])


def thrift_server(_tmp: Path):
    # The Thrift library's defaults: binary protocol, buffered transport.
    return port_printing([sys.executable, str(THRIFTSVC / "run.py"), "server", "threaded", "binary", "buffered"])


def dubbo_provider(_tmp: Path):
    return port_printing([sys.executable, str(THRIFTSVC / "dubbo_wire.py"), "provider"])


def rabbitmq_broker(_tmp: Path):
    return rabbitmq()  # it makes its own temporary directory


def client_process(name: str):
    """A load that runs LOADS[name] in a process of its own (this script with --load), so that
    the client's Python does not share a core or an interpreter with this one."""

    def run(port: int, seconds: float) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, __file__, "--load", name, str(port), str(seconds)])

    return run


def until(seconds: float):
    """Yields until `seconds` have passed."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        yield


def amqp_load(port: int, seconds: float) -> None:
    import pika

    params = pika.ConnectionParameters("127.0.0.1", port, heartbeat=0,
                                       credentials=pika.PlainCredentials("guest", "guest"))  # fmt: skip
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.queue_declare("bench")
    for _ in until(seconds):
        for i in range(10):
            ch.basic_publish("", "bench", b"job %d" % i, pika.BasicProperties(message_id=f"m-{i}"))
        for n, (got, _, _) in enumerate(ch.consume("bench", inactivity_timeout=10), 1):
            ch.basic_ack(got.delivery_tag)
            if n == 10:
                break
    ch.cancel()
    conn.close()


def nats_load(port: int, seconds: float) -> None:
    import nats

    async def on_msg(_msg) -> None:
        pass

    async def publish_and_flush() -> None:
        nc = await nats.connect(f"nats://127.0.0.1:{port}", user=USER, password=PASSWORD, name="bench")
        await nc.subscribe("bench.orders", cb=on_msg)  # its own messages come back: MSGs too
        for _ in until(seconds):
            for i in range(10):  # nats-py writes what is published before a flush together
                await nc.publish("bench.orders", b"order %d" % i)
            await nc.flush()  # a PING answered by a PONG: the loop's round trip
        await nc.close()

    asyncio.run(publish_and_flush())


def mqtt_load(port: int, seconds: float) -> None:
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench", protocol=mqtt.MQTTv311)
    c.username_pw_set(USER, PASSWORD)
    c.connect("127.0.0.1", port, keepalive=60)
    c.loop_start()
    c.subscribe("bench/orders", qos=1)  # its own messages come back: PUBLISHes from the broker too
    for _ in until(seconds):
        c.publish("bench/orders", b"order", qos=1).wait_for_publish(5)  # PUBLISH answered by PUBACK
    c.disconnect()
    c.loop_stop()


def thrift_load(port: int, seconds: float) -> None:
    from thrift.transport import TSocket
    from thriftsvc.calc import Client, client_protocol
    from thriftsvc.run import PLAN, check

    trans, prot = client_protocol(TSocket.TSocket("127.0.0.1", port), "binary", "buffered", False)
    trans.open()
    client = Client(prot)
    for _ in until(seconds):
        check(client, PLAN)  # the live test's calls: values, exceptions, a one-way call
    trans.close()


def dubbo_load(port: int, seconds: float) -> None:
    from thriftsvc.dubbo_wire import connect, make_calls

    sock = connect(port)
    rid = 100
    for _ in until(seconds):
        rid = make_calls(sock, rid)  # the live test's calls: one answered out of order, one one-way
    sock.close()


def kafka_load(port: int, seconds: float) -> None:
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=f"127.0.0.1:{port}", acks=1, retries=0, linger_ms=0, client_id="bench")
    for _ in until(seconds):
        p.send("orders", b"hello").get(timeout=10)  # one Produce and its answer at a time
    p.close(timeout=5)


def mongodb_load(port: int, seconds: float) -> None:
    from pymongo import MongoClient

    client = MongoClient("127.0.0.1", port, directConnection=True, serverSelectionTimeoutMS=5000)
    users = client.shop.users
    for _ in until(seconds):
        users.find_one({"name": "ann"})
    client.close()


def dns_load(port: int, seconds: float) -> None:
    """Queries over UDP from one socket, 16 in flight, each of a random id, for names dnsmasq
    answers (web.test), has no A record of (AAAA), or does not know (NXDOMAIN)."""
    import random
    import socket

    def query(ident: int, name: str, qtype: int) -> bytes:
        labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
        return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", qtype, 1)

    questions = [("web.test", 1), ("web.test", 28)] + [(f"n{i}.test", 1) for i in range(30)]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", port))
    s.settimeout(1)
    rnd = random.Random(1)
    for _ in range(16):
        s.send(query(rnd.randrange(65536), *rnd.choice(questions)))
    for _ in until(seconds):
        try:
            s.recv(512)
        except TimeoutError:
            pass
        s.send(query(rnd.randrange(65536), *rnd.choice(questions)))


LOADS = {"amqp": amqp_load, "nats": nats_load, "mqtt": mqtt_load, "thrift": thrift_load, "dubbo": dubbo_load,
         "kafka": kafka_load, "mongodb": mongodb_load, "dns": dns_load}  # fmt: skip


def replay(records: list, batch: int = 512, runs: int = 3, new_pipeline=None) -> dict:
    best = None
    for _ in range(runs):
        pipeline = new_pipeline() if new_pipeline else SpanPipeline(host="bench")
        spans = []
        t0 = time.perf_counter()
        for i in range(0, len(records), batch):
            spans += pipeline.push(records[i : i + batch])
        spans += pipeline.close_all(0)
        dt = time.perf_counter() - t0
        if best is None or dt < best[0]:
            best = (dt, spans, pipeline.stats)
    dt, spans, stats = best
    # Which protocols the spans are of: traffic that was not recognised would still report a rate.
    protocols = dict(Counter(s.protocol for s in spans).most_common())
    return {"records": len(records), "spans": len(spans), "seconds": round(dt, 3),
            "records_per_s": round(len(records) / dt), "spans_per_s": round(len(spans) / dt),
            "us_per_record": round(dt / len(records) * 1e6, 2), "orphan_responses": stats.orphan_responses,
            "unanswered": stats.unanswered, "span_protocols": protocols}  # fmt: skip


def stages(records: list) -> dict:
    """us per record of each stage, on the same records: where the time goes."""
    from deeptrace.capture.pipeline import _in_order
    from deeptrace.capture.streams import OrderedStream, to_chunk
    from deeptrace.protocols.http1 import Http1Connection, frame_request, frame_response

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return round((time.perf_counter() - t0) / len(records) * 1e6, 2)

    data = [r for r in records if r.direction]
    chunks = [(r.conn_id, r.direction == "ingress", to_chunk(r)) for r in data]

    def ordering():
        for i in range(0, len(records), 512):
            _in_order(records[i : i + 512])

    def streams():
        st = {}
        for r in data:
            st.setdefault((r.conn_id, r.direction), OrderedStream()).push(r, 0)

    def frame_functions():
        for _, is_request, c in chunks:
            frame_request(c.data) if is_request else frame_response(c.data, "GET")

    def parsers():
        conns: dict = {}
        for cid, is_request, c in chunks:
            conn = conns.get(cid) or conns.setdefault(cid, Http1Connection())
            conn.feed(is_request, c)

    def pipeline():
        p = SpanPipeline(host="bench")
        for i in range(0, len(records), 512):
            p.push(records[i : i + 512])

    return {"ordering": timed(ordering), "streams": timed(streams), "http_frame_functions": timed(frame_functions),
            "parsers_with_framing_and_messages": timed(parsers), "whole_pipeline": timed(pipeline)}  # fmt: skip


WORKLOADS = {
    "http1 (wrk, keep-alive)": (nginx, wrk),
    "redis (redis-benchmark, no pipelining)": (redis, redis_benchmark(1)),
    "redis (redis-benchmark, pipeline 16)": (redis, redis_benchmark(16)),
    "amqp (pika, rabbitmq-server)": (rabbitmq_broker, client_process("amqp")),
    "kafka (KafkaProducer, test broker)": (kafka_broker, client_process("kafka")),
    "mongodb (MongoClient find, test server)": (mongodb_server, client_process("mongodb")),
    "nats (nats-py pub+sub, nats-server)": (nats_server, client_process("nats")),
    "mqtt (paho-mqtt pub+sub qos 1, mosquitto)": (mosquitto, client_process("mqtt")),
    "thrift (Apache Thrift binary, buffered)": (thrift_server, client_process("thrift")),
    "dubbo (test provider and consumer)": (dubbo_provider, client_process("dubbo")),
}
# The target holds for one message per record: HTTP/1 and unpipelined Redis. A pipelined record
# carries many messages (judged by spans/s); the other protocols are reported, not judged.
TARGETED = ("http1 (wrk, keep-alive)", "redis (redis-benchmark, no pipelining)")
# What the kernel assembles, measured from its exchange events (memcached, DNS: reported, not judged).
EXCHANGE_WORKLOADS = {**{name: WORKLOADS[name] for name in TARGETED},
                      "memcached (memcaslap)": (memcached, memcaslap),
                      "dns (dnsmasq, UDP queries)": (dnsmasq, client_process("dns"))}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each capture")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--exchanges-only", action="store_true", help="only the exchange events' path")
    ap.add_argument("--load", nargs=3, metavar=("NAME", "PORT", "SECONDS"), help="internal: be a client process")
    args = ap.parse_args()
    if args.load:
        name, port, seconds = args.load
        LOADS[name](int(port), float(seconds))
        return
    if args.quick:
        args.seconds = 1.0
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install wrk")
    results = {}
    breakdown = {}
    for name, (server, load) in WORKLOADS.items():
        if args.exchanges_only:
            break
        records = capture(server, load, args.seconds)
        os.sched_setaffinity(0, {0})
        results[name] = replay(records)
        if name.startswith("http1"):
            breakdown = stages(records)
        os.sched_setaffinity(0, set(range(os.cpu_count())))
        r = results[name]
        print(f"{name:42} {r['records']:>8} records -> {r['spans']:>7} spans: {r['records_per_s']:>8} records/s "
              f"({r['us_per_record']} us/record) {r['span_protocols']}", file=sys.stderr)  # fmt: skip
    if results:
        print(f"{'workload':42} {'records/s':>10} {'spans/s':>9} {'us/rec':>7}")
        for name, r in results.items():
            print(f"{name:42} {r['records_per_s']:>10} {r['spans_per_s']:>9} {r['us_per_record']:>7}")
        print("http1 stages, us per record: " + ", ".join(f"{k} {v}" for k, v in breakdown.items()))
    assembled = {}
    for name, (server, load) in EXCHANGE_WORKLOADS.items():
        events, wall = capture_exchanges(server, load, args.seconds)
        os.sched_setaffinity(0, {0})
        assembled[name] = replay_exchanges(events, wall)
        os.sched_setaffinity(0, set(range(os.cpu_count())))
    print(f"{'exchanges assembled in the kernel':42} {'exchanges':>10} {'spans/s':>9} {'us/span':>7}  (events -> JSON lines)")
    for name, r in assembled.items():
        print(f"{name:42} {r['exchanges']:>10} {r['spans_per_s']:>9} {r['us_per_span']:>7}")
    worst_x = min(assembled[name]["spans_per_s"] for name in TARGETED)
    print(f"target >= {TARGET_EXCHANGE_SPANS} spans/s from exchanges, HTTP/1 and Redis: worst {worst_x} -> "
          f"{'met' if worst_x >= TARGET_EXCHANGE_SPANS else 'NOT met'}")  # fmt: skip
    worst = min((results[name]["records_per_s"] for name in TARGETED if name in results), default=0)
    if results:
        print(f"target >= {TARGET} records/s for HTTP/1 and Redis (one message per record): worst {worst} -> "
              f"{'met' if worst >= TARGET else 'NOT met'}; the other protocols are reported only")  # fmt: skip
    else:
        print(f"target >= {TARGET} records/s for HTTP/1 and Redis: not measured (--exchanges-only)")
    print(json.dumps({"benchmark": "spans", "capture_seconds": args.seconds, "workloads": results,
                      "http1_stages_us_per_record": breakdown, "target_records_per_s": TARGET,
                      "target_workloads": list(TARGETED), "target_met": worst >= TARGET,
                      "exchanges": assembled, "target_exchange_spans_per_s": TARGET_EXCHANGE_SPANS,
                      "exchange_target_met": worst_x >= TARGET_EXCHANGE_SPANS}))  # fmt: skip


if __name__ == "__main__":
    main()
