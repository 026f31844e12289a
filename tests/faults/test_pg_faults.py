"""Fault scenarios on PostgreSQL while 100k-trade results flow (issue 13): the server crashes
(`pg_ctl stop -m immediate`) and comes back; the whole daemon is SIGKILLed and restarted; the
server's disk (a tablespace on a small tmpfs) is full, then space is freed. Each:
every result a producer saw `stored` ends `complete` with exactly its rows, 0 duplicates, the DLQ
drained. (pg_terminate_backend of the writer and a table lock past lock_timeout are in
tests/e2e/test_postgres.py.) The server crash uses a server of its own, not the session's.
"""
from __future__ import annotations

import errno
import os
import pwd
import signal
import subprocess
import threading
from pathlib import Path

import psycopg
import pytest

from pairlane.entry import chaos
from pairlane.client import Producer, synthetic_columns
from tests.e2e.util import duplicate_groups, inspect, result_row, rows_for, wait_until

from .conftest import FAST

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
N = 100_000


def produce(d, rid: str, out: dict, seed: int) -> None:
    produce_n(d, rid, N, out, seed)


def produce_n(d, rid: str, n: int, out: dict, seed: int = 0) -> None:
    cols = synthetic_columns(n, seed=seed, strategy=rid)
    try:
        with Producer(d.gateway_endpoint, timeout_s=10, retries=30) as p:
            out["reply"] = p.send_result(rid, rid, cols)
    except Exception as exc:  # noqa: BLE001 - reported by the test
        out["error"] = exc


def start_flows(d, rids: list[str]) -> tuple[dict, list[threading.Thread]]:
    outs = {rid: {} for rid in rids}
    threads = [threading.Thread(target=produce, args=(d, rid, outs[rid], i), daemon=True)
               for i, rid in enumerate(rids)]
    for t in threads:
        t.start()
    return outs, threads


def settled(d, outs: dict, threads) -> None:
    for t in threads:
        t.join(200)
        assert not t.is_alive(), "a producer did not finish"
    for rid, out in outs.items():
        assert "error" not in out, (rid, out, d.log()[-3000:])
        assert out["reply"]["type"] == "stored" and out["reply"]["trades"] == N, out
        wait_until(lambda: (result_row(d, rid) or {}).get("status") == "complete", 90, 0.2, f"{rid} complete")
        assert rows_for(d, rid) == N, rid
        assert duplicate_groups(d, rid) == 0, rid
    wait_until(lambda: inspect(d, "dlq")["depth"] == 0, 90, 0.2, "the DLQ drained")
    assert d.admin("verify")["problems"] == []


def test_server_crash_and_restart_while_results_flow(make_daemon, own_server):
    url = own_server.database()
    d = make_daemon(dict(FAST, store={"url": url}))
    outs, threads = start_flows(d, ["pgcrash-a", "pgcrash-b"])
    wait_until(lambda: rows_for(d, "pgcrash-a") + rows_for(d, "pgcrash-b") > 0, 60, 0.05, "rows flowing")
    own_server.stop("immediate")    # a crash: no checkpoint, sessions cut
    try:
        wait_until(lambda: inspect(d, "dlq")["depth"] > 0 or not any(t.is_alive() for t in threads),
                   60, 0.1, "chunks spooled while the server is down")
    finally:
        own_server.start_again()
    settled(d, outs, threads)
    assert inspect(d, "writer")["failures"] >= 1


def test_daemon_sigkill_and_restart_while_results_flow(make_daemon, pg_url):
    d = make_daemon(dict(FAST, store={"url": pg_url}))
    outs, threads = start_flows(d, ["pgdk-a", "pgdk-b"])
    wait_until(lambda: rows_for(d, "pgdk-a") + rows_for(d, "pgdk-b") > 0, 60, 0.05, "rows flowing")
    chaos.restart_daemon(d)
    settled(d, outs, threads)
    with psycopg.connect(pg_url) as c:   # one writer session at a time, after the restart too
        assert c.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pairlane-writer' "
                         "AND datname = current_database()").fetchone()[0] <= 1


def writer_pid(d):
    r = d.admin("inspect", {"actor": "writer"})
    return r["state"]["pid"] if r and r.get("ok") else None


def test_a_writer_whose_database_stops_answering_is_restarted_and_nothing_is_lost(make_daemon, pg_url):
    """The writer's session's backend is SIGSTOPped in the middle of a 100k-trade result: the server
    answers nothing (no statement_timeout can fire), so the writer hangs in a query. The watchdog must
    kill it and the new writer take over, or every write would stop for good."""
    d = make_daemon(dict(FAST, store={"url": pg_url}))
    outs, threads = start_flows(d, ["pgstop-a"])
    wait_until(lambda: rows_for(d, "pgstop-a") > 0, 60, 0.05, "rows flowing")
    before = writer_pid(d)
    with psycopg.connect(pg_url, autocommit=True) as c:
        backend = c.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'pairlane-writer' "
                            "AND datname = current_database()").fetchone()[0]
    os.kill(backend, signal.SIGSTOP)
    try:
        wait_until(lambda: "watchdog_kill child=writer" in d.log(), 30, 0.1, "the hung writer killed")
        wait_until(lambda: writer_pid(d) not in (None, before), 30, 0.2, "a new writer")
    finally:
        os.kill(backend, signal.SIGCONT)   # it finds its client gone and rolls back what it held
    settled(d, outs, threads)


# ----- the server's disk full (issue 13) ------------------------------------------------------------
@pytest.fixture
def small_tablespace(pg_server, pg_url):
    """A tablespace on a 16 MiB tmpfs of its own, for pg_url's database; yields (url, mount dir,
    tablespace name). Needs root (mount), as CI runs; skipped otherwise. Request it before
    make_daemon, so the daemon stops before the database and the mount go."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = Path(pg_server.root) / ("small-" + pg_url.rsplit("/", 1)[1])   # a path the server's user can reach
    mnt.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    space = mnt / "ts"
    space.mkdir()
    pw = pwd.getpwnam("postgres")
    os.chown(space, pw.pw_uid, pw.pw_gid)
    name = "small_" + pg_url.rsplit("/", 1)[1]
    try:
        with psycopg.connect(pg_url, autocommit=True) as c:
            c.execute(f"CREATE TABLESPACE {name} LOCATION '{space}'")
        yield pg_url, mnt, name
    finally:
        pg_server.drop(pg_url)   # its files in the tablespace go with it
        with pg_server.admin() as c:
            c.execute(f"DROP TABLESPACE IF EXISTS {name}")
        subprocess.run(["umount", str(mnt)], check=False)
        mnt.rmdir()


def fill(mnt, name: str = "filler") -> int:
    """Fill the filesystem at mnt to the last byte; the bytes written."""
    n = 0
    block = b"\0" * (64 * 1024)
    with open(mnt / name, "wb", buffering=0) as fh:
        while True:
            try:
                n += fh.write(block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
        for size in (4096, 512, 1):     # the last partial block too
            try:
                while True:
                    n += fh.write(b"\0" * size)
            except OSError:
                continue
    return n


@pytest.mark.timeout(240)
def test_server_disk_full_routes_to_the_dlq_with_reason_full_and_lands_once_space_is_freed(small_tablespace,
                                                                                           make_daemon):
    url, mnt, space = small_tablespace
    d = make_daemon(dict(FAST, store={"url": url}))
    with psycopg.connect(url, autocommit=True) as c:   # the daemon created the schema; the rows go to the small disk
        c.execute(f"ALTER TABLE backtest_trade_logs SET TABLESPACE {space}")
        indexes = c.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'backtest_trade_logs'").fetchall()
        for (index,) in indexes:
            c.execute(f'ALTER INDEX "{index}" SET TABLESPACE {space}')
    assert fill(mnt) > 0
    rid, n = "pgfull-a", 30_000
    out: dict = {}
    produce_n(d, rid, n, out)
    assert "error" not in out, (out, d.log()[-3000:])
    assert out["reply"]["type"] == "stored" and out["reply"]["trades"] == n, out
    assert out["reply"]["location"] == "dlq", out        # acknowledged: durable in the spool
    items = d.admin("dlq.list", {"limit": 1000})["items"]
    assert items and {it["reason"] for it in items} == {"full"}, items
    assert rows_for(d, rid) == 0
    assert (result_row(d, rid) or {}).get("status") != "complete"
    wait_until(lambda: all(it["attempts"] >= 2 for it in d.admin("dlq.list", {"limit": 1000})["items"]), 30, 0.2,
               "the spooled chunks retried against the full disk")
    assert rows_for(d, rid) == 0
    os.remove(mnt / "filler")                            # space freed
    wait_until(lambda: (result_row(d, rid) or {}).get("status") == "complete", 90, 0.2, f"{rid} complete")
    assert rows_for(d, rid) == n and duplicate_groups(d, rid) == 0
    wait_until(lambda: inspect(d, "dlq")["depth"] == 0, 60, 0.2, "the DLQ drained")
    assert d.admin("verify")["problems"] == []
