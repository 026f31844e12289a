"""Chaos over several daemons sharing one PostgreSQL store (issue 14's multi-daemon chaos run).

Owns: the multi-daemon fault loop (SIGKILL of an actor of either daemon, SIGKILL of a whole daemon
and its restart a few seconds later, a PostgreSQL crash-restart through a callable the caller
provides), producers that fail over between the daemons (`entry.chaos.Traffic` with an endpoint
list, one producer preferring each daemon), and `check_pg`, the PostgreSQL counterpart of
`entry.chaos.check`: every `stored` reply is compared with the shared store (complete, exact row
count, no duplicate rows, nothing partial visible). Never trusts log lines and never starts or
stops a PostgreSQL server itself (the caller owns it); the daemons are the caller's too, this only
kills and restarts them.
"""
from __future__ import annotations

import os
import random
import signal
import statistics
import sys
import time
from typing import Callable

from .chaos import ACTORS, Traffic, check_rows, kill_daemon, wait_all_running
from .harness import Daemon

FAULTS = ("kill_actor", "kill_daemon", "pg_restart")


def check_pg(url: str, stored: dict, wait_s: float = 120.0) -> dict:
    """Compare every stored reply with the PostgreSQL store at `url`; waits up to wait_s for results
    still in a daemon's DLQ to land."""
    import psycopg
    with psycopg.connect(url, autocommit=True) as conn:
        return check_rows(lambda sql: conn.execute(sql).fetchall(), stored, wait_s)


def run_multi_chaos(daemons: list[Daemon], duration: float, seed: int,
                    pg_restart: Callable[[float], None] | None = None,
                    min_trades: int = 5_000, max_trades: int = 60_000, out=sys.stderr) -> dict:
    """Faults for `duration` seconds while one producer per daemon sends (preferring that daemon,
    failing over to the others); then every daemon is brought back, traffic stops and the store is
    checked. pg_restart(down_s) crashes the server, keeps it down down_s seconds and starts it again.
    Returns a summary (see `clean`)."""
    rng = random.Random(seed)
    endpoints = [d.gateway_endpoint for d in daemons]
    traffic = [Traffic(endpoints[i:] + endpoints[:i], producers=1, seed=seed, prefix=f"mchaos{i}",
                       min_trades=min_trades, max_trades=max_trades, timeout_s=3.0, retries=80).start()
               for i in range(len(daemons))]
    injected: dict[str, int] = {}
    recovery: list[float] = []
    faults = [f for f in FAULTS if pg_restart is not None or f != "pg_restart"]
    t_end = time.monotonic() + duration
    try:
        while time.monotonic() < t_end:
            time.sleep(rng.uniform(1.0, 3.0))
            fault = rng.choice(faults)
            i = rng.randrange(len(daemons))
            d = daemons[i]
            what = f"daemon{i}"
            if fault == "kill_actor":
                actor = rng.choice(ACTORS)
                what += ":" + actor
                pid = d.actor(actor)["pid"]
                os.kill(pid, signal.SIGKILL)
                recovery.append(wait_all_running(d, timeout=40.0, old_pids={actor: pid}))
            elif fault == "kill_daemon":
                kill_daemon(d)
                time.sleep(rng.uniform(1.0, 4.0))   # the others carry the load meanwhile (failover)
                t0 = time.monotonic()
                d.pgid = None
                d.known_pids = set()
                d.start(timeout=60.0)
                recovery.append(time.monotonic() - t0)
            else:
                what = "server"
                pg_restart(rng.uniform(0.5, 3.0))
                for x in daemons:
                    recovery.append(wait_all_running(x, timeout=60.0))
            injected[fault] = injected.get(fault, 0) + 1
            print(f"chaos_multi: {fault:<12} {what:<20} stored so far {sum(len(t.stored) for t in traffic)}",
                  file=out, flush=True)
    finally:
        for t in traffic:
            t.stop(180.0)
    for d in daemons:
        wait_all_running(d, timeout=60.0)
    stored: dict = {}
    sent = errors = 0
    for t in traffic:
        stored.update(t.stored)
        sent += len(t.sent)
        errors += len(t.errors)
    res = check_pg(daemons[0].cfg["store"]["url"], stored)
    return {"faults": injected, "sent": sent, "stored": len(stored), "not_stored_errors": errors,
            "lost": len(res["lost"]), "lost_ids": res["lost"][:10], "duplicates": res["duplicate_rows"],
            "wrong_row_counts": len(res["wrong_row_counts"]), "partial_visible": len(res["partial_visible"]),
            "still_running": sum(1 for t in traffic for th in t._threads if th.is_alive()),
            "recovery_median_s": statistics.median(recovery) if recovery else None,
            "recovery_max_s": max(recovery) if recovery else None}


def clean(summary: dict) -> bool:
    """Nothing lost, duplicated, partly visible or miscounted."""
    return (summary["lost"] == 0 and summary["duplicates"] == 0 and summary["partial_visible"] == 0
            and summary["wrong_row_counts"] == 0)
