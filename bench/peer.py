"""The peer: a single-process receiver a user could write in an afternoon, for `run.py bench`.

Owns: one pyzmq ROUTER and one sqlite3 connection (pairlane's schema, WAL,
synchronous=FULL) in one thread, speaking the wire contract's begin / chunk /
end / result / abort (PROTOCOL.md section 1) with credits: a window of
min(credit, total_chunks) at begin, one credit per chunk after the commit that
makes it durable (one transaction per chunk, the results row inserted with
the first chunk and marked complete with the last), duplicates of a durable
seq credited at once and never stored twice, `stored` / `incomplete` /
`conflict` / `unknown_request` as the contract says. Frames are decoded and
validated with pairlane.codec and rows bound as pairlane.store binds them, so
the comparison with pairlane measures the architecture, not the parsing.

It never supervises, spools, retries, times requests out, limits concurrent
requests or survives a crash with its in-progress state (in-progress requests
live in memory; stored ones are read back from the database on begin). It is
a benchmark baseline, never part of the daemon.
"""
from __future__ import annotations

import threading
import time
from typing import Any

import zmq

from pairlane import codec, store

POLL_MS = 50


class Peer:
    """Serve `endpoint` into the SQLite database at `db_path` until `stop()`.

    Use `start()` to run it in a background thread (the bench does), or `serve()`
    in the calling thread."""

    def __init__(self, endpoint: str, db_path: str, *, credit: int = 8,
                 max_message_bytes: int = 1 << 20, max_chunk_rows: int = 32768) -> None:
        self.endpoint = endpoint
        self.db_path = db_path
        self.credit = int(credit)
        self.limits = codec.Limits(max_message_bytes=max_message_bytes, max_chunk_rows=max_chunk_rows)
        self.requests: dict[str, dict[str, Any]] = {}   # in progress: rid -> state
        self.commits = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # -- running -----------------------------------------------------------------------------
    def start(self) -> "Peer":
        self._thread = threading.Thread(target=self._run, name="peer", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("peer did not start")
        if self.error is not None:
            raise RuntimeError(f"peer failed to start: {self.error}")
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        try:
            self.serve()
        except BaseException as exc:  # surfaced by start() / the caller
            self.error = exc
            self._ready.set()

    def serve(self) -> None:
        conn = store.connect(self.db_path)   # WAL, synchronous=FULL
        conn.executescript(store.SCHEMA)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, 4 * self.limits.max_message_bytes)
        sock.bind(self.endpoint)
        self.conn = conn
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(POLL_MS):
                    continue
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    ident, body = frames[0], frames[1:]
                    for reply in self.handle(body):
                        sock.send_multipart([ident, codec.pack(reply)])
        finally:
            sock.close(0)
            ctx.term()
            conn.close()

    # -- the contract ------------------------------------------------------------------------
    def handle(self, frames: list[bytes]) -> list[dict]:
        """One incoming message -> the replies it earns (in order)."""
        try:
            m = codec.decode_frame(frames, self.limits)
            t = m["type"]
            if t == "begin":
                return [self._begin(m)]
            if t == "chunk":
                return [self._chunk(m)]
            if t == "end":
                return [self._end(m["request_id"])]
            if t == "result":
                return [self._result(m)]
            if t == "abort":
                return [self._abort(m["request_id"])]
            raise codec.ProtocolError("malformed", f"the peer does not serve {t!r}", m.get("request_id"))
        except codec.ProtocolError as exc:
            return [exc.reply()]

    def _stored_row(self, rid: str):
        return self.conn.execute("SELECT strategy_name, total_trades, total_chunks FROM backtest_results "
                                 "WHERE request_id = ? AND status = 'complete'", (rid,)).fetchone()

    @staticmethod
    def _stored_reply(rid: str, trades: int) -> dict:
        return {"type": "stored", "request_id": rid, "trades": trades, "trades_ref": rid, "location": "db"}

    def _begin(self, m: dict) -> dict:
        rid = m["request_id"]
        key = (m["strategy_name"], int(m["total_trades"]), int(m["total_chunks"]))
        row = self._stored_row(rid)
        if row is not None:
            if tuple(row) != key:
                raise codec.ProtocolError("conflict", "stored under another strategy_name or totals", rid)
            return self._stored_reply(rid, key[1])
        st = self.requests.get(rid)
        if st is not None and st["key"] != key:
            raise codec.ProtocolError("conflict", "in progress under another strategy_name or totals", rid)
        if st is None:
            self.requests[rid] = {"key": key, "meta": store.meta_from_message(m), "durable": set(),
                                  "rows": 0, "failed": False}
        return {"type": "credit", "request_id": rid, "credit": min(self.credit, key[2])}

    def _chunk(self, m: dict) -> dict:
        rid, seq = m["request_id"], m["seq"]
        st = self.requests.get(rid)
        if st is None:
            raise codec.ProtocolError("unknown_request", "no request in progress under this id; send begin",
                                      rid)
        name, total, chunks = st["key"]
        if seq >= chunks:
            raise codec.ProtocolError("bad_chunk", f"seq {seq} out of range 0..{chunks - 1}", rid)
        credit = {"type": "credit", "request_id": rid, "credit": 1, "seq": seq}
        if seq in st["durable"]:
            return credit
        trades = m["trades"]
        n = codec.check_columns(trades, rid)
        columns, rows = codec.trade_log_rows(trades, rid, name, seq, n)
        now = time.time()
        last = len(st["durable"]) + 1 == chunks
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            if not st["durable"]:
                self._insert_result(st["meta"], "receiving", now)
            conn.executemany(store.insert_trades_sql(columns), rows)
            conn.execute("INSERT INTO backtest_chunks(request_id, seq, rows, committed_at) VALUES (?, ?, ?, ?)",
                         (rid, seq, n, now))
            if last:
                if st["rows"] + n == total:
                    conn.execute("UPDATE backtest_results SET status = 'complete', completed_at = ?, "
                                 "updated_at = ? WHERE request_id = ?", (now, now, rid))
                else:   # the rows do not add up: failed, rows removed
                    conn.execute("DELETE FROM backtest_trade_logs WHERE request_id = ?", (rid,))
                    conn.execute("UPDATE backtest_results SET status = 'failed', updated_at = ? "
                                 "WHERE request_id = ?", (now, rid))
                    st["failed"] = True
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self.commits += 1
        st["durable"].add(seq)
        st["rows"] += n
        if last and not st["failed"]:
            del self.requests[rid]
        return credit

    def _insert_result(self, meta: dict, status: str, now: float) -> None:
        self.conn.execute(
            "INSERT OR IGNORE INTO backtest_results(request_id, strategy_name, status, total_trades, "
            "total_chunks, sharpe, profit_factor, win_rate, max_dd, reported_trades, symbol, timeframe, "
            "rank, oos_kind, source, received_at, completed_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'peer', ?, ?, ?)",
            (meta["request_id"], meta["strategy_name"], status, meta["total_trades"], meta["total_chunks"],
             meta.get("sharpe"), meta.get("profit_factor"), meta.get("win_rate"), meta.get("max_dd"),
             meta.get("reported_trades"), meta.get("symbol"), meta.get("timeframe"), meta.get("rank"),
             meta.get("oos_kind"), now, now if status == "complete" else None, now))

    def _end(self, rid: str) -> dict:
        st = self.requests.get(rid)
        if st is None:
            row = self._stored_row(rid)
            if row is not None:
                return self._stored_reply(rid, int(row[1]))
            raise codec.ProtocolError("unknown_request", "no request in progress under this id; send begin", rid)
        if st["failed"]:
            raise codec.ProtocolError("incomplete", f"rows ({st['rows']}) do not add up to total_trades "
                                      f"({st['key'][1]})", rid)
        missing = [s for s in range(st["key"][2]) if s not in st["durable"]][:1000]
        reply = codec.error_reply("incomplete", f"{len(missing)} chunks missing", rid)
        reply["missing"] = missing
        return reply

    def _result(self, m: dict) -> dict:
        rid = m["request_id"]
        total = int(m["total_trades"])
        row = self._stored_row(rid)
        if row is not None:
            if tuple(row) != (m["strategy_name"], total, 1):
                raise codec.ProtocolError("conflict", "stored under another strategy_name or totals", rid)
            return self._stored_reply(rid, total)
        if rid in self.requests:
            raise codec.ProtocolError("conflict", "in progress", rid)
        trades = m["trades"]
        n = codec.check_columns(trades, rid)
        if n != total:
            raise codec.ProtocolError("incomplete", f"{n} rows, total_trades {total}", rid)
        columns, rows = codec.trade_log_rows(trades, rid, m["strategy_name"], 0, n)
        now = time.time()
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._insert_result(store.meta_from_message(m), "complete", now)
            conn.executemany(store.insert_trades_sql(columns), rows)
            conn.execute("INSERT INTO backtest_chunks(request_id, seq, rows, committed_at) VALUES (?, 0, ?, ?)",
                         (rid, n, now))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self.commits += 1
        return self._stored_reply(rid, total)

    def _abort(self, rid: str) -> dict:
        if self.requests.pop(rid, None) is not None:
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM backtest_trade_logs WHERE request_id = ?", (rid,))
            conn.execute("DELETE FROM backtest_chunks WHERE request_id = ?", (rid,))
            conn.execute("DELETE FROM backtest_results WHERE request_id = ?", (rid,))
            conn.execute("COMMIT")
            self.commits += 1
        return {"type": "aborted", "request_id": rid}


def main(argv: list[str] | None = None) -> int:
    """`python -m pairlane.bench.peer --endpoint EP --db PATH`: serve until SIGTERM/SIGINT; prints `ready`
    once bound (the bench runs it as a process of its own, as a user would)."""
    import argparse
    import signal
    import sys

    ap = argparse.ArgumentParser(prog="python -m pairlane.bench.peer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--db", required=True)
    ap.add_argument("--credit", type=int, default=8)
    ap.add_argument("--max-message-bytes", type=int, default=1 << 20)
    ns = ap.parse_args(argv)
    peer = Peer(ns.endpoint, ns.db, credit=ns.credit, max_message_bytes=ns.max_message_bytes)
    signal.signal(signal.SIGTERM, lambda *_: peer._stop.set())
    signal.signal(signal.SIGINT, lambda *_: peer._stop.set())
    peer.start()
    print("ready", flush=True)
    while not peer._stop.wait(0.2):
        if peer._thread is not None and not peer._thread.is_alive():
            break
    peer.stop()
    if peer.error is not None:
        print(f"peer failed: {peer.error!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
