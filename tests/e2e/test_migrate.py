"""`python run.py migrate --from SQLITE_PATH --to URL` (PROTOCOL.md section 7) as a user runs it:
a SQLite store with a 1M-trade result is copied to the test session's PostgreSQL server; the
per-table counts are equal, every row is there, and a rerun adds nothing."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import psycopg
import pytest

from pairlane.entry.harness import REPO
from pairlane.client import synthetic_columns
from pairlane.store import Store, meta_from_message

N = 1_000_000
STEP = 50_000


def run_migrate(src: str, url: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "run.py"), "migrate", "--from", src, "--to", url],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_migrate_1m_trades_counts_equal_and_rerun_adds_nothing(tmp_path, pg_url):
    src = str(tmp_path / "src.db")
    cols = synthetic_columns(N, seed=21, strategy="Mig1M")
    s = Store(src)
    s.open()
    m = meta_from_message({"request_id": "mig-1m", "strategy_name": "Mig1M", "total_trades": N,
                           "total_chunks": N // STEP})
    for seq, a in enumerate(range(0, N, STEP)):
        part = {k: (v[a:a + STEP].tobytes() if isinstance(v, np.ndarray) else v[a:a + STEP])
                for k, v in cols.items()}
        s.write_chunk(m, seq, part, STEP)
    s.write_live("mig-live", {"timestamp": [1, 2, 3], "pnl": [0.5, -0.5, 1.0], "strategy_name": ["L"] * 3}, 3)
    s.close()

    r = run_migrate(src, pg_url)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "backtest_trade_logs" in r.stdout and "DIFFERS" not in r.stdout, r.stdout
    assert f"{N:>12} {N:>12}  ok" in r.stdout, r.stdout
    with psycopg.connect(pg_url) as c:
        assert c.execute("SELECT status, total_trades FROM backtest_results").fetchall() == [("complete", N)]
        n, pnl, t0, t1 = c.execute("SELECT count(*), sum(pnl), min(timestamp), max(timestamp) "
                                   "FROM backtest_trade_logs").fetchone()
        assert n == N and pnl == pytest.approx(float(np.sum(cols["pnl"])), rel=1e-9, abs=1e-6)
        assert (t0, t1) == (int(cols["timestamp"][0]), int(cols["timestamp"][-1]))
        assert c.execute("SELECT count(*) FROM backtest_chunks").fetchone()[0] == N // STEP
        assert c.execute("SELECT count(*) FROM trade_logs").fetchone()[0] == 3

    again = run_migrate(src, pg_url)
    assert again.returncode == 0, (again.stdout, again.stderr)
    assert "0 results (0 trades), 0 live batches" in again.stdout, again.stdout
    with psycopg.connect(pg_url) as c:
        assert c.execute("SELECT count(*) FROM backtest_trade_logs").fetchone()[0] == N
        assert c.execute("SELECT count(*) FROM trade_logs").fetchone()[0] == 3


def test_migrate_bad_arguments_exit_2(tmp_path):
    r = run_migrate(str(tmp_path / "missing.db"), "postgresql://u@127.0.0.1/x")
    assert r.returncode == 2 and "missing.db" in r.stderr
    (tmp_path / "x.db").write_bytes(b"")
    r = run_migrate(str(tmp_path / "x.db"), "mysql://u@h/db")
    assert r.returncode == 2 and "--to" in r.stderr
