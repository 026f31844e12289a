"""The gateway's memory of results just stored, so that it answers their `end` itself.

Owns: `StoredReplies`, fed from the lifecycle's `Stored` effects (carried to the gateway by the
assembler): for `keep_s` seconds after a result is stored, an `end` for it is answered at once with
its `stored` reply, which is final, without a round trip through the assembler. Bounded by age and
by `cap` entries. Never decides anything about a request (pairlane.lifecycle does: a forgotten or
too old entry only means the `end` goes to the assembler, which gives the same answer), never
touches sockets or actors; time comes only from its `clock` (time.monotonic unless one is given).
"""
from __future__ import annotations

import collections
import time
from typing import Callable

STORED_AT_GATEWAY_S = 60.0   # the gateway answers `end` of a result stored this recently by itself


class StoredReplies:
    """Results stored in the last `keep_s` seconds, at most `cap` of them (see the module)."""

    def __init__(self, keep_s: float = STORED_AT_GATEWAY_S, cap: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.keep_s, self.cap, self.clock = keep_s, cap, clock
        self.items: collections.OrderedDict = collections.OrderedDict()   # rid -> (at, reply)
        self.answered = 0

    def add(self, rid: str, reply: dict) -> None:
        self.items[rid] = (self.clock(), reply)
        self.items.move_to_end(rid)
        horizon = self.clock() - self.keep_s
        while self.items and (len(self.items) > self.cap or next(iter(self.items.values()))[0] < horizon):
            self.items.popitem(last=False)

    def forget(self, rid: str) -> None:
        self.items.pop(rid, None)

    def reply_for_end(self, rid: str) -> dict | None:
        got = self.items.get(rid)
        if got is None or got[0] < self.clock() - self.keep_s:
            return None
        self.answered += 1
        return got[1]
