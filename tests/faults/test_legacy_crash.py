"""A crash never loses a legacy result (issue 12, PROTOCOL.md section 7 "Legacy additions").

swimmy's PUSH never resends: a message taken off the legacy socket is the only
copy there is. 16 results (one of 100k trades) are pushed; once the legacy
actor has taken all 16 off the socket (so each is in its durable spool), the
legacy actor, or the whole daemon, is SIGKILLed at one of several moments, and
the daemon (restarted on the same store and spool for the whole-daemon kill)
must then store all 16 exactly: status complete, rows = trades, every
(timestamp, pnl) as sent, no duplicate rows, `verify` clean.
"""
from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest
import zmq

from pairlane.entry import chaos
from pairlane import synthetic
from tests.e2e.util import db, duplicate_groups, inspect, wait_until

from .conftest import FAST

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

BIG = 3  # the 100k-trade result's place among the 16
N_BIG = 100_000


def results() -> list[tuple[str, int, int, str]]:
    """(request_id, trades, seed, style) of the 16 results."""
    out = []
    for i in range(16):
        n = N_BIG if i == BIG else 200 + 97 * i
        out.append((f"crash-{i:02d}", n, 900 + i, "lexpr" if i % 4 == 1 else "dotted"))
    return out


def push_all(d) -> None:
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 10000)
    sock.setsockopt(zmq.SNDTIMEO, 10000)
    sock.connect(d.cfg["gateway"]["legacy_endpoint"])
    try:
        for rid, n, seed, style in results():
            sock.send(synthetic.legacy_message(n, style=style, seed=seed, request_id=rid,
                                               strategy_name=f"Crash{rid[-2:]}"))
    finally:
        sock.close()


def complete_count(d) -> int:
    with contextlib.closing(db(d)) as c:
        return c.execute("SELECT count(*) FROM backtest_results WHERE request_id LIKE 'crash-%' "
                         "AND status = 'complete'").fetchone()[0]


def wait_moment(d, moment: str) -> None:
    """Wait for the moment to kill at (observable state, no sleeps)."""
    # every message is off the socket, hence in the durable spool
    wait_until(lambda: inspect(d, "legacy").get("received", 0) >= 16, timeout=60,
               what="the legacy actor to take all 16 messages off its socket")
    if moment == "all_spooled":
        return
    if moment == "feeding_big":
        def feeding():
            job = inspect(d, "legacy")["job"]
            return job is not None and job["request_id"] == f"crash-{BIG:02d}" and job["acked"] >= 2
        wait_until(feeding, timeout=120, interval=0.02, what="the 100k result being fed with chunks acknowledged")
        return
    if moment == "big_stored":
        wait_until(lambda: complete_count(d) >= BIG + 2, timeout=120, interval=0.02,
                   what="the 100k result and the one after it stored")
        return
    raise ValueError(moment)


def assert_all_stored_exactly(d) -> None:
    wait_until(lambda: complete_count(d) == 16, timeout=180, interval=0.2, what="all 16 results complete")
    with contextlib.closing(db(d)) as c:
        for rid, n, seed, _ in results():
            row = c.execute("SELECT status, total_trades, truncated, strategy_name FROM backtest_results "
                            "WHERE request_id = ?", (rid,)).fetchone()
            assert row == ("complete", n, 0, f"Crash{rid[-2:]}"), (rid, row)
            got = c.execute("SELECT timestamp, pnl FROM backtest_trade_logs WHERE request_id = ? "
                            "ORDER BY timestamp", (rid,)).fetchall()
            cols = synthetic.legacy_columns(n, seed=seed)
            assert len(got) == n, (rid, len(got), n)
            assert got == list(zip(cols["timestamp"], cols["pnl"])), rid
            assert duplicate_groups(d, rid) == 0
    assert d.admin("verify")["problems"] == []


def legacy_log_lines(d, event: str) -> list[str]:
    return [ln for ln in Path(d.log_path).read_text(errors="replace").splitlines() if f"event={event} " in ln]


def spool_files(d) -> list[Path]:
    return list((Path(d.cfg["dlq"]["path"]) / "legacy").glob("*.dlq"))


MOMENTS = ["all_spooled", "feeding_big", "big_stored"]


@pytest.mark.parametrize("moment", MOMENTS)
def test_sigkill_of_the_legacy_actor_loses_no_result(make_daemon, moment):
    d = make_daemon(FAST)
    push_all(d)
    wait_moment(d, moment)
    before = complete_count(d)
    chaos.kill_actor(d, "legacy")
    assert d.actor("legacy")["restarts"] >= 1
    if before < 14:  # results were left to do: the new legacy actor found them in its spool
        wait_until(lambda: len(legacy_log_lines(d, "legacy_spool_replay")) >= 1, what="a spool replay logged")
    assert_all_stored_exactly(d)
    wait_until(lambda: not spool_files(d) and inspect(d, "legacy")["spool"]["messages"] == 0,
               what="the legacy spool to be empty")
    stored = legacy_log_lines(d, "legacy_stored")
    for rid, *_ in results():
        assert any(f"request_id={rid} " in ln for ln in stored), f"no legacy_stored line for {rid}"
    assert not [ln for ln in legacy_log_lines(d, "legacy_rejected") if "crash-" in ln]


@pytest.mark.parametrize("moment", MOMENTS)
def test_sigkill_of_the_daemon_loses_no_legacy_result(make_daemon, moment):
    d = make_daemon(FAST)
    push_all(d)
    wait_moment(d, moment)
    before = complete_count(d)
    chaos.kill_daemon(d)
    left = len(spool_files(d))
    if before < 14:
        assert left >= 1, "nothing was left in the spool to replay"
    chaos.restart_daemon(d)  # the same config: the same store and spool
    if left:
        wait_until(lambda: len(legacy_log_lines(d, "legacy_spool_replay")) >= 1, what="a spool replay logged")
    assert_all_stored_exactly(d)
    wait_until(lambda: not spool_files(d), what="the legacy spool to be empty")
    st = inspect(d, "legacy")
    assert st.get("received", 0) == 0 and st.get("replayed", 0) == left, st
    with contextlib.closing(sqlite3.connect(d.db_path)) as c:
        assert c.execute("SELECT count(*) FROM backtest_results WHERE request_id LIKE 'crash-%'").fetchone()[0] == 16


def test_full_spool_stops_reading_the_socket_and_drops_nothing(make_daemon):
    """32 messages already spooled (left by a crash; the first two of 100k trades): the legacy actor
    does not read its socket while the spool is full; swimmy's 10 later pushes wait in ZMQ and are
    all stored once there is room."""
    from pairlane.spool import Spool
    from pairlane.actors.legacy import SPOOL_MAX_ITEMS

    d = make_daemon(FAST, start=False)
    spool = Spool(str(Path(d.cfg["dlq"]["path"]) / "legacy"))
    early = [(f"full-{i:02d}", N_BIG if i < 2 else 50 + i, 300 + i) for i in range(SPOOL_MAX_ITEMS)]
    for rid, n, seed in early:
        spool.put(request_id=None, seq=None, stage="legacy", reason="received", error="",
                  payload=synthetic.legacy_message(n, seed=seed, request_id=rid, strategy_name="Full"))
    d.start()
    late = [(f"late-{i:02d}", 20 + i, 400 + i) for i in range(10)]
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 10000)
    sock.setsockopt(zmq.SNDTIMEO, 10000)
    sock.connect(d.cfg["gateway"]["legacy_endpoint"])
    try:
        for rid, n, seed in late:
            sock.send(synthetic.legacy_message(n, seed=seed, request_id=rid, strategy_name="Late"))

        def feeding_first():
            st = inspect(d, "legacy")
            return st if st["job"] is not None and st["job"]["request_id"] == "full-00" else None
        st = wait_until(feeding_first, timeout=60, interval=0.02, what="the first spooled 100k result being fed")
        assert st["spool"]["messages"] == SPOOL_MAX_ITEMS and st.get("received", 0) == 0, st
        with contextlib.closing(db(d)) as c:
            def all_done():
                return c.execute("SELECT count(*) FROM backtest_results WHERE status = 'complete' AND "
                                 "(request_id LIKE 'full-%' OR request_id LIKE 'late-%')").fetchone()[0] == 42
            wait_until(all_done, timeout=180, interval=0.2, what="all 42 results complete")
            for rid, n, seed in early + late:
                got = c.execute("SELECT count(*), total(pnl) FROM backtest_trade_logs WHERE request_id = ?",
                                (rid,)).fetchone()
                cols = synthetic.legacy_columns(n, seed=seed)
                assert got[0] == n and got[1] == pytest.approx(sum(cols["pnl"]), abs=1e-6), (rid, got, n)
        st = inspect(d, "legacy")
        assert st["received"] == 10 and st["replayed"] == SPOOL_MAX_ITEMS and st["stored"] == 42, st
        assert not spool_files(d)
    finally:
        sock.close(0)
