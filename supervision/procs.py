"""Process helpers for supervision: pidfiles, liveness, kill-and-wait.

Owns: the rule that no two instances of a named actor are ever alive. A child
writes `<run_dir>/<name>.pid` (pid and kernel start time) when it starts; a
supervisor about to start that name first kills whatever process the pidfile
names and waits until it is gone. Never signals a process it cannot identify
by pid *and* start time.
"""
from __future__ import annotations

import os
import signal
import time


def proc_start_time(pid: int) -> int | None:
    """Kernel start time of pid (clock ticks since boot), None if it does not exist or is a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    rest = data[data.rfind(")") + 2:].split()
    if rest[0] in ("Z", "X"):
        return None
    return int(rest[19])


def alive(pid: int, start_time: int | None = None) -> bool:
    st = proc_start_time(pid)
    if st is None:
        return False
    return start_time is None or st == start_time


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group pgid."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) == pgid and alive(int(entry)):
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def write_pidfile(run_dir: str, name: str) -> None:
    os.makedirs(run_dir, exist_ok=True)
    pid = os.getpid()
    tmp = os.path.join(run_dir, f".{name}.pid.{pid}")
    with open(tmp, "w") as fh:
        fh.write(f"{pid} {proc_start_time(pid)}\n")
    os.replace(tmp, os.path.join(run_dir, f"{name}.pid"))


def touch_pidfile(run_dir: str, name: str) -> None:
    """The child's loop ran just now: its pidfile's mtime says when (a side channel that needs no
    message, see `loop_age`)."""
    try:
        os.utime(os.path.join(run_dir, f"{name}.pid"))
    except OSError:
        pass


def loop_age(run_dir: str, name: str, pid: int) -> float | None:
    """Seconds since the child `pid` last touched its pidfile; None when the file is not that pid's."""
    path = os.path.join(run_dir, f"{name}.pid")
    try:
        mtime = os.stat(path).st_mtime
        entry = read_pidfile(run_dir, name)
    except OSError:
        return None
    if entry is None or entry[0] != pid:
        return None
    return max(0.0, time.time() - mtime)


def read_pidfile(run_dir: str, name: str) -> tuple[int, int] | None:
    try:
        with open(os.path.join(run_dir, f"{name}.pid")) as fh:
            pid, st = fh.read().split()
        return int(pid), int(st)
    except (OSError, ValueError):
        return None


def kill_and_wait(pid: int, start_time: int | None, timeout_s: float = 3.0) -> bool:
    """SIGKILL pid (if it is still the same process) and wait until it is gone. True when gone."""
    if not alive(pid, start_time):
        return True
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        # Never waitpid() here: a zombie already counts as gone, and reaping Thespian's own child
        # would steal its exit status (multiprocessing then reports it alive forever and no
        # ChildActorExited ever reaches the supervisor).
        if not alive(pid, start_time):
            return True
        time.sleep(0.005)
    return not alive(pid, start_time)


def ensure_gone(run_dir: str, name: str, timeout_s: float = 3.0) -> bool:
    """Kill the process the pidfile of `name` names, if it still runs. True when none is left."""
    entry = read_pidfile(run_dir, name)
    if entry is None:
        return True
    pid, st = entry
    if pid == os.getpid():
        return True
    return kill_and_wait(pid, st, timeout_s)


def die_with_parent(expected_ppid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux PR_SET_PDEATHSIG).

    An actor learns that its parent is gone at its next heartbeat tick, but ticks start
    with Init: a child created just before its supervisor died never gets Init and would
    linger forever. Elsewhere this is a no-op and the tick's ppid check remains."""
    try:
        import ctypes
        if ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # 1: PR_SET_PDEATHSIG
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != expected_ppid:  # the parent died before the prctl
        os._exit(70)


def restore_fatal_signals() -> None:
    """Thespian installs log-only handlers for fatal signals (a crashing native call then spins at
    100% CPU); restore the defaults so such a process dies and is restarted."""
    for name in ("SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGABRT"):
        sig = getattr(signal, name, None)
        if sig is not None:
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass


def trim_heap() -> bool:
    """Hand the C heap's free memory back to the kernel (glibc malloc_trim): memory a burst
    used (big frames, an evaluation) and freed since is otherwise kept by the allocator, and
    the process's RSS would report what it once needed, not what it holds. False where there
    is no malloc_trim (not glibc)."""
    try:
        import ctypes
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True
