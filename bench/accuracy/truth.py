"""Ground truth on the agent's spans, from the services' own records.

The services log what they handled and what they called (services/common.py). A record
is placed on a span by what both sides know independently: process, ports and time;
nothing the tracer inferred (seqs, ids, links) is used. The bytes the agent captured are
read once, after the fact, to check the placement (`payload_check`), never to make it.

- SERVER record -> the SERVER span of that pid on (port, peer port) whose exchange
  contains the handler: the request is read before the handler starts and the response
  written after it returns (and, where the framework tells, before `t_done`).
- CLIENT record with a known local port -> the CLIENT spans of that pid on that
  connection inside the call (from when it had the connection): a pooled connection
  serves one call at a time, so every exchange in the window belongs to it (the closest is the call itself; the others are
  set-up it caused, e.g. Redis HELLO or a PostgreSQL PREPARE).
- CLIENT record without a local port but naming the client that made it (Java's
  HttpClient, which does not tell the port: one client per pool thread, whose calls to one
  peer go one at a time) -> every connection of that pid to the callee is one client's,
  so its exchanges, in order, lie inside that client's calls, one per call. A connection
  goes to the one client whose calls contain all its exchanges; where a few exchanges
  leave several, calls already taken by connections only one client fits rule clients
  out, and a choice still left goes to the least squared delays, counted as ambiguous.
- CLIENT record without either (gRPC) -> one CLIENT span of that pid to the callee inside
  the call; concurrent calls share the connection, so the placement of all of them
  with the least squared delays wins (as for SERVER records on an HTTP/2 connection).
- A callee's SERVER record -> the caller's CLIENT record with the same key (what was
  asked, e.g. "user:42"), the callee's peer port as its local port when known, and the
  callee's handler inside the call. Without a key (the mesh's `timing` mode: nothing on
  the wire tells requests apart), by the ports and time alone: the call whose local port
  (logged, or for a call placed by its client's sequence, that of the connection it was
  placed on) is the callee's peer port, or else the placement of all of them with the
  least squared delays, counted as ambiguous.
"""

from __future__ import annotations

import base64
import json
import re
from bisect import bisect_left
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

SLACK_NS = 20_000  # ns; the same clock on both sides: this only absorbs the agent's conversion to wall time
UNKNOWN = -1  # a record whose parent record was not found
# Where each kind of call carries its first id on the wire (for payload_check): the shop's
# keys name what was asked ("user:42"), the mesh's the route ("/b:42", as ?id=42).
_MESH_ID = re.compile(rb"[?&]id=(\d+)")
_WHERE_ID = {
    "user": re.compile(rb"/users/(\d+)"),
    "stock": re.compile(rb"/stock/(SKU-\d+)"),
    "order": re.compile(rb'"user_id": (\d+)'),
    "quote": re.compile(rb'"user_id": (\d+)'),
    **{route: _MESH_ID for route in ("/b", "/c", "/deep", "/flaky")},
}


@dataclass
class Truth:
    parent: dict[str, str | None]  # span_id -> true parent span_id (None: a root), spans whose truth is known
    kind: dict[str, str]  # span_id -> "calls" (CLIENT) | "cross" (callee SERVER) | "roots" (gateway SERVER)
    traces: list[frozenset[str]]  # span ids of each complete end-to-end request
    coverage: dict = field(default_factory=dict)


def load_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _greedy(pairs: list[tuple[int, int, int]]) -> tuple[dict[int, int], int]:
    """One-to-one choice, cheapest pairs first, where candidates hardly ever compete (one call
    at a time on a connection). Returns chosen -> candidate and how many had more than one."""
    per_record = Counter(r for r, _, _ in pairs)
    chosen: dict[int, int] = {}
    taken: set[int] = set()
    for r, s, _ in sorted(pairs, key=lambda p: p[2]):
        if r not in chosen and s not in taken:
            chosen[r] = s
            taken.add(s)
    return chosen, sum(1 for n in per_record.values() if n > 1)


def _squared_us(d_start: int, d_end: int) -> float:
    """The cost of a placement with these delays (ns) at its two ends: their squares, in us^2."""
    return (d_start / 1e3) ** 2 + (d_end / 1e3) ** 2


def _closest_in_time(pairs: list[tuple[int, int, tuple[int, int]]]) -> tuple[dict[int, int], int]:
    """One-to-one (record, span) choice where calls share a connection (HTTP/2 streams):
    the matching with the least sum of squared delays between the handler or call and its
    exchange (request read -> handler start, handler end -> response written; or call ->
    request written, response read -> call returns). Squares make it prefer small delays on
    both ends over one tiny and one huge: a thread pool may start handlers out of order,
    but each handler's response follows it closely. A plain sum would not decide: it is
    the same for every complete matching. Returns record -> span and how many records had
    more than one candidate."""
    if not pairs:
        return {}, 0
    rows = sorted({r for r, _, _ in pairs})
    cols = sorted({s for _, s, _ in pairs})
    row_of, col_of = {r: i for i, r in enumerate(rows)}, {s: j for j, s in enumerate(cols)}
    i, j, w = [], [], []
    for r, s, (d_start, d_end) in pairs:
        i.append(row_of[r])
        j.append(col_of[s])
        w.append(1 + _squared_us(d_start, d_end))  # never 0 (0 means no edge)
    # Each record may also stay unplaced, at a cost no real pair reaches: a full matching exists.
    i += list(range(len(rows)))
    j += [len(cols) + k for k in range(len(rows))]
    w += [1e16] * len(rows)  # (a 100 s delay squared, in us^2)
    graph = csr_matrix((w, (i, j)), shape=(len(rows), len(cols) + len(rows)))
    _, match = min_weight_full_bipartite_matching(graph)
    chosen = {rows[a]: cols[b] for a, b in enumerate(match) if b < len(cols)}
    return chosen, sum(1 for n in Counter(r for r, _, _ in pairs).values() if n > 1)


def _by_start(spans: list[dict], key) -> dict[tuple, tuple[list[int], list[int], int]]:
    """Span indices grouped by `key` (None: left out), sorted by start, with their starts
    (for bisect) and the group's longest span."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, s in enumerate(spans):
        k = key(s)
        if k is not None:
            groups[k].append(i)
    out = {}
    for k, idx in groups.items():
        idx.sort(key=lambda i: spans[i]["start_ns"])
        longest = max(spans[i]["end_ns"] - spans[i]["start_ns"] for i in idx)
        out[k] = (idx, [spans[i]["start_ns"] for i in idx], longest)
    return out


def _candidates(spans, index, key, t0: int, t1: int, inside: bool, end_by: int | None = None):
    """Spans of the group `key` fitting [t0, t1]: containing it (server side, inside=False,
    ending by `end_by` if the record knows when the response was out) or contained in it
    (client side, inside=True). Yields (span index, (delay at the start, delay at the end))
    in ns."""
    idx, starts, longest = index.get(key, ((), (), 0))
    lo = bisect_left(starts, t0 - SLACK_NS - (0 if inside else longest))
    hi = bisect_left(starts, (t1 if inside else t0) + SLACK_NS + 1)
    for i in idx[lo:hi]:
        s, e = spans[i]["start_ns"], spans[i]["end_ns"]
        if inside and e <= t1 + SLACK_NS:
            yield i, (s - t0, t1 - e)
        elif not inside and e >= t1 - SLACK_NS and (end_by is None or e <= end_by + SLACK_NS):
            yield i, (t0 - s, e - t1)


def _fit(spans: list[dict], conn_spans: list[int], records: list[dict], calls: list[int], starts: list[int]):
    """Whether one client's calls to a peer (one at a time: disjoint, sorted by start) can
    have carried all of a connection's exchanges (sorted by start): each inside its own call.
    Returns [(span, record, cost)] (cost: `_squared_us`, as `_closest_in_time`),
    or None at the first exchange no call contains."""
    out, taken = [], set()
    for s in conn_spans:
        start, end = spans[s]["start_ns"], spans[s]["end_ns"]
        k = bisect_left(starts, start + SLACK_NS + 1) - 1  # the last call started by then
        if k < 0 or k in taken or records[calls[k]]["t1"] + SLACK_NS < end:
            return None
        taken.add(k)
        d_start, d_end = start - starts[k], records[calls[k]]["t1"] - end
        out.append((s, calls[k], _squared_us(d_start, d_end)))
    return out


def _by_sequence(records: list[dict], spans: list[dict], clients: dict, by_client: dict):
    """CLIENT records that name the client that made them (a client whose calls to one peer
    go one at a time; Java's HttpClient, one per pool thread) but not the local port: each
    connection is one client's, so its exchanges are a subsequence of that client's calls,
    in order, one per call. A connection goes to the client whose calls contain all its
    exchanges; where several could (a few exchanges, at the same times as others' calls),
    the calls taken by connections only one client fits rule clients out, and what still
    has a choice then takes the client with the least squared delays (per exchange), one
    connection at a time; its records, and those of every connection that had a choice
    then, count as ambiguous. Exchanges no client fits as a whole (or none after the
    choices) are left to `_closest_in_time` with the calls not taken.
    Returns record -> span, the (record, span, delays) left, and the ambiguous count."""
    primary: dict[int, int] = {}
    left: list = []
    ambiguous = 0
    for (pid, peer), calls_of in by_client.items():
        order = {}
        for c, calls in calls_of.items():
            calls.sort(key=lambda r: records[r]["t0"])
            order[c] = (calls, [records[r]["t0"] for r in calls])
        options, unfit = {}, []  # connection -> client -> [(span, record, cost)]; exchanges of no client
        for (p, lport, rport), (idx, _, _) in clients.items():
            if p == pid and rport == peer:
                options[lport] = {c: f for c, (calls, starts) in order.items()
                                  if (f := _fit(spans, idx, records, calls, starts)) is not None}  # fmt: skip
                if not options[lport]:  # e.g. an exchange the agent did not see whole
                    del options[lport]
                    unfit += idx
        taken: set[int] = set()
        doubt: set[int] = set()  # connections left with a choice once the certain ones were placed
        while options:
            changed = True
            while changed:  # connections only one client fits (after the calls others took): its
                changed = False
                for conn, fits in list(options.items()):
                    fits = {c: f for c, f in fits.items() if all(r not in taken for _, r, _ in f)}
                    options[conn] = fits
                    if len(fits) <= 1:
                        del options[conn]
                        if not fits:  # every client that fitted lost a call to another connection
                            unfit += clients[(pid, conn, peer)][0]
                        for sp, r, _ in next(iter(fits.values()), []):
                            primary[r] = sp
                            taken.add(r)
                            ambiguous += conn in doubt
                        changed = True
            if options:  # every one left has a choice: the cheapest of all, then again
                doubt |= set(options)
                conn, c = min(((conn, c) for conn, fits in options.items() for c in fits),
                              key=lambda o: sum(x for _, _, x in options[o[0]][o[1]]) / len(options[o[0]][o[1]]))  # fmt: skip
                for sp, r, _ in options.pop(conn)[c]:
                    primary[r] = sp
                    taken.add(r)
                    ambiguous += 1
        if unfit:
            calls = sorted((r for calls, _ in order.values() for r in calls if r not in taken),
                           key=lambda r: records[r]["t0"])  # fmt: skip
            starts = [records[r]["t0"] for r in calls]
            longest = max((records[r]["t1"] - records[r]["t0"] for r in calls), default=0)
            for s in unfit:
                start = spans[s]["start_ns"]
                lo, hi = bisect_left(starts, start - longest - SLACK_NS), bisect_left(starts, start + SLACK_NS + 1)
                left += [(r, s, d) for r in calls[lo:hi] if (d := _inside(spans[s], records[r])) is not None]
    return primary, left, ambiguous


def _inside(span: dict, rec: dict) -> tuple[int, int] | None:
    """(delay at the start, delay at the end) in ns if the exchange lies inside the call."""
    s, e = span["start_ns"], span["end_ns"]
    if s >= rec["t0"] - SLACK_NS and e <= rec["t1"] + SLACK_NS:
        return s - rec["t0"], rec["t1"] - e
    return None


def map_records(records: list[dict], spans: list[dict]) -> tuple[dict[int, int], dict[int, int], int]:
    """Record -> its span (primary), extra span -> record, and how many records had to be
    told apart from concurrent ones on the same connection (HTTP/2) by time, or were placed
    on a connection more than one client's calls could have carried (`_by_sequence`)."""
    servers = _by_start(
        spans, lambda s: (s["pid"], s["lport"], s["rport"]) if s["kind"] == "SERVER" else None
    )
    clients = _by_start(
        spans, lambda s: (s["pid"], s["lport"], s["rport"]) if s["kind"] == "CLIENT" else None
    )
    clients_any_port = _by_start(spans, lambda s: (s["pid"], s["rport"]) if s["kind"] == "CLIENT" else None)
    t0_of = {rec["id"]: rec["t0"] for rec in records}
    shared, exclusive, setup = [], [], defaultdict(list)
    by_client: dict[tuple, dict] = defaultdict(lambda: defaultdict(list))  # (pid, callee port) -> client -> calls
    for r, rec in enumerate(records):
        t0, t1 = rec["t0"], rec["t1"]
        if rec["kind"] == "SERVER":
            conn = (rec["pid"], rec["port"], rec["peer_port"])
            shared += [
                (r, s, d) for s, d in _candidates(spans, servers, conn, t0, t1, False, rec.get("t_done"))
            ]
        elif rec["lport"] is None and rec.get("client") is not None:
            by_client[(rec["pid"], rec["peer_port"])][rec["client"]].append(r)
        elif rec["lport"] is None:
            shared += [(r, s, d) for s, d in _candidates(spans, clients_any_port, (rec["pid"], rec["peer_port"]),
                                                          t0, t1, True)]  # fmt: skip
        else:
            conn = (rec["pid"], rec["lport"], rec["peer_port"])
            t0 = rec.get("t_conn", t0)  # before it, the call waited and the connection served others
            exclusive += [
                (r, s, sum(map(abs, d))) for s, d in _candidates(spans, clients, conn, t0, t1, True)
            ]
            # Set-up on a connection taken from the pool for this call (Redis HELLO on connect,
            # a PostgreSQL PREPARE) can start before the call does, but not before its request.
            since = t0_of.get(rec["parent"], t0)
            for s, _ in _candidates(spans, clients, conn, since, t1, True):
                setup[s].append((abs(spans[s]["start_ns"] - t0), r))
    sequenced, unplaced, ambiguous_sequenced = _by_sequence(records, spans, clients, by_client)
    shared += unplaced
    primary, ambiguous = _closest_in_time(shared)
    primary.update(sequenced)
    ambiguous += ambiguous_sequenced
    primary.update(_greedy(exclusive)[0])
    used = set(primary.values())
    extra = {s: min(options)[1] for s, options in setup.items() if s not in used}
    return primary, extra, ambiguous


def payload_check(records: list[dict], spans: list[dict], primary: dict[int, int], root_service: str) -> tuple[int, int]:
    """A check of this mapping, not an input to it: a span placed from a record that names
    what was asked (e.g. "user:42") should carry the same id where the protocol puts it, in
    the bytes the agent saw. Heads are cut short, so records whose span does not show the
    id are left out. Returns (records checked, records whose span agrees)."""
    checked = agree = 0
    for r, s in primary.items():
        key = records[r]["key"]
        if key is None or records[r]["service"] == root_service and records[r]["kind"] == "SERVER":
            continue
        kind, asked = key.split(":", 1)
        seen = _WHERE_ID[kind].search(base64.b64decode(spans[s].get("req_head") or ""))
        if seen is not None:
            checked += 1
            agree += seen.group(1).decode() == asked.split(":")[0].split(",")[0]
    return checked, agree


def callers(records: list[dict], root_service: str, lport_of: dict[int, int] | None = None) -> tuple[dict[int, int], int]:
    """Callee SERVER record -> caller CLIENT record, matched on what the services logged:
    the key, else the local port, else time; and how many had to be told apart by time.
    `lport_of`: the local port of calls whose record does not tell it, from the connection
    their client's calls were placed on (`_by_sequence`)."""
    lport_of = lport_of or {}
    by_key: dict[tuple, list[int]] = defaultdict(list)
    for q, rec in enumerate(records):
        if rec["kind"] == "CLIENT":
            by_key[(rec["peer_port"], rec["key"])].append(q)
    index = {}
    for k, calls in by_key.items():
        calls.sort(key=lambda q: records[q]["t0"])
        index[k] = (calls, [records[q]["t0"] for q in calls], max(records[q]["t1"] - records[q]["t0"] for q in calls))
    exact, timed = [], []
    for r, rec in enumerate(records):
        if rec["kind"] != "SERVER" or rec["service"] == root_service:
            continue
        calls, starts, longest = index.get((rec["port"], rec["key"]), ((), (), 0))
        for q in calls[bisect_left(starts, rec["t0"] - longest) : bisect_left(starts, rec["t0"] + 1)]:
            call = records[q]
            lport = call["lport"] if call["lport"] is not None else lport_of.get(q)
            if lport not in (None, rec["peer_port"]) or rec["t1"] > call["t1"]:
                continue
            delays = (rec["t0"] - call["t0"], call["t1"] - rec["t1"])
            if rec["key"] is not None or lport is not None:
                exact.append((r, q, sum(delays)))
            else:
                timed.append((r, q, delays))
    chosen, _ = _greedy(exact)
    by_time, ambiguous = _closest_in_time([p for p in timed if p[0] not in chosen])
    return {**chosen, **by_time}, ambiguous


class _Records:
    """The records with their place among the spans and among each other."""

    def __init__(self, records: list[dict], spans: list[dict], root_service: str) -> None:
        self.records, self.spans, self.root_service = records, spans, root_service
        self.primary, extra, self.ambiguous_spans = map_records(records, spans)
        lport_of = {r: spans[s]["lport"] for r, s in self.primary.items()
                    if records[r]["kind"] == "CLIENT" and records[r]["lport"] is None and records[r].get("client") is not None}  # fmt: skip
        self.caller, self.ambiguous_callers = callers(records, root_service, lport_of)
        self.span_record = {**{s: r for r, s in self.primary.items()}, **extra}
        self.extra = len(extra)
        self._index = {rec["id"]: r for r, rec in enumerate(records)}

    def parent(self, r: int) -> int | None:
        """The record r's caller or handler; None for a root; UNKNOWN when not found."""
        rec = self.records[r]
        if rec["kind"] == "CLIENT":  # a call made outside any request has no parent
            return self._index.get(rec["parent"], UNKNOWN) if rec["parent"] else None
        if rec["service"] == self.root_service:
            return None
        return self.caller.get(r, UNKNOWN)

    def span_parents(self) -> tuple[dict[str, str | None], dict[str, str]]:
        parent, kind = {}, {}
        for s, r in self.span_record.items():
            p = self.parent(r)
            if p != UNKNOWN and (p is None or p in self.primary):
                sid = self.spans[s]["span_id"]
                parent[sid] = None if p is None else self.spans[self.primary[p]]["span_id"]
                client = self.records[r]["kind"] == "CLIENT"
                kind[sid] = "calls" if client else "roots" if p is None else "cross"
        return parent, kind

    def traces(self, parent: dict[str, str | None]) -> tuple[list[frozenset[str]], int]:
        """The span ids of each request's tree, for the requests whose whole tree was found;
        and the number of requests."""
        children: dict[int, list[int]] = defaultdict(list)
        for r in range(len(self.records)):
            p = self.parent(r)
            if p is not None and p != UNKNOWN:
                children[p].append(r)
        spans_of: dict[int, list[int]] = defaultdict(list)
        for s, r in self.span_record.items():
            spans_of[r].append(s)
        answered = set(self.caller.values())
        service_ports = {rec["port"] for rec in self.records if rec["kind"] == "SERVER"}
        roots = [
            r for r, rec in enumerate(self.records) if rec["kind"] == "SERVER" and self.parent(r) is None
        ]
        traces = []
        for root in roots:
            tree, todo, complete = [], [root], True
            while todo:
                x = todo.pop()
                tree.append(x)
                todo += children[x]
                rec = self.records[x]
                lost_callee = (
                    rec["kind"] == "CLIENT" and rec["peer_port"] in service_ports and x not in answered
                )
                complete &= x in self.primary and not lost_callee
            ids = frozenset(self.spans[s]["span_id"] for x in tree for s in spans_of[x])
            if complete and all(i in parent for i in ids):
                traces.append(ids)
        return traces, len(roots)


def build(spans: list[dict], records: list[dict], root_service: str = "gateway") -> Truth:
    # An id logged twice (the shop's threaded workers once raced to open their log, each with
    # its own counter) cannot tell which request a call served: such records, and those
    # naming them as parent, tell nothing.
    seen = Counter(rec["id"] for rec in records)
    twice = {i for i, n in seen.items() if n > 1}
    kept = [rec for rec in records if rec["id"] not in twice and rec.get("parent") not in twice]
    duplicated, records = len(records) - len(kept), kept
    placed = _Records(records, spans, root_service)
    parent, kind = placed.span_parents()
    traces, requests = placed.traces(parent)
    checked, agree = payload_check(records, spans, placed.primary, root_service)
    service_of_pid = {rec["pid"]: rec["service"] for rec in records}
    unmapped = Counter(f"{rec['service']} {rec['kind']} {rec['op']}"
                       for r, rec in enumerate(records) if r not in placed.primary)  # fmt: skip
    no_truth = Counter(f"{service_of_pid.get(s['pid'], s['pid'])} {s['kind']} {s['name']}"
                       for i, s in enumerate(spans) if i not in placed.span_record)  # fmt: skip
    callees = sum(1 for rec in records if rec["kind"] == "SERVER" and rec["service"] != root_service)
    coverage = {
        "records": len(records), "records_mapped": len(placed.primary), "records_with_duplicate_ids": duplicated,
        "spans": len(spans), "spans_with_truth": len(parent), "extra_spans": placed.extra,
        "callee_records": callees, "callee_records_with_caller": len(placed.caller),
        "ambiguous_records": placed.ambiguous_spans, "ambiguous_callers": placed.ambiguous_callers,
        "payload_checked": checked, "payload_agrees": agree, "requests": requests, "complete_traces": len(traces),
        "unmapped_records": dict(unmapped.most_common(8)), "spans_without_truth": dict(no_truth.most_common(8)),
    }  # fmt: skip
    return Truth(parent, kind, traces, coverage)
