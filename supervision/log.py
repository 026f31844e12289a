"""Structured logging: one line per event, through stdlib logging, as logfmt or JSON.

Owns: the log line formats and where lines go. A line is

    ts=2026-11-30T02:15:34.123Z level=INFO daemon=host actor=writer pid=7415 event=child_started k=v ...

with the static fields `configure` was given (e.g. the daemon's name) after `level`, unique
keys (an event field named like a fixed key is written as `<key>_`), and values written
bare when they are a plain word, else JSON-encoded (strings quoted and escaped; maps and lists
as JSON text; true/false/null). In "json" format each line is one JSON object with the same
keys, maps and lists as JSON values. Output is stderr, or a file opened for appending and
reopened by `reopen()` (after logrotate renamed it).

Never buffers (a crashing actor's last line must reach the output: one write and flush per
line), never raises, and never reads any application's configuration: the caller passes the
format, the file and the static fields.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
import re
import sys
import threading

LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40}
FIXED_KEYS = ("ts", "level", "actor", "pid", "event")
FORMATS = ("logfmt", "json")
_threshold = LEVELS["INFO"]
_BARE = re.compile(r'[^\s="\\]+')


def set_level(level: str) -> None:
    """This process's threshold. Forked actor processes inherit it; each worker also sets it from
    TreeSettings.log_level when it starts and on Reload."""
    global _threshold
    _threshold = LEVELS.get(level.upper(), 20)


def _jsonable(value: object) -> object:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}" if str(value) else type(value).__name__
    return str(value)


def logfmt_value(value: object) -> str:
    """A value as logfmt: a plain word bare, anything else JSON-encoded (and then, unless it is
    a number, true/false or null, quoted as a JSON string)."""
    v = _jsonable(value)
    if isinstance(v, str):
        return v if _BARE.fullmatch(v) else json.dumps(v, ensure_ascii=False)
    text = json.dumps(v, ensure_ascii=False, separators=(",", ":"))
    if isinstance(v, (dict, list)):
        return json.dumps(text, ensure_ascii=False)
    return text


def _iso(ts: float) -> str:
    dt = datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


class _EventFormatter(logging.Formatter):
    """Base of the two formats: the ordered, de-duplicated (key, value) pairs of a record."""

    def __init__(self, static: dict | None = None) -> None:
        super().__init__()
        self.static = dict(static or {})

    def pairs(self, record: logging.LogRecord) -> list[tuple[str, object]]:
        out: list[tuple[str, object]] = [("ts", _iso(record.created)), ("level", record.levelname)]
        out.extend(self.static.items())
        out.extend([("actor", record.actor), ("pid", record.process), ("event", record.event)])
        seen = {k for k, _ in out}
        for key, value in record.fields:
            while key in seen:
                key += "_"
            seen.add(key)
            out.append((key, value))
        return out


class LogfmtFormatter(_EventFormatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={logfmt_value(v)}" for k, v in self.pairs(record))


class JsonFormatter(_EventFormatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({k: _jsonable(v) for k, v in self.pairs(record)}, ensure_ascii=False,
                          separators=(",", ":"))


class _Output(logging.Handler):
    """stderr (looked up at each line, so a test's capture sees it) or an appended file."""

    def __init__(self, path: str = "") -> None:
        super().__init__()
        self.path = path
        self.stream = None
        if path:
            self.stream = self._open()

    def _open(self):
        d = os.path.dirname(self.path)
        if d:
            os.makedirs(d, exist_ok=True)
        return open(self.path, "a", encoding="utf-8")

    def reopen(self) -> None:
        if not self.path:
            return
        old = self.stream
        try:
            self.stream = self._open()
        except OSError:
            return  # keep writing to the old file rather than nowhere
        if old is not None:
            try:
                old.close()
            except OSError:
                pass

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = self.stream if self.stream is not None else sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            pass

    def handleError(self, record: logging.LogRecord) -> None:  # never raise, never print
        pass


_lock = threading.Lock()
_handler = _Output()
_handler.setFormatter(LogfmtFormatter())
# records are handed to our handler directly (never through the logger tree), so that a
# library's logging setup in an actor process (e.g. Thespian's dictConfig) cannot disable,
# duplicate or redirect them
_logger = logging.getLogger("supervision.events")
_logger.propagate = False


def configure(fmt: str = "logfmt", path: str = "", static: dict | None = None) -> None:
    """Where and how this process writes lines: format "logfmt" or "json", `path` ("" =
    stderr; else appended, its directory created), `static` fields put on every line (after
    `level`). OSError if the file cannot be opened; ValueError for an unknown format."""
    global _handler
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    handler = _Output(path)
    handler.setFormatter((JsonFormatter if fmt == "json" else LogfmtFormatter)(static))
    with _lock:
        old, _handler = _handler, handler
    if old.stream is not None and old.path != path:
        try:
            old.stream.close()
        except OSError:
            pass


def reopen() -> None:
    """Reopen the log file (after logrotate renamed it); nothing for stderr."""
    _handler.reopen()


def log(level: str, event: str, actor: str = "-", **fields: object) -> None:
    """Write one event line: `ts level [static] actor pid event`, then the fields in order."""
    lvl = LEVELS.get(level, 20)
    if lvl < _threshold:
        return
    try:
        record = _logger.makeRecord(_logger.name, lvl, "", 0, event, (), None)
        record.actor, record.event, record.fields = actor, event, tuple(fields.items())
        _handler.handle(record)
    except Exception:
        pass
