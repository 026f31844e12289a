"""Actor lifecycle states, shared by the supervisors and the admin CLI.

Stdlib only, so `run.py admin` can import it without Thespian. Never holds
state itself.
"""
from enum import Enum


class State(str, Enum):
    """What a supervised actor is doing, as `admin status` shows it."""

    STARTING = "STARTING"   # created, not yet answered its start message
    RUNNING = "RUNNING"     # started and heartbeating
    BACKOFF = "BACKOFF"     # exited; a restart is scheduled after a backoff delay
    STOPPING = "STOPPING"   # asked to stop, not yet gone
    STOPPED = "STOPPED"     # stopped on purpose (shutdown, temporary child exited)
    FATAL = "FATAL"         # its supervisor gave up (restart intensity exceeded)


STATES = [s.value for s in State]
