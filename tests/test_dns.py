"""DNS over UDP and TCP on hand-built messages."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from parsing import chunk, feed_split

from deeptrace.protocols import detect
from deeptrace.protocols.dns import DnsConnection, parse


def query(ident: int, name: str, qtype: int = 1, flags: int = 0x0100, questions: int = 1) -> bytes:
    q = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", ident, flags, questions, 0, 0, 0) + (q + struct.pack("!HH", qtype, 1)) * questions


def answer(ident: int, name: str, rcode: int = 0, answers: int = 1) -> bytes:
    q = query(ident, name)
    body = q[12:] + (b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\x0a\x01\x02\x03" * answers)
    return struct.pack("!HHHHHH", ident, 0x8180 | rcode, 1, answers, 0, 0) + body


def tcp(msg: bytes) -> bytes:
    return len(msg).to_bytes(2, "big") + msg


def test_query_and_answer_fields():
    assert parse(query(7, "Example.ORG", 28)) == {"id": 7, "response": False, "rcode": 0, "name": "example.org",
                                                  "qtype": "AAAA", "answers": 0, "truncated": False,
                                                  "opcode": "QUERY", "questions": 1}  # fmt: skip
    assert parse(answer(7, "example.org", rcode=3, answers=0))["rcode"] == 3


def test_udp_pairs_by_id_out_of_order():
    conn = DnsConnection(tcp=False)
    reqs = conn.feed(True, chunk(query(1, "a.test"))) + conn.feed(True, chunk(query(2, "b.test"), t=1))
    resps = conn.feed(False, chunk(answer(2, "b.test"), t=2)) + conn.feed(False, chunk(answer(1, "a.test", 3, 0), t=3))
    assert [(m.name, m.pair_key) for m in reqs] == [("DNS A a.test", 1), ("DNS A b.test", 2)]
    assert [(m.pair_key, m.status_code, m.error) for m in resps] == [(2, "NOERROR", False), (1, "NXDOMAIN", True)]


@pytest.mark.parametrize("cut", range(1, 40))
def test_tcp_split_at_every_byte(cut):
    msg = tcp(query(9, "svc.cluster.local", 33))
    assert [m.name for m in feed_split(DnsConnection(tcp=True), True, msg, cut)] == ["DNS SRV svc.cluster.local"]


def test_tcp_two_messages_in_one_read():
    msgs = DnsConnection(tcp=True).feed(False, chunk(tcp(answer(1, "x.test")) + tcp(answer(2, "y.test"))))
    assert [m.pair_key for m in msgs] == [1, 2]


def test_detection_by_content_on_either_transport():
    assert detect(query(3, "x.test"), None, "udp")[0:3:2] == ("dns", True)
    assert detect(answer(3, "x.test"), None, "udp")[0:3:2] == ("dns", False)
    assert detect(tcp(query(3, "x.test")), None, "tcp")[0:3:2] == ("dns", True)
    assert detect(b"GET / HTTP/1.1\r\n\r\n", None, "udp") is None


def test_update_and_notify_are_spans_named_by_their_operation():
    """UPDATE (opcode 5) asks with its zone's SOA, NOTIFY (opcode 4) with the zone's SOA too."""
    update = query(0xBB50, "Zone.Example", 6, flags=5 << 11)
    notify = query(0x5131, "zone.example", 6, flags=(4 << 11) | 0x0400)
    refused = struct.pack("!HHHHHH", 0x5131, 0x8000 | (4 << 11) | 0x0400 | 5, 1, 0, 0, 0) + notify[12:]
    for msg, req, op in ((update, True, "UPDATE"), (notify, True, "NOTIFY"), (refused, False, "NOTIFY")):
        assert detect(msg, None, "udp")[0:3:2] == ("dns", req) and detect(tcp(msg), None, "tcp")[0:3:2] == ("dns", req)
    conn = DnsConnection(tcp=False)
    msgs = conn.feed(True, chunk(update)) + conn.feed(True, chunk(notify)) + conn.feed(False, chunk(refused))
    assert [(m.name, m.status_code) for m in msgs] == [("DNS UPDATE SOA zone.example", None),
                                                      ("DNS NOTIFY SOA zone.example", None), (None, "REFUSED")]
    assert msgs[0].attributes["dns.opcode"] == "UPDATE"


def test_rarer_types_are_named_as_iana_does():
    assert [parse(query(1, "x.test", t))["qtype"] for t in (11, 13, 29, 44, 249, 4242)] == [
        "WKS", "HINFO", "LOC", "SSHFP", "TKEY", "4242"]


def test_many_questions_and_unreadable_names_still_give_a_span_by_the_header():
    """The first of several questions names the span; a name cut short, or pointing into itself,
    leaves out what cannot be read. TCP is not taken on a header alone (it carries other protocols)."""
    header = struct.pack("!HHHHHH", 0x2222, 0x0100, 1, 0, 0, 0)
    cut, loop = header + b"\x03ab", header + b"\xc0\x0c" + struct.pack("!HH", 1, 1)
    many = query(3, "x.test", questions=10)
    conn = DnsConnection(tcp=False)
    for msg, name in ((many, "DNS A x.test"), (cut, "DNS"), (loop, "DNS A")):
        assert detect(msg, None, "udp")[0:3:2] == ("dns", True), msg
        assert [m.name for m in conn.feed(True, chunk(msg))] == [name]
    assert detect(tcp(cut), None, "tcp") is None and detect(tcp(many), None, "tcp")[0] == "dns"
    # A length prefix and a DNS start read as UDP: not taken on its header alone.
    assert detect(tcp(cut), None, "udp") is None


def test_header_that_is_not_dns_is_refused():
    ok = query(1, "x.test")
    for flags in (3 << 11, 6 << 11, 0x0100 | 0x0040, 0x0103):  # opcode 3 and DSO, the Z bit, an error asked
        assert parse(struct.pack("!HH", 1, flags) + ok[4:]) is None, hex(flags)
    assert parse(ok[:4] + struct.pack("!HHHH", 0, 0, 0, 0) + ok[12:]) is None  # no question
    assert parse(ok[:4] + struct.pack("!HHHH", 1, 500, 500, 0) + ok[12:]) is None  # more records than bytes


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(data):
    parse(data)
    for conn in (DnsConnection(tcp=False), DnsConnection(tcp=True)):
        conn.feed(True, chunk(data))
        conn.feed(False, chunk(data, size=len(data) + 10))
