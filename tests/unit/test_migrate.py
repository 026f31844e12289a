"""pairlane.migrate against a real throwaway PostgreSQL server: complete results with their rows and
chunk records, live trades, pair history and slots are copied; unfinished results are not; a rerun
adds nothing; a result the target holds unfinished is replaced by the complete one."""
from __future__ import annotations

import psycopg
import pytest

from pairlane.migrate import migrate
from pairlane.pgstore import PgStore
from pairlane.store import Store, StoreError, meta_from_message


def meta(rid, total, chunks=1, name="S"):
    return meta_from_message({"request_id": rid, "strategy_name": name, "total_trades": total,
                              "total_chunks": chunks, "symbol": "USDJPY", "metrics": {"sharpe": 1.5}})


def chunk(n, start=0):
    return {"timestamp": list(range(start, start + n)), "pnl": [0.5] * n, "symbol": ["EURUSD"] * n,
            "hold_time": [60] * n}


SLOT = {"pair_id": "A|B", "strategy_a": "A", "strategy_b": "B", "weight_a": 0.5, "weight_b": 0.5,
        "corr": 0.1, "sharpe": 1.0, "profit_factor": 1.5, "score": 2.0}


@pytest.fixture
def source(tmp_path):
    s = Store(str(tmp_path / "src.db"))
    s.open()
    s.write_chunk(meta("c1", 5, 2), 0, chunk(3), 3)
    s.write_chunk(meta("c1", 5, 2), 1, chunk(2, 3), 2)
    s.write_chunk(meta("c2", 4, 1, "T"), 0, chunk(4, 100), 4)
    s.write_chunk(meta("r1", 9, 2), 0, chunk(3), 3)          # still receiving: not copied
    s.begin(meta("f1", 9))
    s.set_status("f1", "failed", "bad")                       # failed: not copied
    s.write_live("b1", dict(chunk(3), strategy_name=["L"] * 3, pair_id=["p", None, "p"]), 3)
    s.write_live("b2", dict(chunk(2, 10), strategy_name=["L"] * 2), 2)
    s.replace_pair_slots([SLOT], 100.0)
    s.replace_pair_slots([dict(SLOT, pair_id="A|C", strategy_b="C")], 200.0)
    s.close()
    return str(tmp_path / "src.db")


def q(url, sql, params=None):
    with psycopg.connect(url) as c:
        return c.execute(sql, params).fetchall()


def test_copies_what_is_stored_and_a_rerun_adds_nothing(source, pg_url):
    rep = migrate(source, pg_url)
    assert rep.ok, rep.counts
    assert rep.copied == {"results": 2, "trades": 9, "live_batches": 2, "live_trades": 5, "pair_history": 2,
                          "pair_slots": 1}
    assert q(pg_url, "SELECT request_id, status, total_trades, strategy_name, symbol, sharpe "
                     "FROM backtest_results ORDER BY 1") == \
        [("c1", "complete", 5, "S", "USDJPY", 1.5), ("c2", "complete", 4, "T", "USDJPY", 1.5)]
    assert q(pg_url, "SELECT seq, timestamp, pnl, symbol, hold_time FROM backtest_trade_logs "
                     "WHERE request_id = 'c1' ORDER BY seq, timestamp") == \
        [(0, 0, 0.5, "EURUSD", 60), (0, 1, 0.5, "EURUSD", 60), (0, 2, 0.5, "EURUSD", 60),
         (1, 3, 0.5, "EURUSD", 60), (1, 4, 0.5, "EURUSD", 60)]
    assert q(pg_url, "SELECT request_id, seq, rows FROM backtest_chunks ORDER BY 1, 2") == \
        [("c1", 0, 3), ("c1", 1, 2), ("c2", 0, 4)]
    assert q(pg_url, "SELECT batch_id, count(*), count(pair_id) FROM trade_logs GROUP BY 1 ORDER BY 1") == \
        [("b1", 3, 2), ("b2", 2, 0)]
    assert q(pg_url, "SELECT pair_id, evaluated_at FROM pair_slots_history ORDER BY 2") == \
        [("A|B", 100.0), ("A|C", 200.0)]
    assert q(pg_url, "SELECT pair_id FROM pair_slots") == [("A|C",)]

    again = migrate(source, pg_url)
    assert again.ok and again.copied == {k: 0 for k in rep.copied}
    assert again.skipped == {"results": 2, "live_batches": 2, "pair_history": 2}
    assert q(pg_url, "SELECT count(*) FROM backtest_trade_logs") == [(9,)]
    assert q(pg_url, "SELECT count(*) FROM trade_logs") == [(5,)]
    assert q(pg_url, "SELECT count(*) FROM pair_slots_history") == [(2,)]


def test_an_unfinished_copy_in_the_target_is_replaced(source, pg_url):
    pg = PgStore(pg_url)
    pg.open()
    pg.write_chunk(meta("c1", 5, 2), 0, chunk(3, 1000), 3)   # the target has c1 receiving, other rows
    pg.close()
    rep = migrate(source, pg_url)
    assert rep.ok and rep.copied["results"] == 2
    assert q(pg_url, "SELECT status FROM backtest_results WHERE request_id = 'c1'") == [("complete",)]
    assert q(pg_url, "SELECT min(timestamp), count(*) FROM backtest_trade_logs WHERE request_id = 'c1'") == \
        [(0, 5)]


def test_unreachable_target_is_store_error(source):
    from tests.harness import free_port
    with pytest.raises(StoreError):
        migrate(source, f"postgresql://postgres@127.0.0.1:{free_port()}/x")
