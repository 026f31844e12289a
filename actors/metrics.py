"""The metrics actor: the one place metrics and alerts live (PROTOCOL.md section 6).

Owns: the prometheus registry (`pairlane.metrics.Metrics`), the /metrics HTTP
endpoint (prometheus_client's server in a background thread), the alerts PUB
socket (an XPUB: a new subscriber is sent every raised alert at once) and the
state of every alert (published when it changes, whenever its owner
re-asserts it while raised, and every `REPUBLISH_S` while raised otherwise;
listed by `admin alerts`), and the figures it measures itself: database file
sizes and growth (PostgreSQL: pg_database_size), the root's status table (restarts that keep counting across
a supervisor's restart, actor up/down, RSS/CPU/fds of every actor process
from /proc), thresholds and caps, free disk, ingest stall, disk low,
supervisor escalation. Other actors send it batched `MetricUpdates` and
`Alert`s (and re-send their gauges when it restarts). Never blocks on the
network, never decides what another actor measures.
"""
from __future__ import annotations

import os
import time

import msgpack
import zmq

from pairlane.metrics import Metrics, read_process, serve
from pairlane.stores import backend, open_reader, reader_errors
from pairlane.vocab import AlertName, AlertState
from pairlane.supervision.messages import Escalated, StatusReply, StatusRequest

from .admin import serve_admin
from .base import PairlaneActor
from .messages import AdminCommand, Alert, MetricUpdates

SLOW_TICK_S = 2.0
ESCALATION_CLEAR_S = 10.0   # cleared once every actor has been RUNNING this long after an escalation
REPUBLISH_S = 30.0          # a raised alert nobody re-asserted for this long is published again


def tree_actor_names(config: dict) -> tuple[str, ...]:
    """Every actor and supervisor of the tree this config builds (their series start at 0)."""
    from .tree import build_tree
    return tuple(spec.name for spec in build_tree(config).walk())


class MetricsActor(PairlaneActor):
    def on_start(self) -> None:
        # SQLite: one daemon, the pair evaluator; PostgreSQL: unknown (0) until the pairs actor says
        self.m = Metrics(actors=tree_actor_names(self.config), pairs_leader=backend(self.config) != "postgresql")
        self.server = None
        listen = self.config["metrics"]["listen"]
        if listen:
            host, _, port = listen.rpartition(":")
            self.server = serve(self.m, host.strip("[]"), int(port))
        # XPUB: a subscription arriving tells us a subscriber connected (XPUB_VERBOSE: every one)
        self.pub = self.bind_socket(zmq.XPUB, self.config["alerts"]["endpoint"], SNDHWM=1000, XPUB_VERBOSE=1)
        self.alerts: dict[str, dict] = {}
        self.published_at: dict[str, float] = {}   # alert name -> when it last went out on the PUB socket
        self.published = 0
        self.subscribers_greeted = 0
        self.restarts_seen: dict[str, tuple[int, int | None]] = {}  # name -> (restarts, last known pid)
        self.escalated_at = 0.0
        self.last_slow = 0.0
        self.pg_reader = None
        self.pg_prev: tuple[float, float] | None = None
        self.last_result_ts = self._newest_result_time()
        if self.last_result_ts:
            self.m.apply([("set", "pairlane_last_result_timestamp_seconds", None, self.last_result_ts)])
        self.m.apply([("set", "pairlane_ingest_stall_threshold_seconds", None,
                       float(self.config["alerts"]["ingest_stall_s"]))])
        self._check_disk()
        self.started = time.time()
        self.tell("root", StatusRequest(0))   # actor gauges from the first scrape, not 2 s later

    def on_stop(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.pg_reader is not None:
            try:
                self.pg_reader.close()
            except reader_errors():
                pass
        self.close_sockets()

    def _newest_result_time(self) -> float | None:
        try:
            conn = open_reader(self.config, busy_timeout_ms=200)
        except reader_errors():
            return None
        if conn is None:
            return None
        try:
            row = conn.execute("SELECT max(completed_at) FROM backtest_results WHERE status = 'complete'").fetchone()
            return row[0] if row else None
        except reader_errors():
            return None
        finally:
            try:
                conn.close()
            except reader_errors():
                pass

    def _track_pg_size(self, now: float) -> None:
        """pairlane_db_bytes{file=main} = pg_database_size (wal 0: the server owns its WAL) and the
        growth rate, through a reader kept open (reopened after a failure; a failed sample is skipped)."""
        try:
            if self.pg_reader is None:
                self.pg_reader = open_reader(self.config)
            size = float(self.pg_reader.execute("SELECT pg_database_size(current_database())").fetchone()[0])
        except reader_errors():
            if self.pg_reader is not None:
                try:
                    self.pg_reader.close()
                except reader_errors():
                    pass
            self.pg_reader = None
            return
        updates = [("set", "pairlane_db_bytes", {"file": "main"}, size),
                   ("set", "pairlane_db_bytes", {"file": "wal"}, 0.0)]
        if self.pg_prev is not None and now > self.pg_prev[0]:
            updates.append(("set", "pairlane_db_growth_bytes_per_second", None,
                            (size - self.pg_prev[1]) / (now - self.pg_prev[0])))
        self.pg_prev = (now, size)
        self.m.apply(updates)

    def inspect(self) -> dict:
        return {"alerts": {k: v["state"] for k, v in self.alerts.items()}, "alerts_published": self.published,
                "subscribers_greeted": self.subscribers_greeted,
                "metrics_endpoint": self.config["metrics"]["listen"],
                "last_result_timestamp": self.last_result_ts}

    def watch_fds(self) -> list:
        return [self.pub.FD] if not self._stopping else []

    def on_readable(self, fds) -> None:
        self._read_subscriptions()

    def _read_subscriptions(self) -> None:
        """Drain the XPUB's subscription messages (its FD is edge-triggered: read until empty);
        a new subscription gets every raised alert at once."""
        greet = False
        while True:
            try:
                frame = self.pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            except zmq.ZMQError:
                break
            if frame[:1] == b"\x01":
                greet = True
        if greet:
            self.subscribers_greeted += 1
            for name, a in list(self.alerts.items()):
                if a["state"] == AlertState.RAISED:
                    self._publish(name, a)

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

    def admin_alerts(self, args: dict, respond) -> dict:
        """admin `alerts` (declared in pairlane.admin_commands): the raised alerts, by name."""
        return {"ok": True, "alerts": [{"name": str(n), "severity": a["severity"], "reasons": a["reasons"],
                                        "since": a["since"]}
                                       for n, a in sorted(self.alerts.items()) if a["state"] == AlertState.RAISED]}

    def raised(self, name: AlertName) -> bool:
        return self.alerts.get(name, {}).get("state") == AlertState.RAISED

    def set_alert(self, name: AlertName, state: AlertState, reasons: dict) -> None:
        name, state = AlertName(name), AlertState(state)
        severity = name.severity
        if name == AlertName.PAIR_SAFE_STOP and reasons.get("no_data"):
            severity = "warning"   # an empty store: waiting for the first result, nothing is wrong yet
        prev = self.alerts.get(name, {}).get("state", AlertState.CLEARED)
        if state == AlertState.CLEARED and prev == AlertState.CLEARED:
            return
        now = time.time()
        since = self.alerts[name]["since"] if prev == AlertState.RAISED else now
        self.alerts[name] = {"state": state, "severity": severity, "reasons": reasons, "ts": now,
                             "since": since if state == AlertState.RAISED else None}
        self.m.apply([("set", "pairlane_alert_active", {"name": name},
                       1.0 if state == AlertState.RAISED else 0.0)])
        if state == AlertState.RAISED and prev != AlertState.RAISED:
            self.m.apply([("inc", "pairlane_alerts_raised_total", {"name": name}, 1.0)])
            self.log("ERROR" if severity == "critical" else "WARNING", "alert_raised", alert=name,
                     reasons=reasons)
        elif state == AlertState.CLEARED:
            self.log("INFO", "alert_cleared", alert=name)
        self._publish(name, self.alerts[name])

    def _publish(self, name: str, a: dict) -> None:
        now = time.time()
        self.published_at[name] = now
        frame = {"type": "alert", "name": str(name), "state": str(a["state"]), "severity": a["severity"],
                 "reasons": a["reasons"], "ts": now}
        try:
            self.pub.send(msgpack.packb(frame, use_bin_type=True, default=str), zmq.NOBLOCK)
            self.published += 1
        except zmq.ZMQError:
            pass

    def _republish(self, now: float) -> None:
        """Raised alerts whose owner has not re-asserted them for REPUBLISH_S go out again, so a
        subscriber that missed the change still learns of them."""
        for name, a in list(self.alerts.items()):
            if a["state"] == AlertState.RAISED and now - self.published_at.get(name, 0.0) >= REPUBLISH_S:
                self._publish(name, a)

    def _restart_delta(self, name: str, restarts: int, pid: int | None) -> int:
        """Starts after the first since the previous status row of `name`. A supervisor that is
        itself restarted counts its children's restarts from 0 again: a count lower than the last
        one seen (or a new pid with an unchanged count) means the new supervisor started it again."""
        last, known_pid = self.restarts_seen.get(name, (0, None))
        if restarts >= last:
            delta = restarts - last
        else:  # counting began again: its first start under the new supervisor is a restart too
            delta = restarts + (1 if pid is not None or restarts > 0 else 0)
        if delta == 0 and pid is not None and known_pid is not None and pid != known_pid:
            delta = 1
        self.restarts_seen[name] = (restarts, pid if pid is not None else known_pid)
        return delta

    def _restarts(self, rows) -> None:
        """The root's status table: restart counters, actor up/down, the processes' figures, FATAL."""
        updates = []
        fatal = []
        procs = {}
        for r in rows:
            name, pid = r["name"], r.get("pid")
            delta = self._restart_delta(name, int(r.get("restarts") or 0), pid)
            if delta:
                updates.append(("inc", "pairlane_actor_restarts_total", {"actor": name}, float(delta)))
            updates.append(("set", "pairlane_actor_up", {"actor": name}, 1.0 if r["state"] == "RUNNING" else 0.0))
            if pid:
                st = read_process(pid)
                if st is not None:
                    procs[name] = st
            if r["state"] == "FATAL":
                fatal.append((name, r.get("supervisor")))
        self.m.apply(updates)
        self.m.set_processes(procs)
        if fatal:
            self.escalated_at = time.time()
            # named like the root's Escalated (which may come a moment later): the supervisor that gave up
            self.set_alert(AlertName.SUPERVISOR_ESCALATED, AlertState.RAISED,
                           {"supervisor": ",".join(sorted({str(s) for _, s in fatal})),
                            "fatal": [n for n, _ in fatal]})
        elif self.raised(AlertName.SUPERVISOR_ESCALATED) and \
                time.time() - self.escalated_at > ESCALATION_CLEAR_S:
            self.set_alert(AlertName.SUPERVISOR_ESCALATED, AlertState.CLEARED, {})

    # ----- periodic ----------------------------------------------------------------------------------
    def tick(self) -> None:
        self._read_subscriptions()   # the FD is edge-triggered: never leave one waiting
        now = time.time()
        if now - self.last_slow < SLOW_TICK_S:
            return
        self.last_slow = now
        self.tell("root", StatusRequest(0))
        if backend(self.config) == "postgresql":
            self._track_pg_size(now)
        else:
            self.m.track_db_files(self.config["store"]["path"], now)
        self._check_stall(now)
        self._check_disk()
        self._republish(now)

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
        usage = self.m.track_disk({"store": os.path.dirname(store["path"]) or ".", "spool": dlq["path"]},
                                  {"store": store["max_bytes"], "spool": dlq["max_bytes"]})
        for area, (free, total) in usage.items():
            if free < 0.1 * total:
                reasons[f"{area}_disk"] = f"{free} bytes free of {total}"
        if reasons:
            self.set_alert(AlertName.DISK_LOW, AlertState.RAISED, reasons)
        elif self.raised(AlertName.DISK_LOW):
            self.set_alert(AlertName.DISK_LOW, AlertState.CLEARED, {})

    def flush_metrics(self) -> None:  # our own batch goes straight into the registry
        if len(self.metrics):
            self.m.apply(self.metrics.drain())
