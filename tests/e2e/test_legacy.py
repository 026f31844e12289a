"""Legacy S-expression ingest through a real daemon (PROTOCOL.md section 2).

A PUSH socket sends swimmy's BACKTEST_RESULT to gateway.legacy_endpoint. There
is no reply channel: each test polls SQLite until the result's status is
final, and reads the legacy actor's counts through `admin inspect legacy`.
One daemon serves the whole module (every test uses its own request_ids).
"""
from __future__ import annotations

import contextlib
import math
import time

import pytest
import zmq

from pairlane import synthetic
from tests.e2e.util import (assert_all_running, db, duplicate_groups, inspect, metric, result_row, rows_for,
                            running_daemon, wait_status, wait_until)


@pytest.fixture(scope="module")
def leg(tmp_path_factory):
    with running_daemon(tmp_path_factory.mktemp("legacy")) as d:
        yield d


@pytest.fixture(scope="module")
def push(leg):
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.setsockopt(zmq.SNDTIMEO, 10000)
    sock.connect(leg.cfg["gateway"]["legacy_endpoint"])
    yield sock
    sock.close()


def stored_pnl(d, rid):
    with contextlib.closing(db(d)) as c:
        return c.execute("SELECT coalesce(sum(pnl), 0), count(*) FROM backtest_trade_logs WHERE request_id = ?",
                         (rid,)).fetchone()


@pytest.mark.parametrize("style", ["dotted", "lexpr"])
def test_both_spellings_with_trade_list(leg, push, style):
    rid, n = f"leg-{style}", 1500
    push.send(synthetic.legacy_message(n, style=style, seed=11, request_id=rid, strategy_name=f"Leg-{style}",
                              extra_columns=True))
    row = wait_status(leg, rid)
    assert row["status"] == "complete", row
    assert (row["total_trades"], row["truncated"], row["strategy_name"]) == (n, 0, f"Leg-{style}")
    assert (row["symbol"], row["timeframe"], row["rank"], row["oos_kind"]) == ("USDJPY", 60, "A", "wfv")
    assert row["sharpe"] is not None and row["max_dd"] is not None and row["win_rate"] is not None
    cols = synthetic.legacy_columns(n, seed=11, extra_columns=True)
    s, count = stored_pnl(leg, rid)
    assert count == n and s == pytest.approx(math.fsum(cols["pnl"]), abs=1e-6)
    assert duplicate_groups(leg, rid) == 0
    with contextlib.closing(db(leg)) as c:
        got = c.execute("SELECT timestamp, pnl, symbol, direction, sl, timeframe, rank, regime "
                        "FROM backtest_trade_logs WHERE request_id = ? ORDER BY timestamp", (rid,)).fetchall()
    want = list(zip(cols["timestamp"], cols["pnl"], cols["symbol"], cols["direction"], cols["sl"],
                    cols["timeframe"], cols["rank"], cols["regime"]))
    assert got == want


@pytest.mark.parametrize("style", ["dotted", "lexpr"])
def test_both_spellings_without_trade_list(leg, push, style):
    rid = f"leg-nolist-{style}"
    # reported trades 0 and no trade_list: a result without trades
    push.send(synthetic.legacy_message(0, style=style, seed=12, request_id=rid, strategy_name="LegNoList",
                              with_trade_list=False))
    row = wait_status(leg, rid)
    assert (row["status"], row["total_trades"], row["truncated"]) == ("complete", 0, 0), row
    assert row["sharpe"] is not None
    assert rows_for(leg, rid) == 0


def test_error_field_gives_failed_result_without_rows(leg, push):
    rid = "leg-error"
    msg = synthetic.legacy_message(20, seed=13, request_id=rid, strategy_name="LegErr")
    msg = msg.replace(f'(request_id . "{rid}")'.encode(),
                      f'(request_id . "{rid}") (error . "backtest crashed: division by zero")'.encode())
    push.send(msg)
    row = wait_status(leg, rid)
    assert row["status"] == "failed", row
    assert rows_for(leg, rid) == 0
    r = leg.admin("result", {"request_id": rid})
    assert r["ok"] and r["result"]["status"] == "failed" and r["result"]["rows_stored"] == 0
    # the lexpr spelling of an error: a one-element list
    rid2 = "leg-error-lexpr"
    msg = synthetic.legacy_message(5, style="lexpr", seed=13, request_id=rid2, strategy_name="LegErr")
    msg = msg.replace(f'(request_id . "{rid2}")'.encode(), f'(request_id . "{rid2}") (error "oops")'.encode())
    push.send(msg)
    assert wait_status(leg, rid2)["status"] == "failed"
    assert rows_for(leg, rid2) == 0


def test_truncated_trade_list(leg, push):
    rid = "leg-trunc"
    before = metric(leg, "pairlane_legacy_truncated_total") or 0.0
    # Guardian keeps only the last 500 trades but reports 800
    push.send(synthetic.legacy_message(500, style="lexpr", seed=14, request_id=rid, strategy_name="LegTrunc",
                              reported_trades=800))
    row = wait_status(leg, rid)
    assert (row["status"], row["total_trades"], row["truncated"]) == ("complete", 500, 1), row
    assert rows_for(leg, rid) == 500
    wait_until(lambda: metric(leg, "pairlane_legacy_truncated_total") == before + 1, timeout=10,
               what="pairlane_legacy_truncated_total to count it")
    assert before == 0  # no other message of this module is truncated
    assert metric(leg, "pairlane_legacy_truncated_total") == 1
    assert inspect(leg, "legacy").get("truncated") == 1


@pytest.mark.timeout(120)
def test_100k_trade_sexpr_stored(leg, push):
    rid, n = "leg-100k", 100_000
    data = synthetic.legacy_message(n, seed=15, request_id=rid, strategy_name="Leg100k")
    assert len(data) > 4 << 20
    t0 = time.monotonic()
    push.send(data)
    row = wait_status(leg, rid, timeout=90)
    took = time.monotonic() - t0
    assert (row["status"], row["total_trades"], row["truncated"]) == ("complete", n, 0), row
    cols = synthetic.legacy_columns(n, seed=15)
    s, count = stored_pnl(leg, rid)
    assert count == n
    assert s == pytest.approx(math.fsum(cols["pnl"]), rel=1e-9, abs=1e-6)
    assert duplicate_groups(leg, rid) == 0
    print(f"legacy 100k: {len(data)} bytes stored in {took:.1f}s")


BAD_SEXPRS = [
    b'((type . "BACKTEST_RESULT") (result . ((request_id . "bad-1") (strategy_name . "S")',  # truncated
    b"\xff\xfe\x00 not utf-8 \xc3\x28",
    b"",
    b"(" * 5000 + b")" * 5000,                                                           # depth cap
    b'((type . "SOMETHING_ELSE") (result . ((request_id . "bad-5") (strategy_name . "S"))))',
    b'((type . "BACKTEST_RESULT") (result . ((request_id . "bad-6") (strategy_name . "S") '
    b'(trade_list . (((timestamp . "yesterday") (pnl . 1.0)))))))',
    b'((type . "BACKTEST_RESULT") (result . ((request_id . #.(run-program "rm")) (strategy_name . "S"))))',
    b")))(((",
    b'"just a string"',
]


def test_malformed_and_missing_request_id_are_counted_not_fatal(leg, push):
    base = inspect(leg, "legacy")
    for m in BAD_SEXPRS:
        push.send(m)
    push.send_multipart([b'((type . "BACKTEST_RESULT"))', b"second frame"])
    push.send(synthetic.legacy_message(10, seed=16, request_id=None, strategy_name="LegNoId"))
    push.send(synthetic.legacy_message(10, seed=16, request_id="has space", strategy_name="LegBadId"))
    # a good message afterwards: the legacy actor takes them in order, so once it is stored all
    # of the above were handled
    push.send(synthetic.legacy_message(10, seed=17, request_id="leg-after-bad", strategy_name="LegAfter"))
    assert wait_status(leg, "leg-after-bad")["status"] == "complete"
    assert rows_for(leg, "leg-after-bad") == 10
    st = inspect(leg, "legacy")

    def delta(key):
        return st.get(key, 0) - base.get(key, 0)

    rejected = {k: delta(k) for k in st if k.startswith("rejected_")}
    print(f"legacy rejections: {rejected}")
    assert delta("rejected_no_request_id") == 2, rejected
    assert sum(rejected.values()) == len(BAD_SEXPRS) + 1 + 2, rejected
    assert delta("received") == len(BAD_SEXPRS) + 1 + 3
    with contextlib.closing(db(leg)) as c:
        assert c.execute("SELECT count(*) FROM backtest_results WHERE request_id LIKE 'bad-%' "
                         "OR strategy_name IN ('LegNoId', 'LegBadId')").fetchone()[0] == 0
    a = leg.actor("legacy")
    assert (a["state"], a["restarts"]) == ("RUNNING", 0)
    assert_all_running(leg)


def test_admin_inspect_legacy_and_verify(leg, push):
    rid = "leg-inspect"
    push.send(synthetic.legacy_message(30, style="lexpr", seed=18, request_id=rid, strategy_name="LegInspect"))
    assert wait_status(leg, rid)["status"] == "complete"
    # the row turns complete in the writer's commit; the legacy actor hears `stored` a hop later
    def idle():
        state = inspect(leg, "legacy")
        return state if state["job"] is None else None
    st = leg.wait_for(idle, 10, what="the legacy actor to finish its job")
    assert st["parsing"] is None and st["job"] is None
    assert st["received"] >= 1 and st["stored"] >= 1
    res = leg.admin("result", {"request_id": rid})["result"]
    assert (res["status"], res["total_trades"], res["rows_stored"], res["chunks_durable"]) == \
        ("complete", 30, 30, res["total_chunks"])
    assert leg.admin("verify")["problems"] == []
    assert result_row(leg, rid)["completed_at"] is not None
    assert_all_running(leg)


def test_the_assembler_keeps_one_address_per_legacy_actor_not_one_per_message(leg, push):
    """Each legacy message reaches the assembler with its own unpickled copy of the legacy actor's
    address. The assembler remembers every identity's reply target (up to MAX_REPLY_TARGETS) but keeps
    one address object per actor: in the session-5 soak the copies were the assembler's growth
    (about 1 KB of objects per legacy message, until the cap)."""
    before = inspect(leg, "assembler")["reply_targets"]
    for i in range(6):
        rid = f"leg-addr-{i}"
        push.send(synthetic.legacy_message(5, style="dotted", seed=30 + i, request_id=rid, strategy_name="LegAddr"))
        assert wait_status(leg, rid)["status"] == "complete"
    st = inspect(leg, "assembler")
    assert st["reply_targets"] >= before + 6, st
    assert st["reply_actors"] == 1, st
