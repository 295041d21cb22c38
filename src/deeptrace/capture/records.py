"""What the kernel side writes: records (one socket syscall, or connection event) and
exchanges (one request and its response, assembled in the kernel).

`HEADER_FIELDS` mirrors `struct dt_record` in agent/bpf/deeptrace.h, field for field,
`EXCHANGE_FIELDS` its `struct dt_exchange` and `CONFIG_FIELDS` its `struct dt_config`;
tests/test_layout.py checks them against the BTF of the compiled object. The other
constants mirror that header's enums and bounds, and the same test checks every one.
"""

from __future__ import annotations

import base64
import socket
import struct
import time
from dataclasses import dataclass

import numpy as np

MAX_CAPTURE = 16384  # DT_MAX_CAPTURE
MAX_IOV = 64  # DT_MAX_IOV
MAX_MMSG = 8  # DT_MAX_MMSG
TASK_COMM_LEN = 16  # DT_TASK_COMM_LEN
XHEAD_MAX = 512  # DT_XHEAD_MAX: payload head per message of an exchange, at most
SAMPLE_SHIFT_MAX = 10  # DT_SAMPLE_SHIFT_MAX: sampling keeps at least 1 connection in 2^10
DNS_PORTS = 4  # DT_DNS_PORTS: UDP ports whose datagrams the kernel pairs as DNS, at most

# (name, struct format) in the order of struct dt_record; little-endian, no padding
# (the C struct has none: every field is naturally aligned).
HEADER_FIELDS: tuple[tuple[str, str], ...] = (
    ("enter_ns", "Q"),
    ("exit_ns", "Q"),
    ("conn_id", "Q"),
    ("ret", "q"),
    ("tgid", "I"),
    ("tid", "I"),
    ("enter_seq", "I"),
    ("exit_seq", "I"),
    ("size", "I"),
    ("captured", "I"),
    ("fd", "I"),
    ("lport", "H"),
    ("rport", "H"),
    ("laddr", "16s"),
    ("raddr", "16s"),
    ("syscall", "B"),
    ("direction", "B"),
    ("family", "B"),
    ("l4", "B"),
    ("role", "B"),
    ("flags", "B"),
    ("msg_index", "B"),
    ("sample_shift", "B"),
    ("comm", f"{TASK_COMM_LEN}s"),
)
HEADER = struct.Struct("<" + "".join(fmt for _, fmt in HEADER_FIELDS))
HEADER_SIZE = HEADER.size  # 120

# enum dt_syscall, index = value
SYSCALLS = (
    "?", "read", "readv", "recvfrom", "recvmsg", "recvmmsg",
    "write", "writev", "sendto", "sendmsg", "sendmmsg",
    "connect", "accept", "close",
    "ssl_read", "ssl_write", "gnutls_recv", "gnutls_send", "go_tls_read", "go_tls_write",
)  # fmt: skip
DATA_SYSCALLS = SYSCALLS[1:11]
# The TLS library each plaintext "syscall" (a library call, FLAG_TLS) is read at.
TLS_LIBRARIES = {"ssl_read": "openssl", "ssl_write": "openssl", "gnutls_recv": "gnutls",
                 "gnutls_send": "gnutls", "go_tls_read": "go", "go_tls_write": "go"}  # fmt: skip
DIRECTIONS = (None, "ingress", "egress")  # enum dt_direction
ROLES = ("unknown", "client", "server")  # enum dt_role
FAMILIES = {2: "ipv4", 10: "ipv6"}
L4 = {6: "tcp", 17: "udp"}

# enum dt_flags
FLAG_TRUNCATED = 1
FLAG_PAYLOAD_FAULT = 2
FLAG_ADDR_FROM_CALL = 4
FLAG_ASSEMBLED = 8  # several calls' bytes, which the kernel held before handing the connection over
FLAG_HANDED_OVER = 16  # no bytes: the kernel hands the connection over; msg_index is its EXCHANGE_PROTOCOLS index
# Plaintext a TLS library call moved; [enter_seq, exit_seq) is the ciphertext's TCP range (empty: the
# call returned bytes its library had read before).
FLAG_TLS = 32
FLAG_SAMPLED_OUT = 128  # the kernel's mark of a record it does not write (never seen here)

# enum dt_xproto, index = value: protocols whose exchanges the kernel assembles
EXCHANGE_PROTOCOLS = (None, "http1", "redis", "memcached", "dns")

# enum dt_xflags: an exchange's flags
XFLAG_DATAGRAM = 1  # over UDP: no TCP sequence numbers
XFLAG_UNANSWERED = 2  # a request alone: another of its id took its place (records path: "too many requests waiting")
XFLAG_CLOSED = 4  # with XFLAG_UNANSWERED: its socket closed first (records path: "connection closed")

# enum dt_counter, index = value. Names starting with "drop_" are data lost.
COUNTERS = (
    "submitted",
    "drop_ringbuf_full",
    "drop_args_map_full",
    "drop_conn_map_full",
    "drop_mmsg_overflow",
    "drop_pids_map_full",
    "skip_not_socket",
    "skip_not_inet",
    "truncated",
    "payload_fault",
    "exchanges",
    "drop_exchange_ringbuf_full",
    "drop_exchange_state_lost",
    "conn_assembled",
    "conn_handed_over",
    "sampled_records",
    "sampled_exchanges",
    "conn_sampled_out",
    "dns_pending_full",
    "tls_ciphertext",
    "tls_plaintext",
    "drop_tls_no_socket",
)

# (name, struct format) in the order of struct dt_config, the programs' read-only CFG.
CONFIG_FIELDS: tuple[tuple[str, str], ...] = (
    ("capture_bytes", "I"),
    ("trace_all", "I"),
    ("agent_tgid", "I"),
    ("follow_forks", "I"),
    ("wakeup_records", "Q"),
    ("exchange_protocols", "I"),
    ("exchange_head", "I"),
    ("dns_ports", f"{DNS_PORTS}H"),
    ("sample_on_fill", "I"),
    ("pad", "I"),
)
CONFIG = struct.Struct("<" + "".join(fmt for _, fmt in CONFIG_FIELDS))

# (name, struct format) in the order of struct dt_exchange; no padding but `pad`.
EXCHANGE_FIELDS: tuple[tuple[str, str], ...] = (
    ("start_ns", "Q"),
    ("end_ns", "Q"),
    ("conn_id", "Q"),
    ("tgid", "I"),
    ("req_tid", "I"),
    ("resp_tid", "I"),
    ("req_seq", "I"),
    ("resp_seq", "I"),
    ("req_size", "I"),
    ("resp_size", "I"),
    ("lport", "H"),
    ("rport", "H"),
    ("laddr", "16s"),
    ("raddr", "16s"),
    ("status", "H"),
    ("req_captured", "H"),
    ("resp_captured", "H"),
    ("family", "B"),
    ("role", "B"),
    ("protocol", "B"),
    ("flags", "B"),
    ("sample_shift", "B"),
    ("pad", "5s"),
    ("comm", f"{TASK_COMM_LEN}s"),
)
EXCHANGE_SIZE = struct.calcsize("<" + "".join(fmt for _, fmt in EXCHANGE_FIELDS))  # 120

# enum dt_xphase, index = value: where an assembled connection is within its exchange.
PHASES = ("idle", "req", "wait", "resp", "resp_chunked", "handed")

# (name, struct format) in the order of struct dt_xstate, the XSTATE map's value: the
# exchange in the making (`x`, then the two heads: read as an exchange event), and the
# kernel's own state of it.
XSTATE_FIELDS: tuple[tuple[str, str], ...] = (
    ("x", f"{EXCHANGE_SIZE}s"),
    ("heads", f"{2 * XHEAD_MAX}s"),
    ("req_end_ns", "Q"),
    ("resp_start_ns", "Q"),
    ("owner", "Q"),
    ("broken", "Q"),
    ("left", "I"),
    ("chunk_left", "I"),
    ("phase", "B"),
    ("head_request", "B"),
    ("last_chunk", "B"),
    ("sampled_out", "B"),
    ("hash", "I"),
    ("with_cas", "B"),
    ("framed", "B"),
    ("pad", "6s"),
)
XSTATE = struct.Struct("<" + "".join(fmt for _, fmt in XSTATE_FIELDS))

# (name, struct format) in the order of struct dt_dns_key, the DNSPEND map's key (a DNS query
# the kernel holds, whose value is an XSTATE).
DNS_KEY_FIELDS: tuple[tuple[str, str], ...] = (
    ("conn_id", "Q"),
    ("raddr", "16s"),
    ("rport", "H"),
    ("id", "H"),
    ("tgid", "I"),
)
DNS_KEY = struct.Struct("<" + "".join(fmt for _, fmt in DNS_KEY_FIELDS))


def _offset(fields: tuple[tuple[str, str], ...], name: str) -> int:
    before = [fmt for n, fmt in fields[: [n for n, _ in fields].index(name)]]
    return struct.calcsize("<" + "".join(before))


XSTATE_REQ_END_AT = _offset(XSTATE_FIELDS, "req_end_ns")
XSTATE_PHASE_AT = _offset(XSTATE_FIELDS, "phase")
XSTATE_SAMPLED_OUT_AT = _offset(XSTATE_FIELDS, "sampled_out")

_NUMPY = {"Q": "<u8", "I": "<u4", "H": "<u2", "B": "u1"}


def exchange_dtype(head: int) -> np.dtype:
    """One exchange sample as numpy sees it: struct dt_exchange, then `head` bytes of the
    request's head and as many of the response's."""
    fields = [(name, _NUMPY.get(fmt) or f"V{fmt[:-1]}") for name, fmt in EXCHANGE_FIELDS]
    return np.dtype(fields + [("req_head", f"V{head}"), ("resp_head", f"V{head}")])


@dataclass(slots=True)
class Record:
    """One socket syscall (data) or connection event (connect/accept/close)."""

    tgid: int
    tid: int
    comm: str
    syscall: str
    direction: str | None  # "ingress", "egress", or None for connection events
    family: str  # "ipv4" | "ipv6"
    l4: str  # "tcp" | "udp"
    laddr: str
    lport: int
    raddr: str
    rport: int
    role: str  # "client", "server" or "unknown" (connection older than the agent)
    conn_id: int
    fd: int
    enter_ns: int  # wall clock, ns since the epoch
    exit_ns: int
    enter_seq: int  # TCP only: [enter_seq, exit_seq) are the bytes of this call
    exit_seq: int
    ret: int  # the syscall's return value
    size: int  # bytes the message carried (true size, even when truncated)
    msg_index: int  # position in a sendmmsg/recvmmsg batch
    flags: int
    payload: bytes  # the first `captured` bytes
    sample_shift: int = 0  # its connection was kept with probability 1/2^sample_shift (sampling)

    @property
    def captured(self) -> int:
        return len(self.payload)

    @property
    def truncated(self) -> bool:
        return bool(self.flags & FLAG_TRUNCATED)

    def to_json_dict(self) -> dict:
        return {
            "tgid": self.tgid,
            "tid": self.tid,
            "comm": self.comm,
            "syscall": self.syscall,
            "direction": self.direction,
            "family": self.family,
            "l4": self.l4,
            "laddr": self.laddr,
            "lport": self.lport,
            "raddr": self.raddr,
            "rport": self.rport,
            "role": self.role,
            "conn_id": self.conn_id,
            "fd": self.fd,
            "enter_ns": self.enter_ns,
            "exit_ns": self.exit_ns,
            "enter_seq": self.enter_seq,
            "exit_seq": self.exit_seq,
            "ret": self.ret,
            "size": self.size,
            "captured": self.captured,
            "truncated": self.truncated,
            "msg_index": self.msg_index,
            "sample_shift": self.sample_shift,
            "payload_b64": base64.b64encode(self.payload).decode(),
        }


def format_text(rec: Record, payload_chars: int = 60) -> str:
    """One human-readable line: when, who, what, where, how much, and the payload head."""
    clock = time.strftime("%H:%M:%S", time.localtime(rec.exit_ns // 1_000_000_000))
    arrow = {"ingress": "<-", "egress": "->"}.get(rec.direction, "--")
    head = repr(rec.payload[:payload_chars])[2:-1]
    size = f"{rec.size}B" + (f" (captured {rec.captured})" if rec.truncated else "")
    return (
        f"{clock}.{rec.exit_ns // 1000 % 1_000_000:06d} {rec.comm}[{rec.tgid}/{rec.tid}] {rec.syscall} "
        f"{rec.l4} {rec.laddr}:{rec.lport} {arrow} {rec.raddr}:{rec.rport} {rec.role} {size} {head}"
    ).rstrip()


def monotonic_to_wall_offset() -> int:
    """ns to add to a kernel CLOCK_MONOTONIC stamp to get wall-clock time."""
    return time.time_ns() - time.monotonic_ns()


class RecordDecoder:
    """Decodes ring-buffer samples into Records.

    Addresses and process names repeat across records of a connection, so their
    text forms are cached (bounded) rather than formatted for every record.
    """

    _CACHE_LIMIT = 8192

    def __init__(self, wall_offset_ns: int | None = None):
        self.wall_offset_ns = monotonic_to_wall_offset() if wall_offset_ns is None else wall_offset_ns
        self._addr_cache: dict[tuple[int, bytes], str] = {}
        self._comm_cache: dict[bytes, str] = {}

    def _addr(self, family: int, raw: bytes) -> str:
        key = (family, raw)
        text = self._addr_cache.get(key)
        if text is None:
            if len(self._addr_cache) >= self._CACHE_LIMIT:
                self._addr_cache.clear()
            if family == socket.AF_INET6:
                text = socket.inet_ntop(socket.AF_INET6, raw)
            else:
                text = socket.inet_ntop(socket.AF_INET, raw[:4])
            self._addr_cache[key] = text
        return text

    def _comm(self, raw: bytes) -> str:
        text = self._comm_cache.get(raw)
        if text is None:
            if len(self._comm_cache) >= self._CACHE_LIMIT:
                self._comm_cache.clear()
            text = raw.split(b"\0", 1)[0].decode(errors="replace")
            self._comm_cache[raw] = text
        return text

    def decode(self, buf, offset: int = 0) -> Record:
        """Decode the sample that starts at `offset` of `buf` (bytes, mmap or memoryview)."""
        (enter_ns, exit_ns, conn_id, ret, tgid, tid, enter_seq, exit_seq, size, captured, fd,
         lport, rport, laddr, raddr, syscall, direction, family, l4, role, flags, msg_index,
         sample_shift, comm) = HEADER.unpack_from(buf, offset)  # fmt: skip
        start = offset + HEADER_SIZE
        wall = self.wall_offset_ns
        return Record(
            tgid,
            tid,
            self._comm(comm),
            SYSCALLS[syscall] if syscall < len(SYSCALLS) else str(syscall),
            DIRECTIONS[direction] if direction < len(DIRECTIONS) else None,
            FAMILIES.get(family, str(family)),
            L4.get(l4, str(l4)),
            self._addr(family, laddr),
            lport,
            self._addr(family, raddr),
            rport,
            ROLES[role] if role < len(ROLES) else "unknown",
            conn_id,
            fd,
            enter_ns + wall,
            exit_ns + wall,
            enter_seq,
            exit_seq,
            ret,
            size,
            msg_index,
            flags,
            bytes(buf[start : start + captured]),
            sample_shift,
        )
