"""DNS over UDP paired in the kernel, against the records path (tests/twins.py).

On the configured DNS ports (CollectorConfig.dns_ports), the kernel holds each query, keyed
by socket, peer and id, until a response comes the other way, and writes the two as one
exchange event; anything else (a datagram that is not a DNS header, a second query of an id
it holds, a response to no query it holds) goes to user space as a record. The rule: the
same spans either way, never a wrong pairing; queries nobody answers end as timeouts (the
agent's sweep) or as the agent stopping ends them.

Clients and servers we did not write: dig (BIND's), Node's resolver (c-ares, on an event
loop), glibc's getaddrinfo (`getent`; A and AAAA in one sendmmsg) and dnsmasq. Raw sockets
for what they do not do on demand: retries, silence, late and doubled answers, bytes that
are no DNS.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections import Counter

import pytest
from servers import dnsmasq, free_port, need
from twins import Twin, assembling_collector, assert_same_spans, names

PORT = free_port()  # dnsmasq's in this module: the kernel pairs DNS on it
RAW_PORT = free_port()  # a server of raw sockets', as well


@pytest.fixture(scope="module")
def assembling():
    c = assembling_collector(("dns",), dns_ports=(PORT, RAW_PORT))
    yield c
    c.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with dnsmasq(tmp_path_factory.mktemp("dnsmasq"), port=PORT) as (pid, _):
        yield pid



def run_traced(twin: Twin, argv: list[str], timeout_s: float = 30.0) -> str:
    """A client traced by both collectors from its first instruction."""
    proc = subprocess.Popen(["sh", "-c", 'read _ && exec "$@"', "sh", *argv], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    twin.trace(proc.pid)
    proc.stdin.write("\n")
    proc.stdin.flush()
    twin.run(proc, timeout_s)
    out = proc.stdout.read()
    assert proc.wait() == 0, (argv, out)
    return out


def kernel_counts(twin: Twin) -> dict[str, int]:
    d = twin.check_counters()
    assert not twin.record_spans, [(s.name, s.status_code) for s in twin.record_spans]
    return d


def test_dig_and_dnsmasq_both_sides_are_kernel_exchanges_and_the_same_spans(twin, server):
    twin.trace(server)
    for args in (["web.test"], ["web.test", "AAAA"], ["missing.test"], ["web.test", "MX"]):
        run_traced(twin, [need("dig"), "@127.0.0.1", "-p", str(PORT), "+tries=1", "+short", *args])
    twin.close()
    assert_same_spans(twin)
    kernel_counts(twin)
    sides = {kind: Counter((s.name, s.status_code) for s in twin.exchange_spans if s.kind == kind)
             for kind in ("CLIENT", "SERVER")}  # fmt: skip
    assert sides["CLIENT"] == sides["SERVER"]
    # dnsmasq's --address answers other types of the name with NXDOMAIN.
    assert sides["CLIENT"] == Counter({("DNS A web.test", "NOERROR"): 1, ("DNS AAAA web.test", "NXDOMAIN"): 1,
                                       ("DNS A missing.test", "NXDOMAIN"): 1, ("DNS MX web.test", "NXDOMAIN"): 1})
    a = [s for s in twin.exchange_spans if s.name == "DNS A web.test"]
    assert all(s.attributes["dns.answers"] == 1 and s.req_seq is None and s.resp_seq is None for s in a)
    server_a = next(s for s in a if s.kind == "SERVER")
    client_a = next(s for s in a if s.kind == "CLIENT")
    assert (server_a.endpoint.lport, server_a.endpoint.rport) == (client_a.endpoint.rport, client_a.endpoint.lport)


NODE_CLIENT = """
const dns = require('dns');
const r = new dns.promises.Resolver({timeout: 2000, tries: 1});
r.setServers(['127.0.0.1:%d']);
(async () => {
  // In flight together on one event loop: c-ares sends each on its own as it goes.
  const names = [];
  for (let i = 0; i < 40; i++) names.push(i %% 4 === 3 ? `gone${i}.test` : 'web.test');
  const out = await Promise.allSettled(names.map((n, i) => i %% 2 ? r.resolve4(n) : r.resolve6(n)));
  console.log(out.filter(o => o.status === 'fulfilled').length);
})();
"""


def question(head: bytes) -> bytes:
    """The first question of a DNS message, as bytes: its name's labels, type and class."""
    at = 12
    while head[at]:
        at += 1 + head[at]
    return head[12 : at + 5]


def test_node_resolver_many_lookups_in_flight_are_paired_by_id(twin, server):
    twin.trace(server)
    run_traced(twin, ["node", "-e", NODE_CLIENT % PORT])
    twin.close()
    assert_same_spans(twin)
    kernel_counts(twin)
    client = [s for s in twin.exchange_spans if s.kind == "CLIENT"]
    assert len(client) == 40
    # Every span's response answers its own question: a wrong pairing would mix names and codes.
    for s in client:
        assert question(s.req_head) == question(s.resp_head), s
        assert s.req_head[:2] == s.resp_head[:2], s  # the id
        # dnsmasq: web.test has an A record only; the gone names have none.
        found = s.attributes["dns.question.name"] == "web.test" and s.attributes["dns.question.type"] == "A"
        assert (s.status_code == "NOERROR") == found, s
    assert names(client)["DNS AAAA web.test"] == 20 and names(client)["DNS A web.test"] == 10


def test_glibc_getaddrinfo_sends_a_and_aaaa_in_one_sendmmsg_both_paired(twin, tmp_path):
    """getent in a network namespace of its own, where a dnsmasq answers on port 53 and
    /etc/resolv.conf (a bind mount in its own mount namespace) points at it."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions attempts:1 timeout:2\n")
    script = textwrap.dedent(f"""
        set -e
        ip link set lo up
        mount --bind {resolv} /etc/resolv.conf
        {need("dnsmasq")} --port=53 --listen-address=127.0.0.1 --bind-interfaces --no-resolv --no-hosts \\
            --conf-file=/dev/null --pid-file={tmp_path}/dnsmasq.pid --local=/test/ --address=/web.test/10.1.2.3
        for i in $(seq 50); do getent ahosts web.test >/dev/null 2>&1 && break; sleep 0.1; done
        getent ahosts web.test
        getent ahosts gone.test || true
        kill $(cat {tmp_path}/dnsmasq.pid)
    """)
    # The module's collector pairs DNS on PORT and RAW_PORT; a host's resolver uses 53.
    with _collector_on_port_53(twin):
        out = run_traced(twin, ["unshare", "--mount", "--net", "--propagation", "private", "sh", "-c", script])
        twin.close()
        assert "10.1.2.3" in out
        assert_same_spans(twin)
        kernel_counts(twin)
    client = Counter((s.kind, s.name, s.status_code) for s in twin.exchange_spans if s.endpoint.rport == 53)
    assert client[("CLIENT", "DNS A web.test", "NOERROR")] >= 1
    assert client[("CLIENT", "DNS AAAA web.test", "NXDOMAIN")] >= 1  # dnsmasq: web.test has an A record only
    assert client[("CLIENT", "DNS A gone.test", "NXDOMAIN")] == 1
    assert twin.plain_syscalls["sendmmsg"], "glibc sent its queries one by one: the batch path was not exercised"


class _collector_on_port_53:
    """Swap the twin's assembling collector for one that pairs DNS on port 53, for one test."""

    def __init__(self, twin: Twin):
        self.twin = twin

    def __enter__(self):
        self.saved = self.twin.asm
        self.twin.asm = assembling_collector(("dns",), dns_ports=(53,))
        self.twin.before = self.twin.asm.counters()

    def __exit__(self, *exc):
        self.twin.asm.close()
        self.twin.asm = self.saved


RAW = """
import random, socket, struct, sys, time

port = {port}

def query(ident, name, qtype=1, flags=0x0100):
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\\0"
    return struct.pack("!HHHHHH", ident, flags, 1, 0, 0, 0) + q + struct.pack("!HH", qtype, 1)

def answer(q, rcode=0, answers=1):
    ident, flags = struct.unpack_from("!HH", q)
    rr = b"\\xc0\\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([10, 1, 2, 3])
    return struct.pack("!HHHHHH", ident, 0x8180 | rcode, 1, answers, 0, 0) + q[12:] + rr * answers

def served(srv, n):
    got = []
    for _ in range(n):
        data, peer = srv.recvfrom(4096)
        got.append((data, peer))
    return got

def asked(ident, name, qtype=1, **how):  # one query from cli, read by srv, answered, the answer read
    cli.sendto(query(ident, name, qtype), to)
    (q, peer), = served(srv, 1)
    srv.sendto(answer(q, **how), peer)
    cli.recvfrom(4096)

for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    srv = socket.socket(family, socket.SOCK_DGRAM)
    srv.bind((host, port))
    cli = socket.socket(family, socket.SOCK_DGRAM)  # unconnected: sendto/recvfrom name the peer
    cli.settimeout(5)
    to = (host, port)
    {body}
    cli.close()
    srv.close()
"""

def raw_program(scenario: str) -> str:
    """RAW with this scenario as the body of its loop over the two families."""
    return RAW.format(port=RAW_PORT, body=textwrap.indent(textwrap.dedent(scenario), "    ").strip())


SCENARIO = """
    # An answered query.
    asked(1, "one.test")
    # A retry with the same id before the answer: the answer pairs with the retry (spans.Pairing).
    cli.sendto(query(2, "retry.test"), to)
    cli.sendto(query(2, "retry.test"), to)
    (q, peer), _ = served(srv, 2)
    srv.sendto(answer(q, rcode=3, answers=0), peer)
    cli.recvfrom(4096)
    # Never answered.
    cli.sendto(query(3, "silent.test", qtype=28), to)
    served(srv, 1)
    # Answered twice: the second is nobody's.
    cli.sendto(query(4, "twice.test"), to)
    (q, peer), = served(srv, 1)
    srv.sendto(answer(q), peer)
    srv.sendto(answer(q), peer)
    cli.recvfrom(4096)
    cli.recvfrom(4096)
    # A sound header whose question is bytes; and a response to no query.
    cli.sendto(struct.pack("!HHHHHH", 5, 0x0100, 1, 0, 0, 0) + bytes([63]) + b"\\xff" * 20, to)
    served(srv, 1)
    srv.sendto(answer(query(99, "nobody.test")), cli.getsockname())
    cli.recvfrom(4096)
    # Bytes that are no DNS at all, both ways.
    rnd = random.Random(7)
    for n in range(40):
        cli.sendto(bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 80))), to)
    for data, peer in served(srv, 40):
        srv.sendto(data[::-1], peer)
    for _ in range(40):
        cli.recvfrom(4096)
    # And one more answered query after all that.
    asked(6, "after.test", 28, answers=0)
"""


def test_raw_retries_silence_doubled_answers_and_hostile_bytes_over_ipv4_and_ipv6(twin):
    run_traced(twin, [sys.executable, "-c", raw_program(SCENARIO)])
    twin.close()
    assert_same_spans(twin)
    twin.check_counters()
    for family in (False, True):  # each span, on each side, once per family
        spans = [s for s in twin.asm_spans if (":" in s.endpoint.laddr) == family]
        got = Counter((s.kind, s.name, s.status, s.status_code) for s in spans)
        for kind in ("CLIENT", "SERVER"):
            assert got[(kind, "DNS A one.test", "ok", "NOERROR")] == 1, got
            assert got[(kind, "DNS A retry.test", "error", "NXDOMAIN")] == 1, got
            assert got[(kind, "DNS A retry.test", "error", "too many requests waiting")] == 1, got
            assert got[(kind, "DNS AAAA silent.test", "error", "connection closed")] == 1, got
            assert got[(kind, "DNS A twice.test", "ok", "NOERROR")] == 1, got
            assert got[(kind, "DNS AAAA after.test", "ok", "NOERROR")] == 1, got
        # All paired in the kernel: the retry took the first query's place there too.
        kernel = Counter((s.kind, s.name, s.status_code) for s in twin.exchange_spans
                         if (":" in s.endpoint.laddr) == family)  # fmt: skip
        assert kernel[("CLIENT", "DNS A retry.test", "NXDOMAIN")] == 1
        assert kernel[("CLIENT", "DNS A retry.test", "too many requests waiting")] == 1
        assert kernel[("CLIENT", "DNS A twice.test", "NOERROR")] == 1
    # Never answered, held in the kernel until its socket closed: both sides, both families.
    closed = [s for s in twin.exchange_spans if s.status_code == "connection closed"]
    assert names(closed)["DNS AAAA silent.test"] == 4 and not twin.held_spans
    assert twin.p_asm.stats.orphan_responses == twin.p_plain.stats.orphan_responses >= 4


LATE = """
    cli.sendto(query(7, "late.test"), to)
    (q, peer), = served(srv, 1)
    sys.stdout.write("asked\\n"); sys.stdout.flush()
    sys.stdin.readline()  # the test sweeps the kernel's held queries meanwhile
    srv.sendto(answer(q), peer)
    cli.recvfrom(4096)
    asked(8, "next.test")
    break
"""


def test_a_query_past_the_timeout_is_swept_once_and_its_late_answer_pairs_with_nothing(twin):
    code = raw_program(LATE)
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline()\n" + code],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    twin.trace(proc.pid)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "asked\n"
    twin.settle()
    time.sleep(0.05)
    swept = []
    for _ in range(2):  # the second sweep finds nothing: the first took the query out
        events, ends = twin.asm.waiting_exchanges(time.monotonic_ns())
        ours = [t in twin.tgids for t in events["tgid"].tolist()]
        swept += twin.p_asm.expire_exchanges(events[ours], [e for e, o in zip(ends, ours) if o],
                                             twin.asm.wall_offset_ns)  # fmt: skip
    assert sorted((s.kind, s.name, s.status_code) for s in swept) == [
        ("CLIENT", "DNS A late.test", "timeout"), ("SERVER", "DNS A late.test", "timeout")]  # fmt: skip
    assert all(s.attributes["deeptrace.no_response"] == "timeout" for s in swept)
    proc.stdin.write("\n")
    proc.stdin.flush()
    twin.run(proc)
    assert proc.wait() == 0
    twin.close()
    late = [s for s in twin.asm_spans if "late.test" in s.name]
    assert late == [], "the late answer made a span: its query was reported already"
    assert twin.p_asm.stats.orphan_responses == 2  # the late answer, as each side saw it
    assert Counter((s.kind, s.name, s.status) for s in twin.exchange_spans) == Counter(
        {("CLIENT", "DNS A next.test", "ok"): 1, ("SERVER", "DNS A next.test", "ok"): 1})  # fmt: skip


MANY = """
    for ident in range(64):
        asked(ident, f"n{ident}.test")
    break
"""


def test_sampling_keeps_the_same_queries_on_both_ends_and_weighs_them(twin):
    twin.asm.set_sample_level(2)
    try:
        run_traced(twin, [sys.executable, "-c", raw_program(MANY)])
        twin.close()
    finally:
        twin.asm.set_sample_level(0)
    d = twin.delta()
    kept = twin.exchange_spans
    assert d["exchanges"] == len(kept) and 0 < len(kept) < 128
    assert twin.asm.counters()["sampled_exchanges"] - twin.before["sampled_exchanges"] == 128 - len(kept)
    client = {s.attributes["dns.id"] for s in kept if s.kind == "CLIENT"}
    server = {s.attributes["dns.id"] for s in kept if s.kind == "SERVER"}
    assert client == server, "the two ends kept different queries"
    assert all(s.attributes["sampling.weight"] == 4 for s in kept)
    assert not twin.record_spans


SILENT = """
    if {connected}:  # as glibc, c-ares and dig: the peer is the socket's own
        cli.connect(to)
        cli.send(query(9, "silent.test"))
    else:
        cli.sendto(query(9, "silent.test"), to)
    served(srv, 1)  # read, never answered
    cli.close()  # the resolver gives up
    srv.close()
    break
"""


@pytest.mark.parametrize("connected", [True, False], ids=["connected", "unconnected"])
def test_a_query_whose_socket_closes_unanswered_ends_connection_closed_on_both_paths(twin, connected):
    run_traced(twin, [sys.executable, "-c", raw_program(SILENT.format(connected=connected))])
    twin.close()
    assert_same_spans(twin)
    kernel = sorted((s.kind, s.name, s.status_code) for s in twin.exchange_spans)
    assert kernel == [("CLIENT", "DNS A silent.test", "connection closed"),
                      ("SERVER", "DNS A silent.test", "connection closed")]  # fmt: skip
    assert not twin.held_spans


LONG = """
    name = ".".join(["x" * 60] * 4) + ".test"  # 249 characters: the question runs past a 256-byte head
    asked(10, name)
    asked(11, "short.test")
    break
"""


def test_a_question_longer_than_the_exchange_head_goes_to_user_space_and_is_named_alike(twin):
    run_traced(twin, [sys.executable, "-c", raw_program(LONG)])
    twin.close()
    assert_same_spans(twin)
    long_name = "DNS A " + ".".join(["x" * 60] * 4) + ".test"
    assert sorted(s.kind for s in twin.record_spans if s.name == long_name) == ["CLIENT", "SERVER"]
    assert sorted(s.kind for s in twin.exchange_spans if s.name == "DNS A short.test") == ["CLIENT", "SERVER"]
