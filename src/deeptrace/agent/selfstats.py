"""The agent's own cost: CPU seconds and resident memory, from /proc/self.

Read every few seconds for the server's agent view, so it must be cheap: two small procfs
reads, no psutil.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True, slots=True)
class SelfStats:
    cpu_seconds: float  # user + system, all threads, since the process started
    rss_bytes: int


def cpu_seconds(stat_text: str) -> float:
    """utime + stime from the text of /proc/PID/stat."""
    # The command name (field 2) may hold spaces and parentheses: count fields after its last ')'.
    fields = stat_text[stat_text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_bytes(statm_text: str) -> int:
    """Resident pages from the text of /proc/PID/statm, in bytes."""
    return int(statm_text.split()[1]) * _PAGE


def read() -> SelfStats:
    """This process's figures; where procfs is unreadable, the portable (coarser) fallbacks."""
    try:
        with open("/proc/self/stat") as f:
            cpu = cpu_seconds(f.read())
    except (OSError, ValueError, IndexError):
        t = os.times()
        cpu = t.user + t.system
    try:
        with open("/proc/self/statm") as f:
            rss = rss_bytes(f.read())
    except (OSError, ValueError, IndexError):
        rss = 0
    return SelfStats(round(cpu, 3), rss)
