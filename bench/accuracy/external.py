#!/usr/bin/env python3
"""Association on spans nobody here recorded: the original DeepTrace's published test spans.

The original DeepTrace (github.com/DeepShield-AI/DeepTrace) publishes the spans of its own
test workload, three Go services (net/http): a client calls A, and A calls B, then C, over
keep-alive pools, with Go's resolver making DNS lookups before some calls
(server/database/test/spans/rpsN-spans.json; only rps100 is in the repository, the others
are Git LFS pointers). Every request there carries an `X-Request-Id`, propagated to B and
C: it is the ground truth here, and it is wiped (same length, so sizes stay) before
association, as are the ids the replies echo. What is left is timing: every request of an
operation is the same bytes.

    .venv/bin/python bench/accuracy/external.py rps100-spans.json [...] [--algorithms joint,fifo]

`oracle-timing` (on by default) is `joint` with its model fitted on the truth, and
`oracle-siblings` that with each call's gaps measured among its true siblings too
(standins.py).

Prints, per file and algorithm, call accuracy (a CLIENT span to the request that made it)
and end-to-end accuracy (a request's every call right, and its callees' SERVER spans
under those calls), and one JSON line last. The data is not copied into this repository.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

from standins import STANDINS

from deeptrace.association.associate import ALGORITHMS, associate

_ID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_HEADER_ID = re.compile(rb"(?im)^x-request-id:\s*(\S+)")
WALL_OFFSET_NS = 1_700_000_000 * 10**9  # their stamps are CLOCK_MONOTONIC; ours are wall-clock


def _ip(n: int) -> str:
    return ".".join(str(n >> s & 255) for s in (24, 16, 8, 0))


def convert(records: list[dict]) -> tuple[list[dict], dict[str, str | None], list[list[str]]]:
    """Their span records -> our span JSON; the truth ({span id: parent span id} from the
    request ids); and each client request's span ids (A's request, its calls, their callees)."""
    spans, ids = [], {}
    for n, rec in enumerate(records):
        req, resp = rec["req"], rec["resp"]
        q = req["quintuple"]  # local end first, whichever direction
        payload = req["payload"].encode("latin-1", "replace")
        found = _HEADER_ID.search(payload)
        ids[n] = found.group(1).decode() if found else None
        wipe = lambda b: _ID.sub(lambda m: b"0" * len(m.group()), b)  # noqa: E731
        line = payload.split(b"\r\n", 1)[0].split(b" ")
        dns = req["protocol"] == "DNS"
        spans.append({
            "span_id": f"{n + 1:016x}", "trace_id": f"{n + 1:032x}", "parent_span_id": None,
            "kind": "SERVER" if req["direction"] == "Ingress" else "CLIENT",
            "name": "DNS" if dns else b" ".join(line[:2]).decode("latin-1"), "protocol": "dns" if dns else "http",
            "service": str(req["tgid"]), "host": _ip(q["src_addr"]), "pid": req["tgid"], "tid": req["pid"],
            "resp_tid": resp["pid"], "start_ns": req["timestamp_ns"] + WALL_OFFSET_NS,
            "end_ns": resp["timestamp_ns"] + WALL_OFFSET_NS, "laddr": _ip(q["src_addr"]), "lport": q["src_port"],
            "raddr": _ip(q["dst_addr"]), "rport": q["dst_port"],
            "req_seq": None if dns else [req["enter_seq"], req["exit_seq"]],
            "resp_seq": None if dns else [resp["enter_seq"], resp["exit_seq"]],
            "attributes": {}, "req_head": base64.b64encode(wipe(payload)).decode(),
            "resp_head": base64.b64encode(wipe(resp["payload"].encode("latin-1", "replace"))).decode(),
        })  # fmt: skip
    # A process's host is the address it serves on (its DNS lookups leave from loopback).
    host = {s["pid"]: s["laddr"] for s in spans if s["kind"] == "SERVER"}
    for s in spans:
        s["host"] = host.get(s["pid"], s["host"])
    # Truth: a CLIENT span's parent is the SERVER span of its process with its id; a SERVER
    # span's is the CLIENT span of another process with its id and the same connection.
    server_of = {(s["pid"], ids[i]): s["span_id"] for i, s in enumerate(spans) if s["kind"] == "SERVER" and ids[i]}
    client_of = {(ids[i], s["laddr"], s["lport"], s["raddr"], s["rport"]): s["span_id"]
                 for i, s in enumerate(spans) if s["kind"] == "CLIENT" and ids[i]}  # fmt: skip
    truth: dict[str, str | None] = {}
    members: dict[str, list[str]] = defaultdict(list)
    for i, s in enumerate(spans):
        rid = ids[i]
        if rid is None:
            continue  # DNS: nothing says which request looked the name up
        if s["kind"] == "CLIENT":
            truth[s["span_id"]] = server_of.get((s["pid"], rid))
        else:
            truth[s["span_id"]] = client_of.get((rid, s["raddr"], s["rport"], s["laddr"], s["lport"]))
        members[rid].append(s["span_id"])
    requests = [m for m in members.values() if len(m) > 1]
    return spans, truth, requests


def score(linked: list[dict], truth: dict[str, str | None], requests: list[list[str]]) -> dict:
    parent = {d["span_id"]: d["parent_span_id"] for d in linked}
    kind = {d["span_id"]: d["kind"] for d in linked}
    calls = [sid for sid in truth if kind[sid] == "CLIENT"]
    exact = [all(parent[sid] == truth[sid] for sid in m) for m in requests]
    return {"calls": round(sum(parent[s] == truth[s] for s in calls) / len(calls), 4),
            "end_to_end": round(sum(exact) / len(exact), 4), "requests": len(requests)}  # fmt: skip


def peak_in_flight(spans: list[dict], pid: int) -> int:
    events = sorted((t, d) for s in spans if s["kind"] == "SERVER" and s["pid"] == pid
                    for t, d in ((s["start_ns"], 1), (s["end_ns"], -1)))  # fmt: skip
    now = peak = 0
    for _, d in events:
        now += d
        peak = max(peak, now)
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--algorithms", default=",".join([*ALGORITHMS, "oracle-timing", "oracle-siblings"]))
    args = ap.parse_args()
    results = []
    for path in args.files:
        spans, truth, requests = convert(json.loads(path.read_text())["spans"])
        entry = max({s["pid"] for s in spans}, key=lambda p: sum(s["pid"] == p and s["kind"] == "CLIENT" for s in spans))
        row = {"file": path.name, "spans": len(spans), "peak_in_flight": peak_in_flight(spans, entry), "algorithms": {}}
        for name in args.algorithms.split(","):
            t0 = time.perf_counter()
            if name in STANDINS:  # joint with its model fitted on the truth (standins.py)
                linked = STANDINS[name]([dict(s) for s in spans], SimpleNamespace(parent=truth))
            else:
                linked = associate([dict(s) for s in spans], name, header_ids=False)
            row["algorithms"][name] = {**score(linked, truth, requests), "seconds": round(time.perf_counter() - t0, 2)}
            r = row["algorithms"][name]
            print(f"{path.name} (peak {row['peak_in_flight']} in flight): {name:6} calls {r['calls']:.3f}, "
                  f"end-to-end {r['end_to_end']:.3f} of {r['requests']}", file=sys.stderr)  # fmt: skip
        results.append(row)
    print(json.dumps({"benchmark": "accuracy-external", "results": results}))


if __name__ == "__main__":
    main()
