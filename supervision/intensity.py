"""Restart intensity: at most max_restarts crashes within a sliding window of window_s.

Owns: the one sliding-window count of crashes used by every supervisor (for
its children) and by the daemon's main process (for the root supervisor), as
triotp keeps it in a small object of its own. Only crashes are recorded: a
normal exit or an operator restart never counts, and a crash counts however
long the actor ran before it. Never decides what giving up means, never
sleeps and never reads a clock other than the one it was given.
"""
from __future__ import annotations

import collections
import time
from typing import Callable


class RestartIntensity:
    """`record()` each crash; it answers True once there were more than max_restarts
    crashes within the last window_s seconds (the crash just recorded included)."""

    def __init__(self, max_restarts: int, window_s: float, clock: Callable[[], float] = time.monotonic):
        self.max_restarts = max_restarts
        self.window_s = window_s
        self._clock = clock
        self._crashes: collections.deque[float] = collections.deque()

    def _expire(self, now: float) -> None:
        while self._crashes and now - self._crashes[0] > self.window_s:
            self._crashes.popleft()

    def record(self) -> bool:
        """Count a crash now; True when the intensity is exceeded (the caller gives up)."""
        now = self._clock()
        self._crashes.append(now)
        self._expire(now)
        return len(self._crashes) > self.max_restarts

    def in_window(self) -> int:
        """Crashes within the last window_s seconds."""
        self._expire(self._clock())
        return len(self._crashes)
