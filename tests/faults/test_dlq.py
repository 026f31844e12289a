"""Fault tests of the dead-letter queue keeper, through a real daemon (PROTOCOL.md sections 0, 1, 4).

Each test breaks the database (a lock held by another connection, a size cap,
a full tmpfs), sends real results over ZMQ, and proves on the rows in SQLite
that a `stored` promise is kept: the result reaches the database with exactly
its rows, none lost, none duplicated, and the spool ends empty. Also: the spool
itself full (`unavailable` with retry_after_s), kill -9 of the dlq actor and of
the whole daemon with items spooled, parking after dlq.max_attempts with
replay and purge, and a corrupt spool file quarantined.

The figures of the 30 s lock test are printed (`DLQ-FIGURES ...`, run with -s
or -rP to see them) for the README section "When the database fails".
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from pairlane.client import Producer, encode_chunk, plan_chunks, synthetic_columns

pytestmark = pytest.mark.timeout(180)

N_BIG = 100_000                          # rows of the "100k-trade result"
FAST_RETRY = {"retry_min_s": 0.5, "retry_max_s": 2.0}


# ----- helpers ------------------------------------------------------------------------------------------
def rows_of(db_path: str, rid: str) -> dict:
    """What SQLite holds for one result: status, rows, distinct timestamps, chunks, pnl sum."""
    c = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        st = c.execute("SELECT status, total_trades FROM backtest_results WHERE request_id = ?", (rid,)).fetchone()
        n, distinct, pnl, tmin, tmax = c.execute(
            "SELECT count(*), count(DISTINCT timestamp), coalesce(sum(pnl), 0), min(timestamp), max(timestamp) "
            "FROM backtest_trade_logs WHERE request_id = ?", (rid,)).fetchone()
        chunks = c.execute("SELECT count(*) FROM backtest_chunks WHERE request_id = ?", (rid,)).fetchone()[0]
    finally:
        c.close()
    return {"status": st[0] if st else None, "total_trades": st[1] if st else None, "rows": n,
            "distinct_ts": distinct, "pnl": pnl, "tmin": tmin, "tmax": tmax, "chunks": chunks}


def assert_exact(db_path: str, rid: str, cols: dict, total_chunks: int | None = None) -> dict:
    """The result is complete with exactly the producer's rows: none lost, none duplicated."""
    r = rows_of(db_path, rid)
    n = len(cols["pnl"])
    assert r["status"] == "complete", r
    assert r["total_trades"] == n, r
    assert r["rows"] == n, r
    # synthetic timestamps rise strictly, so a duplicated row shows as distinct < rows
    assert r["distinct_ts"] == n, r
    assert (r["tmin"], r["tmax"]) == (int(cols["timestamp"][0]), int(cols["timestamp"][-1])), r
    assert abs(r["pnl"] - float(cols["pnl"].sum())) < 1e-6 * max(1.0, abs(float(cols["pnl"].sum()))) + 1e-3, r
    if total_chunks is not None:
        assert r["chunks"] == total_chunks, r
    return r


def wait_complete(d, rid: str, timeout: float) -> float:
    """Poll SQLite until the result is complete; returns the seconds it took."""
    t0 = time.monotonic()

    def done():
        return rows_of(d.db_path, rid)["status"] == "complete"
    d.wait_for(done, timeout, interval=0.05, what=f"{rid} complete in SQLite")
    return time.monotonic() - t0


def dlq_state(d) -> dict:
    r = d.admin("inspect", {"actor": "dlq"})
    assert r and r.get("ok"), r
    return r["state"]


def dlq_items(d) -> list[dict]:
    r = d.admin("dlq.list", {"limit": 1000})
    assert r and r.get("ok"), r
    return r["items"]


def wait_dlq_empty(d, timeout: float) -> dict:
    return d.wait_for(lambda: (lambda s: s if s["depth"] == 0 and s["retries_in_flight"] == 0 else None)(
        dlq_state(d)), timeout, what="dlq empty")


@contextlib.contextmanager
def exclusive_lock(db_path: str):
    """Another process's view of the database: a connection holding BEGIN EXCLUSIVE."""
    c = sqlite3.connect(db_path, isolation_level=None, timeout=10)
    c.execute("BEGIN EXCLUSIVE")
    released = {"at": None}

    def release():
        if released["at"] is None:
            c.execute("ROLLBACK")
            released["at"] = time.monotonic()
        return released["at"]
    try:
        yield release
    finally:
        release()
        c.close()


def same_paths(d, **sections) -> dict:
    """Overrides for a new daemon on the store and spool of `d`, with `sections` merged in."""
    out = {"store": {"path": d.cfg["store"]["path"], "max_bytes": d.cfg["store"].get("max_bytes", 0)},
           "dlq": {k: v for k, v in d.cfg["dlq"].items()}}
    for sect, kv in sections.items():
        out.setdefault(sect, {}).update(kv)
    return out


def send(d, rid: str, cols: dict, strategy: str = "S1", timeout_s: float = 30.0) -> dict:
    with Producer(d.gateway_endpoint, timeout_s=timeout_s) as p:
        return p.send_result(rid, strategy, cols)


def kill9_everything(d) -> list[int]:
    """SIGKILL the daemon's main process and the whole actor process group (nothing graceful)."""
    assert d.pgid and d.pgid != os.getpgid(0), "the actor group must not be the test's own group"
    pids = d.all_pids()
    os.kill(d.proc.pid, signal.SIGKILL)
    os.killpg(d.pgid, signal.SIGKILL)
    d.proc.wait(10)
    deadline = time.monotonic() + 10
    while d.all_pids() and time.monotonic() < deadline:
        for pid in d.all_pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    assert not d.all_pids(), d.all_pids()
    return pids


# ----- the database is locked for 30 s ------------------------------------------------------------------
def test_locked_database_spools_a_100k_result_and_drains_after_release(make_daemon):
    # max_attempts is raised so that 30 s of failures with retry_max_s = 2 never park an item
    d = make_daemon({"dlq": dict(FAST_RETRY, max_attempts=1000)})
    cols = synthetic_columns(N_BIG, seed=11)
    with exclusive_lock(d.db_path) as release:
        locked_at = time.monotonic()
        reply = send(d, "lock-100k", cols)
        stored_after = time.monotonic() - locked_at
        assert reply["type"] == "stored" and reply["location"] == "dlq", reply
        assert reply["trades"] == N_BIG
        st = dlq_state(d)
        spooled = st["depth"]
        assert spooled >= 1 and st["parked"] == 0, st
        assert all(it["reason"] == "locked" and it["request_id"] == "lock-100k" for it in dlq_items(d))
        assert rows_of(d.db_path, "lock-100k")["rows"] == 0          # nothing got past the lock
        time.sleep(max(0.0, 30.0 - (time.monotonic() - locked_at)))
        st = dlq_state(d)
        assert st["depth"] == spooled and st["parked"] == 0, st      # still held, nothing dropped
        attempts = sorted(it["attempts"] for it in dlq_items(d))
        # every item was retried again and again while locked, none starved by the older ones
        assert attempts[0] >= 3, attempts
        released_at = release()
    drain_s = wait_complete(d, "lock-100k", 30)
    drained = wait_dlq_empty(d, 10)
    empty_s = time.monotonic() - released_at
    r = assert_exact(d.db_path, "lock-100k", cols, total_chunks=spooled)
    assert drained["landed"] == spooled and drained.get("parked", 0) == 0, drained
    assert drain_s < 15, drain_s
    print(f"\nDLQ-FIGURES lock: rows={r['rows']} chunks_spooled={spooled} bytes_spooled={st['bytes']} "
          f"stored_reply_after_s={stored_after:.2f} lock_held_s={released_at - locked_at:.1f} "
          f"attempts_per_item={attempts} "
          f"landed={drained['landed']} release_to_complete_s={drain_s:.2f} release_to_dlq_empty_s={empty_s:.2f}")


# ----- the disk is full ---------------------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {res.stderr.strip()}")
    try:
        yield path
    finally:
        res = subprocess.run(["umount", str(path)], capture_output=True, text=True)
        if res.returncode != 0:  # still busy: never leave a mount behind
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.parametrize("variant", ["cap", "tmpfs"])
def test_full_disk_spools_then_every_item_lands_after_restart_with_room(make_daemon, tmp_path, variant):
    cols = synthetic_columns(N_BIG, seed=12)
    with contextlib.ExitStack() as stack:
        if variant == "cap":
            store = {"max_bytes": 2 * 1024 * 1024}
        else:
            mnt = stack.enter_context(tmpfs(tmp_path / "tiny", "4m"))
            store = {"path": str(mnt / "pairlane.db")}
        d = make_daemon({"store": store, "dlq": FAST_RETRY}, name="full")
        daemons = [d]
        try:
            reply = send(d, "full-100k", cols)
            assert reply["type"] == "stored" and reply["location"] == "dlq", reply
            items = dlq_items(d)
            assert items and all(it["reason"] == "full" for it in items), items
            before = rows_of(d.db_path, "full-100k")
            assert before["status"] != "complete" and before["rows"] < N_BIG, before
            assert d.stop() == 0
            if variant == "cap":
                overrides = same_paths(d, store={"max_bytes": 0})
            else:
                subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
                overrides = same_paths(d)
            on_disk = len(list(Path(d.cfg["dlq"]["path"]).glob("*.dlq")))
            assert on_disk >= 1
            d2 = make_daemon(overrides, name="roomy")
            daemons.append(d2)
            st = dlq_state(d2)                                         # recovered from disk (some may
            assert st["depth"] + st.get("landed", 0) == on_disk, st    # have landed before `ready`)
            wait_complete(d2, "full-100k", 30)
            assert wait_dlq_empty(d2, 10)["landed"] == on_disk
            r = assert_exact(d2.db_path, "full-100k", cols)
            assert r["chunks"] >= on_disk
        finally:
            for x in daemons:               # release the tmpfs before it is unmounted
                if x.proc is not None and x.proc.poll() is None:
                    x.stop(20)


# ----- the spool is full too ----------------------------------------------------------------------------
def test_spool_full_answers_unavailable_and_the_producers_retry_succeeds_after_caps_are_raised(make_daemon):
    cols = synthetic_columns(N_BIG, seed=13)
    rid = "spoolfull-100k"
    d = make_daemon({"store": {"max_bytes": 2 * 1024 * 1024},
                     "dlq": dict(FAST_RETRY, max_bytes=3 * 1024 * 1024)}, name="tight")
    ranges = plan_chunks(cols, 1 << 20)
    # 1) a raw DEALER sees the error reply itself
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(d.gateway_endpoint)
    try:
        s.send(msgpack.packb({"type": "begin", "request_id": rid, "strategy_name": "S1",
                              "total_trades": N_BIG, "total_chunks": len(ranges)}))
        assert s.poll(10000)
        credit = msgpack.unpackb(s.recv(), raw=False)
        assert credit["type"] == "credit", credit
        for seq in range(credit["credit"]):
            s.send(encode_chunk(rid, seq, cols, *ranges[seq]))
        errors, acked = [], []
        deadline = time.monotonic() + 30
        while len(errors) + len(acked) < credit["credit"] and time.monotonic() < deadline:
            if s.poll(1000):
                m = msgpack.unpackb(s.recv(), raw=False)
                (errors if m["type"] == "error" else acked).append(m)
    finally:
        s.close(0)
        ctx.term()
    assert errors, f"no error reply; acks: {acked}"
    assert all(e["code"] == "unavailable" and e["request_id"] == rid for e in errors), errors
    assert all(isinstance(e.get("retry_after_s"), float) and e["retry_after_s"] > 0 for e in errors), errors
    assert "spool" in errors[0]["message"], errors[0]
    assert dlq_state(d)["rejected"] >= len(errors)
    spooled = dlq_state(d)["depth"]
    assert spooled >= 1

    # 2) the stock Producer keeps retrying (unavailable, then the daemon's restart) ...
    out: dict = {}

    def produce():
        try:
            with Producer(d.gateway_endpoint, timeout_s=5, retries=40) as p:
                out["producer"] = p
                out["reply"] = p.send_result(rid, "S1", cols)
                out["stats"] = dict(p.last_stats)
        except BaseException as exc:  # reported by the assertion below
            out["error"] = exc
    t = threading.Thread(target=produce, daemon=True)
    t.start()
    d.wait_for(lambda: out.get("error") or (out.get("producer") and out["producer"].last_stats.get("busy_waits")),
               30, what="the producer to meet `unavailable`")
    assert "error" not in out, out
    # 3) ... while the operator raises both caps: same store, spool and gateway endpoint
    assert d.stop() == 0
    d2 = make_daemon(same_paths(d, store={"max_bytes": 0}, dlq={"max_bytes": 0},
                                gateway={"endpoint": d.gateway_endpoint}), name="raised")
    t.join(120)
    assert not t.is_alive(), "producer still running"
    assert "error" not in out, out
    assert out["reply"]["type"] == "stored" and out["reply"]["trades"] == N_BIG, out
    assert out["stats"]["busy_waits"] >= 1, out["stats"]
    wait_complete(d2, rid, 30)
    wait_dlq_empty(d2, 15)
    assert_exact(d2.db_path, rid, cols, total_chunks=len(ranges))


# ----- a group commit that fails --------------------------------------------------------------------------
def test_a_failed_group_commit_spools_each_chunk_alone_and_all_of_them_land(make_daemon):
    """Small chunks reaching the writer together are committed as one group; when the database is
    locked, the group rolls back and each chunk goes its own way: written alone, and spooled alone
    when that fails too. Every chunk is one dlq item, none is lost or doubled, all land after."""
    d = make_daemon({"dlq": dict(FAST_RETRY, max_attempts=1000)})
    cols = synthetic_columns(480, seed=17)
    with exclusive_lock(d.db_path) as release:
        with Producer(d.gateway_endpoint, timeout_s=30, max_chunk_rows=10) as p:
            reply = p.send_result("lock-grouped", "S1", cols)
        assert reply["type"] == "stored" and reply["location"] == "dlq", reply
        writer = d.admin("inspect", {"actor": "writer"})["state"]
        assert writer["group_failures"] >= 1 and writer["group_commits"] == 0, writer
        items = dlq_items(d)
        assert sorted(it["seq"] for it in items) == list(range(48)), items   # one item per chunk
        assert rows_of(d.db_path, "lock-grouped")["rows"] == 0
        release()
    wait_complete(d, "lock-grouped", 30)
    wait_dlq_empty(d, 15)
    assert_exact(d.db_path, "lock-grouped", cols, total_chunks=48)
    assert "group_commit_failed" in d.log()


# ----- kill -9 with items spooled -----------------------------------------------------------------------
def test_kill9_of_the_dlq_actor_with_items_spooled_loses_nothing(make_daemon):
    d = make_daemon({"dlq": dict(FAST_RETRY, max_attempts=1000)})
    cols = synthetic_columns(N_BIG, seed=14)
    with exclusive_lock(d.db_path) as release:
        reply = send(d, "kill-dlq", cols)
        assert reply["location"] == "dlq", reply
        before = dlq_state(d)
        old = d.actor("dlq")
        os.kill(old["pid"], signal.SIGKILL)
        new = d.wait_running("dlq", restarts=old["restarts"] + 1, timeout=15)
        assert new["pid"] != old["pid"]
        after = dlq_state(d)
        assert after["depth"] == before["depth"], (before, after)   # every item recovered from disk
        release()
    wait_complete(d, "kill-dlq", 30)
    wait_dlq_empty(d, 10)
    assert_exact(d.db_path, "kill-dlq", cols, total_chunks=before["depth"])


def test_kill9_of_the_whole_daemon_with_items_spooled_loses_nothing(make_daemon):
    d = make_daemon({"dlq": dict(FAST_RETRY, max_attempts=1000)}, name="killed")
    cols = synthetic_columns(N_BIG, seed=15)
    with exclusive_lock(d.db_path) as release:
        reply = send(d, "kill-all", cols)
        assert reply["location"] == "dlq", reply
        spooled = dlq_state(d)["depth"]
        d.status()  # learn every pid and the actor group
        killed = kill9_everything(d)
        assert len(killed) >= 10, killed
        # the database is still locked while the new daemon starts: the spool is recovered anyway
        d2 = make_daemon(same_paths(d), name="revived")
        assert dlq_state(d2)["depth"] == spooled
        release()
    wait_complete(d2, "kill-all", 30)
    wait_dlq_empty(d2, 10)
    assert_exact(d2.db_path, "kill-all", cols, total_chunks=spooled)


# ----- parking, replay, purge ---------------------------------------------------------------------------
def test_items_park_after_max_attempts_then_replay_lands_one_and_purge_drops_the_rest(make_daemon):
    d = make_daemon({"dlq": {"retry_min_s": 0.1, "retry_max_s": 0.3, "max_attempts": 2}})
    sets = {f"park-{k}": synthetic_columns(500, seed=20 + i) for i, k in enumerate("abc")}
    with exclusive_lock(d.db_path) as release:
        for rid, cols in sets.items():
            assert send(d, rid, cols)["location"] == "dlq"

        def all_parked():
            items = dlq_items(d)
            return items if len(items) == 3 and all(it["parked"] for it in items) else None
        items = d.wait_for(all_parked, 20, what="3 parked items")
        assert all(it["attempts"] == 3 for it in items), items      # the spooling failure + 2 retries
        assert dlq_state(d)["parked"] == 3
        release()
    by_rid = {it["request_id"]: it["id"] for it in items}
    # a parked item is never retried on its own, even once the database is fine again
    time.sleep(1.5)
    assert [it["attempts"] for it in dlq_items(d)] == [3, 3, 3]
    assert all(rows_of(d.db_path, rid)["rows"] == 0 for rid in sets)
    shown = d.admin("dlq.show", {"id": by_rid["park-a"]})
    assert shown["ok"] and shown["item"]["parked"] and "locked" in shown["item"]["error"], shown

    # replay one -> it lands
    r = d.admin("dlq.replay", {"id": by_rid["park-a"]})
    assert r == {"ok": True, "queued": 1}, r
    wait_complete(d, "park-a", 15)
    assert_exact(d.db_path, "park-a", sets["park-a"], total_chunks=1)
    d.wait_for(lambda: len(dlq_items(d)) == 2, 10, what="replayed item gone")

    # purge one by id
    r = d.admin("dlq.purge", {"id": by_rid["park-b"]})
    assert r == {"ok": True, "purged": 1}, r
    assert [it["request_id"] for it in dlq_items(d)] == ["park-c"]

    # purge --all through the CLI: refused without --yes, done with it
    cli = d.admin_cli("dlq.purge", "--all")
    assert cli.returncode == 1, (cli.returncode, cli.stdout, cli.stderr)
    assert "--yes" in cli.stderr
    assert len(dlq_items(d)) == 1
    cli = d.admin_cli("dlq.purge", "--all", "--yes", "--json")
    assert cli.returncode == 0, (cli.returncode, cli.stdout, cli.stderr)
    assert json.loads(cli.stdout) == {"ok": True, "purged": 1}

    st = dlq_state(d)
    assert (st["depth"], st["parked"], st["bytes"]) == (0, 0, 0), st
    assert (st["purged"], st["landed"], st["parked_total"]) == (2, 1, 3), st
    for rid in ("park-b", "park-c"):                    # purged: gone for good, never complete
        r = rows_of(d.db_path, rid)
        assert r["rows"] == 0 and r["status"] != "complete", r
    assert_exact(d.db_path, "park-a", sets["park-a"], total_chunks=1)


# ----- a corrupt spool file -----------------------------------------------------------------------------
def test_a_corrupt_spool_file_is_quarantined_and_the_rest_drains(make_daemon):
    d = make_daemon({"dlq": dict(FAST_RETRY, max_attempts=1000)}, name="before")
    good = synthetic_columns(30_000, seed=31)
    bad = synthetic_columns(1_000, seed=32)
    with exclusive_lock(d.db_path):
        assert send(d, "good", good)["location"] == "dlq"
        assert send(d, "bad", bad)["location"] == "dlq"
        items = dlq_items(d)
        assert d.stop() == 0
    bad_items = [it for it in items if it["request_id"] == "bad"]
    good_items = [it for it in items if it["request_id"] == "good"]
    assert len(bad_items) == 1 and good_items, items

    dlq_dir = Path(d.cfg["dlq"]["path"])
    victim = dlq_dir / (bad_items[0]["id"] + ".dlq")
    with open(victim, "r+b") as f:                     # garbage in the middle: the CRC no longer matches
        f.seek(200)
        f.write(b"\xde\xad\xbe\xef garbage " * 64)

    d2 = make_daemon(same_paths(d), name="after")
    st = dlq_state(d2)
    assert st["quarantined"] == [victim.name], st
    assert (dlq_dir / "quarantine" / victim.name).exists()
    assert not victim.exists()
    wait_complete(d2, "good", 30)
    st = wait_dlq_empty(d2, 10)
    assert st["landed"] == len(good_items) and st["quarantined"] == [victim.name], st
    assert_exact(d2.db_path, "good", good)
    r = rows_of(d2.db_path, "bad")
    assert r["rows"] == 0 and r["status"] != "complete", r


# ----- a stored result waiting in the dlq is never abandoned --------------------------------------------
def test_a_stored_result_whose_chunks_wait_in_the_dlq_is_never_abandoned(make_daemon):
    ov = {"gateway": {"assembly_timeout_s": 2.0},
          "dlq": {"retry_min_s": 0.2, "retry_max_s": 0.5, "max_attempts": 1}}
    d = make_daemon(ov, name="first")
    cols = synthetic_columns(1_000, seed=41)
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(d.gateway_endpoint)

    def ask(msg) -> dict:
        s.send(msg if isinstance(msg, bytes) else msgpack.packb(msg))
        assert s.poll(10000)
        return msgpack.unpackb(s.recv(), raw=False)
    try:
        assert ask({"type": "begin", "request_id": "waits", "strategy_name": "S1",
                    "total_trades": 1_000, "total_chunks": 1})["type"] == "credit"
        d.wait_for(lambda: rows_of(d.db_path, "waits")["status"] == "receiving", 10, what="begin committed")
        with exclusive_lock(d.db_path):
            assert ask(encode_chunk("waits", 0, cols, 0, 1_000)).get("seq") == 0
            stored = ask({"type": "end", "request_id": "waits"})
            assert stored["type"] == "stored" and stored["location"] == "dlq", stored
            d.wait_for(lambda: [it["parked"] for it in dlq_items(d)] == [True], 10, what="item parked")
            assert d.stop() == 0      # the `spooled` status change never reached the database
            d2 = make_daemon(same_paths(d, gateway={"assembly_timeout_s": 2.0}), name="second")
    finally:
        s.close(0)
        ctx.term()
    time.sleep(3.5)                   # several stale sweeps (every 1 s, idle > 2 s) with the lock gone
    assert d2.admin("dlq.replay", {"all": True}) == {"ok": True, "queued": 1}
    st = wait_dlq_empty(d2, 10)
    assert st.get("discarded", 0) == 0 and st["landed"] == 1, st
    assert_exact(d2.db_path, "waits", cols, total_chunks=1)
