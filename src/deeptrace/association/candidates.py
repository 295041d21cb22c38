"""The requests a call could belong to: the process's SERVER spans that were open for
the whole of the call (a parent reads its request before the call starts and writes its
response after the call's response came back)."""

from __future__ import annotations

from bisect import bisect_right

from deeptrace.association.model import SpanRef


class Containment:
    def __init__(self, servers: list[SpanRef]) -> None:
        self.servers = sorted(servers, key=lambda s: s.start_ns)
        self._starts = [s.start_ns for s in self.servers]
        self._longest = max((s.end_ns - s.start_ns for s in self.servers), default=0)

    def containing(self, start_ns: int, end_ns: int) -> list[SpanRef]:
        """Servers with start <= start_ns and end >= end_ns, latest start first."""
        out = []
        i = bisect_right(self._starts, start_ns) - 1
        earliest = start_ns - self._longest
        servers = self.servers
        while i >= 0:
            s = servers[i]
            if s.start_ns < earliest:
                break
            if s.end_ns >= end_ns:
                out.append(s)
            i -= 1
        return out
