"""Both store backends keep the same promises: SQLite (pairlane.store) and PostgreSQL (pairlane.pgstore)
against a real throwaway server (tests/pg.py), no mocks. Plus what only PostgreSQL has: schema
version, lock_timeout and a killed session as StoreError, reconnect, the read-only snapshot reader."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest

from pairlane import pairs as pairlogic
from pairlane.store import StoreError, meta_from_message
from pairlane.stores import open_reader, open_store, open_view
from pairlane.vocab import ResultStatus


def cfg_for(backend: str, tmp_path, request) -> dict:
    url = request.getfixturevalue("pg_url") if backend == "postgresql" else ""
    return {"store": {"path": str(tmp_path / "s.db"), "url": url, "max_bytes": 0, "busy_timeout_ms": 200}}


@pytest.fixture(params=["sqlite", "postgresql"])
def cfg(request, tmp_path):
    return cfg_for(request.param, tmp_path, request)


@pytest.fixture
def store(cfg):
    s = open_store(cfg)
    s.open()
    yield s
    s.close()


@pytest.fixture
def pg_cfg(tmp_path, request):
    return cfg_for("postgresql", tmp_path, request)


@pytest.fixture
def pg(pg_cfg):
    s = open_store(pg_cfg)
    s.open()
    yield s
    s.close()


def q(cfg, sql: str, params=()) -> list[tuple]:
    """Rows of `sql` (with ? placeholders) read through a fresh reader of either backend."""
    r = open_reader(cfg)
    try:
        return [tuple(row) for row in r.execute(sql, params).fetchall()]
    finally:
        r.close()


def chunk(n, start=0):
    return {"timestamp": list(range(start, start + n)), "pnl": [1.0] * n}


def meta(rid="r", total=5, chunks=2, name="S"):
    return meta_from_message({"request_id": rid, "strategy_name": name, "total_trades": total,
                              "total_chunks": chunks})


def rows(cfg, rid="r") -> int:
    return q(cfg, "SELECT count(*) FROM backtest_trade_logs WHERE request_id = ?", (rid,))[0][0]


def test_result_completes_in_the_transaction_of_its_last_chunk(store, cfg):
    m = meta()
    assert store.write_chunk(m, 1, chunk(2, 3), 2) == "receiving"
    assert store.lookup("r")["status"] == "receiving"
    assert store.lookup("r")["durable"] == {1: 2}
    assert store.write_chunk(m, 0, chunk(3), 3) == "complete"
    row = store.lookup("r")
    assert row["status"] == "complete" and row["completed_at"] and rows(cfg) == 5
    assert row["durable"] == {0: 3, 1: 2}


def test_chunks_store_exactly_the_columns_they_carry(store, cfg):
    m = meta(total=4)
    two = {"timestamp": np.array([10, 11], "<i8").tobytes(), "pnl": [0.25, -1.5]}
    more = {"timestamp": [12, 13.0], "pnl": [2, 3.0], "symbol": ["USDJPY", None],
            "volume": np.array([0.1, math.nan], "<f8").tobytes(), "hold_time": [60, None]}
    assert store.write_chunk(m, 0, two, 2) == "receiving"
    assert store.write_chunk(m, 1, more, 2) == "complete"
    got = q(cfg, "SELECT seq, timestamp, pnl, symbol, volume, hold_time, direction, sl "
                 "FROM backtest_trade_logs WHERE request_id = 'r' ORDER BY timestamp")
    assert got == [(0, 10, 0.25, None, None, None, None, None), (0, 11, -1.5, None, None, None, None, None),
                   (1, 12, 2.0, "USDJPY", 0.1, 60, None, None), (1, 13, 3.0, None, None, None, None, None)]


def test_packed_columns_store_every_value_across_copy_blocks(store, cfg):
    """A chunk as it comes off the wire (numbers packed as bytes, a NULL in an optional column) of
    more rows than one COPY block and not a multiple of it: every value lands, on both backends."""
    from pairlane import codec, synthetic
    from pairlane.chunks import encode_chunk
    from pairlane.pgstore import COPY_BLOCK_ROWS
    n = 2 * COPY_BLOCK_ROWS + 453
    cols = synthetic.result_columns(n, seed=7)
    cols["sl"] = [math.nan if i % 7 == 0 else float(v) for i, v in enumerate(cols["sl"])]
    trades = codec.decode_chunk_payload(encode_chunk("p", 0, cols, 0, n))
    assert isinstance(trades["timestamp"], bytes) and isinstance(trades["pnl"], bytes)
    assert store.write_chunk(meta("p", total=n, chunks=1), 0, trades, n) == "complete"
    names = ("timestamp", "pnl", "symbol", "direction", "entry_price", "sl", "volume", "hold_time", "timeframe")
    got = q(cfg, f"SELECT {', '.join(names)} FROM backtest_trade_logs WHERE request_id = ? "
                 "ORDER BY timestamp, hold_time", ("p",))
    want = sorted(zip(*[[None if isinstance(v, float) and math.isnan(v) else v
                         for v in (cols[c].tolist() if hasattr(cols[c], "tolist") else cols[c])] for c in names]),
                  key=lambda r: (r[0], r[7]))
    assert len(got) == n and got == want


def test_a_group_commits_its_chunks_together_and_only_at_its_end(store, cfg):
    """Group commit (the writer's batches): several chunks, one transaction. Nothing is visible to
    another connection before the block ends; afterwards all of it is, with one commit counted."""
    m, other = meta(), meta("o", total=1, chunks=1)
    commits = store.commits
    with store.group():
        assert store.write_chunk(m, 0, chunk(3), 3) == "receiving"
        assert store.write_chunk(other, 0, chunk(1), 1) == "complete"
        assert store.write_chunk(m, 1, chunk(2, 3), 2) == "complete"   # sees its own group's chunk 0
        assert store.write_chunk(m, 1, chunk(2, 3), 2) == "duplicate"
        assert rows(cfg) == 0 and rows(cfg, "o") == 0
    assert store.commits == commits + 1
    assert rows(cfg) == 5 and rows(cfg, "o") == 1 and store.rows_written == 6
    assert store.lookup("r")["status"] == "complete" and store.lookup("o")["status"] == "complete"


def test_a_failed_group_leaves_nothing_behind(store, cfg):
    """A failure anywhere in a group rolls every chunk of it back: no rows, no chunk records, no
    result rows, rows_written as before; the same chunks then land as if never tried."""
    m = meta()
    store.write_chunk(meta("x", total=1, chunks=1), 0, chunk(1), 1)
    before = store.rows_written
    with pytest.raises(RuntimeError):
        with store.group():
            store.write_chunk(m, 0, chunk(3), 3)
            store.write_chunk(m, 1, chunk(2, 3), 2)
            raise RuntimeError("the third chunk failed")
    assert store.rows_written == before and rows(cfg) == 0
    assert q(cfg, "SELECT count(*) FROM backtest_chunks WHERE request_id = 'r'") == [(0,)]
    assert store.lookup("r") is None
    assert store.write_chunk(m, 0, chunk(3), 3) == "receiving"
    assert store.write_chunk(m, 1, chunk(2, 3), 2) == "complete" and rows(cfg) == 5


def test_a_store_error_in_a_group_rolls_it_back_and_the_store_goes_on(store, cfg):
    """A database error inside a group surfaces as StoreError and rolls the group back; the next
    write commits normally."""
    m = meta()
    with pytest.raises(StoreError):
        with store.group():
            store.write_chunk(m, 0, chunk(3), 3)
            run_in_tx = getattr(store, "_run", None) or store._tx   # PostgreSQL's / SQLite's
            run_in_tx(lambda conn: conn.execute("SELECT * FROM no_such_table"))
    assert rows(cfg) == 0 and store.lookup("r") is None
    assert store.write_chunk(m, 0, chunk(3), 3) == "receiving" and rows(cfg) == 3


def test_duplicate_chunk_never_duplicates_rows(store, cfg):
    m = meta()
    store.write_chunk(m, 0, chunk(3), 3)
    assert store.write_chunk(m, 0, chunk(3), 3) == "duplicate"
    assert store.write_chunk(m, 1, chunk(2, 3), 2) == "complete"
    assert store.write_chunk(m, 1, chunk(2, 3), 2) == "duplicate"
    assert rows(cfg) == 5 and store.rows_written == 5
    assert q(cfg, "SELECT count(*) FROM backtest_chunks WHERE request_id = 'r'") == [(2,)]


def test_rows_that_do_not_add_up_fail_and_are_removed(store, cfg):
    m = meta(total=6)
    store.write_chunk(m, 0, chunk(3), 3)
    assert store.write_chunk(m, 1, chunk(2, 3), 2) == "failed"
    row = store.lookup("r")
    assert rows(cfg) == 0 and row["status"] == "failed" and "total_trades is 6" in row["error"]
    store.begin(m)  # begins again from scratch
    assert store.lookup("r")["status"] == "receiving" and store.lookup("r")["durable"] == {}


def test_abandoned_results_discard_late_chunks(store, cfg):
    m = meta()
    store.write_chunk(m, 0, chunk(3), 3)
    store.set_status("r", "abandoned")
    assert rows(cfg) == 0
    assert store.write_chunk(m, 1, chunk(2, 3), 2) == "discarded"
    assert rows(cfg) == 0 and store.lookup("r")["status"] == "abandoned"


def test_complete_results_are_never_abandoned_and_spooled_only_from_receiving(store, cfg):
    m = meta(total=1, chunks=1)
    store.write_chunk(m, 0, chunk(1), 1)
    store.set_status("r", "abandoned")
    store.set_status("r", "spooled")
    assert store.lookup("r")["status"] == "complete" and rows(cfg) == 1
    store.begin(meta("s"))
    store.set_status("s", "spooled")
    assert store.lookup("s")["status"] == "spooled"


def test_abandon_stale_spares_active_and_fresh(store, cfg):
    for rid in ("a", "b", "c"):
        store.write_chunk(meta(rid), 0, chunk(3), 3)
    cut = time.time() + 1
    assert sorted(store.abandon_stale(cut, {"b"})) == ["a", "c"]
    assert store.abandon_stale(0.0, set()) == []
    assert [r for r in q(cfg, "SELECT request_id, status FROM backtest_results ORDER BY request_id")] == \
        [("a", "abandoned"), ("b", "receiving"), ("c", "abandoned")]
    assert q(cfg, "SELECT DISTINCT request_id FROM backtest_trade_logs") == [("b",)]


def test_legacy_result_without_trades(store, cfg):
    store.write_result_without_trades(dict(meta("L", 0, 1), source="legacy"), "complete")
    row = store.lookup("L")
    assert row["status"] == "complete" and row["source"] == "legacy" and row["total_trades"] == 0


def failed_meta(rid: str, strategy: str, error: str) -> dict:
    return meta_from_message({"request_id": rid, "strategy_name": strategy, "total_trades": 0,
                              "total_chunks": 1, "error": error}, "legacy")


def result_row(cfg, rid: str) -> list[tuple]:
    return q(cfg, "SELECT strategy_name, status, error FROM backtest_results WHERE request_id = ?", (rid,))


def test_later_failed_result_replaces_an_earlier_failed_one(store, cfg):
    assert store.write_result_without_trades(failed_meta("MISSING", "A", "e1"), ResultStatus.FAILED) == ""
    assert result_row(cfg, "MISSING") == [("A", "failed", "e1")]
    assert store.write_result_without_trades(failed_meta("MISSING", "B", "e2"), ResultStatus.FAILED) == "failed"
    assert result_row(cfg, "MISSING") == [("B", "failed", "e2")]


def test_failed_result_never_replaces_a_stored_one(store, cfg):
    m = meta("c", total=2, chunks=1)
    assert store.write_chunk(m, 0, {"timestamp": [1, 2], "pnl": [1.0, 2.0]}, 2) == "complete"
    assert store.write_result_without_trades(failed_meta("c", "X", "late"), ResultStatus.FAILED) == "complete"
    assert result_row(cfg, "c") == [("S", "complete", None)]
    assert rows(cfg, "c") == 2


def test_failed_result_over_a_receiving_one_removes_its_rows(store, cfg):
    m = meta("p", total=4, chunks=2)
    assert store.write_chunk(m, 0, {"timestamp": [1, 2], "pnl": [1.0, 2.0]}, 2) == "receiving"
    assert store.write_result_without_trades(failed_meta("p", "S", "boom"), ResultStatus.FAILED) == "receiving"
    assert result_row(cfg, "p") == [("S", "failed", "boom")]
    assert rows(cfg, "p") == 0


def test_a_late_chunk_of_an_earlier_request_never_lands_in_a_new_one_with_other_totals(store, cfg):
    old = meta(total=5, chunks=2)
    store.write_chunk(old, 0, chunk(3), 3)
    store.set_status("r", "abandoned")              # aborted; a dlq item of seq 1 is still spooled
    new = meta(total=1, chunks=1)
    store.begin(new)                                # the producer begins r again, with other totals
    assert store.write_chunk(old, 1, chunk(2, 3), 2) == "discarded"   # the dlq's retry of the old seq 1
    assert rows(cfg) == 0 and store.lookup("r")["status"] == "receiving"
    assert store.write_chunk(new, 0, chunk(1), 1) == "complete" and rows(cfg) == 1


def test_live_trades_idempotent_by_batch(store, cfg):
    t = dict(chunk(3), strategy_name=["a", "b", "c"], pair_id=["p", None, "p"])
    assert store.write_live("b1", t, 3) == "stored"
    assert store.write_live("b1", t, 3) == "duplicate"
    assert q(cfg, "SELECT strategy_name, pair_id, batch_id, pnl FROM trade_logs ORDER BY timestamp") == \
        [("a", "p", "b1", 1.0), ("b", None, "b1", 1.0), ("c", "p", "b1", 1.0)]


def test_pair_slots_replaced_whole_history_appended(store, cfg):
    slot = {"pair_id": "A|B", "strategy_a": "A", "strategy_b": "B", "weight_a": 0.5, "weight_b": 0.5,
            "corr": 0.1, "sharpe": 1.0, "profit_factor": 1.5, "score": 2.0}
    store.replace_pair_slots([slot], 100.0)
    store.replace_pair_slots([dict(slot, pair_id="A|C", strategy_b="C")], 200.0)
    assert q(cfg, "SELECT pair_id, evaluated_at FROM pair_slots") == [("A|C", 200.0)]
    assert q(cfg, "SELECT pair_id FROM pair_slots_history ORDER BY evaluated_at") == [("A|B",), ("A|C",)]
    store.replace_pair_slots([], 300.0)
    assert q(cfg, "SELECT count(*) FROM pair_slots") == [(0,)]


def test_result_info_and_verify_through_the_view(store, cfg):
    store.write_chunk(meta(), 0, chunk(3), 3)
    view = open_view(cfg)
    try:
        info = view.result_info("r")
        assert info["status"] == "receiving" and info["chunks_durable"] == 1 and info["rows_stored"] == 3
        assert view.result_info("nope") is None
        probs = view.verify(assembly_timeout_s=0.0, now=info["updated_at"] + 10)
        assert [p["kind"] for p in probs] == ["stale_receiving"]
        assert view.verify(assembly_timeout_s=60.0, now=info["updated_at"] + 10) == []
    finally:
        view.close()
    assert store.result_info("r")["rows_stored"] == 3


def test_candidates_read_the_same_on_both_backends(store, cfg):
    """pairs.load_candidates through either reader: latest result per strategy (a failed one with
    NULL completed_at is older than any complete one), complete results' rows only."""
    store.write_chunk(meta("a1", 3, 1, "A"), 0, chunk(3), 3)
    store.write_chunk(meta("b1", 2, 1, "B"), 0, chunk(2, 10), 2)
    store.begin(meta("a2", 9, 2, "A"))
    store.set_status("a2", "failed", "bad")
    r = open_reader(cfg)
    try:
        cands = {c.name: c for c in pairlogic.load_candidates(r)}
        windowed = {c.name: c for c in pairlogic.load_candidates(r, window_trades=2)}
    finally:
        r.close()
    assert cands["A"].status == "complete" and cands["A"].timestamps.tolist() == [0, 1, 2]
    assert cands["B"].timestamps.tolist() == [10, 11]
    assert windowed["A"].timestamps.tolist() == [1, 2] and windowed["A"].n_trades == 3


# ----- PostgreSQL only -----------------------------------------------------------------------------
def test_pg_schema_indexes_and_version(pg, pg_cfg):
    idx = q(pg_cfg, "SELECT tablename, indexdef FROM pg_indexes WHERE schemaname = 'public'")
    lead = {(t, d.split("(", 1)[1].split(",")[0].split(")")[0].strip()) for t, d in idx}
    assert {("backtest_trade_logs", "request_id"), ("backtest_trade_logs", "strategy_name"),
            ("trade_logs", "pair_id")} <= lead
    assert q(pg_cfg, "SELECT version FROM pairlane_schema") == [(1,)]
    pg.close()
    pg.open()   # opening again adds no second version row
    assert q(pg_cfg, "SELECT count(*) FROM pairlane_schema") == [(1,)]


def test_pg_newer_schema_is_refused(pg, pg_cfg):
    import psycopg
    from pairlane.pgstore import check_at_start
    with psycopg.connect(pg_cfg["store"]["url"], autocommit=True) as c:
        c.execute("INSERT INTO pairlane_schema VALUES (99, 0)")
    with pytest.raises(StoreError) as ei:
        check_at_start(pg_cfg["store"]["url"])
    assert ei.value.reason == "schema" and "99" in str(ei.value)


def test_pg_lock_held_is_store_error_locked_then_writes(pg, pg_cfg):
    import psycopg
    with psycopg.connect(pg_cfg["store"]["url"]) as other:
        other.execute("LOCK TABLE backtest_trade_logs IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(StoreError) as ei:
            pg.write_chunk(meta(), 0, chunk(3), 3)
        assert ei.value.reason == "locked"
        other.rollback()
    assert pg.write_chunk(meta(), 0, chunk(3), 3) == "receiving"
    assert rows(pg_cfg) == 3 and pg.lookup("r")["durable"] == {0: 3}


def test_pg_terminated_session_is_store_error_then_reconnects(pg, pg_cfg):
    import psycopg
    pg.write_chunk(meta(), 0, chunk(3), 3)
    pid = pg.conn.info.backend_pid
    with psycopg.connect(pg_cfg["store"]["url"], autocommit=True) as other:
        assert other.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
    with pytest.raises(StoreError) as ei:
        pg.write_chunk(meta(), 1, chunk(2, 3), 2)
    assert ei.value.reason == "connection" and pg.conn is None
    deadline = time.monotonic() + 10
    while True:   # reconnects once its backoff allows
        try:
            assert pg.write_chunk(meta(), 1, chunk(2, 3), 2) == "complete"
            break
        except StoreError as exc:
            assert exc.reason == "connection" and time.monotonic() < deadline
            time.sleep(0.05)
    assert rows(pg_cfg) == 5


def test_pg_reader_snapshot_is_repeatable_read_and_read_only(pg, pg_cfg):
    import psycopg
    pg.write_chunk(meta(total=6), 0, chunk(3), 3)
    r = open_reader(pg_cfg)
    try:
        r.execute("BEGIN")
        assert r.execute("SELECT count(*) FROM backtest_trade_logs").fetchone()[0] == 3
        pg.write_chunk(meta(total=6), 1, chunk(3, 3), 3)
        assert r.execute("SELECT count(*) FROM backtest_trade_logs").fetchone()[0] == 3  # same snapshot
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            r.execute("DELETE FROM backtest_trade_logs")
        r.execute("ROLLBACK")
        assert r.execute("SELECT count(*) FROM backtest_trade_logs").fetchone()[0] == 6
    finally:
        r.close()


def test_pg_unreachable_server_is_store_error(pg_server):
    from pairlane.pgstore import PgStore, check_at_start
    from tests.harness import free_port
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    with pytest.raises(StoreError) as ei:
        check_at_start(url)
    assert ei.value.reason == "connection"
    s = PgStore(url)
    with pytest.raises(StoreError):
        s.write_chunk(meta(), 0, chunk(3), 3)
    with pytest.raises(StoreError) as ei:   # within the backoff: not even tried
        s.open()
    assert "reconnecting in" in str(ei.value)


def test_pg_session_settings_of_writer_lookup_and_reader(pg, pg_cfg):
    """The writer and the assembler's lookups answer within their heartbeat (2 s statement timeout,
    lock_timeout = store.busy_timeout_ms); readers get a 1 min guard; commits are synchronous."""
    from pairlane.pgstore import PgStore

    def show(conn, name):
        return conn.execute(f"SHOW {name}").fetchone()[0]
    assert (show(pg.conn, "statement_timeout"), show(pg.conn, "lock_timeout"),
            show(pg.conn, "synchronous_commit")) == ("2s", "200ms", "on")
    look = PgStore(pg_cfg["store"]["url"], busy_timeout_ms=100, readonly=True)
    assert look.open_readonly()
    try:
        assert (show(look.conn, "statement_timeout"), show(look.conn, "lock_timeout")) == ("2s", "100ms")
        assert show(look.conn, "default_transaction_read_only") == "on"
    finally:
        look.close()
    r = open_reader(pg_cfg)
    try:
        assert r.execute("SHOW statement_timeout").fetchone()[0] == "1min"
        assert r.execute("SHOW default_transaction_isolation").fetchone()[0] == "repeatable read"
    finally:
        r.close()
