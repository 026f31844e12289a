"""Two daemons, one PostgreSQL store (PROTOCOL.md section 7, multi-daemon rules; issue 14 item 4):
two real `python run.py` on the test session's throwaway server (tests/pg.py), everything on
127.0.0.1. A request is assembled by the daemon holding its lease (a session advisory lock): the
other answers `busy` with retry_after_s until the owner dies, then resumes from the chunks durable
in the shared store. Exactly one daemon leads pair evaluation; when it dies, the other takes over.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import psycopg
import pytest

from pairlane.client import Producer, encode_chunk, synthetic_columns
from tests.e2e.util import Dealer, duplicate_groups, inspect, metric, result_row, rows_for, wait_until
from tests.faults.test_dlq import kill9_everything

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

FAST_PAIRS = {"pairs": {"interval_s": 2.0}}


@pytest.fixture
def two(make_daemon, pg_url):
    """Daemons A and B on the same store (A started first, so A leads pair evaluation)."""
    a = make_daemon({"store": {"url": pg_url}, "daemon": {"name": "daemon-A"}, **FAST_PAIRS}, name="A")
    b = make_daemon({"store": {"url": pg_url}, "daemon": {"name": "daemon-B"}, **FAST_PAIRS}, name="B")
    return a, b


def begin(rid: str, total_trades: int, total_chunks: int, name: str = "Multi") -> dict:
    return {"type": "begin", "request_id": rid, "strategy_name": name, "total_trades": total_trades,
            "total_chunks": total_chunks}


def chunks_of(rid: str, n: int, size: int) -> list[tuple[int, bytes]]:
    """(seq, chunk frame) of n synthetic trades, `size` rows per chunk."""
    cols = synthetic_columns(n, seed=21, strategy=rid)
    return [(seq, encode_chunk(rid, seq, cols, lo, min(lo + size, n))) for seq, lo in enumerate(range(0, n, size))]


def send_and_ack(dl: Dealer, frames: list[tuple[int, bytes]]) -> None:
    """Send chunks and wait for every per-chunk credit (each chunk durable)."""
    for _, frame in frames:
        dl.send(frame)
    acked = set()
    while len(acked) < len(frames):
        r = dl.recv(20)
        assert r is not None, f"no credit for {[s for s, _ in frames if s not in acked]}"
        assert r["type"] == "credit" and "seq" in r, r
        acked.add(r["seq"])
    assert acked == {s for s, _ in frames}


def test_owner_lease_makes_the_other_daemon_busy_and_dies_with_the_owner(two, pg_url):
    a, b = two
    rid, n = "multi-lease", 40_000
    chunks = chunks_of(rid, n, 10_000)
    assert len(chunks) == 4
    with Dealer(a.gateway_endpoint) as da, Dealer(b.gateway_endpoint) as db_:
        r = da.rt(begin(rid, n, 4))
        assert r["type"] == "credit", r
        send_and_ack(da, chunks[:2])                        # seqs 0 and 1 durable at A; A stalls
        busy = db_.rt(begin(rid, n, 4))
        assert busy["type"] == "error" and busy["code"] == "busy", busy
        assert busy["retry_after_s"] > 0 and busy["request_id"] == rid, busy
        assert "another pairlane daemon" in busy["message"], busy
        assert db_.rt(chunks[2][1])["code"] == "unknown_request"   # B assembles nothing of it
        assert inspect(a, "assembler")["leases"] == 1 and inspect(b, "assembler")["leases"] == 0

        kill9_everything(a)                                 # A's PostgreSQL sessions end with it

        def taken_over():
            reply = db_.rt(begin(rid, n, 4))
            if reply["type"] == "error":
                assert reply["code"] == "busy", reply          # only until the server noticed A's death
                return None
            return reply
        r = wait_until(taken_over, 30, 0.2, "B taking the request over")
        assert r["type"] == "credit", r
        send_and_ack(db_, chunks[2:])                       # only the missing seqs
        stored = db_.rt({"type": "end", "request_id": rid})
    assert stored["type"] == "stored" and stored["trades"] == n, stored
    assert result_row(b, rid)["status"] == "complete"
    assert rows_for(b, rid) == n and duplicate_groups(b, rid) == 0
    assert inspect(b, "assembler")["leases"] == 0           # given back once stored


@pytest.mark.parametrize("n", [200_000, pytest.param(1_000_000, marks=pytest.mark.timeout(600))],
                         ids=["200k", "1M"])
def test_producer_fails_over_to_the_other_daemon_after_sigkill(two, n):
    """SIGKILL of daemon A mid-transfer (issue 14: of a 1M-trade result): the Producer moves to B,
    which resumes from what A made durable; stored exactly once with exact rows."""
    a, b = two
    rid = f"multi-failover-{n}"
    cols = synthetic_columns(n, seed=5, strategy=rid)
    out: dict = {}

    def run() -> None:
        try:
            with Producer([a.gateway_endpoint, b.gateway_endpoint], timeout_s=2.0, retries=20,
                          max_message_bytes=256 * 1024) as p:
                out["reply"] = p.send_result(rid, rid, cols)
                out["stats"] = dict(p.last_stats)
        except Exception as exc:  # noqa: BLE001 - reported below
            out["error"] = exc
    t = threading.Thread(target=run)
    t.start()
    some = n // 5 if n >= 1_000_000 else 1
    wait_until(lambda: rows_for(b, rid) >= some, 120, 0.05, f"{some} rows durable through A")
    kill9_everything(a)
    t.join(480)
    assert not t.is_alive() and "error" not in out, out
    assert out["reply"]["type"] == "stored" and out["reply"]["trades"] == n, out
    assert out["stats"]["failovers"] >= 1, out["stats"]
    assert result_row(b, rid)["status"] == "complete"
    assert rows_for(b, rid) == n and duplicate_groups(b, rid) == 0


def _leader(d) -> bool | None:
    st = d.admin("status", timeout=5.0)
    return st.get("pairs_leader") if st and st.get("ok") else None


def test_exactly_one_pair_leader_and_the_other_takes_over_when_it_dies(two):
    a, b = two
    wait_until(lambda: {_leader(a), _leader(b)} == {True, False}, 20, 0.2, "one leader, one follower")
    leader, follower = (a, b) if _leader(a) else (b, a)
    assert metric(leader, "pairlane_pairs_leader") == 1.0
    assert metric(follower, "pairlane_pairs_leader") == 0.0
    wait_until(lambda: inspect(leader, "pairs")["evaluations"] >= 1, 20, 0.2, "the leader evaluating")
    assert inspect(follower, "pairs")["evaluations"] == 0       # the follower never evaluates
    r = follower.admin("pairs.evaluate", timeout=20)
    lead_name = leader.cfg["daemon"]["name"]
    assert r["ok"] is False and lead_name in r["error"], r
    r = follower.admin("pairs", timeout=20)
    assert r["ok"] is True and r["leader"] is False and r["leader_daemon"] == lead_name, r

    kill9_everything(leader)
    t0 = time.monotonic()
    wait_until(lambda: _leader(follower) is True, 15, 0.1, "the follower leading")
    took = time.monotonic() - t0
    assert took < 10.0, took        # LEADER_CHECK_S (2 s) plus the server noticing the dead session
    wait_until(lambda: inspect(follower, "pairs")["evaluations"] >= 1, 15, 0.2, "the new leader evaluating")
    assert metric(follower, "pairlane_pairs_leader") == 1.0
    r = follower.admin("pairs.evaluate", timeout=30)
    assert r["ok"] is True, r


def test_abandonment_sweep_skips_a_request_another_daemon_holds(make_daemon, pg_url):
    """B sweeps every second (assembly_timeout_s 2 s) while A, patient (60 s), holds a request whose
    begin is older than B's timeout: B never abandons it; A completes it with exact rows."""
    a = make_daemon({"store": {"url": pg_url}, "daemon": {"name": "daemon-A"}}, name="A")
    b = make_daemon({"store": {"url": pg_url}, "daemon": {"name": "daemon-B"},
                     "gateway": {"assembly_timeout_s": 2.0}}, name="B")
    rid, n = "multi-sweep", 20_000
    chunks = chunks_of(rid, n, 10_000)
    with Dealer(a.gateway_endpoint) as da:
        assert da.rt(begin(rid, n, 2))["type"] == "credit"
        send_and_ack(da, chunks[:1])
        # a control: an orphan with the same updated_at as A's request and no lease; B's sweep
        # abandoning it shows that a sweep ran which saw A's request as stale too
        with psycopg.connect(pg_url, autocommit=True) as c:
            c.execute("CREATE TEMP TABLE ctl AS SELECT * FROM backtest_results WHERE request_id = %s", (rid,))
            c.execute("UPDATE ctl SET request_id = 'multi-sweep-orphan', strategy_name = 'Orphan'")
            c.execute("INSERT INTO backtest_results SELECT * FROM ctl")
        wait_until(lambda: (result_row(b, "multi-sweep-orphan") or {}).get("status") == "abandoned", 30, 0.2,
                   "B's sweep abandoning the orphan")
        assert result_row(b, rid)["status"] == "receiving"
        assert rows_for(b, rid) == 10_000
        send_and_ack(da, chunks[1:])
        assert da.rt({"type": "end", "request_id": rid})["type"] == "stored"
    assert result_row(a, rid)["status"] == "complete" and rows_for(a, rid) == n and duplicate_groups(a, rid) == 0


def test_same_request_at_both_daemons_at_once_one_copy_loser_busy(two):
    a, b = two
    rid, n = "multi-race", 20_000
    chunks = chunks_of(rid, n, 10_000)
    with Dealer(a.gateway_endpoint) as da, Dealer(b.gateway_endpoint) as db_:
        da.send(begin(rid, n, 2))
        db_.send(begin(rid, n, 2))
        ra, rb = da.recv(20), db_.recv(20)
        assert sorted([ra["type"], rb["type"]]) == ["credit", "error"], (ra, rb)
        (win, lose), (w, lost) = ((da, db_), (a, b)) if ra["type"] == "credit" else ((db_, da), (b, a))
        assert (rb if win is da else ra)["code"] == "busy"
        send_and_ack(win, chunks)
        assert win.rt({"type": "end", "request_id": rid})["type"] == "stored"
        again = lose.rt(begin(rid, n, 2))                    # the loser retries: the store says stored
        assert again["type"] == "stored" and again["trades"] == n, again
    assert rows_for(w, rid) == n and duplicate_groups(w, rid) == 0
    assert inspect(lost, "assembler").get("in_chunk", 0) == 0


# ----- the lease session cut while receiving (PostgreSQL restart, pg_terminate_backend) --------------
LEASE_HOLDERS = """SELECT l.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.classid::bigint = (hashtextextended(%(rid)s, 0) >> 32) & 4294967295
  AND l.objid::bigint = hashtextextended(%(rid)s, 0) & 4294967295"""


def lease_holders(pg_url: str, rid: str) -> list[tuple[int, str]]:
    """(backend pid, application_name) of every session holding rid's lease (pg_locks)."""
    with psycopg.connect(pg_url, autocommit=True) as c:
        return [tuple(r) for r in c.execute(LEASE_HOLDERS, {"rid": rid}).fetchall()]


def terminate(pg_url: str, pid: int) -> None:
    with psycopg.connect(pg_url, autocommit=True) as c:
        assert c.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0] is True


def test_lease_session_terminated_mid_transfer_the_leases_are_taken_again(two, pg_url):
    """pg_terminate_backend of A's lease session while A receives: A notices within a heartbeat, takes
    the lease again on a new session (pg_locks shows it), B still answers busy, and the result is
    stored once with exact rows."""
    a, b = two
    rid, n = "multi-lease-cut", 40_000
    chunks = chunks_of(rid, n, 10_000)
    with Dealer(a.gateway_endpoint) as da, Dealer(b.gateway_endpoint) as db_:
        assert da.rt(begin(rid, n, 4))["type"] == "credit"
        send_and_ack(da, chunks[:2])
        [(old_pid, app)] = lease_holders(pg_url, rid)
        assert app == "pairlane-leases daemon-A"
        terminate(pg_url, old_pid)
        holders = wait_until(lambda: [h for h in lease_holders(pg_url, rid) if h[0] != old_pid], 15, 0.1,
                             "A taking the lease again on a new session")
        assert [app for _, app in holders] == ["pairlane-leases daemon-A"], holders
        st = inspect(a, "assembler")
        assert st["lease_sessions_lost"] == 1 and st["leases_retaken"] == 1 and st["leases"] == 1, st
        assert "event=leases_lost" in a.log()
        busy = db_.rt(begin(rid, n, 4))
        assert busy["type"] == "error" and busy["code"] == "busy", busy
        send_and_ack(da, chunks[2:])
        stored = da.rt({"type": "end", "request_id": rid})
    assert stored["type"] == "stored" and stored["trades"] == n, stored
    assert result_row(a, rid)["status"] == "complete"
    assert rows_for(a, rid) == n and duplicate_groups(a, rid) == 0
    assert lease_holders(pg_url, rid) == []                 # given back once stored


def test_lease_another_daemon_took_while_the_session_was_cut_stops_assembly_here(two, pg_url):
    """A's lease session is terminated while A's assembler is stopped (SIGSTOP, well inside the
    heartbeat deadline), and B takes the request over in that gap. When A's assembler runs again it
    cannot take the lease back: it stops assembling the request and answers its producer
    `unavailable` (the producer moves to B); B finishes from the chunks A made durable."""
    a, b = two
    rid, n = "multi-lease-taken", 40_000
    chunks = chunks_of(rid, n, 10_000)
    with Dealer(a.gateway_endpoint) as da, Dealer(b.gateway_endpoint) as db_:
        assert da.rt(begin(rid, n, 4))["type"] == "credit"
        send_and_ack(da, chunks[:2])
        [(old_pid, _)] = lease_holders(pg_url, rid)
        asm = a.actor("assembler")["pid"]
        os.kill(asm, signal.SIGSTOP)
        try:
            terminate(pg_url, old_pid)
            wait_until(lambda: not lease_holders(pg_url, rid), 2, 0.02, "the server releasing A's lease")
            took = db_.rt(begin(rid, n, 4))
        finally:
            os.kill(asm, signal.SIGCONT)
        assert took["type"] == "credit", took
        lost = da.recv(15)
        assert lost is not None and lost["type"] == "error" and lost["code"] == "unavailable", lost
        assert lost["request_id"] == rid and lost["retry_after_s"] > 0, lost
        st = inspect(a, "assembler")
        assert st["leases_taken_by_other"] == 1 and st["leases"] == 0, st
        assert a.actor("assembler")["pid"] == asm                 # not restarted: it noticed by itself
        assert da.rt(chunks[2][1])["code"] == "unknown_request"   # A assembles nothing of it now
        send_and_ack(db_, chunks[2:])                              # B needs only the missing seqs
        stored = db_.rt({"type": "end", "request_id": rid})
    assert stored["type"] == "stored" and stored["trades"] == n, stored
    assert result_row(b, rid)["status"] == "complete"
    assert rows_for(b, rid) == n and duplicate_groups(b, rid) == 0
    assert [app for _, app in lease_holders(pg_url, rid)] == []
