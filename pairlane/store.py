"""The SQLite store: schema, and every write pairlane makes (PROTOCOL.md section 3).

Owns: the one writing connection's behaviour (WAL, synchronous=FULL,
BEGIN IMMEDIATE, short busy timeout, `store.max_bytes` as max_page_count),
idempotent chunk commits (a chunk is its rows plus a `backtest_chunks`
record, in one transaction, so a duplicate never makes duplicate rows), the
result status machine (a result becomes `complete` in the transaction that
commits its last rows; `failed` when the rows do not add up), abandonment,
live trades idempotent by batch_id, pair slot replacement, and `verify`.
Every sqlite3 failure surfaces as `StoreError` with a reason (locked, full,
io, sqlite): the caller spools the batch; nothing here retries or sleeps.
Never used from more than one thread or process at a time.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import os
import sqlite3
import threading
import time

from . import codec
from .lifecycle import settle, totals
from .vocab import ResultStatus, WriteOutcome

SCHEMA = """
CREATE TABLE IF NOT EXISTS backtest_results(
    request_id TEXT PRIMARY KEY, strategy_name TEXT NOT NULL, status TEXT NOT NULL,
    total_trades INTEGER NOT NULL, total_chunks INTEGER NOT NULL DEFAULT 1,
    sharpe REAL, profit_factor REAL, win_rate REAL, max_dd REAL, reported_trades INTEGER,
    symbol TEXT, timeframe INTEGER, rank TEXT, oos_kind TEXT, truncated INTEGER NOT NULL DEFAULT 0,
    error TEXT, source TEXT NOT NULL DEFAULT 'zmq',
    received_at REAL, completed_at REAL, updated_at REAL);
CREATE INDEX IF NOT EXISTS idx_results_strategy ON backtest_results(strategy_name, completed_at);
CREATE INDEX IF NOT EXISTS idx_results_status ON backtest_results(status);
CREATE TABLE IF NOT EXISTS backtest_chunks(
    request_id TEXT NOT NULL, seq INTEGER NOT NULL, rows INTEGER NOT NULL, committed_at REAL,
    PRIMARY KEY(request_id, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS backtest_trade_logs(
    request_id TEXT NOT NULL, strategy_name TEXT NOT NULL, seq INTEGER NOT NULL,
    timestamp INTEGER NOT NULL, pnl REAL NOT NULL, symbol TEXT, direction TEXT,
    entry_price REAL, exit_price REAL, sl REAL, tp REAL, volume REAL, hold_time INTEGER,
    rank TEXT, timeframe INTEGER, category TEXT, regime TEXT, oos_kind TEXT);
CREATE INDEX IF NOT EXISTS idx_btl_request ON backtest_trade_logs(request_id, timestamp, seq);
CREATE INDEX IF NOT EXISTS idx_btl_strategy ON backtest_trade_logs(strategy_name, timestamp);
CREATE TABLE IF NOT EXISTS trade_logs(
    timestamp INTEGER NOT NULL, strategy_name TEXT NOT NULL, symbol TEXT, direction TEXT,
    category TEXT, regime TEXT, pnl REAL NOT NULL, hold_time INTEGER, pair_id TEXT,
    execution_mode TEXT, batch_id TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS idx_trade_logs_pair ON trade_logs(pair_id);
CREATE INDEX IF NOT EXISTS idx_trade_logs_batch ON trade_logs(batch_id);
CREATE TABLE IF NOT EXISTS live_batches(batch_id TEXT PRIMARY KEY, rows INTEGER NOT NULL, committed_at REAL);
CREATE TABLE IF NOT EXISTS pair_slots(
    pair_id TEXT PRIMARY KEY, strategy_a TEXT NOT NULL, strategy_b TEXT NOT NULL,
    weight_a REAL, weight_b REAL, corr REAL, sharpe REAL, profit_factor REAL, score REAL,
    evaluated_at REAL);
CREATE TABLE IF NOT EXISTS pair_slots_history(
    pair_id TEXT NOT NULL, strategy_a TEXT NOT NULL, strategy_b TEXT NOT NULL,
    weight_a REAL, weight_b REAL, corr REAL, sharpe REAL, profit_factor REAL, score REAL,
    evaluated_at REAL);
CREATE INDEX IF NOT EXISTS idx_pair_history_time ON pair_slots_history(evaluated_at);
"""


@functools.lru_cache(maxsize=256)
def insert_sql(table: str, columns: tuple, rows: int = 1) -> str:
    """An INSERT into `table` binding exactly `columns`, for `rows` rows (one VALUES tuple each)."""
    one = f"({', '.join('?' * len(columns))})"
    return f"INSERT INTO {table}({', '.join(columns)}) VALUES {', '.join([one] * rows)}"


def insert_trades_sql(columns: tuple) -> str:
    """The one-row INSERT for backtest_trade_logs binding exactly `columns` (from codec.trade_log_rows)."""
    return insert_sql("backtest_trade_logs", columns)


BATCH_ROWS = 256   # rows bound to one multi-row INSERT by insert_rows


def insert_rows(conn: sqlite3.Connection, table: str, columns: tuple, rows) -> None:
    """Insert `rows` (tuples of len(columns) values) into `table`: what executemany of the one-row
    INSERT writes, in the caller's transaction, but BATCH_ROWS rows to a statement (fewer if the
    library allows fewer variables) and the rest one by one. SQLite's work is the same; executemany's
    per-row reset, step and bind calls from Python are what it saves: 1.3x on 18-column chunks and
    1.6x on 2-column ones, in process (README "Performance", session 12)."""
    width = len(columns)
    flat = list(itertools.chain.from_iterable(rows))
    if len(flat) % width:
        raise ValueError(f"rows for {table} are not all {width} values wide")
    per = max(1, min(BATCH_ROWS, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // width)) * width
    whole = len(flat) - len(flat) % per
    if whole:
        sql = insert_sql(table, columns, per // width)
        for at in range(0, whole, per):
            conn.execute(sql, flat[at:at + per])
    if whole < len(flat):
        rest = iter(flat[whole:])
        conn.executemany(insert_sql(table, columns), zip(*[rest] * width))


LIVE_INSERT_COLUMNS = (*codec.LIVE_COLUMNS, "batch_id")
SLOT_COLUMNS = ("pair_id", "strategy_a", "strategy_b", "weight_a", "weight_b", "corr", "sharpe",
                "profit_factor", "score", "evaluated_at")


def settle_in_tx(conn, rid: str, now: float, drop_rows, param: str = "?",
                 known_totals: tuple | None = None) -> WriteOutcome:
    """Apply `lifecycle.settle` (the one completion rule) to what the chunk's transaction on `conn`
    committed, for either store: `param` is the driver's placeholder ("?" sqlite3, "%s" psycopg),
    `drop_rows(conn, rid)` removes a failed result's rows. known_totals: the row's (total_trades,
    total_chunks) when this transaction already read them (one statement fewer)."""
    def q(sql: str) -> str:
        return sql.replace("?", param)
    if known_totals is None:
        known_totals = conn.execute(
            q("SELECT total_trades, total_chunks FROM backtest_results WHERE request_id = ?"), (rid,)).fetchone()
    total_trades, total_chunks = known_totals
    n, rows = conn.execute(q("SELECT count(*), coalesce(sum(rows), 0) FROM backtest_chunks WHERE request_id = ?"),
                           (rid,)).fetchone()
    rows = int(rows)   # psycopg gives sum() as a Decimal
    outcome = settle(total_chunks, total_trades, n, rows)
    if outcome == WriteOutcome.RECEIVING:
        conn.execute(q("UPDATE backtest_results SET updated_at = ? WHERE request_id = ?"), (now, rid))
    elif outcome == WriteOutcome.COMPLETE:
        conn.execute(q("UPDATE backtest_results SET status = 'complete', completed_at = ?, updated_at = ? "
                       "WHERE request_id = ?"), (now, now, rid))
    else:
        drop_rows(conn, rid)
        conn.execute(q("UPDATE backtest_results SET status = 'failed', updated_at = ?, error = ? WHERE request_id = ?"),
                     (now, f"rows add up to {rows}, total_trades is {total_trades}", rid))
    return outcome


class StatusRules:
    """The status rules both stores apply, each inside its own transaction: completion (`_settle`),
    `set_status` and the write of a result without trades. A store gives its driver's placeholder
    (`PARAM`) and how it reads a row's status for update (PostgreSQL locks the row; SQLite's
    BEGIN IMMEDIATE already serializes writers), plus `_drop_rows` and `_insert_result`."""

    PARAM = "?"

    def _q(self, sql: str) -> str:
        return sql if self.PARAM == "?" else sql.replace("?", self.PARAM)

    def _status_for_update(self, conn, rid: str) -> str | None:
        row = conn.execute(self._q("SELECT status FROM backtest_results WHERE request_id = ?"), (rid,)).fetchone()
        return None if row is None else row[0]

    def _settle(self, conn, rid: str, now: float, known_totals: tuple | None = None) -> WriteOutcome:
        return settle_in_tx(conn, rid, now, self._drop_rows, self.PARAM, known_totals)

    def _set_status_in_tx(self, conn, request_id: str, status: ResultStatus, error: str | None,
                          now: float) -> None:
        """`abandoned`/`failed` also remove the result's rows; `spooled` only from `receiving`."""
        if status.final_without_rows:
            current = self._status_for_update(conn, request_id)
            if current is not None and ResultStatus(current).stored:
                return  # a stored result is a promise: never dropped here
            self._drop_rows(conn, request_id)
            conn.execute(self._q("UPDATE backtest_results SET status = ?, updated_at = ?, error = coalesce(?, error) "
                                 "WHERE request_id = ?"), (str(status), now, error, request_id))
        elif status == ResultStatus.SPOOLED:
            conn.execute(self._q("UPDATE backtest_results SET status = 'spooled', updated_at = ? "
                                 "WHERE request_id = ? AND status = 'receiving'"), (now, request_id))
        else:
            raise ValueError(status)

    def _without_trades_in_tx(self, conn, meta: dict, status: str, now: float) -> str:
        """A legacy result with no trade list (`complete`, 0 trades) or with an error (`failed`).
        Returns the row's status before the write ("" when there was none). A stored result
        (complete, spooled) is a promise and is kept; any other row (an earlier failed one, an
        abandoned or receiving one) is replaced whole, its rows removed: the later result wins."""
        rid = meta["request_id"]
        before = self._status_for_update(conn, rid)
        if before is not None:
            if ResultStatus(before).stored:
                return before
            self._drop_rows(conn, rid)
            conn.execute(self._q("DELETE FROM backtest_results WHERE request_id = ?"), (rid,))
        self._insert_result(conn, meta, now)
        conn.execute(self._q("UPDATE backtest_results SET status = ?, completed_at = ?, updated_at = ? "
                             "WHERE request_id = ?"), (str(status), now, now, rid))
        return before or ""


class StoreError(Exception):
    """A write that did not commit. reason: locked | full | io | sqlite."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def classify(exc: BaseException) -> str:
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return "locked"
    if "full" in text or "no space" in text:
        return "full"
    if "disk i/o" in text or "readonly" in text or "unable to open" in text:
        return "io"
    return "sqlite"


def connect(path: str, *, max_bytes: int = 0, busy_timeout_ms: int = 200,
            synchronous: str = "FULL", readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                               check_same_thread=False)
    else:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        if max_bytes:
            page = conn.execute("PRAGMA page_size").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {max(1, max_bytes // page)}")
    return conn


def meta_from_message(m: dict, source: str = "zmq") -> dict:
    """The results-row fields of a begin/result message (small, picklable)."""
    metrics = m.get("metrics") or {}
    return {"request_id": m["request_id"], "strategy_name": m["strategy_name"],
            "total_trades": int(m["total_trades"]), "total_chunks": int(m.get("total_chunks") or 1),
            "sharpe": metrics.get("sharpe"), "profit_factor": metrics.get("profit_factor"),
            "win_rate": metrics.get("win_rate"), "max_dd": metrics.get("max_dd"),
            "reported_trades": metrics.get("trades"),
            "symbol": m.get("symbol"), "timeframe": m.get("timeframe"), "rank": m.get("rank"),
            "oos_kind": m.get("oos_kind"), "truncated": int(bool(m.get("truncated", False))),
            "error": m.get("error"), "source": source}


class Store(StatusRules):
    RECORDS_WITH_CHUNK = True   # write_chunk(record=True) records the request in the chunk's transaction

    def __init__(self, path: str, *, max_bytes: int = 0, busy_timeout_ms: int = 200,
                 synchronous: str = "FULL"):
        self.path = path
        self.max_bytes = max_bytes
        self.busy_timeout_ms = busy_timeout_ms
        self.synchronous = synchronous
        self.conn: sqlite3.Connection | None = None
        self.rows_written = 0
        self.commits = 0
        self.last_commit_at: float | None = None
        self.last_error: str | None = None
        self._grouped = False

    # ----- connection ----------------------------------------------------------------------
    def open(self) -> None:
        """Open and create the schema. Raises StoreError (the daemon still starts; writes spool)."""
        try:
            if self.conn is None:
                self.conn = connect(self.path, max_bytes=self.max_bytes, busy_timeout_ms=self.busy_timeout_ms,
                                    synchronous=self.synchronous)
            self.conn.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(classify(exc), f"cannot open {self.path}: {exc}")

    def open_readonly(self) -> bool:
        """A read-only connection for lookups from another actor; False if the database is not there yet."""
        if self.conn is None:
            if not os.path.exists(self.path):
                return False
            try:
                self.conn = connect(self.path, readonly=True, busy_timeout_ms=self.busy_timeout_ms)
            except sqlite3.Error:
                return False
        return True

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None

    def _tx(self, fn, *args):
        """Run fn(conn, *args) inside BEGIN IMMEDIATE .. COMMIT (or inside the open `group`);
        StoreError on any sqlite failure."""
        if not self._grouped:
            with self.group():
                return self._tx(fn, *args)
        try:
            return fn(self.conn, *args)
        except sqlite3.Error as exc:
            self.last_error = str(exc)
            raise StoreError(classify(exc), str(exc))

    @contextlib.contextmanager
    def group(self):
        """One transaction for every write made inside the block, committed (durable) when it ends.
        Any failure inside or at COMMIT rolls all of them back (`rows_written` too) and propagates,
        sqlite3 failures as StoreError. The writer commits a batch's chunks this way: one COMMIT
        (one fsync) for several chunks, each still answered only after it."""
        if self.conn is None:
            self.open()
        conn, rows_before = self.conn, self.rows_written
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self.last_error = str(exc)
            raise StoreError(classify(exc), f"BEGIN IMMEDIATE failed: {exc}")
        self._grouped = True
        try:
            yield
            conn.execute("COMMIT")
        except BaseException as exc:
            self.rows_written = rows_before
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if isinstance(exc, sqlite3.Error):
                self.last_error = str(exc)
                raise StoreError(classify(exc), str(exc))
            raise
        finally:
            self._grouped = False
        self.commits += 1
        self.last_commit_at = time.time()

    # ----- results -------------------------------------------------------------------------
    @staticmethod
    def _insert_result(conn, meta: dict, now: float, complete: bool = False) -> None:
        """The results row, `receiving` (or `complete`, for `_write_whole`), unless it exists."""
        conn.execute(
            "INSERT OR IGNORE INTO backtest_results(request_id, strategy_name, status, total_trades, "
            "total_chunks, sharpe, profit_factor, win_rate, max_dd, reported_trades, symbol, timeframe, "
            "rank, oos_kind, truncated, error, source, received_at, updated_at, completed_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (meta["request_id"], meta["strategy_name"], "complete" if complete else "receiving",
             meta["total_trades"], meta["total_chunks"],
             meta.get("sharpe"), meta.get("profit_factor"), meta.get("win_rate"), meta.get("max_dd"),
             meta.get("reported_trades"), meta.get("symbol"), meta.get("timeframe"), meta.get("rank"),
             meta.get("oos_kind"), meta.get("truncated", 0), meta.get("error"), meta.get("source", "zmq"),
             now, now, now if complete else None))

    def lookup(self, request_id: str) -> dict | None:
        """The result row (as a dict) plus `durable`: {seq: rows} committed in the database."""
        if self.conn is None:
            self.open()
        try:
            cur = self.conn.execute("SELECT * FROM backtest_results WHERE request_id = ?", (request_id,))
            row = cur.fetchone()
            if row is None:
                return None
            out = dict(zip([d[0] for d in cur.description], row))
            out["durable"] = dict(self.conn.execute(
                "SELECT seq, rows FROM backtest_chunks WHERE request_id = ?", (request_id,)).fetchall())
            return out
        except sqlite3.Error as exc:
            raise StoreError(classify(exc), str(exc))

    def begin(self, meta: dict) -> None:
        """Record a new (or restarted) request as `receiving`. A failed or abandoned one starts over."""
        self._tx(self._begin_in_tx, meta)

    def _begin_in_tx(self, conn, meta: dict, insert: bool = True) -> bool:
        """Whether the request is new: it has no results row (or one abandoned or failed, removed here
        with its rows). Then its row is inserted `receiving`, unless `insert` is False."""
        row = conn.execute("SELECT status FROM backtest_results WHERE request_id = ?",
                           (meta["request_id"],)).fetchone()
        if row is not None and ResultStatus(row[0]).final_without_rows:
            self._drop_rows(conn, meta["request_id"])
            conn.execute("DELETE FROM backtest_results WHERE request_id = ?", (meta["request_id"],))
            row = None
        if insert:
            self._insert_result(conn, meta, time.time())
        return row is None

    @staticmethod
    def _drop_rows(conn, request_id: str) -> None:
        conn.execute("DELETE FROM backtest_trade_logs WHERE request_id = ?", (request_id,))
        conn.execute("DELETE FROM backtest_chunks WHERE request_id = ?", (request_id,))

    def write_chunk(self, meta: dict, seq: int, trades: dict, nrows: int, record: bool = False,
                    new_only: bool = False) -> WriteOutcome:
        """Commit one chunk. Returns the result's status after the commit: receiving | complete |
        failed, or `duplicate` (seq already committed), or `discarded` (result abandoned/failed, or
        the chunk belongs to an earlier request under this request_id with other totals, e.g. a dlq
        item of an aborted request retried after the id was begun again). record: do what `begin`
        does first, in the same transaction (a one-message result: one commit, not two). new_only
        (with record): write nothing, and return `exists`, if the request is there (any status but
        failed or abandoned: what a lookup would show), checked in this transaction."""
        rid = meta["request_id"]

        def tx(conn):
            if record:
                # a new one-message result whose rows add up (`settle`, the one completion rule) is
                # written complete at once: one read, three writes, as a receiver without a lifecycle
                whole = (meta["total_chunks"] == 1 and seq == 0
                         and settle(1, meta["total_trades"], 1, nrows) == WriteOutcome.COMPLETE)
                new = self._begin_in_tx(conn, meta, insert=not whole)
                if new_only and not new:
                    return WriteOutcome.EXISTS
                if new and whole:
                    done = self._write_whole(conn, meta, trades, nrows)
                    if done is not None:
                        return done
            # per chunk: one read of the results row, the chunk record (which is also the duplicate
            # check), the rows, then completion; the results row is written only when it is missing
            now = time.time()
            row = conn.execute("SELECT status, strategy_name, total_trades, total_chunks FROM backtest_results "
                               "WHERE request_id = ?", (rid,)).fetchone()
            if row is None:   # its begin was not recorded (deferred, or a dlq retry): as if it had been
                self._insert_result(conn, meta, now)
                row = (ResultStatus.RECEIVING, *totals(meta))
            status, *row_totals = row
            if ResultStatus(status).final_without_rows or tuple(row_totals) != totals(meta):
                return WriteOutcome.DISCARDED
            if not self._insert_chunk(conn, meta, seq, trades, nrows, now):
                return WriteOutcome.DUPLICATE   # this seq is already committed: nothing is written
            return self._settle(conn, rid, now, tuple(row_totals[1:]))

        out = self._tx(tx)
        if out not in (WriteOutcome.DUPLICATE, WriteOutcome.DISCARDED, WriteOutcome.EXISTS):
            self.rows_written += nrows
        return out

    def _write_whole(self, conn, meta: dict, trades: dict, nrows: int) -> WriteOutcome | None:
        """A new one-message result whose rows add up: its chunk, its row `complete`, its rows.
        None, having written nothing, if a chunk of it is there already (a results row's chunks
        never outlive it, so never: the caller then goes the general way)."""
        now = time.time()
        if not self._insert_chunk(conn, meta, 0, trades, nrows, now):
            return None
        self._insert_result(conn, meta, now, complete=True)
        return WriteOutcome.COMPLETE

    @staticmethod
    def _insert_chunk(conn, meta: dict, seq: int, trades: dict, nrows: int, now: float) -> bool:
        """The chunk record (which is also the duplicate check) and its rows; False, having written
        nothing, if that seq is committed already."""
        rid = meta["request_id"]
        if conn.execute("INSERT OR IGNORE INTO backtest_chunks(request_id, seq, rows, committed_at) "
                        "VALUES (?, ?, ?, ?)", (rid, seq, nrows, now)).rowcount == 0:
            return False
        if nrows:
            columns, rows = codec.trade_log_rows(trades, rid, meta["strategy_name"], seq, nrows)
            insert_rows(conn, "backtest_trade_logs", columns, rows)
        return True

    def set_status(self, request_id: str, status: ResultStatus | str, error: str | None = None) -> None:
        """`abandoned`/`failed` also remove the result's rows; `spooled` only from `receiving`."""
        status = ResultStatus(status)
        self._tx(lambda conn: self._set_status_in_tx(conn, request_id, status, error, time.time()))

    def write_result_without_trades(self, meta: dict, status: str) -> str:
        """See StatusRules._without_trades_in_tx; the status the row had before ("" if none)."""
        return self._tx(lambda conn: self._without_trades_in_tx(conn, meta, status, time.time()))

    def abandon_stale(self, older_than: float, active: set) -> list[str]:
        """Abandon `receiving` results not touched since `older_than` and not in `active`."""
        def tx(conn):
            ids = [r[0] for r in conn.execute(
                "SELECT request_id FROM backtest_results WHERE status = 'receiving' AND updated_at < ?",
                (older_than,)) if r[0] not in active]
            now = time.time()
            for rid in ids:
                self._drop_rows(conn, rid)
                conn.execute("UPDATE backtest_results SET status = 'abandoned', updated_at = ? "
                             "WHERE request_id = ?", (now, rid))
            return ids
        return self._tx(tx)

    # ----- live trades ---------------------------------------------------------------------
    def write_live(self, batch_id: str, trades: dict, nrows: int) -> str:
        def tx(conn):
            if conn.execute("SELECT 1 FROM live_batches WHERE batch_id = ?", (batch_id,)).fetchone():
                return "duplicate"
            if nrows:
                insert_rows(conn, "trade_logs", LIVE_INSERT_COLUMNS, codec.live_rows(trades, batch_id, nrows))
            conn.execute("INSERT INTO live_batches(batch_id, rows, committed_at) VALUES (?, ?, ?)",
                         (batch_id, nrows, time.time()))
            return "stored"
        out = self._tx(tx)
        if out == "stored":
            self.rows_written += nrows
        return out

    # ----- pairs ---------------------------------------------------------------------------
    def replace_pair_slots(self, slots: list[dict], evaluated_at: float) -> None:
        cols = ", ".join(SLOT_COLUMNS)
        marks = ", ".join("?" * len(SLOT_COLUMNS))
        rows = [tuple(s[c] if c != "evaluated_at" else evaluated_at for c in SLOT_COLUMNS) for s in slots]

        def tx(conn):
            conn.execute("DELETE FROM pair_slots")
            conn.executemany(f"INSERT INTO pair_slots({cols}) VALUES ({marks})", rows)
            conn.executemany(f"INSERT INTO pair_slots_history({cols}) VALUES ({marks})", rows)
        self._tx(tx)

    # ----- operator views -------------------------------------------------------------------
    def result_info(self, request_id: str) -> dict | None:
        row = self.lookup(request_id)
        if row is None:
            return None
        durable = row.pop("durable")
        row["chunks_durable"] = len(durable)
        try:
            row["rows_stored"] = self.conn.execute(
                "SELECT count(*) FROM backtest_trade_logs WHERE request_id = ?", (request_id,)).fetchone()[0]
        except sqlite3.Error as exc:
            raise StoreError(classify(exc), str(exc))
        return row

    def verify(self, assembly_timeout_s: float, now: float | None = None) -> list[dict]:
        now = time.time() if now is None else now
        if self.conn is None:
            self.open()
        c = self.conn
        try:
            c.execute("BEGIN")  # one snapshot for every check
            return self._verify(c, assembly_timeout_s, now)
        except sqlite3.Error as exc:
            raise StoreError(classify(exc), str(exc))
        finally:
            if c.in_transaction:
                c.execute("COMMIT")

    @staticmethod
    def _verify(c, assembly_timeout_s: float, now: float) -> list[dict]:
        problems = []
        for rid, total, n in c.execute(
                "SELECT r.request_id, r.total_trades, (SELECT count(*) FROM backtest_trade_logs t "
                "WHERE t.request_id = r.request_id) FROM backtest_results r WHERE r.status = 'complete'"):
            if n != total:
                problems.append({"kind": "row_count", "request_id": rid,
                                 "detail": f"{n} rows stored, total_trades is {total}"})
        for (rid,) in c.execute(
                "SELECT DISTINCT t.request_id FROM backtest_trade_logs t LEFT JOIN backtest_results r "
                "ON r.request_id = t.request_id WHERE r.request_id IS NULL OR r.status NOT IN "
                "('receiving', 'spooled', 'complete')"):
            problems.append({"kind": "orphan_rows", "request_id": rid,
                             "detail": "trade rows without a live result"})
        for rid, upd in c.execute("SELECT request_id, updated_at FROM backtest_results "
                                  "WHERE status = 'receiving' AND updated_at < ?", (now - assembly_timeout_s,)):
            problems.append({"kind": "stale_receiving", "request_id": rid,
                             "detail": f"receiving, idle for {now - upd:.0f}s (timeout {assembly_timeout_s:g}s)"})
        return problems

    def file_sizes(self) -> dict:
        out = {}
        for k, p in (("main", self.path), ("wal", self.path + "-wal")):
            try:
                out[k] = os.path.getsize(p)
            except OSError:
                out[k] = 0
        return out


class StoreView:
    """A read-only view of the store for operators (admin `result` and `verify`).

    Owns one read-only connection (opened when the database exists) and reads in one snapshot
    per call, serialized by a lock so the view may be used from a reader thread; `interrupt`
    (from any thread) aborts a read in progress. Never writes and never creates the database:
    the writer's transactions are never blocked by it (WAL readers do not block the writer).
    """

    def __init__(self, path: str, busy_timeout_ms: int = 1000):
        self._store = Store(path, busy_timeout_ms=busy_timeout_ms)
        self._lock = threading.RLock()

    @property
    def path(self) -> str:
        return self._store.path

    def open(self) -> bool:
        """False if the database does not exist yet (nothing is created)."""
        with self._lock:
            return self._store.open_readonly()

    def close(self) -> None:
        with self._lock:
            self._store.close()

    def interrupt(self) -> None:
        """Abort the read in progress, if any (it raises StoreError in its thread)."""
        conn = self._store.conn
        if conn is not None:
            conn.interrupt()

    def _snapshot(self, fn):
        with self._lock:
            if not self.open():
                raise StoreError("io", f"the database {self._store.path} does not exist yet")
            try:
                return fn()
            except sqlite3.Error as exc:  # e.g. from the end of a snapshot that was interrupted
                self._store.close()
                raise StoreError(classify(exc), str(exc))
            except StoreError:
                self._store.close()  # reopened on the next call
                raise

    def result_info(self, request_id: str) -> dict | None:
        """Store.result_info (the row, chunks_durable, rows_stored) read in one snapshot."""
        def read():
            c = self._store.conn
            try:
                c.execute("BEGIN")
                return self._store.result_info(request_id)
            except sqlite3.Error as exc:
                raise StoreError(classify(exc), str(exc))
            finally:
                if c.in_transaction:
                    try:
                        c.execute("COMMIT")
                    except sqlite3.Error:
                        pass  # a read-only snapshot: nothing to lose
        return self._snapshot(read)

    RESULT_COLUMNS = ("request_id", "strategy_name", "status", "total_trades", "total_chunks", "sharpe",
                      "profit_factor", "win_rate", "max_dd", "symbol", "timeframe", "rank", "oos_kind",
                      "truncated", "error", "source", "received_at", "completed_at", "updated_at")

    def results(self, status: str | None = None, strategy: str | None = None, since: float | None = None,
                limit: int = 100) -> list[dict]:
        """backtest_results rows (RESULT_COLUMNS), newest first by received_at (else completed_at,
        updated_at), filtered by status, strategy name and that time >= since; at most `limit`."""
        when = "COALESCE(received_at, completed_at, updated_at, 0)"
        where, params = [], []
        if status:
            where.append("status = ?")
            params.append(status)
        if strategy:
            where.append("strategy_name = ?")
            params.append(strategy)
        if since is not None:
            where.append(f"{when} >= ?")
            params.append(float(since))
        sql = (f"SELECT {', '.join(self.RESULT_COLUMNS)} FROM backtest_results"
               f"{' WHERE ' + ' AND '.join(where) if where else ''} ORDER BY {when} DESC, request_id LIMIT ?")
        params.append(int(limit))

        def read():
            rows = self._store.conn.execute(sql, params).fetchall()
            return [dict(zip(self.RESULT_COLUMNS, r)) for r in rows]
        return self._snapshot(read)

    def verify(self, assembly_timeout_s: float, now: float | None = None) -> list[dict]:
        """Store.verify, in one snapshot."""
        return self._snapshot(lambda: self._store.verify(assembly_timeout_s, now))
