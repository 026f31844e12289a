"""Actor lifecycle states, their groups and the one guarded way to change them.

Owns: the states of PROTOCOL.md section 4 (`State`), the groups the
supervisor and the admin CLI reason with (RUNNING_STATES, STOPPED_STATES,
as in the `supervisor` project's states.py), the table of legal changes and
`transition`, the only function through which a supervisor changes a child's
state. Stdlib only, so `run.py admin` can import it without Thespian. Never
holds state itself and never decides *when* to change one.
"""
from __future__ import annotations

from enum import Enum

from .log import log


class State(str, Enum):
    """What a supervised actor is doing, as `admin status` shows it."""

    STARTING = "STARTING"   # created, not yet answered its start message
    RUNNING = "RUNNING"     # started and heartbeating
    BACKOFF = "BACKOFF"     # exited (or goes down with a sibling); a restart is scheduled after a backoff delay
    STOPPING = "STOPPING"   # asked to stop, not yet gone
    STOPPED = "STOPPED"     # stopped on purpose (shutdown, temporary child exited)
    FATAL = "FATAL"         # its supervisor gave up (restart intensity exceeded)


RUNNING_STATES = frozenset({State.STARTING, State.RUNNING, State.STOPPING})
"""A process of the actor exists, or is being created."""

STOPPED_STATES = frozenset({State.BACKOFF, State.STOPPED, State.FATAL})
"""No process of the actor is meant to exist."""

WAITING_STATES = frozenset({State.BACKOFF, State.FATAL})
"""Stopped, and a plain `stop` must not hide why (a restart is due, or the supervisor gave up)."""

TRANSITIONS: dict[State, frozenset[State]] = {
    # first start, operator restart, restart after a stop; a sibling's restart marks it BACKOFF;
    # a supervisor giving up marks it FATAL
    State.STOPPED: frozenset({State.STARTING, State.BACKOFF, State.FATAL}),
    # answered Started; stopped or killed before that; died while starting (crash, or its
    # supervisor is giving up / shutting down / it is temporary)
    State.STARTING: frozenset({State.RUNNING, State.STOPPING, State.BACKOFF, State.STOPPED, State.FATAL}),
    State.RUNNING: frozenset({State.STOPPING, State.BACKOFF, State.STOPPED, State.FATAL}),
    # the restart is due; or a process marked BACKOFF with a sibling (one_for_all, rest_for_one)
    # still answers Started, is stopped, or exits
    State.BACKOFF: frozenset({State.STARTING, State.RUNNING, State.STOPPING, State.STOPPED, State.FATAL}),
    # it exited (or was killed after shutdown_s); a sibling's crash puts it in the restart set
    State.STOPPING: frozenset({State.STOPPED, State.BACKOFF, State.FATAL}),
    State.FATAL: frozenset(),  # the supervisor gave up: nothing restarts it
}


class IllegalTransition(RuntimeError):
    """A state change outside TRANSITIONS: always a bug in the supervisor."""


def allowed(current: State, new: State) -> bool:
    """Is `current -> new` a legal change? Staying in the same state always is (a no-op)."""
    return new == current or new in TRANSITIONS[current]


def transition(current: State, new: State, *, strict: bool = False, actor: str = "-",
               child: str = "-") -> State:
    """The state to store after asking to change `current` to `new`.

    A legal change returns `new`. An illegal one is refused: logged at ERROR and
    `current` is returned; with `strict` (tests: TreeSettings.strict_states) it raises
    IllegalTransition instead.
    """
    if allowed(current, new):
        return new
    log("ERROR", "illegal_state_transition", actor=actor, child=child, current=current.value,
        new=new.value)
    if strict:
        raise IllegalTransition(f"{child}: {current.value} -> {new.value}")
    return current
