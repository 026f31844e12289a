"""The base class of every supervised actor: a thin, crash-only Thespian shell.

Owns: the child side of supervision. It handles `Init` (restores fatal signal
handlers, writes the pidfile, calls `on_start`, answers `Started`), heartbeats
to the supervisor, watches the daemon's main process and its own parent
process (an orphan exits at once), answers `InspectRequest`, takes `Directory`
updates, performs injected faults, and stops on `Shutdown`.

Let it crash: an exception escaping a handler is logged and ends the process
(`os._exit`), so the supervisor restarts it with fresh state; Thespian's own
retry and PoisonMessage are never used. Never contains application logic.
"""
from __future__ import annotations

import collections
import gc
import heapq
import multiprocessing
import os
import select
import signal
import time
import traceback

from thespian.actors import (Actor, ActorExitRequest, ChildActorExited, ThespianWatch,
                             WakeupMessage, WatchMessage)

from . import procs, stacks
from .lanes import Lane
from .log import configure as configure_log
from .log import log, reopen, set_level
from .messages import (Directory, ExitingNormally, Heartbeat, InjectFault, Init, InspectReply,
                       InspectRequest, Reload, Shutdown, Started)
from .ordering import Numberer, Resequencer, Sequenced

CRASH_EXIT_CODE = 70
_TICK = "pl.tick"
_RESEQ = "pl.reseq"
_LANE = "pl.lane"
LANE_SLICE_S = 0.05   # lane messages are handled in slices this long at most
LANE_BATCH = 16       # taken off the lane at a time
LANE_LINGER_S = 0.003  # after the lane runs dry, wait this long for more in our own select (see _linger)
LANE_YIELD_S = 0.001  # how long a worker that used up its slice lets Thespian's mail go first
LANE_YIELD_LONG_S = 0.02   # the same after a slice that ran long
REORDER_GAP_S = 5.0  # a message missing this long is given up on (delivered alone if it comes)
TRIM_EVERY_S = 30.0  # how often a worker hands its C heap's free memory back (procs.trim_heap)


def set_process_title(template: str, name: str) -> None:
    """Title this process `template` with {name} filled in (seen in ps/top); nothing when the
    template is empty or setproctitle is not installed."""
    if not template:
        return
    try:
        from setproctitle import setproctitle
    except ImportError:
        return
    setproctitle(template.format(name=name))


class Worker(Actor):
    """Subclass and override the `on_*` hooks; never override `receiveMessage`."""

    IS_SUPERVISOR = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.name = "?"
        self.config: dict = {}
        self.directory: dict = {}
        self.directory_at = 0.0  # Directory.at of the version in self.directory
        self.lanes: dict = {}    # name -> lane endpoint, from the same Directory
        self._lane: Lane | None = None
        self._lane_backlog: collections.deque = collections.deque()   # taken off the lane, not yet handled
        self._lane_ready = None    # the lane's FDs `_linger`'s select found readable, for the next receive
        self._lane_wakeup = False      # a _LANE wakeup is scheduled
        self._ticked_at = time.monotonic()   # when the heartbeat tick last ran
        self._yielding_long = False   # the pending _LANE wakeup ends a long yield (`_needs_long_yield`)
        self._flushed_at = 0.0     # when the lane's last long yield ended: Thespian's transport had its turn
        self._timers_due: list = []   # heap: when our `after` wakeups not yet delivered fall due
        self.supervisor = None
        self.main_pid = 0
        self.run_dir = ""
        self._ppid = os.getppid()
        if multiprocessing.parent_process() is not None:  # an actor process (not simpleSystemBase)
            procs.die_with_parent(self._ppid)
        self._stopping = False
        self._started_at = time.time()
        self.settings = None
        self.spec = None
        self._numberer = Numberer()
        self._reseq = Resequencer(REORDER_GAP_S)
        self._reseq_timer = False
        self._anomalies_logged = 0
        self._early_reload: Reload | None = None
        self._loop_watch: stacks.StallDetector | None = None
        self._trimmed_at = time.monotonic()

    # ----- hooks for subclasses -------------------------------------------------
    def on_start(self) -> None:
        """Called once, after Init, before `Started` is sent. Open sockets and files here."""

    def on_message(self, msg, sender) -> None:
        """Any message that is not a supervision message."""

    def on_timer(self, payload) -> None:
        """A wakeup scheduled with `self.after(delay, payload)`."""

    def on_readable(self, fds: list) -> None:
        """One of the file descriptors from `watch_fds()` is readable."""

    def on_directory(self) -> None:
        """`self.directory` changed (an actor restarted and has a new address)."""

    def on_stop(self) -> None:
        """Graceful stop: flush and close. Must finish within the child spec's shutdown_s."""

    def on_reload(self, old_config: dict, new_config: dict) -> None:
        """`Reload` arrived: `self.config` is already `new_config` (and `self.settings` the new
        settings, the log reopened); apply what can change without a restart. Never restart."""

    def forward_reload(self, msg: Reload) -> None:
        """Pass a Reload down; supervisors send it to their children."""

    def inspect(self) -> dict:
        """The actor's own figures for `admin inspect`."""
        return {}

    def watch_fds(self) -> list:
        """File descriptors to wake up on (ZMQ sockets' FD)."""
        return []

    # ----- helpers --------------------------------------------------------------
    def after(self, delay_s: float, payload) -> None:
        delay_s = max(0.0, float(delay_s))
        heapq.heappush(self._timers_due, time.monotonic() + delay_s)   # `_linger` never waits past it
        self.wakeupAfter(delay_s, payload=payload)

    def peer(self, name: str):
        """Current address of the actor registered under `name`, or None."""
        return self.directory.get(name)

    def tell(self, name: str, msg) -> bool:
        """send_ordered to the actor registered under `name`; False if there is none."""
        addr = self.directory.get(name)
        if addr is None:
            return False
        self.send_ordered(addr, msg)
        return True

    def send_ordered(self, addr, msg) -> None:
        """Send so that addr (a Worker) handles our messages in the order we sent them: on its lane
        when it has one (supervision/lanes.py), else through Thespian, numbered, since Thespian
        alone does not promise order (see supervision/ordering.py)."""
        endpoint = self._lane.endpoint_of(addr) if self._lane is not None else None
        if endpoint is not None:
            self._lane.send(endpoint, msg)
        else:
            self.send(addr, self._numberer.wrap(addr, msg))

    def log(self, level: str, event: str, **fields) -> None:
        log(level, event, actor=self.name, **fields)

    # ----- the Thespian entry point ------------------------------------------------
    def receiveMessage(self, msg, sender):
        try:
            self._dispatch(msg, sender)
        except SystemExit:
            raise
        except BaseException as exc:  # let it crash
            log("ERROR", "crash", actor=self.name, error=f"{type(exc).__name__}: {exc}",
                traceback=traceback.format_exc())
            os._exit(CRASH_EXIT_CODE)
        if self._stopping:
            return None
        fds = self.watch_fds()
        if self._lane is not None and self._lane.sock is not None:
            fds = fds + self._lane.fds
        return ThespianWatch(fds) if fds else None

    def _dispatch(self, msg, sender) -> None:
        if isinstance(msg, Sequenced):
            self._deliver(self._reseq.accept(msg.origin, msg.n, (msg.msg, sender)))
        elif isinstance(msg, WakeupMessage):
            if self._timers_due:
                # one delivered: drop the earliest. Thespian may deliver wakeups due together in
                # another order, but only those already due, so the heap's first stays due no later
                # than the first still to come
                heapq.heappop(self._timers_due)
            if msg.payload == _TICK:
                self._tick()
            elif msg.payload == _RESEQ:
                self._reseq_timer = False
                self._deliver(self._reseq.expire())
            elif msg.payload == _LANE:
                self._lane_wakeup = False
                if self._yielding_long:   # a long yield ends: the transport had its turn
                    self._flushed_at, self._yielding_long = time.monotonic(), False
                self._drain_lane()
            else:
                self.on_timer(msg.payload)
        elif isinstance(msg, WatchMessage):
            ready = msg.ready
            mine = set(self._lane.fds) if self._lane is not None else ()
            if mine and not mine.isdisjoint(ready):
                ready = [fd for fd in ready if fd not in mine]
                self._lane_readable()
            if ready:
                self.on_readable(ready)
                if self._lane is not None and not self._lane_wakeup:
                    self._drain_lane()   # its answers come on our lane: wait for them in our own select
        elif isinstance(msg, Init):
            self._init(msg, sender)
        elif isinstance(msg, Directory):
            if msg.at >= self.directory_at:  # else: an older version delivered after a newer one
                self.directory_at = msg.at
                self.directory = dict(msg.entries)
                self.lanes = dict(msg.lanes or {})
                if self._lane is not None:
                    self._lane.set_directory(self.directory, self.lanes)
                self.on_directory()
        elif isinstance(msg, InspectRequest):
            state = dict(self.inspect())
            state.setdefault("pid", os.getpid())
            state.setdefault("delivery", dict(self._reseq.stats, held=self._reseq.held()))
            if self._lane is not None:
                state.setdefault("lane", self._lane.inspect())
            state.setdefault("uptime_s", round(time.time() - self._started_at, 3))
            self.send(sender, InspectReply(msg.token, self.name, state))
        elif isinstance(msg, Reload):
            self._reload(msg)
        elif isinstance(msg, InjectFault):
            self._inject(msg.fault)
        elif isinstance(msg, Shutdown):
            self._graceful_exit(msg.reason)
        elif isinstance(msg, ActorExitRequest):
            if not self._stopping:
                self._stopping = True
                self.on_stop()
                self._close_lane()
        elif isinstance(msg, ChildActorExited):
            self.on_child_exited(msg)
        else:
            self.on_message(msg, sender)

    def _drain_lane(self) -> None:
        """Handle what waits on our lane until LANE_SLICE_S have passed (checked after every message:
        one write may take seconds), then let Thespian's own mail (heartbeats, timers, admin) go
        first; a wakeup brings us back for the rest, which waits in order in `_lane_backlog`."""
        if self._lane is None:
            return
        if self._tick_overdue():
            # Thespian delivers wakeups that expired together last-first, and sends our heartbeat only
            # when its transport runs between them: let the tick, and the transport, go first
            self._take_lane()
            return self._lane_later()
        start = time.monotonic()
        until = start + LANE_SLICE_S
        more = True
        self._lane_ready = None
        while not self._stopping and time.monotonic() < until:
            if not self._lane_backlog:
                items, more = self._lane.receive(LANE_BATCH, self._lane_ready)
                self._lane_ready = None
                if not items:
                    if self._linger(until):
                        continue
                    break
                self._lane_backlog.extend(items)
            msg, sender = self._lane_next()
            self.on_message(msg, sender)
        if self._lane_backlog or more:
            self._lane_later(LANE_YIELD_LONG_S if self._needs_long_yield(until) else LANE_YIELD_S)

    def _needs_long_yield(self, until: float) -> bool:
        """After a slice that ran long (one slow write), leave Thespian's transport LANE_YIELD_LONG_S
        to get our heartbeat out and its ACK back (a send to an actor waits for the previous one's
        ACK), when there is one to get out: the tick is due (it runs in this yield), or it ran since
        the transport last had such a turn. Not after every long slice: a stream of big chunks, each
        a slice that runs long, would idle the writer that long between every two of them."""
        if time.monotonic() <= until + LANE_SLICE_S:
            return False
        if self._tick_overdue() or self._ticked_at > self._flushed_at:
            self._yielding_long = True
            self._lane.stats["long_yields"] += 1
            return True
        return False

    def _lane_next(self) -> tuple:
        """The backlog's next (message, sender): its first, unless `lane_defers` lets that one wait;
        then whatever else waits on the lane joins the backlog and `lane_pick` chooses."""
        backlog = self._lane_backlog
        if self.lane_defers(backlog[0][0]):
            self._take_lane()
            i = self.lane_pick(backlog)
            if i:
                entry = backlog[i]
                del backlog[i]
                return entry
        return backlog.popleft()

    def lane_defers(self, msg) -> bool:
        """May `msg`, first in the lane backlog, wait while a later message goes first? Never, unless
        a subclass says so (the writer: a big chunk, for small work)."""
        return False

    def lane_pick(self, backlog) -> int:
        """Index of the (message, sender) in `backlog` (arrival order) to handle next, asked only when
        lane_defers let the first wait. A subclass must keep each sender's order wherever it matters."""
        return 0

    def _linger(self, until: float) -> bool:
        """The lane ran dry: wait up to LANE_LINGER_S (and not past `until`) for more on it or on our
        own sockets (`watch_fds`, handed to `on_readable`) in our own select; True if any came.
        An answer on the data path comes within a millisecond or two, and each return to Thespian's
        loop costs about 0.1 ms before the next message is ours (it builds a selector per pass).
        Thespian's own mail (ticks, timers, admin) waits for us meanwhile, as it waits while we
        handle lane messages: the slice (`until`, LANE_SLICE_S after the drain began) bounds both;
        the first of our own wakeups (`after`) to fall due, or an overdue heartbeat tick, ends it.
        (Until session 12 a lingering drain went back to Thespian after 10 ms, whatever was due: a
        steady stream of small results then paid Thespian's loop every few results in each actor.)"""
        now = time.monotonic()
        wait = min(LANE_LINGER_S, until - now, (self._timers_due[0] - now) if self._timers_due else LANE_LINGER_S)
        if wait <= 0 or self._tick_overdue():
            return False
        lane_fds = self._lane.fds
        ready, _, _ = select.select(lane_fds + self.watch_fds(), [], [], wait)
        if not ready:
            return False
        self._lane.stats["lingered"] += 1   # a wakeup that did not go through Thespian's loop
        other = [fd for fd in ready if fd not in lane_fds]
        self._lane_ready = [fd for fd in ready if fd in lane_fds]   # no second select to find them
        if other:
            self.on_readable(other)
        return True

    def _lane_readable(self) -> None:
        """The lane's FD fired. While we are yielding to Thespian's mail (a _LANE wakeup pending),
        only take what waits off the sockets (so they stop firing in Thespian's select):
        Thespian hands us watched FDs before due timers, and handling here would starve them."""
        if not self._lane_wakeup:
            return self._drain_lane()
        self._take_lane()

    def _take_lane(self) -> None:
        """Everything waiting on the lane into the backlog, in order (its sockets stop firing)."""
        more = True
        while more:
            items, more = self._lane.receive()
            self._lane_backlog.extend(items)

    def _tick_overdue(self) -> bool:
        return self.settings is not None and time.monotonic() - self._ticked_at > self.settings.heartbeat_s

    def _lane_later(self, delay_s: float = LANE_YIELD_S) -> None:
        """Come back to the lane once Thespian's due mail (a heartbeat tick first) and its transport
        (which sends the heartbeat) have had their turn."""
        if not self._stopping and not self._lane_wakeup:
            self._lane_wakeup = True
            self.after(delay_s, _LANE)

    def _open_lane(self) -> None:
        """Bind this incarnation's lane (workers only: supervisors fork children, and a forked
        child must not inherit a lane's sockets and flusher thread)."""
        if self.IS_SUPERVISOR:
            return
        try:
            self._lane = Lane(self.run_dir, self.name, self.myAddress)
        except OSError as exc:
            self.log("WARNING", "lane_unavailable", error=exc)
            self._lane = None
            return
        if self._lane.endpoint is None:
            self.log("WARNING", "lane_unavailable", error="no lane directory of this user's own "
                     "(supervision/lanes.py lane_dir): messages to this actor go through Thespian")
        self._lane.set_directory(self.directory, self.lanes)

    def _close_lane(self) -> None:
        if self._lane is not None:
            self._lane.close()

    def _deliver(self, items: list) -> None:
        for msg, sender in items:
            self._dispatch(msg, sender)
        if self._reseq.anomalies() > self._anomalies_logged:
            self._anomalies_logged = self._reseq.anomalies()
            self.log("WARNING", "message_gap", gap_timeout_s=REORDER_GAP_S, **self._reseq.stats)
        if self._reseq.waiting() and not self._reseq_timer and not self._stopping:
            self._reseq_timer = True
            self.after(REORDER_GAP_S / 2, _RESEQ)

    def on_child_exited(self, msg) -> None:
        """Workers have no children; supervisors override this."""

    def adopt(self, msg, supervisor, directory: dict, lanes: dict | None = None) -> None:
        """Take the identity a start message (Init, or the root's StartTree) gives: signals, fields,
        log level, pidfile."""
        procs.restore_fatal_signals()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the daemon's main process
        self.name = msg.spec.name
        self.spec = msg.spec
        self.settings = msg.settings
        self.config = msg.config
        self.main_pid = msg.main_pid
        self.run_dir = msg.run_dir
        self.directory = dict(directory)
        self.lanes = dict(lanes or {})
        self.supervisor = supervisor
        self._started_at = time.time()
        set_level(self.settings.log_level)
        try:
            configure_log(self.settings.log_format, self.settings.log_file, self.settings.log_fields)
        except (OSError, ValueError) as exc:  # keep the inherited output; the main process checked it
            log("ERROR", "log_output_failed", actor=self.name, error=exc)
        set_process_title(self.settings.process_title, self.name)
        procs.write_pidfile(self.run_dir, self.name)
        if self._loop_watch is None and multiprocessing.parent_process() is not None:  # own process only
            self._loop_watch = stacks.StallDetector(self.run_dir, self.name, self._loop_stall_s())

    def _reload(self, msg: Reload) -> None:
        if self.spec is None:  # overtook our Init (Thespian does not order plain sends): apply after it
            self._early_reload = msg
            return
        old = self.config
        self.settings = msg.settings
        self.config = msg.config
        set_level(self.settings.log_level)
        reopen()
        self.forward_reload(msg)
        self.on_reload(old, msg.config)

    def _init(self, msg: Init, sender) -> None:
        self.adopt(msg, sender, msg.directory, msg.lanes)
        self._open_lane()
        self.on_start()
        if self._early_reload is not None:
            early, self._early_reload = self._early_reload, None
            self._reload(early)
        gc.freeze()  # what the fork inherited and on_start built is long-lived: keep it out of GC passes
        lane = self._lane.endpoint if self._lane is not None else None
        self.send(sender, Started(self.name, os.getpid(), lane or ""))
        self.after(self.settings.heartbeat_s, _TICK)

    def _loop_stall_s(self) -> float:
        """A loop that does not tick for half its heartbeat deadline has its stacks dumped."""
        return (self.spec.heartbeat_timeout_s or self.settings.heartbeat_timeout_s) / 2

    def _watch_own_loop(self) -> None:
        if self._loop_watch is None:
            return
        dump = self._loop_watch.take()
        if dump:
            self.log("WARNING", "loop_stalled", over_s=f"{self._loop_stall_s():.2f}", stack=stacks.compact(dump))
        self._loop_watch.tick()

    def _tick(self) -> None:
        self._ticked_at = time.monotonic()
        self._watch_own_loop()
        if time.monotonic() - self._trimmed_at > TRIM_EVERY_S:
            self._trimmed_at = time.monotonic()
            procs.trim_heap()
        self._check_orphan()
        if self.supervisor is not None and not self._stopping:
            self.send(self.supervisor, Heartbeat(self.name, os.getpid()))
            procs.touch_pidfile(self.run_dir, self.name)
        if self._lane is not None and (self._lane_backlog or self._lane.waiting()):
            self._lane_later()   # never leave lane mail waiting (a wakeup may have been missed)
        self.on_tick()
        self.after(self.settings.heartbeat_s, _TICK)

    def on_tick(self) -> None:
        """Called every heartbeat_s (supervisors check their children's deadlines here)."""

    def _check_orphan(self) -> None:
        if self.main_pid and not procs.alive(self.main_pid):
            log("ERROR", "main_process_gone", actor=self.name, main_pid=self.main_pid)
            self._kill_actor_system()
        if os.getppid() != self._ppid:
            log("ERROR", "parent_gone", actor=self.name, old_ppid=self._ppid)
            os._exit(CRASH_EXIT_CODE)

    @staticmethod
    def _kill_actor_system() -> None:
        """The daemon is gone: take the whole actor system (our own process group) with it."""
        pgid = os.getpgid(0)
        if pgid == os.getsid(0) and pgid > 1:  # Thespian's admin made this group with setsid()
            os.killpg(pgid, signal.SIGKILL)
        os._exit(CRASH_EXIT_CODE)

    def _inject(self, fault: str) -> None:
        self.log("WARNING", "fault_injected", fault=fault)
        if fault == "crash":
            raise RuntimeError("injected crash")
        if fault == "hang":
            while True:  # stop answering anything, heartbeats included
                time.sleep(3600)
        if fault == "exit":
            self._graceful_exit("injected exit")
            return
        raise ValueError(f"unknown fault {fault!r}")

    def _graceful_exit(self, reason: str) -> None:
        if self._stopping:
            return
        self.log("INFO", "stopping", reason=reason)
        self._stopping = True
        try:
            self.on_stop()
        finally:
            self._close_lane()
            if self.supervisor is not None:
                self.send(self.supervisor, ExitingNormally(self.name))
            self.send(self.myAddress, ActorExitRequest())
