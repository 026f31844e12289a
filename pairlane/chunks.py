"""Chunk planning and encoding on the producer side (PROTOCOL.md section 1, `chunk`).

Owns: splitting validated columns into row ranges whose `chunk` frames fit
max_message_bytes (and the server's max_chunk_rows), and the one chunk
encoder (`pack_chunk`) that turns rows of validated columns into a frame:
numeric columns as little-endian bins, string columns and numeric columns
with nil as lists. Used by pairlane.client and by the legacy actor.

Never does: I/O, sockets, the conversation, validation beyond what
`encode_chunk`/`plan_chunks` delegate to pairlane.columns.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import msgpack
import numpy as np

from . import codec
from .columns import first_true, prepare_columns

__all__ = ["MAX_CHUNK_ROWS", "encode_values", "pack_chunk", "encode_chunk", "plan", "plan_chunks"]

_INT64_MAX = 2**63 - 1
_HEADROOM = 0.9  # plan chunks to ~90% of max_message_bytes
MAX_CHUNK_ROWS = 32768  # the server's default gateway.max_chunk_rows


def encode_values(values: np.ndarray | list, kind: str, start: int, stop: int) -> bytes | list:
    """Rows [start, stop) of one validated column as they go on the wire.

    A numpy array, or a numeric list without None in these rows, becomes a
    bin of little-endian float64 (int64 for kind "int"); a string column or a
    numeric one with None stays a list.
    """
    if isinstance(values, np.ndarray):
        return values[start:stop].tobytes()
    part = values[start:stop]
    if kind != "str" and None not in part:
        return np.asarray(part, dtype="<f8" if kind == "float" else "<i8").tobytes()
    return part


def pack_chunk(request_id: str, seq: int, prepared: dict, start: int, stop: int) -> bytes:
    """The `chunk` frame of rows [start, stop) of columns already validated.

    `prepared` is prepare_columns' output, or columns that passed
    codec.check_columns (lists); nothing is checked again here. The one chunk
    encoder of pairlane: the producer client and the legacy actor both use it.
    """
    trades = {c: encode_values(v, codec.COLUMN_KINDS[c], start, stop) for c, v in prepared.items()}
    return msgpack.packb({"type": "chunk", "request_id": request_id, "seq": seq, "trades": trades},
                         use_bin_type=True)


def _slice(values: Any, start: int, stop: int) -> Any:
    if isinstance(values, (list, np.ndarray)):
        return values[start:stop]
    return list(values)[start:stop]


def encode_chunk(request_id: str, seq: int, columns: dict, start: int, stop: int) -> bytes:
    """One `chunk` frame holding rows [start, stop) of `columns`.

    A msgpack map {"type": "chunk", "request_id", "seq", "trades": {col: values}}:
    numeric columns without None in these rows are a msgpack bin of
    little-endian float64 (int64 for codec.INT_COLS), numeric columns with None
    and string columns are lists. Validates the rows (ValueError).
    """
    prepared, _ = prepare_columns({c: _slice(v, start, stop) for c, v in columns.items()})
    return pack_chunk(request_id, seq, prepared, 0, stop - start)


def _str_costs(values: list, n: int) -> np.ndarray:
    """Encoded size of each string (or nil) of a column; ASCII-only columns in one pass."""
    if None not in values and all(map(str.isascii, values)):
        lens = np.fromiter(map(len, values), dtype=np.int64, count=n)
        return lens + np.where(lens < 32, 1, np.where(lens < 256, 2, np.where(lens < 65536, 3, 5)))
    return np.fromiter((1 if s is None else _str_cost(s) for s in values), dtype=np.int64, count=n)


@lru_cache(maxsize=4096)
def _str_cost(s: str) -> int:
    n = len(s.encode("utf-8"))
    return n + (1 if n < 32 else 2 if n < 256 else 3 if n < 65536 else 5)


def plan(prepared: dict, n: int, max_message_bytes: int,
         max_rows: int = MAX_CHUNK_ROWS) -> list[tuple[int, int]]:
    """plan_chunks over prepared columns of n rows: byte-bounded ranges, each split to at most max_rows rows."""
    out = []
    for a, b in _plan_bytes(prepared, n, max_message_bytes):
        out.extend((i, min(b, i + max_rows)) for i in range(a, b, max_rows))
    return out or [(0, 0)]


def _plan_bytes(prepared: dict, n: int, max_message_bytes: int) -> list[tuple[int, int]]:
    if n == 0:
        return [(0, 0)]
    # fixed part: the map around the columns with the longest request_id and seq,
    # plus the largest (5-byte) bin/array header for every column
    overhead = len(msgpack.packb(
        {"type": "chunk", "request_id": "x" * 128, "seq": _INT64_MAX, "v": 1,
         "trades": {c: b"" for c in prepared}}, use_bin_type=True)) + 5 * len(prepared)
    fixed = 0  # bytes every row costs at most
    variable: np.ndarray | None = None  # bytes each row's strings cost
    for name, values in prepared.items():
        if isinstance(values, np.ndarray):
            fixed += 8
        elif codec.COLUMN_KINDS[name] != "str":
            fixed += 9  # float64 / int64 at most 9 bytes, nil 1
        else:
            costs = _str_costs(values, n)
            variable = costs if variable is None else variable + costs
    hard = max_message_bytes - overhead
    budget = int(max_message_bytes * _HEADROOM) - overhead
    if variable is None:
        if fixed > hard:
            raise ValueError(f"one row needs about {fixed + overhead} bytes encoded, over "
                             f"max_message_bytes={max_message_bytes}")
        per = max(1, budget // fixed)
        return [(i, min(i + per, n)) for i in range(0, n, per)]
    costs = variable + fixed
    too_big = costs > hard
    if too_big.any():
        i = first_true(too_big)
        raise ValueError(f"row {i} needs about {int(costs[i]) + overhead} bytes encoded, over "
                         f"max_message_bytes={max_message_bytes} (shorten its strings or raise "
                         f"gateway.max_message_bytes)")
    cum = np.cumsum(costs)
    ranges = []
    start = 0
    while start < n:
        base = int(cum[start - 1]) if start else 0
        stop = int(np.searchsorted(cum, base + budget, side="right"))
        stop = max(stop, start + 1)  # a row over the headroom budget still fits the hard limit
        ranges.append((start, stop))
        start = stop
    return ranges


def plan_chunks(columns: dict, max_message_bytes: int, max_rows: int = MAX_CHUNK_ROWS) -> list[tuple[int, int]]:
    """Row ranges [start, stop) covering every row once, each chunk frame <= max_message_bytes.

    Sizes are an upper bound per row (strings measured exactly, numbers at 8-9
    bytes) with ~10% headroom; at least one row per chunk; zero rows give one
    empty chunk [(0, 0)]. ValueError when a single row cannot fit.
    """
    prepared, n = prepare_columns(columns)
    return plan(prepared, n, max_message_bytes, max_rows)
