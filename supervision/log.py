"""Structured logging: one line per event, key=value, to stderr.

Owns: the log line format. Never buffers (a crashing actor's last line must
reach the terminal) and never raises.
"""
from __future__ import annotations

import os
import sys
import time

LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40}
_threshold = LEVELS["INFO"]


def set_level(level: str) -> None:
    """This process's threshold. Forked actor processes inherit it; each worker also sets it from
    TreeSettings.log_level when it starts."""
    global _threshold
    _threshold = LEVELS.get(level.upper(), 20)


def reopen() -> None:
    """Reopen the log output (after logrotate renamed the file). Stderr needs nothing."""


def _fmt(value: object) -> str:
    s = str(value)
    if s == "" or any(c in s for c in ' ="\n\t'):
        s = '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return s


def log(level: str, event: str, actor: str = "-", **fields: object) -> None:
    """Write `ts=... level=... actor=... pid=... event=... k=v ...` to stderr."""
    if LEVELS.get(level, 20) < _threshold:
        return
    parts = [f"ts={time.time():.3f}", f"level={level}", f"actor={_fmt(actor)}",
             f"pid={os.getpid()}", f"event={_fmt(event)}"]
    parts.extend(f"{k}={_fmt(v)}" for k, v in fields.items())
    try:
        sys.stderr.write(" ".join(parts) + "\n")
        sys.stderr.flush()
    except Exception:
        pass
