"""Dead-letter spool: durable, crash-safe storage of items the writer could not commit.

Owns: one directory (``dlq.path``) holding one file per item, its on-disk
format, the in-memory index of item headers, recovery at open (leftover
``*.tmp`` files removed, corrupt or torn files moved to ``quarantine/``), the
size cap (``dlq.max_bytes``) and the retry backoff formula.

Never does: decode or interpret payloads (opaque raw msgpack bytes), talk to
SQLite, decide when to retry, park or purge (the dlq actor's policy), take the
single-instance lock (the daemon's job), or use Thespian. Not thread-safe: one
owner (the dlq keeper actor) uses one ``Spool`` at a time.

File format of ``<id>.dlq`` (all integers big-endian)::

    b"PLDQ1\\n"                 magic, 6 bytes
    header length               4 bytes, unsigned
    header                      msgpack map: every SpoolItem field except
                                ``payload`` and ``bytes``, plus ``v`` (1) and
                                ``payload_len``
    payload                     ``payload_len`` opaque bytes
    CRC32                       4 bytes, of everything before it

A file is written to ``.<id>.tmp`` in the same directory, flushed and
fsynced, renamed over its final name with ``os.replace`` and the directory is
fsynced; only then does ``put``/``record_failure``/``set_parked`` return. So a
reader sees either the old file or the new one, never a mix, and a returned
``put`` survives a crash (``stored`` is a promise).
"""

from __future__ import annotations

import builtins
import dataclasses
import errno
import itertools
import math
import os
import random
import re
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack

__all__ = ["MAGIC", "SpoolFull", "SpoolItem", "Spool", "backoff"]

MAGIC = b"PLDQ1\n"
SUFFIX = ".dlq"
TMP_SUFFIX = ".tmp"
QUARANTINE_DIR = "quarantine"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 1 << 20          # a header beyond this is treated as corrupt
MAX_ERROR_CHARS = 4096              # longer error texts are cut (keeps headers small)
_READ_BLOCK = 1 << 20

_ID_RE = re.compile(r"^[0-9]{20}-[0-9]{6,}-[0-9]+$")
_FULL_ERRNOS = frozenset(e for e in (getattr(errno, "ENOSPC", None), getattr(errno, "EDQUOT", None)) if e)

# header key -> accepted types (None allowed where listed)
_HEADER_TYPES: dict[str, tuple[type, ...]] = {
    "v": (int,),
    "id": (str,),
    "request_id": (str, type(None)),
    "seq": (int, type(None)),
    "stage": (str,),
    "reason": (str,),
    "error": (str,),
    "attempts": (int,),
    "first_failed_at": (float, int),
    "last_failed_at": (float, int),
    "next_retry_at": (float, int),
    "parked": (bool,),
    "meta": (dict,),
    "payload_len": (int,),
}


class SpoolFull(OSError):
    """The spool cannot take an item: its ``max_bytes`` cap is reached, or the disk
    is full (ENOSPC) or over quota (EDQUOT). Nothing of the item remains on disk.

    Attributes: ``path`` (spool directory), ``max_bytes`` (cap, 0 = none),
    ``used_bytes`` (bytes held when refused), ``needed_bytes`` (size of the item).
    ``errno`` is ENOSPC for the cap, else the OS error's.
    """

    def __init__(self, message: str, *, path: str, max_bytes: int, used_bytes: int,
                 needed_bytes: int, err: int = errno.ENOSPC) -> None:
        super().__init__(err, message)
        self.path = path
        self.max_bytes = max_bytes
        self.used_bytes = used_bytes
        self.needed_bytes = needed_bytes

    def __str__(self) -> str:  # plain message, no "[Errno 28]" prefix noise
        return str(self.strerror)

    def __reduce__(self):  # picklable across actor boundaries
        return (_rebuild_spool_full, (self.strerror, self.path, self.max_bytes,
                                      self.used_bytes, self.needed_bytes, self.errno))


def _rebuild_spool_full(message, path, max_bytes, used, needed, err) -> SpoolFull:
    return SpoolFull(message, path=path, max_bytes=max_bytes, used_bytes=used,
                     needed_bytes=needed, err=err)


@dataclass
class SpoolItem:
    """One dead-lettered item.

    ``payload`` is only loaded by :meth:`Spool.get`; every other method returns
    header-only copies whose ``payload`` is ``b""`` (use ``get`` for the bytes).
    """

    id: str                      # sortable, unique, filename-safe: "<time_ns:020d>-<counter:06d>-<pid>"
    request_id: str | None       # request (or live_trades batch_id) it belongs to
    seq: int | None              # chunk seq, None when not a chunk
    stage: str                   # what it is: "chunk", "live_trades", "result_meta", ...
    reason: str                  # short failure category: "locked", "full", "io", "sqlite", ...
    error: str                   # last exception text (cut to MAX_ERROR_CHARS)
    attempts: int                # failed attempts so far (the one that spooled it counts)
    first_failed_at: float       # Unix seconds
    last_failed_at: float        # Unix seconds
    next_retry_at: float         # Unix seconds; due when not parked and <= now
    parked: bool                 # no automatic retries; only an operator replay or purge
    payload: builtins.bytes = b""   # opaque raw msgpack; b"" in header-only copies
    meta: dict = field(default_factory=dict)   # small msgpack-able extras
    bytes: int = 0               # file size on disk


class _Rng(Protocol):
    def random(self) -> float: ...


def backoff(attempts: int, min_s: float, max_s: float, rng: _Rng = random) -> float:
    """Retry delay after ``attempts`` failures: exponential growth with full jitter.

    The ceiling doubles per attempt from ``min_s`` (``min_s * 2**attempts``,
    capped at ``max_s``) and the delay is drawn uniformly from
    ``[min_s, ceiling]``; the result is always within ``[min_s, max_s]``
    (``max_s`` below ``min_s`` is raised to ``min_s``; negative bounds count as 0).
    """
    lo = max(0.0, float(min_s))
    hi = max(lo, float(max_s))
    n = max(0, min(int(attempts), 64))          # 2**64 * anything sane already exceeds max_s
    base = lo if lo > 0 else 1.0
    ceiling = min(hi, base * float(2 ** n))
    delay = lo + rng.random() * (ceiling - lo)
    if not math.isfinite(delay):
        return hi
    return min(hi, max(lo, delay))


class _Corrupt(Exception):
    """A spool file failed a format check (message = the reason)."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (module-level so tests can inject ENOSPC)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _encode(header: dict[str, Any], payload: bytes) -> bytes:
    head = msgpack.packb(header, use_bin_type=True)
    body = b"".join((MAGIC, len(head).to_bytes(4, "big"), head, payload))
    return body + zlib.crc32(body).to_bytes(4, "big")


def _check_header(header: Any, expect_id: str) -> dict[str, Any]:
    if not isinstance(header, dict):
        raise _Corrupt("header is not a map")
    for key, types in _HEADER_TYPES.items():
        if key not in header:
            raise _Corrupt(f"header lacks {key}")
        value = header[key]
        if isinstance(value, bool) and bool not in types:
            raise _Corrupt(f"header field {key} has type bool")
        if not isinstance(value, types):
            raise _Corrupt(f"header field {key} has type {type(value).__name__}")
    if header["v"] != FORMAT_VERSION:
        raise _Corrupt(f"unsupported format version {header['v']}")
    if header["id"] != expect_id:
        raise _Corrupt(f"header id {header['id']!r} differs from file name")
    if header["payload_len"] < 0:
        raise _Corrupt("negative payload_len")
    return header


def _unpack_header(raw: bytes, expect_id: str) -> dict[str, Any]:
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several types on garbage
        raise _Corrupt(f"header is not msgpack ({type(exc).__name__})") from None
    return _check_header(header, expect_id)


def _read_file(path: str, expect_id: str, with_payload: bool) -> tuple[dict[str, Any], bytes, int]:
    """Read and fully verify one spool file; return (header, payload or b"", size).

    Raises _Corrupt on any format failure, OSError on I/O errors.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(len(MAGIC) + 4)
        if len(prefix) < len(MAGIC) + 4:
            raise _Corrupt("truncated before header length")
        if prefix[: len(MAGIC)] != MAGIC:
            raise _Corrupt("bad magic")
        hlen = int.from_bytes(prefix[len(MAGIC):], "big")
        if hlen > MAX_HEADER_BYTES or len(prefix) + hlen + 4 > size:
            raise _Corrupt(f"header length {hlen} does not fit file of {size} bytes")
        raw_header = f.read(hlen)
        if len(raw_header) != hlen:
            raise _Corrupt("truncated header")
        crc = zlib.crc32(prefix)
        crc = zlib.crc32(raw_header, crc)
        # Verify the CRC before trusting the header's contents.
        rest_len = size - len(prefix) - hlen - 4
        chunks: list[bytes] = []
        remaining = rest_len
        while remaining > 0:
            block = f.read(min(_READ_BLOCK, remaining))
            if not block:
                raise _Corrupt("truncated payload")
            crc = zlib.crc32(block, crc)
            if with_payload:
                chunks.append(block)
            remaining -= len(block)
        trailer = f.read(4)
        if len(trailer) != 4 or f.read(1):
            raise _Corrupt("bad file length")
        if int.from_bytes(trailer, "big") != crc:
            raise _Corrupt("CRC mismatch")
    header = _unpack_header(raw_header, expect_id)
    if header["payload_len"] != rest_len:
        raise _Corrupt(f"payload_len {header['payload_len']} but {rest_len} bytes present")
    return header, b"".join(chunks), size


def _item_from_header(header: dict[str, Any], size: int, payload: bytes = b"") -> SpoolItem:
    return SpoolItem(
        id=header["id"],
        request_id=header["request_id"],
        seq=header["seq"],
        stage=header["stage"],
        reason=header["reason"],
        error=header["error"],
        attempts=header["attempts"],
        first_failed_at=float(header["first_failed_at"]),
        last_failed_at=float(header["last_failed_at"]),
        next_retry_at=float(header["next_retry_at"]),
        parked=header["parked"],
        payload=payload,
        meta=dict(header["meta"]),
        bytes=size,
    )


def _header_from_item(item: SpoolItem, payload_len: int) -> dict[str, Any]:
    return {
        "v": FORMAT_VERSION,
        "id": item.id,
        "request_id": item.request_id,
        "seq": item.seq,
        "stage": item.stage,
        "reason": item.reason,
        "error": item.error,
        "attempts": item.attempts,
        "first_failed_at": float(item.first_failed_at),
        "last_failed_at": float(item.last_failed_at),
        "next_retry_at": float(item.next_retry_at),
        "parked": bool(item.parked),
        "meta": item.meta,
        "payload_len": payload_len,
    }


def _copy(item: SpoolItem) -> SpoolItem:
    return dataclasses.replace(item, payload=b"", meta=dict(item.meta))


class Spool:
    """A directory of dead-lettered items with an in-memory index of their headers.

    Opening scans the directory: ``*.tmp`` leftovers of an interrupted write are
    deleted (listed in ``self.removed_tmp``), every ``*.dlq`` file is verified
    (magic, lengths, CRC, msgpack header) and a failing one is moved to
    ``<path>/quarantine/`` and recorded in ``self.quarantined`` as
    ``(filename, reason)``. Files with other names are left alone.
    """

    def __init__(self, path: str, max_bytes: int = 0) -> None:
        if max_bytes < 0:
            raise ValueError(f"dlq.max_bytes must be >= 0, got {max_bytes}")
        self.path = os.path.abspath(path)
        self.max_bytes = int(max_bytes)
        self.quarantine_path = os.path.join(self.path, QUARANTINE_DIR)
        self.quarantined: list[tuple[str, str]] = []
        self.removed_tmp: list[str] = []
        self._index: dict[str, SpoolItem] = {}   # id -> header-only item, in id order
        self._total_bytes = 0
        self._counter = itertools.count()
        self._last_ns = 0
        os.makedirs(self.path, exist_ok=True)
        os.makedirs(self.quarantine_path, exist_ok=True)
        self._recover()

    # ----------------------------------------------------------------- public

    def put(self, *, request_id: str | None, seq: int | None, stage: str, reason: str,
            error: str, payload: bytes, meta: dict | None = None, now: float | None = None,
            next_retry_at: float | None = None, attempts: int = 1,
            parked: bool = False) -> SpoolItem:
        """Durably add an item and return its header-only copy.

        ``now`` (default ``time.time()``) becomes first/last_failed_at;
        ``next_retry_at`` defaults to ``now``; ``attempts`` counts the failure
        that brought it here. Returns only once the file and its directory
        entry are fsynced. Raises SpoolFull (nothing left on disk) when the
        cap would be exceeded or the disk is full; TypeError when ``meta`` is
        not msgpack-able.
        """
        now = time.time() if now is None else float(now)
        payload = bytes(payload)
        item = SpoolItem(
            id=self._new_id(), request_id=request_id, seq=seq, stage=str(stage),
            reason=str(reason), error=_cut(error), attempts=int(attempts),
            first_failed_at=now, last_failed_at=now,
            next_retry_at=now if next_retry_at is None else float(next_retry_at),
            parked=bool(parked), payload=b"", meta=dict(meta or {}), bytes=0,
        )
        data = _encode(_header_from_item(item, len(payload)), payload)
        if self.max_bytes and self._total_bytes + len(data) > self.max_bytes:
            raise SpoolFull(
                f"dead-letter spool {self.path} is full: holds {self._total_bytes} of "
                f"dlq.max_bytes={self.max_bytes} bytes, item needs {len(data)}; "
                f"replay or purge items, or raise dlq.max_bytes",
                path=self.path, max_bytes=self.max_bytes,
                used_bytes=self._total_bytes, needed_bytes=len(data))
        self._write(item.id, data, new=True)
        item.bytes = len(data)
        self._index[item.id] = item
        self._total_bytes += len(data)
        return _copy(item)

    def get(self, id: str) -> SpoolItem:
        """The item with its payload, read and verified from disk.

        KeyError when absent; a file found corrupt is quarantined, dropped from
        the index, and also reported as KeyError.
        """
        self._require(id)
        try:
            header, payload, size = _read_file(self._file(id), id, with_payload=True)
        except FileNotFoundError:
            self._forget(id)
            raise KeyError(id) from None
        except _Corrupt as exc:
            self._quarantine(id + SUFFIX, str(exc))
            self._forget(id)
            raise KeyError(id) from None
        item = _item_from_header(header, size, payload)
        return item

    def header(self, id: str) -> SpoolItem:
        """Header-only copy of one item (no disk read); KeyError when absent."""
        self._require(id)
        return _copy(self._index[id])

    def items(self) -> list[SpoolItem]:
        """Header-only copies of every item, ordered by id (oldest first)."""
        return [_copy(self._index[i]) for i in sorted(self._index)]

    def due(self, now: float) -> list[SpoolItem]:
        """Header-only copies of items not parked with next_retry_at <= now, by id."""
        return [_copy(self._index[i]) for i in sorted(self._index)
                if not self._index[i].parked and self._index[i].next_retry_at <= now]

    def record_failure(self, id: str, error: str, reason: str, now: float,
                       next_retry_at: float, parked: bool) -> SpoolItem:
        """Count one more failed attempt: attempts += 1, last_failed_at = now, new
        error/reason/next_retry_at/parked. Rewritten durably (atomic replace);
        returns the header-only copy. KeyError when absent or corrupt.
        """
        cur = self._index.get(id) if isinstance(id, str) else None
        if cur is None:
            raise KeyError(id)
        new = dataclasses.replace(
            cur, attempts=cur.attempts + 1, last_failed_at=float(now), error=_cut(error),
            reason=str(reason), next_retry_at=float(next_retry_at), parked=bool(parked),
            meta=dict(cur.meta))
        return self._rewrite(new)

    def set_parked(self, id: str, parked: bool, next_retry_at: float,
                   reset_attempts: bool = False) -> SpoolItem:
        """Park or unpark an item (e.g. an operator replay unparks with
        next_retry_at=now). ``reset_attempts`` sets attempts to 0 so the item
        gets a full set of automatic retries again. Durable; header-only copy.
        """
        cur = self._index.get(id) if isinstance(id, str) else None
        if cur is None:
            raise KeyError(id)
        new = dataclasses.replace(
            cur, parked=bool(parked), next_retry_at=float(next_retry_at),
            attempts=0 if reset_attempts else cur.attempts, meta=dict(cur.meta))
        return self._rewrite(new)

    def remove(self, id: str) -> None:
        """Delete an item (unlink + directory fsync). KeyError when absent."""
        self._require(id)
        try:
            os.unlink(self._file(id))
        except FileNotFoundError:
            pass
        self._forget(id)
        _fsync_dir(self.path)

    def seqs_for(self, request_id: str) -> set[int]:
        """Seqs of the ``chunk`` items held for ``request_id`` (parked ones included)."""
        return {it.seq for it in self._index.values()
                if it.request_id == request_id and it.stage == "chunk" and it.seq is not None}

    def __contains__(self, id: object) -> bool:
        return isinstance(id, str) and id in self._index

    def __len__(self) -> int:
        return len(self._index)

    @property
    def total_bytes(self) -> int:
        """Bytes of all item files (quarantine not included)."""
        return self._total_bytes

    @property
    def parked_count(self) -> int:
        return sum(1 for it in self._index.values() if it.parked)

    @property
    def oldest_first_failed_at(self) -> float | None:
        """Earliest first_failed_at of any item, None when empty."""
        if not self._index:
            return None
        return min(it.first_failed_at for it in self._index.values())

    # ---------------------------------------------------------------- private

    def _new_id(self) -> str:
        ns = max(time.time_ns(), self._last_ns + 1)   # strictly increasing, even if the clock steps back
        self._last_ns = ns
        return f"{ns:020d}-{next(self._counter) % 1_000_000:06d}-{os.getpid()}"

    def _file(self, id: str) -> str:
        return os.path.join(self.path, id + SUFFIX)

    def _require(self, id: object) -> None:
        if not isinstance(id, str) or id not in self._index:
            raise KeyError(id)

    def _forget(self, id: str) -> None:
        item = self._index.pop(id, None)
        if item is not None:
            self._total_bytes -= item.bytes

    def _write(self, id: str, data: bytes, new: bool) -> None:
        """tmp file -> fsync -> os.replace -> fsync dir. Cleans the tmp on failure, and
        for a ``new`` item also the final file if the directory fsync failed."""
        tmp = os.path.join(self.path, "." + id + TMP_SUFFIX)
        replaced = False
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self._file(id))
            replaced = True
            _fsync_dir(self.path)
        except OSError as exc:
            try:
                os.unlink(self._file(id) if (replaced and new) else tmp)
            except OSError:
                pass
            if exc.errno in _FULL_ERRNOS:
                raise SpoolFull(
                    f"dead-letter spool {self.path} cannot write {len(data)} bytes: "
                    f"{os.strerror(exc.errno)} (dlq.max_bytes={self.max_bytes}, "
                    f"holds {self._total_bytes}); free disk space, replay or purge items",
                    path=self.path, max_bytes=self.max_bytes, used_bytes=self._total_bytes,
                    needed_bytes=len(data), err=exc.errno) from exc
            raise

    def _rewrite(self, new: SpoolItem) -> SpoolItem:
        try:
            _, payload, _ = _read_file(self._file(new.id), new.id, with_payload=True)
        except FileNotFoundError:
            self._forget(new.id)
            raise KeyError(new.id) from None
        except _Corrupt as exc:
            self._quarantine(new.id + SUFFIX, str(exc))
            self._forget(new.id)
            raise KeyError(new.id) from None
        data = _encode(_header_from_item(new, len(payload)), payload)
        self._write(new.id, data, new=False)   # no cap check: the item is already held
        old = self._index[new.id]
        self._total_bytes += len(data) - old.bytes
        new.bytes = len(data)
        new.payload = b""
        self._index[new.id] = new
        return _copy(new)

    def _quarantine(self, name: str, reason: str) -> None:
        src = os.path.join(self.path, name)
        dst = os.path.join(self.quarantine_path, name)
        n = 1
        while os.path.exists(dst):
            dst = os.path.join(self.quarantine_path, f"{name}.{n}")
            n += 1
        try:
            os.replace(src, dst)
            _fsync_dir(self.quarantine_path)
            _fsync_dir(self.path)
        except FileNotFoundError:
            pass
        self.quarantined.append((name, reason))

    def _recover(self) -> None:
        found: list[tuple[str, str]] = []
        with os.scandir(self.path) as it:
            for entry in it:
                if entry.name.endswith(TMP_SUFFIX) and entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
                    self.removed_tmp.append(entry.name)
                elif entry.name.endswith(SUFFIX) and entry.is_file(follow_symlinks=False):
                    found.append((entry.name[: -len(SUFFIX)], entry.name))
        if self.removed_tmp:
            _fsync_dir(self.path)
        for id, name in sorted(found):
            if not _ID_RE.match(id):
                self._quarantine(name, "file name is not a spool id")
                continue
            try:
                header, _, size = _read_file(os.path.join(self.path, name), id, with_payload=False)
            except _Corrupt as exc:
                self._quarantine(name, str(exc))
                continue
            item = _item_from_header(header, size)
            self._index[id] = item
            self._total_bytes += size
            self._last_ns = max(self._last_ns, int(id.split("-", 1)[0]))


def _cut(error: object) -> str:
    text = str(error)
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 3] + "..."
    return text
