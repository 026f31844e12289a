"""Helpers for the e2e tests: a module-scoped daemon, a raw DEALER, database checks.

Owns nothing of the daemon: everything here speaks the wire contract
(PROTOCOL.md) or reads the database through its own connection: sqlite3, or psycopg
(autocommit, sqlite3-style `?` placeholders) when the daemon runs on PostgreSQL
(`store_overrides`, BACKENDS).
"""
from __future__ import annotations

import contextlib
import sqlite3
import time

import msgpack
import zmq

from tests.harness import Daemon

ERROR_CODES = ("too_large", "malformed", "unknown_request", "bad_chunk", "conflict", "incomplete",
               "busy", "unavailable")
RETRYABLE = ("busy", "unavailable")
FINAL_STATUSES = ("complete", "failed", "abandoned")
BACKENDS = ["sqlite", "postgresql"]


@contextlib.contextmanager
def store_overrides(request, backend: str):
    """Config overrides for `backend`: {} for SQLite; for PostgreSQL a fresh database on the test
    session's server (tests/pg.py), dropped when the block ends (stop the daemon inside it)."""
    if backend == "sqlite":
        yield {}
        return
    server = request.getfixturevalue("pg_server")
    url = server.database()
    try:
        yield {"store": {"url": url}}
    finally:
        server.drop(url)


def with_overrides(a: dict | None, b: dict | None) -> dict:
    out = {k: dict(v) for k, v in (a or {}).items()}
    for sect, kv in (b or {}).items():
        out.setdefault(sect, {}).update(kv)
    return out


@contextlib.contextmanager
def running_daemon(tmp, overrides: dict | None = None):
    """A started daemon, always stopped and checked for leftover processes (like conftest's make_daemon)."""
    d = Daemon(tmp, overrides)
    try:
        d.start()
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop(20)
        leftovers = d.cleanup() if d.proc is not None else []
        assert not leftovers, f"processes left behind: {leftovers}"


def pack(m) -> bytes:
    return msgpack.packb(m, use_bin_type=True)


class Dealer:
    """A raw DEALER on the gateway: send frames as they are, read replies as maps."""

    def __init__(self, endpoint: str, identity: bytes | None = None):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, 5000)
        if identity is not None:
            self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.connect(endpoint)

    def send(self, msg) -> None:
        """A dict is packed; bytes go as one frame; a list of bytes as a multi-frame message."""
        if isinstance(msg, dict):
            self.sock.send(pack(msg))
        elif isinstance(msg, (bytes, bytearray)):
            self.sock.send(bytes(msg))
        else:
            self.sock.send_multipart(list(msg))

    def recv(self, timeout: float = 5.0) -> dict | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        frames = self.sock.recv_multipart()
        assert len(frames) == 1, f"a reply is one frame, got {len(frames)}"
        reply = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
        assert isinstance(reply, dict), reply
        return reply

    def rt(self, msg, timeout: float = 10.0) -> dict:
        """Send and return the next reply (asserting one comes)."""
        self.send(msg)
        reply = self.recv(timeout)
        assert reply is not None, f"no reply within {timeout}s to {str(msg)[:200]}"
        return reply

    def drain(self, timeout: float = 0.0) -> list[dict]:
        out = []
        while True:
            r = self.recv(timeout)
            if r is None:
                return out
            out.append(r)

    def close(self) -> None:
        self.sock.close(0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_error(reply: dict, code: str, request_id) -> dict:
    """An error reply exactly as PROTOCOL.md section 1 describes it."""
    assert reply.get("type") == "error", reply
    assert reply.get("code") == code, reply
    assert isinstance(reply.get("message"), str) and reply["message"], reply
    assert "request_id" in reply and reply["request_id"] == request_id, reply
    if code in RETRYABLE:
        assert isinstance(reply.get("retry_after_s"), float) and reply["retry_after_s"] > 0, reply
    else:
        assert "retry_after_s" not in reply, reply
    return reply


def db(daemon):
    """A separate connection on the daemon's database (autocommit: every query sees the latest commit),
    sqlite3 or PostgreSQL (with sqlite3's `execute(sql, params)` and `?` placeholders)."""
    url = daemon.cfg.get("store", {}).get("url")
    if url:
        import psycopg
        from pairlane.pgstore import SqliteStyle
        return SqliteStyle(psycopg.connect(url, autocommit=True))
    conn = sqlite3.connect(daemon.db_path, timeout=10, isolation_level=None)
    return conn


def index_leading_columns(daemon, table: str) -> set[str]:
    """The first column of every index on `table`, on either backend."""
    with contextlib.closing(db(daemon)) as c:
        if daemon.cfg.get("store", {}).get("url"):
            return {r[0] for r in c.execute(
                "SELECT a.attname FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid "
                "JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = i.indkey[0] "
                "WHERE t.relname = ?", (table,)).fetchall()}
        out = set()
        for _, name, *_ in c.execute(f"PRAGMA index_list('{table}')").fetchall():
            cols = c.execute(f"PRAGMA index_info('{name}')").fetchall()
            first = min(cols, key=lambda r: r[0])  # seqno 0
            out.add(first[2])
        return out


def rows_for(daemon, request_id: str) -> int:
    with contextlib.closing(db(daemon)) as c:
        return c.execute("SELECT count(*) FROM backtest_trade_logs WHERE request_id = ?",
                         (request_id,)).fetchone()[0]


def duplicate_groups(daemon, request_id: str) -> int:
    """(request_id, seq, timestamp) groups holding more than one row."""
    with contextlib.closing(db(daemon)) as c:
        return c.execute("SELECT count(*) FROM (SELECT seq, timestamp FROM backtest_trade_logs "
                         "WHERE request_id = ? GROUP BY seq, timestamp HAVING count(*) > 1) AS g",
                         (request_id,)).fetchone()[0]


def result_row(daemon, request_id: str) -> dict | None:
    with contextlib.closing(db(daemon)) as c:
        cur = c.execute("SELECT * FROM backtest_results WHERE request_id = ?", (request_id,))
        row = cur.fetchone()
        return None if row is None else dict(zip([d[0] for d in cur.description], row))


def wait_status(daemon, request_id: str, statuses=FINAL_STATUSES, timeout: float = 30.0) -> dict:
    """Poll backtest_results until the request's status is one of `statuses`; returns the row."""
    def ok():
        row = result_row(daemon, request_id)
        return row if row is not None and row["status"] in statuses else None
    return daemon.wait_for(ok, timeout, interval=0.1, what=f"{request_id} status in {statuses}")


def assert_all_running(daemon) -> None:
    """Every actor and supervisor RUNNING, none restarted."""
    st = daemon.status()
    bad = [(a["name"], a["state"], a["restarts"]) for a in st["actors"]
           if a["state"] != "RUNNING" or a["restarts"] != 0]
    assert not bad, f"actors not RUNNING with restarts 0: {bad}"


def inspect(daemon, actor: str) -> dict:
    r = daemon.admin("inspect", {"actor": actor})
    assert r and r.get("ok"), r
    return r["state"]


def metric(daemon, name: str):
    r = daemon.admin("metrics")
    assert r and r.get("ok"), r
    return r["metrics"].get(name)


def wait_until(pred, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def refused(d, timeout: float = 30.0) -> str:
    """Start daemon `d` expecting a refusal at start: exit 2 with a configuration error; its log."""
    d.start(wait=False)
    code = d.proc.wait(timeout)
    out = d.log()
    assert code == 2, f"exit {code}, expected 2:\n{out}"
    assert "configuration error" in out
    return out
