"""Spans from a packet capture: the same streams, parsers and pairing as live.

Each TCP or UDP flow of a pcap/pcapng file becomes the records a server-side
agent would have produced: bytes from the client are reads, bytes to it are
writes, with the capture's own TCP sequence numbers (the same numbers the live
agent records, so a replayed span joins a live one). The server of a TCP flow is
the side that answered the SYN; without a handshake in the capture, the side
with the lower port (a hint only). For UDP the bytes decide (a DNS query goes
to the server).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dpkt

from deeptrace.agent.records import Record
from deeptrace.errors import DeepTraceError

COMM = "pcap"


@dataclass
class _Flow:
    conn_id: int
    server: tuple[str, int]  # (addr, port)
    client: tuple[str, int]
    family: str
    l4: str
    closed: bool = False


def _packets(path: Path) -> Iterator[tuple[int, bytes, int]]:
    """(timestamp ns, link-layer bytes, datalink type) per packet of a pcap or pcapng file."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
            f.seek(0)
            reader = dpkt.pcapng.Reader(f) if magic == b"\x0a\x0d\x0d\x0a" else dpkt.pcap.Reader(f)
            datalink = reader.datalink()
            for ts, buf in reader:
                yield int(ts * 1_000_000_000), buf, datalink  # a float, or a Decimal (nanosecond pcap)
    except (ValueError, dpkt.dpkt.NeedData, dpkt.dpkt.UnpackError) as e:
        raise DeepTraceError(f"{path} is not a readable pcap or pcapng file ({e})") from None
    except OSError as e:
        raise DeepTraceError(f"cannot read {path}: {e.strerror}") from None


def _ip_layer(buf: bytes, datalink: int):
    """The IPv4/IPv6 packet inside a link-layer frame, or None."""
    try:
        if datalink == dpkt.pcap.DLT_EN10MB:
            frame = dpkt.ethernet.Ethernet(buf).data
        elif datalink == dpkt.pcap.DLT_LINUX_SLL:
            frame = dpkt.sll.SLL(buf).data
        elif datalink == 276:  # LINUX_SLL2, what `tshark -i any` writes
            frame = dpkt.sll2.SLL2(buf).data
        elif datalink in (dpkt.pcap.DLT_RAW, 101, 228, 229):
            frame = dpkt.ip.IP(buf) if buf[:1] and buf[0] >> 4 == 4 else dpkt.ip6.IP6(buf)
        elif datalink in (dpkt.pcap.DLT_NULL, dpkt.pcap.DLT_LOOP):
            frame = dpkt.loopback.Loopback(buf).data
        else:
            return None
    except (dpkt.dpkt.UnpackError, IndexError, ValueError):
        return None
    return frame if isinstance(frame, (dpkt.ip.IP, dpkt.ip6.IP6)) else None


def _addr(ip) -> tuple[str, str, str]:
    if isinstance(ip, dpkt.ip.IP):
        return "ipv4", socket.inet_ntop(socket.AF_INET, ip.src), socket.inet_ntop(socket.AF_INET, ip.dst)
    return "ipv6", socket.inet_ntop(socket.AF_INET6, ip.src), socket.inet_ntop(socket.AF_INET6, ip.dst)


def records(path: str | Path) -> Iterator[Record]:
    """The records a server-side agent would have produced for the capture's flows."""
    flows: dict[frozenset, _Flow] = {}
    for ts, buf, datalink in _packets(Path(path)):
        ip = _ip_layer(buf, datalink)
        if ip is None or not isinstance(ip.data, (dpkt.tcp.TCP, dpkt.udp.UDP)):
            continue
        seg = ip.data
        family, src, dst = _addr(ip)
        a, b = (src, seg.sport), (dst, seg.dport)
        key = frozenset((a, b, isinstance(seg, dpkt.tcp.TCP)))
        flow = flows.get(key)
        if isinstance(seg, dpkt.tcp.TCP):
            syn, ack = seg.flags & dpkt.tcp.TH_SYN, seg.flags & dpkt.tcp.TH_ACK
            if flow is None or (syn and flow.closed):
                if syn and ack:
                    server, client = a, b
                elif syn:
                    server, client = b, a
                else:
                    server, client = (a, b) if a[1] < b[1] else (b, a)
                flow = flows[key] = _Flow(len(flows) + 1, server, client, family, "tcp")
            size = len(seg.data)
            if size:
                yield _record(flow, ts, a == flow.client, seg.seq, size, bytes(seg.data))
            if seg.flags & (dpkt.tcp.TH_FIN | dpkt.tcp.TH_RST) and not flow.closed:
                flow.closed = True
                yield _record(flow, ts, False, 0, 0, b"", syscall="close")
        else:
            if flow is None:  # the first datagram's receiver is taken as the server; bytes confirm
                flow = flows[key] = _Flow(len(flows) + 1, b, a, family, "udp")
            data = bytes(seg.data)
            if data:
                yield _record(flow, ts, a == flow.client, 0, len(data), data)


def _record(flow: _Flow, ts: int, from_client: bool, seq: int, size: int, data: bytes,
            syscall: str | None = None) -> Record:  # fmt: skip
    direction = None if syscall else ("ingress" if from_client else "egress")
    role = "server" if flow.l4 == "tcp" else "unknown"
    seq_end = (seq + size) & 0xFFFFFFFF if flow.l4 == "tcp" else 0
    return Record(0, 0, COMM, syscall or ("read" if from_client else "write"), direction, flow.family, flow.l4,
                  flow.server[0], flow.server[1], flow.client[0], flow.client[1], role, flow.conn_id, 0, ts, ts,
                  seq if flow.l4 == "tcp" else 0, seq_end, size, size, 0, 0, data)  # fmt: skip
