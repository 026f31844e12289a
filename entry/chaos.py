"""Fault injection: traffic, faults, and the checker that holds pairlane to its promises.

Owns: the reusable pieces of `tests/faults` and of `python run.py chaos`:
producers in threads that record every `stored` reply (`Traffic`), the
faults (SIGKILL of an actor or supervisor, `inject hang`, a database locked
by another process, garbage frames and S-expressions, SIGKILL of the whole
daemon and a restart), recovery timing (until every actor is RUNNING and
admin answers), and `check`, which compares every `stored` reply against the
rows in SQLite: complete with its exact row count, no duplicate rows, no
partial result visible. Never trusts log lines: only the database.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import signal
import sqlite3
import statistics
import sys
import tempfile
import threading
from typing import Callable
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import zmq

from pairlane.client import Producer, SendError
from pairlane.synthetic import result_columns as synthetic_columns
from .harness import Daemon

ACTORS = ("gateway", "legacy", "assembler", "writer", "dlq", "pairs", "metrics", "admin")
SUPERVISORS = ("store", "ingest")


# ----- traffic -----------------------------------------------------------------------------------------
@dataclass
class Traffic:
    """Producers in threads sending results of min..max trades until stopped."""

    endpoint: str
    producers: int = 2
    min_trades: int = 10_000
    max_trades: int = 100_000
    seed: int = 0
    timeout_s: float = 4.0
    retries: int = 60
    prefix: str = "chaos"
    pause_s: float = 0.0        # rest between two results of one producer (a steady rate for soaks)
    log_uniform: bool = False   # sizes log-uniform over min..max (mostly small, some large) instead of uniform
    max_chunk_rows: int | None = None   # rows per chunk at most (small chunks: the writer commits them in groups)
    sent: dict = field(default_factory=dict)      # request_id -> trades (every result attempted)
    stored: dict = field(default_factory=dict)    # request_id -> (trades, reply)
    errors: dict = field(default_factory=dict)    # request_id -> error text (no promise was made)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> "Traffic":
        for i in range(self.producers):
            t = threading.Thread(target=self._run, args=(i,), daemon=True, name=f"producer-{i}")
            t.start()
            self._threads.append(t)
        return self

    def _run(self, i: int) -> None:
        rng = random.Random(self.seed * 1000 + i)
        k = 0
        shape = {} if self.max_chunk_rows is None else {"max_chunk_rows": self.max_chunk_rows}
        with Producer(self.endpoint, timeout_s=self.timeout_s, retries=self.retries, **shape) as p:
            while not self._stop.is_set():
                if self.log_uniform:
                    n = int(round(math.exp(rng.uniform(math.log(max(1, self.min_trades)),
                                                       math.log(max(1, self.max_trades))))))
                else:
                    n = rng.randint(self.min_trades, self.max_trades)
                rid = f"{self.prefix}-{self.seed}-{i}-{k}"
                k += 1
                cols = synthetic_columns(n, seed=rng.randrange(1 << 30), strategy=rid)
                with self.lock:
                    self.sent[rid] = n
                try:
                    reply = p.send_result(rid, f"strat-{i}-{k % 7}", cols)
                    with self.lock:
                        self.stored[rid] = (n, reply)
                except SendError as exc:
                    with self.lock:
                        self.errors[rid] = str(exc)
                if self.pause_s > 0:
                    self._stop.wait(self.pause_s)

    def stop(self, timeout: float = 120.0) -> None:
        """No new results; wait for those in progress to finish (or give up)."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))

    def wait_stored(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.stored) < count:
            time.sleep(0.05)


# ----- checking ------------------------------------------------------------------------------------------
def check(db_path: str, stored: dict, wait_s: float = 90.0) -> dict:
    """Compare every stored reply with SQLite. Waits up to wait_s for spooled results to land."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        return check_rows(lambda sql: conn.execute(sql).fetchall(), stored, wait_s)
    finally:
        conn.close()


def check_rows(query: Callable[[str], list], stored: dict, wait_s: float) -> dict:
    """The checker over any store: `query(sql)` returns its rows. Every `stored` reply must be a
    complete result with exactly its rows; no (request, seq, timestamp) twice; no complete result
    whose rows differ from its total and no failed or abandoned one with rows (partial visible)."""
    deadline = time.monotonic() + wait_s
    while True:
        rows = dict(query("SELECT request_id, status FROM backtest_results"))
        pending = [r for r in stored if rows.get(r) != "complete"]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    counts = dict(query("SELECT request_id, count(*) FROM backtest_trade_logs GROUP BY request_id"))
    totals = dict(query("SELECT request_id, total_trades FROM backtest_results"))
    dup = query("SELECT count(*) FROM (SELECT request_id, seq, timestamp FROM backtest_trade_logs "
                "GROUP BY 1, 2, 3 HAVING count(*) > 1) d")[0][0]
    lost = [r for r in stored if rows.get(r) != "complete"]
    wrong = [r for r, (n, _) in stored.items() if counts.get(r, 0) != n]
    bad_complete = [r for r, st in rows.items() if st == "complete" and counts.get(r, 0) != totals.get(r)]
    dead_rows = [r for r, st in rows.items() if st in ("failed", "abandoned") and counts.get(r, 0)]
    return {"stored": len(stored), "complete": len(stored) - len(lost), "lost": lost,
            "wrong_row_counts": wrong, "duplicate_rows": dup,
            "partial_visible": bad_complete + dead_rows}


def writers_alive(db_path: str) -> int:
    """Processes holding the database open for writing (must never exceed 1)."""
    real = os.path.realpath(db_path)
    n = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") != real:
                        continue
                    with open(f"/proc/{pid}/fdinfo/{fd}") as fh:
                        flags = next(int(ln.split()[1], 8) for ln in fh if ln.startswith("flags:"))
                    if flags & (os.O_WRONLY | os.O_RDWR):
                        n += 1
                        break
                except OSError:
                    continue
        except OSError:
            continue
    return n


# ----- faults --------------------------------------------------------------------------------------------
def wait_all_running(d: Daemon, timeout: float = 30.0, old_pids: dict | None = None) -> float:
    """Seconds until admin answers and every actor is RUNNING (with a new pid where old_pids says)."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        st = d.admin("status", timeout=2.0)
        if st and st.get("ok"):
            rows = {a["name"]: a for a in st["actors"]}
            fresh = all(rows.get(n, {}).get("pid") not in (None, p) for n, p in (old_pids or {}).items())
            if fresh and all(a["state"] == "RUNNING" for a in rows.values()):
                d._learn_pids(st)
                return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"daemon did not recover within {timeout}s:\n{d.log()[-3000:]}")


def kill_actor(d: Daemon, name: str) -> float:
    """SIGKILL an actor (or supervisor) by pid; returns the recovery time."""
    pid = d.actor(name)["pid"]
    os.kill(pid, signal.SIGKILL)
    return wait_all_running(d, old_pids={name: pid})


def hang_actor(d: Daemon, name: str) -> float:
    pid = d.actor(name)["pid"]
    reply = d.admin("inject", {"actor": name, "fault": "hang"})
    assert reply and reply.get("ok"), reply
    return wait_all_running(d, timeout=40.0, old_pids={name: pid})


class DbLock:
    """Another process (well, connection) holding an exclusive lock on the database."""

    def __init__(self, db_path: str):
        self.conn = sqlite3.connect(db_path, isolation_level=None, timeout=30)
        self.conn.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()


def fuzz(d: Daemon, frames: int = 200, seed: int = 0) -> int:
    """Garbage frames at the gateway and garbage S-expressions at the legacy socket."""
    rng = random.Random(seed)
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(d.gateway_endpoint)
    push = None
    if d.cfg["gateway"].get("legacy_endpoint"):
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(d.cfg["gateway"]["legacy_endpoint"])
    shapes = [
        lambda: os.urandom(rng.randint(0, 300)),
        lambda: msgpack.packb({"type": rng.choice(["begin", "chunk", "end", "abort", "result", "x"]),
                               "request_id": rng.choice(["ok-1", "", "bad id!", 7, None]),
                               "total_trades": rng.choice([1, -1, 10**12, "x"]), "total_chunks": rng.choice([0, 1, 3]),
                               "seq": rng.choice([0, -1, 99, "a"]), "strategy_name": "s",
                               "trades": rng.choice([{}, {"timestamp": [1], "pnl": [float("nan")]},
                                                     {"timestamp": b"\x00" * 7, "pnl": [1.0]}, []])}),
        lambda: msgpack.packb([1, 2, 3]),
    ]
    sent = 0
    for _ in range(frames):
        if rng.random() < 0.1:
            dealer.send_multipart([b"a", b"b"])
        else:
            dealer.send(rng.choice(shapes)())
        if push is not None and rng.random() < 0.2:
            push.send(rng.choice([b"((((", b'((type . "BACKTEST_RESULT") (result . ((request_id . 5))))',
                                  os.urandom(50), b'(result ((strategy_name . "x") (trade_list (((pnl . 1)))))))']))
        sent += 1
    time.sleep(0.2)
    dealer.close(0)
    if push is not None:
        push.close(0)
    return sent


def kill_daemon(d: Daemon) -> None:
    """SIGKILL the main process and every process of its actor system."""
    pids = d.all_pids()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    d.proc.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and d.all_pids():
        time.sleep(0.05)


def restart_daemon(d: Daemon) -> float:
    kill_daemon(d)
    t0 = time.monotonic()
    d.pgid = None
    d.known_pids = set()
    d.start()
    return time.monotonic() - t0


# ----- the chaos command ----------------------------------------------------------------------------------
FAULTS = ("kill_actor", "kill_supervisor", "hang", "lock_db", "fuzz", "kill_daemon")


def run_chaos(d: Daemon, duration: float, seed: int, own_daemon: bool, out=sys.stderr) -> dict:
    rng = random.Random(seed)
    traffic = Traffic(d.gateway_endpoint, producers=2, seed=seed, prefix="chaos").start()
    injected: dict[str, int] = {}
    recovery: list[float] = []
    max_writers = 0
    t_end = time.monotonic() + duration
    faults = [f for f in FAULTS if own_daemon or f != "kill_daemon"]
    while time.monotonic() < t_end:
        time.sleep(rng.uniform(1.0, 4.0))
        fault = rng.choice(faults)
        what = fault
        try:
            if fault == "kill_actor":
                what = rng.choice(ACTORS)
                recovery.append(kill_actor(d, what))
            elif fault == "kill_supervisor":
                what = rng.choice(SUPERVISORS)
                recovery.append(kill_actor(d, what))
            elif fault == "hang":
                what = rng.choice(ACTORS)
                recovery.append(hang_actor(d, what))
            elif fault == "lock_db":
                lock = DbLock(d.db_path)
                time.sleep(rng.uniform(1.0, 5.0))
                lock.release()
            elif fault == "fuzz":
                fuzz(d, 100, rng.randrange(1 << 30))
            elif fault == "kill_daemon":
                recovery.append(restart_daemon(d))
        except AssertionError as exc:
            print(f"chaos: recovery failed after {fault} {what}: {exc}", file=out)
            raise
        max_writers = max(max_writers, writers_alive(d.db_path))
        injected[fault] = injected.get(fault, 0) + 1
        print(f"chaos: {fault:<16} {what:<10} stored so far {len(traffic.stored)}", file=out, flush=True)
    traffic.stop()
    wait_all_running(d)
    res = check(d.db_path, dict((r, v) for r, v in traffic.stored.items()))
    return {"faults": injected, "sent": len(traffic.sent), "stored": len(traffic.stored),
            "not_stored_errors": len(traffic.errors), "lost": len(res["lost"]),
            "duplicates": res["duplicate_rows"], "wrong_row_counts": len(res["wrong_row_counts"]),
            "partial_visible": len(res["partial_visible"]), "max_writers_seen": max_writers,
            "recovery_median_s": statistics.median(recovery) if recovery else None,
            "recovery_max_s": max(recovery) if recovery else None}


def main(argv: list[str]) -> int:
    if "--soak" in argv:  # the long run of ordinary traffic (entry/soak.py)
        from . import soak
        return soak.main([a for a in argv if a != "--soak"])
    if "--fuzz" in argv:  # hostile input at volume (entry/fuzz.py)
        from . import fuzz as fuzzrun
        return fuzzrun.main([a for a in argv if a != "--fuzz"])
    ap = argparse.ArgumentParser(
        prog="run.py chaos", description="A bounded randomized fault run: producers send results while "
        "actors are killed and hung, the database is locked, garbage arrives and (with its own daemon) the "
        "whole daemon is SIGKILLed and restarted. Then every `stored` reply is checked against SQLite.",
        epilog="examples:\n  python run.py chaos --duration 120 --seed 7\n"
               "  python run.py chaos --soak --duration 3600 --csv samples.csv   (see chaos --soak --help)\n"
               "  python run.py chaos --fuzz --frames 10000 --garbage-bytes 2G   (see chaos --fuzz --help)\n"
               "  python run.py chaos --config my.toml --duration 60   (a running daemon with "
               "admin.allow_fault_injection = true; no daemon kills)\n"
               "exit code 0 when lost = 0, duplicates = 0 and nothing partial is visible",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of faults (default 60)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", help="use the running daemon of this config instead of starting one")
    ap.add_argument("--json", action="store_true")
    ns = ap.parse_args(argv)
    if ns.duration <= 0 or ns.duration > 3600:
        ap.error("--duration must be in (0, 3600]")
    own = ns.config is None
    if own:
        tmp = Path(tempfile.mkdtemp(prefix="pairlane-chaos-"))
        d = Daemon(tmp / "daemon", {"dlq": {"retry_min_s": 0.2, "retry_max_s": 2.0},
                                    "gateway": {"assembly_timeout_s": 30.0},
                                    "pairs": {"interval_s": 5.0}})
        print(f"chaos: starting a daemon in {tmp}", file=sys.stderr)
        d.start()
    else:
        from pairlane import config as cfgmod
        cfg = cfgmod.load(ns.config)
        if not cfg["admin"]["allow_fault_injection"]:
            print("chaos: the daemon must run with admin.allow_fault_injection = true", file=sys.stderr)
            return 2
        d = Daemon.attach(cfg, ns.config)
        if d.admin("status", timeout=3) is None:
            print(f"chaos: no daemon answers at {cfg['admin']['endpoint']}", file=sys.stderr)
            return 4
    summary = None
    try:
        summary = run_chaos(d, ns.duration, ns.seed, own)
    finally:
        if own:  # a clean run leaves nothing in /tmp; a failed one keeps the daemon's files and says where
            d.close_and_remove(tmp, keep=summary is None or not _clean(summary))
    if ns.json:
        import json
        print(json.dumps(summary, indent=2))
    else:
        print("chaos summary")
        for k in ("faults", "sent", "stored", "not_stored_errors", "lost", "duplicates", "wrong_row_counts",
                  "partial_visible", "max_writers_seen", "recovery_median_s", "recovery_max_s"):
            v = summary[k]
            if isinstance(v, float):
                v = f"{v:.2f}"
            print(f"  {k:<20} {v}")
    return 0 if _clean(summary) else 1


def _clean(summary: dict) -> bool:
    """Nothing lost, duplicated, partly visible or miscounted, and never two writers."""
    return summary["lost"] == 0 and summary["duplicates"] == 0 and summary["partial_visible"] == 0 \
        and summary["wrong_row_counts"] == 0 and summary["max_writers_seen"] <= 1
