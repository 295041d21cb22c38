"""Sampling under overload: the level the kernel samples connections at, from how far the
reader is behind.

The kernel keeps an exchange, or a connection of records, with probability 1/2^level
(agent/bpf/deeptrace.bpf.c, "sampling"). Level 0 keeps all. The reader is falling behind
when a ring holds more than `high_water` of its size unread and more than at the last look
(a burst it is draining is not that), when it holds more than twice that, or when the
kernel counted something lost for want of room: the level goes up (at most once per
`step_s`, so a step has time to show), one step, or, when a fraction f of what came was
lost, as many as halve what is written until it fits (log2 of 1/(1-f), rounded up): a
reader held to a CPU quota looks only a few times a second, and the rings fill in less.
The kernel does not wait for it: when a ring passes half full (or is full), it raises the
level a step itself, at most once per ~16 ms, and this control takes that level over (adopt).
When the rings stay under `low_water` for `calm_s` with nothing lost, it comes down one step.
The level a span was written at is its `sampling.weight` (2^level).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from deeptrace.capture.records import SAMPLE_SHIFT_MAX


@dataclass
class SamplingControl:
    high_water: float = 0.25  # fraction of a ring unread that, growing, means "behind"
    low_water: float = 0.05
    step_s: float = 0.2  # at most one step up per this
    calm_s: float = 3.0  # below low water, nothing lost, this long: one step down
    max_level: int = SAMPLE_SHIFT_MAX
    level: int = 0
    _last_step: float = float("-inf")
    _calm_since: float | None = None
    _last_backlog: float = 0.0

    def adopt(self, level: int, now: float) -> None:
        """The kernel raised the level itself (a ring past half full between two looks): go
        on from there, as after a step of our own."""
        self.level = min(self.max_level, level)
        self._last_step = now
        self._calm_since = None

    def update(self, backlog: float, lost: float, now: float) -> bool:
        """backlog: the fullest ring's unread fraction; lost: the fraction of what the kernel
        had to write since the last update that it lost for want of room. True if the level
        changed."""
        growing, self._last_backlog = backlog > self._last_backlog, backlog
        if lost or backlog > 2 * self.high_water or (backlog > self.high_water and growing):
            self._calm_since = None
            if self.level < self.max_level and now - self._last_step >= self.step_s:
                steps = max(1, math.ceil(-math.log2(1 - min(lost, 0.999))))
                self.level = min(self.max_level, self.level + steps)
                self._last_step = now
                return True
            return False
        if backlog >= self.low_water or self.level == 0:
            self._calm_since = None
            return False
        if self._calm_since is None:
            self._calm_since = now
        if now - self._calm_since >= self.calm_s and now - self._last_step >= self.calm_s:
            self.level -= 1
            self._last_step = now
            self._calm_since = now
            return True
        return False
