"""Child specifications and supervision strategies, as data (OTP style).

Owns: the description of a supervision tree. Never creates or talks to actors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Restart(str, Enum):
    PERMANENT = "permanent"   # always restarted
    TRANSIENT = "transient"   # restarted only after an abnormal exit
    TEMPORARY = "temporary"   # never restarted


class Strategy(str, Enum):
    ONE_FOR_ONE = "one_for_one"    # restart only the child that exited
    ONE_FOR_ALL = "one_for_all"    # restart every child
    REST_FOR_ONE = "rest_for_one"  # restart the child and every child started after it


@dataclass(frozen=True)
class ChildSpec:
    """One child of a supervisor.

    name: unique in the whole tree (it is the registry key and the pidfile name).
    actor: the Thespian Actor class (a `supervision.worker.Worker` or a `Supervisor`).
    restart: when it is restarted. shutdown_s: how long a graceful stop may take
    before SIGKILL. heartbeat_timeout_s: silence after which it is presumed hung
    and SIGKILLed (None: the tree default). children/strategy/intensity: set
    only when `actor` is a supervisor.
    """

    name: str
    actor: type
    restart: Restart = Restart.PERMANENT
    shutdown_s: float = 5.0
    heartbeat_timeout_s: float | None = None
    children: tuple["ChildSpec", ...] = ()
    strategy: Strategy = Strategy.ONE_FOR_ONE
    max_restarts: int | None = None
    window_s: float | None = None

    @property
    def is_supervisor(self) -> bool:
        return bool(self.children) or getattr(self.actor, "IS_SUPERVISOR", False)

    def walk(self):
        """Yield this spec and every spec below it, depth first, in start order."""
        yield self
        for child in self.children:
            yield from child.walk()


@dataclass(frozen=True)
class TreeSettings:
    """Defaults applied across the tree (from the [supervision] config table)."""

    max_restarts: int = 5
    window_s: float = 10.0
    backoff_min_s: float = 0.05
    backoff_max_s: float = 5.0
    heartbeat_s: float = 0.5
    heartbeat_timeout_s: float = 3.0
    log_level: str = "INFO"       # every worker's log threshold (DEBUG, INFO, WARNING, ERROR)
    strict_states: bool = False   # an illegal state change raises (tests) instead of being logged and refused
    process_title: str = ""       # e.g. "app: {name}": each actor process's title in ps/top ("" = untouched)
    log_format: str = "logfmt"    # "logfmt" or "json" (supervision.log)
    log_file: str = ""            # "" = stderr; else appended and reopened on Reload
    log_fields: dict = field(default_factory=dict)  # static fields on every log line (e.g. an instance name)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, sup: dict, log_level: str = "INFO", process_title: str = "", log_format: str = "logfmt",
                    log_file: str = "", log_fields: dict | None = None, **extra) -> "TreeSettings":
        """From the [supervision] table; extra: e.g. event_sink = the actor told of escalations."""
        return cls(log_level=log_level, process_title=process_title, log_format=log_format, log_file=log_file,
                   log_fields=dict(log_fields or {}), max_restarts=sup["max_restarts"], window_s=float(sup["window_s"]),
                   backoff_min_s=float(sup["backoff_min_s"]), backoff_max_s=float(sup["backoff_max_s"]),
                   heartbeat_s=float(sup["heartbeat_s"]),
                   heartbeat_timeout_s=float(sup["heartbeat_timeout_s"]), extra=dict(extra))
