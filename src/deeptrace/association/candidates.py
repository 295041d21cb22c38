"""The requests a call could belong to: the process's SERVER spans that were open for
the whole of the call (a parent reads its request before the call starts and writes its
response after the call's response came back)."""

from __future__ import annotations

from bisect import bisect_right

import numpy as np

from deeptrace.association.model import SpanRef


class Containment:
    """Servers are kept in tiers by duration (powers of two), each sorted by start. A query
    looks back in each tier only as far as that tier's longest server: with one list, one
    long request anywhere would make every call scan every server started since it, and
    the longest request grows with the window."""

    def __init__(self, servers: list[SpanRef]) -> None:
        self._order = sorted(range(len(servers)), key=lambda i: servers[i].start_ns)
        ordered = [servers[i] for i in self._order]
        tiers: dict[int, list[tuple[int, SpanRef]]] = {}
        for rank, s in enumerate(ordered):
            tiers.setdefault(max(0, s.end_ns - s.start_ns).bit_length(), []).append((rank, s))
        self._tiers = [([s.start_ns for _, s in members], members, max(s.end_ns - s.start_ns for _, s in members))
                       for members in tiers.values()]  # fmt: skip

    def containing(self, start_ns: int, end_ns: int) -> list[SpanRef]:
        """Servers with start <= start_ns and end >= end_ns, latest start first."""
        found = []
        for starts, members, longest in self._tiers:
            earliest = start_ns - longest
            i = bisect_right(starts, start_ns) - 1
            while i >= 0:
                rank, s = members[i]
                if s.start_ns < earliest:
                    break
                if s.end_ns >= end_ns:
                    found.append((rank, s))
                i -= 1
        if len(found) > 1:
            found.sort(key=lambda rs: -rs[0])
        return [s for _, s in found]

    def pairs(self, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`containing` for many calls at once: (call, server) pairs as positions in the
        arrays given and in the server list given, by call, latest start first."""
        calls, found = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
        for tier_starts, members, longest in self._tiers:
            t_start = np.array(tier_starts, dtype=np.int64)
            t_end = np.array([s.end_ns for _, s in members], dtype=np.int64)
            t_rank = np.array([rank for rank, _ in members], dtype=np.int64)
            lo = np.searchsorted(t_start, starts - longest, side="left")
            hi = np.searchsorted(t_start, starts, side="right")
            n = np.maximum(hi - lo, 0)  # a tier of spans that end before they start has none
            call = np.repeat(np.arange(len(starts)), n)
            at = np.repeat(lo - np.r_[0, np.cumsum(n)[:-1]], n) + np.arange(n.sum())
            inside = t_end[at] >= ends[call]
            calls.append(call[inside])
            found.append(t_rank[at[inside]])
        call, rank = np.concatenate(calls), np.concatenate(found)
        by = np.lexsort((-rank, call))
        return call[by], np.array(self._order, dtype=np.int64)[rank[by]]
