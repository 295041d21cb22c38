"""Association on constructed spans: exact links, thread affinity, inference and its
traps, trace assembly, streaming, and the CLI on a file."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
from loopsim import accuracy, event_loop_service
from spanmaker import call_pair, client, parent_of, server

from deeptrace.association.associate import ALGORITHMS, associate
from deeptrace.association.streaming import StreamingAssociator


def test_seq_join_links_server_to_the_client_across_hosts():
    c, s = call_pair(1, 2, 100, 900, seq=5000)
    other_c, other_s = call_pair(1, 2, 100, 900, seq=9000)
    spans = associate([s, other_s, c, other_c])
    assert parent_of(spans, s) is c and parent_of(spans, other_s) is other_c
    assert s["link_method"] == "seq-join" and s["link_confidence"] == 1.0
    assert s["trace_id"] == c["trace_id"] != other_c["trace_id"]
    assert c["link_method"] == "root" and c["parent_span_id"] is None


def test_seq_join_through_nat_and_with_clock_skew():
    c, s = call_pair(1, 2, 100, 900, seq=5000)
    s["raddr"], s["rport"] = "192.168.9.9", 61000  # the server saw a translated peer
    s["start_ns"] += 2_000_000_000  # and its host's clock runs 2 s ahead
    s["end_ns"] += 2_000_000_000
    associate([c, s])
    assert s["parent_span_id"] == c["span_id"]


def test_same_bytes_on_a_reused_port_join_the_call_of_their_time():
    early_c, early_s = call_pair(1, 2, 100, 900, seq=5000)
    late_c, late_s = call_pair(1, 2, 60_000_000, 60_000_900, seq=5000)  # 60 s later, same seq (wrapped)
    associate([early_c, early_s, late_c, late_s])
    assert early_s["parent_span_id"] == early_c["span_id"] and late_s["parent_span_id"] == late_c["span_id"]


def test_http2_calls_join_by_connection_and_stream():
    c1, s1 = call_pair(1, 2, 100, 900, seq=0)
    c2, s2 = call_pair(1, 2, 150, 800, seq=0)
    for d, stream in ((c1, 1), (s1, 1), (c2, 3), (s2, 3)):
        d["req_seq"] = d["resp_seq"] = None
        d["protocol"], d["attributes"] = "http2", {"http2.stream_id": stream}
    s2["lport"], s2["rport"], c2["lport"], c2["rport"] = s1["lport"], s1["rport"], c1["lport"], c1["rport"]
    associate([c1, c2, s1, s2])
    assert s1["parent_span_id"] == c1["span_id"] and s2["parent_span_id"] == c2["span_id"]


HEADERS = [
    ("traceparent", "00-{t}-00f067aa0ba902b7-01"),
    ("b3", "{t}-e457b5a2e4d86bd1-1"),
    ("x-b3-traceid", "{t}"),
    ("uber-trace-id", "{t}:e457b5a2e4d86bd1:0:1"),
    ("x-request-id", "{t}"),
]


@pytest.mark.parametrize("header,value", HEADERS)
def test_header_ids_pick_the_request_that_propagated_them(header, value):
    a_id, b_id = "4bf92f3577b34da6a3ce929d0e0e4736", "0af7651916cd43dd8448eb211c80319c"
    key = f"http.request.header.{header}"
    a = server(1, 0, 1000, attributes={key: value.format(t=a_id)})
    b = server(1, 10, 1000, attributes={key: value.format(t=b_id)})
    call = client(1, 20, 500, attributes={key: value.format(t=a_id)})  # timing alone says b (latest start)
    associate([a, b, call])
    assert call["parent_span_id"] == a["span_id"] and call["link_method"] == "header-id"
    associate([a, b, call], algorithm="wap5", header_ids=False)
    assert call["parent_span_id"] == b["span_id"] and call["link_method"] != "header-id"


def _thread_per_request(pid: int, n: int, pool_hand_off: bool = False):
    """Requests on 4 worker threads, one at a time per thread, each making one call;
    with pool_hand_off the call goes out on another thread (a pool)."""
    rnd = random.Random(pid)
    spans, truth = [], {}
    free = {100 + k: 0 for k in range(4)}
    t = 0
    for _ in range(n):
        t += rnd.randint(50, 400)
        tid = min(free, key=free.get)
        start = max(t, free[tid])
        call_start = start + rnd.randint(10, 50)
        call_end = call_start + rnd.randint(200, 2000)
        end = call_end + rnd.randint(10, 50)
        free[tid] = end + 1
        s = server(pid, start, end, tid=tid, name="GET /a")
        c = client(pid, call_start, call_end, tid=999 if pool_hand_off else tid, name="SELECT t", req=b"SELECT 1")
        spans += [s, c]
        truth[c["span_id"]] = s["span_id"]
    return spans, truth


def test_thread_affinity_in_a_thread_per_request_process():
    spans, truth = _thread_per_request(10, 300)
    associate(spans, header_ids=False)
    calls = [d for d in spans if d["kind"] == "CLIENT"]
    assert {d["link_method"] for d in calls} == {"thread"}
    assert accuracy(spans, truth) == 1.0
    assert min(d["link_confidence"] for d in calls) >= 0.95


def test_thread_pool_hand_off_is_not_linked_by_thread():
    spans, truth = _thread_per_request(11, 300, pool_hand_off=True)
    associate(spans, header_ids=False)
    assert not any(d["link_method"] == "thread" for d in spans)
    associate(spans, algorithm="vpath", header_ids=False)
    assert accuracy(spans, truth) == 0.0  # the baseline that trusts threads gets none right


def test_event_loop_is_not_linked_by_thread():
    spans, _ = event_loop_service(200, 400)
    associate(spans, header_ids=False)
    assert not any(d["link_method"] == "thread" for d in spans)


@pytest.mark.parametrize("fan_out", [0, 3])
def test_joint_inference_beats_the_baselines_on_an_event_loop(fan_out):
    spans, truth = event_loop_service(600, 1000, seed=fan_out, fan_out=fan_out)
    scores = {}
    for name in ALGORITHMS:
        associate(spans, algorithm=name, header_ids=False)
        scores[name] = accuracy(spans, truth)
    assert scores["joint"] >= 0.95, scores
    assert all(scores["joint"] > v for k, v in scores.items() if k != "joint"), scores


def test_call_outside_every_request_is_a_root():
    a = server(1, 0, 100)
    late = client(1, 200, 300)
    associate([a, late])
    assert late["parent_span_id"] is None and late["link_method"] == "root"


def test_lost_responses_and_retries_still_find_their_request():
    """A call whose response was lost ends when it was sent; the retry that follows
    belongs to the same request."""
    spans, truth = event_loop_service(600, 1000, seed=7, retries=0.2)
    associate(spans, header_ids=False)
    by = {d["span_id"]: d for d in spans}
    gets = [by[c] for c in truth if by[c]["name"] == "redis GET"]
    assert len(gets) > 650  # the retried ones are there twice
    assert sum(by[c["span_id"]]["parent_span_id"] == truth[c["span_id"]] for c in gets) / len(gets) >= 0.95


def test_input_order_does_not_matter():
    """Records from different CPUs arrive out of time order; spans may too."""
    spans, _ = event_loop_service(300, 1000, seed=5)
    associate(spans, header_ids=False)
    first = {d["span_id"]: d["parent_span_id"] for d in spans}
    random.Random(9).shuffle(spans)
    associate(spans, header_ids=False)
    assert {d["span_id"]: d["parent_span_id"] for d in spans} == first


def test_a_trace_spans_hosts_and_keeps_its_roots_id():
    root = server(1, 0, 10_000, host="a")
    c, s = call_pair(1, 2, 100, 900, seq=777, caller_host="a", callee_host="b")
    leaf = client(2, 200, 700, host="b")
    associate([leaf, s, c, root], header_ids=False)
    assert {d["trace_id"] for d in (root, c, s, leaf)} == {root["trace_id"]}
    assert [parent_of([root, c, s, leaf], d) for d in (c, s, leaf)] == [root, c, s]


def test_streaming_holds_spans_until_their_parent_arrives_and_keeps_trace_ids():
    assoc = StreamingAssociator(hold_s=1.0, context_s=30.0)
    root = server(1, 0, 10_000, host="a")
    c, s = call_pair(1, 2, 100, 900, seq=777, caller_host="a", callee_host="b")
    assoc.push([s])  # the callee's host shipped first
    assert assoc.pop_ready(s["end_ns"] + 500_000_000) == []  # still held
    assoc.push([c, root])
    out = assoc.pop_ready(root["end_ns"] + 2_000_000_000)
    assert {d["span_id"] for d in out} == {s["span_id"], c["span_id"], root["span_id"]}
    assert len({d["trace_id"] for d in out}) == 1
    # A span that arrives after its trace was published joins it; nothing is split.
    leaf = client(2, 200, 700, host="b")
    assoc.push([leaf])
    (late,) = assoc.pop_ready(root["end_ns"] + 4_000_000_000)
    assert late["parent_span_id"] == s["span_id"] and late["trace_id"] == root["trace_id"]
    assert assoc.stats.late_links == 1 and assoc.stats.split_traces == 0


def test_streaming_keeps_published_links_and_decides_only_the_held_spans():
    """A published call is evidence, not decided again: its parent stays what was published,
    a published root stays a root, and the held calls are decided with it in view."""
    first, second = server(1, 0, 10_000, name="GET /a"), server(1, 0, 10_000, name="GET /a")
    early = client(1, 100, 200, name="GET k")
    lone = client(1, 20_000, 20_100, name="GET k")  # inside no request: a root
    assoc = StreamingAssociator(hold_s=1.0, context_s=60.0)
    assoc.push([first, second, early, lone])
    published = assoc.pop_ready(lone["end_ns"] + 2_000_000_000)
    assert len(published) == 4
    chosen = next(d for d in published if d["span_id"] == early["span_id"])["parent_span_id"]
    assert chosen in {first["span_id"], second["span_id"]}
    assert next(d for d in published if d["span_id"] == lone["span_id"])["parent_span_id"] is None
    late = client(1, 300, 400, name="GET k")
    assoc.push([late])
    (out,) = assoc.pop_ready(lone["end_ns"] + 4_000_000_000)
    assert out["parent_span_id"] in {first["span_id"], second["span_id"]} and out["link_method"] == "inferred"
    # The window's published spans were handed to the linker as fixed, exactly as published.
    spans = assoc.published
    pinned = StreamingAssociator._pinned(spans, 0, len(spans), {d["span_id"]: i for i, d in enumerate(spans)})
    by_id = {d["span_id"]: i for i, d in enumerate(spans)}
    assert pinned[by_id[early["span_id"]]].parent == by_id[chosen]
    assert pinned[by_id[lone["span_id"]]].parent is None


def test_fixed_links_are_kept_as_given_and_only_open_calls_are_decided():
    from deeptrace.association.associate import link_spans
    from deeptrace.association.model import Link, SpanRef

    spans = [server(1, 0, 1_000), server(1, 5_000, 6_000), client(1, 100, 200), client(1, 5_100, 5_200)]
    refs = [SpanRef.from_json(i, d) for i, d in enumerate(spans)]
    # Call 2 was published under request 1 (not one that contains it): that stands.
    fixed = {0: Link(None, "root", 1.0), 1: Link(None, "root", 1.0), 2: Link(1, "inferred", 0.6)}
    links = link_spans(refs, "joint", fixed=fixed)
    assert links[2] == Link(1, "inferred", 0.6)
    assert links[3].parent == 1 and links[3].method == "inferred"
    assert link_spans(refs, "joint")[2].parent == 0  # decided afresh, it would be request 0


@pytest.mark.parametrize("earlier", [0, 1])
def test_inference_starts_from_the_parent_an_earlier_pass_chose(earlier):
    """Two identical requests and one call inside both: timing cannot tell, so the earlier
    pass's choice (what it learnt from the calls it held then) is where inference starts
    and, with nothing against it, what it keeps."""
    from deeptrace.association.associate import link_spans
    from deeptrace.association.model import SpanRef

    spans = [server(1, 0, 10_000, name="GET /a"), server(1, 0, 10_000, name="GET /a"), client(1, 100, 200)]
    refs = [SpanRef.from_json(i, d) for i, d in enumerate(spans)]
    assert link_spans(refs, "joint", header_ids=False, previous={2: earlier})[2].parent == earlier


def test_streaming_hands_each_held_calls_last_choice_to_the_next_pass(monkeypatch):
    from deeptrace.association import streaming

    real, seen = streaming.link_spans, []

    def recording(refs, *args):
        links = real(refs, *args)
        seen.append(({refs[c].span_id: refs[p].span_id for c, p in (args[3] or {}).items()},
                     {refs[i].span_id: refs[lk.parent].span_id for i, lk in links.items() if lk.parent is not None}))  # fmt: skip
        return links

    monkeypatch.setattr(streaming, "link_spans", recording)
    early = client(2, 0, 100)  # another process's root: ready first, so a pass runs while the rest is held
    req, call = server(1, 0, 3_000_000, name="GET /a"), client(1, 1_000_000, 1_000_100)  # µs
    assoc = StreamingAssociator(hold_s=5.0, context_s=10.0)
    assoc.push([early, req, call])
    assert [d["span_id"] for d in assoc.pop_ready(5_500_000_000)] == [early["span_id"]]
    assert [d["span_id"] for d in assoc.pop_ready(6_500_000_000)] == [call["span_id"]]
    (first_given, first_chose), (second_given, _) = seen
    assert first_given == {} and first_chose[call["span_id"]] == req["span_id"]
    assert second_given == {call["span_id"]: req["span_id"]}


@pytest.mark.parametrize("relink", [False, True])
def test_a_caller_arriving_after_its_callee_was_published_joins_its_trace(relink):
    c, s = call_pair(1, 2, 100, 900, seq=4242, caller_host="a", callee_host="b")
    assoc = StreamingAssociator(hold_s=1.0, context_s=30.0, relink_published=relink)
    assoc.push([s])
    (alone,) = assoc.pop_ready(s["end_ns"] + 2_000_000_000)  # the caller's host is late past the hold
    assert alone["parent_span_id"] is None
    assoc.push([c])
    (caller,) = assoc.pop_ready(c["end_ns"] + 4_000_000_000)
    assert caller["trace_id"] == alone["trace_id"]  # one trace: the published id is the trace's
    assert assoc.stats.split_traces == 0
    assert assoc.stats.late_links == 1
    assoc.pop_ready(c["end_ns"] + 6_000_000_000)
    assert assoc.stats.late_links == 1  # counted once


@pytest.mark.parametrize("relink", [False, True])
def test_two_published_traces_found_to_be_one_are_counted_once(relink):
    """The gateway's request is out; the backend's SERVER span is out as a root (its caller
    was not there); then the gateway's call arrives. It belongs to both published traces."""
    gateway = server(1, 0, 10_000, host="a", name="GET /")
    c, s = call_pair(1, 2, 100, 900, seq=777, caller_host="a", callee_host="b")
    assoc = StreamingAssociator(hold_s=1.0, context_s=30.0, relink_published=relink)
    assoc.push([gateway, s])
    first = assoc.pop_ready(gateway["end_ns"] + 2_000_000_000)
    assert len({d["trace_id"] for d in first}) == 2
    assoc.push([c])
    (call,) = assoc.pop_ready(gateway["end_ns"] + 4_000_000_000)
    assert call["parent_span_id"] == gateway["span_id"] and call["trace_id"] == gateway["trace_id"]
    for t in (6, 8):  # later passes (a pass needs something ready: other traffic)
        assoc.push([server(9, 1_000 * t, 1_000 * t + 10, host="z")])
        assoc.pop_ready(gateway["end_ns"] + t * 1_000_000_000)
    assert assoc.stats.split_traces == 1


def test_cli_associates_a_file(tmp_path):
    spans, truth = event_loop_service(200, 500, seed=3)
    c, s = call_pair(900, 901, 100, 900, seq=4242)
    path = tmp_path / "spans.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in spans + [c, s]))
    out = tmp_path / "linked.jsonl"
    r = subprocess.run([sys.executable, "-m", "deeptrace.cli", "associate", str(path), "--no-header-ids",
                        "--out", str(out)], capture_output=True, text=True, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"{len(spans) + 2} spans" in r.stderr and "seq-join 1" in r.stderr
    linked = [json.loads(line) for line in out.read_text().splitlines()]
    assert accuracy(linked, truth) >= 0.95
    assert {"trace_id", "parent_span_id", "link_method", "link_confidence"} <= set(linked[0])


def test_cli_rejects_a_file_that_is_not_spans(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"span_id": "1", "kind": "SERVER", "name": "x", "pid": 1, "start_ns": 0, "end_ns": 1}\nnot json\n')
    r = subprocess.run([sys.executable, "-m", "deeptrace.cli", "associate", str(path)], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 2 and "bad.jsonl:2: not a JSON line" in r.stderr
    path.write_text('{"span_id": "1", "kind": "SERVER", "pid": 1, "start_ns": 0, "end_ns": 1}\n')
    r = subprocess.run([sys.executable, "-m", "deeptrace.cli", "associate", str(path)], capture_output=True, text=True,
                       check=False)  # fmt: skip
    assert r.returncode == 2 and "bad.jsonl:1: not a span (no name)" in r.stderr  # schema.REQUIRED_KEYS
