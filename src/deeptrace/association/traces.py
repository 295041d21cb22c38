"""Traces from links: every span connected through parent links shares one trace id,
the id its root already had (so ids never change once a root has been seen)."""

from __future__ import annotations

from deeptrace.association.model import Link


class _Sets:
    """Union-find over span positions."""

    def __init__(self, n: int) -> None:
        self.up = list(range(n))

    def find(self, i: int) -> int:
        up = self.up
        while up[i] != i:
            up[i] = up[up[i]]
            i = up[i]
        return i

    def join(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.up[rb] = ra


def components(n: int, links: dict[int, Link]) -> list[int]:
    """For each span, a representative of the set of spans linked to it."""
    sets = _Sets(n)
    for child, link in links.items():
        if link.parent is not None:
            sets.join(link.parent, child)
    return [sets.find(i) for i in range(n)]


def trace_ids(span_dicts: list[dict], links: dict[int, Link], fixed: dict[int, str] | None = None,
              rep: list[int] | None = None) -> list[str]:  # fmt: skip
    """A trace id for each span. `fixed` maps span positions to trace ids already
    published (streaming): a set holding one keeps that id. Otherwise the set's root,
    the earliest span without a parent, lends its own id. `rep`: the links' components,
    if the caller has them already."""
    rep = rep if rep is not None else components(len(span_dicts), links)
    chosen: dict[int, tuple] = {}  # representative -> (rank, trace id); lower rank wins
    for i, r in enumerate(rep):
        if fixed and i in fixed:
            rank = (0, 0)
            tid = fixed[i]
        elif links.get(i) is None or links[i].parent is None:
            rank = (1, span_dicts[i]["start_ns"])
            tid = span_dicts[i].get("trace_id") or span_dicts[i]["span_id"].rjust(32, "0")
        else:
            continue
        if r not in chosen or rank < chosen[r][0]:
            chosen[r] = (rank, tid)
    return [chosen[r][1] if r in chosen else span_dicts[r]["span_id"].rjust(32, "0") for r in rep]
