"""Supervision on a real multiprocTCPBase actor system: strategies, restart types,
intensity and escalation, backoff, watchdog, graceful stop, orphans.

Each test starts its own actor system on a free loopback port, a
`ForwardingRoot` (the real RootSupervisor plus a test-only `Forward`), sends it
`StartTree` with a small tree of test actors (tests/unit/support_actors.py)
and observes it through `StatusRequest`/`StatusReply`, the `.starts` files the
test actors write, and /proc. The fixture always shuts the system down and
kills what is left of its process group, then fails the test if anything was.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from pairlane import config as cfgmod
from pairlane.supervision import lanes, procs
from pairlane.supervision.messages import (InspectReply, InspectRequest, RestartChild, StartTree, StatusReply,
                                  StatusRequest, StopDaemon, TreeStarted, TreeStopped)
from pairlane.supervision.intensity import RestartIntensity
from pairlane.supervision.spec import ChildSpec, Restart, Strategy, TreeSettings
from pairlane.supervision.states import (RUNNING_STATES, STOPPED_STATES, TRANSITIONS, IllegalTransition, State,
                                allowed, transition)
from pairlane.supervision.supervisor import Supervisor
from pairlane.supervision.system import patch_timer_remaining, start_system
from tests.harness import free_port, group_pids
from tests.unit.support_actors import (Burst, Crash, CrashLoop, Exit, Forward, Forwarded, ForwardingRoot, Muted,
                                       Hang, Mark, Rally, Relay, Report, Stall, Steady, StubbornStop, ThespianWarning,
                                       read_crashes, read_seq, read_starts)

pytestmark = pytest.mark.timeout(60)

FAST = TreeSettings(max_restarts=5, window_s=10.0, backoff_min_s=0.02, backoff_max_s=0.5,
                    heartbeat_s=0.1, heartbeat_timeout_s=1.0, strict_states=True)


class Tree:
    """One actor system with one root supervisor running `spec`."""

    def __init__(self, run_dir: str, spec: ChildSpec, settings: TreeSettings = FAST, main_pid: int | None = None,
                 thespian_log: str = ""):
        self.run_dir = run_dir
        self.spec = spec
        self.port = free_port()
        self.asys = start_system(self.port, thespian_log=thespian_log)
        self.inbox: list = []
        self.tokens = iter(range(1, 1_000_000))
        self.pgid: int | None = None
        self.seen_pids: set[int] = set()
        self.root = self.asys.createActor(ForwardingRoot)
        self.asys.tell(self.root, StartTree(spec=spec, settings=settings, config=cfgmod.load(None),
                                            main_pid=main_pid or os.getpid(), run_dir=run_dir))

    # ----- messages to the test (the asker) -----------------------------------------------
    def _take(self, kind):
        for i, m in enumerate(self.inbox):
            if isinstance(m, kind):
                return self.inbox.pop(i)
        return None

    def expect(self, kind, timeout: float = 5.0):
        """The next message of type `kind` sent to the test (TreeStarted, TreeStopped, ...)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self._take(kind)
            if got is not None:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind.__name__} within {timeout}s; inbox {self.inbox}")
            msg = self.asys.listen(min(left, 0.2))
            if msg is not None:
                self.inbox.append(msg)

    def got(self, kind) -> list:
        """Every message of type `kind` received so far (without waiting)."""
        while True:
            msg = self.asys.listen(0.01)
            if msg is None:
                break
            self.inbox.append(msg)
        return [m for m in self.inbox if isinstance(m, kind)]

    def started(self, timeout: float = 10.0) -> dict:
        msg = self.expect(TreeStarted, timeout)
        self.pgid = msg.pgid
        return self.status()

    # ----- status ---------------------------------------------------------------------------------
    def status_reply(self, timeout: float = 2.0) -> StatusReply:
        token = next(self.tokens)
        deadline = time.monotonic() + timeout
        msg = self.asys.ask(self.root, StatusRequest(token), timeout)
        while True:
            if isinstance(msg, StatusReply) and msg.token == token:
                for r in msg.rows:
                    if r["pid"]:
                        self.seen_pids.add(r["pid"])
                return msg
            if msg is not None and not isinstance(msg, StatusReply):
                self.inbox.append(msg)  # TreeStarted/TreeStopped/Forwarded arrive on the same channel
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no StatusReply within {timeout}s")
            msg = self.asys.listen(left)

    def inspect_root(self, timeout: float = 2.0) -> dict:
        token = next(self.tokens)
        deadline = time.monotonic() + timeout
        msg = self.asys.ask(self.root, InspectRequest(token), timeout)
        while True:
            if isinstance(msg, InspectReply) and msg.token == token:
                return msg.state
            if msg is not None and not isinstance(msg, (InspectReply, StatusReply)):
                self.inbox.append(msg)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no InspectReply within {timeout}s")
            msg = self.asys.listen(left)

    def settled(self, timeout: float = 5.0) -> dict:
        """Status once the root has no operation running or queued (no stop, backoff wait or
        start to come): from then on nothing changes without a new event."""
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.inspect_root()
            if state["current_op"] is None and not state["pending_ops"]:
                return self.status()
            time.sleep(0.02)
        raise AssertionError(f"root still busy after {timeout}s: {state}")

    def status(self, timeout: float = 2.0) -> dict:
        return {r["name"]: r for r in self.status_reply(timeout).rows}

    def pids(self) -> dict:
        return {n: r["pid"] for n, r in self.status().items()}

    def wait(self, pred, timeout: float = 5.0, what: str = "condition") -> dict:
        deadline = time.monotonic() + timeout
        rows = None
        while time.monotonic() < deadline:
            rows = self.status()
            if pred(rows):
                return rows
            time.sleep(0.02)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last status:\n"
                             + "\n".join(str(r) for r in (rows or {}).values()))

    def wait_running(self, name: str, restarts: int, timeout: float = 5.0) -> dict:
        return self.wait(lambda r: r[name]["state"] == "RUNNING" and r[name]["restarts"] >= restarts,
                         timeout, f"{name} RUNNING with restarts>={restarts}")

    def forward(self, name: str, msg) -> None:
        self.asys.tell(self.root, Forward(name, msg))
        reply = self.expect(Forwarded, 5.0)
        assert reply.sent, f"{name} is not registered at the root"

    # ----- teardown -------------------------------------------------------------------------------
    def close(self) -> list[int]:
        """Shut the system down; SIGKILL what is left of its process group. Returns survivors."""
        try:
            self.asys.shutdown()
        except Exception:
            pass
        pgid = self.pgid
        if pgid is None:
            for pid in self.seen_pids:
                try:
                    pgid = os.getpgid(pid)
                    break
                except OSError:
                    continue
        survivors = []
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            survivors = sorted(set(group_pids(pgid) if pgid else []) |
                               {p for p in self.seen_pids if procs.alive(p)})
            if not survivors:
                return []
            time.sleep(0.05)
        self.survivor_info = {pid: _describe(pid) for pid in survivors}
        for pid in survivors:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if pgid:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except OSError:
                pass
        return survivors


def _describe(pid: int) -> str:
    """ppid, state and the actor name (from its pidfile-less view: the last log line is not ours)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            st = dict(ln.split(":", 1) for ln in fh if ":" in ln)
        return f"ppid={st['PPid'].strip()} state={st['State'].strip()}"
    except OSError:
        return "gone"


@pytest.fixture
def make_tree(tmp_path):
    trees: list[Tree] = []

    def factory(spec: ChildSpec, settings: TreeSettings = FAST, main_pid: int | None = None,
                wait: bool = True, thespian_log: str = "") -> Tree:
        t = Tree(str(tmp_path / f"run{len(trees)}"), spec, settings, main_pid, thespian_log)
        trees.append(t)
        if wait:
            t.started()
        return t

    yield factory
    left, info = [], {}
    for t in trees:
        left += t.close()
        info.update(getattr(t, "survivor_info", {}))
        lanes.remove_lane_dir(t.run_dir)   # what the daemon's main process does at its stop
    assert not left, f"actor processes left behind (killed now): {info}"


def root_spec(*children: ChildSpec, strategy=Strategy.ONE_FOR_ONE, max_restarts=None, window_s=None) -> ChildSpec:
    return ChildSpec("root", ForwardingRoot, children=tuple(children), strategy=strategy,
                     max_restarts=max_restarts, window_s=window_s)


def steady(name: str, restart=Restart.PERMANENT, **kw) -> ChildSpec:
    return ChildSpec(name, Steady, restart, shutdown_s=kw.pop("shutdown_s", 2.0), **kw)


def gone(pid: int, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while procs.alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def no_overlap(run_dir: str, *names: str) -> None:
    for name in names:
        starts = read_starts(run_dir, name)
        assert starts, f"{name} never started"
        assert not [s for s in starts if s[2]], f"two instances of {name} alive at once: {starts}"


# ----- strategies ---------------------------------------------------------------------------------
def test_tree_starts_children_in_order_and_reports_them_running(make_tree):
    t = make_tree(root_spec(steady("a"), steady("b"), steady("c")))
    rows = t.status()
    assert list(rows) == ["root", "a", "b", "c"]
    assert t.status_reply().ready is True
    for n in "abc":
        assert rows[n]["state"] == "RUNNING" and rows[n]["restarts"] == 0 and rows[n]["supervisor"] == "root"
        assert procs.alive(rows[n]["pid"])
    starts = [read_starts(t.run_dir, n)[0][1] for n in "abc"]
    assert starts == sorted(starts)


def test_one_for_one_restarts_only_the_crashed_child(make_tree):
    t = make_tree(root_spec(steady("a"), steady("b"), steady("c")))
    before = t.pids()
    t.forward("b", Crash())
    rows = t.wait_running("b", 1)
    assert rows["b"]["pid"] != before["b"] and rows["b"]["last_exit"] == "crashed"
    assert gone(before["b"])
    for n in "ac":
        assert rows[n]["pid"] == before[n] and rows[n]["restarts"] == 0
    rows = t.settled()  # nothing else happens afterwards
    assert [rows[n]["pid"] for n in "abc"] == [before["a"], rows["b"]["pid"], before["c"]]
    no_overlap(t.run_dir, "a", "b", "c")


def test_one_for_all_restarts_every_sibling(make_tree):
    t = make_tree(root_spec(steady("a"), steady("b"), steady("c"), strategy=Strategy.ONE_FOR_ALL))
    before = t.pids()
    os.kill(before["b"], signal.SIGKILL)
    rows = t.wait(lambda r: all(r[n]["state"] == "RUNNING" and r[n]["restarts"] == 1 for n in "abc"),
                  what="a, b, c restarted once")
    for n in "abc":
        assert rows[n]["pid"] != before[n]
        assert gone(before[n])
    assert rows["b"]["last_exit"] == "crashed"
    assert rows["a"]["last_exit"] == rows["c"]["last_exit"] == "stopped"
    assert rows["root"]["pid"] == before["root"]
    no_overlap(t.run_dir, "a", "b", "c")


@pytest.mark.parametrize("victim,restarted", [("a", "abc"), ("b", "bc"), ("c", "c")])
def test_rest_for_one_restarts_the_child_and_those_started_after_it(make_tree, victim, restarted):
    t = make_tree(root_spec(steady("a"), steady("b"), steady("c"), strategy=Strategy.REST_FOR_ONE))
    before = t.pids()
    t.forward(victim, Crash())
    rows = t.wait(lambda r: all(r[n]["state"] == "RUNNING" and r[n]["restarts"] == 1 for n in restarted),
                  what=f"{restarted} restarted")
    rows = t.settled()
    for n in "abc":
        if n in restarted:
            assert rows[n]["pid"] != before[n] and rows[n]["restarts"] == 1, rows[n]
        else:
            assert rows[n]["pid"] == before[n] and rows[n]["restarts"] == 0, rows[n]
    no_overlap(t.run_dir, "a", "b", "c")


# ----- restart types ---------------------------------------------------------------------------------
def test_permanent_child_is_restarted_even_after_a_normal_exit(make_tree):
    t = make_tree(root_spec(steady("p")))
    before = t.pids()["p"]
    t.forward("p", Exit())
    rows = t.wait_running("p", 1)
    assert rows["p"]["pid"] != before and rows["p"]["last_exit"] == "exited normally"


def test_transient_child_is_restarted_after_a_crash_but_not_after_a_normal_exit(make_tree):
    t = make_tree(root_spec(steady("t_exit", Restart.TRANSIENT), steady("t_crash", Restart.TRANSIENT)))
    before = t.pids()
    t.forward("t_exit", Exit())
    t.forward("t_crash", Crash())
    rows = t.wait_running("t_crash", 1)
    assert rows["t_crash"]["pid"] != before["t_crash"] and rows["t_crash"]["last_exit"] == "crashed"
    t.wait(lambda r: r["t_exit"]["state"] == "STOPPED", what="t_exit STOPPED")
    rows = t.settled()  # no restart of t_exit queued or waiting
    assert rows["t_exit"]["state"] == "STOPPED" and rows["t_exit"]["pid"] is None
    assert rows["t_exit"]["restarts"] == 0 and rows["t_exit"]["last_exit"] == "exited normally"
    assert gone(before["t_exit"])
    assert len(read_starts(t.run_dir, "t_exit")) == 1
    assert t.status_reply().ready is False  # not every child is RUNNING any more


def test_temporary_child_is_never_restarted(make_tree):
    t = make_tree(root_spec(steady("tmp_crash", Restart.TEMPORARY), steady("tmp_kill", Restart.TEMPORARY),
                            steady("perm")))
    before = t.pids()
    t.forward("tmp_crash", Crash())
    os.kill(before["tmp_kill"], signal.SIGKILL)
    t.wait(lambda r: r["tmp_crash"]["state"] == "STOPPED" and r["tmp_kill"]["state"] == "STOPPED",
           what="temporary children STOPPED")
    rows = t.settled()  # no restart queued or waiting
    for n in ("tmp_crash", "tmp_kill"):
        assert rows[n]["state"] == "STOPPED" and rows[n]["pid"] is None and rows[n]["restarts"] == 0
        assert len(read_starts(t.run_dir, n)) == 1
    assert rows["perm"]["pid"] == before["perm"] and rows["perm"]["state"] == "RUNNING"


def test_operator_restart_is_counted_in_restarts_but_not_as_a_crash(make_tree):
    t = make_tree(root_spec(steady("a"), steady("b"), max_restarts=1))
    before = t.pids()
    for i in range(1, 4):
        t.asys.tell(t.root, RestartChild("a"))
        rows = t.wait_running("a", i)
    assert rows["a"]["restarts"] == 3 and rows["a"]["last_exit"] == "operator restart"
    assert rows["b"]["pid"] == before["b"]
    assert not t.got(TreeStopped)  # three restarts with max_restarts=1: no escalation
    no_overlap(t.run_dir, "a")


# ----- intensity and escalation -----------------------------------------------------------------------
def test_root_past_its_intensity_gives_up_and_tells_the_main_process_exit_code_1(make_tree):
    t = make_tree(root_spec(steady("a"), steady("b"), max_restarts=2, window_s=10.0))
    before = t.pids()
    for i in range(1, 3):
        t.forward("a", Crash())
        t.wait_running("a", i)
    t.forward("a", Crash())  # third crash within the window: 3 > max_restarts
    stopped = t.expect(TreeStopped, 5.0)
    assert stopped.exit_code == 1 and "3 crashes" in stopped.reason, stopped
    rows = t.wait(lambda r: r["a"]["state"] == "FATAL" and r["b"]["state"] == "FATAL", what="FATAL")
    assert rows["b"]["pid"] is None and gone(before["b"])  # siblings are stopped, not left running


def test_child_supervisor_escalates_and_its_parent_restarts_it(make_tree):
    sub = ChildSpec("sub", Supervisor, children=(steady("w"), steady("v")), max_restarts=1, window_s=10.0)
    t = make_tree(root_spec(sub, steady("z"), max_restarts=5))
    before = t.pids()
    t.forward("w", Crash())
    t.wait_running("w", 1)
    t.forward("w", Crash())  # 2 > 1 in sub: sub gives up, crashes; root restarts it
    rows = t.wait(lambda r: r["sub"]["restarts"] == 1 and all(r[n]["state"] == "RUNNING" for n in ("sub", "w", "v"))
                  and r["w"]["pid"] not in (before["w"], None) and r["v"]["pid"] != before["v"],
                  what="sub restarted with fresh w, v")
    assert rows["sub"]["pid"] != before["sub"] and rows["sub"]["last_exit"] == "crashed"
    assert rows["w"]["restarts"] == 0  # a fresh supervisor instance, fresh counters
    assert rows["z"]["pid"] == before["z"] and rows["root"]["pid"] == before["root"]
    for n in ("sub", "w", "v"):
        assert gone(before[n])
    assert not t.got(TreeStopped)
    no_overlap(t.run_dir, "w", "v")


def test_escalation_reaching_a_root_past_its_intensity_stops_the_tree_with_exit_code_1(make_tree):
    sub = ChildSpec("sub", Supervisor, children=(steady("w"),), max_restarts=0, window_s=10.0)
    t = make_tree(root_spec(sub, steady("z"), max_restarts=0))
    before = t.pids()
    t.forward("w", Crash())
    stopped = t.expect(TreeStopped, 5.0)
    assert stopped.exit_code == 1 and "sub" in stopped.reason, stopped
    t.wait(lambda r: r["sub"]["state"] == "FATAL" and r["z"]["state"] == "FATAL", what="FATAL")
    for n in ("sub", "w", "z"):
        assert gone(before[n])


# ----- backoff -------------------------------------------------------------------------------------------
def test_backoff_delay_is_exponential_with_jitter_and_capped():
    sup = SimpleNamespace(settings=TreeSettings(backoff_min_s=0.05, backoff_max_s=1.0))
    for n in range(1, 10):
        base = min(1.0, 0.05 * 2 ** (n - 1))
        delays = [Supervisor._backoff(sup, n) for _ in range(200)]
        assert all(base * 0.5 <= d <= base for d in delays), (n, min(delays), max(delays))
        assert max(delays) - min(delays) > base * 0.2  # jittered, not constant


def test_restarts_back_off_exponentially_with_consecutive_crashes(make_tree):
    settings = TreeSettings(max_restarts=100, window_s=60.0, backoff_min_s=0.1, backoff_max_s=5.0,
                            heartbeat_s=0.1, heartbeat_timeout_s=1.0, strict_states=True)
    t = make_tree(root_spec(ChildSpec("loop", CrashLoop), steady("calm")), settings, wait=False)
    deadline = time.monotonic() + 15
    while len(read_starts(t.run_dir, "loop")) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    starts = [s[1] for s in read_starts(t.run_dir, "loop")][:6]
    crashes = [c[1] for c in read_crashes(t.run_dir, "loop")][:5]
    assert len(starts) == 6 and len(crashes) == 5, (starts, crashes)
    # crash k -> next start waits 0.1 * 2**(k-1) * [0.5, 1] s (+ the time to start a process):
    # 0.05-0.1, 0.1-0.2, 0.2-0.4, 0.4-0.8, 0.8-1.6
    gaps = [start - crash for crash, start in zip(crashes, starts[1:])]
    assert gaps[0] >= 0.05 and gaps[2] >= 0.2 and gaps[4] >= 0.8, gaps
    assert gaps[3] > gaps[0] + 0.15 and gaps[4] > gaps[1] + 0.3 and gaps[4] > gaps[2], gaps
    assert t.status()["calm"]["restarts"] == 0  # the storm stays with its child (one_for_one)
    no_overlap(t.run_dir, "loop")


def test_status_answers_promptly_during_a_restart_storm(make_tree):
    settings = TreeSettings(max_restarts=10_000, window_s=60.0, backoff_min_s=0.001, backoff_max_s=0.01,
                            heartbeat_s=0.1, heartbeat_timeout_s=1.0, strict_states=True)
    t = make_tree(root_spec(ChildSpec("loop", CrashLoop), steady("calm")), settings, wait=False)
    t.wait(lambda r: "loop" in r and r["loop"]["restarts"] >= 3, what="the storm to start")
    latencies, restarts = [], []
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        t0 = time.monotonic()
        rows = t.status(timeout=2.0)
        latencies.append(time.monotonic() - t0)
        restarts.append(rows["loop"]["restarts"])
        time.sleep(0.02)
    assert restarts[-1] >= restarts[0] + 5, restarts  # the storm went on ...
    assert max(latencies) < 1.0, sorted(latencies)[-5:]  # ... and status never waited for it
    assert rows["calm"]["restarts"] == 0 and rows["calm"]["state"] == "RUNNING"
    no_overlap(t.run_dir, "loop")


# ----- watchdog, supervisor kill, stop, orphans ----------------------------------------------------------
def test_hung_child_is_killed_by_the_watchdog_and_restarted(make_tree):
    t = make_tree(root_spec(steady("h", heartbeat_timeout_s=0.5), steady("ok")))
    before = t.pids()
    t0 = time.monotonic()
    t.forward("h", Hang())
    rows = t.wait_running("h", 1, timeout=5.0)
    took = time.monotonic() - t0
    assert rows["h"]["last_exit"] == "hung (watchdog kill)" and rows["h"]["pid"] != before["h"]
    assert 0.4 < took < 3.0, took
    assert gone(before["h"], 0.1)
    assert rows["ok"]["pid"] == before["ok"]


def test_a_child_whose_loop_runs_but_whose_heartbeats_are_late_is_not_killed_at_its_deadline(make_tree):
    """Heartbeats delayed between processes (a loaded machine) are not a hang: the child's loop
    touches its pidfile, so the watchdog waits up to TRANSIT_GRACE deadlines before it kills; a
    transport stuck for good is still killed then."""
    t = make_tree(root_spec(ChildSpec("m", Muted, Restart.PERMANENT, shutdown_s=2.0, heartbeat_timeout_s=0.5),
                            steady("ok")))
    before = t.pids()
    t0 = time.monotonic()
    rows = t.wait_running("m", 1, timeout=8.0)
    took = time.monotonic() - t0
    assert rows["m"]["last_exit"] == "hung (watchdog kill)" and rows["m"]["pid"] != before["m"]
    assert took > 1.2, took   # over twice its 0.5 s deadline, where a hung child goes
    assert rows["ok"]["pid"] == before["ok"]


def _log_lines(path: str, event: str, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path) as fh:
                lines = [ln for ln in fh if f"event={event} " in ln]
        except FileNotFoundError:
            lines = []
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_a_watchdog_kill_logs_where_the_child_was_stuck(make_tree, tmp_path):
    log_path = str(tmp_path / "tree.log")
    settings = dataclasses.replace(FAST, log_file=log_path)
    t = make_tree(root_spec(steady("h", heartbeat_timeout_s=0.5), steady("ok")), settings)
    t.forward("h", Hang())
    t.wait_running("h", 1, timeout=5.0)
    kills = _log_lines(log_path, "watchdog_kill")
    assert len(kills) == 1, kills
    # the stack the child dumped on SIGUSR2 just before the kill: the hanging handler's frames
    assert "support_actors.py" in kills[0] and " on_message" in kills[0] and "stack=unknown" not in kills[0]


def test_a_loop_that_stalls_then_recovers_logs_its_stack_and_is_not_killed(make_tree, tmp_path):
    """Half the heartbeat deadline without a tick: faulthandler's watchdog thread writes the
    stacks, and the child logs them at its next tick; it stays up."""
    log_path = str(tmp_path / "tree.log")
    settings = dataclasses.replace(FAST, log_file=log_path)
    t = make_tree(root_spec(steady("s", heartbeat_timeout_s=2.0), steady("ok")), settings)
    before = t.pids()
    t.forward("s", Stall(1.4))   # past the 1.0 s stall threshold, within the 2.0 s deadline
    stalls = _log_lines(log_path, "loop_stalled")
    assert len(stalls) == 1, stalls
    assert "actor=s " in stalls[0] and "stall_in_a_handler" in stalls[0], stalls[0]
    rows = t.status()
    assert rows["s"]["pid"] == before["s"] and rows["s"]["restarts"] == 0
    assert not _log_lines(log_path, "watchdog_kill", timeout=0.1)


def test_thespian_warnings_go_to_the_file_the_actor_system_was_given(make_tree, tmp_path, monkeypatch):
    """By default Thespian writes its own warnings (a message dropped on an overloaded queue, ...)
    to one 50 KB $TMPDIR/thespian.log shared by every actor system on the host; a daemon gives
    its own file, and every actor process writes there."""
    from thespian.system import utilis
    monkeypatch.delenv("THESPLOG_FILE", raising=False)          # all restored after the test
    monkeypatch.setattr(utilis, "_thesplog_file", utilis._thesplog_file)
    monkeypatch.setattr(utilis, "_thesplog_control_settings", utilis._thesplog_control_settings)
    path = tmp_path / "thespian.log"
    t = make_tree(root_spec(steady("a")), thespian_log=str(path))
    t.forward("a", ThespianWarning("pairlane-test-warning-7"))
    deadline = time.monotonic() + 5.0
    while not (path.exists() and "pairlane-test-warning-7" in path.read_text()):
        assert time.monotonic() < deadline, "the warning never reached the system's own thespian.log"
        time.sleep(0.05)


def test_sigkill_of_a_supervisor_restarts_its_subtree_without_two_instances_alive(make_tree):
    sub = ChildSpec("sub", Supervisor, children=(steady("w"), steady("v")), strategy=Strategy.REST_FOR_ONE)
    t = make_tree(root_spec(sub, steady("z")))
    before = t.pids()
    os.kill(before["sub"], signal.SIGKILL)
    rows = t.wait(lambda r: r["sub"]["restarts"] == 1 and all(r[n]["state"] == "RUNNING" for n in ("sub", "w", "v"))
                  and r["w"]["pid"] != before["w"] and r["v"]["pid"] != before["v"],
                  what="subtree restarted")
    for n in ("sub", "w", "v"):
        assert gone(before[n]), f"old {n} ({before[n]}) still alive"
    assert rows["z"]["pid"] == before["z"] and rows["z"]["restarts"] == 0
    no_overlap(t.run_dir, "w", "v")
    # and the restarted subtree works: a crash below it is handled by the new supervisor
    t.forward("v", Crash())
    rows = t.wait_running("v", 1)
    assert rows["w"]["restarts"] == 0


def test_stop_stops_children_in_reverse_start_order_and_reports_exit_code_0(make_tree):
    t = make_tree(root_spec(steady("a"), steady("b"), steady("c")))
    before = t.pids()
    t.asys.tell(t.root, StopDaemon("test stop"))
    stopped = t.expect(TreeStopped, 10.0)
    assert stopped.exit_code == 0 and stopped.reason == "test stop"
    with open(os.path.join(t.run_dir, "stop_order")) as fh:
        assert fh.read().split() == ["c", "b", "a"]
    rows = t.status()
    for n in "abc":
        assert rows[n]["state"] == "STOPPED" and rows[n]["restarts"] == 0
        assert gone(before[n])


def test_child_ignoring_shutdown_is_killed_after_its_shutdown_timeout(make_tree):
    t = make_tree(root_spec(steady("a"), ChildSpec("stubborn", StubbornStop, shutdown_s=0.3)))
    before = t.pids()
    t0 = time.monotonic()
    t.asys.tell(t.root, StopDaemon("test stop"))
    assert t.expect(TreeStopped, 10.0).exit_code == 0
    assert 0.25 < time.monotonic() - t0 < 3.0
    rows = t.status()
    assert rows["stubborn"]["last_exit"] == "killed (shutdown timeout)"
    assert gone(before["stubborn"]) and gone(before["a"])


def test_every_actor_process_exits_when_the_main_process_is_gone(make_tree):
    main = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        sub = ChildSpec("sub", Supervisor, children=(steady("w"),))
        t = make_tree(root_spec(sub, steady("z")), main_pid=main.pid)
        pgid = t.pgid
        assert len(group_pids(pgid)) >= 5  # admin, logger, root, sub, w, z
    finally:
        main.kill()
        main.wait()
    deadline = time.monotonic() + 5.0
    while group_pids(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert group_pids(pgid) == [], "actor system outlived the main process"


def test_an_actor_process_dies_with_its_parent_even_before_its_first_message():
    """procs.die_with_parent (called in Worker.__init__): a child created just before its
    supervisor died never gets Init, so its heartbeat tick never checks for orphanhood."""
    script = (
        "import os, sys, time\n"
        f"sys.path.insert(0, {str(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))!r})\n"
        "from supervision import procs\n"
        "parent = os.getpid()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    procs.die_with_parent(parent)\n"
        "    print('armed', flush=True)\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "print(pid, flush=True)\n"
        "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        lines = {parent.stdout.readline().strip() for _ in range(2)}  # its pid, and the child armed
        assert "armed" in lines, lines
        child = int((lines - {"armed"}).pop())
        assert procs.alive(child)
    finally:
        parent.kill()
        parent.wait()
    try:
        assert gone(child, 2.0), "the child outlived its parent"
    finally:
        if procs.alive(child):
            os.kill(child, signal.SIGKILL)


# ----- states: groups and the one guarded transition ------------------------------------------------------
# Every change the supervisor makes (supervision/supervisor.py, `_set_state` callers), with where.
SUPERVISOR_TRANSITIONS = [
    (State.STOPPED, State.STARTING),    # _op_start: first start, operator restart, restart after a stop
    (State.BACKOFF, State.STARTING),    # _op_start: the restart after the backoff delay
    (State.STARTING, State.RUNNING),    # Started
    (State.BACKOFF, State.RUNNING),     # Started from a child marked BACKOFF with a crashed sibling
    (State.RUNNING, State.STOPPING),    # _op_stop
    (State.STARTING, State.STOPPING),   # _op_stop during shutdown or give-up while it starts
    (State.BACKOFF, State.STOPPING),    # _op_stop of a sibling in the restart set
    (State.STOPPING, State.STOPPED),    # its exit was expected; or killed after shutdown_s
    (State.RUNNING, State.STOPPED),     # _after_exit: temporary / transient normal exit / supervisor exiting
    (State.STARTING, State.STOPPED),    # _after_exit while giving up or exiting
    (State.BACKOFF, State.STOPPED),     # _after_exit while giving up or exiting
    (State.RUNNING, State.BACKOFF),     # _after_exit: a crash or a permanent child's normal exit
    (State.STARTING, State.BACKOFF),    # _after_exit: died while starting
    (State.STOPPED, State.BACKOFF),     # a stopped transient sibling in a one_for_all restart set
    (State.STOPPING, State.BACKOFF),    # a sibling being stopped when another crashes
    (State.STOPPED, State.FATAL),       # _give_up / _op_escalate
    (State.BACKOFF, State.FATAL),       # _give_up / _op_escalate
    (State.STOPPED, State.STOPPED),     # _op_stop of a child already gone: a no-op
]


def test_state_groups_split_every_state_in_two():
    assert RUNNING_STATES | STOPPED_STATES == set(State)
    assert not RUNNING_STATES & STOPPED_STATES
    assert State.FATAL in STOPPED_STATES and State.STOPPING in RUNNING_STATES
    assert set(TRANSITIONS) == set(State)


@pytest.mark.parametrize("current,new", SUPERVISOR_TRANSITIONS)
def test_every_transition_the_supervisor_makes_is_allowed(current, new):
    assert allowed(current, new)
    assert transition(current, new, strict=True) is new


@pytest.mark.parametrize("current,new", [(State.FATAL, State.STARTING), (State.FATAL, State.RUNNING),
                                         (State.STOPPED, State.RUNNING), (State.STOPPING, State.RUNNING),
                                         (State.RUNNING, State.STARTING), (State.STOPPED, State.STOPPING),
                                         (State.STOPPING, State.STARTING)])
def test_an_illegal_transition_is_refused_logged_and_raises_when_strict(current, new, capsys):
    assert not allowed(current, new)
    assert transition(current, new, actor="sup", child="x") is current  # refused: the state stays
    err = capsys.readouterr().err
    assert "level=ERROR" in err and "event=illegal_state_transition" in err and f"new={new.value}" in err
    with pytest.raises(IllegalTransition):
        transition(current, new, strict=True)


def test_fatal_is_final():
    for new in State:
        assert allowed(State.FATAL, new) == (new is State.FATAL)


# ----- restart intensity, on an injected clock ---------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_intensity_is_exceeded_by_one_crash_more_than_max_restarts_in_the_window():
    clock = Clock()
    ri = RestartIntensity(max_restarts=3, window_s=10.0, clock=clock)
    for _ in range(3):
        assert ri.record() is False
        clock.now += 1.0
    assert ri.in_window() == 3
    assert ri.record() is True
    assert ri.in_window() == 4


def test_intensity_window_slides_crashes_older_than_window_s_drop_out():
    clock = Clock()
    ri = RestartIntensity(max_restarts=2, window_s=10.0, clock=clock)
    assert ri.record() is False          # t=0
    clock.now += 6.0
    assert ri.record() is False          # t=6
    clock.now += 4.0
    assert ri.in_window() == 2           # t=10: the first is exactly window_s old, still in
    clock.now += 0.5
    assert ri.in_window() == 1           # t=10.5: it slid out
    assert ri.record() is False          # t=10.5: 2 in the window (6, 10.5), not more than 2
    assert ri.record() is True           # a third within 10 s
    clock.now += 100.0
    assert ri.in_window() == 0


def test_intensity_zero_gives_up_at_the_first_crash_and_a_late_crash_counts_too():
    clock = Clock()
    ri = RestartIntensity(max_restarts=0, window_s=5.0, clock=clock)
    clock.now += 86_400.0                # an actor that ran for a day before crashing
    assert ri.record() is True


def test_intensity_reads_only_the_injected_clock():
    clock = Clock()
    ri = RestartIntensity(max_restarts=1, window_s=1.0, clock=clock)
    ri.record()
    ri.record()
    assert ri.in_window() == 2           # the real clock moved, the injected one did not


def test_the_daemon_main_process_counts_root_deaths_with_the_same_intensity():
    from pairlane.entry.daemon import Daemon
    clock = Clock()
    d = Daemon(cfgmod.load(None), None)
    d.settings = TreeSettings(max_restarts=2, window_s=10.0, backoff_min_s=0.0)
    d.root_intensity = RestartIntensity(d.settings.max_restarts, d.settings.window_s, clock=clock)
    started = []
    d._start_root = lambda: started.append(clock.now)
    assert d._restart_root() and d._restart_root()
    assert d._restart_root() is False            # a third death within 10 s: the daemon gives up
    assert len(started) == 2
    clock.now += 60.0
    assert d._restart_root() is True             # long after: the window slid, it restarts again
    assert len(started) == 3


# ----- lanes (supervision/lanes.py) -------------------------------------------------------------------
def lane_files(run_dir: str) -> list[str]:
    d = lanes.lane_dir(run_dir)
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def wait_lines(run_dir: str, name: str, n: int, timeout: float = 10.0) -> list[list[str]]:
    deadline = time.monotonic() + timeout
    while True:
        lines = read_seq(run_dir, name)
        if len(lines) >= n or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


def test_ordered_messages_between_workers_go_on_their_lanes_in_order_and_a_restart_gets_a_new_lane(make_tree):
    t = make_tree(root_spec(ChildSpec("a", Relay, shutdown_s=2.0), ChildSpec("b", Relay, shutdown_s=2.0)))
    pids = t.pids()
    assert len(lane_files(t.run_dir)) == 2            # one socket per worker, none for the root supervisor
    t.forward("a", Burst("b", 3000, "one", size=3000))
    got = wait_lines(t.run_dir, "b", 3000)
    assert [(tag, int(i)) for tag, i, _ in got] == [("one", i) for i in range(3000)]
    assert int(got[-1][2]) >= 3000                    # every one was taken off b's lane, not Thespian's
    acks = wait_lines(t.run_dir, "a", 3000)           # b answered each to its sender: on a's lane too
    assert [(k, tag, int(i)) for k, tag, i, _ in acks] == [("ack", "one", i) for i in range(3000)]
    assert int(acks[-1][3]) >= 3000

    before = lane_files(t.run_dir)
    os.kill(pids["b"], signal.SIGKILL)
    t.wait_running("b", 1)
    after = lane_files(t.run_dir)
    assert len(after) == 2 and set(after) != set(before)  # the killed one's socket file is gone
    t.forward("a", Burst("b", 500, "two"))
    got = wait_lines(t.run_dir, "b", 3500)
    assert [(tag, int(i)) for tag, i, _ in got[3000:]] == [("two", i) for i in range(500)]
    assert int(got[-1][2]) == 500                     # the new incarnation's own lane, from its first message


def read_json_when_written(path: str, timeout: float = 5.0):
    """The JSON an actor writes to path, once it is all there (the file exists before it is written)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def test_a_thespian_timer_a_fraction_of_a_microsecond_from_its_deadline_still_bounds_the_select():
    """Thespian's TCP loop drops falsy delays before its select: a timer 0.3 us from its deadline
    reported timedelta(0), and the select waited with no timeout (a lost heartbeat tick, then a
    watchdog kill; the nonstop lane test below hit it about one run in 25)."""
    from thespian.system.timing import ExpirationTimerView
    patch_timer_remaining()
    close = ExpirationTimerView(None, 100.0, 100.0 - 3e-7)
    assert not close.expired() and list(filter(None, [close.remaining()]))
    assert not ExpirationTimerView(None, 100.0, 100.0).remaining()             # expired: 0, as before
    assert ExpirationTimerView(None, 100.0, 99.5).remaining().total_seconds() == 0.5
    assert ExpirationTimerView(None, None, 99.5).remaining("forever") == "forever"


def test_workers_trading_lane_messages_nonstop_still_take_thespian_mail_and_heartbeat(make_tree):
    """Every answer comes at once, so both workers keep waiting for the next in their own select
    (Worker._linger) instead of Thespian's loop: Thespian's mail must still get through, at once
    (a forwarded Burst, a Report), and so must their heartbeats (FAST: 1 s deadline)."""
    t = make_tree(root_spec(ChildSpec("a", Relay, shutdown_s=2.0), ChildSpec("b", Relay, shutdown_s=2.0)))
    t.forward("a", Rally("b", 4000))
    wait_lines(t.run_dir, "b", 200)
    t.forward("a", Burst("b", 1, "mid"))                   # Thespian mail to a, mid-rally
    got = wait_lines(t.run_dir, "b", 4001, timeout=60.0)
    assert [int(i) for tag, i, _ in got if tag == "rally"] == list(range(4000))
    at = [k for k, (tag, _, _) in enumerate(got) if tag == "mid"]
    assert at and at[0] < 3000, at                        # handled while the rally went on
    t.forward("b", Report())
    lane = read_json_when_written(os.path.join(t.run_dir, "b.lane"))
    assert lane["lingered"] > 1000 and lane["lost"] == 0, lane   # most came without Thespian's loop
    rows = t.status()
    assert all(rows[n]["restarts"] == 0 and rows[n]["state"] == "RUNNING" for n in "ab"), rows


def test_a_timer_falling_due_in_a_nonstop_lane_exchange_fires_on_time(make_tree):
    """A worker lingering for its next lane message (Worker._linger) stops at the first of its own
    wakeups to fall due: a timer set mid-rally fires a few round trips later, not when the slice
    (LANE_SLICE_S, 50 ms: up to hundreds of round trips here) or the heartbeat tick ends the
    linger. Five timers, at random points of their slices: without the rule, one of them waiting
    40 round trips or more is all but certain (0-215 in trials); with it, 1-8."""
    t = make_tree(root_spec(ChildSpec("a", Relay, shutdown_s=2.0), ChildSpec("b", Relay, shutdown_s=2.0)))
    t.forward("a", Rally("b", 8000))
    for k in range(5):
        wait_lines(t.run_dir, "b", 300 + 1000 * k, timeout=30.0)
        t.forward("a", Mark(0.002))
    lines = [ln[0] if ln[0].startswith("mark") else "trip" for ln in wait_lines(t.run_dir, "a", 8010, timeout=60.0)]
    assert lines.count("trip") == 8000, lines[-3:]
    sets = [i for i, x in enumerate(lines) if x == "markset"]
    fired = [i for i, x in enumerate(lines) if x == "markfired"]
    last_trip = len(lines) - 1 - lines[::-1].index("trip")
    assert len(sets) == len(fired) == 5 and fired[-1] < last_trip    # they fired while the rally went on
    waited = [lines[a:f].count("trip") for a, f in zip(sets, fired)]
    assert max(waited) < 40, waited                         # after 2 ms, not at the slice's end
    rows = t.status()
    assert all(rows[n]["restarts"] == 0 and rows[n]["state"] == "RUNNING" for n in "ab"), rows


def test_a_worker_busy_with_slow_lane_messages_still_heartbeats_between_them(make_tree):
    """Each message takes most of the heartbeat deadline (a database write that hits its statement
    timeout): the worker must let its heartbeat out between two of them, not handle a whole batch
    taken off the lane and be killed by the watchdog."""
    t = make_tree(root_spec(ChildSpec("a", Relay, shutdown_s=2.0), ChildSpec("b", Relay, shutdown_s=2.0)))
    t.forward("a", Burst("b", 6, "slow", work_s=0.6))    # FAST: heartbeat deadline 1.0 s
    got = wait_lines(t.run_dir, "b", 6, timeout=15.0)
    assert [(tag, int(i)) for tag, i, _ in got] == [("slow", i) for i in range(6)]
    rows = t.status()
    assert rows["b"]["restarts"] == 0 and rows["b"]["state"] == "RUNNING", rows["b"]


def test_a_worker_streaming_long_lane_messages_yields_long_only_around_its_heartbeats(make_tree):
    """Each message makes a slice that runs long (a big chunk's write: about 0.12 s here), one after
    another. The worker lets Thespian's transport have LANE_YIELD_LONG_S after such a slice only
    when a heartbeat is due or went out since the transport last had that turn (once a heartbeat
    here, every 0.5 s), not after every one (a writer idling 20 ms between every two big chunks);
    and it still heartbeats."""
    settings = dataclasses.replace(FAST, heartbeat_s=0.5, heartbeat_timeout_s=3.0)
    t = make_tree(root_spec(ChildSpec("a", Relay, shutdown_s=2.0), ChildSpec("b", Relay, shutdown_s=2.0)),
                  settings)
    t.forward("a", Burst("b", 16, "long", work_s=0.12))   # about 2 s: about 4 heartbeats
    got = wait_lines(t.run_dir, "b", 16, timeout=20.0)
    assert [(tag, int(i)) for tag, i, _ in got] == [("long", i) for i in range(16)]
    t.forward("b", Report())
    lane = read_json_when_written(os.path.join(t.run_dir, "b.lane"))
    assert 1 <= lane["long_yields"] <= 8, lane   # around each heartbeat (about 4), not after all 16
    rows = t.status()
    assert rows["b"]["restarts"] == 0 and rows["b"]["state"] == "RUNNING", rows["b"]
