"""Noticing a traffic shift from what serving already reports, for free.

Every drafting verify step's trace says how many draft tokens the live head got accepted. Over
the newest ``steps`` of them (whatever version was live: a swap is not a shift) the mean moves
with the traffic; when it falls by ``drop`` below its peak, the traffic the head was trained for
may be gone (a new domain, style or language). That shows within a few requests, where the
held-out slice (1 request in 8) needs tens of them. It is not a sharp test: acceptance varies as
much between requests of one domain, and at 256 steps and 25% the watch marked 8 "shifts" on
the mixed 300-request day-0 stream and 5-9 on a stream with 2 (docs/results/gate.md, "The gate after
a shift"), which is one reason the gate that uses it is off by default.
"""

from __future__ import annotations

from collections import deque


class ShiftWatch:
    def __init__(self, steps: int, drop: float) -> None:
        self.steps = steps
        self.drop = drop
        self._accepted: deque[int] = deque(maxlen=max(steps, 1))
        self._sum = 0
        self.peak: float | None = None  # the highest full-window mean since the last shift
        self.shifts = 0

    @property
    def level(self) -> float | None:
        """Mean accepted draft tokens per drafting step over the newest steps (None: too few)."""
        if not self.steps or len(self._accepted) < self.steps:
            return None
        return self._sum / self.steps

    def observe(self, accepted: int) -> bool:
        """Count one drafting step; True when this step completes a shift. Once per shift: the
        window and the peak restart, so the next shift is measured against steps that all came
        after this one (a fall still under way is not a second shift)."""
        if not self.steps:
            return False
        if len(self._accepted) == self._accepted.maxlen:
            self._sum -= self._accepted[0]
        self._accepted.append(accepted)
        self._sum += accepted
        level = self.level
        if level is None:
            return False
        if self.peak is None or level > self.peak:
            self.peak = level
            return False
        if level < self.peak * (1 - self.drop):
            self._accepted.clear()
            self._sum, self.peak = 0, None
            self.shifts += 1
            return True
        return False
