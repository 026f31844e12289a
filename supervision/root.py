"""The root supervisor: the top of the tree, the registry and the status table.

Owns: building the tree on `StartTree` from the daemon's main process, the
name -> address directory (broadcast down on every change), the merged status
rows of the whole tree (answering `StatusRequest` at once, even during restart
storms), routing operator restarts to the owning supervisor, the graceful
stop of the whole tree, and telling the main process when the tree stopped or
gave up (`TreeStopped`, exit code 1 on escalation). Never knows what its
actors do.
"""
from __future__ import annotations

import os
import time

from .log import log
from .messages import (RestartChild, StartTree, StatusReply, StatusRequest, StatusRows,
                       StopDaemon, TreeStarted, TreeStopped)
from .states import State
from .supervisor import Supervisor

_TICK = "pl.tick"


class RootSupervisor(Supervisor):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.main = None
        self.table: dict[str, dict] = {}
        self.row_at: dict[str, float] = {}  # name -> StatusRows.at of the report its row came from
        self.registered_at: dict[str, float] = {}  # name -> Register.at of the change applied last
        self.ready_sent = False
        self.ready = False
        self.started_wall = time.time()

    def on_message(self, msg, sender) -> None:
        if isinstance(msg, StartTree):
            self._start_tree(msg, sender)
        elif isinstance(msg, StatusRequest):
            self.send(sender, StatusReply(msg.token, self.ready, self.status_rows()))
        elif isinstance(msg, StopDaemon):
            log("INFO", "tree_stopping", actor=self.name, reason=msg.reason)
            if self.main is not None and sender != self.main:
                self.send(self.main, msg)  # main learns a stop it did not ask for has begun
            self.stop_reason = msg.reason
            self.shutdown_children()
        else:
            super().on_message(msg, sender)

    def _start_tree(self, msg: StartTree, sender) -> None:
        self.main = sender
        self.stop_reason = "stop"
        self.adopt(msg, None, {msg.spec.name: self.myAddress})  # the root's parent is the main process
        self.table[self.name] = {"name": self.name, "supervisor": "-", "state": State.RUNNING.value,
                                 "pid": os.getpid(), "restarts": 0, "uptime_s": 0.0,
                                 "last_exit": None, "is_supervisor": True}
        log("INFO", "tree_starting", actor=self.name, pgid=os.getpgid(0))
        self.on_start()
        self.after(self.settings.heartbeat_s, _TICK)

    # ----- aggregation instead of forwarding up ---------------------------------------------
    def forward_rows(self, msg: StatusRows) -> None:
        for row in msg.rows:
            if msg.at < self.row_at.get(row["name"], 0.0):
                continue  # an older report delivered after a newer one: keep the newer
            self.row_at[row["name"]] = msg.at
            self.table[row["name"]] = dict(row)
        self._check_ready()

    def registered(self, name: str, address, at: float | None = None, lane: str = "") -> None:
        at = at or time.monotonic()
        if at < self.registered_at.get(name, 0.0):
            return  # an older change delivered after a newer one
        self.registered_at[name] = at
        self.lanes.pop(name, None)
        if address is None:
            self.directory.pop(name, None)
        else:
            self.directory[name] = address
            if lane:
                self.lanes[name] = lane
        self.directory_at = time.monotonic()
        self.on_directory()

    def _check_ready(self) -> None:
        rows = [r for n, r in self.table.items() if n != self.name]
        expected = sum(1 for s in self.spec.walk()) - 1
        self.ready = len(rows) >= expected and all(r["state"] == State.RUNNING.value for r in rows)
        if self.ready and not self.ready_sent and self.main is not None:
            self.ready_sent = True
            log("INFO", "tree_ready", actor=self.name, actors=len(rows))
            self.send(self.main, TreeStarted(pgid=os.getpgid(0), root_pid=os.getpid()))

    def status_rows(self) -> tuple:
        now = time.time()
        root = dict(self.table[self.name])
        root["uptime_s"] = round(now - self._started_at, 3)
        root["restarts"] = 0
        out = [root]
        known = {self.name}
        # tree order: depth-first through the specs
        for spec in self.spec.walk():
            if spec.name in self.table and spec.name not in known:
                row = dict(self.table[spec.name])
                started = row.pop("started_at", None)
                row["uptime_s"] = round(now - started, 3) if started else 0.0
                out.append(row)
                known.add(spec.name)
        return tuple(out)

    def restart_child(self, name: str) -> bool:
        if name in self.children:
            return super().restart_child(name)
        row = self.table.get(name)
        if row is None:
            return False
        owner = self.directory.get(row["supervisor"])
        if owner is None:
            return False
        self.send(owner, RestartChild(name))
        return True

    def child_escalated(self, msg) -> None:
        """A supervisor below gave up; tell the tree's event sink (settings.extra["event_sink"])."""
        sink = self.directory.get((self.settings.extra or {}).get("event_sink", ""))
        if sink is not None:
            self.send(sink, msg)

    # ----- endings -------------------------------------------------------------------------------
    def escalate(self, reason: str) -> None:
        log("ERROR", "root_gave_up", actor=self.name, reason=reason)
        if self.main is not None:
            self.send(self.main, TreeStopped(1, f"root supervisor gave up: {reason}"))

    def stopped_all(self) -> None:
        log("INFO", "tree_stopped", actor=self.name)
        if self.main is not None:
            self.send(self.main, TreeStopped(0, self.stop_reason))
