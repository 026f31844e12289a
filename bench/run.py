"""`python run.py bench`: pairlane's speed, as ratios against a raw floor measured in the same run.

Owns: starting a throwaway daemon on free ports in a temp dir, measuring
ingest through it (send -> stored) beside the floors (plain msgpack decode of
the same frames; plain sqlite3 executemany of the same rows into a database
with the same schema, indexes and pragmas that holds as many rows as the
daemon's did at that run, and for information into a fresh one), a large result (5M
trades unless --big says otherwise; throughput against the 100k figure and
daemon RSS growth, with a progress line while it runs), the legacy S-expression path, small-result latency
while a legacy parse runs, and pair evaluation; and pairlane against the peer
(bench/peer.py, a single-process ROUTER + sqlite3 receiver run as a process of
its own) in the same run, interleaved, with the same Producer: 1,000-row,
5,000-row and 1 MiB chunks of 18-column and 2-column rows, and small results'
round trips (one `result` message, and begin/chunk/end). These machines are shared and
noisy: it reports medians and ratios, never a single absolute time as a
verdict. Never runs in the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import zmq


def _rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def _frames(n: int, seed: int, max_bytes: int):
    from pairlane import client, synthetic
    cols = synthetic.result_columns(n, seed=seed)
    plan = client.plan_chunks(cols, max_bytes)
    return cols, [client.encode_chunk("floor", i, cols, a, b) for i, (a, b) in enumerate(plan)]


def floor_decode(frames: list[bytes], n: int) -> float:
    t = time.perf_counter()
    for f in frames:
        msgpack.unpackb(f, raw=False)
    return n / (time.perf_counter() - t)


def floor_sqlite(frames: list[bytes], n: int, path: str, rid: str, batched: bool = False) -> float:
    """Plain executemany of the same rows pairlane writes (built beforehand, not timed), one
    transaction, into the SQLite database at `path` (created when missing), as floor_pg_copy does
    (`batched`: the same rows through store.insert_rows, BATCH_ROWS rows a statement, as pairlane's
    writer inserts them: for information, beside the floor):
    - the same rows: request id `rid` and strategy `bench-{rid}`, as send_one names pairlane's. Key
      length counts: the request id and strategy are in the indexes, and the floor once wrote
      "floor"/"S" beside pairlane's 35- and 41-character ones (100k rows: 313k against 247k rows/s);
    - a database as big as the daemon's: run k writes into a floor database that holds runs 0..k-1,
      as the daemon's does when its run k comes (inserts into bigger indexes are slower). Give `rid`
      an id that sorts after the earlier runs' (the daemon's do), so each run appends at the right
      of the indexes."""
    from pairlane import codec, store
    rows, columns = [], None
    for i, f in enumerate(frames):
        tr = msgpack.unpackb(f, raw=False)["trades"]
        columns, chunk_rows = codec.trade_log_rows(tr, rid, f"bench-{rid}", i, codec.check_columns(tr))
        rows.extend(chunk_rows)
    conn = store.connect(path)
    conn.executescript(store.SCHEMA)
    t = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    if batched:
        store.insert_rows(conn, "backtest_trade_logs", columns, rows)
    else:
        conn.executemany(store.insert_trades_sql(columns), rows)
    conn.execute("COMMIT")
    dt = time.perf_counter() - t
    conn.close()
    return n / dt


def remove_sqlite(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(path + suffix)
        except OSError:
            pass


def floor_pg_copy(frames: list[bytes], n: int, url: str, rid: str, per_frame: bool = True) -> float:
    """Plain psycopg COPY (binary) of the same rows (built beforehand, not timed) into pairlane's own
    backtest_trade_logs (same table, indexes and size as the daemon writes into), synchronous_commit
    on, under request id `rid` (strategy `bench-{rid}`, as send_one names pairlane's): give it an id
    that sorts like pairlane's of the same round, so both insert at the same place in the btree
    indexes. `per_frame`: one transaction per frame, the unit pairlane must commit before it
    acknowledges a chunk (and how issue 13 measured its floor, 5,000-row transactions); else all
    rows in one transaction. The rows stay until `drop_floor_rows` (a delete now would leave holes
    the next writer fills)."""
    import psycopg
    from pairlane import codec, pgstore
    chunks = []
    for i, f in enumerate(frames):
        tr = msgpack.unpackb(f, raw=False)["trades"]
        names, cols = pgstore._trade_columns(tr, rid, f"bench-{rid}", i, codec.check_columns(tr))
        # every value a Python object beforehand: the timed COPY is write_row over ready rows, as it was
        chunks.append((names, [c.tolist() if hasattr(c, "tolist") else c for c in cols]))
    with psycopg.connect(url, autocommit=True, options="-c synchronous_commit=on") as conn:
        t = time.perf_counter()
        with conn.cursor() as cur:
            if per_frame:
                for names, cols in chunks:
                    with conn.transaction():
                        pgstore._copy(cur, "backtest_trade_logs", names, cols)
            else:
                with conn.transaction():
                    for names, cols in chunks:
                        pgstore._copy(cur, "backtest_trade_logs", names, cols)
        dt = time.perf_counter() - t
    return n / dt


def drop_floor_rows(url: str, rids: list[str]) -> None:
    """Remove the floor's rows (no result row owns them) once every timed write is over."""
    import psycopg
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM backtest_trade_logs WHERE request_id = ANY(%s)", (rids,))


def send_one(endpoint: str, rid: str, cols: dict, max_bytes: int, progress=None, strategy: str | None = None) -> float:
    from pairlane.client import Producer
    with Producer(endpoint, timeout_s=60, max_message_bytes=max_bytes) as p:
        t = time.perf_counter()
        reply = p.send_result(rid, strategy or f"bench-{rid}", cols, progress=progress)
        dt = time.perf_counter() - t
    assert reply.get("type") == "stored", reply
    return dt


FLOOR_RATIO_TARGET = 0.8       # issue 16: SQLite ingest against the executemany floor of the same run
COPY_FLOOR_RATIO_TARGET = 0.7  # issue 13: PostgreSQL ingest against the COPY floor of the same run
LEGACY_TPS_TARGET = 200_000      # issue 16: the legacy 100k-trade S-expression, trades/s
LEGACY_SMALL_P99_TARGET_MS = 50  # ... with small results alongside at this p99
BIG_BLOCK = 500_000   # trades generated at a time for the large result


def big_columns(n: int, seed: int = 2, block: int = BIG_BLOCK) -> dict:
    """`n` synthetic trades (pairlane.synthetic.result_columns' shape), built `block` trades at a time
    into arrays allocated once: the generator's temporaries are those of one block, not of all `n`
    (5M trades at once peak at about 1 GiB in this process; this way about half that). Timestamps keep
    rising across blocks; one timeframe for the whole result, as for one strategy."""
    from pairlane.synthetic import result_columns
    out: dict = {}
    ts_next = 1_700_000_000
    for k, a in enumerate(range(0, n, block)):
        b = min(n, a + block)
        part = result_columns(b - a, seed=seed + 7919 * k, start_ts=ts_next)
        if k == 0:
            for name, v in part.items():
                out[name] = np.empty(n, dtype=v.dtype) if isinstance(v, np.ndarray) else [None] * n
            timeframe = part["timeframe"][0]
        part["timeframe"][:] = timeframe
        for name, v in part.items():
            out[name][a:b] = v
        ts_next = int(part["timestamp"][-1]) + 300
        del part
    return out


def big_targets(tps: float, small_tps: float, growth_peak_mib: float) -> dict:
    """Issue 16's targets for the large result: RSS growth < 64 MiB, throughput within 10% of the
    100k-trade ingest figure of the same run."""
    ratio = tps / small_tps if small_tps else None
    return {"tps_ratio_vs_100k": ratio, "tps_ratio_target": 0.9, "rss_growth_target_mib": 64.0,
            "tps_met": ratio is not None and ratio >= 0.9, "rss_met": growth_peak_mib < 64.0}


def free_tcp_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


class PeerProcess:
    """bench/peer.py in a process of its own (`python -m pairlane.bench.peer`), on a free port."""

    def __init__(self, tmp: str, max_bytes: int, credit: int) -> None:
        self.endpoint = free_tcp_endpoint()
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "pairlane.bench.peer", "--endpoint", self.endpoint,
                                      "--db", os.path.join(tmp, "peer.db"), "--credit", str(credit),
                                      "--max-message-bytes", str(max_bytes)],
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=root)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.stop()
            raise RuntimeError(f"peer did not start (said {line!r})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def send_shaped(endpoint: str, rid: str, cols: dict, max_bytes: int, max_rows: int) -> float:
    from pairlane.chunks import MAX_CHUNK_ROWS
    from pairlane.client import Producer
    with Producer(endpoint, timeout_s=60, max_message_bytes=max_bytes,
                  max_chunk_rows=max_rows or MAX_CHUNK_ROWS) as p:
        t = time.perf_counter()
        reply = p.send_result(rid, f"bench-{rid}", cols)
        dt = time.perf_counter() - t
    assert reply.get("type") == "stored", reply
    return dt


def result_round_trips(endpoint: str, prefix: str, cols: dict, n: int) -> list[float]:
    """Seconds from sending one `result` message of `cols` to its `stored` reply, n times (after a
    warm-up message), on one DEALER."""
    from pairlane.chunks import encode_chunk
    rows = len(cols["timestamp"])
    trades = msgpack.unpackb(encode_chunk("x", 0, cols, 0, rows), raw=False)["trades"]   # as on the wire
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 30_000)
    s.connect(endpoint)
    out = []
    try:
        for i in range(n + 1):
            frame = msgpack.packb({"type": "result", "request_id": f"{prefix}-{i}", "strategy_name": prefix,
                                   "total_trades": rows, "trades": trades}, use_bin_type=True)
            t = time.perf_counter()
            s.send(frame)
            reply = msgpack.unpackb(s.recv(), raw=False)
            dt = time.perf_counter() - t
            assert reply.get("type") == "stored", reply
            if i:
                out.append(dt)
    finally:
        s.close(0)
    return out


def chunked_round_trips(endpoint: str, prefix: str, cols: dict, n: int, max_bytes: int) -> list[float]:
    """Seconds of begin/chunk/end of `cols` to `stored`, n times (after a warm-up), one Producer."""
    from pairlane.client import Producer
    out = []
    with Producer(endpoint, timeout_s=30, max_message_bytes=max_bytes) as p:
        for i in range(n + 1):
            t = time.perf_counter()
            reply = p.send_result(f"{prefix}-{i}", prefix, cols)
            dt = time.perf_counter() - t
            assert reply.get("type") == "stored", reply
            if i:
                out.append(dt)
    return out


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return 1000 * xs[min(len(xs) - 1, int(q * len(xs)))]


def versus_peer(ep: str, peer_ep: str, ns, max_bytes: int, run: str, tmp: str, started_at: float) -> dict:
    """pairlane / peer for every chunk size and row shape, then small results; interleaved runs."""
    from pairlane.synthetic import result_columns
    full = result_columns(ns.small, seed=5)
    shapes = {"18col": full, "2col": {"timestamp": full["timestamp"], "pnl": full["pnl"]}}
    sizes = {"1000rows": 1000, "5000rows": 5000, "1mib": 0}   # 0: planned by bytes (max_message_bytes)
    out: dict = {"trades": ns.small, "ingest": {}}
    for shape, cols in shapes.items():
        for size, rows in sizes.items():
            key = f"{shape}_{size}"
            ours, theirs = [], []
            for i in range(ns.repeat):
                progress(f"vs peer: {ns.small:,} trades {key}, run {i + 1}/{ns.repeat}", ns.quiet)
                os.sync()
                ours.append(ns.small / send_shaped(ep, f"vp-{key}-{i}-{run}", cols, max_bytes, rows))
                os.sync()
                theirs.append(ns.small / send_shaped(peer_ep, f"vp-{key}-{i}-{run}", cols, max_bytes, rows))
            out["ingest"][key] = {"pairlane_tps": statistics.median(ours), "peer_tps": statistics.median(theirs),
                                  "ratio": statistics.median(o / t for o, t in zip(ours, theirs)),
                                  "ratios": [round(o / t, 3) for o, t in zip(ours, theirs)]}
    small = result_columns(10, seed=98)
    # steady state: for LOCAL_LOOKUP_GRACE_S after start the assembler asks the writer, not the
    # database, about a new request id (a predecessor's changes may still be queued there)
    from pairlane.lifecycle import LOCAL_LOOKUP_GRACE_S
    while time.monotonic() - started_at < LOCAL_LOOKUP_GRACE_S + 0.5:
        time.sleep(0.1)
    for kind, fn in (("small_result", lambda e, pfx: result_round_trips(e, pfx, small, ns.latency_n)),
                     ("small_chunked", lambda e, pfx: chunked_round_trips(e, pfx, small, ns.latency_n,
                                                                          max_bytes))):
        progress(f"vs peer: {kind} round trips ({ns.latency_n} each)", ns.quiet)
        ours = fn(ep, f"{kind}-{run}-p")
        theirs = fn(peer_ep, f"{kind}-{run}-q")
        out[kind] = {"trades": 10, "n": ns.latency_n,
                     "pairlane_p50_ms": _pct(ours, 0.5), "pairlane_p99_ms": _pct(ours, 0.99),
                     "peer_p50_ms": _pct(theirs, 0.5), "peer_p99_ms": _pct(theirs, 0.99)}
        out[kind]["p50_ratio"] = out[kind]["pairlane_p50_ms"] / out[kind]["peer_p50_ms"]
    return out


def progress(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"  .. {msg}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="run.py bench", description=__doc__.split("\n\n")[0],
                                 epilog="Ratios compare pairlane with a floor measured in the same run; "
                                        "medians over --repeat runs.")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each small measurement (median)")
    ap.add_argument("--big", type=int, default=5_000_000,
                    help="trades in the large result (throughput and daemon RSS growth; --quick skips it)")
    ap.add_argument("--small", type=int, default=100_000, help="trades in the ingest ratio result")
    ap.add_argument("--skip-big", action="store_true", help="skip the large result")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="a short run: 20,000-trade results, one run each, no large result, 50 round trips")
    ap.add_argument("--latency-n", type=int, default=200, help="small-result round trips per receiver")
    ap.add_argument("--skip-peer", action="store_true", help="skip the comparison with bench/peer.py")
    ap.add_argument("--store", default="", metavar="URL",
                    help="a postgresql:// URL: the daemon stores there (store.url) and the floor is a raw "
                         "psycopg COPY of the same rows; the legacy and pairs parts are skipped")
    ap.add_argument("--curve", action="store_true",
                    help="also CURVE against plain ingest (two daemons side by side, interleaved; "
                         "bench/multi.py), under 'curve'")
    ns = ap.parse_args(argv)
    if ns.quick:
        ns.repeat, ns.small, ns.skip_big, ns.latency_n = 1, min(ns.small, 20_000), True, min(ns.latency_n, 50)
    from pairlane import pairs
    from pairlane.synthetic import legacy_message
    from pairlane.synthetic import result_columns as synthetic_columns
    from pairlane.entry.harness import Daemon

    out: dict = {"repeat": ns.repeat}
    tmp = tempfile.mkdtemp(prefix="pairlane-bench-")
    finished = False
    overrides: dict = {"pairs": {"interval_s": 3600.0}}
    if ns.store:
        overrides["store"] = {"url": ns.store}
        out["store"] = "postgresql"
    run = f"{os.getpid()}-{time.time_ns()}"   # request ids unique per run: a shared database keeps them
    d = Daemon(Path(tmp) / "daemon", overrides)
    max_bytes = d.cfg.get("gateway", {}).get("max_message_bytes", 1 << 20)
    try:
        progress("starting a daemon", ns.quiet)
        d.start()
        started_at = time.monotonic()
        ep = d.gateway_endpoint
        # --- ingest ratio ---------------------------------------------------------------------------------
        n = ns.small
        cols, frames = _frames(n, 1, max_bytes)
        dec, flo, fresh, batched, one_tx, ours = [], [], [], [], [], []
        floor_rids: list[str] = []
        floor_db = os.path.join(tmp, "floor.db")   # grows as the daemon's does: run i finds i results
        batched_db = os.path.join(tmp, "floor-batched.db")   # and so does this one
        try:
            for i in range(ns.repeat):
                progress(f"ingest {n:,} trades, run {i + 1}/{ns.repeat}", ns.quiet)
                dec.append(floor_decode(frames, n))
                if not ns.store:
                    rid = f"b{n}-{i:04d}-{run}"
                    fresh_db = os.path.join(tmp, f"floor-fresh-{i}.db")
                    for what in ("fresh", "floor", "batched", "ours"):
                        os.sync()  # start each timed write with no dirty pages from the last (fsync cost)
                        if what == "fresh":
                            fresh.append(floor_sqlite(frames, n, fresh_db, rid))
                            remove_sqlite(fresh_db)
                        elif what == "floor":
                            flo.append(floor_sqlite(frames, n, floor_db, rid))
                        elif what == "batched":
                            batched.append(floor_sqlite(frames, n, batched_db, rid, batched=True))
                        else:
                            ours.append(n / send_one(ep, rid, cols, max_bytes))
                    continue
                # PostgreSQL: the three writes go into the same table; the order rotates by round, and
                # each request id ends in its place in that order, so each is the rightmost key of the
                # indexes exactly when the one written before it was (a key inserted before existing
                # ones costs a btree descent per row and 50/50 page splits: up to 40% slower)
                order = ("floor", "one_tx", "ours")
                order = order[i % 3:] + order[:i % 3]
                for k, what in enumerate(order):
                    rid = f"b{n}-{i}-{run}-{k}"
                    os.sync()
                    if what == "ours":
                        ours.append(n / send_one(ep, rid, cols, max_bytes))
                    else:
                        floor_rids.append(rid)
                        (flo if what == "floor" else one_tx).append(
                            floor_pg_copy(frames, n, ns.store, rid, per_frame=what == "floor"))
        finally:
            remove_sqlite(floor_db)
            remove_sqlite(batched_db)
            if floor_rids:
                drop_floor_rows(ns.store, floor_rids)
        floor_key = "floor_pg_copy_tps" if ns.store else "floor_sqlite_executemany_tps"
        out["ingest"] = {"trades": n, "floor_msgpack_decode_tps": statistics.median(dec),
                         floor_key: statistics.median(flo),
                         "pairlane_send_to_stored_tps": statistics.median(ours),
                         "ratio_vs_executemany": statistics.median(o / f for o, f in zip(ours, flo)),
                         "ratios": [round(o / f, 3) for o, f in zip(ours, flo)],
                         "ratio_vs_decode": statistics.median(o / f for o, f in zip(ours, dec))}
        if fresh:    # for information: the same floor into an empty database each run
            out["ingest"].update(floor_sqlite_fresh_db_tps=statistics.median(fresh),
                                 ratio_vs_fresh_db=statistics.median(o / f for o, f in zip(ours, fresh)))
        if batched:  # for information: the floor's rows inserted as pairlane's writer inserts them
            out["ingest"].update(floor_sqlite_batched_tps=statistics.median(batched),
                                 ratio_vs_batched=statistics.median(o / f for o, f in zip(ours, batched)))
        if one_tx:   # for information: COPY of every row in one transaction (no per-chunk commit)
            out["ingest"].update(floor_pg_copy_one_tx_tps=statistics.median(one_tx),
                                 ratio_vs_one_tx=statistics.median(o / f for o, f in zip(ours, one_tx)),
                                 frames=len(frames))
        if ns.curve:   # issue 14: CURVE costs at most 15% of ingest
            from pairlane.bench.multi import bench_curve
            progress("CURVE against plain ingest", ns.quiet)
            out["curve"] = bench_curve(Path(tmp) / "curve", n, max(ns.repeat, 3), ns.store, ns.quiet)
        # --- pairlane against the peer, same run -----------------------------------------------------------
        if not ns.skip_peer and not ns.store:
            peer = PeerProcess(tmp, max_bytes, int(d.cfg.get("gateway", {}).get("credit", 8)))
            try:
                out["peer"] = versus_peer(ep, peer.endpoint, ns, max_bytes, run, tmp, started_at)
            finally:
                peer.stop()
        # --- large result: RSS ----------------------------------------------------------------------------
        if not ns.skip_big:
            progress(f"generating {ns.big:,} trades", ns.quiet)
            big = big_columns(ns.big, seed=2)
            progress(f"ingest {ns.big:,} trades (throughput, RSS)", ns.quiet)
            pids = d.all_pids()
            before = _rss_bytes(pids)
            peak = [before]
            acked = [0]
            stop = threading.Event()

            def sample():
                t0 = last = time.monotonic()
                while not stop.wait(0.05):
                    peak[0] = max(peak[0], _rss_bytes(d.all_pids()))
                    now = time.monotonic()
                    if now - last >= 5.0:   # a progress line while it runs
                        last = now
                        progress(f"{ns.big:,} trades: {acked[0]:,} stored ({100 * acked[0] / ns.big:.0f}%), "
                                 f"{acked[0] / (now - t0):,.0f}/s, RSS growth peak "
                                 f"{(peak[0] - before) / 2**20:.1f} MiB", ns.quiet)
            th = threading.Thread(target=sample, daemon=True)
            th.start()
            try:
                # its id and its strategy sort after every id and strategy this run wrote before
                # (b..., bench-..., small_..., vp...), so it appends at the right of both indexes
                # of the trades, as each 100k run it is compared with does: amid existing keys,
                # SQLite's btree writes cost 25-30% more with both keys there (2M rows before it,
                # in process; session 12), 13% with the strategy alone (session 13): the
                # placement's cost, not the result's size
                dt = send_one(ep, f"zbig-{run}", big, max_bytes, strategy=f"zbig-{run}",
                              progress=lambda done, total: acked.__setitem__(0, done))
            finally:
                stop.set()
                th.join()
            after = _rss_bytes(d.all_pids())
            out["large"] = {"trades": ns.big, "pairlane_tps": ns.big / dt, "seconds": dt,
                            "rss_before_bytes": before,
                            "rss_after_bytes": after, "rss_peak_bytes": peak[0],
                            "rss_growth_peak_mib": (peak[0] - before) / 2**20,
                            "rss_growth_after_mib": (after - before) / 2**20}
            out["large"].update(big_targets(ns.big / dt, out["ingest"]["pairlane_send_to_stored_tps"],
                                            out["large"]["rss_growth_peak_mib"]))
            del big
        if ns.store:   # the legacy path and pair evaluation do not depend on the store
            finished = True
            return _report(out, ns)
        # --- legacy path alone, then small-result latency while a legacy result is parsed and stored ---
        import sqlite3
        ctx = zmq.Context.instance()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 2000)
        push.connect(d.cfg["gateway"]["legacy_endpoint"])
        conn = sqlite3.connect(d.db_path, timeout=5)

        def legacy_status(rid):
            row = conn.execute("SELECT status FROM backtest_results WHERE request_id = ?", (rid,)).fetchone()
            return row[0] if row else None

        leg = []
        for i in range(ns.repeat):
            progress(f"legacy 100k-trade S-expression, run {i + 1}/{ns.repeat}", ns.quiet)
            rid = f"leg{i}"
            msg = legacy_message(100_000, style="dotted", seed=i, request_id=rid, strategy_name=rid)
            t0 = time.perf_counter()
            push.send(msg)
            while legacy_status(rid) != "complete":
                if time.perf_counter() - t0 > 120:
                    raise RuntimeError("legacy result not stored within 120 s")
                time.sleep(0.005)
            leg.append(100_000 / (time.perf_counter() - t0))
        lat: list[float] = []
        small = synthetic_columns(10, seed=99)
        for i in range(ns.repeat):
            progress(f"small results while a legacy result is stored, run {i + 1}/{ns.repeat}", ns.quiet)
            rid = f"legl{i}"
            push.send(legacy_message(100_000, style="dotted", seed=10 + i, request_id=rid, strategy_name=rid))
            t0 = time.perf_counter()
            k = 0
            while legacy_status(rid) != "complete":
                if time.perf_counter() - t0 > 120:
                    raise RuntimeError("legacy result not stored within 120 s")
                lat.append(send_one(ep, f"small-{i}-{k}", small, max_bytes))
                k += 1
        conn.close()
        push.close()
        lat.sort()
        out["legacy"] = {"trades": 100_000, "tps_median": statistics.median(leg),
                         "small_results_during": len(lat),
                         "small_latency_p50_ms": 1000 * lat[len(lat) // 2],
                         "small_latency_p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
                         "small_latency_max_ms": 1000 * lat[-1],
                         "tps_target": LEGACY_TPS_TARGET, "small_latency_p99_target_ms": LEGACY_SMALL_P99_TARGET_MS}
        # --- pairs ------------------------------------------------------------------------------------------
        progress("pair evaluation", ns.quiet)
        out["pairs"] = {f"strategies_{k}_seconds": statistics.median(pairs.bench(k, seed=s) for s in range(ns.repeat))
                        for k in (500, 2000)}
        if not ns.quick:   # 50M pairs: issue 16's target is < 5 s
            progress("pair evaluation, 10,000 strategies", ns.quiet)
            out["pairs"]["strategies_10000_seconds"] = statistics.median(pairs.bench(10_000, seed=s)
                                                                         for s in range(ns.repeat))
        finished = True
    finally:
        d.close_and_remove(tmp, keep=not finished)  # a finished run leaves nothing in /tmp
    return _report(out, ns)


def _report(out: dict, ns) -> int:
    if ns.json:
        print(json.dumps(out, indent=2))
        return 0
    ing = out["ingest"]
    print(f"ingest {ing['trades']:,} trades (median of {ns.repeat}):")
    print(f"  floor: msgpack decode        {ing['floor_msgpack_decode_tps']:>14,.0f} trades/s")
    if ns.store:
        print(f"  floor: psycopg COPY binary   {ing['floor_pg_copy_tps']:>14,.0f} trades/s   "
              f"(a transaction per chunk, {ing['frames']} chunks)")
        print(f"  (one transaction for all:    {ing['floor_pg_copy_one_tx_tps']:>14,.0f} trades/s; "
              f"pairlane is {ing['ratio_vs_one_tx']:.2f}x of it)")
    else:
        print(f"  floor: sqlite executemany    {ing['floor_sqlite_executemany_tps']:>14,.0f} trades/s   "
              f"(into a database as big as the daemon's at that run)")
        print(f"  (into an empty database:     {ing['floor_sqlite_fresh_db_tps']:>14,.0f} trades/s; "
              f"pairlane is {ing['ratio_vs_fresh_db']:.2f}x of it)")
        print(f"  (256 rows a statement:       {ing['floor_sqlite_batched_tps']:>14,.0f} trades/s; "
              f"pairlane is {ing['ratio_vs_batched']:.2f}x of it: the insert pairlane's writer makes)")
    print(f"  pairlane send -> stored      {ing['pairlane_send_to_stored_tps']:>14,.0f} trades/s")
    target = COPY_FLOOR_RATIO_TARGET if ns.store else FLOOR_RATIO_TARGET
    print(f"  ratio vs {'COPY' if ns.store else 'executemany'} floor   {ing['ratio_vs_executemany']:>14.2f}x   "
          f"(target >= {target}; runs {min(ing['ratios']):.2f}-{max(ing['ratios']):.2f})")
    if "curve" in out:
        cv = out["curve"]
        print(f"CURVE / plain ingest, {cv['trades']:,} trades, {cv['rounds']} interleaved rounds: "
              f"{cv['ratio_of_medians']:.2f}x (target >= 0.85; rounds {min(cv['ratios']):.2f}-{max(cv['ratios']):.2f})")
    if "peer" in out:
        vp = out["peer"]
        print(f"pairlane / peer (bench/peer.py), {vp['trades']:,} trades, median of {ns.repeat} interleaved runs:")
        for key, v in vp["ingest"].items():
            print(f"  {key:<16} pairlane {v['pairlane_tps']:>10,.0f}/s  peer {v['peer_tps']:>10,.0f}/s  "
                  f"ratio {v['ratio']:.2f}x (target >= 1.0)")
        for kind in ("small_result", "small_chunked"):
            v = vp[kind]
            print(f"  {kind:<16} pairlane p50 {v['pairlane_p50_ms']:.2f} ms p99 {v['pairlane_p99_ms']:.2f} ms; "
                  f"peer p50 {v['peer_p50_ms']:.2f} ms p99 {v['peer_p99_ms']:.2f} ms; p50 ratio {v['p50_ratio']:.2f}x")
    if "large" in out:
        lg = out["large"]
        print(f"large result {lg['trades']:,} trades: {lg['pairlane_tps']:,.0f} trades/s, "
              f"{lg['tps_ratio_vs_100k']:.2f}x the {ing['trades']:,}-trade figure "
              f"(target >= {lg['tps_ratio_target']:.2f}: {'met' if lg['tps_met'] else 'NOT met'})")
        print(f"  daemon RSS growth peak {lg['rss_growth_peak_mib']:.1f} MiB, after "
              f"{lg['rss_growth_after_mib']:.1f} MiB (target < {lg['rss_growth_target_mib']:.0f}: "
              f"{'met' if lg['rss_met'] else 'NOT met'})")
    if "legacy" not in out:
        return 0
    le = out["legacy"]
    print(f"legacy 100k-trade S-expression: {le['tps_median']:,.0f} trades/s (target >= {LEGACY_TPS_TARGET:,})")
    print(f"  small results alongside: {le['small_results_during']}, p50 {le['small_latency_p50_ms']:.1f} ms, "
          f"p99 {le['small_latency_p99_ms']:.1f} ms (target < {LEGACY_SMALL_P99_TARGET_MS}), "
          f"max {le['small_latency_max_ms']:.1f} ms")
    pr = out["pairs"]
    print(f"pairs: 500 strategies {pr['strategies_500_seconds']:.3f} s (target < 1), "
          f"2000 strategies {pr['strategies_2000_seconds']:.3f} s"
          + (f", 10000 strategies {pr['strategies_10000_seconds']:.2f} s (target < 5)"
             if "strategies_10000_seconds" in pr else ""))
    return 0
