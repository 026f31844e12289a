"""The metrics actor: the one place metrics and alerts live (PROTOCOL.md section 6).

Owns: the prometheus registry (`pairlane.metrics.Metrics`), the /metrics HTTP
endpoint (a background thread serving the registry), the alerts PUB socket
and the state of every alert (published when it changes, and again whenever
its owner re-asserts it while raised), and the figures it measures itself:
database file sizes and growth, actor restarts (from the root's status
table), ingest stall, disk low, supervisor escalation. Other actors send it
batched `MetricUpdates` and `Alert`s. Never blocks on the network.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import time

import msgpack
import zmq

from pairlane.metrics import Metrics, serve
from pairlane.vocab import AlertName, AlertState
from supervision.messages import Escalated, StatusReply, StatusRequest

from .admin import serve_admin
from .base import PairlaneActor
from .messages import AdminCommand, Alert, MetricUpdates

SLOW_TICK_S = 2.0
ESCALATION_CLEAR_S = 10.0   # cleared once every actor has been RUNNING this long after an escalation


class MetricsActor(PairlaneActor):
    def on_start(self) -> None:
        self.m = Metrics()
        self.server = None
        listen = self.config["metrics"]["listen"]
        if listen:
            host, _, port = listen.rpartition(":")
            self.server = serve(self.m, host.strip("[]"), int(port))
        self.pub = self.bind_socket(zmq.PUB, self.config["alerts"]["endpoint"], SNDHWM=1000)
        self.alerts: dict[str, dict] = {}
        self.published = 0
        self.restarts_seen: dict[str, int] = {}
        self.escalated_at = 0.0
        self.last_slow = 0.0
        self.last_result_ts = self._newest_result_time()
        if self.last_result_ts:
            self.m.apply([("set", "pairlane_last_result_timestamp_seconds", None, self.last_result_ts)])
        self.started = time.time()

    def on_stop(self) -> None:
        if self.server is not None:
            self.server.close()
        self.close_sockets()

    def _newest_result_time(self) -> float | None:
        path = self.config["store"]["path"]
        if not os.path.exists(path):
            return None
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.2)
            try:
                row = conn.execute("SELECT max(completed_at) FROM backtest_results WHERE status = 'complete'").fetchone()
            finally:
                conn.close()
            return row[0] if row else None
        except sqlite3.Error:
            return None

    def inspect(self) -> dict:
        return {"alerts": {k: v["state"] for k, v in self.alerts.items()}, "alerts_published": self.published,
                "metrics_endpoint": self.config["metrics"]["listen"],
                "last_result_timestamp": self.last_result_ts}

    # ----- inputs ----------------------------------------------------------------------------------
    def on_message(self, msg, sender) -> None:
        if isinstance(msg, MetricUpdates):
            self.m.apply(msg.updates)
            for u in msg.updates:
                if u[1] == "pairlane_last_result_timestamp_seconds":
                    self.last_result_ts = max(self.last_result_ts or 0, u[3])
        elif isinstance(msg, Alert):
            self.set_alert(msg.name, msg.state, msg.reasons)
        elif isinstance(msg, StatusReply):
            self._restarts(msg.rows)
        elif isinstance(msg, Escalated):  # from the root: a supervisor gave up and crashed
            self.escalated_at = time.time()
            self.set_alert(AlertName.SUPERVISOR_ESCALATED, AlertState.RAISED,
                           {"supervisor": msg.name, "reason": msg.reason})
        elif isinstance(msg, AdminCommand):
            serve_admin(self, msg, sender)

    def admin_metrics(self, args: dict, respond) -> dict:
        """admin `metrics` (declared in pairlane.admin_commands)."""
        return {"ok": True, "metrics": self.m.snapshot(), "alerts": self.alerts}

    def raised(self, name: AlertName) -> bool:
        return self.alerts.get(name, {}).get("state") == AlertState.RAISED

    def set_alert(self, name: AlertName, state: AlertState, reasons: dict) -> None:
        name, state = AlertName(name), AlertState(state)
        severity = name.severity
        prev = self.alerts.get(name, {}).get("state", AlertState.CLEARED)
        if state == AlertState.CLEARED and prev == AlertState.CLEARED:
            return
        self.alerts[name] = {"state": state, "severity": severity, "reasons": reasons, "ts": time.time()}
        if state == AlertState.RAISED and prev != AlertState.RAISED:
            self.m.apply([("inc", "pairlane_alerts_raised_total", {"name": name}, 1.0)])
            self.log("ERROR" if severity == "critical" else "WARNING", "alert_raised", alert=name,
                     reasons=reasons)
        elif state == AlertState.CLEARED:
            self.log("INFO", "alert_cleared", alert=name)
        frame = {"type": "alert", "name": name, "state": state, "severity": severity,
                 "reasons": reasons, "ts": time.time()}
        try:
            self.pub.send(msgpack.packb(frame, use_bin_type=True, default=str), zmq.NOBLOCK)
            self.published += 1
        except zmq.ZMQError:
            pass

    def _restarts(self, rows) -> None:
        updates = []
        fatal = []
        for r in rows:
            name = r["name"]
            seen = self.restarts_seen.get(name, 0)
            if r["restarts"] > seen:
                updates.append(("inc", "pairlane_actor_restarts_total", {"actor": name}, float(r["restarts"] - seen)))
            self.restarts_seen[name] = max(seen, r["restarts"])
            if r["state"] == "FATAL":
                fatal.append(name)
        self.m.apply(updates)
        if fatal:
            self.escalated_at = time.time()
            self.set_alert(AlertName.SUPERVISOR_ESCALATED, AlertState.RAISED, {"fatal": fatal})
        elif self.raised(AlertName.SUPERVISOR_ESCALATED) and \
                time.time() - self.escalated_at > ESCALATION_CLEAR_S:
            self.set_alert(AlertName.SUPERVISOR_ESCALATED, AlertState.CLEARED, {})

    # ----- periodic ----------------------------------------------------------------------------------
    def tick(self) -> None:
        now = time.time()
        if now - self.last_slow < SLOW_TICK_S:
            return
        self.last_slow = now
        self.tell("root", StatusRequest(0))
        self.m.track_db_files(self.config["store"]["path"], now)
        self._check_stall(now)
        self._check_disk()

    def _check_stall(self, now: float) -> None:
        limit = self.config["alerts"]["ingest_stall_s"]
        last = self.last_result_ts or self.started
        stalled = now - last > limit
        if stalled:
            self.set_alert(AlertName.INGEST_STALLED, AlertState.RAISED,
                           {"seconds_since_last_result": round(now - last, 1), "limit_s": limit})
        elif self.raised(AlertName.INGEST_STALLED):
            self.set_alert(AlertName.INGEST_STALLED, AlertState.CLEARED, {})

    def _check_disk(self) -> None:
        reasons = {}
        store, dlq = self.config["store"], self.config["dlq"]
        db = sum(os.path.getsize(p) for p in (store["path"], store["path"] + "-wal") if os.path.exists(p))
        if store["max_bytes"] and db >= 0.9 * store["max_bytes"]:
            reasons["store"] = f"{db} of {store['max_bytes']} bytes"
        spool = 0
        if os.path.isdir(dlq["path"]):
            for e in os.scandir(dlq["path"]):
                if e.is_file():
                    spool += e.stat().st_size
        if dlq["max_bytes"] and spool >= 0.9 * dlq["max_bytes"]:
            reasons["spool"] = f"{spool} of {dlq['max_bytes']} bytes"
        for what, path in (("store_disk", os.path.dirname(store["path"])), ("spool_disk", dlq["path"])):
            try:
                du = shutil.disk_usage(path)
                if du.free < 0.1 * du.total:
                    reasons[what] = f"{du.free} bytes free of {du.total}"
            except OSError:
                pass
        if reasons:
            self.set_alert(AlertName.DISK_LOW, AlertState.RAISED, reasons)
        elif self.raised(AlertName.DISK_LOW):
            self.set_alert(AlertName.DISK_LOW, AlertState.CLEARED, {})

    def flush_metrics(self) -> None:  # our own batch goes straight into the registry
        if len(self.metrics):
            self.m.apply(self.metrics.drain())
