"""Hostile input at volume through a real daemon (issue 17, the short version of `chaos --fuzz`).

Real producers keep storing results while 4,000 mutated protocol frames go to the gateway one
by one and 128 MiB of garbage (half at the gateway, half at the legacy socket, with mutated
S-expressions) is pushed in: every frame answered (with an error for every mutation that must
fail), every garbage frame answered or counted, every legacy message ending in one counted
outcome, no actor restarted, RSS back within 10%, and the real results stored exactly.
"""
from __future__ import annotations

import pytest

from pairlane.entry.fuzz import run_fuzz
from tests.e2e.util import Dealer, inspect, rows_for, wait_until

GARBAGE = 128 << 20   # bytes of garbage, half at the gateway and half at the legacy socket


def test_a_result_with_a_stray_seq_key_is_stored_and_released(make_daemon):
    """Found by the fuzz run: the gateway keyed a `result` frame's in-flight bytes by its own
    "seq" key (an unknown key, to be ignored): a list crashed the gateway (unhashable), an int
    other than 0 was never released, so its bytes stayed in flight for good and enough of them
    would make the gateway answer busy to everyone."""
    d = make_daemon()
    with Dealer(d.gateway_endpoint) as p:
        for i, seq in enumerate([5, [0], {"a": 1}, "x", None, 0]):
            rid = f"stray-seq-{i}"
            reply = p.rt({"type": "result", "request_id": rid, "strategy_name": "S", "total_trades": 2,
                          "seq": seq, "trades": {"timestamp": [1, 2], "pnl": [0.5, -0.25]}})
            assert reply["type"] == "stored" and reply["trades"] == 2, (seq, reply)
            assert rows_for(d, rid) == 2
    wait_until(lambda: inspect(d, "gateway")["chunks_in_flight"] == 0, 10.0, what="every result released")
    g = inspect(d, "gateway")
    assert g["bytes_in_flight"] == 0 and g["requests_in_flight"] == 0, g
    assert d.actor("gateway")["restarts"] == 0


@pytest.mark.slow
def test_fuzz_at_volume_keeps_every_promise(make_daemon):
    d = make_daemon({"gateway": {"assembly_timeout_s": 30.0}})
    s = run_fuzz(d, frames=4000, garbage_bytes=GARBAGE, seed=3, max_trades=20_000)
    assert s["failures"] == [] and s["ok"], (s["failures"], s)
    # the figures behind the verdict, asserted directly
    # every frame answered, except one whose message Thespian lost between two actors under load
    # (rare: 1 in ~12,000 at volume on a busy machine), each such loss counted by the receiving actor
    assert s["frames_sent"] == 4000 and s["must_fail_not_error"] == 0
    assert s["frames_unanswered"] <= s["messages_lost_between_actors"] <= 2, s["replies_by_mutation"]
    errors = sum(n for codes in s["replies_by_mutation"].values() for c, n in codes.items() if c.startswith("error:"))
    assert errors >= 2000, s["replies_by_mutation"]
    assert s["gateway_garbage_bytes"] >= GARBAGE // 2 and s["gateway_garbage_errors"] == s["gateway_garbage_frames"]
    assert s["legacy_bytes"] >= GARBAGE // 2 and s["legacy_outcomes_counted"] == s["legacy_frames"]
    assert s["health"]["watchdog_kill"] == 0 and set(s["health"]) >= {"loop_stalled", "tx_dropped"}, s["health"]
    assert s["legacy_outcomes"]["outcome=rejected_malformed"] >= s["legacy_by_kind"]["big_garbage"]
    assert s["restarts_after"] == s["restarts_before"] == 0 and s["all_running"]
    assert s["rss_after_mib"] <= 1.10 * s["rss_before_mib"]
    assert s["real_stored"] >= 2 and s["lost"] == 0 and s["duplicates"] == 0
    assert s["wrong_row_counts"] == 0 and s["partial_visible"] == 0
    assert s["spool_files_after"] == 0 and s["gateway_bytes_in_flight_after"] == 0
