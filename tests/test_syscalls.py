"""Each of the ten data syscalls, on real TCP and UDP sockets over IPv4 and IPv6,
traced by the real kernel programs: what the records say must be what happened."""

from __future__ import annotations

import pytest
from conftest import RecordStore, Tracee, require_bpf

from deeptrace.agent.collector import COMPAT_OBJECT, Collector, CollectorConfig
from deeptrace.agent.selection import Selection
from deeptrace.capture.records import DATA_SYSCALLS

INGRESS = {"read", "readv", "recvfrom", "recvmsg", "recvmmsg"}

TRANSPORTS = [
    ("tcp", "ipv4"),
    ("tcp", "ipv6"),
    ("udp", "ipv4"),  # connected UDP: addresses from the socket
    ("udp-unconnected", "ipv6"),  # addresses from the syscall's sockaddr
    ("udp-unconnected", "ipv4"),
]


def _count(syscall):
    return lambda recs: sum(r.syscall == syscall for r in recs) >= (2 if syscall.endswith("mmsg") else 1)


# write/writev cannot send on an unconnected UDP socket: there is no destination.
CASES = [
    (syscall, transport, family)
    for syscall in DATA_SYSCALLS
    for transport, family in TRANSPORTS
    if not (transport == "udp-unconnected" and syscall in ("write", "writev"))
]
# read/readv on an unconnected UDP socket do not say who sent the datagram.
NO_PEER = {("read", "udp-unconnected"), ("readv", "udp-unconnected")}


@pytest.mark.parametrize("syscall,transport,family", CASES)
def test_data_syscall_record(traced_run, syscall, transport, family):
    info, recs = traced_run("io", syscall, family, transport, 300, predicate=_count(syscall))
    assert_io_records(info, recs, syscall, transport, family)


# The object for kernels without bpf_rdonly_cast reads the same fields another way.
COMPAT_CASES = [("read", "tcp", "ipv4"), ("writev", "tcp", "ipv6"), ("recvmsg", "udp-unconnected", "ipv6"),
                ("sendmmsg", "tcp", "ipv4"), ("recvmmsg", "udp", "ipv4")]  # fmt: skip


@pytest.fixture(scope="module")
def compat_store():
    require_bpf()
    with Collector(CollectorConfig(selection=Selection(), bpf_object=COMPAT_OBJECT)) as c:
        yield RecordStore(c)


@pytest.mark.parametrize("syscall,transport,family", COMPAT_CASES)
def test_compat_object_gives_the_same_records(compat_store, syscall, transport, family):
    t = Tracee("io", syscall, family, transport, 300)
    compat_store.collector.trace(t.pid)
    info = t.go()
    recs = compat_store.wait_for(t.pid, _count(syscall))
    assert_io_records(info, recs, syscall, transport, family)


def assert_io_records(info, recs, syscall, transport, family):
    messages = [bytes.fromhex(m) for m in info["messages"]]
    mine = sorted((r for r in recs if r.syscall == syscall), key=lambda r: r.msg_index)
    assert len(mine) == len(messages), [(r.syscall, r.size) for r in recs]

    ingress = syscall in INGRESS
    here, peer = (info["receiver"], info["sender"]) if ingress else (info["sender"], info["receiver"])
    for i, (rec, msg) in enumerate(zip(mine, messages)):
        assert rec.tgid == info["pid"] and rec.tid == info["pid"]
        assert rec.comm.startswith("python")
        assert rec.direction == ("ingress" if ingress else "egress")
        assert rec.l4 == ("tcp" if transport == "tcp" else "udp")
        assert rec.family == family
        assert (rec.laddr, rec.lport) == tuple(here)
        if (syscall, transport) in NO_PEER:
            assert (rec.raddr, rec.rport) == ("::" if family == "ipv6" else "0.0.0.0", 0)
        else:
            assert (rec.raddr, rec.rport) == tuple(peer)
        assert rec.size == len(msg)
        assert rec.payload == msg
        assert not rec.truncated
        assert rec.msg_index == (i if syscall.endswith("mmsg") else 0)
        assert rec.conn_id != 0
        assert 0 < rec.enter_ns <= rec.exit_ns
        if transport == "tcp":
            assert (rec.exit_seq - rec.enter_seq) % 2**32 == len(msg)
        else:
            assert rec.enter_seq == rec.exit_seq == 0
    if transport == "tcp" and len(mine) == 2:  # one mmsg call: consecutive byte ranges
        assert mine[0].exit_seq == mine[1].enter_seq


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_tcp_seq_ranges_join_client_write_and_server_read(traced_run, family):
    info, recs = traced_run("seq", family, 200, predicate=lambda rs: any(r.syscall == "read" for r in rs))
    write = next(r for r in recs if r.syscall == "write")
    read = next(r for r in recs if r.syscall == "read")
    assert (write.enter_seq, write.exit_seq) == (read.enter_seq, read.exit_seq)
    assert (write.exit_seq - write.enter_seq) % 2**32 == 200
    # Two ends of one connection: mirrored 4-tuples, distinct ids, and roles from connect/accept.
    assert (write.laddr, write.lport, write.raddr, write.rport) == (read.raddr, read.rport, read.laddr, read.lport)
    assert write.role == "client" and read.role == "server"
    assert write.conn_id != read.conn_id
    connect = next(r for r in recs if r.syscall == "connect")
    accept = next(r for r in recs if r.syscall == "accept")
    assert connect.conn_id == write.conn_id and accept.conn_id == read.conn_id
    assert connect.direction is None and (connect.raddr, connect.rport) == tuple(info["server"])
    assert accept.ret == read.fd


def test_large_message_is_truncated_with_true_size(traced_run):
    info, recs = traced_run("io", "write", "ipv4", "tcp", 5000, predicate=_count("write"))
    rec = next(r for r in recs if r.syscall == "write")
    msg = bytes.fromhex(info["messages"][0])
    assert rec.size == rec.ret == 5000
    assert rec.captured == 1024 and rec.truncated
    assert rec.payload == msg[:1024]
    assert (rec.exit_seq - rec.enter_seq) % 2**32 == 5000


def test_vectored_truncation_gathers_in_order(traced_run):
    info, recs = traced_run("io", "writev", "ipv6", "tcp", 3000, predicate=_count("writev"))
    rec = next(r for r in recs if r.syscall == "writev")
    assert rec.size == 3000 and rec.captured == 1024 and rec.truncated
    assert rec.payload == bytes.fromhex(info["messages"][0])[:1024]
