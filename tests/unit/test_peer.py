"""bench/peer.py, the single-process baseline of `run.py bench`: it must store a result exactly
(every row, once) and answer the contract's credits (window at begin, one per durable chunk,
duplicates credited without a second copy, `incomplete` with the missing seqs), so that the
comparison with pairlane is between two receivers doing the same work. No timing here."""
from __future__ import annotations

import contextlib
import sqlite3

import msgpack
import numpy as np
import pytest
import zmq

from pairlane.bench.peer import Peer
from pairlane import synthetic
from pairlane.chunks import encode_chunk
from pairlane.client import Producer


@pytest.fixture
def peer(tmp_path):
    p = Peer(f"ipc://{tmp_path}/peer.sock", str(tmp_path / "peer.db"), credit=8).start()
    yield p
    p.stop()


def stored_rows(db_path: str, rid: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(db_path)) as c:
        return c.execute("SELECT seq, timestamp, pnl, symbol, direction, entry_price, volume, hold_time "
                         "FROM backtest_trade_logs WHERE request_id = ? ORDER BY timestamp, seq",
                         (rid,)).fetchall()


def status(db_path: str, rid: str):
    with contextlib.closing(sqlite3.connect(db_path)) as c:
        row = c.execute("SELECT status, total_trades FROM backtest_results WHERE request_id = ?",
                        (rid,)).fetchone()
    return row


def test_producer_result_is_stored_exactly_in_credited_chunks(peer):
    cols = synthetic.result_columns(5_500, seed=3)
    with Producer(peer.endpoint, timeout_s=10, max_chunk_rows=1000) as p:
        reply = p.send_result("peer-1", "S1", cols)
        stats = p.last_stats
    assert reply["type"] == "stored" and reply["trades"] == 5_500 and reply["location"] == "db", reply
    assert stats["chunks"] == 6 and stats["window"] == 6 and stats["max_unacked"] <= 6, stats
    assert status(peer.db_path, "peer-1") == ("complete", 5_500)
    rows = stored_rows(peer.db_path, "peer-1")
    assert len(rows) == 5_500
    ts = np.asarray(cols["timestamp"])
    order = np.argsort(ts, kind="stable")
    assert [r[1] for r in rows] == ts[order].tolist()
    assert [r[2] for r in rows] == np.asarray(cols["pnl"], dtype=float)[order].tolist()
    assert [r[3] for r in rows] == [cols["symbol"][k] for k in order]
    assert [r[7] for r in rows] == np.asarray(cols["hold_time"])[order].tolist()
    assert peer.commits == 6   # one commit per chunk


def test_credits_duplicates_and_incomplete_follow_the_contract(peer):
    cols = synthetic.result_columns(30, seed=4)
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 5000)
    s.connect(peer.endpoint)

    def ask(m) -> dict:
        s.send(m if isinstance(m, bytes) else msgpack.packb(m, use_bin_type=True))
        return msgpack.unpackb(s.recv(), raw=False)
    try:
        begin = {"type": "begin", "request_id": "peer-2", "strategy_name": "S2", "total_trades": 30,
                 "total_chunks": 10}
        assert ask(begin) == {"type": "credit", "request_id": "peer-2", "credit": 8}
        c0 = encode_chunk("peer-2", 0, cols, 0, 3)
        assert ask(c0) == {"type": "credit", "request_id": "peer-2", "credit": 1, "seq": 0}
        assert ask(c0) == {"type": "credit", "request_id": "peer-2", "credit": 1, "seq": 0}  # duplicate
        assert len(stored_rows(peer.db_path, "peer-2")) == 3                              # stored once
        r = ask({"type": "end", "request_id": "peer-2"})
        assert r["code"] == "incomplete" and r["missing"] == list(range(1, 10)), r
        assert ask(dict(begin, total_trades=31))["code"] == "conflict"
        assert ask({"type": "chunk", "request_id": "nobody", "seq": 0,
                    "trades": {"timestamp": [1], "pnl": [0.5]}})["code"] == "unknown_request"
        for seq in range(1, 10):
            assert ask(encode_chunk("peer-2", seq, cols, 3 * seq, 3 * seq + 3))["seq"] == seq
        assert ask({"type": "end", "request_id": "peer-2"})["type"] == "stored"
        assert ask(begin)["type"] == "stored"          # already stored: its stored reply at once
        assert len(stored_rows(peer.db_path, "peer-2")) == 30
        assert status(peer.db_path, "peer-2") == ("complete", 30)
        # one `result` message
        small = {"type": "result", "request_id": "peer-3", "strategy_name": "S3", "total_trades": 2,
                 "trades": {"timestamp": [10, 20], "pnl": [1.5, -0.5]}}
        assert ask(small)["type"] == "stored"
        assert [(r[1], r[2]) for r in stored_rows(peer.db_path, "peer-3")] == [(10, 1.5), (20, -0.5)]
        assert ask(dict(small, total_trades=3, request_id="peer-4"))["code"] == "incomplete"
        assert ask(b"\xc1")["code"] == "malformed"
    finally:
        s.close(0)
