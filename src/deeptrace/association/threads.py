"""Thread affinity: in a thread-per-request process the calls made for a request go
out on the thread that read it, between its read and its response. Whether a process
works that way is measured, not assumed: event loops serve many requests on one thread
and pools hand work to other threads, and there a thread says nothing."""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from dataclasses import dataclass

from deeptrace.association.model import THREAD, Link, ProcessSpans, SpanRef

MIN_REQUESTS = 20  # below this a process's habits are not known well enough to trust


@dataclass(slots=True)
class ThreadUse:
    requests: int
    exclusive: float  # share of requests read and answered on one thread that served nothing else meanwhile
    calls_on_serving_thread: float  # share of calls made on a thread that was serving a request

    @property
    def per_request(self) -> bool:
        return self.requests >= MIN_REQUESTS and self.exclusive >= 0.95


class ServingThreads:
    """The requests each thread read, in order."""

    def __init__(self, servers: list[SpanRef]) -> None:
        self.by_thread: dict[int, list[SpanRef]] = defaultdict(list)
        for s in sorted(servers, key=lambda s: s.start_ns):
            self.by_thread[s.tid].append(s)
        self._starts = {tid: [s.start_ns for s in spans] for tid, spans in self.by_thread.items()}

    def serving(self, c: SpanRef) -> SpanRef | None:
        """The latest request read on the call's thread that was still open for the whole call."""
        spans = self.by_thread.get(c.tid)
        if not spans:
            return None
        i = bisect_right(self._starts[c.tid], c.start_ns) - 1
        if i >= 0 and spans[i].end_ns >= c.end_ns:
            return spans[i]
        return None


def measure(process: ProcessSpans, threads: ServingThreads) -> ThreadUse:
    exclusive = 0
    for spans in threads.by_thread.values():
        last_end = -1
        for i, s in enumerate(spans):
            nxt = spans[i + 1].start_ns if i + 1 < len(spans) else None
            alone = s.start_ns > last_end and (nxt is None or nxt > s.end_ns)
            if alone and s.resp_tid in (None, s.tid):
                exclusive += 1
            last_end = max(last_end, s.end_ns)
    serving = sum(1 for c in process.clients if threads.serving(c) is not None)
    n = len(process.servers)
    return ThreadUse(n, exclusive / n if n else 0.0, serving / len(process.clients) if process.clients else 0.0)


def thread_links(process: ProcessSpans, threads: ServingThreads, use: ThreadUse) -> dict[int, Link]:
    """Links for the open calls made on a thread that was serving a request, when the
    process is thread-per-request. Confidence is the measured exclusivity: the share of
    this process's requests whose thread served them alone."""
    if not use.per_request:
        return {}
    links = {}
    for c in process.open_clients:
        parent = threads.serving(c)
        if parent is not None:
            links[c.index] = Link(parent.index, THREAD, use.exclusive)
    return links
