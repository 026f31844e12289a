"""Pure-logic tests of the wire codec and the SQLite store (no daemon)."""
from __future__ import annotations

import math
import sqlite3

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pairlane import client, codec, synthetic
from pairlane.store import BATCH_ROWS, Store, StoreError, insert_rows, insert_sql, meta_from_message

LIM = codec.Limits(max_message_bytes=1 << 16, max_result_trades=1000)


def frame(m):
    return [msgpack.packb(m, use_bin_type=True)]


def begin(**kw):
    m = {"type": "begin", "request_id": "r1", "strategy_name": "S", "total_trades": 10, "total_chunks": 2}
    m.update(kw)
    return m


@pytest.mark.parametrize("m, code", [
    (begin(request_id="bad id"), "malformed"),
    (begin(request_id="x" * 129), "malformed"),
    (begin(strategy_name=""), "malformed"),
    (begin(strategy_name="A\x00B"), "malformed"),     # NUL: PostgreSQL text cannot hold it
    (begin(symbol="EUR\x00USD"), "malformed"),
    (begin(total_trades=True), "malformed"),
    (begin(total_chunks=0), "malformed"),
    (begin(total_chunks=11), "malformed"),
    (begin(total_trades=1001), "too_large"),
    (begin(metrics={"sharpe": "x"}), "malformed"),
    ({"type": "nope", "request_id": "r"}, "malformed"),
    ({"type": "chunk", "request_id": "r", "seq": 0, "trades": {"pnl": [1.0]}}, "malformed"),
    ({"type": "chunk", "request_id": "r", "seq": -1, "trades": {"timestamp": [1], "pnl": [1.0]}}, "malformed"),
    ({"type": "live_trades", "batch_id": "b", "trades": {"timestamp": [1], "pnl": [1.0]}}, "malformed"),
    (begin(v=2), "malformed"),
])
def test_decode_frame_rejects_with_the_protocol_code(m, code):
    with pytest.raises(codec.ProtocolError) as ei:
        codec.decode_frame(frame(m), LIM)
    assert ei.value.code == code
    assert ei.value.reply()["type"] == "error" and "retry_after_s" not in ei.value.reply()


def test_frame_level_errors():
    for frames, code in (([b"\xc1"], "malformed"), ([msgpack.packb([1])], "malformed"),
                         ([b"a", b"b"], "malformed"), ([b"x" * (LIM.max_message_bytes + 1)], "too_large")):
        with pytest.raises(codec.ProtocolError) as ei:
            codec.decode_frame(frames, LIM)
        assert ei.value.code == code


def test_valid_messages_decode():
    assert codec.decode_frame(frame(begin()), LIM)["total_chunks"] == 2
    r = codec.decode_frame(frame({"type": "result", "request_id": "r", "strategy_name": "S", "total_trades": 1,
                                  "trades": {"timestamp": [1], "pnl": [0.5]}}), LIM)
    assert r["total_chunks"] == 1
    live = codec.decode_frame(frame({"type": "live_trades", "batch_id": "b1",
                                     "trades": {"timestamp": [1], "pnl": [1.0], "strategy_name": ["s"]}}), LIM)
    assert live["request_id"] == "b1"


@pytest.mark.parametrize("trades, msg", [
    ({"timestamp": [1, 2], "pnl": [1.0]}, "unequal"),
    ({"timestamp": [1], "pnl": [1.0], "colour": ["x"]}, "unknown column"),
    ({"timestamp": b"\x00" * 7, "pnl": [1.0]}, "multiple of 8"),
    ({"timestamp": [1], "pnl": [math.nan]}, "NaN"),
    ({"timestamp": [1], "pnl": [math.inf]}, "NaN"),
    ({"timestamp": [1], "pnl": np.array([math.inf]).tobytes()}, "NaN"),
    ({"timestamp": [1], "pnl": [True]}, "bool"),
    ({"timestamp": [None], "pnl": [1.0]}, "NoneType"),
    ({"timestamp": [1.5], "pnl": [1.0]}, "float"),
    ({"timestamp": [1], "pnl": [1.0], "symbol": [3]}, "strings"),
    ({"timestamp": [2 ** 63], "pnl": [1.0]}, "int64"),
    ({"timestamp": [1], "pnl": [1.0], "symbol": ["EUR\x00USD"]}, "without NUL"),
])
def test_bad_columns_are_bad_chunk(trades, msg):
    with pytest.raises(codec.ProtocolError) as ei:
        codec.check_columns(trades, "r")
    assert ei.value.code == "bad_chunk" and msg in ei.value.message


def test_columns_lists_and_bins_give_the_same_rows():
    ts = [1, 2, 3]
    pnl = [0.5, -1, 2.25]
    a = {"timestamp": ts, "pnl": pnl, "symbol": ["X", None, "Y"], "volume": [None, 1.0, 2]}
    b = {"timestamp": np.array(ts, "<i8").tobytes(), "pnl": np.array(pnl, "<f8").tobytes(),
         "symbol": ["X", None, "Y"], "volume": [None, 1.0, 2]}
    assert codec.check_columns(a) == codec.check_columns(b) == 3
    cols_a, rows_a = codec.trade_log_rows(a, "r", "S", 0, 3)
    cols_b, rows_b = codec.trade_log_rows(b, "r", "S", 0, 3)
    assert cols_a == cols_b == ("request_id", "strategy_name", "seq", "timestamp", "pnl", "symbol", "volume")
    assert list(rows_a) == list(rows_b) == [("r", "S", 0, 1, 0.5, "X", None), ("r", "S", 0, 2, -1, None, 1.0),
                                            ("r", "S", 0, 3, 2.25, "Y", 2)]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.builds(lambda d: msgpack.packb(d), st.dictionaries(
    st.sampled_from(["type", "request_id", "seq", "trades", "total_trades", "total_chunks", "strategy_name"]),
    st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(), st.text(max_size=5),
              st.sampled_from(["begin", "chunk", "result", "end"]),
              st.dictionaries(st.sampled_from(["timestamp", "pnl", "x"]),
                              st.lists(st.one_of(st.integers(-2**63, 2**64 - 1), st.floats(), st.none()), max_size=3))))))
def test_any_frame_either_decodes_or_raises_protocol_error(data):
    try:
        m = codec.decode_frame([data], LIM)
    except codec.ProtocolError as exc:
        assert exc.code in ("malformed", "too_large")
        return
    if m["type"] in ("chunk", "result", "live_trades"):
        try:
            codec.check_columns(m["trades"])
        except codec.ProtocolError as exc:
            assert exc.code == "bad_chunk"


# ----- store ------------------------------------------------------------------------------------------
def chunk(n, start=0):
    return {"timestamp": list(range(start, start + n)), "pnl": [1.0] * n}


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "s.db"))
    s.open()
    yield s
    s.close()


def meta(rid="r", total=5, chunks=2):
    return meta_from_message({"request_id": rid, "strategy_name": "S", "total_trades": total, "total_chunks": chunks})


def rows(s, rid="r"):
    return s.conn.execute("SELECT count(*) FROM backtest_trade_logs WHERE request_id = ?", (rid,)).fetchone()[0]


def test_result_completes_in_the_transaction_of_its_last_chunk(store):
    m = meta()
    assert store.write_chunk(m, 1, chunk(2, 3), 2) == "receiving"
    assert store.lookup("r")["status"] == "receiving"
    assert store.write_chunk(m, 0, chunk(3), 3) == "complete"
    assert store.lookup("r")["status"] == "complete" and rows(store) == 5


def test_a_one_message_result_recorded_with_its_chunk_is_the_same_row_as_begin_then_chunk(store):
    """write_chunk(record=True) of a new one-message result writes its row `complete` at once
    (Store._write_whole): the same row, chunk and trades as `begin` and then the chunk."""
    m1, m2 = meta("a", 5, 1), meta("b", 5, 1)
    for m in (m1, m2):
        m.update(sharpe=1.5, symbol="USDJPY", truncated=0)
    assert store.write_chunk(m1, 0, chunk(5), 5, record=True) == "complete"
    store.begin(m2)
    assert store.write_chunk(m2, 0, chunk(5), 5) == "complete"
    a, b = store.lookup("a"), store.lookup("b")
    times = ("received_at", "updated_at", "completed_at")
    assert all(a[k] for k in times) and a["completed_at"] >= a["received_at"]
    assert {k: v for k, v in a.items() if k not in times + ("request_id",)} == \
        {k: v for k, v in b.items() if k not in times + ("request_id",)}
    assert a["durable"] == {0: 5} and rows(store, "a") == rows(store, "b") == 5


def test_a_one_message_result_recorded_again_or_over_an_old_row_keeps_every_rule(store):
    assert store.write_chunk(meta("r", 5, 1), 0, chunk(5), 5, record=True) == "complete"
    assert store.write_chunk(meta("r", 5, 1), 0, chunk(5), 5, record=True) == "duplicate"
    assert store.write_chunk(meta("r", 6, 1), 0, chunk(6), 6, record=True) == "discarded"   # other totals
    assert rows(store, "r") == 5 and store.lookup("r")["status"] == "complete"
    store.begin(meta("x", 5, 1))
    store.set_status("x", "abandoned")
    assert store.write_chunk(meta("x", 5, 1), 0, chunk(5), 5, record=True) == "complete"     # starts over
    assert rows(store, "x") == 5
    assert store.write_chunk(meta("f", 5, 1), 0, chunk(3), 3, record=True) == "failed"      # do not add up
    assert rows(store, "f") == 0 and store.lookup("f")["status"] == "failed"
    assert store.write_chunk(meta("f", 3, 1), 0, chunk(3), 3, record=True) == "complete"    # a failed one: again
    assert store.write_chunk(meta("e", 0, 1), 0, {}, 0, record=True) == "complete" and rows(store, "e") == 0


def test_a_checked_write_writes_only_a_request_the_store_does_not_hold(store):
    assert store.write_chunk(meta("r", 5, 1), 0, chunk(5), 5, record=True, new_only=True) == "complete"
    written = store.rows_written
    for m in (meta("r", 5, 1), meta("r", 6, 1)):   # stored: the same result, or another under its id
        assert store.write_chunk(m, 0, chunk(m["total_trades"]), m["total_trades"], record=True,
                                 new_only=True) == "exists"
    store.begin(meta("q", 5, 1))                    # receiving
    assert store.write_chunk(meta("q", 5, 1), 0, chunk(5), 5, record=True, new_only=True) == "exists"
    assert store.rows_written == written and rows(store, "r") == 5 and rows(store, "q") == 0
    assert store.lookup("q")["status"] == "receiving" and store.lookup("q")["durable"] == {}
    store.set_status("q", "abandoned")              # an abandoned (or failed) one is not held: written anew
    assert store.write_chunk(meta("q", 5, 1), 0, chunk(5), 5, record=True, new_only=True) == "complete"


def test_chunks_with_different_column_sets_store_exactly_what_they_carry(store):
    m = meta(total=4)
    two = {"timestamp": np.array([10, 11], "<i8").tobytes(), "pnl": [0.25, -1.5]}
    more = {"timestamp": [12, 13], "pnl": [2.0, 3.0], "symbol": ["USDJPY", None],
            "volume": np.array([0.1, 0.2], "<f8").tobytes(), "hold_time": [60, None]}
    assert store.write_chunk(m, 0, two, 2) == "receiving"
    assert store.write_chunk(m, 1, more, 2) == "complete"
    got = store.conn.execute("SELECT seq, timestamp, pnl, symbol, volume, hold_time, direction, sl "
                             "FROM backtest_trade_logs WHERE request_id = 'r' ORDER BY timestamp").fetchall()
    assert got == [(0, 10, 0.25, None, None, None, None, None), (0, 11, -1.5, None, None, None, None, None),
                   (1, 12, 2.0, "USDJPY", 0.1, 60, None, None), (1, 13, 3.0, None, 0.2, None, None, None)]


@settings(max_examples=150, deadline=None)
@given(width=st.integers(1, 5), nrows=st.integers(0, 700), rows_allowed=st.sampled_from([1, 2, 7, 999, 0]),
       data=st.data())
def test_batched_inserts_store_exactly_the_rows_executemany_stores(width, nrows, rows_allowed, data):
    # insert_rows binds up to BATCH_ROWS rows per statement (fewer where the library's variable limit
    # allows fewer: rows_allowed, 0 for the library's own limit) and the rest one by one: the same
    # rows, in the same order, as executemany
    value = st.none() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=5)
    rows = [tuple(data.draw(st.lists(value, min_size=width, max_size=width))) for _ in range(min(nrows, 20))]
    rows = [rows[i % len(rows)] if rows else () for i in range(nrows)]
    columns = tuple(f"c{i}" for i in range(width))
    got = {}
    for how in ("executemany", "insert_rows"):
        conn = sqlite3.connect(":memory:", isolation_level=None)
        if rows_allowed:
            conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, rows_allowed * width + width - 1)
        conn.execute(f"CREATE TABLE t({', '.join(columns)})")
        if how == "executemany":
            conn.executemany(insert_sql("t", columns), rows)
        else:
            insert_rows(conn, "t", columns, iter(rows))
        got[how] = conn.execute("SELECT * FROM t ORDER BY rowid").fetchall()
        conn.close()
    assert len(got["insert_rows"]) == nrows
    assert got["insert_rows"] == got["executemany"]


def test_batched_inserts_refuse_ragged_rows():
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t(a, b)")
    with pytest.raises(ValueError, match="2 values wide"):
        insert_rows(conn, "t", ("a", "b"), [(1, 2), (3,)])
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 0


def test_a_chunk_of_many_batches_stores_every_column_of_every_row(store):
    n = 3 * BATCH_ROWS + 7
    trades = codec.decode_chunk_payload(client.encode_chunk("r", 0, synthetic.result_columns(n, seed=3), 0, n))
    m = meta(total=n, chunks=1)
    assert store.write_chunk(m, 0, trades, n) == "complete"
    columns, expected = codec.trade_log_rows(trades, "r", "S", 0, n)
    got = store.conn.execute(f"SELECT {', '.join(columns)} FROM backtest_trade_logs ORDER BY rowid").fetchall()
    assert got == list(expected)


def test_a_row_failing_in_a_later_batch_leaves_nothing_of_the_chunk(store):
    # the batches of one chunk are statements of one transaction: a bad row in the third batch
    # rolls back the first two and the chunk record
    n = 3 * BATCH_ROWS
    bad = chunk(n)
    bad["pnl"][2 * BATCH_ROWS + 5] = None   # pnl NOT NULL
    m = meta(total=n, chunks=1)
    store.begin(m)
    with pytest.raises(StoreError):
        store.write_chunk(m, 0, bad, n)
    assert store.lookup("r")["durable"] == {} and rows(store) == 0
    assert store.write_chunk(m, 0, chunk(n), n) == "complete" and rows(store) == n


def test_duplicate_chunk_never_duplicates_rows(store):
    m = meta()
    store.write_chunk(m, 0, chunk(3), 3)
    assert store.write_chunk(m, 0, chunk(3), 3) == "duplicate"
    store.write_chunk(m, 1, chunk(2, 3), 2)
    assert store.write_chunk(m, 1, chunk(2, 3), 2) == "duplicate"
    assert rows(store) == 5


def test_a_chunk_whose_rows_fail_leaves_no_record_and_is_not_a_duplicate_later(store):
    # the chunk record (also the duplicate check) is written before the rows: a failed insert must
    # roll it back, or the retried chunk would be answered `duplicate` with no rows stored
    m = meta()
    store.begin(m)
    with pytest.raises(StoreError):
        store.write_chunk(m, 0, {"timestamp": [0, 1, 2], "pnl": [1.0, None, 1.0]}, 3)   # pnl NOT NULL
    assert store.lookup("r")["durable"] == {} and rows(store) == 0
    assert store.write_chunk(m, 0, chunk(3), 3) == "receiving"
    assert store.lookup("r")["durable"] == {0: 3} and rows(store) == 3


def test_rows_that_do_not_add_up_fail_and_are_removed(store):
    m = meta(total=6)
    store.write_chunk(m, 0, chunk(3), 3)
    assert store.write_chunk(m, 1, chunk(2, 3), 2) == "failed"
    assert rows(store) == 0 and store.lookup("r")["status"] == "failed"
    store.begin(m)  # begins again from scratch
    assert store.lookup("r")["status"] == "receiving" and store.lookup("r")["durable"] == {}


def test_abandoned_results_discard_late_chunks(store):
    m = meta()
    store.write_chunk(m, 0, chunk(3), 3)
    store.set_status("r", "abandoned")
    assert rows(store) == 0
    assert store.write_chunk(m, 1, chunk(2, 3), 2) == "discarded"
    assert rows(store) == 0


def test_complete_results_are_never_abandoned(store):
    m = meta(total=1, chunks=1)
    store.write_chunk(m, 0, chunk(1), 1)
    store.set_status("r", "abandoned")
    assert store.lookup("r")["status"] == "complete" and rows(store) == 1


def test_live_trades_idempotent_by_batch(store):
    t = dict(chunk(3), strategy_name=["a", "b", "c"], pair_id=["p", None, "p"])
    assert store.write_live("b1", t, 3) == "stored"
    assert store.write_live("b1", t, 3) == "duplicate"
    assert store.conn.execute("SELECT count(*) FROM trade_logs").fetchone()[0] == 3


def test_a_live_batch_of_many_statements_stores_every_column_of_every_row(store):
    n = 2 * BATCH_ROWS + 3
    t = {"timestamp": list(range(n)), "strategy_name": [f"s{i % 7}" for i in range(n)],
         "symbol": ["USDJPY"] * n, "direction": ["BUY", "SELL"] * (n // 2) + ["BUY"],
         "pnl": [i / 4 for i in range(n)], "pair_id": [None if i % 3 else f"p{i}" for i in range(n)],
         "hold_time": list(range(n, 2 * n))}
    assert store.write_live("big", t, n) == "stored"
    got = store.conn.execute("SELECT timestamp, strategy_name, symbol, direction, category, regime, pnl, "
                             "hold_time, pair_id, execution_mode, batch_id FROM trade_logs ORDER BY rowid").fetchall()
    assert got == [(t["timestamp"][i], t["strategy_name"][i], "USDJPY", t["direction"][i], None, None,
                    t["pnl"][i], t["hold_time"][i], t["pair_id"][i], None, "big") for i in range(n)]


def test_required_indexes_exist(store):
    def leading(table):
        out = set()
        for (_, name, *_rest) in store.conn.execute(f"PRAGMA index_list({table})"):
            cols = [r[2] for r in store.conn.execute(f"PRAGMA index_info({name})")]
            out.add(cols[0])
        return out
    assert {"request_id", "strategy_name"} <= leading("backtest_trade_logs")
    assert "pair_id" in leading("trade_logs")


def test_locked_database_raises_store_error_with_reason(store, tmp_path):
    other = sqlite3.connect(str(tmp_path / "s.db"), isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError) as ei:
            store.write_chunk(meta(), 0, chunk(3), 3)
        assert ei.value.reason == "locked"
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store.write_chunk(meta(), 0, chunk(3), 3) == "receiving"


def test_size_cap_behaves_as_a_full_disk(tmp_path):
    s = Store(str(tmp_path / "cap.db"), max_bytes=200_000)
    s.open()
    with pytest.raises(StoreError) as ei:
        for i in range(100):
            s.write_chunk(meta(f"r{i}", 2000, 1), 0, chunk(2000), 2000)
    assert ei.value.reason == "full"
    s.close()


def test_verify_reports_stale_receiving(store):
    store.write_chunk(meta(), 0, chunk(3), 3)
    probs = store.verify(assembly_timeout_s=0.0, now=store.lookup("r")["updated_at"] + 10)
    assert [p["kind"] for p in probs] == ["stale_receiving"]
