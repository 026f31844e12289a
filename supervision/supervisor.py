"""An OTP-style supervisor on Thespian. Knows nothing about trading.

Owns: starting its children in order (each after the previous answered
`Started`), stopping them in reverse order within their shutdown timeouts,
restarting them by strategy (one_for_one, one_for_all, rest_for_one) and
restart type (permanent, transient, temporary) with exponential backoff and
jitter scheduled by `wakeupAfter` (never a blocking loop), giving up past
its `RestartIntensity` (stop everything and crash, so the parent sees an
abnormal exit; the root tells the daemon instead), its children's states
(changed only through `states.transition`), the heartbeat watchdog
(SIGKILL by pid), and reporting status rows and addresses upward.

All work is a queue of small operations (stop X, wait, start X) processed one
at a time, so overlapping events (a crash during a restart) cannot interleave
badly. Never blocks longer than the kill-and-wait of one process.
"""
from __future__ import annotations

import collections
import itertools
import os
import random
import time
from dataclasses import dataclass, field

from . import lanes, procs, stacks
from .intensity import RestartIntensity
from .log import log
from .messages import (Directory, Escalated, ExitingNormally, Heartbeat, Init, Register,
                       RestartChild, Shutdown, Started, StatusRows)
from .spec import ChildSpec, Restart, Strategy
from .states import WAITING_STATES, State, transition
from .worker import CRASH_EXIT_CODE, Worker

_op_ids = itertools.count(1)

# A child whose loop still runs (it touched its pidfile within its deadline) but whose heartbeats
# have not arrived is given up to this many deadlines before the watchdog kills it anyway.
TRANSIT_GRACE = 3.0


@dataclass(frozen=True)
class _LostExit:
    """Stands in for a ChildActorExited that Thespian never delivered (see `on_tick`)."""

    childAddress: object


@dataclass
class Child:
    spec: ChildSpec
    state: State = State.STOPPED
    address: object = None
    pid: int | None = None
    restarts: int = 0
    starts: int = 0
    started_at: float | None = None
    last_exit: str | None = None
    last_hb: float = 0.0
    expect_exit: bool = False      # we asked it to stop (or killed it on purpose)
    exited_normally: bool = False  # it said ExitingNormally before going
    hung: bool = False             # killed by the watchdog
    late_logged: bool = False      # heartbeat_late logged for the current silence
    lane: str = ""                 # its lane's endpoint (supervision/lanes.py), "" if none


@dataclass
class Op:
    kind: str                   # "stop" | "start" | "wait" | "escalate" | "exit"
    name: str | None = None
    delay: float = 0.0
    id: int = field(default_factory=lambda: next(_op_ids))


class Supervisor(Worker):
    """Create with a ChildSpec whose `children` are the specs it supervises."""

    IS_SUPERVISOR = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.children: dict[str, Child] = {}
        self.order: list[str] = []
        self.ops: collections.deque[Op] = collections.deque()
        self.current: Op | None = None
        self.intensity: RestartIntensity | None = None  # made in on_start, once spec and settings are known
        self.consecutive = 0
        self.giving_up = False
        self.exiting = False

    # ----- lifecycle ------------------------------------------------------------------
    def on_start(self) -> None:
        self.intensity = RestartIntensity(self.max_restarts, self.window_s)
        for spec in self.spec.children:
            self.children[spec.name] = Child(spec)
            self.order.append(spec.name)
        for name in self.order:
            self.ops.append(Op("start", name))
        self._report()
        self._pump()

    @property
    def max_restarts(self) -> int:
        return self.spec.max_restarts if self.spec.max_restarts is not None else self.settings.max_restarts

    @property
    def window_s(self) -> float:
        return self.spec.window_s if self.spec.window_s is not None else self.settings.window_s

    def _set_state(self, child: Child, new: State) -> None:
        """The only place a child's state changes: through `states.transition`, which refuses
        (and in tests raises on) an illegal change."""
        child.state = transition(child.state, new, strict=getattr(self.settings, "strict_states", False),
                                 actor=self.name, child=child.spec.name)

    def _hb_timeout(self, child: Child) -> float:
        return child.spec.heartbeat_timeout_s or self.settings.heartbeat_timeout_s

    # ----- the operation queue ------------------------------------------------------------
    def _pump(self) -> None:
        while self.current is None and self.ops:
            op = self.ops.popleft()
            self.current = op
            getattr(self, f"_op_{op.kind}")(op)

    def _done(self, op: Op) -> None:
        if self.current is not None and self.current.id == op.id:
            self.current = None
            self._pump()

    def _op_start(self, op: Op) -> None:
        child = self.children[op.name]
        if self.giving_up or self.exiting:
            return self._done(op)
        if not procs.ensure_gone(self.run_dir, child.spec.name):
            log("ERROR", "old_instance_survived_kill", actor=self.name, child=child.spec.name)
        self._set_state(child, State.STARTING)
        child.expect_exit = child.exited_normally = child.hung = False
        child.pid = None
        child.address = self.createActor(child.spec.actor)
        child.last_hb = time.monotonic()
        if child.starts > 0:
            child.restarts += 1
        child.starts += 1
        self.send(child.address, Init(spec=child.spec, settings=self.settings, config=self.config,
                                      main_pid=self.main_pid, run_dir=self.run_dir,
                                      directory=self.directory, supervisor_name=self.name,
                                      lanes=self.lanes))
        self.after(self._hb_timeout(child), ("op_timeout", op.id))
        self._report()

    def _op_stop(self, op: Op) -> None:
        child = self.children[op.name]
        if child.address is None:
            if child.state not in WAITING_STATES:
                self._set_state(child, State.STOPPED)
            return self._done(op)
        self._set_state(child, State.STOPPING)
        child.expect_exit = True
        self.send(child.address, Shutdown("supervisor stop"))
        self.after(child.spec.shutdown_s, ("op_timeout", op.id))
        self._report()

    def _op_wait(self, op: Op) -> None:
        self.after(op.delay, ("op_timeout", op.id))

    def _op_escalate(self, op: Op) -> None:
        for child in self.children.values():
            self._set_state(child, State.FATAL)
        self._report()
        self.escalate(op.name or self.name)

    def _op_exit(self, op: Op) -> None:
        self.current = None
        self.stopped_all()

    # ----- hooks the root overrides ---------------------------------------------------------
    def escalate(self, reason: str) -> None:
        """Restart intensity exceeded: crash, so our parent applies its own policy."""
        log("ERROR", "supervisor_escalated", actor=self.name, reason=reason)
        if self.supervisor is not None:
            self.send(self.supervisor, Escalated(self.name, reason))
        # Thespian transmits after the handler returns: exit a moment later, or Escalated is lost
        self.after(0.3, "pl.escalate_exit")

    def stopped_all(self) -> None:
        """Every child stopped after a Shutdown: exit normally."""
        self.send(self.supervisor, ExitingNormally(self.name))
        from thespian.actors import ActorExitRequest
        self.send(self.myAddress, ActorExitRequest())

    # ----- events -----------------------------------------------------------------------------
    def on_timer(self, payload) -> None:
        if payload == "pl.escalate_exit":
            os._exit(CRASH_EXIT_CODE)
        if isinstance(payload, tuple) and payload[0] == "op_timeout":
            op = self.current
            if op is None or op.id != payload[1]:
                return
            if op.kind == "wait":
                return self._done(op)
            child = self.children[op.name]
            if op.kind == "stop":
                log("WARNING", "shutdown_timeout_kill", actor=self.name, child=child.spec.name,
                    pid=child.pid)
                self._kill(child)
                child.address = None
                self._set_state(child, State.STOPPED)
                child.last_exit = "killed (shutdown timeout)"
                self._report()
                return self._done(op)
            if op.kind == "start":
                log("ERROR", "start_timeout", actor=self.name, child=child.spec.name)
                child.hung = True
                self._kill(child)  # its ChildActorExited arrives as a crash
                return self._done(op)
        else:
            self.on_supervisor_timer(payload)

    def on_supervisor_timer(self, payload) -> None:
        """Timers of subclasses."""

    def on_message(self, msg, sender) -> None:
        if isinstance(msg, Started):
            child = self._by_address(sender)
            if child is None:
                return
            child.pid = msg.pid
            if child.state != State.STOPPING:  # asked to stop while starting: it stays STOPPING
                self._set_state(child, State.RUNNING)
            child.started_at = time.time()
            child.last_hb = time.monotonic()
            log("INFO", "child_started", actor=self.name, child=child.spec.name, child_pid=msg.pid,
                restarts=child.restarts)
            child.lane = msg.lane
            self.registered(child.spec.name, sender, lane=msg.lane)
            self._report()
            if self.current is not None and self.current.kind == "start" and self.current.name == child.spec.name:
                self._done(self.current)
        elif isinstance(msg, Heartbeat):
            child = self._by_address(sender)
            if child is not None:
                child.last_hb = time.monotonic()
                child.late_logged = False
        elif isinstance(msg, ExitingNormally):
            child = self._by_address(sender)
            if child is not None:
                child.exited_normally = True
        elif isinstance(msg, StatusRows):
            self.forward_rows(msg)
        elif isinstance(msg, Register):
            self.registered(msg.name, msg.address, msg.at, msg.lane)
        elif isinstance(msg, Escalated):
            log("ERROR", "child_escalated", actor=self.name, child=msg.name, reason=msg.reason)
            self.child_escalated(msg)
        elif isinstance(msg, RestartChild):
            self.restart_child(msg.name)
        else:
            self.on_other(msg, sender)

    def on_other(self, msg, sender) -> None:
        log("WARNING", "unexpected_message", actor=self.name, type=type(msg).__name__)

    def child_escalated(self, msg: Escalated) -> None:
        """A child supervisor gave up; its exit follows and counts as a crash here."""
        if self.supervisor is not None:
            self.send(self.supervisor, msg)

    def forward_reload(self, msg) -> None:
        """Every child gets the Reload; children started later get the new settings and config
        in their Init (self.settings and self.config are already the new ones)."""
        for child in self.children.values():
            if child.address is not None:
                self.send(child.address, msg)

    def on_directory(self) -> None:
        for child in self.children.values():
            if child.address is not None:
                self.send(child.address, Directory(self.directory, self.directory_at, self.lanes))

    def on_child_exited(self, msg) -> None:
        child = self._by_address(msg.childAddress)
        if child is None:
            return  # an instance we already replaced
        child.address = None
        was_pid = child.pid
        child.pid = None
        lanes.remove_socket_file(child.lane)   # a killed process leaves it behind
        child.lane = ""
        child.started_at = None
        self.registered(child.spec.name, None)
        op = self.current
        if child.expect_exit:
            self._set_state(child, State.STOPPED)
            child.last_exit = child.last_exit if child.last_exit and "operator" in child.last_exit else "stopped"
            self._report()
            if op is not None and op.kind == "stop" and op.name == child.spec.name:
                self._done(op)
            return
        if op is not None and op.kind == "start" and op.name == child.spec.name:
            self.current = None  # died while starting: handled as a crash below
        crashed = not child.exited_normally
        child.last_exit = ("hung (watchdog kill)" if child.hung else
                           "crashed" if crashed else "exited normally")
        log("ERROR" if crashed else "WARNING", "child_exited", actor=self.name,
            child=child.spec.name, pid=was_pid, how=child.last_exit)
        self._after_exit(child, crashed)
        self._pump()

    # ----- restart policy ---------------------------------------------------------------------
    def _after_exit(self, child: Child, crashed: bool) -> None:
        spec = child.spec
        if self.giving_up or self.exiting:
            self._set_state(child, State.STOPPED)
            self._report()
            return
        if spec.restart == Restart.TEMPORARY or (spec.restart == Restart.TRANSIENT and not crashed):
            self._set_state(child, State.STOPPED)
            self._report()
            return
        if crashed and self.intensity.record():
            return self._give_up(f"{self.intensity.in_window()} crashes in {self.window_s:g}s "
                                 f"(last: {spec.name} {child.last_exit})")
        self.consecutive = self.intensity.in_window()
        names = self._restart_set(spec.name)
        # stop the siblings that go down with it, in reverse start order
        for name in reversed(names):
            if name != spec.name and self.children[name].address is not None:
                if not self._queued("stop", name):
                    self.ops.append(Op("stop", name))
        delay = self._backoff(max(1, self.consecutive))
        for name in names:
            c = self.children[name]
            if c.address is None or name != spec.name:
                self._set_state(c, State.BACKOFF)
        self.ops.append(Op("wait", delay=delay))
        for name in names:
            if not self._queued("start", name):
                self.ops.append(Op("start", name))
        log("INFO", "restart_scheduled", actor=self.name, children=",".join(names),
            delay_s=f"{delay:.3f}")
        self._report()

    def _restart_set(self, name: str) -> list[str]:
        strategy = self.spec.strategy
        if strategy == Strategy.ONE_FOR_ALL:
            return [n for n in self.order if self.children[n].spec.restart != Restart.TEMPORARY]
        if strategy == Strategy.REST_FOR_ONE:
            i = self.order.index(name)
            return [name] + [n for n in self.order[i + 1:]
                             if self.children[n].spec.restart != Restart.TEMPORARY]
        return [name]

    def _backoff(self, n: int) -> float:
        base = min(self.settings.backoff_max_s, self.settings.backoff_min_s * (2 ** (n - 1)))
        return base * random.uniform(0.5, 1.0)

    def _queued(self, kind: str, name: str) -> bool:
        return any(o.kind == kind and o.name == name for o in self.ops)

    def _give_up(self, reason: str) -> None:
        self.giving_up = True
        log("ERROR", "restart_intensity_exceeded", actor=self.name, reason=reason,
            max_restarts=self.max_restarts, window_s=self.window_s)
        self.ops.clear()
        if self.current is not None and self.current.kind in ("wait", "start"):
            self.current = None
        for name in reversed(self.order):
            self.ops.append(Op("stop", name))
        self.ops.append(Op("escalate", name=reason))
        for c in self.children.values():
            if c.address is None:
                self._set_state(c, State.FATAL)
        self._report()

    def restart_child(self, name: str) -> bool:
        """Operator restart: stop and start again; counted in restarts, not as a crash."""
        if name not in self.children:
            return False
        child = self.children[name]
        child.last_exit = "operator restart"
        if child.address is not None and not self._queued("stop", name):
            self.ops.append(Op("stop", name))
        if not self._queued("start", name):
            self.ops.append(Op("start", name))
        self._pump()
        return True

    def shutdown_children(self) -> None:
        """Stop every child in reverse start order, then `stopped_all()`."""
        self.exiting = True
        self.ops.clear()
        if self.current is not None and self.current.kind in ("wait", "start"):
            self.current = None
        for name in reversed(self.order):
            self.ops.append(Op("stop", name))
        self.ops.append(Op("exit"))
        self._pump()

    def _graceful_exit(self, reason: str) -> None:  # Shutdown from our parent
        if self._stopping or self.exiting:
            return
        log("INFO", "stopping", actor=self.name, reason=reason)
        self.shutdown_children()

    # ----- watchdog and reporting ---------------------------------------------------------------
    def on_tick(self) -> None:
        now = time.monotonic()
        for child in self.children.values():
            if child.state == State.RUNNING and child.address is not None and \
                    now - child.last_hb > self._hb_timeout(child):
                if child.pid and not procs.alive(child.pid):
                    # already gone, yet no ChildActorExited came: handle the exit ourselves
                    # rather than "killing" a dead pid at every tick forever
                    log("ERROR", "child_exit_unreported", actor=self.name, child=child.spec.name,
                        pid=child.pid)
                    self.on_child_exited(_LostExit(child.address))
                    continue
                silent, limit = now - child.last_hb, self._hb_timeout(child)
                age = procs.loop_age(self.run_dir, child.spec.name, child.pid) if child.pid else None
                if age is not None and age < limit and silent < TRANSIT_GRACE * limit:
                    # its loop still runs (it touched its pidfile), only its heartbeats are late:
                    # messages delayed between processes on a loaded machine, not a hang. Killing
                    # it would be a false restart; a transport stuck for good is still killed at
                    # TRANSIT_GRACE times the deadline.
                    if not child.late_logged:
                        child.late_logged = True
                        log("WARNING", "heartbeat_late", actor=self.name, child=child.spec.name,
                            child_pid=child.pid, silent_s=f"{silent:.2f}", loop_age_s=f"{age:.2f}")
                    continue
                # where it is stuck, asked before the kill (SIGUSR2 -> faulthandler in the child)
                stack = stacks.ask(self.run_dir, child.spec.name, child.pid) if child.pid else ""
                log("ERROR", "watchdog_kill", actor=self.name, child=child.spec.name, child_pid=child.pid,
                    silent_s=f"{silent:.2f}", loop_age_s="unknown" if age is None else f"{age:.2f}",
                    stack=stack or "unknown")
                child.hung = True
                self._kill(child)

    def _kill(self, child: Child) -> None:
        pid = child.pid
        st = None
        if pid is None:
            entry = procs.read_pidfile(self.run_dir, child.spec.name)
            if entry:
                pid, st = entry
        if pid:
            procs.kill_and_wait(pid, st, timeout_s=2.0)

    def _by_address(self, addr) -> Child | None:
        for child in self.children.values():
            if child.address is not None and child.address == addr:
                return child
        return None

    def rows(self) -> tuple:
        now = time.time()
        return tuple({"name": c.spec.name, "supervisor": self.name, "state": c.state.value,
                      "pid": c.pid, "restarts": c.restarts,
                      "uptime_s": round(now - c.started_at, 3) if c.started_at else 0.0,
                      "started_at": c.started_at,
                      "last_exit": c.last_exit, "is_supervisor": c.spec.is_supervisor}
                     for c in (self.children[n] for n in self.order))

    def _report(self) -> None:
        self.forward_rows(StatusRows(self.rows(), time.monotonic()))

    def forward_rows(self, msg: StatusRows) -> None:
        if self.supervisor is not None:
            self.send(self.supervisor, msg)

    def registered(self, name: str, address, at: float | None = None, lane: str = "") -> None:
        if self.supervisor is not None:
            self.send(self.supervisor, Register(name, address, at or time.monotonic(), lane))

    def inspect(self) -> dict:
        return {"children": [dict(r) for r in self.rows()],
                "strategy": self.spec.strategy.value,
                "crashes_in_window": self.intensity.in_window() if self.intensity else 0,
                "max_restarts": self.max_restarts, "window_s": self.window_s,
                "current_op": self._op_label(self.current) if self.current else None,
                "pending_ops": [self._op_label(o) for o in self.ops]}

    @staticmethod
    def _op_label(op: Op) -> str:
        return op.kind + (f":{op.name}" if op.name else "")

    def on_stop(self) -> None:
        pass
