"""bench/run.py's large result: generated block by block exactly like one strategy's result, and
judged against issue 16's targets (RSS growth < 64 MiB, throughput >= 0.9x the 100k figure)."""
import numpy as np

from pairlane.bench.run import big_columns, big_targets
from pairlane.columns import prepare_columns
from pairlane.synthetic import result_columns


def test_big_columns_blocks_make_one_valid_result():
    cols = big_columns(1234, seed=3, block=500)
    assert set(cols) == set(result_columns(10, seed=3))
    assert all(len(v) == 1234 for v in cols.values())
    ts = cols["timestamp"]
    assert ts.dtype == np.dtype("<i8") and (np.diff(ts) > 0).all()   # rising across block edges
    assert len(set(cols["timeframe"].tolist())) == 1                  # one strategy, one timeframe
    assert None not in cols["symbol"] and None not in cols["direction"]
    # blocks differ (not one block repeated)
    assert not np.array_equal(cols["pnl"][:500], cols["pnl"][500:1000])
    _, n = prepare_columns(cols)
    assert n == 1234


def test_big_columns_first_block_is_result_columns():
    cols = big_columns(300, seed=4, block=500)
    ref = result_columns(300, seed=4)
    for name, v in ref.items():
        assert list(cols[name]) == list(v)


def test_big_targets():
    ok = big_targets(95_000.0, 100_000.0, 20.0)
    assert ok["tps_met"] and ok["rss_met"] and abs(ok["tps_ratio_vs_100k"] - 0.95) < 1e-9
    slow = big_targets(85_000.0, 100_000.0, 70.0)
    assert not slow["tps_met"] and not slow["rss_met"]


def test_the_batched_floor_writes_exactly_the_rows_of_the_executemany_floor(tmp_path):
    # bench prints pairlane against both floors: they must be the same write, done two ways
    import sqlite3

    from pairlane.bench.run import _frames, floor_sqlite
    n = 3000
    _, frames = _frames(n, 4, 64 << 10)
    assert len(frames) > 1
    got = {}
    for batched in (False, True):
        path = str(tmp_path / f"floor-{batched}.db")
        assert floor_sqlite(frames, n, path, "b-1", batched=batched) > 0
        conn = sqlite3.connect(path)
        got[batched] = conn.execute("SELECT * FROM backtest_trade_logs ORDER BY rowid").fetchall()
        conn.close()
    assert len(got[True]) == n
    assert got[True] == got[False]
