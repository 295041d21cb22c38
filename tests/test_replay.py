"""`deeptrace replay`: captures give the spans the live agent gives."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import dpkt
from servers import dnsmasq, need, nginx, redis, span_key, tshark_capture

from deeptrace import replay
from deeptrace.pipeline import SpanPipeline

REQ = b"GET /a/1 HTTP/1.1\r\nHost: x\r\n\r\n"
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def _tcp(src, dst, sport, dport, seq, flags, data=b""):
    tcp = dpkt.tcp.TCP(sport=sport, dport=dport, seq=seq, flags=flags, data=data)
    ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=6, data=tcp)
    ip.len = len(ip)
    return dpkt.ethernet.Ethernet(type=dpkt.ethernet.ETH_TYPE_IP, data=ip)


def test_synthetic_capture_with_handshake_retransmission_and_reordering(tmp_path):
    c, s = ("10.0.0.1", 40000), ("10.0.0.2", 8080)
    a, p = dpkt.tcp.TH_ACK, dpkt.tcp.TH_PUSH | dpkt.tcp.TH_ACK
    pkts = [
        _tcp(c[0], s[0], c[1], s[1], 100, dpkt.tcp.TH_SYN),
        _tcp(s[0], c[0], s[1], c[1], 900, dpkt.tcp.TH_SYN | a),
        _tcp(c[0], s[0], c[1], s[1], 101, p, REQ[10:]),  # second half first
        _tcp(c[0], s[0], c[1], s[1], 101 - 10 + 10, p, b""),  # an empty ACK
        _tcp(c[0], s[0], c[1], s[1], 101 - 10, p, REQ[:10]),
        _tcp(s[0], c[0], s[1], c[1], 901, p, RESP),
        _tcp(s[0], c[0], s[1], c[1], 901, p, RESP),  # retransmitted
        _tcp(c[0], s[0], c[1], s[1], 101 + len(REQ) - 10, dpkt.tcp.TH_FIN | a),
    ]
    path = tmp_path / "x.pcap"
    with open(path, "wb") as f:
        w = dpkt.pcap.Writer(f)
        for i, pkt in enumerate(pkts):
            w.writepkt(bytes(pkt), ts=1000 + i * 0.001)
    spans = SpanPipeline().push(list(replay.records(path)))
    assert [(sp.kind, sp.name, sp.status_code, sp.req_size, sp.resp_size) for sp in spans] == [
        ("SERVER", "GET /a/{id}", "200", len(REQ), len(RESP))]
    assert (spans[0].endpoint.laddr, spans[0].endpoint.lport) == s


def test_nanosecond_pcap_and_pcapng_timestamps(tmp_path):
    """dpkt reads a nanosecond pcap's stamps as Decimal, which once crashed replay
    (`Decimal * float`); pcapng's as float. Both must give the exchange, to the ns where the
    format has it."""
    from decimal import Decimal

    c, s = ("10.0.0.1", 40000), ("10.0.0.2", 8080)
    p = dpkt.tcp.TH_PUSH | dpkt.tcp.TH_ACK
    pkts = [_tcp(c[0], s[0], c[1], s[1], 100, p, REQ), _tcp(s[0], c[0], s[1], c[1], 900, p, RESP)]
    nano = tmp_path / "nano.pcap"
    with open(nano, "wb") as f:
        w = dpkt.pcap.Writer(f, nano=True)
        for i, pkt in enumerate(pkts):
            w.writepkt(bytes(pkt), ts=Decimal("1000.000000123") + i)
    ng = tmp_path / "x.pcapng"
    subprocess.run(["editcap", "-F", "pcapng", str(nano), str(ng)], check=True, capture_output=True)
    for path in (nano, ng):
        spans = SpanPipeline().push(list(replay.records(path)))
        assert [(sp.name, sp.status_code) for sp in spans] == [("GET /a/{id}", "200")], path
        assert spans[0].start_ns == 1000_000_000_123, path


def test_capture_of_real_traffic_gives_the_live_spans(collector, store, tmp_path):
    """HTTP/1, Redis and DNS (UDP and TCP) in one capture, through the `deeptrace replay` command."""
    (tmp_path / "nginx").mkdir()
    with nginx(tmp_path / "nginx") as (ngx, http_port), redis(tmp_path) as (rds, redis_port), \
            dnsmasq(tmp_path) as (dns, dns_port):  # fmt: skip
        pids = set()
        for pid in (ngx, rds, dns):
            pids |= collector.trace(pid)
        with tshark_capture(tmp_path / "traffic.pcapng", [http_port, redis_port, dns_port]) as cap:
            for cmd in ([need("curl"), "-s", f"http://127.0.0.1:{http_port}/hello"],
                        [need("curl"), "-s", f"http://127.0.0.1:{http_port}/missing/7"],
                        [need("redis-cli"), "-p", str(redis_port), "SET", "k", "v"],
                        [need("redis-cli"), "-p", str(redis_port), "GET", "k"],
                        [need("dig"), "@127.0.0.1", "-p", str(dns_port), "+short", "+tries=1", "web.test"],
                        [need("dig"), "@127.0.0.1", "-p", str(dns_port), "+short", "+tcp", "missing.test"]):  # fmt: skip
                subprocess.run(cmd, check=True, capture_output=True)
        live = SpanPipeline().push(store.settle(pids, quiet_s=0.5))
    out = subprocess.run([sys.executable, "-m", "deeptrace.cli", "replay", str(cap)], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    replayed = [json.loads(line) for line in out.splitlines()]
    fields = ("protocol", "name", "status", "status_code", "req_size", "resp_size", "req_seq", "resp_seq")
    got = sorted(tuple(tuple(v) if isinstance(v, list) else v for v in (s[f] for f in fields)) for s in replayed)
    assert got == sorted(map(span_key, live))
    assert {"GET /hello", "GET /missing/{id}", "redis SET", "redis GET", "DNS A web.test", "DNS A missing.test"} <= {
        g[1] for g in got}
