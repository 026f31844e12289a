"""The daemon on PostgreSQL (PROTOCOL.md section 7, `store.url`), through a real `python run.py` and
the test session's throwaway server (tests/pg.py): start-time refusals (exit 2 naming the key),
the writer's backend and database size, and failure routing when the server takes the writer's
session away or a table lock outlasts lock_timeout: every result still ends `complete` with exact
rows, no duplicates, the DLQ drained. (The ingest e2e tests on rows run on both backends in
test_ingest.py and test_pairs_metrics.py.)
"""
from __future__ import annotations

import threading
import time

import psycopg
import pytest

from pairlane.client import Producer, synthetic_columns
from tests.e2e.util import duplicate_groups, inspect, metric, refused, result_row, rows_for, wait_until
from tests.harness import free_port


@pytest.mark.timeout(60)
def test_unreachable_server_exits_2_naming_store_url(make_daemon, pg_server):
    port = free_port()   # nothing listens there
    d = make_daemon({"store": {"url": f"postgresql://postgres:hunter2@127.0.0.1:{port}/x"}}, start=False)
    out = refused(d, timeout=60)
    assert "'store.url'" in out and str(port) in out, out
    assert "hunter2" not in out   # the password never reaches the log


@pytest.mark.timeout(60)
def test_newer_schema_exits_2_naming_store_url(make_daemon, pg_url):
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("CREATE TABLE pairlane_schema(version integer NOT NULL, applied_at double precision NOT NULL)")
        c.execute("INSERT INTO pairlane_schema VALUES (7, 0)")
    out = refused(make_daemon({"store": {"url": pg_url}}, start=False), timeout=60)
    assert "'store.url'" in out and "schema version 7" in out, out


@pytest.mark.timeout(60)
def test_max_bytes_with_postgresql_exits_2(make_daemon, pg_url):
    out = refused(make_daemon({"store": {"url": pg_url, "max_bytes": 1 << 30}}, start=False), timeout=60)
    assert "'store.max_bytes'" in out and "PostgreSQL" in out, out


@pytest.mark.timeout(120)
def test_writer_backend_schema_and_database_size(make_daemon, pg_url):
    d = make_daemon({"store": {"url": pg_url}})
    with psycopg.connect(pg_url) as c:   # created at start
        assert c.execute("SELECT version FROM pairlane_schema").fetchall() == [(1,)]
        size = c.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    w = inspect(d, "writer")
    assert w["backend"] == "postgresql" and "127.0.0.1" in w["path"]
    with Producer(d.gateway_endpoint, timeout_s=20) as p:
        r = p.send_result("pg-size", "PgSize", synthetic_columns(20_000, seed=4, strategy="PgSize"))
    assert r["type"] == "stored" and rows_for(d, "pg-size") == 20_000

    def sampled():
        m = metric(d, "pairlane_db_bytes") or {}
        return m if m.get("file=main", 0) > size else None
    got = wait_until(sampled, 15, 0.2, "pairlane_db_bytes{file=main} above the empty database's size")
    assert got.get("file=wal") == 0.0


def _flow(d, rid: str, n: int, out: dict) -> None:
    cols = synthetic_columns(n, seed=11, strategy=rid)
    try:
        with Producer(d.gateway_endpoint, timeout_s=30, retries=10) as p:
            out["reply"] = p.send_result(rid, rid, cols)
    except Exception as exc:  # noqa: BLE001 - reported by the test
        out["error"] = exc


def _settled(d, rids: list[str], n: int) -> None:
    """Every result complete with exactly n rows and no duplicates, the DLQ drained."""
    for rid in rids:
        wait_until(lambda: (result_row(d, rid) or {}).get("status") == "complete", 60, 0.2, f"{rid} complete")
        assert rows_for(d, rid) == n, rid
        assert duplicate_groups(d, rid) == 0, rid
    wait_until(lambda: inspect(d, "dlq")["depth"] == 0, 60, 0.2, "the DLQ drained")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_pg_terminate_backend_of_the_writer_while_100k_trades_flow(make_daemon, pg_url):
    d = make_daemon({"store": {"url": pg_url}})
    n, rids = 100_000, ["pgkill-a", "pgkill-b"]
    outs = {rid: {} for rid in rids}
    threads = [threading.Thread(target=_flow, args=(d, rid, n, outs[rid])) for rid in rids]
    for t in threads:
        t.start()
    killed = 0
    with psycopg.connect(pg_url, autocommit=True) as c:
        deadline = time.monotonic() + 60
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline and killed < 6:
            got = c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE application_name = 'pairlane-writer' AND datname = current_database()"
                            ).fetchall()
            killed += sum(1 for (ok,) in got if ok)
            time.sleep(0.3)   # pacing of the fault injection, not synchronization
    for t in threads:
        t.join(120)
    assert killed >= 1, "the writer's session was never seen"
    for rid in rids:
        assert "error" not in outs[rid], outs[rid]
        assert outs[rid]["reply"]["type"] == "stored" and outs[rid]["reply"]["trades"] == n, outs[rid]
    _settled(d, rids, n)
    w = inspect(d, "writer")
    assert w["failures"] >= 1   # the kills were felt, and routed


LOCK_HELD_S = 30.0   # the scenario: another session holds the lock this long


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("busy_timeout_ms,reason", [
    (200, "locked"),      # lock_timeout (store.busy_timeout_ms) fires first
    (5000, "timeout"),    # lock_timeout longer than the writer's 2 s statement_timeout: that one fires
])
def test_table_lock_past_lock_timeout_routes_to_the_dlq_and_lands(make_daemon, pg_url, busy_timeout_ms, reason):
    d = make_daemon({"store": {"url": pg_url, "busy_timeout_ms": busy_timeout_ms}})
    n, rid = 100_000, f"pglock-{reason}"
    out: dict = {}
    with psycopg.connect(pg_url) as locker:
        locker.execute("LOCK TABLE backtest_trade_logs IN ACCESS EXCLUSIVE MODE")
        locked_at = time.monotonic()
        t = threading.Thread(target=_flow, args=(d, rid, n, out))
        t.start()
        t.join(120)   # the whole result is spooled and `stored` while the lock is still held
        assert not t.is_alive() and "error" not in out, out
        assert out["reply"]["location"] == "dlq", out
        spooled = inspect(d, "dlq")["depth"]
        assert spooled > 0
        assert {it["reason"] for it in d.admin("dlq.list", {"limit": 1000})["items"]} == {reason}
        time.sleep(max(0.0, LOCK_HELD_S - (time.monotonic() - locked_at)))   # the scenario, not a sync
        with psycopg.connect(pg_url, autocommit=True) as c:  # (the locked table itself cannot be read)
            assert c.execute("SELECT count(*) FROM backtest_chunks WHERE request_id = %s",
                             (rid,)).fetchone()[0] == 0   # no chunk committed, so none of its rows
        assert (result_row(d, rid) or {}).get("status") != "complete"
        locker.rollback()   # the lock ends
    assert out["reply"]["type"] == "stored" and out["reply"]["trades"] == n, out
    _settled(d, [rid], n)


def _terminate_writer(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as c:
        return sum(1 for (ok,) in c.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'pairlane-writer' AND datname = current_database()").fetchall() if ok)


@pytest.mark.timeout(180)
def test_read_only_database_as_after_a_failover_routes_to_the_dlq_and_lands(make_daemon, pg_url):
    """A failover to a standby looks like this to the writer: its session is cut and the server it
    reconnects to refuses writes (ReadOnlySqlTransaction). Simulated on one server with
    default_transaction_read_only; writable again = the new primary is promoted."""
    d = make_daemon({"store": {"url": pg_url}, "dlq": {"retry_min_s": 0.2, "retry_max_s": 1.0}})
    base, dbname = pg_url.rsplit("/", 1)
    admin_url = f"{base}/postgres"   # ALTER DATABASE from outside the database made read-only
    with psycopg.connect(admin_url, autocommit=True) as c:
        c.execute(f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = on')
    assert _terminate_writer(pg_url) == 1
    out: dict = {}
    _flow(d, "pgro-a", 30_000, out)
    assert "error" not in out and out["reply"]["location"] == "dlq", out
    assert inspect(d, "dlq")["depth"] > 0 and rows_for(d, "pgro-a") == 0
    # the first attempt met the cut session (connection); the retries meet the read-only server
    def retried_on_readonly():
        items = d.admin("dlq.list")["items"]
        return items if items and all(it["attempts"] >= 2 and it["reason"] == "readonly" for it in items) else None
    wait_until(retried_on_readonly, 30, 0.2, "every spooled chunk retried against the read-only server")
    with psycopg.connect(admin_url, autocommit=True) as c:
        c.execute(f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = off')
    _terminate_writer(pg_url)   # its next session is writable
    _settled(d, ["pgro-a"], 30_000)


@pytest.mark.timeout(120)
def test_a_string_with_nul_is_refused_at_ingest_never_acknowledged_into_the_dlq(make_daemon, pg_url):
    """PostgreSQL text cannot hold NUL: a chunk carrying one must get `bad_chunk` at once (both stores
    refuse it alike), not a credit for a spool item that could never land."""
    import msgpack
    d = make_daemon({"store": {"url": pg_url}})
    with Producer(d.gateway_endpoint, timeout_s=10) as p:
        p.send_raw(msgpack.packb({"type": "begin", "request_id": "nul-1", "strategy_name": "S",
                                  "total_trades": 2, "total_chunks": 1}))
        assert p.recv(10)["type"] == "credit"
        p.send_raw(msgpack.packb({"type": "chunk", "request_id": "nul-1", "seq": 0,
                                  "trades": {"timestamp": [1, 2], "pnl": [1.0, 2.0], "symbol": ["EUR\x00USD", "X"]}}))
        r = p.recv(10)
        assert r["type"] == "error" and r["code"] == "bad_chunk" and "NUL" in r["message"], r
        # the producer fixes its data and resends under the same request_id: it lands exactly
        p.send_raw(msgpack.packb({"type": "chunk", "request_id": "nul-1", "seq": 0,
                                  "trades": {"timestamp": [1, 2], "pnl": [1.0, 2.0], "symbol": ["EURUSD", "X"]}}))
        assert p.recv(10) == {"type": "credit", "request_id": "nul-1", "credit": 1, "seq": 0}
        p.send_raw(msgpack.packb({"type": "end", "request_id": "nul-1"}))
        r = p.recv(10)
        assert r["type"] == "stored" and r["location"] == "db", r
    assert rows_for(d, "nul-1") == 2 and result_row(d, "nul-1")["status"] == "complete"
    assert inspect(d, "dlq")["depth"] == 0
