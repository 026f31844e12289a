"""Single-instance locks: one daemon per store and per spool.

Owns: `flock` on `<store.path>.lock` and `<dlq.path>/.lock`, held by the
daemon's main process for its whole life (the kernel releases them when it
dies, even by SIGKILL). Never touches the database itself.
"""
from __future__ import annotations

import fcntl
import os


class LockBusy(Exception):
    pass


class InstanceLock:
    def __init__(self, path: str, what: str):
        self.path = path
        self.what = what
        self.fd: int | None = None

    def acquire(self) -> "InstanceLock":
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            finally:
                os.close(fd)
            raise LockBusy(f"{self.what} is in use by another pairlane daemon (pid {holder or '?'}; "
                           f"lock file {self.path})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.set_inheritable(fd, False)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
