"""Spans from a packet capture: the same streams, parsers and pairing as live.

Each TCP or UDP flow of a pcap/pcapng file becomes the records a server-side
agent would have produced: bytes from the client are reads, bytes to it are
writes, with the capture's own TCP sequence numbers (the same numbers the live
agent records, so a replayed span joins a live one).

The server of a TCP flow is the side that answered the SYN. A flow whose
handshake is not in the capture gets role "unknown": the pipeline then tells
requests from responses by their bytes, as it does for connections older than
the agent. For UDP the bytes always decide (a DNS query goes to the server).

A capture is not a stream of syscalls, so this module does what the kernel did
for the application: each TCP direction is put in sequence order, bytes seen
twice (retransmissions, duplicated packets, loopback seen twice on `any`) are
given once, and IP fragments are put back together. Memory is bounded: a gap
that is not filled while MAX_PENDING_* bytes wait behind it becomes a hole (a
record of known size and no bytes, which the parsers skip), and so does every
gap still open when the connection ends or the capture does. Bytes cut off by
the snapshot length are holes too: a record carries the captured bytes and the
size that moved, like a live record truncated at the capture limit.

The file formats are read here rather than with dpkt's readers: those take the
first interface's link type and clock for every packet of a pcapng, turn
timestamps into floats (which lose nanoseconds at today's epoch), trust block
lengths from the file, and return the short last packet of a file cut short as
if it were whole.
"""

from __future__ import annotations

import socket
import struct
import sys
from collections import Counter, OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

from deeptrace.capture.records import FLAG_TRUNCATED, Record
from deeptrace.errors import DeepTraceError

COMM = "pcap"
MAX_PACKET = 1 << 20  # a packet claiming more is corruption (capture tools stop at 256 KiB)
MAX_BLOCK = 16 << 20  # the same for any pcapng block
MAX_FLOWS = 65536  # open flows; the least recently active is closed past it
MAX_PENDING_SEGMENTS = 256  # per TCP direction, waiting behind a gap
MAX_PENDING_BYTES = 1 << 20
# A connection first seen by its data waits this many packets of the capture for a SYN that
# the capture put behind the data (captures from several queues reorder by a few packets);
# then each side starts at the earliest byte seen.
REORDER_PACKETS = 32
MAX_FRAGMENTED = 64  # IP datagrams being put back together at once
MAX_FRAGMENTS = 128  # pieces of one datagram
FRAGMENT_TIMEOUT_NS = 30_000_000_000  # as Linux's ipfrag_time
UDP_DUPLICATE_NS = 1_000_000  # an identical datagram this soon after is the same packet seen twice
_SEQ_MOD = 1 << 32

PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"
# magic -> (byte order, ns per timestamp tick, bytes each packet header has past the usual 16). The
# "modified" pcap of Kuznetzov's patched libpcap (old Red Hat/SuSE tcpdump) adds interface index,
# protocol, packet type and a pad byte, as tshark reads it.
_PCAP_MAGICS = {b"\xd4\xc3\xb2\xa1": ("<", 1000, 0), b"\xa1\xb2\xc3\xd4": (">", 1000, 0),
                b"\x4d\x3c\xb2\xa1": ("<", 1, 0), b"\xa1\xb2\x3c\x4d": (">", 1, 0),
                b"\x34\xcd\xb2\xa1": ("<", 1000, 8), b"\xa1\xb2\xcd\x34": (">", 1000, 8)}  # fmt: skip

# Link types (tcpdump.org/linktypes.html) and how far their IP packet starts.
ETHERNET, LINUX_SLL, LINUX_SLL2, NULL, LOOP, IPV4, IPV6 = 1, 113, 276, 0, 108, 228, 229
RAW = (12, 14, 101)  # DLT_RAW under its several numbers
LINK_TYPES = {ETHERNET: "Ethernet", LINUX_SLL: "Linux cooked (SLL)", LINUX_SLL2: "Linux cooked v2 (SLL2)",
              NULL: "BSD loopback", LOOP: "OpenBSD loopback", IPV4: "raw IPv4", IPV6: "raw IPv6",
              **{n: "raw IP" for n in RAW}}  # fmt: skip
ETH_IPV4, ETH_IPV6 = 0x0800, 0x86DD
VLAN_TPIDS = (0x8100, 0x88A8, 0x9100, 0x9200)  # 802.1Q, 802.1ad (QinQ) and the older QinQ tags
IPV6_EXTENSIONS = (0, 43, 60, 135, 139, 140, 253, 254)  # headers shaped (next, length in 8 bytes - 1)
TCP, UDP = 6, 17
FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10


class _Unreadable(Exception):
    """The file cannot be read as a capture: the message says why (the path is added later)."""


@dataclass
class ReplayStats:
    packets: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> packets
    reassembled: int = 0  # datagrams put back together from IP fragments
    duplicates: int = 0  # TCP segments or datagrams whose bytes had all been seen
    overlaps: int = 0  # TCP segments partly seen before: only the new bytes were kept
    holes: int = 0  # TCP gaps never filled: given to the parsers as holes

    def describe(self) -> str:
        said = [f"{self.packets} packets"]
        for n, what in ((self.reassembled, "datagrams reassembled from IP fragments"),
                        (self.duplicates, "duplicate segments/datagrams dropped"),
                        (self.overlaps, "retransmissions trimmed to their new bytes"),
                        (self.holes, "TCP gaps never filled (holes)")):  # fmt: skip
            if n:
                said.append(f"{n} {what}")
        if self.skipped:
            said.append("skipped: " + ", ".join(f"{n} {why}" for why, n in self.skipped.most_common()))
        return "; ".join(said)


def records(path: str | Path, stats: ReplayStats | None = None) -> Iterator[Record]:
    """The records a server-side agent would have produced for the capture's flows.

    Without a `stats` to fill, what was skipped or repaired is reported on stderr at the end."""
    own = stats is None
    stats = stats if stats is not None else ReplayStats()
    try:
        with open(path, "rb") as f:
            yield from _Replay(stats).run(_packets(f), path)
    except _Unreadable as e:
        raise DeepTraceError(f"{path}: {e}") from None
    except OSError as e:
        raise DeepTraceError(f"{path}: cannot read it ({e.strerror or e})") from None
    if own and (stats.skipped or stats.duplicates or stats.overlaps or stats.holes or stats.reassembled):
        print(f"deeptrace replay: {path}: {stats.describe()}", file=sys.stderr)


# ---- capture files ----


def _read(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) < n:
        raise _Unreadable(f"cut short: the file ends inside {what} ({len(data)} of {n} bytes)")
    return data


def _packets(f: BinaryIO) -> Iterator[tuple[int, int, bytes]]:
    """(timestamp ns, link type, bytes) per packet of a pcap or pcapng file."""
    head = f.read(4)
    if head == PCAPNG_MAGIC:
        return _pcapng(f)
    if head in _PCAP_MAGICS:
        return _pcap(f, head)
    if not head:
        raise _Unreadable("empty file, not a capture")
    raise _Unreadable(f"not a pcap or pcapng file (it starts with {head.hex(' ')})")


def _pcap(f: BinaryIO, magic: bytes) -> Iterator[tuple[int, int, bytes]]:
    order, ns_per_tick, extra = _PCAP_MAGICS[magic]
    header = _read(f, 20, "the file header")
    linktype = struct.unpack(order + "I", header[16:20])[0] & 0xFFFF  # the high bits tell an FCS length
    if linktype not in LINK_TYPES:
        raise _Unreadable(_unreadable_link(linktype))
    packet_header = struct.Struct(order + "IIII" + "x" * extra)
    n = 0
    while head := f.read(packet_header.size):
        n += 1
        if len(head) < packet_header.size:
            raise _Unreadable(f"cut short: the file ends inside the header of packet {n}")
        sec, frac, caplen, _ = packet_header.unpack(head)
        if caplen > MAX_PACKET:
            raise _Unreadable(f"corrupt: packet {n} claims {caplen} captured bytes")
        yield sec * 1_000_000_000 + frac * ns_per_tick, linktype, _read(f, caplen, f"packet {n}")


@dataclass
class _Interface:
    linktype: int
    snaplen: int
    tick_mul: int = 1000  # ns = ticks * mul // div + offset (integers: no float rounding)
    tick_div: int = 1
    offset_ns: int = 0

    def ns(self, ticks: int) -> int:
        return ticks * self.tick_mul // self.tick_div + self.offset_ns


def _pcapng(f: BinaryIO) -> Iterator[tuple[int, int, bytes]]:
    order, interfaces, last_ns, n, at = "<", [], 0, 0, 0
    head = PCAPNG_MAGIC + _read(f, 4, "the section header")
    while True:
        if head[:4] == PCAPNG_MAGIC:  # a section header: its byte-order magic says how to read the rest
            bom = _read(f, 4, "the section header")
            if bom not in (b"\x4d\x3c\x2b\x1a", b"\x1a\x2b\x3c\x4d"):
                raise _Unreadable("not a pcapng file (bad byte-order magic)")
            order, interfaces = ("<" if bom[0] == 0x4D else ">"), []
            body = bom + _block_body(f, struct.unpack(order + "I", head[4:])[0], head, at, 12)
            if len(body) < 16:  # byte-order magic, version, section length: 28 bytes with the lengths
                raise _Unreadable(f"corrupt: the section header at byte {at} is too short")
            if struct.unpack(order + "H", body[4:6])[0] != 1:
                raise _Unreadable(f"pcapng version {body[4:8].hex()} is not one we read (1.x)")
        else:
            btype, length = struct.unpack(order + "II", head)
            body = _block_body(f, length, head, at, 8)
            if btype == 1:  # interface description
                interfaces.append(_interface(body, order))
            elif btype in (2, 3, 6):  # obsolete, simple and enhanced packet blocks
                n += 1
                got = _packet_block(btype, body, order, interfaces, last_ns)
                if got is None:
                    raise _Unreadable(f"corrupt: packet block {n} (at byte {at}) does not fit its length "
                                      "or names an interface the file does not describe")  # fmt: skip
                last_ns = got[0]
                yield got
        at += len(head) + len(body) + 4
        head = f.read(8)
        if not head:
            return
        if len(head) < 8:
            raise _Unreadable(f"cut short: the file ends inside the header of the block at byte {at}")


def _block_body(f: BinaryIO, length: int, head: bytes, at: int, already: int) -> bytes:
    """A block's bytes after the `already` read, its trailing length checked and cut off."""
    if length < already + 4 or length % 4 or length > MAX_BLOCK:
        raise _Unreadable(f"corrupt: the block at byte {at} claims a length of {length}")
    body = _read(f, length - already, f"the block at byte {at}")
    if body[-4:] != head[4:8]:
        raise _Unreadable(f"corrupt: the block at byte {at} ends with a different length than it starts with")
    return body[:-4]


def _interface(body: bytes, order: str) -> _Interface:
    if len(body) < 8:
        raise _Unreadable("corrupt: an interface description is too short")
    linktype, _, snaplen = struct.unpack(order + "HHI", body[:8])
    iface = _Interface(linktype, snaplen)
    pos = 8
    while pos + 4 <= len(body):  # options: code, length, value padded to 4 bytes
        code, olen = struct.unpack(order + "HH", body[pos : pos + 4])
        value = body[pos + 4 : pos + 4 + olen]
        if code == 0:
            break
        if code == 9 and len(value) == 1:  # if_tsresol: 10^-n, or 2^-n with the top bit set
            exp = value[0] & 0x7F
            if value[0] & 0x80:
                iface.tick_mul, iface.tick_div = 1_000_000_000, 1 << exp
            else:
                iface.tick_mul, iface.tick_div = (10 ** (9 - exp), 1) if exp <= 9 else (1, 10 ** (exp - 9))
        elif code == 14 and len(value) == 8:  # if_tsoffset: seconds to add
            iface.offset_ns = struct.unpack(order + "q", value)[0] * 1_000_000_000
        pos += 4 + (olen + 3) // 4 * 4
    return iface


def _packet_block(btype: int, body: bytes, order: str, interfaces: list, last_ns: int):
    """(ns, link type, bytes) of a packet block, or None if it is corrupt."""
    if btype == 3:  # simple: interface 0, no timestamp (the previous packet's is the best we have)
        if len(body) < 4 or not interfaces:
            return None
        iface = interfaces[0]
        caplen = min(struct.unpack(order + "I", body[:4])[0], len(body) - 4, iface.snaplen or MAX_PACKET)
        return last_ns, iface.linktype, body[4 : 4 + caplen]
    start = 20
    if len(body) < start:
        return None
    if btype == 2:  # obsolete: 16-bit interface id and drops count, timestamp, captured and original length
        index, _, hi, lo, caplen, _ = struct.unpack(order + "HHIIII", body[:start])
    else:  # enhanced: interface id, timestamp, captured and original length
        index, hi, lo, caplen, _ = struct.unpack(order + "IIIII", body[:start])
    if index >= len(interfaces) or start + caplen > len(body):
        return None
    iface = interfaces[index]
    return iface.ns(hi << 32 | lo), iface.linktype, body[start : start + caplen]


def _unreadable_link(linktype: int) -> str:
    return (f"link type {linktype} is not one replay reads (it reads {', '.join(sorted(set(LINK_TYPES.values())))}; "
            "see tcpdump.org/linktypes.html)")  # fmt: skip


# ---- packets: link, network and transport headers ----


def _u16(b: bytes, at: int) -> int:
    return b[at] << 8 | b[at + 1]


def _link(linktype: int, data: bytes) -> tuple[int, int] | str:
    """(ethertype of the network layer, where it starts), or why the packet is skipped."""
    if linktype == ETHERNET:
        etype, off = (_u16(data, 12), 14) if len(data) >= 14 else (-1, 0)
    elif linktype == LINUX_SLL:
        etype, off = (_u16(data, 14), 16) if len(data) >= 16 else (-1, 0)
    elif linktype == LINUX_SLL2:
        etype, off = (_u16(data, 0), 20) if len(data) >= 20 else (-1, 0)
    elif linktype in (NULL, LOOP):  # the address family, in the capturing host's byte order for NULL
        if len(data) < 4:
            return "frames shorter than their link header"
        family = min(int.from_bytes(data[:4], "little"), int.from_bytes(data[:4], "big"))
        etype, off = (ETH_IPV4 if family == 2 else ETH_IPV6 if family in (10, 24, 28, 30) else 0), 4
    elif linktype in RAW or linktype in (IPV4, IPV6):
        version = data[0] >> 4 if data else 0
        etype, off = (ETH_IPV4 if version == 4 else ETH_IPV6 if version == 6 else 0), 0
    else:
        return f"packets of link type {linktype}"
    if etype < 0:
        return "frames shorter than their link header"
    while etype in VLAN_TPIDS:  # 802.1Q / QinQ tags: (TPID,) TCI, then the next type
        if len(data) < off + 4:
            return "frames cut inside their VLAN tags"
        etype, off = _u16(data, off + 2), off + 4
    if etype not in (ETH_IPV4, ETH_IPV6):
        return "packets that are not IP (ARP, LLC, ...)"
    return etype, off


@dataclass(slots=True)
class _IP:
    family: int
    src: bytes
    dst: bytes
    proto: int
    payload: bytes  # the captured part
    size: int  # the payload's true size
    fragment: tuple | None = None  # (datagram key, offset, more fragments follow)


def _ipv4(data: bytes, off: int) -> _IP | str:
    if len(data) < off + 20 or len(data) < off + (data[off] & 15) * 4:
        return "packets cut inside their IP header (snapshot length)"
    ihl, total = (data[off] & 15) * 4, _u16(data, off + 2)
    if data[off] >> 4 != 4 or ihl < 20:
        return "malformed IP headers"
    if total == 0:  # segmentation offload: the length was never filled in
        total = len(data) - off
    if total < ihl:
        return "malformed IP headers"
    src, dst, proto = data[off + 12 : off + 16], data[off + 16 : off + 20], data[off + 9]
    ip = _IP(socket.AF_INET, src, dst, proto, data[off + ihl : off + total], total - ihl)
    frag = _u16(data, off + 6)
    if frag & 0x3FFF:  # more fragments, or an offset: a piece of a datagram
        ip.fragment = ((4, src, dst, proto, _u16(data, off + 4)), (frag & 0x1FFF) * 8, bool(frag & 0x2000))
    return ip


def _ipv6(data: bytes, off: int) -> _IP | str:
    if len(data) < off + 40:
        return "packets cut inside their IP header (snapshot length)"
    if data[off] >> 4 != 6:
        return "malformed IP headers"
    plen, nh = _u16(data, off + 4), data[off + 6]
    src, dst = data[off + 8 : off + 24], data[off + 24 : off + 40]
    if plen == 0:  # a jumbogram, or segmentation offload
        plen = len(data) - off - 40
    walked = _extensions(nh, data, off + 40, off + 40 + plen)
    if isinstance(walked, str):
        return walked
    nh, pos, frag = walked
    ip = _IP(socket.AF_INET6, src, dst, nh, data[pos : off + 40 + plen], off + 40 + plen - pos)
    if frag is not None:
        ip.fragment = ((6, src, dst, frag[0]), frag[1], frag[2])
    return ip


def _extensions(nh: int, data: bytes, pos: int, end: int):
    """Walk IPv6 extension headers: (upper protocol, where it starts, fragment info or None)."""
    for _ in range(16):  # more than this is no real packet
        if nh in IPV6_EXTENSIONS or nh == 51:
            if len(data) < pos + 2:
                return "packets cut inside their IP header (snapshot length)"
            hlen = (data[pos + 1] + 2) * 4 if nh == 51 else (data[pos + 1] + 1) * 8  # AH counts in 4 bytes
            nh, pos = data[pos], pos + hlen
        elif nh == 44:  # fragment: what follows is a piece of the rest of the datagram
            if len(data) < pos + 8:
                return "packets cut inside their IP header (snapshot length)"
            word, ident = _u16(data, pos + 2), int.from_bytes(data[pos + 4 : pos + 8], "big")
            return data[pos], pos + 8, (ident, word & 0xFFF8, bool(word & 1))
        elif nh == 50:
            return "IPsec ESP packets (encrypted)"
        else:
            break
        if pos > end:
            return "malformed IP headers"
    return nh, pos, None


class _Fragments:
    """IP datagrams sent in pieces, put back together. Bounded: a datagram that does not
    complete within FRAGMENT_TIMEOUT_NS, or for which there is no room, is given up (counted)."""

    def __init__(self, stats: ReplayStats) -> None:
        self.stats = stats
        # datagram key -> (first piece's ns, [its end once known], [(offset, size, captured bytes)])
        self._open: OrderedDict[tuple, tuple[int, list, list]] = OrderedDict()

    def add(self, ip: _IP, ts: int) -> _IP | None:
        key, offset, more = ip.fragment
        while self._open and (len(self._open) >= MAX_FRAGMENTED and key not in self._open
                              or ts - next(iter(self._open.values()))[0] > FRAGMENT_TIMEOUT_NS):  # fmt: skip
            _, (_, _, pieces) = self._open.popitem(last=False)
            self.stats.skipped["IP fragments of datagrams never completed"] += len(pieces)
        _, end, pieces = self._open.setdefault(key, (ts, [None], []))
        pieces.append((offset, ip.size, ip.payload))
        if not more:
            end[0] = offset + ip.size
        if len(pieces) > MAX_FRAGMENTS or offset + ip.size > 0xFFFF:
            del self._open[key]
            self.stats.skipped["IP fragments of datagrams too large or in too many pieces"] += len(pieces)
            return None
        if end[0] is None:
            return None
        pieces.sort(key=lambda p: p[0])
        covered = 0  # the pieces' true extents must cover the datagram, captured or not
        for offset, size, _ in pieces:
            if offset > covered:
                return None
            covered = max(covered, offset + size)
        if covered < end[0]:
            return None
        del self._open[key]
        data = bytearray()  # the captured bytes run until the first piece the snapshot length cut
        for offset, _, part in pieces:
            if offset > len(data):
                break
            data += part[len(data) - offset :]
        self.stats.reassembled += 1
        return _IP(ip.family, ip.src, ip.dst, ip.proto, bytes(data[: end[0]]), end[0])

    def close(self) -> None:
        for _, _, pieces in self._open.values():
            self.stats.skipped["IP fragments of datagrams never completed"] += len(pieces)
        self._open.clear()


# ---- flows ----


def _ahead(a: int, b: int) -> int:
    """How far seq a is ahead of seq b, in the 32-bit sequence space (negative: behind)."""
    d = (a - b) % _SEQ_MOD
    return d - _SEQ_MOD if d >= _SEQ_MOD // 2 else d


class _Direction:
    """One direction of a TCP connection: segments in any order in, byte ranges out in order,
    each byte once. Ranges waiting behind a gap are bounded; past the bound the gap is a hole."""

    __slots__ = ("awaits_start", "fin_seq", "last_ns", "next_seq", "pending", "pending_bytes", "stats")

    def __init__(self, stats: ReplayStats) -> None:
        self.next_seq: int | None = None  # None: where the stream starts is not known yet
        # The handshake is under way: this side's first byte is told by its SYN, which a
        # capture can show after data it took from another queue. Until then data waits.
        self.awaits_start = False
        self.fin_seq: int | None = None
        self.pending: dict[int, tuple[int, bytes, int]] = {}  # seq -> (size, captured bytes, ns)
        self.pending_bytes = 0
        self.last_ns = 0  # bytes given later are never given earlier: the receiver read them in order
        self.stats = stats

    @property
    def done(self) -> bool:
        return self.fin_seq is not None and self.next_seq == self.fin_seq and not self.pending

    def begin(self, out: list) -> None:
        """No SYN came in time: the stream starts at the earliest byte seen so far."""
        self.awaits_start = False
        if self.next_seq is None and self.pending:
            self.next_seq = self._earliest()
            self._drain(out)

    def start(self, seq: int, out: list) -> None:
        """The first byte's sequence number, from a SYN."""
        self.awaits_start = False
        if self.next_seq is None:
            self.next_seq = seq
            self._drain(out)

    def push(self, seq: int, size: int, data: bytes, ts: int, out: list) -> None:
        if self.next_seq is None and not self.awaits_start:  # the capture began after this side's SYN
            self.next_seq = seq
        if self.next_seq is not None and _ahead(seq, self.next_seq) <= 0:
            self._deliver(seq, size, data, ts, out)
            self._drain(out)
            return
        old = self.pending.get(seq)
        if old is not None and (old[0], len(old[1])) >= (size, len(data)):
            self.stats.duplicates += 1
            return
        self.pending[seq] = (size, data, ts)
        self.pending_bytes += len(data) - (len(old[1]) if old else 0)
        while len(self.pending) > MAX_PENDING_SEGMENTS or self.pending_bytes > MAX_PENDING_BYTES:
            self._skip_gap(out)

    def flush(self, out: list) -> None:
        """Nothing more will come: every gap still open is a hole."""
        while self.pending:
            self._skip_gap(out)

    def _earliest(self) -> int:
        ref = next(iter(self.pending)) if self.next_seq is None else self.next_seq
        return min(self.pending, key=lambda s: _ahead(s, ref))

    def _deliver(self, seq: int, size: int, data: bytes, ts: int, out: list) -> None:
        behind = -_ahead(seq, self.next_seq)  # bytes of it already given: a retransmission
        if behind >= size:
            self.stats.duplicates += 1
            return
        if behind > 0:
            self.stats.overlaps += 1
            seq, size, data = self.next_seq, size - behind, data[behind:]
        self.last_ns = max(self.last_ns, ts)
        out.append((seq, size, data, self.last_ns))
        self.next_seq = (seq + size) % _SEQ_MOD

    def _drain(self, out: list) -> None:
        while self.pending and self.next_seq is not None:
            seq = self._earliest()
            if _ahead(seq, self.next_seq) > 0:
                return
            size, data, ts = self.pending.pop(seq)
            self.pending_bytes -= len(data)
            self._deliver(seq, size, data, ts, out)

    def _skip_gap(self, out: list) -> None:
        seq = self._earliest()
        if self.next_seq is not None:  # else no SYN came in time: the stream starts at the earliest byte seen
            self.last_ns = max(self.last_ns, self.pending[seq][2])
            out.append((self.next_seq, _ahead(seq, self.next_seq), b"", self.last_ns))
            self.stats.holes += 1
        self.next_seq, self.awaits_start = seq, False
        self._drain(out)


@dataclass
class _Flow:
    conn_id: int
    server: tuple[str, int]  # (addr, port): the local side of the records
    client: tuple[str, int]
    family: str
    l4: str
    role: str  # "server" when the handshake said who is who, else "unknown"
    directions: dict = field(default_factory=dict)  # TCP: from_client -> _Direction
    last: dict = field(default_factory=dict)  # UDP: from_client -> (ns, bytes) of the last datagram


@lru_cache(maxsize=4096)
def _text(family: int, raw: bytes) -> str:
    return socket.inet_ntop(family, raw)


class _Replay:
    def __init__(self, stats: ReplayStats) -> None:
        self.stats = stats
        self.flows: OrderedDict[tuple, _Flow] = OrderedDict()  # least recently active first
        self.fragments = _Fragments(stats)
        self.conn_ids = 0
        self.linktypes_skipped: set[int] = set()
        # Flows first seen by their data, waiting for a late SYN: (until packet, key, flow).
        self.unstarted: deque[tuple[int, tuple, _Flow]] = deque()

    def run(self, packets: Iterator[tuple[int, int, bytes]], path) -> Iterator[Record]:
        ts = 0
        for ts, linktype, data in packets:
            self.stats.packets += 1
            try:
                ip = self._ip(linktype, data, ts)
            except (IndexError, ValueError, struct.error):  # hostile bytes past every check above
                ip = "malformed packets"
            if ip is None:
                continue
            if isinstance(ip, str):
                self.stats.skipped[ip] += 1
                continue
            if ip.proto == TCP:
                yield from self._tcp(ip, ts)
                yield from self._begin_unstarted()
            elif ip.proto == UDP:
                yield from self._udp(ip, ts)
            else:
                self.stats.skipped[f"packets of IP protocol {ip.proto} (not TCP or UDP)"] += 1
        self.fragments.close()
        for flow in self.flows.values():  # the capture ends: waiting bytes are given, gaps are holes
            for from_client, half in flow.directions.items():
                out: list = []
                half.flush(out)
                yield from self._data(flow, from_client, out)
        if self.stats.packets and self.stats.skipped.total() == self.stats.packets and self.linktypes_skipped:
            raise _Unreadable(_unreadable_link(min(self.linktypes_skipped)))

    def _ip(self, linktype: int, data: bytes, ts: int) -> _IP | str | None:
        link = _link(linktype, data)
        if isinstance(link, str):
            if linktype not in LINK_TYPES:
                self.linktypes_skipped.add(linktype)
            return link
        etype, off = link
        ip = _ipv4(data, off) if etype == ETH_IPV4 else _ipv6(data, off)
        if isinstance(ip, str) or ip.fragment is None:
            return ip
        whole = self.fragments.add(ip, ts)
        if whole is None:
            return None  # a piece kept: counted with its datagram
        if whole.family == socket.AF_INET6:  # the pieces may start with more extension headers
            walked = _extensions(whole.proto, whole.payload, 0, whole.size)
            if isinstance(walked, str):
                return walked
            nh, pos, frag = walked
            if frag is not None:
                return "malformed IP headers"
            whole.proto, whole.payload, whole.size = nh, whole.payload[pos:], whole.size - pos
        return whole

    def _tcp(self, ip: _IP, ts: int) -> Iterator[Record]:
        p = ip.payload
        if len(p) < 20 or len(p) < (p[12] >> 4) * 4:
            self.stats.skipped["packets cut inside their TCP header (snapshot length)"] += 1
            return
        hlen, flags, seq = (p[12] >> 4) * 4, p[13], int.from_bytes(p[4:8], "big")
        if hlen < 20 or hlen > ip.size:
            self.stats.skipped["malformed TCP headers"] += 1
            return
        a, b = (_text(ip.family, ip.src), _u16(p, 0)), (_text(ip.family, ip.dst), _u16(p, 2))
        key = (a, b, TCP) if a < b else (b, a, TCP)
        flow = self.flows.get(key)
        released: dict[bool, list] = {True: [], False: []}  # from the client? -> byte ranges now in order
        if flags & (SYN | ACK) == SYN:  # a client opens
            if flow is not None and _same_connection(flow, a, seq):  # the SYN again, or late
                flow.directions[a == flow.client].start((seq + 1) % _SEQ_MOD, released[a == flow.client])
            else:
                if flow is not None:  # the ports were reused by a new connection
                    yield from self._close(key, flow, ts)
                yield from self._make_room(ts)
                flow = self.flows[key] = self._new(ip, "tcp", b, a, "server")
                flow.directions[True].start((seq + 1) % _SEQ_MOD, released[True])
                flow.directions[False].awaits_start = True
        elif flags & SYN:  # the server answers: its SYN's sequence number, and the client's
            if flow is None:
                yield from self._make_room(ts)
                flow = self.flows[key] = self._new(ip, "tcp", a, b, "server")
            from_client = a == flow.client
            flow.directions[from_client].start((seq + 1) % _SEQ_MOD, released[from_client])
            flow.directions[not from_client].start(int.from_bytes(p[8:12], "big"), released[not from_client])
        size, data = ip.size - hlen, p[hlen:]
        if flow is None:
            if not size:
                return  # an ACK, FIN or RST of a connection none of whose bytes we have
            # Mid-connection: who serves is a guess (the lower port) that the role "unknown"
            # leaves to the pipeline, which tells requests from responses by their bytes.
            yield from self._make_room(ts)
            server, client = (a, b) if a[1] < b[1] else (b, a)
            flow = self.flows[key] = self._new(ip, "tcp", server, client, "unknown")
            for side in flow.directions.values():
                side.awaits_start = True
            self.unstarted.append((self.stats.packets + REORDER_PACKETS, key, flow))
        self.flows.move_to_end(key)
        from_client = a == flow.client
        half = flow.directions[from_client]
        if flags & SYN:
            seq += 1  # data on a SYN (TCP Fast Open) comes after the SYN's own sequence number
        if size:
            half.push(seq % _SEQ_MOD, size, data, ts, released[from_client])
        if flags & FIN and half.fin_seq is None:
            half.fin_seq = (seq + size) % _SEQ_MOD
            if half.next_seq is None and not half.pending:
                half.next_seq = half.fin_seq
        for direction, out in released.items():
            yield from self._data(flow, direction, out)
        if flags & RST or all(d.done for d in flow.directions.values()):
            yield from self._close(key, flow, ts)

    def _udp(self, ip: _IP, ts: int) -> Iterator[Record]:
        p = ip.payload
        if len(p) < 8:
            self.stats.skipped["packets cut inside their UDP header (snapshot length)"] += 1
            return
        length = _u16(p, 4)
        size = (min(length, ip.size) if length >= 8 else ip.size) - 8  # 0: a jumbogram's, in IPv6
        if size < 0:
            self.stats.skipped["malformed UDP headers"] += 1
            return
        data = p[8 : 8 + size]
        a, b = (_text(ip.family, ip.src), _u16(p, 0)), (_text(ip.family, ip.dst), _u16(p, 2))
        key = (a, b, UDP) if a < b else (b, a, UDP)
        flow = self.flows.get(key)
        if flow is None:  # the first datagram's receiver is taken as the server; the bytes confirm
            yield from self._make_room(ts)
            flow = self.flows[key] = self._new(ip, "udp", b, a, "unknown")
        self.flows.move_to_end(key)
        from_client = a == flow.client
        seen = (size, hash(data))  # not the bytes: 64 KiB per flow would be too much to keep
        last = flow.last.get(from_client)
        if last is not None and last[1] == seen and ts - last[0] <= UDP_DUPLICATE_NS:
            self.stats.duplicates += 1
            return
        flow.last[from_client] = (ts, seen)
        if size:
            yield _record(flow, ts, from_client, 0, size, data)

    def _new(self, ip: _IP, l4: str, server: tuple, client: tuple, role: str) -> _Flow:
        self.conn_ids += 1
        family = "ipv4" if ip.family == socket.AF_INET else "ipv6"
        flow = _Flow(self.conn_ids, server, client, family, l4, role)
        if l4 == "tcp":
            flow.directions = {True: _Direction(self.stats), False: _Direction(self.stats)}
        return flow

    def _begin_unstarted(self) -> Iterator[Record]:
        """Flows first seen by their data that no SYN has started in REORDER_PACKETS packets."""
        while self.unstarted and self.unstarted[0][0] <= self.stats.packets:
            _, key, flow = self.unstarted.popleft()
            if self.flows.get(key) is not flow:
                continue  # closed meanwhile
            for from_client, half in flow.directions.items():
                out: list = []
                half.begin(out)
                yield from self._data(flow, from_client, out)

    def _make_room(self, ts: int) -> Iterator[Record]:
        if len(self.flows) >= MAX_FLOWS:
            key, flow = next(iter(self.flows.items()))
            yield from self._close(key, flow, ts)

    def _close(self, key: tuple, flow: _Flow, ts: int) -> Iterator[Record]:
        del self.flows[key]
        for from_client, half in flow.directions.items():
            out: list = []
            half.flush(out)
            yield from self._data(flow, from_client, out)
        # Not before the last bytes it gives: a capture can hold a connection's packets out of order.
        last = max([ts] + [half.last_ns for half in flow.directions.values()])
        yield _record(flow, last, False, 0, 0, b"", syscall="close")

    def _data(self, flow: _Flow, from_client: bool, out: list) -> Iterator[Record]:
        for seq, size, data, data_ns in out:  # each range at the time it was taken, or read in order
            yield _record(flow, data_ns, from_client, seq, size, data)


def _same_connection(flow: _Flow, a: tuple, seq: int) -> bool:
    """Whether a client's SYN belongs to this flow: sent again, or put by the capture behind
    bytes that follow it (its next byte is at most a little before them). A new connection
    on the same ports starts from another, random, sequence number."""
    half = flow.directions[a == flow.client]
    if flow.role != "unknown" and a != flow.client:
        return False
    return half.next_seq is None or 0 <= _ahead(half.next_seq, (seq + 1) % _SEQ_MOD) <= MAX_PENDING_BYTES


def _record(flow: _Flow, ts: int, from_client: bool, seq: int, size: int, data: bytes,
            syscall: str | None = None) -> Record:  # fmt: skip
    direction = None if syscall else ("ingress" if from_client else "egress")
    seq_end = (seq + size) % _SEQ_MOD if flow.l4 == "tcp" else 0
    flags = FLAG_TRUNCATED if len(data) < size else 0  # the snapshot length cut it, or a hole
    return Record(0, 0, COMM, syscall or ("read" if from_client else "write"), direction, flow.family, flow.l4,
                  flow.server[0], flow.server[1], flow.client[0], flow.client[1], flow.role, flow.conn_id, 0, ts,
                  ts, seq, seq_end, size, size, 0, flags, data)  # fmt: skip
