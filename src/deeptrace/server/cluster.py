"""Several servers on one store: which agents' spans each server links, and the calls whose
two ends two servers link.

Linking needs one host's spans only (inference looks at one process's requests and calls),
so agents are shared out: each is linked by one live server, chosen by rendezvous hashing
over the servers whose heartbeat the store has seen lately. When a server joins or leaves,
only the agents it wins or loses move. A new owner waits HANDOFF_S before it takes an
agent's batches, so that the old owner, which lets go at its next look (within a
heartbeat), has stopped writing them; spans the old owner wrote are skipped
(stored_span_ids) and the rest of its batches, not marked done, are linked by the new owner.
A server that cannot reach the store for SERVER_TIMEOUT_S - 1 s lets go of every agent,
since the others will have taken them.

The one link across hosts, seq-join, joins a SERVER span to the CLIENT span that called it.
Every accepted span's call end goes into the store with its batch (Cluster.record_call_ends),
so the server linking a callee knows at once whether its caller was accepted anywhere; if
so, the callee's trace waits (StreamingAssociator) until the caller is stored, and takes
its trace id. The caller's side names its peer the same way, from the callee's end.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time

from deeptrace.association.exact import (
    CallEnd,
    best_partner,
    client_conn,
    json_call_key,
    json_client_conn,
    span_call_key,
)
from deeptrace.association.model import SpanRef
from deeptrace.association.streaming import WAIT
from deeptrace.capture.spans import new_id
from deeptrace.server.store.base import Cluster, Store

log = logging.getLogger("deeptrace.server")
HEARTBEAT_S = 1.0
SERVER_TIMEOUT_S = 5.0  # no heartbeat for this long (the store's clock counts seconds): gone
HANDOFF_S = 3.0  # an agent's new owner waits this long before it takes its batches
MAX_WAITING = 200_000  # roots whose caller RemoteEnds remembers while it is not stored


def owner(agent_id: str, servers: list[str]) -> str:
    """Rendezvous hashing: the server with the highest score for this agent."""
    return max(servers, key=lambda s: hashlib.blake2b(f"{s}/{agent_id}".encode(), digest_size=8).digest())


class Membership:
    """This server's view of who links which agent. With a store only one server can use,
    it links every agent and asks the store nothing."""

    def __init__(self, store: Store, address: str = "", server_id: str | None = None,
                 clock=time.monotonic) -> None:  # fmt: skip
        self.store, self.address = store, address
        self.server_id = server_id or new_id(8)
        self.shared = isinstance(store, Cluster)
        self.clock = clock
        self.servers = [self.server_id]
        self.handoff_s = HANDOFF_S
        self._last_beat = clock()
        self._owned_since: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="deeptrace-membership", daemon=True)

    def start(self) -> None:
        if self.shared:
            self.beat()
            self._thread.start()

    def close(self) -> None:
        if self.shared:
            self._stop.set()
            if self._thread.is_alive():
                self._thread.join(5.0)
            try:
                self.store.heartbeat(self.server_id, self.address, leaving=True)
            except Exception as e:  # noqa: BLE001 - the others will see the heartbeat stop instead
                log.warning("could not tell the store this server leaves: %s", e)

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.beat()

    def beat(self) -> None:
        try:
            self.store.heartbeat(self.server_id, self.address)
            servers = self.store.live_servers(SERVER_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - whatever failed, the view stays as it was
            log.warning("heartbeat failed: %s", e)
            return
        self.servers = sorted(set(servers) | {self.server_id})
        self._last_beat = self.clock()

    def stale(self) -> bool:
        """No heartbeat got through for long enough that the others count this server gone."""
        return self.shared and self.clock() - self._last_beat > SERVER_TIMEOUT_S - 1.0

    def owns(self, agent_id: str) -> bool:
        """This server links the agent's spans now (and may take its batches)."""
        if not self.shared:
            return True
        now = self.clock()
        if self.stale():  # the others may have taken every agent: each is handed over anew
            self._owned_since.clear()
            return False
        if owner(agent_id, self.servers) != self.server_id:
            self._owned_since.pop(agent_id, None)
            return False
        since = self._owned_since.get(agent_id)
        if since is None:
            since = self._owned_since[agent_id] = now
        return now - since >= self.handoff_s


class RemoteEnds:
    """The other end of calls whose two ends another server links, from the store."""

    def __init__(self, store: Cluster) -> None:
        self.store = store
        self._waiting: dict[str, CallEnd] = {}  # root span_id -> its caller, accepted, not stored yet

    def callers(self, roots: list[SpanRef]) -> dict[str, CallEnd | str | None]:
        """For each root SERVER span: its caller as stored (with its trace id), WAIT if
        the caller was accepted and is not stored yet, None if no caller was accepted."""
        chosen = {r.span_id: self._waiting[r.span_id] for r in roots if r.span_id in self._waiting}
        new = [r for r in roots if r.span_id not in chosen]
        if new:
            keys = {r.span_id: span_call_key(r) for r in new}
            ends = self._ends(list(set(keys.values())), "CLIENT")
            for r in new:
                best = best_partner(r.start_ns, r.end_ns, client_conn(r), ends.get(keys[r.span_id], ()))
                if best is not None:
                    chosen[r.span_id] = best
        if not chosen:
            return {}
        stored = self.store.stored_trace_ids([e.span_id for e in chosen.values()],
                                             min(e.start_ns for e in chosen.values()),
                                             max(e.start_ns for e in chosen.values()))  # fmt: skip
        out: dict[str, CallEnd | str | None] = {}
        for root_id, best in chosen.items():
            best.trace_id = stored.get(best.span_id)
            if best.trace_id is None:  # accepted, not stored yet: only whether it is stored is asked next time
                self._waiting[root_id] = best
                out[root_id] = WAIT
            else:
                self._waiting.pop(root_id, None)
                out[root_id] = best
        while len(self._waiting) > MAX_WAITING:  # roots that stopped asking (handed over, given up)
            del self._waiting[next(iter(self._waiting))]
        return out

    def callee_services(self, calls: list[dict]) -> dict[str, str]:
        """For each CLIENT span (as JSON): the service of the SERVER span that answered it,
        where one was accepted."""
        keys = {d["span_id"]: json_call_key(d) for d in calls}
        ends = self._ends([k for k in set(keys.values()) if k is not None], "SERVER")
        out = {}
        for d in calls:
            best = best_partner(d["start_ns"], d["end_ns"], json_client_conn(d), ends.get(keys[d["span_id"]], ()))
            if best is not None:
                out[d["span_id"]] = best.service
        return out

    def _ends(self, keys: list[str], kind: str) -> dict[str, list[CallEnd]]:
        by_key: dict[str, list[CallEnd]] = {}
        for end in self.store.call_ends(keys, kind):
            by_key.setdefault(end.key, []).append(end)
        return by_key


def store_batch(store: Store, batch, now_ns: int) -> None:
    """An accepted batch (ingest.Batch) into the store, before the agent hears so; on a shared
    store its call ends first, since the batch's owner may take it at once. Raises
    DuplicateBatch for a batch stored before."""
    if isinstance(store, Cluster):
        store.record_call_ends(call_rows(batch.spans), now_ns)
    store.accept_batch(batch.agent_id, batch.batch_id, batch.body_gz, len(batch.spans), now_ns)


def call_rows(spans: list[dict]) -> list[CallEnd]:
    """The call ends of a batch's spans, for Cluster.record_call_ends."""
    rows = []
    for d in spans:
        key = json_call_key(d)
        if key is not None:
            rows.append(CallEnd(d["span_id"], d["start_ns"], d["end_ns"], json_client_conn(d),
                                service=d.get("service") or "unknown", key=key, kind=d["kind"]))  # fmt: skip
    return rows
