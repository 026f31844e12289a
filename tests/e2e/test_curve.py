"""CURVE on the gateway and admin sockets and the legacy allowlist, through real daemons
(PROTOCOL.md section 7, issue 14 items 1-3).

Every socket is reached on 127.0.0.1. Where a test binds `tcp://0.0.0.0:PORT` (to prove a
non-loopback endpoint is accepted with its keys), it still connects through 127.0.0.1; no
traffic goes to any other address. 127.0.0.2 stands in for another host as a source address.
"""
from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys

import pytest
import zmq
import zmq.auth

from pairlane import synthetic
from pairlane.client import Producer, SendError
from pairlane.zap import client_curve_options
from pairlane.entry.admin_cli import request
from tests.e2e.test_pairs_metrics import scrape, val, wait_metric
from tests.e2e.util import db, inspect, rows_for, wait_status, wait_until
from tests.harness import REPO, free_port

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def keys(tmp_path):
    """server key pair; producers alice (authorized), bob (never), carol (authorized later)."""
    kdir, adir = tmp_path / "keys", tmp_path / "authorized"
    kdir.mkdir()
    adir.mkdir()
    for name in ("server", "alice", "bob", "carol"):
        out = subprocess.run([sys.executable, str(REPO / "run.py"), "keygen", name, "--dir", str(kdir)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out
    shutil.copy(kdir / "alice.key", adir / "alice.key")
    k = {n: str(kdir / f"{n}.key_secret") for n in ("server", "alice", "bob", "carol")}
    k.update(public=str(kdir / "server.key"), dir=str(kdir), authorized=str(adir))
    return k


def refusal_lines(d, endpoint: str) -> list[str]:
    return [ln for ln in d.log_path.read_text(errors="replace").splitlines()
            if "event=auth_refused" in ln and f"endpoint={endpoint}" in ln]


def columns(n: int, seed: int):
    return synthetic.result_columns(n, seed=seed, strategy=f"curve-{seed}")


def test_keygen_writes_loadable_certificates(keys):
    public, secret = zmq.auth.load_certificate(keys["alice"])
    assert len(public) == 40 and len(secret) == 40
    pub_only, none = zmq.auth.load_certificate(keys["alice"].removesuffix("_secret"))
    assert pub_only == public and none is None
    # never overwrites a key pair
    out = subprocess.run([sys.executable, str(REPO / "run.py"), "keygen", "alice", "--dir", keys["dir"]],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "exists" in out.stderr
    assert zmq.auth.load_certificate(keys["alice"]) == (public, secret)


def test_gateway_curve_authorized_unknown_and_reloaded_keys(make_daemon, keys):
    port = free_port()
    d = make_daemon({"gateway": {"endpoint": f"tcp://0.0.0.0:{port}", "curve_secret_key": keys["server"],
                                 "curve_authorized_keys": keys["authorized"]}})
    ep = f"tcp://127.0.0.1:{port}"

    # an authorized producer stores a result, with exact rows
    cols = columns(3000, 1)
    with Producer(ep, timeout_s=10, server_key=keys["public"], client_key=keys["alice"]) as p:
        reply = p.send_result("curve-alice", "curve-1", cols)
    assert reply["type"] == "stored", reply
    row = wait_status(d, "curve-alice")
    assert row["status"] == "complete" and row["total_trades"] == 3000
    assert rows_for(d, "curve-alice") == 3000
    with contextlib.closing(db(d)) as c:
        got = c.execute("SELECT sum(pnl) FROM backtest_trade_logs WHERE request_id = ?", ("curve-alice",)).fetchone()
    assert got[0] == pytest.approx(float(cols["pnl"].sum()), abs=1e-6)

    # bob's key is not authorized: no reply at all, over two connections; counted and logged once
    for attempt in range(2):
        with Producer(ep, timeout_s=1.5, retries=0, server_key=keys["public"], client_key=keys["bob"]) as p:
            with pytest.raises(SendError) as info:
                p.send_result(f"curve-bob-{attempt}", "curve-2", columns(10, 2))
        assert info.value.code == "timeout", info.value
    wait_until(lambda: inspect(d, "gateway")["auth"]["refused"] >= 2, 10, what="two refusals of bob")
    s = wait_metric(d, "pairlane_auth_failures_total", 1.0, endpoint="gateway", reason="unknown_key")
    bob_public = zmq.auth.load_certificate(keys["bob"])[0].decode()
    lines = refusal_lines(d, "gateway")
    assert len(lines) == 1 and bob_public in lines[0] and "reason=unknown_key" in lines[0], lines
    assert result_absent(d, "curve-bob-0") and result_absent(d, "curve-bob-1")

    # a plaintext client and a client with the wrong server key get nothing either
    with zmq.Context() as ctx:
        plain = ctx.socket(zmq.DEALER)
        wrong = ctx.socket(zmq.DEALER)
        for name, value in client_curve_options(keys["dir"] + "/carol.key", keys["alice"]).items():
            wrong.setsockopt(getattr(zmq, name), value)
        for sock in (plain, wrong):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(ep)
            sock.send(b"\x81\xa4type\xa5begin")   # would be answered (malformed) by a plain gateway
        assert not plain.poll(1500) and not wrong.poll(500)
        # they carry no key to name: each failed handshake is counted, logged at most once a minute.
        # Which reason a plaintext client gets is a race in ZMQ: when the server reads its NULL
        # greeting first it is a mechanism mismatch (wrong_mechanism); when the client sees the CURVE
        # greeting first and hangs up, the server only sees a failed handshake (bad_handshake). So
        # the two clients' failures are counted under these two reasons together, never dropped.
        def handshake_failures() -> float:
            s, _ = scrape(d)
            return sum(val(s, "pairlane_auth_failures_total", endpoint="gateway", reason=r) or 0.0
                       for r in ("wrong_mechanism", "bad_handshake"))
        wait_until(lambda: handshake_failures() >= 2, 10, what="both failed handshakes counted")
        plain.close(0)
        wrong.close(0)
    failed = [ln for ln in d.log_path.read_text().splitlines() if "event=auth_handshake_failed" in ln]
    assert failed and all("reason=wrong_mechanism" in ln or "reason=bad_handshake" in ln for ln in failed), failed
    assert len(failed) == len({ln.split("reason=")[1].split()[0] for ln in failed}), failed  # once per reason

    # carol is refused, then authorized by a file in the directory and SIGHUP
    with Producer(ep, timeout_s=1.5, retries=0, server_key=keys["public"], client_key=keys["carol"]) as p:
        with pytest.raises(SendError):
            p.send_result("curve-carol-0", "curve-3", columns(10, 3))
    shutil.copy(keys["dir"] + "/carol.key", keys["authorized"] + "/carol.key")
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for(lambda: inspect(d, "gateway")["auth"]["authorized_keys"] == 2, 10, what="keys re-read")
    with Producer(ep, timeout_s=10, server_key=keys["public"], client_key=keys["carol"]) as p:
        assert p.send_result("curve-carol-1", "curve-3", columns(500, 3))["type"] == "stored"
    assert rows_for(d, "curve-carol-1") == 500
    s, _ = scrape(d)
    assert val(s, "pairlane_auth_failures_total", endpoint="gateway", reason="unknown_key") == 2.0  # bob, carol
    assert len(refusal_lines(d, "gateway")) == 2


def result_absent(d, request_id: str) -> bool:
    with contextlib.closing(db(d)) as c:
        return c.execute("SELECT count(*) FROM backtest_results WHERE request_id = ?", (request_id,)).fetchone()[0] == 0


def test_admin_over_curve_needs_an_authorized_key_and_the_token(make_daemon, keys):
    port = free_port()
    d = make_daemon({"admin": {"endpoint": f"tcp://0.0.0.0:{port}", "token": "s3cret",
                               "curve_secret_key": keys["server"], "curve_authorized_keys": keys["authorized"]}},
                    start=False)
    d.start(wait=False)
    ep = f"tcp://127.0.0.1:{port}"
    alice = client_curve_options(keys["public"], keys["alice"])

    def ready():
        assert d.proc.poll() is None, d.log()
        st = request(ep, "status", token="s3cret", timeout_s=2, curve=alice)
        return st if st and st.get("ready") else None
    st = d.wait_for(ready, 40, interval=0.2, what="daemon ready over CURVE admin")
    d._learn_pids(st)   # so the fixture's leftover check knows the actor processes

    assert request(ep, "status", token="wrong", timeout_s=5, curve=alice)["ok"] is False
    assert request(ep, "status", token="s3cret", timeout_s=1.5) is None            # plaintext: nothing
    bob = client_curve_options(keys["public"], keys["bob"])
    assert request(ep, "status", token="s3cret", timeout_s=1.5, curve=bob) is None  # unknown key: nothing
    assert request(ep, "status", token="s3cret", timeout_s=1.5, curve=bob) is None
    wait_metric(d, "pairlane_auth_failures_total", 1.0, endpoint="admin", reason="unknown_key")
    wait_metric(d, "pairlane_auth_failures_total", 1.0, endpoint="admin", reason="bad_token")
    assert len(refusal_lines(d, "admin")) == 1

    # the CLI, with its keys and the token
    cli = subprocess.run([sys.executable, str(REPO / "run.py"), "admin", "--endpoint", ep, "--token", "s3cret",
                          "--server-key", keys["public"], "--client-key", keys["alice"], "status", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and '"ready": true' in cli.stdout, cli
    stop = request(ep, "stop", token="s3cret", timeout_s=10, curve=alice)
    assert stop and stop["ok"], stop
    assert d.proc.wait(30) == 0


def test_legacy_allowlist_on_any_address(make_daemon):
    port = free_port()
    d = make_daemon({"gateway": {"legacy_endpoint": f"tcp://0.0.0.0:{port}", "legacy_allow": ["127.0.0.1"]}})
    with zmq.Context() as ctx:
        allowed = ctx.socket(zmq.PUSH)
        allowed.setsockopt(zmq.LINGER, 0)
        allowed.connect(f"tcp://127.0.0.1:{port}")
        others = []
        for _ in range(2):   # two connections from another address: refused, reported once
            s = ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDTIMEO, 0)
            s.setsockopt(zmq.IMMEDIATE, 1)   # queue only on a connection that passed its handshake
            s.connect(f"tcp://127.0.0.2:0;127.0.0.1:{port}")
            others.append(s)
        allowed.send(synthetic.legacy_message(200, seed=5, request_id="leg-allowed", strategy_name="LegAllow"),
                     flags=0)
        row = wait_status(d, "leg-allowed")
        assert row["status"] == "complete" and rows_for(d, "leg-allowed") == 200
        wait_until(lambda: inspect(d, "legacy")["auth"]["refused"] >= 2, 15, what="two refusals of 127.0.0.2")
        for s in others:   # never connected: the message cannot even be queued
            with pytest.raises(zmq.Again):
                s.send(synthetic.legacy_message(5, seed=6, request_id="leg-refused", strategy_name="LegNo"))
            s.close(0)
        allowed.close(0)
    wait_metric(d, "pairlane_auth_failures_total", 1.0, endpoint="legacy", reason="address_not_allowed")
    lines = refusal_lines(d, "legacy")
    assert len(lines) == 1 and "127.0.0.2" in lines[0], lines
    assert result_absent(d, "leg-refused")


@pytest.mark.parametrize("overrides,key", [
    ({"gateway": {"endpoint": "tcp://0.0.0.0:{port}"}}, "gateway.endpoint"),
    ({"admin": {"endpoint": "tcp://0.0.0.0:{port}"}}, "admin.endpoint"),
    ({"gateway": {"legacy_endpoint": "tcp://0.0.0.0:{port}"}}, "gateway.legacy_endpoint"),
    ({"gateway": {"curve_secret_key": "{public}", "curve_authorized_keys": "{authorized}"}},
     "gateway.curve_secret_key"),
], ids=["gateway-no-keys", "admin-no-keys", "legacy-no-allowlist", "public-cert-as-secret"])
def test_refusals_at_start_exit_2_naming_the_key(make_daemon, keys, overrides, key):
    port = free_port()
    over = {s: {k: v.format(port=port, **keys) for k, v in kv.items()} for s, kv in overrides.items()}
    d = make_daemon(over, start=False)
    d.start(wait=False)
    assert d.proc.wait(60) == 2, d.log()
    assert f"'{key}'" in d.log(), d.log()
