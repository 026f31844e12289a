"""Moving data from a SQLite store to PostgreSQL (`python run.py migrate --from SQLITE_PATH --to URL`).

Owns: what is copied (complete results with their trade rows and chunk records, live trades with
their batch records, pair slots history, and the current pair slots when the target has none),
idempotence (a result already `complete` in the target, a live batch already there, a history
evaluation already there are skipped: a rerun adds nothing; a result the target holds in another
status is replaced by the complete one), each result one transaction on the target (COPY binary of
its rows + its record + its chunk records), the progress callback, and the final count check per
table. Reads the SQLite file through a read-only connection in one snapshot; never writes it.
"""
from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from typing import Callable

from . import codec
from .pgstore import PG_TYPES, _connect, check_at_start, redact
from .store import SLOT_COLUMNS, StoreError, connect

RESULT_ALL = ("request_id", "strategy_name", "status", "total_trades", "total_chunks", "sharpe",
              "profit_factor", "win_rate", "max_dd", "reported_trades", "symbol", "timeframe", "rank",
              "oos_kind", "truncated", "error", "source", "received_at", "completed_at", "updated_at")
LIVE_ALL = codec.LIVE_COLUMNS + ("batch_id",)
LIVE_TX_ROWS = 50_000     # live batches are grouped into transactions of about this many rows
FETCH = 20_000

Progress = Callable[[str, int, int], None]   # (table, done, total)


@dataclass
class Report:
    copied: dict = field(default_factory=lambda: {"results": 0, "trades": 0, "live_batches": 0,
                                                  "live_trades": 0, "pair_history": 0, "pair_slots": 0})
    skipped: dict = field(default_factory=lambda: {"results": 0, "live_batches": 0, "pair_history": 0})
    counts: dict = field(default_factory=dict)     # table -> (source, target) for what was migrated
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(s == t for s, t in self.counts.values())


def _pg_types(cols) -> list[str]:
    types = dict(PG_TYPES, status="text", total_trades="int8", total_chunks="int8", sharpe="float8",
                 profit_factor="float8", win_rate="float8", max_dd="float8", reported_trades="int8",
                 truncated="int4", error="text", source="text", received_at="float8",
                 completed_at="float8", updated_at="float8", rows="int8", committed_at="float8",
                 pair_id="text", strategy_a="text", strategy_b="text", weight_a="float8", weight_b="float8",
                 corr="float8", score="float8", evaluated_at="float8")
    return [types[c] for c in cols]


def _copy_rows(cur, table: str, cols, rows) -> int:
    n = 0
    with cur.copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN (FORMAT BINARY)") as cp:
        cp.set_types(_pg_types(cols))
        for row in rows:
            cp.write_row(row)
            n += 1
    return n


def _batches(cur):
    while True:
        rows = cur.fetchmany(FETCH)
        if not rows:
            return
        yield from rows


def migrate(sqlite_path: str, url: str, progress: Progress | None = None) -> Report:
    """Copy what `sqlite_path` holds into `url` (schema created if needed). StoreError when either
    database cannot be opened; psycopg errors propagate (a rerun resumes: done parts are skipped)."""
    progress = progress or (lambda table, done, total: None)
    t0 = time.monotonic()
    try:
        src = connect(sqlite_path, readonly=True, busy_timeout_ms=5000)
    except sqlite3.Error as exc:
        raise StoreError("io", f"cannot open {sqlite_path}: {exc}")
    check_at_start(url)
    dst = _connect(url, reader=False, lock_timeout_ms=10_000, statement_timeout_ms=0)
    rep = Report()
    try:
        src.execute("BEGIN")   # one snapshot of the source
        _results(src, dst, rep, progress)
        _live(src, dst, rep, progress)
        _pairs(src, dst, rep, progress)
        _check(src, dst, rep)
        src.execute("ROLLBACK")
    finally:
        src.close()
        dst.close()
    rep.seconds = time.monotonic() - t0
    return rep


def _results(src, dst, rep: Report, progress: Progress) -> None:
    ids = [r[0] for r in src.execute("SELECT request_id FROM backtest_results WHERE status = 'complete' "
                                     "ORDER BY request_id")]
    total = len(ids)
    have = {r[0]: r[1] for r in dst.execute("SELECT request_id, status FROM backtest_results").fetchall()}
    trade_cols = codec.TRADE_LOG_COLUMNS
    for i, rid in enumerate(ids, 1):
        if have.get(rid) == "complete":
            rep.skipped["results"] += 1
            progress("results", i, total)
            continue
        row = src.execute(f"SELECT {', '.join(RESULT_ALL)} FROM backtest_results WHERE request_id = ?",
                          (rid,)).fetchone()
        with dst.transaction():
            if rid in have:   # the target holds it unfinished: the complete one replaces it
                dst.execute("DELETE FROM backtest_trade_logs WHERE request_id = %s", (rid,))
                dst.execute("DELETE FROM backtest_chunks WHERE request_id = %s", (rid,))
                dst.execute("DELETE FROM backtest_results WHERE request_id = %s", (rid,))
            with dst.cursor() as cur:
                _copy_rows(cur, "backtest_results", RESULT_ALL, [row])
                _copy_rows(cur, "backtest_chunks", ("request_id", "seq", "rows", "committed_at"),
                           src.execute("SELECT request_id, seq, rows, committed_at FROM backtest_chunks "
                                       "WHERE request_id = ?", (rid,)).fetchall())
                rep.copied["trades"] += _copy_rows(cur, "backtest_trade_logs", trade_cols, _batches(src.execute(
                    f"SELECT {', '.join(trade_cols)} FROM backtest_trade_logs WHERE request_id = ? "
                    f"ORDER BY seq, rowid", (rid,))))
        rep.copied["results"] += 1
        progress("results", i, total)


def _live(src, dst, rep: Report, progress: Progress) -> None:
    batches = src.execute("SELECT batch_id, rows, committed_at FROM live_batches ORDER BY batch_id").fetchall()
    have = {r[0] for r in dst.execute("SELECT batch_id FROM live_batches").fetchall()}
    todo = [b for b in batches if b[0] not in have]
    rep.skipped["live_batches"] = len(batches) - len(todo)
    done = len(batches) - len(todo)
    i = 0
    while i < len(todo):
        group, rows = [], 0
        while i < len(todo) and (not group or rows + todo[i][1] <= LIVE_TX_ROWS):
            group.append(todo[i])
            rows += todo[i][1]
            i += 1
        with dst.transaction(), dst.cursor() as cur:
            _copy_rows(cur, "live_batches", ("batch_id", "rows", "committed_at"), group)
            for b in group:
                rep.copied["live_trades"] += _copy_rows(cur, "trade_logs", LIVE_ALL, _batches(src.execute(
                    f"SELECT {', '.join(LIVE_ALL)} FROM trade_logs WHERE batch_id = ? ORDER BY rowid", (b[0],))))
        rep.copied["live_batches"] += len(group)
        done += len(group)
        progress("live_batches", done, len(batches))


def _pairs(src, dst, rep: Report, progress: Progress) -> None:
    times = [r[0] for r in src.execute("SELECT DISTINCT evaluated_at FROM pair_slots_history ORDER BY 1")]
    have = {r[0] for r in dst.execute("SELECT DISTINCT evaluated_at FROM pair_slots_history").fetchall()}
    todo = [t for t in times if t not in have]
    rep.skipped["pair_history"] = len(times) - len(todo)
    with dst.transaction(), dst.cursor() as cur:
        for t in todo:
            rep.copied["pair_history"] += _copy_rows(cur, "pair_slots_history", SLOT_COLUMNS, src.execute(
                f"SELECT {', '.join(SLOT_COLUMNS)} FROM pair_slots_history WHERE evaluated_at IS ?", (t,)).fetchall())
        if dst.execute("SELECT count(*) FROM pair_slots").fetchone()[0] == 0:
            rep.copied["pair_slots"] = _copy_rows(cur, "pair_slots", SLOT_COLUMNS, src.execute(
                f"SELECT {', '.join(SLOT_COLUMNS)} FROM pair_slots").fetchall())
    progress("pair_history", len(times), len(times))


def _check(src, dst, rep: Report) -> None:
    """Per table: what the source holds of the migrated kind vs what the target holds of those keys."""
    ids = [r[0] for r in src.execute("SELECT request_id FROM backtest_results WHERE status = 'complete'")]
    rep.counts["backtest_results"] = (len(ids), dst.execute(
        "SELECT count(*) FROM backtest_results WHERE status = 'complete' AND request_id = ANY(%s)",
        (ids,)).fetchone()[0])
    src_rows = src.execute("SELECT count(*) FROM backtest_trade_logs t JOIN backtest_results r "
                           "ON r.request_id = t.request_id WHERE r.status = 'complete'").fetchone()[0]
    rep.counts["backtest_trade_logs"] = (src_rows, dst.execute(
        "SELECT count(*) FROM backtest_trade_logs WHERE request_id = ANY(%s)", (ids,)).fetchone()[0])
    batches = [r[0] for r in src.execute("SELECT batch_id FROM live_batches")]
    rep.counts["live_batches"] = (len(batches), dst.execute(
        "SELECT count(*) FROM live_batches WHERE batch_id = ANY(%s)", (batches,)).fetchone()[0])
    rep.counts["trade_logs"] = (src.execute("SELECT count(*) FROM trade_logs WHERE batch_id IN "
                                            "(SELECT batch_id FROM live_batches)").fetchone()[0],
                                dst.execute("SELECT count(*) FROM trade_logs WHERE batch_id = ANY(%s)",
                                            (batches,)).fetchone()[0])
    times = [r[0] for r in src.execute("SELECT DISTINCT evaluated_at FROM pair_slots_history")
             if r[0] is not None]
    rep.counts["pair_slots_history"] = (
        src.execute("SELECT count(*) FROM pair_slots_history WHERE evaluated_at IS NOT NULL").fetchone()[0],
        dst.execute("SELECT count(*) FROM pair_slots_history WHERE evaluated_at = ANY(%s)",
                    (times,)).fetchone()[0])


def describe(url: str) -> str:
    return redact(url)
