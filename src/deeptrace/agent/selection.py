"""Which processes are traced: by pid (with descendants), by name, or all.

The kernel side adds forked children of traced processes and processes that
exec into a selected name the moment they start; this module computes the set
from /proc at start and on each refresh, which also removes processes that
have exited.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from deeptrace.errors import DeepTraceError

PROC = Path("/proc")
COMM_LEN = 15  # the kernel keeps 15 characters of a process name


@dataclass
class Selection:
    pids: list[int] = field(default_factory=list)
    comms: list[str] = field(default_factory=list)
    trace_all: bool = False

    @property
    def empty(self) -> bool:
        """Nothing selected yet: library users add processes with Collector.trace()."""
        return not (self.trace_all or self.pids or self.comms)

    def validate(self) -> None:
        if self.trace_all and (self.pids or self.comms):
            raise DeepTraceError("--all traces every process; do not combine it with --pid or --comm")
        for name in self.comms:
            if len(name.encode()) > COMM_LEN:
                raise DeepTraceError(
                    f"--comm {name!r} is longer than the {COMM_LEN} characters the kernel keeps of a "
                    f"process name; use {name.encode()[:COMM_LEN].decode(errors='ignore')!r}"
                )
        for pid in self.pids:
            if not (PROC / str(pid)).exists():
                raise DeepTraceError(f"no process with pid {pid}")


def _status_field(pid: int, name: str) -> int | None:
    try:
        with open(PROC / str(pid) / "status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def tgid_of(pid: int) -> int | None:
    """The process (thread group) a pid or thread id belongs to."""
    return _status_field(pid, "Tgid")


def comm_of(pid: int) -> str | None:
    try:
        return (PROC / str(pid) / "comm").read_text().rstrip("\n")
    except OSError:
        return None


def all_tgids() -> list[int]:
    return [int(d) for d in os.listdir(PROC) if d.isdigit()]


def parent_map() -> dict[int, int]:
    """tgid -> parent tgid for every live process."""
    parents = {}
    for pid in all_tgids():
        ppid = _status_field(pid, "PPid")
        if ppid is not None:
            parents[pid] = ppid
    return parents


def with_descendants(roots: set[int], parents: dict[int, int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = set(), list(roots)
    while stack:
        pid = stack.pop()
        if pid in out:
            continue
        out.add(pid)
        stack.extend(children.get(pid, ()))
    return out


def initial_tgids(sel: Selection) -> set[int]:
    """The processes to trace now: the given pids and their descendants, and name matches."""
    roots = {t for t in (tgid_of(p) for p in sel.pids) if t is not None}
    tgids = with_descendants(roots, parent_map()) if roots else set()
    if sel.comms:
        wanted = set(sel.comms)
        tgids |= {pid for pid in all_tgids() if comm_of(pid) in wanted}
    return tgids


def alive(tgid: int) -> bool:
    return (PROC / str(tgid)).exists()
