"""The requests a call could belong to: the process's SERVER spans that were open for
the whole of the call (a parent reads its request before the call starts and writes its
response after the call's response came back)."""

from __future__ import annotations

from bisect import bisect_right

from deeptrace.association.model import SpanRef


class Containment:
    """Servers are kept in tiers by duration (powers of two), each sorted by start. A query
    looks back in each tier only as far as that tier's longest server: with one list, one
    long request anywhere would make every call scan every server started since it, and
    the longest request grows with the window."""

    def __init__(self, servers: list[SpanRef]) -> None:
        ordered = sorted(servers, key=lambda s: s.start_ns)
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
