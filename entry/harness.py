"""A real pairlane daemon on free ports in a temp dir, for tests, `bench` and `chaos`.

Owns: writing a config, starting `python run.py --config`, waiting until the
tree is ready, admin calls, finding every process of the daemon (main + the
actor system's process group), and tearing it all down, even on failure,
checking nothing is left behind; plus what the runs that start a daemon of their
own (soak, fuzz) share about it: `--keep` and the `health:` line of their report.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pairlane.supervision.procs import alive, group_pids


REPO = Path(__file__).resolve().parent.parent


_handed_out: set[int] = set()
_pick = random.Random(os.urandom(16))  # independent of any seed a test sets


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A free loopback port, never one this process handed out before (two endpoints of one
    config must not collide), and outside the kernel's ephemeral range: a port from that range
    can be taken by any bind(0) or connect() between now and the daemon's own bind, and a
    daemon makes plenty (Thespian's actors bind one port each and connect for every message)."""
    lo, hi = _ephemeral_range()
    candidates = range(20000, lo) if lo > 21000 else range(hi + 1, 65536)
    for _ in range(10_000):
        port = _pick.choice(candidates)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {candidates}")


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


def write_toml(path: Path, cfg: dict) -> None:
    lines = []
    for sect, kv in cfg.items():
        lines.append(f"[{sect}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in kv.items())
        lines.append("")
    path.write_text("\n".join(lines))


def base_config(tmp: Path) -> dict:
    return {
        "daemon": {"actor_port": free_port()},
        "gateway": {"endpoint": f"tcp://127.0.0.1:{free_port()}",
                    "legacy_endpoint": f"tcp://127.0.0.1:{free_port()}"},
        "admin": {"endpoint": f"tcp://127.0.0.1:{free_port()}", "allow_fault_injection": True},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        "alerts": {"endpoint": f"tcp://127.0.0.1:{free_port()}"},
        "store": {"path": str(tmp / "data" / "pairlane.db")},
        "dlq": {"path": str(tmp / "data" / "dlq")},
    }


def merge(a: dict, b: dict) -> dict:
    out = {k: dict(v) for k, v in a.items()}
    for sect, kv in (b or {}).items():
        out.setdefault(sect, {}).update(kv)
    return out


def proc_pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


# Thespian's warnings that matter to a run's verdict: a message dropped, a loop held draining its
# own sends, a send that expired undelivered. Each is a pattern over thespian.log, whose lines are
# "<date> <time> p<pid> Warn <message>". A send that expired has two lines of Thespian's own
# (thespian/system/transport): asyncTransportBase's "TX intent <intent> timed out" for an intent
# still queued, TCPTransport's "Transmit attempt from <a> to <b> timed out, returning PoisonPacket"
# for one under way. Only those count: a bare "timed out" would also count any warning that
# merely quotes a message or an error mentioning a timeout.
THESPIAN_WARNINGS: dict[str, re.Pattern[str]] = {
    "tx_dropped": re.compile(re.escape("Dropping TX: overloaded")),
    "tx_only_mode": re.compile(re.escape("Entering tx-only mode")),
    "tx_timed_out": re.compile(r" Warn +(?:TX intent \*+ TransportIntent\(.*\) timed out"
                               r"|Transmit attempt from .+ to .+ timed out, returning PoisonPacket)$", re.M),
}


def count_thespian_warnings(text: str) -> dict[str, int]:
    """How often each of THESPIAN_WARNINGS occurs in the text of a thespian.log."""
    return {name: len(pattern.findall(text)) for name, pattern in THESPIAN_WARNINGS.items()}


STALL_EVENTS = ("loop_stalled", "heartbeat_late", "watchdog_kill")


def render_health(health: dict[str, int]) -> str:
    """The `health:` line of a soak or fuzz report: Daemon.health_events' counts in their order."""
    return "health: " + ", ".join(f"{k} {v}" for k, v in health.items())


def add_keep_argument(ap: argparse.ArgumentParser) -> None:
    """`--keep` of a run that starts a daemon of its own (soak, fuzz): a passing run removes the
    daemon's directory unless this is given."""
    ap.add_argument("--keep", action="store_true",
                    help="keep the daemon's directory (its log, database and spool) even when the run passes")


class Daemon:
    def __init__(self, tmp: Path, overrides: dict | None = None, name: str = "d"):
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.cfg = merge(base_config(self.tmp), overrides or {})
        self.config_path = self.tmp / f"{name}.toml"
        write_toml(self.config_path, self.cfg)
        self.log_path = self.tmp / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.pgid: int | None = None
        self.known_pids: set[int] = set()

    @classmethod
    def attach(cls, cfg: dict, config_path: str) -> "Daemon":
        """A handle on a daemon someone else started (admin and checks only; no start/stop)."""
        d = cls.__new__(cls)
        d.tmp = Path(config_path).resolve().parent
        d.cfg = cfg
        d.config_path = Path(config_path)
        d.log_path = d.tmp / "attached.log"
        d.proc = None
        d.pgid = None
        d.known_pids = set()
        return d

    # ----- lifecycle --------------------------------------------------------------------------
    def start(self, wait: bool = True, timeout: float = 30.0, env: dict | None = None) -> "Daemon":
        """Start the daemon; `env` adds (or, with None values, removes) environment variables."""
        self._log = open(self.log_path, "ab")
        environ = dict(os.environ)
        environ.pop("NOTIFY_SOCKET", None)  # a test daemon never reports to a systemd we run under
        for key, value in (env or {}).items():
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value
        self.proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), "--config", str(self.config_path)],
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=str(self.tmp), env=environ)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            last = self.admin("status", timeout=2.0)
            if last and last.get("ok") and last.get("ready"):
                self._learn_pids(last)
                return last
            time.sleep(0.1)
        raise AssertionError(f"daemon not ready in {timeout}s; last status {last}\n{self.log()}")

    def _learn_pids(self, status: dict) -> None:
        for a in status.get("actors", []):
            if a.get("pid"):
                self.known_pids.add(a["pid"])
                if self.pgid is None:
                    self.pgid = proc_pgid(a["pid"])

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except OSError:
            return ""

    def health_events(self) -> dict[str, int]:
        """What a run's report shows beside its verdict: stalls and late heartbeats from the daemon's
        log, and Thespian's own warnings."""
        counts = dict.fromkeys(STALL_EVENTS, 0)
        try:
            with open(self.log_path, errors="replace") as fh:
                for line in fh:
                    for name in STALL_EVENTS:
                        if f"event={name} " in line:
                            counts[name] += 1
        except OSError:
            pass
        return counts | self.thespian_warnings()

    def thespian_warnings(self) -> dict[str, int]:
        """Counts of Thespian's own warnings that mean a message was lost or a loop held
        (from the daemon's thespian.log, see supervision.system.start_system)."""
        from pairlane.entry.daemon import run_dir_for, thespian_log_path
        run_dir = str(self.tmp / run_dir_for(self.cfg))   # the daemon runs in self.tmp
        counts = dict.fromkeys(THESPIAN_WARNINGS, 0)
        for path in (thespian_log_path(run_dir) + ".old", thespian_log_path(run_dir)):
            try:
                text = Path(path).read_text(errors="replace")
            except OSError:
                continue
            for name, n in count_thespian_warnings(text).items():
                counts[name] += n
        return counts

    def all_pids(self) -> list[int]:
        pids = set()
        if self.proc is not None and self.proc.poll() is None:
            pids.add(self.proc.pid)
        if self.pgid:
            pids.update(group_pids(self.pgid))
        pids.update(p for p in self.known_pids if alive(p))
        return sorted(pids)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def close(self) -> None:
        """For scripts: stop the daemon if it still runs, kill leftovers and say so on stderr."""
        if self.proc is not None and self.proc.poll() is None:
            self.stop(30)
        left = self.cleanup()
        if left:
            print(f"warning: killed leftover processes {left}", file=sys.stderr)

    def close_and_remove(self, root: Path | str | None = None, keep: bool = False) -> None:
        """close(), then delete `root` (default: this daemon's directory) unless `keep` (e.g. after
        a failure, to look at the logs; the path is then printed on stderr)."""
        self.close()
        root = Path(root) if root is not None else self.tmp
        if keep:
            print(f"kept {root} (daemon log: {self.log_path})", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)

    def cleanup(self) -> list[int]:
        """Kill whatever is left; returns the pids that were still alive (should be none)."""
        leftover = []
        if self.proc is not None and self.proc.poll() is None:
            leftover.append(self.proc.pid)
            self.proc.kill()
            self.proc.wait(5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.all_pids():
            time.sleep(0.1)
        for pid in self.all_pids():
            leftover.append(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if getattr(self, "_log", None):
            self._log.close()
        if self.proc is not None:   # ours (not attached), and gone: a daemon killed outright leaves its
            # lanes' directory behind (the next daemon on its store would reuse it)
            from pairlane.entry.daemon import run_dir_for
            from pairlane.supervision.lanes import remove_lane_dir
            remove_lane_dir(str(self.tmp / run_dir_for(self.cfg)))
        return leftover

    # ----- admin --------------------------------------------------------------------------------
    @property
    def admin_endpoint(self) -> str:
        return self.cfg["admin"]["endpoint"]

    @property
    def gateway_endpoint(self) -> str:
        return self.cfg["gateway"]["endpoint"]

    @property
    def db_path(self) -> str:
        return self.cfg["store"]["path"]

    def admin(self, cmd: str, args: dict | None = None, timeout: float = 10.0, token: str = "") -> dict | None:
        from .admin_cli import request
        return request(self.admin_endpoint, cmd, args, token or self.cfg["admin"].get("token", ""), timeout)

    def status(self) -> dict:
        st = self.admin("status")
        assert st and st.get("ok"), st
        self._learn_pids(st)
        return st

    def actor(self, name: str) -> dict:
        for a in self.status()["actors"]:
            if a["name"] == name:
                return a
        raise KeyError(name)

    def wait_for(self, pred, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = pred()
            except (AssertionError, KeyError):
                last = None
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.log()[-4000:]}")

    def wait_running(self, name: str, restarts: int | None = None, timeout: float = 10.0) -> dict:
        def ok():
            a = self.actor(name)
            if a["state"] == "RUNNING" and (restarts is None or a["restarts"] >= restarts):
                return a
            return None
        return self.wait_for(ok, timeout, what=f"{name} RUNNING with restarts>={restarts}")

    def run_cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "run.py"), *args], capture_output=True, text=True,
                              timeout=timeout, cwd=str(self.tmp))

    def admin_cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return self.run_cli("admin", "--config", str(self.config_path), *args, timeout=timeout)

