"""Starting and stopping a Thespian actor system that listens on loopback only.

Owns: the one adaptation pairlane makes to Thespian 4.0.1. Thespian's TCP
transport binds its admin port and every actor's port to all addresses
(`IPBase.IPActorAddress.bindname = ('', port)`) and speaks pickle; we set
THESPIAN_BASE_IPADDR=127.0.0.1 (the advertised address) and replace the
`bindArgs` property so every socket binds 127.0.0.1. The patch is applied in
the daemon's main process before the system starts; Thespian forks the admin
and every actor from it, so they inherit it. A test reads /proc/net/tcp of the
daemon's processes to prove it.

A second, equally small adaptation: Thespian's `_childExited` (run when a
parent handles one `ChildActorExited`) re-polls every child process and
silently drops any *other* child that died meanwhile, reaping it without a
`ChildActorExited`; the SIGCHLD that follows then finds nothing. Two children
dying close together (a one_for_all restart, a crash during a SIGKILL) thus
lost one exit: the supervisor never restarted it and could not shut down.
`patch_child_exit` makes `_childExited` report every dead child, as the
SIGCHLD path does.

A third: Thespian's TCP loop bounds its select by the next timer's
`remaining()`, a timedelta, after dropping falsy delays (`filter(None, ...)`).
A timer less than half a microsecond from its deadline rounds to timedelta(0),
is dropped, and the select waits with no timeout: the timer (a heartbeat tick,
a lane wakeup) fires only when some socket wakes the actor. A worker waiting for
its own lane wakeup, whose peer waited for it, was silent until the watchdog
killed it (about one run in 25 of the nonstop lane exchange test).
`patch_timer_remaining` makes a timer that has not expired report at least
1 us. Never used for anything but these three.
"""
from __future__ import annotations

import os

LOOPBACK = "127.0.0.1"


def patch_loopback() -> None:
    os.environ["THESPIAN_BASE_IPADDR"] = LOOPBACK
    from thespian.system.transport import IPBase

    if getattr(IPBase.IPActorAddress, "_pairlane_loopback", False):
        return

    def _bind_args(self):
        host, port = self.bindname[0], self.bindname[1]
        if host in ("", "0.0.0.0", None):
            host = LOOPBACK
        return ((host, port),)

    IPBase.IPActorAddress.bindArgs = property(_bind_args)
    IPBase.IPActorAddress._pairlane_loopback = True


def patch_child_exit() -> None:
    from thespian.system import multiprocCommon

    cls = multiprocCommon.MultiProcReplicator
    if getattr(cls, "_pairlane_child_exit", False):
        return

    def _child_exited(self, childAddr):
        # report (as ChildActorExited) every child found dead, instead of dropping the others
        self.childDied()

    cls._childExited = _child_exited
    cls._pairlane_child_exit = True


def patch_timer_remaining() -> None:
    from datetime import timedelta

    from thespian.system import timing

    cls = timing.ExpirationTimerView
    if getattr(cls, "_pairlane_remaining", False):
        return
    orig = cls.remaining

    def remaining(self, forever=None):
        # never a falsy timedelta(0) before the deadline: the select would drop it and wait forever
        left = orig(self, forever)
        if left is not forever and not left and not self.expired():
            return timedelta(microseconds=1)
        return left

    cls.remaining = remaining
    cls._pairlane_remaining = True


THESPIAN_LOG_DEFS = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"kv": {"format": "ts=%(created).3f level=%(levelname)s actor=thespian pid=%(process)d event=thespian_log message=\"%(message)s\""}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "kv", "level": "WARNING"}},
    "root": {"handlers": ["stderr"], "level": "WARNING"},
}


THESPIAN_LOG_MAX_BYTES = 4 << 20   # Thespian's own log rotates once at this size (one .old kept)


def start_system(admin_port: int, thespian_log: str = ""):
    """A multiprocTCPBase actor system on 127.0.0.1:admin_port.

    thespian_log: where Thespian's internal warnings go (a transmit dropped because a queue is
    overloaded, a transmit timed out, a send to a dead actor). Thespian writes them only to a
    file, by default one $TMPDIR/thespian.log of 50 KB shared by every actor system on the host;
    a daemon gives its own file here, kept large enough to read after a long run."""
    patch_loopback()
    patch_child_exit()
    patch_timer_remaining()
    if thespian_log:
        import logging

        from thespian.system import utilis
        os.environ["THESPLOG_FILE"] = thespian_log  # read at each process's first warning ...
        utilis._thesplog_file = None                # ... unless this one already wrote one
        utilis.thesplog_control(logging.WARNING, False, THESPIAN_LOG_MAX_BYTES)  # forks inherit it
    from thespian.actors import ActorSystem

    return ActorSystem("multiprocTCPBase", {"Admin Port": admin_port}, logDefs=THESPIAN_LOG_DEFS,
                       transientUnique=True)
