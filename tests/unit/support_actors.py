"""Test actors for the supervision unit tests (tests/unit/test_supervision.py).

Owns: small `Worker` subclasses with one misbehaviour each, and `ForwardingRoot`, a
`RootSupervisor` that can forward a message to any actor of its tree by name
(the only way a test outside the actor system reaches an actor whose address
changes at every restart). Every worker appends one line per start to
`<run_dir>/<name>.starts` ("pid monotonic_time overlap"), where overlap is 1
when an older instance of the same name was still alive at that moment: the
"never two instances of a child" check. Never used by the daemon.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

from pairlane.supervision import procs
from pairlane.supervision.messages import Heartbeat
from pairlane.supervision.root import RootSupervisor
from pairlane.supervision.worker import Worker


@dataclass(frozen=True)
class Forward:
    """Test -> ForwardingRoot: send `msg` to the actor registered as `name` (reply: Forwarded)."""

    name: str
    msg: Any


@dataclass(frozen=True)
class Forwarded:
    """ForwardingRoot -> test: whether `name` was known (and the message sent)."""

    name: str
    sent: bool


@dataclass(frozen=True)
class Crash:
    """-> Steady and subclasses: raise in the handler (let it crash)."""


@dataclass(frozen=True)
class Exit:
    """-> Steady and subclasses: exit normally (ExitingNormally, then ActorExitRequest)."""


@dataclass(frozen=True)
class Hang:
    """-> Steady and subclasses: block forever (no heartbeats)."""


@dataclass(frozen=True)
class Stall:
    """-> Steady and subclasses: block the loop for `seconds`, then go on."""
    seconds: float


@dataclass(frozen=True)
class ThespianWarning:
    """-> Steady and subclasses: have Thespian's own log (thesplog) write `text` as a warning."""
    text: str


class ForwardingRoot(RootSupervisor):
    """The real root supervisor plus `Forward`, for tests only."""

    def on_message(self, msg, sender) -> None:
        if isinstance(msg, Forward):
            addr = self.directory.get(msg.name)
            if addr is not None:
                self.send(addr, msg.msg)
            self.send(sender, Forwarded(msg.name, addr is not None))
        else:
            super().on_message(msg, sender)


def starts_path(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, f"{name}.starts")


def read_starts(run_dir: str, name: str) -> list[tuple[int, float, int]]:
    """[(pid, monotonic start time, overlap)] of every start of `name`, oldest first."""
    try:
        with open(starts_path(run_dir, name)) as fh:
            rows = [ln.split() for ln in fh if ln.strip()]
    except FileNotFoundError:
        return []
    return [(int(p), float(t), int(o)) for p, t, o in rows]


def _record_start(run_dir: str, name: str) -> None:
    me = os.getpid()
    overlap = any(pid != me and procs.alive(pid) for pid, _, _ in read_starts(run_dir, name))
    with open(starts_path(run_dir, name), "a") as fh:
        fh.write(f"{me} {time.monotonic():.6f} {int(overlap)}\n")


class Steady(Worker):
    """Does nothing but heartbeat; crashes, exits or hangs when told to."""

    def on_start(self) -> None:
        _record_start(self.run_dir, self.name)

    def on_message(self, msg, sender) -> None:
        if isinstance(msg, Crash):
            raise RuntimeError("test crash")
        if isinstance(msg, Exit):
            self._graceful_exit("test exit")
        elif isinstance(msg, Hang):
            while True:
                time.sleep(3600)
        elif isinstance(msg, Stall):
            stall_in_a_handler(msg.seconds)
        elif isinstance(msg, ThespianWarning):
            import logging

            from thespian.system.utilis import thesplog
            thesplog(msg.text, level=logging.WARNING)

    def on_stop(self) -> None:
        with open(os.path.join(self.run_dir, "stop_order"), "a") as fh:
            fh.write(self.name + "\n")


def stall_in_a_handler(seconds: float) -> None:
    """A named frame for the stall tests to find in the dumped stack."""
    time.sleep(seconds)


class Muted(Steady):
    """Its loop runs (it touches its pidfile every heartbeat) but none of its heartbeats ever leave:
    what a supervisor sees when messages between processes are delayed, not when a child hangs."""

    def send(self, addr, msg) -> None:
        if isinstance(msg, Heartbeat):
            return
        super().send(addr, msg)


class CrashLoop(Steady):
    """Crashes 20 ms after every start: a restart storm by itself. Appends
    "pid monotonic_time" to `<run_dir>/<name>.crashes` just before each crash."""

    def on_start(self) -> None:
        super().on_start()
        self.after(0.02, "crash")

    def on_timer(self, payload) -> None:
        if payload == "crash":
            with open(os.path.join(self.run_dir, f"{self.name}.crashes"), "a") as fh:
                fh.write(f"{os.getpid()} {time.monotonic():.6f}\n")
            raise RuntimeError("crash loop")


def read_crashes(run_dir: str, name: str) -> list[tuple[int, float]]:
    """[(pid, monotonic crash time)] of every crash of a CrashLoop `name`, oldest first."""
    try:
        with open(os.path.join(run_dir, f"{name}.crashes")) as fh:
            return [(int(p), float(t)) for p, t in (ln.split() for ln in fh if ln.strip())]
    except FileNotFoundError:
        return []


class StubbornStop(Steady):
    """Ignores the graceful Shutdown: its supervisor must SIGKILL it after shutdown_s."""

    def _graceful_exit(self, reason: str) -> None:
        self.log("INFO", "ignoring_shutdown", reason=reason)


@dataclass(frozen=True)
class Burst:
    """Test -> a Relay: send `n` numbered `Seq`s to the actor registered as `to`, ordered."""

    to: str
    n: int
    tag: str
    size: int = 0     # bytes of padding in each Seq (big ones cross the lane in many packets)
    work_s: float = 0.0   # how long the receiver works on each Seq


@dataclass(frozen=True)
class Seq:
    tag: str
    i: int
    pad: bytes = b""
    work_s: float = 0.0


@dataclass(frozen=True)
class SeqAck:
    tag: str
    i: int


@dataclass(frozen=True)
class Rally:
    """Test -> a Relay: `n` Seq/SeqAck round trips with the actor registered as `to`, one at a time
    (each answer comes at once, so both keep finding more on their lanes)."""

    to: str
    n: int


@dataclass(frozen=True)
class Mark:
    """Test -> a Relay: record "markset" in its .seq now and "markfired" when `after(delay_s)` fires."""

    delay_s: float


@dataclass(frozen=True)
class Report:
    """Test -> a Relay: write its lane's figures (Lane.inspect) to `<run_dir>/<name>.lane` as JSON."""


class Relay(Steady):
    """Sends a Burst's Seqs with `tell` (send_ordered); a Seq it gets is recorded in
    `<run_dir>/<name>.seq` as "tag i sender-lane-count": one line each, in the order handled,
    and answered with a SeqAck to its sender (recorded as "ack tag i"). The count is how many
    messages this incarnation took off its lane so far (0: they all came through Thespian)."""

    def on_message(self, msg, sender) -> None:
        if isinstance(msg, Burst):
            for i in range(msg.n):
                self.tell(msg.to, Seq(msg.tag, i, b"x" * msg.size, msg.work_s))
        elif isinstance(msg, Rally):
            self._rally = msg.n
            self.tell(msg.to, Seq("rally", 0))
        elif isinstance(msg, Mark):
            self._record("markset 0 0")
            self.after(msg.delay_s, "mark")
        elif isinstance(msg, Report):
            with open(os.path.join(self.run_dir, f"{self.name}.lane"), "w") as fh:
                json.dump(self._lane.inspect() if self._lane is not None else {}, fh)
        elif isinstance(msg, (Seq, SeqAck)):
            if isinstance(msg, Seq):
                time.sleep(msg.work_s)
                self.send_ordered(sender, SeqAck(msg.tag, msg.i))
            elif msg.tag == "rally" and msg.i + 1 < getattr(self, "_rally", 0):
                self.send_ordered(sender, Seq("rally", msg.i + 1))
            received = self._lane.stats["received"] if self._lane is not None else 0
            kind = "ack " if isinstance(msg, SeqAck) else ""
            self._record(f"{kind}{msg.tag} {msg.i} {received}")
        else:
            super().on_message(msg, sender)

    def on_timer(self, payload) -> None:
        if payload == "mark":
            self._record("markfired 0 0")
        else:
            super().on_timer(payload)

    def _record(self, line: str) -> None:
        with open(os.path.join(self.run_dir, f"{self.name}.seq"), "a") as fh:
            fh.write(line + "\n")


def read_seq(run_dir: str, name: str) -> list[list[str]]:
    try:
        with open(os.path.join(run_dir, f"{name}.seq")) as fh:
            return [ln.split() for ln in fh if ln.strip()]
    except FileNotFoundError:
        return []
