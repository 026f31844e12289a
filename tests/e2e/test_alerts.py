"""The alerts of PROTOCOL.md section 6 not covered by the pairs tests: raised on the PUB socket."""
from __future__ import annotations

import time

import msgpack
import pytest
import zmq

from pairlane.entry import chaos
from pairlane.client import Producer, synthetic_columns
from tests.e2e.test_pairs_metrics import wait_metric

pytestmark = pytest.mark.timeout(180)


class Alerts:
    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        time.sleep(0.3)  # let the subscription reach the publisher

    def wait(self, name: str, state: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            if self.sock.poll(200):
                a = msgpack.unpackb(self.sock.recv(), raw=False)
                seen.append((a["name"], a["state"]))
                if a["name"] == name and a["state"] == state:
                    assert a["type"] == "alert" and isinstance(a["ts"], float)
                    return a
        raise AssertionError(f"no {name} {state} within {timeout}s; saw {seen}")

    def close(self):
        self.sock.close(0)


def crash(d, name: str, seen: set, attempts: int = 5) -> int:
    """Inject a crash into `name` and wait until an incarnation with a pid not in `seen` runs; its pid.

    `inject` goes to the address the admin actor knows. Right after a restart that may still be the
    old incarnation's (the new address reaches the admin through the root's directory a moment after
    status shows the new pid), and an inject sent there is lost: send again until a crash shows."""
    for _ in range(attempts):
        d.wait_for(lambda: d.admin("inject", {"actor": name, "fault": "crash"})["ok"], timeout=30,
                   what="inject accepted")
        try:
            row = d.wait_for(lambda: (lambda a: a if a["state"] == "RUNNING" and a["pid"] not in seen else None)(
                d.actor(name)), timeout=6, what=f"{name} restarted")
        except AssertionError:
            continue
        seen.add(row["pid"])
        return row["pid"]
    raise AssertionError(f"{attempts} injected crashes of {name} never showed as a restart")


def test_restart_storm_below_the_root_raises_supervisor_escalated(make_daemon):
    d = make_daemon({"supervision": {"max_restarts": 2, "window_s": 60.0}})
    alerts = Alerts(d.cfg["alerts"]["endpoint"])
    try:
        seen = {d.actor("dlq")["pid"]}
        for _ in range(3):
            crash(d, "dlq", seen)
        a = alerts.wait("supervisor_escalated", "raised")
        assert a["severity"] == "critical" and a["reasons"]["supervisor"] == "store"
        chaos.wait_all_running(d)
        assert d.actor("store")["restarts"] >= 1
    finally:
        alerts.close()


def test_store_near_its_cap_raises_disk_low(make_daemon):
    d = make_daemon({"store": {"max_bytes": 6_000_000}})
    alerts = Alerts(d.cfg["alerts"]["endpoint"])
    try:
        with Producer(d.gateway_endpoint, timeout_s=10) as p:
            p.send_result("fill", "S", synthetic_columns(40_000, seed=1))
        a = alerts.wait("disk_low", "raised", timeout=20)
        assert "store" in a["reasons"]
    finally:
        alerts.close()


def test_parked_item_raises_dlq_parked_and_replay_clears_it(make_daemon):
    d = make_daemon({"dlq": {"retry_min_s": 0.2, "retry_max_s": 0.5, "max_attempts": 1}})
    alerts = Alerts(d.cfg["alerts"]["endpoint"])
    lock = chaos.DbLock(d.db_path)
    try:
        with Producer(d.gateway_endpoint, timeout_s=10) as p:
            reply = p.send_result("parked", "S", synthetic_columns(500, seed=2))
        assert reply["location"] == "dlq"
        a = alerts.wait("dlq_parked", "raised", timeout=30)
        assert a["reasons"]["parked"] >= 1
        items = d.admin("dlq.list")["items"]
        assert items and all(i["parked"] for i in items)
        # a restarted metrics actor starts from zero: the DLQ sends its gauges and the alert again
        assert d.admin("restart", {"actor": "metrics"})["ok"]
        d.wait_running("metrics", restarts=1, timeout=20)
        again = d.wait_for(lambda: [x for x in d.admin("alerts")["alerts"] if x["name"] == "dlq_parked"],
                           timeout=10, what="dlq_parked listed by the restarted metrics actor")
        assert again[0]["reasons"]["parked"] == len(items)
        wait_metric(d, "pairlane_dlq_parked_items", float(len(items)))
        # a subscriber of the new metrics actor's socket (the old one's messages stop with it)
        alerts.close()
        alerts = Alerts(d.cfg["alerts"]["endpoint"])
        assert alerts.wait("dlq_parked", "raised", timeout=10)["reasons"]["parked"] == len(items)
        lock.release()
        lock = None
        assert d.admin("dlq.replay", {"all": True, "rate": 50})["queued"] == len(items)
        alerts.wait("dlq_parked", "cleared", timeout=30)
        d.wait_for(lambda: d.admin("result", {"request_id": "parked"})["result"]["status"] == "complete",
                   timeout=30, what="parked result landed")
    finally:
        if lock is not None:
            lock.release()
        alerts.close()
