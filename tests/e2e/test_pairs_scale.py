"""Pair evaluation at scale through the real daemon (issue 16): 10,000 rank-A strategies of
110 trades in groups of 50 (50M pairs). `admin pairs.evaluate` must answer (the evaluation
runs beside the pairs actor's heartbeats, not instead of them), the slots written must be
exactly those `pairlane.pairs.evaluate` selects in-process from the same candidates, and no
actor may have restarted (before the fix the watchdog killed the pairs actor at 10 s and the
request was never answered).

The store is filled with plain SQL (fast), not through the gateway: ingest is not under test.
"""
from __future__ import annotations

import contextlib
import sqlite3
import time

import numpy as np
import pytest

from pairlane import pairs as pairlogic
from tests.e2e.util import assert_all_running, db, inspect, wait_until

N_STRATEGIES = 10_000
TRADES = 110
GROUP = 50
PAIRS_CFG = {"interval_s": 3600.0, "ranks": ["A"], "per_group": GROUP, "min_trades": 100,
             "window_trades": 100, "max_pairs": 5}
FIELDS = ("pair_id", "strategy_a", "strategy_b", "weight_a", "weight_b", "corr", "sharpe",
          "profit_factor", "score")
TOL = 1e-9


def fill_store(path: str, n: int, seed: int = 16) -> None:
    """n complete rank-A results of TRADES trades each, GROUP strategies per symbol, one transaction."""
    rng = np.random.default_rng(seed)
    start = 1_700_000_000
    results, trades = [], []
    for s in range(n):
        rid, name, symbol = f"scale-{s:05d}", f"strat-{s:05d}", f"SYM{s // GROUP:03d}"
        ts = np.sort(rng.integers(start, start + 365 * 86400, size=TRADES))
        pn = rng.normal(rng.normal(0.05, 0.1), 1.0, size=TRADES)
        results.append((rid, name, "complete", TRADES, 1, float(pn.mean() / pn.std()), symbol, 60, "A",
                        1_700_000_000.0 + s, 1_700_000_000.0 + s))
        trades.extend((rid, name, 0, int(t), float(p), symbol) for t, p in zip(ts, pn))
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO backtest_results(request_id, strategy_name, status, total_trades, "
                         "total_chunks, sharpe, symbol, timeframe, rank, received_at, completed_at) "
                         "VALUES (?,?,?,?,?,?,?,?,?,?,?)", results)
        conn.executemany("INSERT INTO backtest_trade_logs(request_id, strategy_name, seq, timestamp, pnl, "
                         "symbol) VALUES (?,?,?,?,?,?)", trades)
        conn.execute("COMMIT")
    finally:
        conn.close()


def close(a: float, b: float) -> bool:
    return abs(a - b) <= TOL * max(1.0, abs(a), abs(b))


def assert_slots(got: list[dict], want: list[pairlogic.Slot]) -> None:
    assert [g["pair_id"] for g in got] == [w.pair_id for w in want], (got, want)
    for g, w in zip(got, want):
        wd = w.as_dict()
        for key in FIELDS:
            if isinstance(wd[key], str):
                assert g[key] == wd[key], (key, g, wd)
            else:
                assert close(g[key], wd[key]), (key, g, wd)


@pytest.mark.slow
def test_pairs_evaluate_answers_at_10000_strategies_without_a_restart(make_daemon):
    d = make_daemon({"pairs": PAIRS_CFG})
    # the start-up evaluation (empty store) first, so the next one is ours
    wait_until(lambda: inspect(d, "pairs")["evaluations"] >= 1, 30, 0.1, "start-up pair evaluation")
    fill_store(d.db_path, N_STRATEGIES)
    assert_all_running(d)

    t0 = time.monotonic()
    r = d.admin("pairs.evaluate", timeout=120)
    took = time.monotonic() - t0
    assert r and r.get("ok") is True, r
    assert "warning" not in r, r
    print(f"\npairs.evaluate at {N_STRATEGIES:,} strategies: {took:.1f} s (evaluation_s {r['evaluation_s']:.1f})")
    assert r["strategies"] == N_STRATEGIES and r["candidates"] == N_STRATEGIES, r
    assert len(r["slots"]) == PAIRS_CFG["max_pairs"] and r["safe_stop"] is False, r

    # the same selection in-process from the same candidates
    with contextlib.closing(sqlite3.connect(f"file:{d.db_path}?mode=ro", uri=True,
                                            isolation_level=None)) as conn:
        cands = pairlogic.load_candidates(conn, window_trades=PAIRS_CFG["window_trades"])
    want = pairlogic.evaluate(cands, pairlogic.PairsConfig.from_mapping(PAIRS_CFG)).slots
    assert len(want) == PAIRS_CFG["max_pairs"]
    assert_slots(r["slots"], want)
    with contextlib.closing(db(d)) as c:
        cur = c.execute("SELECT * FROM pair_slots ORDER BY score DESC, pair_id")
        stored = [dict(zip([x[0] for x in cur.description], row)) for row in cur.fetchall()]
    assert_slots(stored, want)
    assert all(s["evaluated_at"] == r["evaluated_at"] for s in stored)

    # the pairs actor heartbeat all along: nothing restarted, and it is idle again
    assert_all_running(d)
    state = inspect(d, "pairs")
    assert state["running"] is False and state["abandoned"] == 0, state
    # memory bounded by the block size, not by the 50M pairs (issue 16: peak RSS < 1 GiB)
    peak = peak_rss_mib(state["pid"])
    print(f"pairs actor peak RSS {peak:.0f} MiB")
    assert peak < 1024, peak


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM) in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")
