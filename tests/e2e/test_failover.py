"""Producer failover across several gateway endpoints (PROTOCOL.md section 7, `send --endpoint EP
--endpoint EP2`; issue 14 item 4, the producer's side).

The first endpoint is a stand-in held by the test (a ROUTER that never answers, or one that
answers every message `unavailable`); the second is a real daemon, whose database must hold the
result exactly once. Everything on 127.0.0.1. (Two daemons sharing one PostgreSQL store, with
leases, are tested with that work.)
"""
from __future__ import annotations

import contextlib
import subprocess
import sys
import threading

import msgpack
import pytest
import zmq

from pairlane import synthetic
from pairlane.client import Producer
from tests.e2e.util import db, rows_for, wait_status
from tests.harness import REPO, free_port

pytestmark = pytest.mark.timeout(120)


def loopback_router(ctx: zmq.Context) -> tuple[zmq.Socket, str]:
    """A ROUTER standing in for a daemon, on a free loopback port; (socket, its endpoint)."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, f"tcp://127.0.0.1:{port}"


@contextlib.contextmanager
def stand_in(answer: bool):
    """A ROUTER on a free loopback port: silent, or answering each message `unavailable`.
    Yields (endpoint, list of message types it received)."""
    ctx = zmq.Context()
    sock, endpoint = loopback_router(ctx)
    seen: list = []

    def pump() -> None:
        while sock.poll(0):
            ident, frame = sock.recv_multipart()[:2]
            msg = msgpack.unpackb(frame, raw=False)
            seen.append(msg.get("type"))
            if answer:
                sock.send_multipart([ident, msgpack.packb(
                    {"type": "error", "code": "unavailable", "message": "stand-in", "retry_after_s": 30.0,
                     "request_id": msg.get("request_id")})])
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            if sock.poll(50):
                pump()
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield endpoint, seen
    finally:
        stop.set()
        t.join(5)
        sock.close(0)
        ctx.term()


@pytest.mark.parametrize("answer", [False, True], ids=["silent", "unavailable"])
def test_producer_moves_to_the_next_endpoint(daemon, answer):
    cols = synthetic.result_columns(20000, seed=9, strategy="fo")
    rid = f"failover-{'unavailable' if answer else 'silent'}"
    with stand_in(answer) as (dead, seen):
        with Producer([dead, daemon.gateway_endpoint], timeout_s=1.0, retries=3,
                      max_message_bytes=64 * 1024) as p:
            reply = p.send_result(rid, "fo", cols)
            stats = dict(p.last_stats)
        assert seen and seen[0] == "begin", seen
    assert reply["type"] == "stored", reply
    assert stats["failovers"] == 1 and stats["begins"] == 2, stats
    # the stand-in's retry_after_s (30 s) is not waited out: the next daemon is asked at once
    assert stats["elapsed_s"] < 20, stats
    row = wait_status(daemon, rid)
    assert row["status"] == "complete" and row["total_trades"] == 20000
    assert rows_for(daemon, rid) == 20000
    with contextlib.closing(db(daemon)) as c:
        got = c.execute("SELECT sum(pnl), count(DISTINCT timestamp) FROM backtest_trade_logs WHERE request_id = ?",
                        (rid,)).fetchone()
    assert got[0] == pytest.approx(float(cols["pnl"].sum()), abs=1e-6)


def test_a_daemon_that_goes_away_is_left_at_once_not_after_timeout_s(daemon):
    """The first endpoint takes the connection and the chunks, then dies (its socket closed, as the
    kernel closes a SIGKILLed daemon's connections): the Producer moves on when the connection
    drops, not after timeout_s (60 s here) of silence."""
    cols = synthetic.result_columns(20000, seed=10, strategy="fo")
    ctx = zmq.Context()
    dying, endpoint = loopback_router(ctx)
    seen: list = []

    def die_after_begin() -> None:
        while dying.poll(10_000):
            seen.append(msgpack.unpackb(dying.recv_multipart()[1], raw=False).get("type"))
            if seen[0] == "begin":
                break
        dying.close(0)
    t = threading.Thread(target=die_after_begin, daemon=True)
    t.start()
    try:
        with Producer([endpoint, daemon.gateway_endpoint], timeout_s=60.0, retries=3,
                      max_message_bytes=64 * 1024) as p:
            reply = p.send_result("failover-gone", "fo", cols)
            stats = dict(p.last_stats)
    finally:
        t.join(5)
        ctx.term()
    assert seen == ["begin"], seen
    assert reply["type"] == "stored" and reply["trades"] == 20000, reply
    assert stats["failovers"] == 1 and stats["begins"] == 2, stats
    assert stats["elapsed_s"] < 30, stats   # far below the 60 s of silence it used to wait
    assert rows_for(daemon, "failover-gone") == 20000


def test_send_cli_takes_several_endpoints_and_skips_an_unreachable_one(daemon):
    dead = f"tcp://127.0.0.1:{free_port()}"   # nothing listens: refused at once
    out = subprocess.run([sys.executable, str(REPO / "run.py"), "send", "--synthetic", "3000", "--seed", "4",
                          "--request-id", "failover-cli", "--endpoint", dead, "--endpoint",
                          daemon.gateway_endpoint, "--json"], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out
    assert rows_for(daemon, "failover-cli") == 3000
    both_dead = subprocess.run([sys.executable, str(REPO / "run.py"), "send", "--synthetic", "10", "--endpoint", dead,
                                "--endpoint", f"tcp://127.0.0.1:{free_port()}", "--timeout", "2"],
                               capture_output=True, text=True, timeout=90)
    assert both_dead.returncode == 1 and "unreachable" in both_dead.stderr, both_dead
