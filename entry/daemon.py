"""The daemon's main process: validate, lock, start the actor system, wait, stop.

Owns: the start-up checks of PROTOCOL.md section 0 (exit code 2 with a message
naming the problem), the single-instance locks, starting Thespian on loopback
and the root supervisor, the wait loop (signals, the root's `TreeStopped`,
the root's own liveness), the graceful shutdown and the guarantee that no
process of the actor system outlives the daemon, and the systemd readiness
protocol (`READY=1` once the tree is ready, `STOPPING=1` when stopping starts:
one datagram each to $NOTIFY_SOCKET). Never handles data.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import signal
import socket
import sys
import time

from pairlane.supervision import lanes, procs
from pairlane.supervision.intensity import RestartIntensity
from pairlane.supervision.log import configure as configure_log
from pairlane.supervision.log import log, reopen, set_level
from pairlane.supervision.messages import Reload, StartTree, StopDaemon, TreeStarted, TreeStopped
from pairlane.supervision.spec import TreeSettings

from pairlane import config as cfgmod
from pairlane.lock import InstanceLock, LockBusy

from pairlane.entry.cli import program

EXIT_CONFIG = 2
LEFTOVER_GRACE_S = 2.0  # actor processes still alive this long after the actor system's shutdown are killed
PROCESS_TITLE = "pairlane: {name}"  # every actor process, as ps/top show it


# What SIGHUP applies without a restart (a dotted key, or a table prefix ending in "."); any
# other changed key is logged as needing a restart and keeps its running value.
RELOADABLE = ("daemon.log_level", "pairs.", "alerts.ingest_stall_s", "dlq.retry_min_s", "dlq.retry_max_s",
              "dlq.max_attempts")


def config_changes(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two loaded configs."""
    return sorted(f"{sect}.{key}" for sect, table in new.items() for key, value in table.items()
                  if old.get(sect, {}).get(key) != value)


def reloadable(key: str) -> bool:
    return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RELOADABLE)


def log_settings(cfg: dict) -> dict:
    """The [daemon] log keys as supervision.log.configure / TreeSettings take them."""
    d = cfg["daemon"]
    return {"log_format": d["log_format"], "log_file": d["log_file"], "log_fields": {"daemon": d["name"]}}


def sd_notify(state: str, env: dict | None = None) -> bool:
    """Send one datagram `state` (e.g. "READY=1") to systemd's $NOTIFY_SOCKET, as sd_notify(3)
    does: an AF_UNIX SOCK_DGRAM path, or the abstract namespace when it starts with '@'.
    Without the variable (not under Type=notify) it does nothing. Returns whether it was sent;
    a failure is logged, never raised: readiness reporting must not take the daemon down."""
    addr = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(state.encode())
    except OSError as exc:
        log("WARNING", "sd_notify_failed", actor="main", state=state, error=str(exc))
        return False
    return True


def run_dir_for(cfg: dict) -> str:
    return cfg["store"]["path"] + ".run"


def thespian_log_path(run_dir: str) -> str:
    """Thespian's own warnings (see supervision.system.start_system), beside the pidfiles."""
    return os.path.join(run_dir, "thespian.log")


class Daemon:
    def __init__(self, cfg: dict, config_path: str | None):
        self.cfg = cfg
        self.config_path = config_path
        self.stop_requested: str | None = None
        self.run_dir = ""
        self.reload_requested = False
        self.asys = None
        self.root = None
        self.root_pid: int | None = None
        self.pgid: int | None = None
        self.locks: list[InstanceLock] = []
        self.root_intensity: RestartIntensity | None = None  # crashes of the root supervisor
        self.notified: set[str] = set()  # systemd states sent (each at most once)

    def notify(self, state: str) -> None:
        if state not in self.notified:
            self.notified.add(state)
            sd_notify(state)

    # ----- start-up ------------------------------------------------------------------------
    def preflight(self) -> None:
        cfgmod.check_ports_free(self.cfg)
        try:
            self.locks.append(InstanceLock(self.cfg["store"]["path"] + ".lock", f"config key 'store.path': store {self.cfg['store']['path']}").acquire())
            self.locks.append(InstanceLock(os.path.join(self.cfg["dlq"]["path"], ".lock"), f"config key 'dlq.path': spool {self.cfg['dlq']['path']}").acquire())
        except LockBusy as exc:
            raise cfgmod.ConfigError(str(exc))
        except OSError as exc:
            raise cfgmod.ConfigError(f"cannot create store or spool directory: {exc}")
        self.check_store()

    def check_store(self) -> None:
        """PostgreSQL (store.url): the server answers and holds no newer schema (created here)."""
        url = self.cfg["store"]["url"]
        if not url:
            return
        from pairlane.pgstore import check_at_start, redact
        from pairlane.store import StoreError
        try:
            check_at_start(url)
        except StoreError as exc:
            raise cfgmod.ConfigError(f"config key 'store.url': {redact(url)}: {exc}")

    def start(self) -> None:
        from pairlane.actors.tree import build_tree
        from pairlane.supervision.root import RootSupervisor
        from pairlane.supervision.system import start_system

        run_dir = run_dir_for(self.cfg)
        os.makedirs(run_dir, exist_ok=True)
        self.run_dir = run_dir
        lanes.remove_all_socket_files(run_dir)   # a killed tree's, left behind (we hold the store's lock)
        self.asys = start_system(self.cfg["daemon"]["actor_port"], thespian_log=thespian_log_path(run_dir))
        self.spec = build_tree(self.cfg)
        self.settings = TreeSettings.from_config(self.cfg["supervision"], log_level=self.cfg["daemon"]["log_level"],
                                                 process_title=PROCESS_TITLE, event_sink="metrics",
                                                 **log_settings(self.cfg))
        self.root_cls = RootSupervisor
        self.root_intensity = RestartIntensity(self.settings.max_restarts, self.settings.window_s)
        self._start_root()

    def _start_root(self) -> None:
        self.root = self.asys.createActor(self.root_cls)
        self.root_pid = None
        self.asys.tell(self.root, StartTree(spec=self.spec, settings=self.settings, config=self.cfg,
                                            main_pid=os.getpid(), run_dir=self.run_dir))

    # ----- SIGHUP ----------------------------------------------------------------------------------
    def reload(self) -> None:
        """Reopen the log, re-read the config file and send what may change to the tree."""
        reopen()
        try:
            new = cfgmod.load(self.config_path)
        except cfgmod.ConfigError as exc:
            log("ERROR", "config_reload_failed", actor="main", error=str(exc), kept="running config")
            return
        changed = config_changes(self.cfg, new)
        applied = [k for k in changed if reloadable(k)]
        restart = [k for k in changed if not reloadable(k)]
        effective = copy.deepcopy(self.cfg)
        for key in applied:
            sect, name = key.split(".", 1)
            effective[sect][name] = new[sect][name]
        self.cfg = effective
        set_level(effective["daemon"]["log_level"])
        log("INFO", "config_reloaded", actor="main", applied=applied, needs_restart=restart)
        if self.asys is None or self.root is None:
            return
        self.settings = dataclasses.replace(self.settings, log_level=effective["daemon"]["log_level"])
        self.asys.tell(self.root, Reload(settings=self.settings, config=self.cfg))

    # ----- the wait loop -------------------------------------------------------------------------
    def loop(self) -> int:
        stop_sent_at = None
        shutdown_budget = sum(s.shutdown_s for s in self.spec.walk()) + 5.0
        while True:
            msg = self.asys.listen(0.2)
            if isinstance(msg, TreeStarted):
                self.pgid, self.root_pid = msg.pgid, msg.root_pid
                log("INFO", "daemon_ready", actor="main", pgid=msg.pgid, root_pid=msg.root_pid)
                if stop_sent_at is None:
                    self.notify("READY=1")
            elif isinstance(msg, StopDaemon):
                # the root tells us it began a stop we did not ask for (`admin stop`)
                if "STOPPING=1" not in self.notified:
                    log("INFO", "daemon_stopping", actor="main", reason=msg.reason)
                self.notify("STOPPING=1")
            elif isinstance(msg, TreeStopped):
                self.notify("STOPPING=1")  # (sent already unless the tree stopped on its own)
                if msg.exit_code:
                    log("ERROR", "daemon_exit_escalated", actor="main", reason=msg.reason,
                        exit_code=msg.exit_code)
                else:
                    log("INFO", "daemon_tree_stopped", actor="main", reason=msg.reason)
                return msg.exit_code
            if self.reload_requested and stop_sent_at is None and self.pgid is not None:
                # (before TreeStarted it waits: the root may not have taken its StartTree yet)
                self.reload_requested = False
                self.reload()
            if self.stop_requested and stop_sent_at is None:
                log("INFO", "daemon_stopping", actor="main", reason=self.stop_requested)
                self.notify("STOPPING=1")
                self.asys.tell(self.root, StopDaemon(self.stop_requested))
                stop_sent_at = time.monotonic()
            if stop_sent_at is not None and time.monotonic() - stop_sent_at > shutdown_budget:
                log("ERROR", "daemon_stop_timeout", actor="main", budget_s=shutdown_budget)
                return 1
            if self.root_pid is None:
                entry = procs.read_pidfile(self.run_dir, self.spec.name)
                if entry and procs.alive(*entry):
                    self.root_pid = entry[0]
            elif not procs.alive(self.root_pid):
                if stop_sent_at is not None:
                    return 0
                if not self._restart_root():
                    return 1

    def _restart_root(self) -> bool:
        if self.root_intensity.record():
            log("ERROR", "daemon_exit_escalated", actor="main",
                reason="root supervisor keeps dying", exit_code=1)
            return False
        log("ERROR", "root_died_restarting", actor="main", root_pid=self.root_pid)
        time.sleep(self.settings.backoff_min_s)
        self._start_root()
        return True

    # ----- shutdown -------------------------------------------------------------------------------
    def shutdown(self) -> None:
        if self.asys is not None:
            try:
                self.asys.shutdown()
            except Exception as exc:  # the system may already be half gone
                log("WARNING", "thespian_shutdown_error", actor="main", error=exc)
        pgid = self.pgid
        if pgid is None and self.root_pid:
            try:
                pgid = os.getpgid(self.root_pid)
            except OSError:
                pgid = None
        if pgid and pgid != os.getpgid(0) and pgid > 1:
            left = procs.group_pids(pgid)
            # after a clean Thespian shutdown the actor processes are on their way out: give them
            # a moment before calling any of them a leftover
            grace = time.monotonic() + LEFTOVER_GRACE_S
            while left and time.monotonic() < grace:
                time.sleep(0.02)
                left = procs.group_pids(pgid)
            if left:
                log("WARNING", "killing_leftover_processes", actor="main", pids=",".join(map(str, left)))
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                deadline = time.monotonic() + 3
                while procs.group_pids(pgid) and time.monotonic() < deadline:
                    time.sleep(0.02)
        if self.run_dir:
            lanes.remove_lane_dir(self.run_dir)   # the tree is gone: so is every lane
        for lock in self.locks:
            lock.release()


def _store_name(cfg: dict) -> str:
    if cfg["store"]["url"]:
        from pairlane.pgstore import redact
        return redact(cfg["store"]["url"])
    return cfg["store"]["path"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=program(), description="Run the pairlane daemon until SIGTERM, Ctrl-C or `run.py admin stop`.",
        epilog="exit codes: 0 graceful stop; 1 the root supervisor gave up (restart intensity) or the "
               "daemon failed; 2 configuration error (unknown key, wrong type, busy port, store or spool "
               "in use, non-loopback endpoint)\nexample: python run.py --config /etc/pairlane.toml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML file merged over config/default.toml")
    args = parser.parse_args(argv)
    try:
        cfg = cfgmod.load(args.config)
    except cfgmod.ConfigError as exc:
        print(f"pairlane: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    set_level(cfg["daemon"]["log_level"])
    logs = log_settings(cfg)
    try:
        configure_log(logs["log_format"], logs["log_file"], logs["log_fields"])
    except OSError as exc:
        print(f"pairlane: configuration error: config key 'daemon.log_file': cannot open "
              f"{cfg['daemon']['log_file']}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONFIG
    daemon = Daemon(cfg, args.config)
    try:
        daemon.preflight()
    except cfgmod.ConfigError as exc:
        print(f"pairlane: configuration error: {exc}", file=sys.stderr)
        daemon.shutdown()
        return EXIT_CONFIG

    def on_signal(signum, frame):
        daemon.stop_requested = signal.Signals(signum).name

    def on_hangup(signum, frame):
        daemon.reload_requested = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)  # never stops the daemon: reopen the log, reload settings
    log("INFO", "daemon_starting", actor="main", config=args.config or "default",
        actor_port=cfg["daemon"]["actor_port"], gateway=cfg["gateway"]["endpoint"],
        admin=cfg["admin"]["endpoint"], store=_store_name(cfg))
    code = 1
    try:
        daemon.start()
        code = daemon.loop()
    except Exception as exc:
        log("ERROR", "daemon_failed", actor="main", error=f"{type(exc).__name__}: {exc}")
        code = 1
    finally:
        daemon.shutdown()
    log("INFO", "daemon_exit", actor="main", exit_code=code)
    return code
