"""Spans replayed through real servers' ingest and linkers on a virtual clock: one server,
or several sharing a store, so that their traces can be compared span by span.

Each agent ships what ended in the last second, `ship_delay_s` later, to one of the servers
in turn (any server takes any batch); each virtual second every server's linker makes one
pass. The servers' view of who is alive is fixed (no heartbeats), so that ownership is
the same in every run.
"""

from __future__ import annotations

import gzip
import json
import uuid
from collections import defaultdict

from deeptrace.server.app import Server, ServerConfig

SECOND = 10**9


def servers_on(stores: list, server_ids: list[str] | None = None, **config) -> list[Server]:
    servers = [Server(ServerConfig(db="", token=None, **config), store) for store in stores]
    ids = server_ids or [f"s{i}" for i in range(len(servers))]
    for server, sid in zip(servers, ids):
        m = server.membership
        m.server_id, m.servers = sid, sorted(ids)
        m.beat = lambda: None  # a fixed view: who owns what is the same in every run
        m._last_beat = float("inf")  # never stale
        m.handoff_s = 0.0  # nobody to hand over from
    return servers


def replay(servers: list[Server], spans: list[dict], agent_of, ship_delay_s: float = 1.0,
           tail_s: float = 90.0, alive=None) -> None:  # fmt: skip
    """Ship `spans` (each agent's, by `agent_of(span)`) through the servers and link them,
    the virtual clock passing `tail_s` after the last span so that everything is written.
    `alive(now)` says which servers run at that second (a server left out has crashed)."""
    spans = sorted(spans, key=lambda d: d["end_ns"])
    now = spans[0]["end_ns"] // SECOND * SECOND + SECOND
    i, turn = 0, 0
    for server in servers:
        server.linker.clock = lambda: now
    stop = spans[-1]["end_ns"] + int(tail_s * SECOND)
    while now <= stop:
        j = i
        while j < len(spans) and spans[j]["end_ns"] + ship_delay_s * SECOND <= now:
            j += 1
        by_agent = defaultdict(list)
        for d in spans[i:j]:
            by_agent[agent_of(d)].append(d)
        running = alive(now) if alive else servers
        for agent, batch in sorted(by_agent.items()):
            body = {"agent_id": agent, "batch_id": uuid.uuid4().hex, "spans": batch}
            running[turn % len(running)].accept(gzip.compress(json.dumps(body).encode()), "gzip")
            turn += 1
        i = j
        for server in running:
            server.linker._pass(final=False)
        now += SECOND
    for server in running:
        server.linker._pass(final=not server.membership.shared)


def linked(store, spans: list[dict]) -> dict[str, dict]:
    """span_id -> what linking decided for it, as the store has it (a span stored twice
    fails here: nothing may be linked twice)."""
    lo, hi = min(d["start_ns"] for d in spans), max(d["start_ns"] for d in spans)
    rows = store._rows("SELECT span_id, parent_span_id, trace_id, link_method, peer_service FROM spans "
                       "WHERE start_ns >= ? AND start_ns <= ?", [lo, hi])  # fmt: skip
    out = {r[0]: dict(zip(("span_id", "parent_span_id", "trace_id", "link_method", "peer_service"), r)) for r in rows}
    assert len(out) == len(rows), f"{len(rows) - len(out)} spans stored twice"
    return out


def differences(a: dict[str, dict], b: dict[str, dict], keys=("parent_span_id", "trace_id", "link_method",
                                                                "peer_service")) -> list[tuple]:  # fmt: skip
    """(span_id, key, a's, b's) where the two differ; a span missing on one side: key None."""
    out = []
    for sid in sorted(set(a) | set(b)):
        if sid not in a or sid not in b:
            out.append((sid, None, sid in a, sid in b))
            continue
        out += [(sid, k, a[sid].get(k), b[sid].get(k)) for k in keys if a[sid].get(k) != b[sid].get(k)]
    return out
