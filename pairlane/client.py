"""Producer side of the ingest protocol (PROTOCOL.md section 1).

Owns: turning a columnar result into wire frames (validation, chunk planning,
chunk encoding), the DEALER conversation with pairlane's gateway (begin,
credit windows, resume after busy/unavailable/timeouts, end/incomplete), and
reading result files (JSON, msgpack, CSV) plus synthetic test data.

Never does: talk to SQLite, read the daemon's configuration, import anything
from the daemon, or retry forever. A final error or exhausted retries raise
`SendError`; bad input raises `ValueError` before anything is sent.

Columns are a dict of column name -> values (a list, a tuple or a numpy
array), all of one length. Numeric values must be finite numbers (booleans
are not numbers); an optional numeric column may hold None, and NaN there
also means "missing" and is sent as nil. Row numbers in error messages count
from 0.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
import zlib
from collections import deque
from functools import lru_cache
from typing import Any, Callable, Iterable

import msgpack
import numpy as np
import zmq

from . import codec

__all__ = [
    "NUMERIC_INT", "NUMERIC_FLOAT", "STRING_COLS", "LIVE_STRING_COLS",
    "MAX_STR", "SendError", "synthetic_columns", "load_file", "encode_chunk", "plan_chunks",
    "prepare_columns", "Producer",
]

# the wire contract's column names and limits: one definition, the gateway's (pairlane.codec)
NUMERIC_INT = codec.INT_COLS
NUMERIC_FLOAT = codec.FLOAT_COLS
STRING_COLS = codec.STR_COLS
LIVE_STRING_COLS = codec.LIVE_STR_COLS  # live_trades carries these on top of the chunk columns
REQUIRED = codec.REQUIRED
MAX_STR = codec.MAX_STR

_KIND = {**{c: "int" for c in NUMERIC_INT}, **{c: "float" for c in NUMERIC_FLOAT},
         **{c: "str" for c in STRING_COLS}}
_LIVE_KIND = {**_KIND, **{c: "str" for c in LIVE_STRING_COLS}}
log = logging.getLogger("pairlane.client")

_ID_RE = codec.REQUEST_ID_RE
_META_TYPES = {"strategy_name": str, "request_id": str, "metrics": dict,
               "symbol": str, "timeframe": int, "rank": str, "oos_kind": str}
_INT64_MAX = 2**63 - 1
_HEADROOM = 0.9  # plan chunks to ~90% of max_message_bytes
MAX_CHUNK_ROWS = 32768  # the server's default gateway.max_chunk_rows

_HINTS = {
    "timeout": "is pairlane running and listening on this endpoint? "
               "(`python run.py admin status`); resend later with the same request_id",
    "conflict": "this request_id is in progress or stored with another strategy_name or "
                "totals; use a new request_id (or resend exactly the same result)",
    "malformed": "the server could not parse a message: a client/server version mismatch "
                 "or a client bug; report it with this message",
    "too_large": "a frame or the declared totals exceed the server's limits; set "
                 "max_message_bytes to the server's gateway.max_message_bytes or "
                 "split the result",
    "bad_chunk": "the server rejected the data (unequal column lengths, unknown column, "
                 "NaN/inf or bad bin); fix the input and resend under the same request_id",
    "incomplete": "the stored rows did not add up to total_trades and the result was "
                  "marked failed; resend it under a new request_id",
    "busy": "the server stayed busy through every retry; resend later with the same "
            "request_id (nothing is lost: durable chunks are kept)",
    "unavailable": "neither the database nor the spool could take data through every "
                   "retry; check disk space and `python run.py admin status`, then resend "
                   "with the same request_id",
    "unknown_request": "the server kept forgetting this request; check "
                       "gateway.assembly_timeout_s and the daemon's logs",
}


class SendError(Exception):
    """A send failed for good: a final error reply, or no progress after every retry.

    `code` is the protocol error code (or "timeout"); `reply` the server's last
    error map (None for a timeout); `request_id` the request concerned.
    """

    def __init__(self, request_id: str, code: str, server_message: str = "",
                 reply: dict | None = None) -> None:
        self.request_id = request_id
        self.code = code
        self.reply = reply
        self.server_message = server_message
        text = f"request {request_id}: {code}"
        if server_message:
            text += f": {server_message}"
        hint = _HINTS.get(code)
        if hint:
            text += f" -- {hint}"
        super().__init__(text)


# ----------------------------------------------------------------------------
# validation

def _bad(name: str, row: int | None, problem: str) -> ValueError:
    where = f"column {name!r}" + (f" row {row}" if row is not None else "")
    return ValueError(f"{where}: {problem}")


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _numeric_list(name: str, seq: list, kind: str, required: bool) -> list:
    """Element-wise validation of a numeric column that holds None (slow path)."""
    out: list = []
    for i, v in enumerate(seq):
        if v is None:
            if required:
                raise _bad(name, i, "missing value (this column is required)")
            out.append(None)
            continue
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise _bad(name, i, f"expected a number, got {type(v).__name__} {v!r:.40}")
        f = float(v)
        if f != f:  # NaN
            if required:
                raise _bad(name, i, "NaN is not allowed in a required column")
            out.append(None)
            continue
        if f in (float("inf"), float("-inf")):
            raise _bad(name, i, "infinity is not allowed")
        if kind == "float":
            out.append(f)
        else:
            if isinstance(v, (float, np.floating)):
                if not f.is_integer():
                    raise _bad(name, i, f"expected a whole number, got {v!r}")
                iv = int(f)
            else:
                iv = int(v)
            if not -_INT64_MAX - 1 <= iv <= _INT64_MAX:
                raise _bad(name, i, f"{iv} does not fit in int64")
            out.append(iv)
    return out


def _prepare_numeric(name: str, values: Any, kind: str, required: bool) -> np.ndarray | list:
    if isinstance(values, np.ndarray) and values.dtype.kind == "b":
        raise _bad(name, None, "booleans are not numbers")
    if isinstance(values, np.ndarray) and values.dtype.kind in "iuf":
        arr = values
    else:
        seq = values.tolist() if isinstance(values, np.ndarray) else list(values)
        has_none = False
        for i, v in enumerate(seq):
            if v is None:
                has_none = True
            elif isinstance(v, (bool, np.bool_)) or not isinstance(
                    v, (int, float, np.integer, np.floating)):
                raise _bad(name, i, f"expected a number, got {type(v).__name__} {v!r:.40}")
        if has_none:
            return _numeric_list(name, seq, kind, required)
        arr = np.asarray(seq) if seq else np.zeros(0, dtype="<f8" if kind == "float" else "<i8")
        if arr.dtype.kind not in "iuf":  # python ints beyond int64 give object arrays
            return _numeric_list(name, seq, kind, required)  # raises with the row
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        if not finite.all():
            nan = np.isnan(arr)
            if required and nan.any():
                raise _bad(name, _first(nan), "NaN is not allowed in a required column")
            if (~finite & ~nan).any():
                raise _bad(name, _first(~finite & ~nan), "infinity is not allowed")
            return _numeric_list(name, arr.tolist(), kind, required)  # NaN -> None
        if kind == "float":
            return arr.astype("<f8", copy=False)
        whole = arr == np.floor(arr)
        if not whole.all():
            i = _first(~whole)
            raise _bad(name, i, f"expected a whole number, got {arr[i]!r}")
        if (np.abs(arr) >= 2.0**63).any():
            raise _bad(name, _first(np.abs(arr) >= 2.0**63), "does not fit in int64")
        return arr.astype("<i8")
    if kind == "float":
        return arr.astype("<f8")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > _INT64_MAX:
        raise _bad(name, _first(arr > _INT64_MAX), "does not fit in int64")
    return arr.astype("<i8", copy=False)


def _prepare_strings(name: str, values: Any, required: bool) -> list:
    seq = values.tolist() if isinstance(values, np.ndarray) else list(values)
    types = set(map(type, seq))
    # fast path (C-level passes): only strings, none too long, none empty where required
    if types <= {str} and (not seq or (max(map(len, seq)) <= MAX_STR and (not required or min(map(len, seq)) > 0))):
        return seq
    for i, v in enumerate(seq):  # slow path: find the first offending row for the message
        if v is None:
            if required:
                raise _bad(name, i, "missing value (this column is required)")
        elif not isinstance(v, str):
            raise _bad(name, i, f"expected a string or None, got {type(v).__name__} {v!r:.40}")
        elif len(v) > MAX_STR or (required and not v):
            raise _bad(name, i, f"strings must be {'1' if required else '0'}-{MAX_STR} characters, "
                                f"got {len(v)}")
    return seq


def _prepare(columns: dict, kinds: dict[str, str], required: Iterable[str]
             ) -> tuple[dict[str, np.ndarray | list], int]:
    if not isinstance(columns, dict):
        raise ValueError(f"columns must be a dict of column -> values, got {type(columns).__name__}")
    required = tuple(required)
    unknown = [c for c in columns if c not in kinds]
    if unknown:
        raise ValueError(f"unknown column(s) {', '.join(map(repr, unknown))}; "
                         f"known columns: {', '.join(kinds)}")
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(f"missing required column(s) {', '.join(map(repr, missing))}")
    out: dict[str, np.ndarray | list] = {}
    n: int | None = None
    first = None
    for name, values in columns.items():
        if hasattr(values, "to_numpy"):  # pandas and friends
            values = values.to_numpy()
        if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__") or \
                (isinstance(values, np.ndarray) and values.ndim != 1):
            raise _bad(name, None, f"expected a list or a 1-D array, got {type(values).__name__}")
        kind = kinds[name]
        prepared = (_prepare_strings(name, values, name in required) if kind == "str"
                    else _prepare_numeric(name, values, kind, name in required))
        if n is None:
            n, first = len(prepared), name
        elif len(prepared) != n:
            raise ValueError(f"columns differ in length: {first!r} has {n} rows, "
                             f"{name!r} has {len(prepared)}")
        out[name] = prepared
    return out, n or 0


def prepare_columns(columns: dict) -> tuple[dict[str, np.ndarray | list], int]:
    """Validate result columns and normalise them; returns (columns, row count).

    Numeric columns without missing values become little-endian numpy arrays
    (float64, or int64 for NUMERIC_INT); numeric columns with missing values
    become lists of Python numbers and None; string columns lists.
    Raises ValueError naming the column and row.
    """
    return _prepare(columns, _KIND, REQUIRED)


# ----------------------------------------------------------------------------
# encoding and planning

def _encode_prepared(values: np.ndarray | list, kind: str, start: int, stop: int) -> bytes | list:
    if isinstance(values, np.ndarray):
        return values[start:stop].tobytes()
    part = values[start:stop]
    if kind != "str" and None not in part:
        return np.asarray(part, dtype="<f8" if kind == "float" else "<i8").tobytes()
    return part


def _pack_chunk(request_id: str, seq: int, prepared: dict, start: int, stop: int) -> bytes:
    trades = {c: _encode_prepared(v, _KIND[c], start, stop) for c, v in prepared.items()}
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
    little-endian float64 (int64 for NUMERIC_INT), numeric columns with None
    and string columns are lists. Validates the rows (ValueError).
    """
    prepared, _ = prepare_columns({c: _slice(v, start, stop) for c, v in columns.items()})
    return _pack_chunk(request_id, seq, prepared, 0, stop - start)


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


def _plan(prepared: dict, n: int, max_message_bytes: int,
          max_rows: int = MAX_CHUNK_ROWS) -> list[tuple[int, int]]:
    """Byte-bounded ranges, then each split to at most max_rows rows."""
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
        elif _KIND[name] != "str":
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
        i = _first(too_big)
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
    return _plan(prepared, n, max_message_bytes, max_rows)


# ----------------------------------------------------------------------------
# data sources

_SYMBOLS = (("USDJPY", 150.0, 3, 100_000.0), ("EURUSD", 1.08, 5, 100_000.0),
            ("GBPUSD", 1.27, 5, 100_000.0), ("XAUUSD", 2000.0, 2, 100.0))


def synthetic_columns(n: int, *, seed: int = 0, start_ts: int = 1_700_000_000,
                      strategy: str = "S") -> dict[str, np.ndarray | list]:
    """`n` plausible closed trades, the same for the same (n, seed, strategy).

    Timestamps rise by 5 minutes to 4 hours; returns ~ normal with a small
    strategy-specific edge; symbol and direction strings; entry/exit prices
    rounded to the symbol's digits and pnl (USD) consistent with them and the
    volume; sl and tp around the entry; hold_time shorter than the gap to the
    next trade; one timeframe (minutes) per strategy. `strategy` is mixed into
    the seed so two strategies with one seed differ.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    rng = np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(strategy.encode("utf-8"))])
    gaps = rng.integers(300, 4 * 3600, size=n)
    ts = start_ts + np.concatenate(([0], np.cumsum(gaps)))[:n].astype(np.int64)
    sym_idx = rng.choice(len(_SYMBOLS), size=n, p=[0.35, 0.3, 0.2, 0.15])
    base = np.array([s[1] for s in _SYMBOLS])[sym_idx]
    scale = 10.0 ** np.array([s[2] for s in _SYMBOLS])[sym_idx]
    contract = np.array([s[3] for s in _SYMBOLS])[sym_idx]
    entry = np.round(base * np.exp(np.cumsum(rng.normal(0.0, 0.002, size=n))) * scale) / scale
    sign = np.where(rng.random(n) < 0.5, 1.0, -1.0)
    volume = rng.choice(np.array([0.01, 0.05, 0.1, 0.2, 0.5, 1.0]), size=n)
    # per-trade return ~ normal with a small strategy-specific edge
    sigma = float(rng.uniform(0.001, 0.005))
    ret = rng.normal(float(rng.uniform(-0.05, 0.15)) * sigma, sigma, size=n)
    exit_ = np.round(entry * (1.0 + sign * ret) * scale) / scale
    # pnl in account currency (USD): move * volume * contract size, / price for USDJPY
    pnl = np.round(sign * (exit_ - entry) * volume * contract / np.where(sym_idx == 0, exit_, 1.0), 2)
    risk = entry * rng.uniform(0.002, 0.01, size=n)
    sl = np.round((entry - sign * risk) * scale) / scale
    tp = np.round((entry + sign * risk * rng.uniform(1.0, 3.0, size=n)) * scale) / scale
    hold = np.maximum(60, (gaps * rng.uniform(0.1, 0.9, size=n)).astype(np.int64))
    timeframe = int(rng.choice([1, 5, 15, 30, 60, 240, 1440]))
    return {
        "timestamp": ts.astype("<i8"),
        "pnl": pnl.astype("<f8"),
        "symbol": [_SYMBOLS[i][0] for i in sym_idx.tolist()],
        "direction": ["BUY" if s > 0 else "SELL" for s in sign.tolist()],
        "entry_price": entry.astype("<f8"),
        "exit_price": exit_.astype("<f8"),
        "sl": sl.astype("<f8"),
        "tp": tp.astype("<f8"),
        "volume": volume.astype("<f8"),
        "hold_time": hold.astype("<i8"),
        "timeframe": np.full(n, timeframe, dtype="<i8"),
    }


def _meta_from(doc: dict, path: str) -> dict:
    meta = {}
    for key, typ in _META_TYPES.items():
        if key in doc and doc[key] is not None:
            v = doc[key]
            if not isinstance(v, typ) or isinstance(v, bool):
                raise ValueError(f"{path}: {key!r} must be {typ.__name__}, got {type(v).__name__}")
            meta[key] = v
    return meta


def _bin_column(name: str, raw: bytes, path: str) -> np.ndarray:
    if len(raw) % 8:
        raise ValueError(f"{path}: column {name!r}: bin length {len(raw)} is not a multiple of 8")
    return np.frombuffer(raw, dtype="<i8" if _KIND.get(name) == "int" else "<f8")


def _columns_from_document(doc: Any, path: str) -> tuple[dict, dict]:
    meta: dict = {}
    if isinstance(doc, dict):
        if "trades" in doc or "trade_list" in doc:
            trades = doc["trades"] if "trades" in doc else doc["trade_list"]
            meta = _meta_from(doc, path)
        elif "timestamp" in doc:
            trades = doc
        else:
            raise ValueError(f"{path}: expected a list of trades, a map with 'trades', or columns "
                             f"(found keys: {', '.join(map(str, list(doc)[:10]))})")
    elif isinstance(doc, list):
        trades = doc
    else:
        raise ValueError(f"{path}: expected a list of trades or a map, got {type(doc).__name__}")

    if isinstance(trades, dict):  # columnar
        cols = {}
        for name, values in trades.items():
            if isinstance(values, (bytes, bytearray)):
                values = _bin_column(name, bytes(values), path)
            elif not isinstance(values, list):
                raise ValueError(f"{path}: column {name!r} must be a list, got {type(values).__name__}")
            cols[name] = values
    elif isinstance(trades, list):  # row objects
        keys: dict[str, None] = {}
        for i, row in enumerate(trades):
            if not isinstance(row, dict):
                raise ValueError(f"{path}: trade {i} is a {type(row).__name__}, expected a map")
            for k in row:
                keys.setdefault(k, None)
        cols = {k: [row.get(k) for row in trades] for k in keys}
        if not trades:
            cols = {"timestamp": [], "pnl": []}
    else:
        raise ValueError(f"{path}: 'trades' must be a list of trades or a map of columns")
    try:
        prepared, _ = prepare_columns(cols)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return prepared, meta


def _parse_csv(path: str, text: str) -> dict:
    lines = text.splitlines()
    header_line = next((ln for ln in lines if ln.strip()), "")
    delim = "\t" if "\t" in header_line and "," not in header_line else \
        ";" if ";" in header_line and "," not in header_line else ","
    reader = csv.reader(io.StringIO(text), delimiter=delim)
    header: list[str] | None = None
    cols: dict[str, list] = {}
    for row in reader:
        line = reader.line_num
        if not row or all(not c.strip() for c in row):
            continue
        if header is None:
            header = [h.strip().lower() for h in row]
            unknown = [h for h in header if h not in _KIND]
            if unknown:
                raise ValueError(f"{path}: unknown column(s) in header: {', '.join(map(repr, unknown))}"
                                 f"; known columns: {', '.join(_KIND)}")
            dup = {h for h in header if header.count(h) > 1}
            if dup:
                raise ValueError(f"{path}: duplicate column(s) in header: {', '.join(sorted(dup))}")
            missing = [c for c in REQUIRED if c not in header]
            if missing:
                raise ValueError(f"{path}: missing column(s) {', '.join(map(repr, missing))} "
                                 f"(header has: {', '.join(header)}); a CSV needs at least "
                                 f"timestamp,pnl")
            cols = {h: [] for h in header}
            continue
        if len(row) != len(header):
            raise ValueError(f"{path}: line {line}: {len(row)} fields, the header has {len(header)}")
        for name, cell in zip(header, row):
            cols[name].append(_csv_value(path, line, name, cell.strip()))
    if header is None:
        raise ValueError(f"{path}: empty file (a CSV needs a header row with at least timestamp,pnl)")
    return cols


def _csv_value(path: str, line: int, name: str, cell: str) -> Any:
    kind = _KIND[name]
    if cell == "":
        if name in REQUIRED:
            raise ValueError(f"{path}: line {line}: column {name!r} is empty (it is required)")
        return None
    if kind == "str":
        return cell
    try:
        if kind == "int":
            try:
                return int(cell)
            except ValueError:
                f = float(cell)
                if f != f and name not in REQUIRED:
                    return None
                if not f.is_integer():
                    raise ValueError from None
                return int(f)
        f = float(cell)
    except (ValueError, OverflowError):
        hint = " (timestamps are Unix seconds)" if name == "timestamp" else ""
        raise ValueError(f"{path}: line {line}: column {name!r}: bad number {cell!r}{hint}") from None
    if f != f:
        if name in REQUIRED:
            raise ValueError(f"{path}: line {line}: column {name!r}: NaN is not allowed")
        return None
    if f in (float("inf"), float("-inf")):
        raise ValueError(f"{path}: line {line}: column {name!r}: infinity is not allowed")
    return f


def load_file(path: str) -> tuple[dict[str, list | np.ndarray], dict]:
    """Read a result from a file; returns (columns, meta).

    Formats, chosen by extension (.json, .msgpack/.mpk/.msgp, .csv/.tsv) or
    else by content: JSON or msgpack holding a list of trade maps, or a map
    {"trades": [trade maps] | {column: values}, "strategy_name", "metrics",
    "symbol", "timeframe", "rank", "oos_kind", "request_id"} (all but trades
    optional), or a bare {column: values} map; msgpack columns may also be a
    bin of little-endian float64/int64. CSV: a header row with at least
    timestamp,pnl and any other known column; empty cells are missing values.
    `meta` holds whichever of those top-level keys were present. Raises
    ValueError naming the file and the problem (missing column, bad number
    at line/row N, ...); OSError when the file cannot be read.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    ext = os.path.splitext(path)[1].lower()
    if ext in (".msgpack", ".mpk", ".msgp", ".mp"):
        fmt = "msgpack"
    elif ext == ".json":
        fmt = "json"
    elif ext in (".csv", ".tsv", ".txt"):
        fmt = "csv"
    else:
        head = data.lstrip()[:1]
        fmt = "json" if head in (b"[", b"{") else "csv"
        if data[:1] and (0x80 <= data[0] <= 0x9F or data[0] in (0xDC, 0xDD, 0xDE, 0xDF)):
            fmt = "msgpack"
    if fmt == "msgpack":
        try:
            doc = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as e:  # msgpack raises several unrelated types
            raise ValueError(f"{path}: not valid msgpack ({e})") from None
        return _columns_from_document(doc, path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    if fmt == "json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
        return _columns_from_document(doc, path)
    cols = _parse_csv(path, text)
    try:
        prepared, _ = prepare_columns(cols)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return prepared, {}


# ----------------------------------------------------------------------------
# the conversation

def _check_id(what: str, value: Any) -> None:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ValueError(f"{what} must be 1-128 characters of [A-Za-z0-9._:-], got {value!r}")


class Producer:
    """A DEALER connection to pairlane's gateway that sends results.

    One Producer is one socket: use it from one thread. `timeout_s` is how
    long to wait for any reply before resuming (send `begin` again and resend
    unacknowledged chunks); `retries` bounds consecutive resumes without
    progress (timeouts, busy/unavailable, unknown_request), after which
    SendError. `max_message_bytes` should match the server's
    gateway.max_message_bytes; chunks are planned to ~90% of it.
    """

    MAX_RETRY_AFTER_S = 30.0  # cap on a server's retry_after_s

    def __init__(self, endpoint: str, *, timeout_s: float = 30.0, retries: int = 5,
                 max_message_bytes: int = 1 << 20, identity: bytes | None = None,
                 max_chunk_rows: int = MAX_CHUNK_ROWS) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if max_message_bytes < 1024:
            raise ValueError("max_message_bytes must be >= 1024")
        self.endpoint = endpoint
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.max_message_bytes = int(max_message_bytes)
        self.max_chunk_rows = int(max_chunk_rows)
        # figures of the last send_result: chunks, chunks_sent, begins, timeouts,
        # busy_waits, max_unacked, window, elapsed_s
        self.last_stats: dict[str, Any] = {}
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDTIMEO, max(1, int(self.timeout_s * 1000)))
        if identity is not None:
            self._sock.setsockopt(zmq.IDENTITY, identity)
        try:
            self._sock.connect(endpoint)
        except zmq.ZMQError as e:
            self.close()
            raise ValueError(f"cannot connect to {endpoint!r}: {e}") from None
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)

    # -- low level -----------------------------------------------------------

    def send_raw(self, frame: bytes | list[bytes]) -> None:
        """Send one frame (or a multi-frame message) as is. zmq.Again when it cannot be queued."""
        if isinstance(frame, (bytes, bytearray, memoryview)):
            self._sock.send(frame)
        else:
            self._sock.send_multipart(frame)

    def recv(self, timeout_s: float) -> dict | None:
        """The next reply as a dict, or None when nothing arrives within timeout_s.

        A reply that is not a msgpack map comes back as {"type": None, "raw": frames}.
        """
        if not self._poller.poll(max(0, math.ceil(timeout_s * 1000))):
            return None
        frames = [f for f in self._sock.recv_multipart() if f]
        if len(frames) == 1:
            try:
                msg = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
            except Exception:
                msg = None
            if isinstance(msg, dict):
                return msg
        return {"type": None, "raw": frames}

    def close(self) -> None:
        """Close the socket and its context at once (LINGER 0: unsent frames are dropped)."""
        sock = getattr(self, "_sock", None)
        if sock is not None and not sock.closed:
            sock.close(0)
        ctx = getattr(self, "_ctx", None)
        if ctx is not None and not ctx.closed:
            ctx.term()

    def __enter__(self) -> "Producer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers -------------------------------------------------------------

    def _send(self, msg_or_frame: dict | bytes) -> None:
        frame = msg_or_frame if isinstance(msg_or_frame, bytes) else \
            msgpack.packb(msg_or_frame, use_bin_type=True)
        try:
            self._sock.send(frame)
        except zmq.Again:
            # nobody has taken our messages for timeout_s: treated like a missing reply
            raise _SendBlocked() from None

    def _wait_ours(self, request_id: str, deadline: float) -> dict | None:
        """The next reply for request_id (or an id-less error) before deadline, else None."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            msg = self.recv(left)
            if msg is None:
                return None
            rid = msg.get("request_id")
            if rid == request_id or (rid is None and msg.get("type") == "error"):
                return msg

    # -- results -------------------------------------------------------------

    def send_result(self, request_id: str, strategy_name: str, columns: dict, *,
                    metrics: dict | None = None, meta: dict | None = None,
                    progress: Callable[[int, int], None] | None = None) -> dict:
        """Send one backtest result and return the server's `stored` reply.

        Runs begin -> chunks within the credit window -> end (PROTOCOL.md
        section 1) and resumes on timeouts, busy/unavailable and
        unknown_request. `meta` may carry symbol, timeframe, rank, oos_kind
        (and metrics, used when `metrics` is None). `progress(acked_rows,
        total_rows)` is called whenever chunks are acknowledged. Chunks are
        encoded when sent, never all at once. Raises ValueError for bad input
        (nothing sent) and SendError when the server refuses or retries run out.
        """
        _check_id("request_id", request_id)
        if not isinstance(strategy_name, str) or not 1 <= len(strategy_name) <= 256:
            raise ValueError(f"strategy_name must be 1-256 characters, got {strategy_name!r:.300}")
        meta = dict(meta or {})
        if metrics is None:
            metrics = meta.get("metrics")
        if metrics is not None and not isinstance(metrics, dict):
            raise ValueError(f"metrics must be a map, got {type(metrics).__name__}")
        prepared, total_rows = prepare_columns(columns)
        ranges = _plan(prepared, total_rows, self.max_message_bytes, self.max_chunk_rows)
        begin: dict[str, Any] = {"type": "begin", "v": 1, "request_id": request_id,
                                 "strategy_name": strategy_name, "total_trades": total_rows,
                                 "total_chunks": len(ranges)}
        if metrics is not None:
            begin["metrics"] = metrics
        for key in ("symbol", "timeframe", "rank", "oos_kind"):
            v = meta.get(key)
            if v is None:
                continue
            typ = int if key == "timeframe" else str
            if not isinstance(v, typ) or isinstance(v, bool):
                raise ValueError(f"meta {key!r} must be {typ.__name__}, got {v!r}")
            begin[key] = v
        return _Session(self, request_id, begin, prepared, ranges, total_rows, progress).run()

    def send_live_trades(self, batch_id: str, columns: dict) -> dict:
        """Append live trades (one message, idempotent by batch_id); returns the `stored` reply.

        Columns as for results plus `strategy_name` (required), `pair_id` and
        `execution_mode`. The batch must fit in one frame (ValueError otherwise:
        split it into several batches). Resends on timeout and busy/unavailable.
        """
        _check_id("batch_id", batch_id)
        prepared, n = _prepare(columns, _LIVE_KIND, REQUIRED + ("strategy_name",))
        trades = {c: _encode_prepared(v, _LIVE_KIND[c], 0, n) for c, v in prepared.items()}
        frame = msgpack.packb({"type": "live_trades", "v": 1, "batch_id": batch_id,
                               "trades": trades}, use_bin_type=True)
        if len(frame) > self.max_message_bytes:
            raise ValueError(f"live_trades batch {batch_id} is {len(frame)} bytes, over "
                             f"max_message_bytes={self.max_message_bytes}; send smaller batches")
        strikes = 0
        while True:
            try:
                self._send(frame)
                reply = self._wait_ours(batch_id, time.monotonic() + self.timeout_s)
            except _SendBlocked:
                reply = None
            if reply is not None and reply.get("type") == "stored":
                return reply
            if reply is not None and reply.get("type") != "error":
                reply = None  # nothing else answers live_trades: as good as no answer
            code = "timeout" if reply is None else str(reply.get("code"))
            if reply is not None and code not in ("busy", "unavailable"):
                raise SendError(batch_id, code, str(reply.get("message", "")), reply)
            strikes += 1
            if strikes > self.retries:
                if reply is None:
                    raise SendError(batch_id, "timeout", f"no reply from {self.endpoint} in "
                                    f"{strikes} attempt(s) of {self.timeout_s:g}s each")
                raise SendError(batch_id, code, str(reply.get("message", "")), reply)
            log.warning("event=send_resume batch_id=%s reason=%s attempt=%d/%d",
                        batch_id, code, strikes, self.retries)
            if reply is not None:
                time.sleep(self._retry_after(reply))

    def _retry_after(self, reply: dict) -> float:
        try:
            v = float(reply.get("retry_after_s") or 0.0)
        except (TypeError, ValueError):
            v = 0.0
        return min(max(v, 0.01), self.MAX_RETRY_AFTER_S)


class _SendBlocked(Exception):
    """A send could not be queued within timeout_s."""


class _Session:
    """One send_result conversation: the state of seqs sent, acknowledged and to send."""

    def __init__(self, producer: Producer, request_id: str, begin: dict, prepared: dict,
                 ranges: list[tuple[int, int]], total_rows: int,
                 progress: Callable[[int, int], None] | None) -> None:
        self.p = producer
        self.rid = request_id
        self.begin = begin
        self.prepared = prepared
        self.ranges = ranges
        self.total_rows = total_rows
        self.progress = progress
        self.acked: set[int] = set()
        self.acked_rows = 0
        self.in_flight: set[int] = set()   # sent since the last window grant, not acked
        self.to_send: deque[int] = deque()
        self.window = 0                    # 0 while waiting for a window grant
        self.end_sent = False              # `end` sent since the latest begin
        self.ends = 0                      # `end`s sent in this conversation
        self.strikes = 0                   # consecutive resumes without progress
        self.incomplete_rounds = 0
        self.stats = {"request_id": request_id, "chunks": len(ranges), "chunks_sent": 0,
                      "begins": 0, "timeouts": 0, "busy_waits": 0, "max_unacked": 0,
                      "window": None, "elapsed_s": 0.0}
        producer.last_stats = self.stats

    # sending
    def send_begin(self) -> None:
        self.window = 0
        self.end_sent = False
        self.stats["begins"] += 1
        self.p._send(self.begin)

    def pump(self) -> None:
        """Send chunks while the window has room; send `end` when everything is acknowledged."""
        while self.window and len(self.in_flight) < self.window and self.to_send:
            seq = self.to_send.popleft()
            if seq in self.acked or seq in self.in_flight:
                continue
            start, stop = self.ranges[seq]
            self.p._send(_pack_chunk(self.rid, seq, self.prepared, start, stop))
            self.in_flight.add(seq)
            self.stats["chunks_sent"] += 1
            self.stats["max_unacked"] = max(self.stats["max_unacked"], len(self.in_flight))
        if self.window and not self.end_sent and len(self.acked) == len(self.ranges):
            self.end_sent = True
            self.ends += 1
            self.p._send({"type": "end", "v": 1, "request_id": self.rid})

    def ack(self, seq: Any) -> None:
        if not isinstance(seq, int) or not 0 <= seq < len(self.ranges):
            return
        self.in_flight.discard(seq)
        if seq not in self.acked:
            self.acked.add(seq)
            start, stop = self.ranges[seq]
            self.acked_rows += stop - start
            self.strikes = 0
            if self.progress is not None:
                self.progress(self.acked_rows, self.total_rows)

    def strike(self, code: str, reply: dict | None = None) -> None:
        """Count a resume without progress; SendError once there were more than `retries`."""
        self.strikes += 1
        if code == "timeout":
            self.stats["timeouts"] += 1
        elif code in ("busy", "unavailable"):
            self.stats["busy_waits"] += 1
        if self.strikes > self.p.retries:
            if reply is None:
                raise SendError(self.rid, "timeout",
                                f"no reply from {self.p.endpoint} in {self.strikes} attempt(s) "
                                f"of {self.p.timeout_s:g}s each")
            raise SendError(self.rid, code, str(reply.get("message", "")), reply)
        detail = ""
        if code == "timeout":
            detail = f" endpoint={self.p.endpoint} waited_s={self.p.timeout_s:g}"
        elif reply is not None and code in ("busy", "unavailable"):
            detail = f" retry_after_s={self.p._retry_after(reply):g}"
        log.warning("event=send_resume request_id=%s reason=%s attempt=%d/%d acked_chunks=%d/%d%s",
                    self.rid, code, self.strikes, self.p.retries, len(self.acked),
                    len(self.ranges), detail)

    def resume(self) -> None:
        """Ask for a fresh window; every not-yet-acknowledged seq goes out again."""
        self.in_flight.clear()
        self.to_send = deque(s for s in range(len(self.ranges)) if s not in self.acked)
        self.send_begin()

    def run(self) -> dict:
        t0 = time.monotonic()
        try:
            self._resume_blocking()
            return self._loop()
        except _SendBlocked:
            raise SendError(self.rid, "timeout", f"could not queue a message to {self.p.endpoint} "
                            f"for {self.p.timeout_s:g}s") from None
        finally:
            self.stats["elapsed_s"] = time.monotonic() - t0

    def _loop(self) -> dict:
        while True:
            try:
                msg = self.p._wait_ours(self.rid, time.monotonic() + self.p.timeout_s)
            except _SendBlocked:
                msg = None
            if msg is None:
                self.strike("timeout")
                self._resume_blocking()
                continue
            kind = msg.get("type")
            if kind == "stored":
                return msg
            if kind == "credit":
                if "seq" in msg:
                    self.ack(msg.get("seq"))
                else:
                    try:
                        self.window = max(1, int(msg.get("credit") or 1))
                    except (TypeError, ValueError):
                        self.window = 1
                    self.stats["window"] = self.window
                    self.in_flight.clear()  # credits granted before are void
                self._pump_blocking()
            elif kind == "incomplete" or (kind == "error" and msg.get("code") == "incomplete"):
                self._incomplete(msg)
            elif kind == "error":
                stored = self._error(msg)
                if stored is not None:
                    return stored
            # anything else (aborted, unknown types) is ignored

    def _pump_blocking(self) -> None:
        try:
            self.pump()
        except _SendBlocked:
            self.strike("timeout")
            self._resume_blocking()

    def _resume_blocking(self) -> None:
        while True:
            try:
                self.resume()
                return
            except _SendBlocked:
                self.strike("timeout")

    def _incomplete(self, msg: dict) -> None:
        missing = msg.get("missing")
        if not self.ends or not isinstance(missing, list) or not missing:
            raise SendError(self.rid, "incomplete", str(msg.get("message", "")), msg)
        self.incomplete_rounds += 1
        if self.incomplete_rounds > max(1, self.p.retries):
            raise SendError(self.rid, "incomplete",
                            f"server still misses seqs {missing[:10]} after "
                            f"{self.incomplete_rounds - 1} resends", msg)
        for seq in missing:
            if not isinstance(seq, int) or not 0 <= seq < len(self.ranges):
                continue
            if seq in self.acked:
                self.acked.discard(seq)
                start, stop = self.ranges[seq]
                self.acked_rows -= stop - start
            self.in_flight.discard(seq)
            self.to_send.append(seq)
        self.end_sent = False
        self._pump_blocking()

    def _error(self, msg: dict) -> dict | None:
        """Handle an error reply; returns a `stored` reply met on the way, else None."""
        code = str(msg.get("code"))
        if code in ("busy", "unavailable"):
            self.strike(code, msg)
            time.sleep(self.p._retry_after(msg))
            stored = self._drain_stale()
            if stored is not None:
                return stored
            self._resume_blocking()
        elif code == "unknown_request":
            if self.window == 0:
                return None  # a stale answer to a chunk sent before our latest begin
            self.strike(code, msg)
            # the server lost the request: everything must go again
            self.acked.clear()
            self.acked_rows = 0
            self._resume_blocking()
        else:
            raise SendError(self.rid, code, str(msg.get("message", "")), msg)
        return None

    def _drain_stale(self) -> dict | None:
        """Take in replies queued while we slept: acks count, further busy errors are stale."""
        while True:
            msg = self.p.recv(0)
            if msg is None:
                return None
            rid = msg.get("request_id")
            if rid != self.rid and not (rid is None and msg.get("type") == "error"):
                continue
            kind = msg.get("type")
            if kind == "credit" and "seq" in msg:
                self.ack(msg.get("seq"))
            elif kind == "stored":
                return msg
            elif kind == "error" and msg.get("code") not in ("busy", "unavailable", "unknown_request"):
                raise SendError(self.rid, str(msg.get("code")), str(msg.get("message", "")), msg)
