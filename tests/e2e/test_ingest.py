"""Durable chunked ingest through a real daemon (PROTOCOL.md sections 1, 3 and 4).

Every test speaks the wire contract over ZMQ and checks the outcome in SQLite
through a connection of its own. Tests that only add requests with their own
request_ids share one daemon (module scope); tests that kill actors or need a
different configuration get a daemon of their own.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import struct
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pairlane.client import Producer, SendError, encode_chunk, plan_chunks, synthetic_columns
from tests.e2e.util import (BACKENDS, ERROR_CODES, RETRYABLE, Dealer, assert_all_running, check_error, db,
                            duplicate_groups, index_leading_columns, inspect, pack, result_row, rows_for,
                            metric, running_daemon, store_overrides, wait_status, wait_until, with_overrides)

MAX_MSG = 1 << 20   # gateway.max_message_bytes (default)


# tests marked so run on both store backends (SQLite, and PostgreSQL on the session's throwaway server)
on_both_stores = pytest.mark.parametrize("shared", BACKENDS, indirect=True)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, request):
    """One daemon with the default limits, shared by the tests that cannot disturb each other
    (SQLite unless a test asks for another backend with `on_both_stores`)."""
    backend = getattr(request, "param", "sqlite")
    with store_overrides(request, backend) as store, \
            running_daemon(tmp_path_factory.mktemp(f"ingest-{backend}"), store) as d:
        yield d


@pytest.fixture(scope="module", params=BACKENDS)
def small(tmp_path_factory, request):
    """gateway.max_requests = 2 and assembly_timeout_s = 2 (busy and abandonment), on both backends."""
    with store_overrides(request, request.param) as store, \
            running_daemon(tmp_path_factory.mktemp(f"ingest-small-{request.param}"),
                           with_overrides({"gateway": {"max_requests": 2, "assembly_timeout_s": 2.0}}, store)) as d:
        yield d


@pytest.fixture
def dealer(shared):
    with Dealer(shared.gateway_endpoint) as dl:
        yield dl


def begin(rid, total_trades, total_chunks, name="S", **kw):
    return dict({"type": "begin", "request_id": rid, "strategy_name": name, "total_trades": total_trades,
                 "total_chunks": total_chunks}, **kw)


def chunk(rid, seq, trades):
    return {"type": "chunk", "request_id": rid, "seq": seq, "trades": trades}


def rows2(base=0):
    """Two valid trades."""
    return {"timestamp": [1_700_000_000 + base, 1_700_000_060 + base], "pnl": [1.5, -0.5]}


def f64(*xs) -> bytes:
    return struct.pack(f"<{len(xs)}d", *xs)


def i64(*xs) -> bytes:
    return struct.pack(f"<{len(xs)}q", *xs)


def send_chunks(dl: Dealer, rid: str, chunks: dict[int, dict]) -> None:
    """Send chunks (seq -> trades) and wait for every per-chunk credit."""
    for seq, trades in chunks.items():
        dl.send(chunk(rid, seq, trades))
    acked = set()
    while len(acked) < len(chunks):
        r = dl.recv(10)
        assert r is not None, f"credits missing for {set(chunks) - acked}"
        assert r["type"] == "credit" and r["request_id"] == rid and "seq" in r, r
        assert r["credit"] == 1, r
        acked.add(r["seq"])
    assert acked == set(chunks)


# ----- volume, durability, schema -----------------------------------------------------------------
@on_both_stores
def test_100k_trades_each_credit_and_stored_only_after_commit(shared, dealer):
    """A manual conversation: every per-chunk credit arrives only once that chunk's rows are
    committed (visible to another connection), `stored` only once all rows are, and the rows are
    exactly the ones sent."""
    rid, n = "vol-100k", 100_000
    cols = synthetic_columns(n, seed=1, strategy="Vol100k")
    ranges = plan_chunks(cols, MAX_MSG)
    assert len(ranges) > 8  # more chunks than the credit window
    r = dealer.rt(begin(rid, n, len(ranges), "Vol100k", symbol="USDJPY", timeframe=60, rank="A",
                        metrics={"sharpe": 1.25, "profit_factor": 1.5, "win_rate": 0.55, "max_dd": 0.1,
                                 "trades": n}))
    assert r == {"type": "credit", "request_id": rid, "credit": 8}
    window = r["credit"]
    pending = list(range(len(ranges)))
    unacked: set[int] = set()
    conn = db(shared)
    try:
        while pending or unacked:
            while pending and len(unacked) < window:
                seq = pending.pop(0)
                a, b = ranges[seq]
                frame = encode_chunk(rid, seq, cols, a, b)
                assert len(frame) <= MAX_MSG
                dealer.send(frame)
                unacked.add(seq)
            r = dealer.recv(20)
            assert r is not None and r["type"] == "credit" and r["credit"] == 1, r
            seq = r["seq"]
            assert seq in unacked
            unacked.discard(seq)
            a, b = ranges[seq]
            # the credit is a durability receipt: the chunk's rows are committed already
            got = conn.execute("SELECT count(*) FROM backtest_trade_logs WHERE request_id = ? AND seq = ?",
                               (rid, seq)).fetchone()[0]
            assert got == b - a, f"credit for seq {seq} before its {b - a} rows were committed ({got})"
        r = dealer.rt({"type": "end", "request_id": rid})
        assert r == {"type": "stored", "request_id": rid, "trades": n, "trades_ref": rid, "location": "db"}
        # `stored` is a promise: the rows and the complete status are in SQLite when the reply arrives
        assert conn.execute("SELECT count(*) FROM backtest_trade_logs WHERE request_id = ?",
                            (rid,)).fetchone()[0] == n
        res = conn.execute("SELECT status, total_trades, strategy_name, sharpe, symbol, timeframe, rank, "
                           "truncated, completed_at FROM backtest_results WHERE request_id = ?",
                           (rid,)).fetchone()
        assert res[:8] == ("complete", n, "Vol100k", 1.25, "USDJPY", 60, "A", 0)
        assert res[8] is not None
        stored = conn.execute("SELECT timestamp, pnl, symbol, direction, entry_price, exit_price, sl, tp, "
                              "volume, hold_time, timeframe FROM backtest_trade_logs WHERE request_id = ? "
                              "ORDER BY seq, timestamp", (rid,)).fetchall()
    finally:
        conn.close()
    got = list(zip(*stored))
    assert list(got[0]) == cols["timestamp"].tolist()
    assert list(got[1]) == cols["pnl"].tolist()
    assert list(got[2]) == cols["symbol"]
    assert list(got[3]) == cols["direction"]
    for i, name in enumerate(("entry_price", "exit_price", "sl", "tp", "volume", "hold_time", "timeframe"), 4):
        assert list(got[i]) == cols[name].tolist(), name
    assert duplicate_groups(shared, rid) == 0


@on_both_stores
@pytest.mark.timeout(400)
def test_1m_trades_stored_exactly(shared):
    rid, n = "vol-1m", 1_000_000
    cols = synthetic_columns(n, seed=2, strategy="Vol1M")
    with Producer(shared.gateway_endpoint, timeout_s=30, retries=5) as p:
        t0 = time.monotonic()
        reply = p.send_result(rid, "Vol1M", cols)
        took = time.monotonic() - t0
        stats = p.last_stats
    assert reply == {"type": "stored", "request_id": rid, "trades": n, "trades_ref": rid, "location": "db"}
    # counted through a separate connection the moment `stored` arrived
    assert rows_for(shared, rid) == n
    row = result_row(shared, rid)
    assert row["status"] == "complete" and row["total_trades"] == n
    assert duplicate_groups(shared, rid) == 0
    with contextlib.closing(db(shared)) as c:
        s = c.execute("SELECT sum(pnl), min(timestamp), max(timestamp) FROM backtest_trade_logs "
                      "WHERE request_id = ?", (rid,)).fetchone()
    assert s[0] == pytest.approx(float(np.sum(cols["pnl"])), rel=1e-9, abs=1e-6)
    assert (s[1], s[2]) == (int(cols["timestamp"][0]), int(cols["timestamp"][-1]))
    assert stats["timeouts"] == 0 and stats["begins"] == 1
    print(f"1M trades in {took:.1f}s over {stats['chunks']} chunks")


def test_producer_cli_stores(shared):
    r = shared.run_cli("send", "--synthetic", "5000", "--seed", "3", "--endpoint", shared.gateway_endpoint,
                       "--request-id", "cli-5k", "--strategy", "Cli", "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["type"] == "stored" and out["trades"] == 5000
    assert rows_for(shared, "cli-5k") == 5000


@on_both_stores
def test_indexes_exist(shared):
    assert {"request_id", "strategy_name"} <= index_leading_columns(shared, "backtest_trade_logs")
    assert "pair_id" in index_leading_columns(shared, "trade_logs")


# ----- every error code -----------------------------------------------------------------------------
def test_too_large(shared, dealer):
    n = 140_000  # 2 x 8 bytes per row: ~2.2 MB, over 1 MiB but under 4 MiB
    big = pack(chunk("tl-frame", 0, {"timestamp": i64(*range(n)), "pnl": f64(*([0.5] * n))}))
    assert MAX_MSG < len(big) < 4 * MAX_MSG
    check_error(dealer.rt(big), "too_large", "tl-frame")
    # too_large is checked before anything else: a big frame with a bad request_id and NaN
    bad = pack(chunk("bad id", 0, {"timestamp": i64(*range(n)), "pnl": f64(*([math.nan] * n))}))
    reply = dealer.rt(bad)
    assert reply.get("code") == "too_large", reply
    check_error(reply, "too_large", reply["request_id"])
    assert reply["request_id"] in (None, "bad id")
    # declared totals over gateway.max_result_trades (50_000_000)
    check_error(dealer.rt(begin("tl-tot", 50_000_001, 100)), "too_large", "tl-tot")
    check_error(dealer.rt(begin("tl-tot2", 2**63 - 1, 1, name="")), "too_large", "tl-tot2")
    check_error(dealer.rt({"type": "result", "request_id": "tl-res", "strategy_name": "S",
                           "total_trades": 60_000_000, "trades": rows2()}), "too_large", "tl-res")
    # beyond 4x ZMQ drops the frame (and the peer); the gateway keeps serving everyone
    huge = pack(chunk("tl-huge", 0, {"timestamp": b"\0" * (4 * MAX_MSG + 8192), "pnl": b""}))
    dealer.send(huge)
    assert dealer.recv(1.0) is None
    with Dealer(shared.gateway_endpoint) as other:
        r = other.rt(begin("tl-after", 2, 1))
        assert r == {"type": "credit", "request_id": "tl-after", "credit": 1}
        other.send(chunk("tl-after", 0, rows2()))
        assert other.recv(10)["seq"] == 0
        assert other.rt({"type": "end", "request_id": "tl-after"})["type"] == "stored"
    assert rows_for(shared, "tl-frame") == 0


MALFORMED = [
    # (frame or message, request_id in the reply)
    (b"\xc1", None),                                   # not msgpack (0xc1 is never used)
    (b"", None),                                       # empty frame
    (b"\x93\x01\x02", None),                           # truncated msgpack
    (pack([1, 2, 3]), None),                           # not a map
    (pack("begin"), None),
    ({"type": "bogus", "request_id": "mf-type"}, "mf-type"),
    ({"request_id": "mf-notype", "strategy_name": "S"}, "mf-notype"),
    ({"type": "begin", "request_id": "mf-v2", "strategy_name": "S", "total_trades": 1, "total_chunks": 1,
      "v": 2}, "mf-v2"),
    ({"type": "begin", "request_id": "mf-noname", "total_trades": 1, "total_chunks": 1}, "mf-noname"),
    (begin("mf-name-int", 1, 1, name=7), "mf-name-int"),
    (begin("mf-name-long", 1, 1, name="x" * 257), "mf-name-long"),
    (begin("mf-tt-str", "10", 1), "mf-tt-str"),
    (begin("mf-tt-neg", -1, 1), "mf-tt-neg"),
    (begin("mf-tt-bool", True, 1), "mf-tt-bool"),
    (begin("mf-tt-float", 10.0, 1), "mf-tt-float"),
    ({"type": "begin", "request_id": "mf-notc", "strategy_name": "S", "total_trades": 1}, "mf-notc"),
    (begin("mf-tc-0", 1, 0), "mf-tc-0"),
    (begin("mf-tc-big", 3, 4), "mf-tc-big"),
    (begin("mf-metrics", 1, 1, metrics=[1, 2]), "mf-metrics"),
    (begin("mf-sharpe", 1, 1, metrics={"sharpe": "high"}), "mf-sharpe"),
    (begin("mf-tf", 1, 1, timeframe="H1"), "mf-tf"),
    ({"type": "chunk", "request_id": "mf-noseq", "trades": rows2()}, "mf-noseq"),
    (chunk("mf-seq-str", "0", rows2()), "mf-seq-str"),
    (chunk("mf-seq-neg", -1, rows2()), "mf-seq-neg"),
    ({"type": "chunk", "request_id": "mf-notrades", "seq": 0}, "mf-notrades"),
    (chunk("mf-trades-list", 0, [[1, 1.0]]), "mf-trades-list"),
    (chunk("mf-no-ts", 0, {"pnl": [1.0]}), "mf-no-ts"),
    (chunk("mf-no-pnl", 0, {"timestamp": [1]}), "mf-no-pnl"),
    ({"type": "result", "request_id": "mf-res-tc", "strategy_name": "S", "total_trades": 2,
      "total_chunks": 2, "trades": rows2()}, "mf-res-tc"),
    ({"type": "result", "request_id": "mf-res-nopnl", "strategy_name": "S", "total_trades": 1,
      "trades": {"timestamp": [1]}}, "mf-res-nopnl"),
    ({"type": "live_trades", "trades": dict(rows2(), strategy_name=["a", "b"])}, None),
    ({"type": "live_trades", "batch_id": "mf-live-noname", "trades": rows2()}, "mf-live-noname"),
    # bad request_ids
    ({"type": "end"}, None),
    ({"type": "end", "request_id": 42}, None),
    ({"type": "end", "request_id": None}, None),
    ({"type": "end", "request_id": b"bytes-id"}, None),
]
BAD_IDS = ["", "has space", "semi;colon", "x" * 129, "naïve", "slash/id"]


def test_malformed(shared, dealer):
    for msg, rid in MALFORMED:
        reply = dealer.rt(msg)
        check_error(reply, "malformed", rid)
    for bad in BAD_IDS:
        reply = dealer.rt(begin(bad, 1, 1))
        assert reply["code"] == "malformed", (bad, reply)
        # the id is echoed (cut to 128 chars) or null; never anything else
        check_error(reply, "malformed", reply["request_id"])
        assert reply["request_id"] in (None, bad[:128])
    # multi-frame messages
    check_error(dealer.rt([pack(begin("mf-multi", 1, 1)), b"x"]), "malformed", None)
    check_error(dealer.rt([pack(begin("mf-multi2", 1, 1)), pack(begin("mf-multi2", 1, 1))]), "malformed", None)
    # nothing of it reached the database
    with contextlib.closing(db(shared)) as c:
        assert c.execute("SELECT count(*) FROM backtest_results WHERE request_id LIKE 'mf-%'").fetchone()[0] == 0


def test_unknown_request(shared, dealer):
    check_error(dealer.rt(chunk("ur-never", 0, rows2())), "unknown_request", "ur-never")
    check_error(dealer.rt({"type": "end", "request_id": "ur-never"}), "unknown_request", "ur-never")
    # unknown_request comes before bad_chunk
    check_error(dealer.rt(chunk("ur-never", 0, {"timestamp": [1], "pnl": [math.nan]})),
                "unknown_request", "ur-never")
    check_error(dealer.rt(chunk("ur-never", 99, {"timestamp": [1, 2], "pnl": [1.0]})),
                "unknown_request", "ur-never")
    assert result_row(shared, "ur-never") is None


def test_bad_chunk(shared, dealer):
    rid = "bc-1"
    assert dealer.rt(begin(rid, 10, 5))["credit"] == 5
    bad = [
        chunk(rid, 5, rows2()),                                            # seq out of range
        chunk(rid, 1_000_000, rows2()),
        chunk(rid, 0, {"timestamp": [1, 2], "pnl": [1.0]}),                 # unequal lengths
        chunk(rid, 0, {"timestamp": [1, 2], "pnl": [1.0, 2.0], "symbol": ["A"]}),
        chunk(rid, 0, {"timestamp": i64(1, 2), "pnl": f64(1.0)}),
        chunk(rid, 0, dict(rows2(), colour=["red", "blue"])),               # unknown column
        chunk(rid, 0, {"timestamp": [1], "pnl": b"\0" * 7}),                # bin not a multiple of 8
        chunk(rid, 0, {"timestamp": b"\0" * 12, "pnl": f64(1.0)}),
        chunk(rid, 0, {"timestamp": [1, 2], "pnl": [1.0, math.nan]}),       # NaN
        chunk(rid, 0, {"timestamp": [1, 2], "pnl": f64(1.0, math.nan)}),
        chunk(rid, 0, {"timestamp": [1, 2], "pnl": [math.inf, 1.0]}),       # infinity
        chunk(rid, 0, dict(rows2(), exit_price=f64(1.0, -math.inf))),
        chunk(rid, 0, dict(rows2(), sl=[None, math.inf])),
        chunk(rid, 0, {"timestamp": [1, 2], "pnl": [True, 1.0]}),           # booleans are not numbers
        chunk(rid, 0, {"timestamp": [1.5, 2], "pnl": [1.0, 1.0]}),          # timestamp must be int
        chunk(rid, 0, {"timestamp": [1, None], "pnl": [1.0, 1.0]}),         # timestamp is required
        chunk(rid, 0, dict(rows2(), symbol=[1, 2])),
    ]
    for msg in bad:
        check_error(dealer.rt(msg), "bad_chunk", rid)
    # a result with bad columns is answered at once
    check_error(dealer.rt({"type": "result", "request_id": "bc-res", "strategy_name": "S", "total_trades": 1,
                           "trades": {"timestamp": [1], "pnl": [math.nan]}}), "bad_chunk", "bc-res")
    # the rejected chunks stored nothing and the request goes on normally
    assert rows_for(shared, rid) == 0
    send_chunks(dealer, rid, {s: rows2(100 * s) for s in range(5)})
    r = dealer.rt({"type": "end", "request_id": rid})
    assert r["type"] == "stored" and r["trades"] == 10
    assert rows_for(shared, rid) == 10 and result_row(shared, "bc-res") is None


def test_conflict(shared, dealer):
    rid = "cf-1"
    assert dealer.rt(begin(rid, 4, 2))["type"] == "credit"
    for other in (begin(rid, 5, 2), begin(rid, 4, 1), begin(rid, 4, 2, name="T")):
        check_error(dealer.rt(other), "conflict", rid)
    # the same begin again is a resend: the full window
    assert dealer.rt(begin(rid, 4, 2)) == {"type": "credit", "request_id": rid, "credit": 2}
    # a result while the request is in progress; conflict is checked before incomplete
    check_error(dealer.rt({"type": "result", "request_id": rid, "strategy_name": "S", "total_trades": 2,
                           "trades": rows2()}), "conflict", rid)
    check_error(dealer.rt({"type": "result", "request_id": rid, "strategy_name": "S", "total_trades": 3,
                           "trades": rows2()}), "conflict", rid)
    send_chunks(dealer, rid, {0: rows2(), 1: rows2(1000)})
    assert dealer.rt({"type": "end", "request_id": rid})["type"] == "stored"
    # stored: other totals conflict, the same begin gets `stored` at once
    check_error(dealer.rt(begin(rid, 6, 2)), "conflict", rid)
    check_error(dealer.rt({"type": "result", "request_id": rid, "strategy_name": "S", "total_trades": 2,
                           "trades": rows2()}), "conflict", rid)
    check_error(dealer.rt({"type": "result", "request_id": rid, "strategy_name": "S", "total_trades": 3,
                           "trades": rows2()}), "conflict", rid)
    assert dealer.rt(begin(rid, 4, 2))["type"] == "stored"
    assert rows_for(shared, rid) == 4


def test_incomplete(shared, dealer):
    # end with a seq missing: incomplete with the missing list, not final
    rid = "inc-1"
    assert dealer.rt(begin(rid, 6, 3))["credit"] == 3
    send_chunks(dealer, rid, {0: rows2(), 2: rows2(2000)})
    r = check_error(dealer.rt({"type": "end", "request_id": rid}), "incomplete", rid)
    assert r["missing"] == [1]
    send_chunks(dealer, rid, {1: rows2(1000)})
    r = dealer.rt({"type": "end", "request_id": rid})
    assert r == {"type": "stored", "request_id": rid, "trades": 6, "trades_ref": rid, "location": "db"}
    assert rows_for(shared, rid) == 6

    # end while chunks are still being written: the reply waits until they are durable
    rid = "inc-wait"
    assert dealer.rt(begin(rid, 6, 3))["credit"] == 3
    for s in range(3):
        dealer.send(chunk(rid, s, rows2(1000 * s)))
    dealer.send({"type": "end", "request_id": rid})
    replies = []
    while not replies or replies[-1]["type"] == "credit":
        r = dealer.recv(10)
        assert r is not None, replies
        replies.append(r)
        if r["type"] == "stored":
            assert rows_for(shared, rid) == 6
    assert [r["type"] for r in replies] == ["credit"] * 3 + ["stored"], replies

    # at most 1000 missing seqs are listed
    rid = "inc-many"
    assert dealer.rt(begin(rid, 3000, 3000))["credit"] == 8
    r = check_error(dealer.rt({"type": "end", "request_id": rid}), "incomplete", rid)
    assert r["missing"] == list(range(1000))
    assert dealer.rt({"type": "abort", "request_id": rid})["type"] == "aborted"
    # ... cheaply, even for the largest total_chunks allowed (the assembler must stay responsive)
    rid = "inc-huge"
    assert dealer.rt(begin(rid, 50_000_000, 50_000_000))["credit"] == 8
    for _ in range(5):
        r = check_error(dealer.rt({"type": "end", "request_id": rid}, timeout=5), "incomplete", rid)
        assert len(r["missing"]) == 1000 and "50000000" in r["message"]
    assert dealer.rt({"type": "abort", "request_id": rid})["type"] == "aborted"
    assert shared.actor("assembler")["restarts"] == 0

    # a result whose rows differ from total_trades
    check_error(dealer.rt({"type": "result", "request_id": "inc-res", "strategy_name": "S", "total_trades": 5,
                           "trades": rows2()}), "incomplete", "inc-res")
    assert rows_for(shared, "inc-res") == 0
    row = result_row(shared, "inc-res")
    assert row is None or row["status"] != "complete"
    # ... also when the request_id is stored with the same totals: nothing changes
    res = {"type": "result", "request_id": "inc-res2", "strategy_name": "S", "total_trades": 2, "trades": rows2()}
    assert dealer.rt(res)["type"] == "stored"
    check_error(dealer.rt(dict(res, trades={"timestamp": [1], "pnl": [1.0]})), "incomplete", "inc-res2")
    assert rows_for(shared, "inc-res2") == 2 and result_row(shared, "inc-res2")["status"] == "complete"

    # chunks all durable but the rows do not add up: failed, rows removed, end -> incomplete
    rid = "inc-sum"
    assert dealer.rt(begin(rid, 10, 2))["credit"] == 2
    send_chunks(dealer, rid, {0: rows2(), 1: rows2(1000)})
    check_error(dealer.rt({"type": "end", "request_id": rid}), "incomplete", rid)
    assert wait_status(shared, rid)["status"] == "failed"
    assert rows_for(shared, rid) == 0


def test_replies_keep_their_order_under_load(shared):
    """Thespian may swap two messages between the same two actors; pairlane must not let that
    show. Many producers pipeline chunks and `end` without waiting: each must see every credit
    before its `stored`, and nothing for that request after it."""
    producers, rounds, chunks = 6, 25, 4
    failures: list = []

    def run(p: int) -> None:
        with Dealer(shared.gateway_endpoint) as dl:
            for i in range(rounds):
                rid = f"order-{p}-{i}"
                r = dl.rt(begin(rid, 2 * chunks, chunks))
                if r.get("credit") != chunks:
                    failures.append((rid, "begin", r))
                    return
                for s in range(chunks):
                    dl.send(chunk(rid, s, rows2(1000 * s)))
                dl.send({"type": "end", "request_id": rid})
                replies = []
                while not replies or replies[-1]["type"] == "credit":
                    r = dl.recv(10)
                    if r is None:
                        failures.append((rid, "no reply", replies))
                        return
                    replies.append(r)
                seqs = sorted(r["seq"] for r in replies[:-1])
                if replies[-1]["type"] != "stored" or seqs != list(range(chunks)):
                    failures.append((rid, "order", replies))
                    return
            stray = dl.drain(0.3)
            if stray:
                failures.append((f"order-{p}", "after stored", stray))

    threads = [threading.Thread(target=run, args=(p,)) for p in range(producers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures[:3]
    assert all(rows_for(shared, f"order-{p}-{i}") == 2 * chunks for p in range(producers) for i in range(rounds))
    for name in ("gateway", "assembler", "writer"):
        delivery = inspect(shared, name)["delivery"]
        print(f"{name}: {delivery}")
        assert delivery["held"] == 0 and delivery.get("gaps_skipped", 0) == 0, (name, delivery)


def test_busy_over_max_requests(small):
    with Dealer(small.gateway_endpoint) as dl:
        try:
            assert dl.rt(begin("bz-1", 2, 1))["type"] == "credit"
            assert dl.rt(begin("bz-2", 2, 1))["type"] == "credit"
            check_error(dl.rt(begin("bz-3", 2, 1)), "busy", "bz-3")
            check_error(dl.rt({"type": "result", "request_id": "bz-res", "strategy_name": "S",
                               "total_trades": 2, "trades": rows2()}), "busy", "bz-res")
            # a request in progress may still resend its begin
            assert dl.rt(begin("bz-1", 2, 1)) == {"type": "credit", "request_id": "bz-1", "credit": 1}
            # busy is retryable: once a slot frees, the same begin is accepted
            assert dl.rt({"type": "abort", "request_id": "bz-1"}) == {"type": "aborted", "request_id": "bz-1"}
            assert dl.rt(begin("bz-3", 2, 1))["type"] == "credit"
            send_chunks(dl, "bz-3", {0: rows2()})
            assert dl.rt({"type": "end", "request_id": "bz-3"})["type"] == "stored"
            assert rows_for(small, "bz-3") == 2
        finally:
            for rid in ("bz-1", "bz-2"):
                dl.send({"type": "abort", "request_id": rid})
            dl.drain(0.5)


def test_unavailable_when_database_and_spool_are_full(make_daemon):
    # room for the schema but not for a chunk; a spool that takes nothing
    d = make_daemon({"store": {"max_bytes": 160 * 1024}, "dlq": {"max_bytes": 1}})
    cols = synthetic_columns(8000, seed=4)
    with Dealer(d.gateway_endpoint) as dl:
        r = dl.rt(begin("un-1", 8000, 1))
        assert r["type"] == "credit"
        check_error(dl.rt(encode_chunk("un-1", 0, cols, 0, 8000)), "unavailable", "un-1")
        live = {"timestamp": cols["timestamp"].tobytes(), "pnl": cols["pnl"].tobytes(),
                "strategy_name": ["LiveUn"] * 8000, "symbol": cols["symbol"]}
        check_error(dl.rt({"type": "live_trades", "batch_id": "un-live", "trades": live}), "unavailable", "un-live")
    assert rows_for(d, "un-1") == 0
    assert inspect(d, "dlq")["depth"] == 0
    assert_all_running(d)


# ----- idempotence, abort, live trades ---------------------------------------------------------------
@on_both_stores
def test_end_of_a_just_stored_result_is_answered_by_the_gateway_alone(shared, dealer):
    """A result's last credit carries the news that it is stored; the `end` that follows is answered
    by the gateway (one ZMQ round trip, no actor hop) with exactly the assembler's `stored`, and the
    assembler never sees it. An `end` the gateway knows nothing of still goes through, and so does
    one sent while another message of that request is still at the assembler (its answer first)."""
    rid = f"end-here-{time.monotonic_ns()}"
    before_gw = inspect(shared, "gateway")["ends_answered_here"]
    before_asm = inspect(shared, "assembler").get("in_end", 0)
    assert dealer.rt(begin(rid, 4, 2))["type"] == "credit"
    send_chunks(dealer, rid, {0: rows2(), 1: rows2(100)})
    stored = {"type": "stored", "request_id": rid, "trades": 4, "trades_ref": rid, "location": "db"}
    assert dealer.rt({"type": "end", "request_id": rid}) == stored
    assert inspect(shared, "gateway")["ends_answered_here"] == before_gw + 1
    assert inspect(shared, "assembler").get("in_end", 0) == before_asm
    assert rows_for(shared, rid) == 4 and result_row(shared, rid)["status"] == "complete"
    # a duplicate chunk goes to the assembler (credit at once, it is durable); the `end` right behind
    # it must not overtake that credit: it goes to the assembler too, and the replies keep their order
    dealer.send(chunk(rid, 1, rows2(100)))
    dealer.send({"type": "end", "request_id": rid})
    assert [dealer.recv(10)["type"], dealer.recv(10)["type"]] == ["credit", "stored"]
    assert inspect(shared, "gateway")["ends_answered_here"] == before_gw + 1
    assert inspect(shared, "assembler").get("in_end", 0) == before_asm + 1
    before_asm += 1
    never = f"end-never-{time.monotonic_ns()}"
    check_error(dealer.rt({"type": "end", "request_id": never}), "unknown_request", never)
    assert inspect(shared, "assembler").get("in_end", 0) == before_asm + 1


@on_both_stores
def test_chunks_waiting_together_share_one_commit_and_each_credit_still_follows_it(shared, dealer):
    """Group commit: chunks that reach the writer in one batch are committed in one transaction.
    A window of small chunks sent at once makes such batches; every credit still arrives only once
    its chunk's rows are visible to another connection, and the rows are exactly the ones sent."""
    rid, nchunks, per = f"grouped-{time.monotonic_ns()}", 48, 10
    before = inspect(shared, "writer")
    r = dealer.rt(begin(rid, nchunks * per, nchunks))
    window, pending, unacked = r["credit"], list(range(nchunks)), set()
    conn = db(shared)
    try:
        while pending or unacked:
            while pending and len(unacked) < window:
                seq = pending.pop(0)
                base = seq * per
                dealer.send(chunk(rid, seq, {"timestamp": list(range(base, base + per)),
                                             "pnl": [float(seq)] * per}))
                unacked.add(seq)
            r = dealer.recv(20)
            assert r is not None and r["type"] == "credit", r
            unacked.discard(r["seq"])
            got = conn.execute("SELECT count(*) FROM backtest_trade_logs WHERE request_id = ? AND seq = ?",
                               (rid, r["seq"])).fetchone()[0]
            assert got == per, f"credit for seq {r['seq']} before its rows were committed ({got})"
        assert dealer.rt({"type": "end", "request_id": rid})["type"] == "stored"
        assert conn.execute("SELECT count(*), count(DISTINCT timestamp), sum(pnl) FROM backtest_trade_logs "
                            "WHERE request_id = ?", (rid,)).fetchone() == \
            (nchunks * per, nchunks * per, float(sum(range(nchunks)) * per))
    finally:
        conn.close()
    after = inspect(shared, "writer")
    grouped = after["grouped_chunks"] - before["grouped_chunks"]
    groups = after["group_commits"] - before["group_commits"]
    assert groups >= 1 and grouped >= 2 * groups, (before, after)
    # fewer commits than chunks (begin and the periodic stale sweeps commit too): grouped ones shared
    assert after["commits"] - before["commits"] < nchunks, (before, after)
    assert after["group_failures"] == before["group_failures"]


@on_both_stores
def test_small_results_pass_a_big_chunk_waiting_at_the_writer(shared, dealer):
    """Two big chunks at the writer at once (one written, the next waiting), and small work sent
    meanwhile goes before the waiting one (Writer.lane_pick): the writer counts each time, and
    every row of both kinds lands exactly once."""
    rid, n = f"deck-{time.monotonic_ns()}", 60_000
    cols = synthetic_columns(n, seed=11)
    cols = {"timestamp": cols["timestamp"], "pnl": cols["pnl"]}      # 12 chunks of 5,000 rows: big
    before = inspect(shared, "writer")
    out: dict = {}

    def big_result():
        try:
            with Producer(shared.gateway_endpoint, timeout_s=60, max_chunk_rows=5000) as p:
                out["reply"] = p.send_result(rid, "S", cols)
        except BaseException as exc:   # seen by the assertion below
            out["reply"] = exc

    t = threading.Thread(target=big_result)
    t.start()
    small = []
    while t.is_alive() or not small:
        sid = f"{rid}-small-{len(small)}"
        r = dealer.rt({"type": "result", "request_id": sid, "strategy_name": "S", "total_trades": 2,
                       "trades": rows2(len(small))})
        assert r["type"] == "stored", r
        small.append(sid)
    t.join()
    assert isinstance(out["reply"], dict) and out["reply"]["type"] == "stored", out
    assert rows_for(shared, rid) == n and duplicate_groups(shared, rid) == 0
    assert all(rows_for(shared, sid) == 2 for sid in small)
    after = inspect(shared, "writer")
    assert after["passed_big_chunks"] > before["passed_big_chunks"], (len(small), before, after)


@on_both_stores
def test_resend_after_stored_is_idempotent(shared):
    rid, n = "rs-after", 30_000
    cols = synthetic_columns(n, seed=5, strategy="Rs")
    with Producer(shared.gateway_endpoint, timeout_s=10) as p:
        first = p.send_result(rid, "Rs", cols)
        again = p.send_result(rid, "Rs", cols)
        assert first == again == {"type": "stored", "request_id": rid, "trades": n, "trades_ref": rid,
                                  "location": "db"}
        with pytest.raises(SendError) as ei:
            p.send_result(rid, "Other", cols)
        assert ei.value.code == "conflict"
    # every chunk resent by hand after `stored` earns a credit and stores nothing
    ranges = plan_chunks(cols, MAX_MSG)
    with Dealer(shared.gateway_endpoint) as dl:
        assert dl.rt(begin(rid, n, len(ranges), "Rs"))["type"] == "stored"
        for seq, (a, b) in enumerate(ranges):
            r = dl.rt(encode_chunk(rid, seq, cols, a, b))
            assert r["type"] == "credit" and r["seq"] == seq, r
        assert dl.rt({"type": "end", "request_id": rid})["type"] == "stored"
    assert rows_for(shared, rid) == n
    assert duplicate_groups(shared, rid) == 0


@on_both_stores
def test_resend_mid_transfer_is_idempotent(shared):
    rid, n = "rs-mid", 60_000
    cols = synthetic_columns(n, seed=6, strategy="RsMid")
    ranges = plan_chunks(cols, MAX_MSG)
    assert len(ranges) >= 5
    with Dealer(shared.gateway_endpoint) as dl:
        assert dl.rt(begin(rid, n, len(ranges), "RsMid"))["type"] == "credit"
        frames = [encode_chunk(rid, s, cols, a, b) for s, (a, b) in enumerate(ranges[:3])]
        for f in frames:
            dl.send(f)
        for f in frames:           # duplicates while in flight: dropped silently or credited
            dl.send(f)
        seen = set()
        deadline = time.monotonic() + 20
        while seen != {0, 1, 2} and time.monotonic() < deadline:
            r = dl.recv(5)
            assert r is not None and r["type"] == "credit", r
            seen.add(r["seq"])
        assert seen == {0, 1, 2}
        dl.drain(0.3)
    # the producer "crashes" and starts over from scratch with the same request_id
    with Producer(shared.gateway_endpoint, timeout_s=10) as p:
        r = p.send_result(rid, "RsMid", cols)
    assert r["type"] == "stored" and r["trades"] == n
    assert rows_for(shared, rid) == n
    assert duplicate_groups(shared, rid) == 0
    # one-message results resent: one copy
    res = {"type": "result", "request_id": "rs-res", "strategy_name": "S", "total_trades": 2, "trades": rows2()}
    with Dealer(shared.gateway_endpoint) as dl:
        assert dl.rt(res)["type"] == "stored"
        assert dl.rt(res)["type"] == "stored"
    assert rows_for(shared, "rs-res") == 2
    # ... also resent while the first copy is still being written: a duplicate, never a conflict
    m = 10_000
    cols = synthetic_columns(m, seed=9, strategy="RsRes")
    frame = pack({"type": "result", "request_id": "rs-res-big", "strategy_name": "RsRes", "total_trades": m,
                  "trades": {k: (v.tobytes() if isinstance(v, np.ndarray) else v) for k, v in cols.items()}})
    assert len(frame) <= MAX_MSG
    with Dealer(shared.gateway_endpoint) as dl:
        dl.send(frame)
        dl.send(frame)
        replies = [dl.recv(10)] + dl.drain(1.0)
    assert replies[0] is not None
    assert all(r["type"] == "stored" and r["trades"] == m for r in replies), replies
    assert rows_for(shared, "rs-res-big") == m and duplicate_groups(shared, "rs-res-big") == 0


@on_both_stores
def test_abort_drops_request(shared, dealer):
    rid = "ab-1"
    assert dealer.rt(begin(rid, 8, 4))["type"] == "credit"
    send_chunks(dealer, rid, {0: rows2(), 1: rows2(1000), 2: rows2(2000)})
    assert rows_for(shared, rid) == 6
    assert result_row(shared, rid)["status"] == "receiving"
    assert dealer.rt({"type": "abort", "request_id": rid}) == {"type": "aborted", "request_id": rid}
    row = wait_status(shared, rid, ("abandoned",), timeout=10)
    assert rows_for(shared, rid) == 0
    check_error(dealer.rt(chunk(rid, 3, rows2(3000))), "unknown_request", rid)
    check_error(dealer.rt({"type": "end", "request_id": rid}), "unknown_request", rid)
    time.sleep(0.3)
    assert result_row(shared, rid)["status"] == "abandoned" and rows_for(shared, rid) == 0
    assert row["completed_at"] is None
    res = shared.admin("result", {"request_id": rid})
    assert res["ok"] and res["result"]["status"] == "abandoned" and res["result"]["rows_stored"] == 0
    # abort drops only unfinished requests: a stored result is refused and stays stored
    res = {"type": "result", "request_id": "ab-stored", "strategy_name": "S", "total_trades": 2, "trades": rows2()}
    assert dealer.rt(res)["type"] == "stored"
    check_error(dealer.rt({"type": "abort", "request_id": "ab-stored"}), "conflict", "ab-stored")
    assert result_row(shared, "ab-stored")["status"] == "complete" and rows_for(shared, "ab-stored") == 2


@pytest.mark.parametrize("then", ["abort", "begin"])
def test_a_message_right_after_a_one_message_results_stored_sees_it_stored(shared, dealer, then):
    """The writer tells the producer `stored` itself; a message sent at once can reach the assembler
    before the writer's own answer does (they come from two actors). An abort must still be refused
    (it once answered `aborted` here, while the result stayed stored) and a begin must get `stored`,
    not a resume credit. Another producer keeps the assembler sending to the writer meanwhile, which
    is when the writer's answer is most often late."""
    stop = threading.Event()

    def traffic():
        cols = synthetic_columns(2000, seed=11, strategy="AbT")
        with Producer(shared.gateway_endpoint, timeout_s=30, max_chunk_rows=50) as p:
            k = 0
            while not stop.is_set():
                p.send_result(f"ab-traffic-{then}-{k}", "AbT", cols)
                k += 1

    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    try:
        for i in range(40):
            rid = f"ab-race-{then}-{i}"
            res = {"type": "result", "request_id": rid, "strategy_name": "S", "total_trades": 2,
                   "trades": rows2()}
            assert dealer.rt(res)["type"] == "stored"
            if then == "abort":
                check_error(dealer.rt({"type": "abort", "request_id": rid}), "conflict", rid)
            else:
                again = dealer.rt({"type": "begin", "request_id": rid, "strategy_name": "S", "total_trades": 2,
                                   "total_chunks": 1})
                assert again["type"] == "stored" and again["request_id"] == rid, again
    finally:
        stop.set()
        t.join(60)
    for i in range(40):
        rid = f"ab-race-{then}-{i}"
        assert result_row(shared, rid)["status"] == "complete" and rows_for(shared, rid) == 2


@on_both_stores
def test_live_trades_idempotent_by_batch_id(shared):
    n = 500
    cols = {"timestamp": np.arange(1_700_000_000, 1_700_000_000 + n, dtype="<i8"),
            "pnl": np.linspace(-1, 1, n), "strategy_name": ["LiveS"] * n,
            "pair_id": ["00112233445566ff"] * n, "execution_mode": ["paper"] * n,
            "symbol": ["USDJPY"] * n}
    with Producer(shared.gateway_endpoint, timeout_s=10) as p:
        for _ in range(2):
            r = p.send_live_trades("live-b1", cols)
            assert r["type"] == "stored" and r["request_id"] == "live-b1" and r["trades"] == n
    # twice at once, without waiting
    frame = pack({"type": "live_trades", "batch_id": "live-b2",
                  "trades": {"timestamp": [1, 2], "pnl": [0.5, 0.25], "strategy_name": ["LiveS2", "LiveS2"]}})
    with Dealer(shared.gateway_endpoint) as dl:
        dl.send(frame)
        dl.send(frame)
        replies = [dl.recv(10)] + dl.drain(0.5)
    assert replies[0] is not None
    assert replies and all(r["type"] == "stored" and r["trades"] == 2 for r in replies), replies
    with contextlib.closing(db(shared)) as c:
        assert c.execute("SELECT count(*) FROM trade_logs WHERE strategy_name = 'LiveS'").fetchone()[0] == n
        assert c.execute("SELECT count(*) FROM trade_logs WHERE strategy_name = 'LiveS2'").fetchone()[0] == 2
        assert c.execute("SELECT count(DISTINCT pair_id), sum(pnl) FROM trade_logs WHERE strategy_name = 'LiveS'"
                         ).fetchone() == (1, pytest.approx(0.0, abs=1e-9))


# ----- abandonment ------------------------------------------------------------------------------------
def test_producer_that_stops_mid_transfer_is_abandoned(small):
    rid = "ab-idle"
    with Dealer(small.gateway_endpoint) as dl:
        assert dl.rt(begin(rid, 8, 4))["type"] == "credit"
        send_chunks(dl, rid, {0: rows2(), 1: rows2(1000)})
        assert rows_for(small, rid) == 4
    t0 = time.monotonic()
    # the producer is gone; after assembly_timeout_s (2 s) the request is abandoned
    row = wait_status(small, rid, ("abandoned",), timeout=20)
    assert time.monotonic() - t0 < 15
    assert rows_for(small, rid) == 0 and row["completed_at"] is None
    res = small.admin("result", {"request_id": rid})
    assert res["ok"] and res["result"]["status"] == "abandoned" and res["result"]["rows_stored"] == 0
    assert small.admin("verify")["problems"] == []
    with Dealer(small.gateway_endpoint) as dl:
        check_error(dl.rt(chunk(rid, 2, rows2(2000))), "unknown_request", rid)
        # a producer coming back later begins again and the result is stored whole
        assert dl.rt(begin(rid, 8, 4))["type"] == "credit"
        send_chunks(dl, rid, {s: rows2(1000 * s) for s in range(4)})
        assert dl.rt({"type": "end", "request_id": rid})["type"] == "stored"
    assert rows_for(small, rid) == 8 and duplicate_groups(small, rid) == 0
    assert result_row(small, rid)["status"] == "complete"
    assert_all_running(small)


def test_one_message_results_are_answered_exactly_once(shared, dealer):
    """The writer answers a one-message result itself once it is durable; the assembler must not
    answer it again (and a resend while it is written still gets one answer)."""
    for i in range(5):
        rid = f"once-{i}"
        msg = {"type": "result", "request_id": rid, "strategy_name": "S", "total_trades": 2, "trades": rows2()}
        assert dealer.rt(msg) == {"type": "stored", "request_id": rid, "trades": 2, "trades_ref": rid,
                                  "location": "db"}
        assert rows_for(shared, rid) == 2 and result_row(shared, rid)["status"] == "complete"
    assert dealer.drain(1.0) == []
    dealer.send(msg)
    dealer.send(msg)   # stored already: each gets `stored`, from the assembler's memory
    assert [r["type"] for r in dealer.drain(2.0)] == ["stored", "stored"]
    assert rows_for(shared, rid) == 2


def test_lookups_read_locally_between_sweeps(small):
    """assembly_timeout_s = 2 sweeps every second; the writer confirms each sweep, so a `begin`'s
    lookup is read by the assembler itself, not queued at the writer (it used to stay pending).
    A one-message result needs no lookup at all on SQLite: its write checks (checked writes).
    A request kept open meanwhile keeps the direct path closed (its lookups go through the writer:
    see test_new_results_go_straight_to_the_writer_while_nothing_is_in_progress)."""
    from pairlane.lifecycle import LOCAL_LOOKUP_GRACE_S
    wait_until(lambda: inspect(small, "assembler")["uptime_s"] > LOCAL_LOOKUP_GRACE_S + 2.5, timeout=30,
               what="the assembler's start grace and two sweeps")
    with Dealer(small.gateway_endpoint) as dl:
        holder = {"type": "begin", "request_id": f"lk-hold-{time.time()}", "strategy_name": "S",
                  "total_trades": 4, "total_chunks": 2}
        assert dl.rt(holder)["type"] == "credit"
        before = inspect(small, "assembler")
        for i in range(6):
            assert dl.rt(holder)["type"] == "credit"   # resumed: in progress, never idle 2 s
            rid = f"lk-{before['uptime_s']}-{i}"
            reply = dl.rt({"type": "begin", "request_id": rid, "strategy_name": "S", "total_trades": 2,
                           "total_chunks": 1})
            assert reply["type"] == "credit", reply
            assert dl.rt({"type": "chunk", "request_id": rid, "seq": 0, "trades": rows2()})["type"] == "credit"
            assert dl.rt({"type": "end", "request_id": rid})["type"] == "stored"
            assert result_row(small, rid)["status"] == "complete" and rows_for(small, rid) == 2
            rid = f"lk-{before['uptime_s']}-r{i}"
            reply = dl.rt({"type": "result", "request_id": rid, "strategy_name": "S", "total_trades": 2,
                           "trades": rows2()})
            assert reply["type"] == "stored", reply
            assert result_row(small, rid)["status"] == "complete" and rows_for(small, rid) == 2
    after = inspect(small, "assembler")
    local = after.get("lookups_local", 0) - before.get("lookups_local", 0)
    via_writer = after.get("lookups_via_writer", 0) - before.get("lookups_via_writer", 0)
    checked = after.get("checked_writes", 0) - before.get("checked_writes", 0)
    if inspect(small, "writer")["backend"] == "sqlite":
        assert local >= 5 and local + via_writer == 6 and checked == 6, (before, after)   # one may meet a sweep
    else:   # PostgreSQL records a request in a transaction of its own: every result is looked up
        assert local >= 10 and local + via_writer == 12 and checked == 0, (before, after)


@pytest.fixture(scope="module", params=BACKENDS)
def quiet(tmp_path_factory, request):
    """A daemon of its own (default limits, both stores): the direct path needs an assembler with
    nothing in progress, which a daemon shared with other tests cannot promise."""
    with store_overrides(request, request.param) as store, \
            running_daemon(tmp_path_factory.mktemp(f"ingest-quiet-{request.param}"), store) as d:
        yield d


def test_new_results_go_straight_to_the_writer_while_nothing_is_in_progress(quiet):
    """The direct path (pairlane.lifecycle.Forwarded): once the assembler is quiet and results flow,
    new small results go gateway -> writer; each is stored once, counted in the metrics as any
    other, and a `begin` or a result under an id stored that way is answered as ever (conflict, or
    stored without writing twice). While a request is in progress, results take the usual way.
    Never on PostgreSQL."""
    sqlite = inspect(quiet, "writer")["backend"] == "sqlite"
    tag = f"dp-{time.time()}"

    def stored_db():
        return (metric(quiet, "pairlane_results_total") or {}).get("outcome=stored_db", 0.0)

    def counts():
        g, a, w = inspect(quiet, "gateway"), inspect(quiet, "assembler"), inspect(quiet, "writer")
        return (g["direct"], a.get("direct_writes", 0), w["direct_writes"], a.get("checked_writes", 0),
                a.get("completed", 0))

    def result(rid, strategy="S", base=0):
        return dl.rt({"type": "result", "request_id": rid, "strategy_name": strategy, "total_trades": 2,
                      "trades": rows2(base)})

    with Dealer(quiet.gateway_endpoint) as dl:
        assert result(f"{tag}-warm")["type"] == "stored"        # the usual way: it opens the path
        if sqlite:
            wait_until(lambda: inspect(quiet, "gateway")["direct_open"], what="the direct path open")
        else:
            time.sleep(0.5)
            assert not inspect(quiet, "gateway")["direct_open"]
        before, metric_before = counts(), stored_db()
        for i in range(20):
            reply = result(f"{tag}-{i}", base=i)
            assert reply["type"] == "stored", reply
        # the assembler hears of the last one after its producer did
        after = wait_until(lambda: (lambda c: c if c[4] - before[4] >= 20 else None)(counts()),
                           what="the assembler recording all 20")
        sent, told, wrote, checked, completed = (x - y for x, y in zip(after, before))
        assert all(rows_for(quiet, f"{tag}-{i}") == 2 for i in range(20))
        assert completed == 20                     # the lifecycle recorded each as stored...
        # ...with the metric any stored result moves (the metrics actor hears of it within its flush)
        wait_until(lambda: stored_db() - metric_before >= 20, timeout=10, what="20 more stored_db results")
        if sqlite:   # nothing disarmed it meanwhile: every one went straight
            assert sent == told == wrote == 20 and checked == 0, (before, after)
        else:
            assert sent == told == wrote == checked == 0, (before, after)
        assert inspect(quiet, "writer")["direct_refused"] == 0
        # only a legacy producer may mark a result truncated, straight or not
        wrote = inspect(quiet, "writer")["direct_writes"]
        assert dl.rt({"type": "result", "request_id": f"{tag}-t", "strategy_name": "S", "total_trades": 2,
                      "truncated": True, "trades": rows2()})["type"] == "stored"
        assert result_row(quiet, f"{tag}-t")["truncated"] == 0
        assert inspect(quiet, "writer")["direct_writes"] == wrote + sqlite
        # ids stored straight: a begin with other totals is a conflict, the same result again is
        # stored once, another result under the id is a conflict
        first = f"{tag}-19"
        begin = dl.rt({"type": "begin", "request_id": first, "strategy_name": "S", "total_trades": 4,
                       "total_chunks": 2})
        assert begin["type"] == "error" and begin["code"] == "conflict", begin
        again = result(first, base=19)
        assert again["type"] == "stored" and rows_for(quiet, first) == 2
        other = result(first, strategy="T", base=19)
        assert other["type"] == "error" and other["code"] == "conflict", other
        # a request in progress closes the path: results take the usual way meanwhile
        assert dl.rt({"type": "begin", "request_id": f"{tag}-open", "strategy_name": "S", "total_trades": 2,
                      "total_chunks": 1})["type"] == "credit"
        mid = counts()
        for i in range(5):
            assert result(f"{tag}-u{i}", base=i)["type"] == "stored"
        end = counts()
        assert end[2] == mid[2] and end[0] == mid[0]   # none straight
        if sqlite:
            assert end[3] - mid[3] == 5                 # checked writes, as before the path existed
        assert dl.rt({"type": "abort", "request_id": f"{tag}-open"})["type"] == "aborted"


def test_one_message_results_the_store_already_holds_are_answered_from_it(small):
    """Results the daemon has no memory of (stored before it started, say) but the store holds: the
    same one again is `stored`, another under its id `conflict`, one left `receiving` is resumed;
    nothing is written twice. On SQLite this is the checked write's other way (WriteSkipped)."""
    now = time.time()
    with contextlib.closing(db(small)) as c:
        for rid, status in (("held-done", "complete"), ("held-open", "receiving")):
            c.execute("INSERT INTO backtest_results(request_id, strategy_name, status, total_trades, total_chunks, "
                      "truncated, source, received_at, updated_at) VALUES (?, 'S', ?, 2, 1, 0, 'zmq', ?, ?)",
                      (rid, status, now, now))
        c.execute("INSERT INTO backtest_chunks(request_id, seq, rows, committed_at) VALUES ('held-done', 0, 2, ?)",
                  (now,))
    before = inspect(small, "assembler")
    with Dealer(small.gateway_endpoint) as dl:
        def result(rid, total=2, name="S"):
            return dl.rt({"type": "result", "request_id": rid, "strategy_name": name, "total_trades": total,
                          "trades": rows2() if total == 2 else {"timestamp": [1, 2, 3], "pnl": [1.0, 2.0, 3.0]}})
        assert result("held-done")["type"] == "stored"
        assert result("held-done", name="T")["code"] == "conflict"
        assert result("held-done", total=3)["code"] == "conflict"
        assert result("held-open")["type"] == "stored"
    assert rows_for(small, "held-done") == 0 and rows_for(small, "held-open") == 2   # none written twice
    assert result_row(small, "held-open")["status"] == "complete"
    after = inspect(small, "assembler")
    if inspect(small, "writer")["backend"] == "sqlite":
        assert after["checked_writes_skipped"] - before.get("checked_writes_skipped", 0) >= 2, (before, after)
    gw = inspect(small, "gateway")
    assert gw["chunks_in_flight"] == 0 and gw["bytes_in_flight"] == 0, gw   # every frame released


# ----- crashes mid-transfer -----------------------------------------------------------------------------
@pytest.mark.timeout(240)
@pytest.mark.parametrize("victim", ["assembler", "writer"])
@pytest.mark.parametrize("backend_store", BACKENDS, indirect=True)
def test_kill_9_mid_transfer_producer_retry_completes(backend_store, make_daemon, victim):
    d = make_daemon(backend_store)
    rid, n = f"kill-{victim}", 200_000
    cols = synthetic_columns(n, seed=7, strategy="Kill")
    started = threading.Event()
    out: dict = {}

    def progress(acked, total):
        if acked >= 30_000:
            started.set()

    def produce():
        try:
            with Producer(d.gateway_endpoint, timeout_s=3, retries=15) as p:
                try:
                    out["reply"] = p.send_result(rid, "Kill", cols, progress=progress)
                finally:
                    out["stats"] = p.last_stats
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            out["error"] = exc
        finally:
            started.set()

    before = d.actor(victim)
    t = threading.Thread(target=produce, daemon=True)
    t.start()
    assert started.wait(60), "no progress before the kill"
    assert "error" not in out and "reply" not in out, out
    os.kill(before["pid"], signal.SIGKILL)
    after = d.wait_running(victim, restarts=1, timeout=30)
    assert after["pid"] != before["pid"]
    t.join(180)
    assert not t.is_alive(), "producer did not finish"
    assert "error" not in out, f"{out.get('error')!r} stats={out.get('stats')}\n{d.log()[-3000:]}"
    assert out["reply"]["type"] == "stored" and out["reply"]["trades"] == n
    assert rows_for(d, rid) == n
    assert duplicate_groups(d, rid) == 0
    row = wait_status(d, rid, ("complete",), timeout=30)
    assert row["total_trades"] == n
    with contextlib.closing(db(d)) as c:
        s = c.execute("SELECT sum(pnl) FROM backtest_trade_logs WHERE request_id = ?", (rid,)).fetchone()[0]
    assert s == pytest.approx(float(np.sum(cols["pnl"])), rel=1e-9, abs=1e-6)
    assert d.admin("verify")["problems"] == []
    # a restarted assembler has forgotten the result, yet abort must not touch it: it is stored
    assert d.admin("restart", {"actor": "assembler"})["ok"]
    d.wait_running("assembler", restarts=after["restarts"] + 1 if victim == "assembler" else 1)
    with Dealer(d.gateway_endpoint) as dl:
        def abort_reply():
            # `admin inspect` can show the new assembler RUNNING a moment before the gateway has its
            # address; until then the gateway answers `unavailable`, which a producer retries
            dl.send({"type": "abort", "request_id": rid})
            r = dl.recv(1.0)
            return None if r is not None and r.get("code") in RETRYABLE else r
        r = d.wait_for(abort_reply, 20, what="an answer to abort after the assembler restart")
        check_error(r, "conflict", rid)
    assert rows_for(d, rid) == n and result_row(d, rid)["status"] == "complete"
    print(f"kill {victim}: producer stats {out['stats']}")


def test_dense_chunk_is_refused_too_large_and_the_writer_lives(make_daemon):
    """The narrowest rows a 1 MiB chunk can hold (timestamp and pnl as 1-byte msgpack ints) would keep
    the writer busy for seconds: over gateway.max_chunk_rows they get `too_large`; the writer is never
    killed for them, and the same rows split into chunks of at most max_chunk_rows are stored."""
    d = make_daemon()
    n = 520_000
    frame = pack(chunk("dense", 0, {"timestamp": [1] * n, "pnl": [0] * n}))
    assert len(frame) <= MAX_MSG
    with Dealer(d.gateway_endpoint) as dl:
        assert dl.rt(begin("dense", n, 1))["type"] == "credit"
        check_error(dl.rt(frame), "too_large", "dense")
        assert dl.rt({"type": "abort", "request_id": "dense"})["type"] == "aborted"
    assert d.actor("writer")["restarts"] == 0
    from pairlane.client import Producer
    with Producer(d.gateway_endpoint, timeout_s=30) as p:
        reply = p.send_result("dense2", "S", {"timestamp": list(range(100_000)), "pnl": [0.0] * 100_000})
    assert reply["type"] == "stored" and reply["trades"] == 100_000
    assert d.actor("writer")["restarts"] == 0
    assert_all_running(d)


# ----- admin views --------------------------------------------------------------------------------------
@on_both_stores
def test_admin_result_verify_inspect(shared, dealer):
    rid = "adm-1"
    assert dealer.rt(begin(rid, 6, 3, "Adm"))["type"] == "credit"
    send_chunks(dealer, rid, {0: rows2(), 1: rows2(1000)})
    r = shared.admin("result", {"request_id": rid})
    assert r["ok"], r
    res = r["result"]
    assert (res["status"], res["total_trades"], res["total_chunks"], res["chunks_durable"], res["rows_stored"]) \
        == ("receiving", 6, 3, 2, 4)
    asm = inspect(shared, "assembler")
    assert asm["requests_in_flight"] >= 1 and asm["receiving"] >= 1
    assert asm["chunks_in_flight"] >= 0 and asm["rows_in_flight"] >= 0 and asm["begun"] >= 1
    send_chunks(dealer, rid, {2: rows2(2000)})
    assert dealer.rt({"type": "end", "request_id": rid})["type"] == "stored"
    res = shared.admin("result", {"request_id": rid})["result"]
    assert (res["status"], res["chunks_durable"], res["rows_stored"], res["strategy_name"]) == \
        ("complete", 3, 6, "Adm")
    assert res["completed_at"] >= res["received_at"] > 0
    missing = shared.admin("result", {"request_id": "adm-none"})
    assert missing["ok"] is False and "adm-none" in missing["error"]
    assert shared.admin("result", {})["ok"] is False

    # gateway counts what it received and rejected
    g0 = inspect(shared, "gateway")
    for _ in range(3):
        check_error(dealer.rt(b"\xc1"), "malformed", None)
    g1 = inspect(shared, "gateway")
    assert g1["messages"] - g0["messages"] == 3 and g1["errors"] - g0["errors"] == 3
    assert g1["bytes"] - g0["bytes"] == 3
    assert g1["requests_in_flight"] >= 0 and g1["bytes_in_flight"] >= 0
    w = inspect(shared, "writer")
    assert w["rows_written"] >= 6 and w["commits"] >= 3 and w["db_bytes"]["main"] > 0
    leg = inspect(shared, "legacy")
    assert "parsing" in leg

    # verify: clean, then finds each kind of problem planted behind the daemon's back
    assert shared.admin("verify") == {"ok": True, "problems": []}
    now = time.time()
    with contextlib.closing(db(shared)) as c:
        c.execute("INSERT INTO backtest_trade_logs(request_id, strategy_name, seq, timestamp, pnl) "
                  "VALUES ('adm-orphan', 'X', 0, 1, 1.0)")
        c.execute("INSERT INTO backtest_results(request_id, strategy_name, status, total_trades, received_at, "
                  "updated_at, completed_at) VALUES ('adm-short', 'X', 'complete', 5, ?, ?, ?)", (now, now, now))
        c.execute("INSERT INTO backtest_results(request_id, strategy_name, status, total_trades, received_at, "
                  "updated_at) VALUES ('adm-stale', 'X', 'receiving', 5, ?, ?)", (now - 3600, now - 3600))
    try:
        problems = shared.admin("verify")["problems"]
        kinds = {(p["request_id"], p["kind"]) for p in problems}
        assert ("adm-orphan", "orphan_rows") in kinds, problems
        assert ("adm-short", "row_count") in kinds, problems
        stale = [p for p in problems if p["request_id"] == "adm-stale"]
        # unless the assembler's sweep abandoned it in between (also correct)
        assert stale or result_row(shared, "adm-stale")["status"] == "abandoned", problems
        assert all(isinstance(p.get("detail"), str) for p in problems)
    finally:
        with contextlib.closing(db(shared)) as c:
            c.execute("DELETE FROM backtest_trade_logs WHERE request_id = 'adm-orphan'")
            c.execute("DELETE FROM backtest_results WHERE request_id IN ('adm-short', 'adm-stale')")
    assert shared.admin("verify")["problems"] == []


# ----- fuzz ---------------------------------------------------------------------------------------------
FUZZ_IDS = [f"fz-{i}" for i in range(6)]
_atoms = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.binary(max_size=24))
_ids = st.one_of(st.sampled_from(FUZZ_IDS + ["", "bad id", "x" * 129]), _atoms)
_totals = st.one_of(st.integers(-3, 12), st.integers(0, 2**64 - 1), st.sampled_from([50_000_000, 50_000_001]),
                    _atoms)
_colnames = st.one_of(st.sampled_from(["timestamp", "pnl", "symbol", "entry_price", "hold_time", "sl",
                                       "strategy_name", "pair_id", "bogus"]), st.text(max_size=4))
_colvals = st.one_of(st.lists(_atoms, max_size=6), st.lists(st.integers(0, 2**40), max_size=6),
                     st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=6),
                     st.binary(max_size=48), _atoms)
_columns = st.one_of(st.dictionaries(_colnames, _colvals, max_size=5),
                     st.builds(lambda k, ts, pnl: {"timestamp": ts[:k], "pnl": pnl[:k]},
                               st.integers(0, 4), st.lists(st.integers(0, 2**40), min_size=4, max_size=4),
                               st.lists(st.floats(-1e6, 1e6), min_size=4, max_size=4)),
                     _atoms)
_core = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(["begin", "chunk", "end", "abort", "result", "live_trades", "bogus"]),
                       _atoms),
     "request_id": _ids},
    optional={"strategy_name": st.one_of(st.text(min_size=1, max_size=8), _atoms),
              "total_trades": _totals, "total_chunks": _totals, "seq": _totals, "trades": _columns,
              "batch_id": _ids, "v": st.one_of(st.just(1), _atoms), "timeframe": _totals,
              "metrics": st.one_of(st.dictionaries(st.sampled_from(["sharpe", "trades", "x"]), _atoms), _atoms)})
_message = st.builds(lambda extra, m: {**extra, **m}, st.dictionaries(st.text(max_size=3), _atoms, max_size=2), _core)
_fz = st.sampled_from(FUZZ_IDS)


def _with_name(cols):
    """live_trades columns get a strategy_name column about as long as their pnl."""
    if not isinstance(cols, dict):
        return cols
    pnl = cols.get("pnl")
    n = len(pnl) if isinstance(pnl, (list, bytes)) else 1
    return dict(cols, strategy_name=["F"] * n)


_near = st.one_of(                                                    # nearly valid: reaches the assembler
    st.builds(lambda rid, tt, tc: begin(rid, tt, tc), _fz, st.integers(0, 8), st.integers(1, 4)),
    st.builds(lambda rid, seq, cols: chunk(rid, seq, cols), _fz, st.integers(0, 4), _columns),
    st.builds(lambda rid, t: {"type": t, "request_id": rid}, _fz, st.sampled_from(["end", "abort"])),
    st.builds(lambda rid, tt, cols: {"type": "result", "request_id": rid, "strategy_name": "F",
                                     "total_trades": tt, "trades": cols}, _fz, st.integers(0, 4), _columns),
    st.builds(lambda bid, cols: {"type": "live_trades", "batch_id": bid, "trades": _with_name(cols)},
              _fz, _columns),
)
_big = pack(chunk("fz-0", 0, {"timestamp": b"\0" * (MAX_MSG + 16), "pnl": b""}))
_frame = st.one_of(
    st.binary(max_size=64),                                           # garbage
    _message.map(pack),                                               # random maps, wrong types
    _near.map(pack), _near.map(pack),
    st.lists(_atoms, max_size=4).map(pack), _atoms.map(pack),         # not a map
    st.lists(st.one_of(st.binary(max_size=16), _message.map(pack)), min_size=2, max_size=3),  # multi-frame
    st.integers(0, 20).map(lambda i: _big if i == 0 else pack({"type": "end", "request_id": "fz-1"})),
)


def _check_reply(r: dict, count: dict) -> None:
    assert r.get("type") in ("credit", "stored", "error", "aborted"), r
    if r["type"] == "error":
        assert r["code"] in ERROR_CODES, r
        assert isinstance(r["message"], str) and r["message"], r
        assert "request_id" in r, r
        assert ("retry_after_s" in r) == (r["code"] in RETRYABLE), r
        count["errors"] += 1
    count["replies"] += 1


def test_fuzz_gateway_survives_random_frames_then_stores(shared):
    """~2000 random frames (garbage, random maps with wrong types, huge totals, multi-frame, oversize)
    from one DEALER: every reply is a well-formed protocol message, then a good result is stored and
    no actor restarted."""
    count = {"frames": 0, "replies": 0, "errors": 0}
    with Dealer(shared.gateway_endpoint) as dl:
        @settings(max_examples=160, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.large_base_example])
        @given(frames=st.lists(_frame, min_size=8, max_size=24))
        def throw(frames):
            for f in frames:
                dl.send(f)
                count["frames"] += 1
            for r in dl.drain(0.002):
                _check_reply(r, count)

        t0 = time.monotonic()
        throw()
        for r in dl.drain(1.0):
            _check_reply(r, count)
        took = time.monotonic() - t0
        assert count["frames"] >= 1500, count
        assert count["errors"] > 0 and count["replies"] > count["errors"], count
        for rid in FUZZ_IDS:
            dl.send({"type": "abort", "request_id": rid})
        for r in dl.drain(1.0):
            _check_reply(r, count)
    n = 20_000
    cols = synthetic_columns(n, seed=8, strategy="AfterFuzz")
    with Producer(shared.gateway_endpoint, timeout_s=10) as p:
        r = p.send_result("fz-good", "AfterFuzz", cols)
    assert r["type"] == "stored" and r["trades"] == n
    assert rows_for(shared, "fz-good") == n and duplicate_groups(shared, "fz-good") == 0
    assert_all_running(shared)
    g = inspect(shared, "gateway")
    assert g["errors"] >= count["errors"]
    print(f"fuzz: {count} in {took:.1f}s")
