"""Accepted spans -> linked spans in the store, on one background thread.

Batches arrive from ingest already durable (the store's `incoming`); here they wait in
the streaming associator until their parents can have arrived from any host, are linked,
written, and only then is their incoming batch forgotten. After a crash, `recover` feeds
the batches still in `incoming` back, minus spans already written.
"""

from __future__ import annotations

import gzip
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from deeptrace.association.streaming import StreamingAssociator
from deeptrace.server.store.base import Store
from deeptrace.spans import new_id

log = logging.getLogger("deeptrace.server")
BATCH_KEY = "_batch"  # where a span remembers the incoming batch it came in
# Held spans are linked again at every pass until their hold is over: a pass a second costs
# a third less than two (bench/server, which runs this loop with it) and publishes at most
# 0.5 s later.
PASS_INTERVAL_S = 1.0


@dataclass
class LinkerStats:
    spans_accepted: int = 0
    spans_published: int = 0
    spans_recovered: int = 0
    passes: int = 0
    last_pass_s: float = 0.0
    write_errors: int = 0
    late_links: int = 0
    split_traces: int = 0


class Linker:
    def __init__(self, store: Store, algorithm: str, header_ids: bool = True, hold_s: float = 5.0,
                 context_s: float = 10.0, interval_s: float = PASS_INTERVAL_S,
                 on_published: list[Callable[[list[dict]], None]] | None = None) -> None:  # fmt: skip
        self.store = store
        self.assoc = StreamingAssociator(algorithm, header_ids=header_ids, hold_s=hold_s, context_s=context_s)
        self.interval_s = interval_s
        self.on_published = on_published or []
        self.stats = LinkerStats()
        self._queue: deque[tuple[tuple[str, str], list[dict]]] = deque()
        self._remaining: dict[tuple[str, str], int] = {}  # spans of a batch not yet written
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="deeptrace-linker", daemon=True)

    @property
    def backlog(self) -> int:
        """Spans accepted and not yet written."""
        with self._lock:
            return sum(self._remaining.values())

    def submit(self, agent_id: str, batch_id: str, spans: list[dict]) -> None:
        with self._lock:
            self._queue.append(((agent_id, batch_id), spans))
            self._remaining[(agent_id, batch_id)] = len(spans)
            self.stats.spans_accepted += len(spans)

    def recover(self) -> None:
        """Before start: what was accepted but not written when the server last stopped."""
        for agent_id, batch_id, body_gz in self.store.incoming():
            spans = json.loads(gzip.decompress(body_gz))["spans"]
            stored = self.store.stored_span_ids([d["span_id"] for d in spans])
            spans = [d for d in spans if d["span_id"] not in stored]
            self.submit(agent_id, batch_id, spans)
            self.stats.spans_recovered += len(spans)
        if self.stats.spans_recovered:
            log.info("recovered %d accepted spans not yet linked", self.stats.spans_recovered)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout_s: float = 30.0) -> None:
        """Link and write everything still held (the hold is cut short)."""
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._pass(final=False)
        self._pass(final=True)

    def _pass(self, final: bool) -> None:
        t0 = time.perf_counter()
        empty_batches = self._take()
        try:
            now = time.time_ns()
            out = self.assoc.close(now) if final else self.assoc.pop_ready(now)
            if out or empty_batches:
                self._publish(out, empty_batches)
        except Exception:  # a bad pass must not kill the thread; spans stay in incoming for replay
            self.stats.write_errors += 1
            log.exception("linking or writing spans failed")
        self.stats.passes += 1
        self.stats.last_pass_s = time.perf_counter() - t0
        self.stats.late_links, self.stats.split_traces = self.assoc.stats.late_links, self.assoc.stats.split_traces

    def _take(self) -> list[tuple[str, str]]:
        with self._lock:
            taken = list(self._queue)
            self._queue.clear()
        empty = []
        for key, spans in taken:
            if not spans:
                empty.append(key)
            for d in spans:
                d[BATCH_KEY] = key
                if not d.get("trace_id"):
                    d["trace_id"] = new_id(16)
                d.setdefault("service", "unknown")
            self.assoc.push(spans)
        return empty

    def _publish(self, out: list[dict], done: list[tuple[str, str]]) -> None:
        set_peer_services(out, self.assoc.published + self.assoc.pending)
        with self._lock:
            for d in out:
                key = d[BATCH_KEY]
                self._remaining[key] -= 1
                if self._remaining[key] == 0:
                    done.append(key)
            for key in done:
                self._remaining.pop(key, None)
        self.store.write_spans(out, done)
        self.stats.spans_published += len(out)
        for callback in self.on_published:
            try:
                callback(out)
            except Exception:
                log.exception("a consumer of published spans failed")


def set_peer_services(out: list[dict], window: list[dict]) -> None:
    """Who each call went to: the service whose SERVER span it is joined to, or, for peers
    nothing traced answers for, the protocol and address (`redis 10.0.0.5:6379`). A SERVER
    span's peer is its caller."""
    by_id = {d["span_id"]: d for d in window}
    for d in out:
        if d["kind"] == "SERVER" and d.get("parent_span_id"):
            parent = by_id.get(d["parent_span_id"])
            if parent is not None:
                d["peer_service"] = parent.get("service")
                if parent["kind"] == "CLIENT":
                    parent["peer_service"] = d.get("service")
    for d in out:
        if d["kind"] != "SERVER" and not d.get("peer_service"):
            d["peer_service"] = f"{d.get('protocol') or 'tcp'} {d.get('raddr', '?')}:{d.get('rport', '?')}"
