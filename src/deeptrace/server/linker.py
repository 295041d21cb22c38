"""Accepted spans -> linked spans in the store, on one background thread.

Batches arrive from ingest already durable (the store's `incoming`); here they wait in
the streaming associator until their parents can have arrived from any host, are linked,
written, and only then is their incoming batch forgotten. After a crash, `recover` feeds
the batches still in `incoming` back, minus spans already written.

On a store several servers share (server/cluster.py), a linker links only the agents its
server owns: it takes their batches from the store, whichever server accepted them, and
lets go of the agents another server owns now.

One bad span must never hold up the others: a span that cannot be linked or written is
moved aside as a dead letter (kept with why, counted, listed by the API), its batch is
done with all the same, and everyone else's spans are written. A store that takes no
writes at all (disk full) is another matter: then nothing is dead-lettered, and the spans
wait in memory for the next pass.
"""

from __future__ import annotations

import gzip
import json
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from deeptrace.association.streaming import CALLER, StreamingAssociator
from deeptrace.capture.spans import PEER_SERVICE, new_id
from deeptrace.server import ingest
from deeptrace.server.cluster import Membership, RemoteEnds
from deeptrace.server.store.base import DeadLetter, Store, StoreUnavailable

log = logging.getLogger("deeptrace.server")
BATCH_KEY = "_batch"  # where a span remembers the incoming batch it came in
# Held spans are linked again at every pass until their hold is over: a pass a second costs
# a third less than two (bench/server, which runs this loop with it) and publishes at most
# 0.5 s later.
PASS_INTERVAL_S = 1.0
MAX_LETTER_BYTES = 1 << 20  # of a refused batch's body kept in its dead letter
# How far back each pass looks for batches other servers accepted for this one's agents
# (further back, an agent's batches are found when it is taken over).
RECENT_BATCHES_NS = 300 * 10**9


@dataclass
class LinkerStats:
    spans_accepted: int = 0
    spans_published: int = 0
    spans_recovered: int = 0
    passes: int = 0
    last_pass_s: float = 0.0
    write_errors: int = 0  # writes that failed (the spans were retried or dead-lettered)
    link_errors: int = 0  # passes whose linking failed (their spans went out unlinked)
    dead_letters: int = 0  # spans moved aside: they could not be linked or written
    late_links: int = 0
    split_traces: int = 0
    spans_taken_over: int = 0  # of agents this server took over from another (shared store)
    remote_callers: int = 0  # spans whose caller another server linked
    callers_never_stored: int = 0  # spans that waited in vain for a caller another server had accepted


class Linker:
    def __init__(self, store: Store, algorithm: str, header_ids: bool = True, hold_s: float = 5.0,
                 context_s: float = 10.0, interval_s: float = PASS_INTERVAL_S,
                 on_published: list[Callable[[list[dict]], None]] | None = None,
                 membership: Membership | None = None, clock: Callable[[], int] = time.time_ns) -> None:  # fmt: skip
        self.store = store
        self.clock = clock  # ns since the epoch: a virtual one in benchmarks and tests
        self.membership = membership or Membership(store)
        self.remote = RemoteEnds(store) if self.membership.shared else None
        self.assoc = StreamingAssociator(algorithm, header_ids=header_ids, hold_s=hold_s, context_s=context_s,
                                         resolve=self.remote.callers if self.remote else None)  # fmt: skip
        self.interval_s = interval_s
        self.on_published = on_published or []
        self.stats = LinkerStats()
        self._queue: deque[tuple[tuple[str, str], list[dict]]] = deque()
        self._remaining: dict[tuple[str, str], int] = {}  # spans of a batch not yet written
        # Linked but not written yet (the store was unavailable), dead letters to write, and
        # batches with nothing left to write: all go in the next write.
        self._unwritten: list[dict] = []
        self._dead: list[DeadLetter] = []
        self._empty: list[tuple[str, str]] = []
        self._agents: set[str] = set()  # shared store: the agents whose batches this linker has taken
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="deeptrace-linker", daemon=True)

    @property
    def backlog(self) -> int:
        """Spans accepted and not yet written (nor dead-lettered)."""
        with self._lock:
            return sum(self._remaining.values())

    def submit(self, agent_id: str, batch_id: str, spans: list[dict]) -> None:
        """Link this batch (of an agent this server owns: Membership.owns); a batch taken
        already is not taken again."""
        with self._lock:
            if (agent_id, batch_id) in self._remaining:
                return
            if self.membership.shared and agent_id not in self._agents:
                return  # not taken over yet (or let go of): the linker takes it from the store
            self._queue.append(((agent_id, batch_id), spans))
            self._remaining[(agent_id, batch_id)] = len(spans)
            self.stats.spans_accepted += len(spans)

    def recover(self) -> None:
        """Before start: what was accepted but not written when the server last stopped.
        Batches are checked again as ingest checks them: one accepted by an older server
        that this one would refuse is dead-lettered whole instead of failing every pass.
        (On a shared store, an agent's batches are taken when this server owns it.)"""
        if self.membership.shared:
            return
        self.stats.spans_recovered += self._load(self.store.incoming())
        if self.stats.spans_recovered:
            log.info("recovered %d accepted spans not yet linked", self.stats.spans_recovered)
        if self._dead or self._empty:
            self._write_pending()

    def _load(self, batches: list[tuple[str, str, bytes]]) -> int:
        """Accepted batches from the store, minus the spans already written."""
        n = 0
        for agent_id, batch_id, body_gz in batches:
            with self._lock:
                if (agent_id, batch_id) in self._remaining:
                    continue
            try:
                spans = ingest.parse(ingest.decode(body_gz, "gzip"), body_gz, time.time_ns()).spans
            except ingest.BadBatch as e:
                self._refuse_batch(agent_id, batch_id, body_gz, str(e))
                continue
            stored = self.store.stored_span_ids([d["span_id"] for d in spans])
            spans = [d for d in spans if d["span_id"] not in stored]
            self.submit(agent_id, batch_id, spans)
            n += len(spans)
        return n

    def _sync_agents(self) -> None:
        """Shared store: let go of the agents another server owns now, take over the ones
        this server owns now, and take the batches other servers accepted for them."""
        if self.membership.stale():  # before asking the store anything: it may be what is away
            if self._agents:
                self._let_go(set(self._agents))
            return
        recent = self.store.recent_batches(time.time_ns() - RECENT_BATCHES_NS)
        candidates = self._agents | {a for a, _ in recent} | {a.agent_id for a in self.store.agents()}
        owned = {a for a in candidates if self.membership.owns(a)}
        lost = self._agents - owned
        if lost:
            self._let_go(lost)
        new = owned - self._agents
        if new:
            with self._lock:
                self._agents |= new  # first: from here the HTTP threads may submit their batches
            taken = self._load(self.store.batches_of(sorted(new)))
            self.stats.spans_taken_over += taken
            log.info("linking %d more agents (%d spans waiting for them)", len(new), taken)
        with self._lock:
            unseen = [k for k in recent if k[0] in self._agents and k not in self._remaining]
        if unseen:
            self._load(self.store.batches_of([], unseen))

    def _let_go(self, agents: set[str]) -> None:
        def theirs(d: dict) -> bool:
            return d[BATCH_KEY][0] in agents

        self.assoc.drop(theirs)
        self._unwritten = [d for d in self._unwritten if not theirs(d)]
        with self._lock:
            self._agents -= agents
            for key in [k for k in self._remaining if k[0] in agents]:
                del self._remaining[key]
            self._queue = deque(item for item in self._queue if item[0][0] not in agents)
        self._empty = [k for k in self._empty if k[0] not in agents]
        self._dead = [x for x in self._dead if x.agent_id not in agents]
        log.info("another server links %d agents now: let go of them", len(agents))

    def _refuse_batch(self, agent_id: str, batch_id: str, body_gz: bytes, reason: str) -> None:
        log.error("an accepted batch %s/%s is refused now: %s; kept as a dead letter", agent_id, batch_id, reason)
        self._empty.append((agent_id, batch_id))
        try:
            text = gzip.decompress(body_gz)[:MAX_LETTER_BYTES].decode("utf-8", "replace")
        except (OSError, EOFError) as e:
            text = f"(not gzip: {e})"
        self._dead.append(DeadLetter(agent_id, batch_id, "", time.time_ns(), f"batch: {reason}", text))
        self.stats.dead_letters += 1

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout_s: float = 30.0) -> None:
        """Link and write everything still held (the hold is cut short)."""
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._pass(final=False)
        # On a shared store, what is still held is left to the server that owns its agents next.
        self._pass(final=not self.membership.shared)

    def _pass(self, final: bool) -> None:
        t0 = time.perf_counter()
        if self.membership.shared:
            try:
                self._sync_agents()
            except Exception:  # the store may be away: this pass links what it holds
                log.exception("looking for other servers' batches failed")
        self._take()
        now = self.clock()
        try:
            out = self.assoc.close(now) if final else self.assoc.pop_ready(now)
        except Exception:  # a bad pass must not kill the thread, nor hold these spans back forever
            self.stats.link_errors += 1
            log.exception("linking failed: the spans due now are written unlinked")
            out = self.assoc.pop_unlinked(None if final else now)
        if out:
            try:
                set_peer_services(out, self.assoc.published + self.assoc.waiting + self.assoc.pending, self.remote)
            except Exception:  # the store may be away: peers are named by address then
                log.exception("looking for the callees other servers link failed")
                set_peer_services(out, [], None)
            self._unwritten += out
        if self._unwritten or self._dead or self._empty:
            try:
                self._write_pending()
            except Exception:  # nothing may end this thread: what is not written waits for the next pass
                self.stats.write_errors += 1
                log.exception("writing spans failed; they wait for the next pass")
        self.stats.passes += 1
        self.stats.last_pass_s = time.perf_counter() - t0
        a = self.assoc.stats
        self.stats.late_links, self.stats.split_traces = a.late_links, a.split_traces
        self.stats.remote_callers, self.stats.callers_never_stored = a.remote_callers, a.callers_never_stored

    def _take(self) -> None:
        with self._lock:
            taken = list(self._queue)
            self._queue.clear()
        for key, spans in taken:
            if not spans:
                self._empty.append(key)
            for d in spans:
                d[BATCH_KEY] = key
                if not d.get("trace_id"):
                    d["trace_id"] = new_id(16)
                d.setdefault("service", "unknown")
            for d, reason in self.assoc.push(spans):
                self._dead_letter(d, reason)

    def _dead_letter(self, d: dict, reason: str) -> None:
        agent_id, batch_id = d[BATCH_KEY]
        try:
            text = json.dumps({k: v for k, v in d.items() if k != BATCH_KEY}, default=repr)
        except (TypeError, ValueError, RecursionError) as e:
            text = f"(not JSON: {e})"
        self._dead.append(DeadLetter(agent_id, batch_id, str(d.get("span_id", "")), time.time_ns(), reason, text))
        self.stats.dead_letters += 1
        log.error("span %s of batch %s/%s moved aside as a dead letter: %s", d.get("span_id"), agent_id, batch_id,
                  reason)  # fmt: skip

    def _write_pending(self) -> None:
        """Write what is linked, the dead letters and the batches they complete. A write that
        fails for its data is cut in halves until the spans that fail alone are found: they
        become dead letters and the rest is written. Unavailable store: all waits. (On a
        shared store, the spans of agents another server owns by now are let go of instead:
        that server links them from their batches.)"""
        if self.membership.shared:
            lost = {d[BATCH_KEY][0] for d in self._unwritten} | {x.agent_id for x in self._dead}
            lost = {a for a in lost if not self.membership.owns(a)}
            if lost:
                self._let_go(lost)
        spans, written, bad = self._unwritten, [], []
        try:
            try:
                self.store.write_spans(spans, self._completed(spans), self._dead)
                written = spans
            except StoreUnavailable:
                raise
            except Exception as e:
                self.stats.write_errors += 1
                log.warning("writing %d spans failed (%s): looking for the ones that cannot be written", len(spans), e)
                bad = self._isolate(spans, written)
                for d, reason in bad:
                    self._dead_letter(d, reason)
                self.store.write_spans([], self._completed(written), self._dead)
        except StoreUnavailable as e:
            self.stats.write_errors += 1
            handled = {id(d) for d in written} | {id(d) for d, _ in bad}
            self._unwritten = [d for d in spans if id(d) not in handled]
            self._forget(written, [])  # in the store already; their batches wait for the rest
            self.stats.spans_published += len(written)
            self._notify(written)
            log.error("the store takes no writes (%s): %d spans wait for the next pass", e, len(self._unwritten))
            return
        self._forget(written, self._dead)
        self._unwritten, self._dead, self._empty = [], [], []
        self.stats.spans_published += len(written)
        self._notify(written)

    def _isolate(self, spans: list[dict], written: list[dict]) -> list[tuple[dict, str]]:
        """Write spans in halves; the ones that fail alone, with why. Appends what was written."""
        try:
            self.store.write_spans(spans, [])
            written += spans
            return []
        except StoreUnavailable:
            raise
        except Exception as e:
            if len(spans) == 1:
                return [(spans[0], f"cannot be written: {type(e).__name__}: {e}")]
        mid = len(spans) // 2
        return self._isolate(spans[:mid], written) + self._isolate(spans[mid:], written)

    def _completed(self, spans: list[dict]) -> list[tuple[str, str]]:
        """The batches that are done once these spans and the pending dead letters are written."""
        counts = _per_batch(spans, self._dead)
        with self._lock:
            full = [k for k, n in counts.items() if self._remaining.get(k) == n]
        return full + self._empty

    def _forget(self, spans: list[dict], dead: list[DeadLetter]) -> None:
        """These spans and dead letters are written: their batches have that many fewer to wait for."""
        with self._lock:
            for key, n in _per_batch(spans, dead).items():
                left = self._remaining.get(key, 0) - n
                if left > 0:
                    self._remaining[key] = left
                else:
                    self._remaining.pop(key, None)
            for key in self._empty:
                self._remaining.pop(key, None)

    def _notify(self, spans: list[dict]) -> None:
        for callback in self.on_published:
            try:
                callback(spans)
            except Exception:
                log.exception("a consumer of published spans failed")


def _per_batch(spans: list[dict], dead: list[DeadLetter]) -> Counter:
    counts = Counter(d[BATCH_KEY] for d in spans)
    counts.update((x.agent_id, x.batch_id) for x in dead if x.span_id)  # a whole batch's letter has no span
    return counts


def set_peer_services(out: list[dict], window: list[dict], remote: RemoteEnds | None = None) -> None:
    """Who each call went to: the service whose SERVER span it is joined to (here, or by
    another server), or, for peers nothing traced answers for, the name the agent gave the
    address (`peer.service`: a Kubernetes pod or Service), else the protocol and address
    (`redis 10.0.0.5:6379`). A SERVER span's peer is its caller."""
    by_id = {d["span_id"]: d for d in window}
    for d in out:
        if d["kind"] == "SERVER" and CALLER in d:
            d["peer_service"] = d[CALLER].service
        elif d["kind"] == "SERVER" and d.get("parent_span_id"):
            parent = by_id.get(d["parent_span_id"])
            if parent is not None:
                d["peer_service"] = parent.get("service")
                if parent["kind"] == "CLIENT":
                    parent["peer_service"] = d.get("service")
    unnamed = [d for d in out if d["kind"] != "SERVER" and not d.get("peer_service")]
    if remote is not None and unnamed:
        named = remote.callee_services(unnamed)
        for d in unnamed:
            if d["span_id"] in named:
                d["peer_service"] = named[d["span_id"]]
    for d in unnamed:
        if not d.get("peer_service"):
            named = (d.get("attributes") or {}).get(PEER_SERVICE)
            d["peer_service"] = named if isinstance(named, str) and named else (
                f"{d.get('protocol') or 'tcp'} {d.get('raddr', '?')}:{d.get('rport', '?')}")  # fmt: skip
