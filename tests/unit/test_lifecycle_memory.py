"""The assembler's memory is bounded: what the one-hour soak saw grow in it is a cache that fills.

The soak (issue 17) measured the assembler's RSS floor rising ~2.5 MiB/hour while every other
actor stayed flat. The lifecycle remembers the last RECENT_DONE stored results (`recent`, to
answer begin/end without a lookup) and the requests it sent status changes for
(`status_sent`), each capped at RECENT_DONE. This drives results through a Lifecycle and checks
with tracemalloc that its memory grows while those fill and not after: an unbounded dict
anywhere in the lifecycle fails it.
"""
from __future__ import annotations

import gc
import tracemalloc

from pairlane import lifecycle as lc
from pairlane.vocab import WriteOutcome


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def drive(life: lc.Lifecycle, clock: Clock, first: int, count: int) -> None:
    """`count` one-message results stored through the lifecycle, as the assembler would see them."""
    for i in range(first, first + count):
        rid = f"soak-0-0-{i}"
        meta = {"request_id": rid, "strategy_name": f"strat-{i % 7}", "total_trades": 10 + i % 50,
                "total_chunks": 1, "truncated": 0}
        todo = [lc.Result(rid, b"producer-identity", meta, None, "zmq", b"raw", meta["total_trades"])]
        while todo:
            for eff in life.handle(todo.pop()):
                if isinstance(eff, lc.Lookup):
                    todo.append(lc.LookupAnswer(eff.request_id, None))
                elif isinstance(eff, lc.Write):
                    todo.append(lc.Durable(rid, eff.seq, "db", WriteOutcome.COMPLETE, eff.nrows))
        clock.t += 0.05
        if i % 500 == 0:
            clock.t += 60.0  # finished requests leave `reqs` after 30 s idle
            life.handle(lc.Tick())


def traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def test_lifecycle_memory_plateaus_once_its_caches_are_full():
    clock = Clock()
    life = lc.Lifecycle(8, 64, 30.0, clock=clock, wall=clock)
    clock.t += lc.LOCAL_LOOKUP_GRACE_S + 1
    n = lc.RECENT_DONE
    tracemalloc.start()
    try:
        m0 = traced()
        drive(life, clock, 0, n)                 # the caches fill
        m1 = traced()
        drive(life, clock, n, n)                 # full: the oldest go as new ones come
        m2 = traced()
        drive(life, clock, 2 * n, n)
        m3 = traced()
    finally:
        tracemalloc.stop()
    filling = m1 - m0
    assert len(life.recent) == n and len(life.status_sent) <= n and len(life.reqs) < 600
    per_result = filling / n
    assert 100 < per_result < 2000, per_result   # what one remembered result costs
    # the second RECENT_DONE results still add a little (status_sent and the dicts' tables settle:
    # measured +16%), the third nothing: a per-result leak would add `filling` again
    assert m2 - m1 < 0.3 * filling, (m0, m1, m2, m3)
    assert m3 - m2 < 0.01 * filling, (m0, m1, m2, m3)
