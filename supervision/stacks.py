"""Where a stalled actor process was: Python stacks dumped by the C-level faulthandler.

Owns: each child's `<run_dir>/<name>.stack` file and the two ways a stack gets there,
(1) the child's own stall detector, told at every heartbeat tick that the loop runs: when it
does not tick again within `stall_s`, a watcher thread writes every thread's stack (through
faulthandler, so the frames of a main thread blocked in a system call show); (2) SIGUSR2 from
a supervisor about to kill the child: faulthandler's C signal handler writes the stacks at
that moment, whatever the main thread is doing. The child logs a
dump it finds at its next tick (`loop_stalled`); the supervisor puts the one it asked for in
its `watchdog_kill` line. Never signals a process the pidfile does not name by pid and start time.
"""
from __future__ import annotations

import faulthandler
import os
import re
import signal
import threading
import time

from . import procs

ASK_SIGNAL = signal.SIGUSR2   # Thespian uses SIGUSR1 for its own status dump; SIGUSR2 is free
MAX_FRAMES = 12               # per thread in the compact form (innermost first)
_FRAME = re.compile(r'File "([^"]+)", line (\d+) in (\S+)')


def path(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, f"{name}.stack")


class StallDetector:
    """In the child: the dump file, the SIGUSR2 handler and a watcher thread that dumps every
    thread's stack once when the loop has not called tick() for stall_s.

    A Python thread, not faulthandler.dump_traceback_later: Thespian forks each child from its
    parent actor's process, and faulthandler's timer state survives the fork without its thread,
    so re-arming it in the child waits forever for a thread that is not there. Blocking system
    calls and sleeps release the GIL, so the watcher runs while the loop is stuck in one."""

    def __init__(self, run_dir: str, name: str, stall_s: float) -> None:
        os.makedirs(run_dir, exist_ok=True)
        self.fd = os.open(path(run_dir, name), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        # A forked child inherits its parent's registration as "enabled" while Thespian has
        # since put a Python handler on every signal: unregister first, or register would
        # skip installing its C handler.
        faulthandler.unregister(ASK_SIGNAL)
        faulthandler.register(ASK_SIGNAL, file=self.fd, all_threads=True, chain=False)
        self.stall_s = stall_s
        self.last = time.monotonic()
        self.dumped = False
        threading.Thread(target=self._watch, name="stall-watch", daemon=True).start()

    def tick(self) -> None:
        """The loop ran just now."""
        self.last = time.monotonic()
        self.dumped = False

    def _watch(self) -> None:
        while True:
            time.sleep(self.stall_s / 4)
            if not self.dumped and time.monotonic() - self.last > self.stall_s:
                self.dumped = True   # once per stall
                faulthandler.dump_traceback(file=self.fd, all_threads=True)

    def take(self) -> str:
        """The dump written since the last take (empty when none), and the file emptied."""
        if os.fstat(self.fd).st_size == 0:
            return ""
        os.lseek(self.fd, 0, os.SEEK_SET)
        chunks = []
        while True:
            data = os.read(self.fd, 65536)
            if not data:
                break
            chunks.append(data)
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        return b"".join(chunks).decode("utf-8", "replace")


def ask(run_dir: str, name: str, pid: int, wait_s: float = 0.3) -> str:
    """In the supervisor: make child `pid` dump its stacks now and return them (compact), or
    "" when it did not within wait_s (no handler yet, or not a Python process any more)."""
    entry = procs.read_pidfile(run_dir, name)
    if entry is None or entry[0] != pid or not procs.alive(*entry):
        return ""   # not the process that wrote the pidfile: signal nothing
    p = path(run_dir, name)
    try:
        before = os.path.getsize(p)
        os.kill(pid, ASK_SIGNAL)
    except OSError:
        return ""
    deadline = time.monotonic() + wait_s
    text, seen = "", None
    while time.monotonic() < deadline:
        time.sleep(0.02)
        try:
            with open(p, encoding="utf-8", errors="replace") as fh:
                fh.seek(before)
                text = fh.read()
        except OSError:
            return ""
        if text and text == seen:   # written and no longer growing
            break
        seen = text
    return compact(text)


def compact(text: str) -> str:
    """One line per thread, innermost frame first: `file.py:LINE func < ...`, threads joined
    by ` | `. Log-friendly; the file keeps the full dump until the next take."""
    threads: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith(("Thread 0x", "Current thread 0x")):
            threads.append([])
            continue
        m = _FRAME.search(line)
        if m and threads:
            if len(threads[-1]) < MAX_FRAMES:
                threads[-1].append(f"{os.path.basename(m.group(1))}:{m.group(2)} {m.group(3)}")
        elif m:
            threads.append([f"{os.path.basename(m.group(1))}:{m.group(2)} {m.group(3)}"])
    return " | ".join(" < ".join(frames) for frames in threads
                      if frames and not any(f.startswith("stacks.py:") for f in frames))
