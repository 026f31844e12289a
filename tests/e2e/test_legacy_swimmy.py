"""What swimmy's real backtest service sends, through a real daemon (issue 12, items 2-6).

Each test pushes the S-expressions swimmy's service and Guardian really produce
to gateway.legacy_endpoint and asserts on the rows stored, the log lines (one
per message, with request_id and strategy) and the metrics. One daemon serves
the module; every test uses its own request_ids and strategy names, and reads
the counters as deltas.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
import zmq

from pairlane import synthetic
from tests.e2e.util import db, inspect, metric, result_row, rows_for, running_daemon, wait_status, wait_until


@pytest.fixture(scope="module")
def sw(tmp_path_factory):
    with running_daemon(tmp_path_factory.mktemp("legacy_swimmy")) as d:
        yield d


@pytest.fixture(scope="module")
def push(sw):
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.setsockopt(zmq.SNDTIMEO, 10000)
    sock.connect(sw.cfg["gateway"]["legacy_endpoint"])
    yield sock
    sock.close()


def result_msg(fields: str) -> bytes:
    """swimmy's service's one shape: ((type . "BACKTEST_RESULT") (result . (FIELDS)))."""
    return f'((type . "BACKTEST_RESULT") (result . ({fields})))'.encode()


def log_events(d, event: str, **fields) -> list[str]:
    """Log lines of `event` carrying every k=v of `fields` (the whole log file, not a tail)."""
    text = Path(d.log_path).read_text(errors="replace")
    out = []
    for line in text.splitlines():
        if f"event={event} " not in line + " ":
            continue
        if all(re.search(rf"(^| ){k}={re.escape(str(v))}( |$)", line) for k, v in fields.items()):
            out.append(line)
    return out


def outcome_count(d, outcome: str) -> float:
    return (metric(d, "pairlane_legacy_results_total") or {}).get(f"outcome={outcome}", 0.0)


def wait_outcome(d, outcome: str, want: float) -> None:
    wait_until(lambda: outcome_count(d, outcome) == want, timeout=10,
               what=f"pairlane_legacy_results_total{{outcome={outcome}}} == {want} "
                    f"(is {outcome_count(d, outcome)})")


def wait_logged(d, event: str, n: int = 1, **fields) -> list[str]:
    return wait_until(lambda: (lambda got: got if len(got) >= n else None)(log_events(d, event, **fields)),
                      timeout=10, what=f"{n} log line(s) event={event} {fields}")


def spool_empty(d) -> bool:
    st = inspect(d, "legacy")
    files = list((Path(d.cfg["dlq"]["path"]) / "legacy").glob("*.dlq"))
    return st["spool"]["messages"] == 0 and st["job"] is None and st["parsing"] is None and not files


# ----- item 2: a second failed result with the same request_id -------------------------------------
def test_second_failed_result_with_same_request_id_is_recorded_and_logged(sw, push):
    before = inspect(sw, "legacy").get("failed_results", 0)
    failed0 = outcome_count(sw, "failed")
    push.send(result_msg('(strategy_name . "A") (error . "missing request_id") (sharpe . 0) (request_id . "MISSING")'))
    wait_logged(sw, "legacy_failed", request_id="MISSING", strategy="A")
    push.send(result_msg('(strategy_name . "B") (error . "missing request_id") (sharpe . 0) (request_id . "MISSING")'))
    wait_logged(sw, "legacy_failed", request_id="MISSING", strategy="B")
    # the later failed result wins: one row, B's
    with contextlib.closing(db(sw)) as c:
        rows = c.execute("SELECT strategy_name, status, error, total_trades FROM backtest_results "
                         "WHERE request_id = 'MISSING'").fetchall()
    assert rows == [("B", "failed", "missing request_id", 0)], rows
    assert inspect(sw, "legacy")["failed_results"] - before == 2
    wait_outcome(sw, "failed", failed0 + 2)
    second = log_events(sw, "legacy_failed", request_id="MISSING", strategy="B")
    assert len(second) == 1 and "replaced=failed" in second[0], second
    assert len(log_events(sw, "legacy_failed", request_id="MISSING", strategy="A")) == 1
    wait_until(lambda: spool_empty(sw), what="the legacy spool to be empty")


def test_failed_result_never_replaces_a_complete_one(sw, push):
    rid = "sw-complete-then-failed"
    push.send(synthetic.legacy_message(40, seed=21, request_id=rid, strategy_name="SwC"))
    assert wait_status(sw, rid)["status"] == "complete"
    wait_logged(sw, "legacy_stored", request_id=rid, strategy="SwC")
    conflicts0 = outcome_count(sw, "rejected_conflict")
    push.send(result_msg(f'(strategy_name . "SwC") (error . "late error") (request_id . "{rid}")'))
    line = wait_logged(sw, "legacy_rejected", request_id=rid, strategy="SwC", why="conflict")
    assert len(line) == 1
    row = result_row(sw, rid)
    assert (row["status"], row["error"], row["total_trades"]) == ("complete", None, 40)
    assert rows_for(sw, rid) == 40
    wait_outcome(sw, "rejected_conflict", conflicts0 + 1)


# ----- item 3: trades without a trade_list is not a truncation ----------------------------------------
def test_reported_trades_without_trade_list_is_not_truncated(sw, push):
    base = inspect(sw, "legacy")
    trunc0 = metric(sw, "pairlane_legacy_truncated_total") or 0.0
    stored0 = outcome_count(sw, "stored")
    push.send(result_msg('(strategy_name . "S") (trades . 7) (sharpe . 0) (request_id . "notrades-1")'))
    row = wait_status(sw, "notrades-1")
    assert (row["status"], row["total_trades"], row["truncated"], row["reported_trades"]) == \
        ("complete", 0, 0, 7), row
    assert rows_for(sw, "notrades-1") == 0
    wait_logged(sw, "legacy_stored", request_id="notrades-1", strategy="S")
    wait_outcome(sw, "stored", stored0 + 1)
    assert metric(sw, "pairlane_legacy_truncated_total") == trunc0
    assert inspect(sw, "legacy").get("truncated", 0) == base.get("truncated", 0)
    assert log_events(sw, "legacy_truncated", request_id="notrades-1") == []
    # a list shorter than `trades` still is one (Guardian kept the last 500)
    rid = "sw-trunc"
    push.send(synthetic.legacy_message(50, seed=22, request_id=rid, strategy_name="SwT", reported_trades=80))
    row = wait_status(sw, rid)
    assert (row["status"], row["total_trades"], row["truncated"]) == ("complete", 50, 1)
    wait_until(lambda: metric(sw, "pairlane_legacy_truncated_total") == trunc0 + 1, what="truncated counted")
    assert len(wait_logged(sw, "legacy_truncated", request_id=rid, strategy="SwT")) == 1


# ----- item 4: non-finite numbers ----------------------------------------------------------------------
def test_non_finite_metrics_are_stored_as_null(sw, push):
    rid = "sw-inf-metrics"
    trades = " ".join(f"((timestamp . {1709234567 + i}) (pnl . {0.25 * (i - 1)}))" for i in range(3))
    push.send(result_msg(f'(strategy_name . "SwInf") (sharpe . "NaN") (sharpe_ci_lower . "-inf") '
                         f'(sortino . "inf") (profit_factor . "inf") (win_rate . 0.6666666667) '
                         f'(max_drawdown . "-inf") (trades . 3) (trade_list . ({trades})) (request_id . "{rid}")'))
    row = wait_status(sw, rid)
    assert row["status"] == "complete", row
    assert (row["sharpe"], row["profit_factor"], row["max_dd"]) == (None, None, None)
    assert row["win_rate"] == 0.6666666667 and row["total_trades"] == 3 and row["truncated"] == 0
    with contextlib.closing(db(sw)) as c:
        got = c.execute("SELECT timestamp, pnl FROM backtest_trade_logs WHERE request_id = ? ORDER BY timestamp",
                        (rid,)).fetchall()
    assert got == [(1709234567, -0.25), (1709234568, 0.0), (1709234569, 0.25)]
    wait_logged(sw, "legacy_stored", request_id=rid, strategy="SwInf")


@pytest.mark.parametrize("pnl", ['"NaN"', "+inf.0"])
def test_non_finite_trade_pnl_makes_the_result_failed_naming_the_trade(sw, push, pnl):
    rid = f"sw-nan-pnl-{'str' if pnl.startswith(chr(34)) else 'num'}"
    failed0 = outcome_count(sw, "failed")
    trades = (" ".join(f"((timestamp . {1709234567 + i}) (pnl . {i}.5))" for i in range(3))
              + f" ((timestamp . 1709234999) (pnl . {pnl}))")
    push.send(result_msg(f'(strategy_name . "SwNaN") (sharpe . "NaN") (trades . 4) '
                         f'(trade_list . ({trades})) (request_id . "{rid}")'))
    row = wait_status(sw, rid)
    assert row["status"] == "failed" and row["total_trades"] == 0, row
    assert "trade 3" in row["error"] and "not finite" in row["error"], row["error"]
    assert rows_for(sw, rid) == 0
    res = sw.admin("result", {"request_id": rid})
    assert res["ok"] and res["result"]["status"] == "failed" and "trade 3" in res["result"]["error"]
    line = wait_logged(sw, "legacy_failed", request_id=rid, strategy="SwNaN")
    assert len(line) == 1 and "trade 3" in line[0]
    wait_outcome(sw, "failed", failed0 + 1)
    assert log_events(sw, "legacy_rejected", request_id=rid) == []


# ----- item 5: failed results are logged -------------------------------------------------------------
def test_every_failed_result_is_logged_with_request_id_and_strategy(sw, push):
    rids = [f"sw-err-{i}" for i in range(3)]
    failed0 = outcome_count(sw, "failed")
    for i, rid in enumerate(rids):
        push.send(result_msg(f'(strategy_name . "SwErr{i}") (error . "guardian exited with 101") '
                             f'(sharpe . 0) (request_id . "{rid}")'))
    for i, rid in enumerate(rids):
        assert wait_status(sw, rid)["status"] == "failed"
        lines = wait_logged(sw, "legacy_failed", request_id=rid, strategy=f"SwErr{i}")
        assert len(lines) == 1 and "level=WARNING" in lines[0]
    wait_outcome(sw, "failed", failed0 + 3)
    # a message that cannot be read is logged with the request_id it seems to carry
    push.send(b'((type . "BACKTEST_RESULT") (result . ((strategy_name . "S") (request_id . "sw-garbled")')
    line = wait_logged(sw, "legacy_rejected", request_id="sw-garbled", why="malformed")
    assert len(line) == 1


# ----- item 6: -OOS suffix ---------------------------------------------------------------------------
def test_oos_suffix_is_stripped_into_oos_kind(sw, push):
    rid = "sw-oos"
    push.send(synthetic.legacy_message(30, seed=23, request_id=rid, strategy_name="SW-A1-OOS"))
    row = wait_status(sw, rid)
    assert (row["status"], row["strategy_name"], row["oos_kind"], row["total_trades"]) == \
        ("complete", "SW-A1", "OOS", 30), row
    with contextlib.closing(db(sw)) as c:
        kinds = c.execute("SELECT strategy_name, oos_kind, count(*) FROM backtest_trade_logs WHERE request_id = ? "
                          "GROUP BY 1, 2", (rid,)).fetchall()
        assert kinds == [("SW-A1", "OOS", 30)]
        assert c.execute("SELECT count(*) FROM backtest_results WHERE strategy_name = 'SW-A1-OOS'").fetchone()[0] == 0
    wait_logged(sw, "legacy_stored", request_id=rid, strategy="SW-A1", oos_kind="OOS")
    # a failed OOS result too; a name that only is the suffix is kept as it is
    push.send(result_msg('(strategy_name . "SW-B2-OOS") (error . "boom") (request_id . "sw-oos-failed")'))
    row = wait_status(sw, "sw-oos-failed")
    assert (row["status"], row["strategy_name"], row["oos_kind"]) == ("failed", "SW-B2", "OOS")
    push.send(result_msg('(strategy_name . "-OOS") (trades . 0) (request_id . "sw-only-suffix")'))
    row = wait_status(sw, "sw-only-suffix")
    assert (row["strategy_name"], row["oos_kind"]) == ("-OOS", None)


def test_spool_is_empty_once_outcomes_are_stored(sw, push):
    push.send(synthetic.legacy_message(10, seed=24, request_id="sw-last", strategy_name="SwLast"))
    wait_status(sw, "sw-last")
    wait_until(lambda: spool_empty(sw), what="the legacy spool to be empty")
    st = inspect(sw, "legacy")
    assert st["spool"]["messages"] == 0 and st["spool"]["path"].endswith("/legacy")
    assert st.get("replayed", 0) == 0
