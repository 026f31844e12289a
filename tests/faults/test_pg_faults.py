"""Fault scenarios on PostgreSQL while 100k-trade results flow (issue 13): the server crashes
(`pg_ctl stop -m immediate`) and comes back; the whole daemon is SIGKILLed and restarted. Each:
every result a producer saw `stored` ends `complete` with exactly its rows, 0 duplicates, the DLQ
drained. (pg_terminate_backend of the writer and a table lock past lock_timeout are in
tests/e2e/test_postgres.py.) The server crash uses a server of its own, not the session's.
"""
from __future__ import annotations

import threading

import psycopg
import pytest

from entry import chaos
from pairlane.client import Producer, synthetic_columns
from tests.e2e.util import duplicate_groups, inspect, result_row, rows_for, wait_until
from tests.pg import PgServer

from .conftest import FAST

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
N = 100_000


def produce(d, rid: str, out: dict, seed: int) -> None:
    cols = synthetic_columns(N, seed=seed, strategy=rid)
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


@pytest.fixture
def own_server():
    s = PgServer().start()
    try:
        yield s
    finally:
        s.close()


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
