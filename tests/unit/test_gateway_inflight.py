"""The gateway's safety net for frames whose message was lost between the actors.

Found by `chaos --fuzz` at volume on a loaded machine: one gateway -> assembler message of
~12,000 never arrived (the assembler's resequencer gave up on the gap after 5 s), and the
gateway counted its 370 bytes in flight for good. Such entries now expire after LOST_AFTER_S;
entries that are still young, and the release of an already expired one, behave as before.
"""
from __future__ import annotations

from pairlane.actors import gateway as gw


def gateway_with(pending: dict[tuple, tuple[int, float]]) -> gw.Gateway:
    g = gw.Gateway.__new__(gw.Gateway)  # no actor system: only the bookkeeping is exercised
    g.name = "gateway"
    g.pending = {k: n for k, (n, _) in pending.items()}
    g.pending_since = {k: t for k, (_, t) in pending.items()}
    g.per_request = {}
    for rid, _ in pending:
        g.per_request[rid] = g.per_request.get(rid, 0) + 1
    g.inflight_bytes = sum(n for n, _ in pending.values())
    g.presumed_lost = 0
    g.direct_keys = set()
    return g


def test_a_frame_never_released_stops_counting_after_lost_after_s():
    now = 10_000.0
    g = gateway_with({("old", 0): (370, now - gw.LOST_AFTER_S - 1), ("young", 0): (500, now - 1.0),
                      ("young", 1): (700, now - gw.LOST_AFTER_S + 5)})
    assert g.sweep_lost(now) == [("old", 0)]
    assert g.pending == {("young", 0): 500, ("young", 1): 700}
    assert g.inflight_bytes == 1200 and g.per_request == {"young": 2} and g.presumed_lost == 1
    # nothing else expires until it is old enough
    assert g.sweep_lost(now + 1) == []
    assert sorted(g.sweep_lost(now + gw.LOST_AFTER_S + 10)) == [("young", 0), ("young", 1)]
    assert g.pending == {} and g.pending_since == {} and g.inflight_bytes == 0 and g.per_request == {}


def test_the_net_is_later_than_the_assemblers_own():
    from pairlane.lifecycle import INFLIGHT_TIMEOUT_S
    assert gw.LOST_AFTER_S > INFLIGHT_TIMEOUT_S
