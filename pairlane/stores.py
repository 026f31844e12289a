"""Which store backend the configuration selects, and the one interface both backends implement.

Owns: `StoreLike` (what the writer, the DLQ retry path through it, and the assembler's lookups
call on a store), `StoreViewLike` (the admin's read-only view), and the factories that open the
configured backend: `store.url` "" = SQLite at `store.path` (`pairlane.store`), a postgresql://
URL = PostgreSQL (`pairlane.pgstore`, imported only then: psycopg stays optional). Also
`open_reader` for readers that run their own SQL (pair evaluation, metrics): a sqlite3
connection (read-only) or a `PgReader`, both with sqlite3's `execute(sql, params)` using `?`.
Never holds a connection itself.
"""
from __future__ import annotations

import os
import sqlite3
from typing import Any, Protocol

from .store import Store, StoreError, StoreView, connect
from .vocab import ResultStatus, WriteOutcome


class StoreLike(Protocol):
    """What the actors call on the writing store (pairlane.store.Store, pairlane.pgstore.PgStore)."""

    path: str
    max_bytes: int
    conn: Any
    rows_written: int
    commits: int
    last_commit_at: float | None
    last_error: str | None
    RECORDS_WITH_CHUNK: bool   # write_chunk(record=True[, new_only]) records the request in the chunk's transaction

    def open(self) -> None: ...
    def open_readonly(self) -> bool: ...
    def close(self) -> None: ...
    def lookup(self, request_id: str) -> dict | None: ...
    def begin(self, meta: dict) -> None: ...
    def write_chunk(self, meta: dict, seq: int, trades: dict, nrows: int) -> WriteOutcome: ...
    def set_status(self, request_id: str, status: ResultStatus | str, error: str | None = None) -> None: ...
    def write_result_without_trades(self, meta: dict, status: str) -> str: ...   # the status it found
    def abandon_stale(self, older_than: float, active: set) -> list[str]: ...
    def write_live(self, batch_id: str, trades: dict, nrows: int) -> str: ...
    def replace_pair_slots(self, slots: list[dict], evaluated_at: float) -> None: ...
    def result_info(self, request_id: str) -> dict | None: ...
    def verify(self, assembly_timeout_s: float, now: float | None = None) -> list[dict]: ...
    def file_sizes(self) -> dict: ...


class StoreViewLike(Protocol):
    """The admin's read-only view (pairlane.store.StoreView, pairlane.pgstore.PgStoreView)."""

    path: str

    def open(self) -> bool: ...
    def close(self) -> None: ...
    def interrupt(self) -> None: ...
    def result_info(self, request_id: str) -> dict | None: ...
    def verify(self, assembly_timeout_s: float, now: float | None = None) -> list[dict]: ...


def url_of(cfg: dict) -> str:
    return cfg["store"].get("url", "")


def backend(cfg: dict) -> str:
    """"sqlite" or "postgresql"."""
    return "postgresql" if url_of(cfg) else "sqlite"


def open_store(cfg: dict, *, busy_timeout_ms: int | None = None, readonly: bool = False) -> StoreLike:
    """The store of the configured backend, not yet connected: the writer calls open(); a lookup-only
    reader (readonly=True) calls open_readonly() and then only lookup()."""
    s = cfg["store"]
    timeout = s["busy_timeout_ms"] if busy_timeout_ms is None else busy_timeout_ms
    if url_of(cfg):
        from .pgstore import PgStore
        return PgStore(s["url"], busy_timeout_ms=timeout, readonly=readonly)
    return Store(s["path"], max_bytes=s["max_bytes"], busy_timeout_ms=timeout)


def open_view(cfg: dict) -> StoreViewLike:
    if url_of(cfg):
        from .pgstore import PgStoreView
        return PgStoreView(cfg["store"]["url"])
    return StoreView(cfg["store"]["path"])


def open_reader(cfg: dict, busy_timeout_ms: int = 1000):
    """A read connection with sqlite3's `execute`/`in_transaction`/`close`, or None when there is no
    SQLite database yet. Raises StoreError when PostgreSQL does not answer, sqlite3.Error for SQLite."""
    if url_of(cfg):
        from .pgstore import open_reader as pg_reader
        return pg_reader(cfg["store"]["url"])
    path = cfg["store"]["path"]
    if not os.path.exists(path):
        return None
    return connect(path, readonly=True, busy_timeout_ms=busy_timeout_ms)


def reader_errors() -> tuple:
    """The exceptions a reader from open_reader may raise (sqlite3's, psycopg's if installed, StoreError)."""
    errs: tuple = (sqlite3.Error, StoreError, OSError)
    try:
        import psycopg
        errs += (psycopg.Error,)
    except ImportError:
        pass
    return errs


def database_bytes(cfg: dict) -> dict | None:
    """{"main": n, "wal": n} for SQLite (missing files 0); {"main": pg_database_size} for PostgreSQL;
    None when it cannot be read."""
    if url_of(cfg):
        try:
            from .pgstore import open_reader as pg_reader
            r = pg_reader(cfg["store"]["url"])
        except (StoreError, ImportError):
            return None
        try:
            return {"main": r.execute("SELECT pg_database_size(current_database())").fetchone()[0], "wal": 0}
        except reader_errors():
            return None
        finally:
            r.close()
    out = {}
    for k, p in (("main", cfg["store"]["path"]), ("wal", cfg["store"]["path"] + "-wal")):
        try:
            out[k] = os.path.getsize(p)
        except OSError:
            out[k] = 0
    return out
