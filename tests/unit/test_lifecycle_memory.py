"""The assembler's memory is bounded, and flat once a steady load has run RECENT_MAX_AGE_S.

The hour soak (issue 17) saw the assembler's RSS floor rise ~2 MiB/hour while every other
actor stayed flat: the lifecycle's two memories of finished requests filled towards their
RECENT_DONE caps (about 3.5 hours at the soak's rate). Now `recent` (stored results, to answer
begin/end without a lookup) also forgets what is older than RECENT_MAX_AGE_S, and `status_sent`
is a HashRing allocated whole at start. This drives results through a Lifecycle at a steady
rate and checks with tracemalloc that memory grows only in the first RECENT_MAX_AGE_S and not
after; an unbounded dict anywhere in the lifecycle fails it.
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


def test_lifecycle_memory_is_flat_once_a_steady_load_has_run_its_max_age():
    clock = Clock()
    tracemalloc.start()
    try:
        m0 = traced()
        life = lc.Lifecycle(8, 64, 30.0, clock=clock, wall=clock)   # the ring is allocated here
        m_init = traced()
        clock.t += lc.LOCAL_LOOKUP_GRACE_S + 1
        # 0.05 s a result plus 60 s every 500: ~2,600 results in RECENT_MAX_AGE_S
        drive(life, clock, 0, 4000)              # past RECENT_MAX_AGE_S: recent holds only the newest
        m1 = traced()
        drive(life, clock, 4000, 8000)
        m2 = traced()
        drive(life, clock, 12000, 8000)
        m3 = traced()
    finally:
        tracemalloc.stop()
    assert m_init - m0 >= 8 * lc.STATUS_SENT_SLOTS               # the ring's memory, taken at start
    ages = [clock.t - v[3] for v in life.recent.values()]
    assert 1000 < len(life.recent) < lc.RECENT_DONE and max(ages) <= lc.RECENT_MAX_AGE_S + 61
    assert len(life.reqs) < 600
    filling = m1 - m_init
    per_result = filling / len(life.recent)
    assert 100 < per_result < 2000, per_result   # what one remembered result costs
    # twice as many results again add nothing: a per-result leak would add ~2 * filling each time
    assert m2 - m1 < 0.1 * filling, (m0, m_init, m1, m2, m3)
    assert m3 - m2 < 0.1 * filling, (m0, m_init, m1, m2, m3)


def test_recent_still_stops_at_its_count_cap_under_a_fast_load():
    clock = Clock()
    life = lc.Lifecycle(8, 64, 30.0, clock=clock, wall=clock)
    clock.t += lc.LOCAL_LOOKUP_GRACE_S + 1
    for i in range(lc.RECENT_DONE + 500):        # all within a second: only the count cap applies
        life._remember(f"r{i}", {"strategy_name": "s", "total_trades": 1, "total_chunks": 1}, "db")
    assert len(life.recent) == lc.RECENT_DONE and "r499" not in life.recent and "r500" in life.recent
