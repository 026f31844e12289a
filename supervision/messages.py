"""Messages between supervisors, their children and the daemon's main process.

Owns: the vocabulary of supervision. Every message is a frozen dataclass,
small and picklable (Thespian pickles between processes). Never carries
payload data of the application.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Init:
    """Supervisor -> new child, its first message.

    spec: the child's ChildSpec. settings: TreeSettings. config: the daemon config
    (a plain dict). main_pid: the daemon's main process (every actor exits when it
    is gone). run_dir: where pidfiles live. directory: name -> address known so far.
    supervisor_name: the name of the supervisor sending it. lanes: name -> lane endpoint
    (supervision/lanes.py) known so far.
    """

    spec: Any
    settings: Any
    config: dict
    main_pid: int
    run_dir: str
    directory: dict
    supervisor_name: str
    lanes: dict | None = None


@dataclass(frozen=True)
class Reload:
    """Daemon main -> root -> every actor, down the tree: settings and config changed (SIGHUP).

    Each actor takes the new `settings` (TreeSettings: log level and log output) and `config`,
    reopens its log output, passes the message to its children if it supervises any, and
    applies what it can in its `on_reload` hook. Never restarts anything.
    """

    settings: Any
    config: dict


@dataclass(frozen=True)
class Started:
    """Child -> supervisor: Init handled; pid is the child's process id; lane: the endpoint of its
    lane ("" when it has none), from then on the way its ordered messages reach it."""

    name: str
    pid: int
    lane: str = ""


@dataclass(frozen=True)
class Heartbeat:
    """Child -> supervisor, every heartbeat_s; silence past the deadline gets a SIGKILL."""

    name: str
    pid: int


@dataclass(frozen=True)
class Shutdown:
    """Supervisor -> child: stop gracefully (children first for a supervisor), then exit."""

    reason: str = "shutdown"


@dataclass(frozen=True)
class ExitingNormally:
    """Child -> supervisor, just before a deliberate normal exit (not a crash)."""

    name: str


@dataclass(frozen=True)
class StatusRows:
    """Supervisor -> parent (forwarded up to the root): status rows of its subtree.

    rows: tuple of dicts {name, supervisor, state, pid, restarts, uptime_s, started_at,
    last_exit, is_supervisor}.
    at: time.monotonic() when the rows were made (one clock for every process of the
    host). Thespian may deliver two reports of one supervisor out of order; the root
    keeps, per row, only the newest.
    """

    rows: tuple
    at: float = 0.0


@dataclass(frozen=True)
class Register:
    """Supervisor -> parent (forwarded up to the root): name now lives at address (None: gone).

    at: time.monotonic() of the change where it happened; the root ignores a Register
    older than the last one it applied for that name (Thespian may reorder them).
    """

    name: str
    address: Any
    at: float = 0.0
    lane: str = ""


@dataclass(frozen=True)
class Directory:
    """Root -> everyone (forwarded down): the whole name -> address registry.

    at: the root's time.monotonic() when this version was made; an actor ignores a
    Directory older than the one it has (Thespian may reorder them).
    """

    entries: dict
    at: float = 0.0
    lanes: dict | None = None   # name -> lane endpoint, for the names that have one


@dataclass(frozen=True)
class RestartChild:
    """Admin -> root -> owning supervisor: operator restart (not counted as a crash)."""

    name: str


@dataclass(frozen=True)
class Escalated:
    """Supervisor -> parent / root -> main: restart intensity exceeded."""

    name: str
    reason: str


@dataclass(frozen=True)
class InjectFault:
    """Admin -> actor: crash (exception), hang (stop answering) or exit (normal exit)."""

    fault: str


@dataclass(frozen=True)
class InspectRequest:
    """Anyone -> actor: reply InspectReply with the actor's own figures."""

    token: int


@dataclass(frozen=True)
class InspectReply:
    token: int
    name: str
    state: dict


@dataclass(frozen=True)
class StatusRequest:
    """Admin -> root: reply StatusReply with every actor's row."""

    token: int


@dataclass(frozen=True)
class StatusReply:
    token: int
    ready: bool
    rows: tuple


@dataclass(frozen=True)
class StopDaemon:
    """Admin -> root: graceful shutdown of the whole tree, then tell main (root -> main: the
    same message, when the stop came from anyone but main, says the stop has begun)."""

    reason: str = "admin stop"


@dataclass(frozen=True)
class TreeStarted:
    """Root -> main: every child is RUNNING for the first time; pgid is the actor system's group."""

    pgid: int
    root_pid: int


@dataclass(frozen=True)
class TreeStopped:
    """Root -> main: the tree stopped; exit_code tells the daemon how to exit."""

    exit_code: int
    reason: str


@dataclass(frozen=True)
class StartTree:
    """Main -> root: build the tree described by spec."""

    spec: Any
    settings: Any
    config: dict
    main_pid: int
    run_dir: str
