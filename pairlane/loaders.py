"""Reading a backtest result from a file for the producer (JSON, msgpack, CSV).

Owns: choosing the format (by extension, else by content), turning the
document's shapes (a list of trade maps, {"trades": ..., meta...}, bare
columns, msgpack bins, a CSV with a header row) into validated columns plus
the result's meta (strategy_name, metrics, symbol, timeframe, rank, oos_kind,
request_id).

Never does: send anything, guess at columns outside the contract's
vocabulary (pairlane.codec), or accept a bad value silently: every problem is
a ValueError naming the file and the line or row.
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Any

import msgpack
import numpy as np

from . import codec
from .columns import prepare_columns

__all__ = ["load_file"]

_KINDS = codec.COLUMN_KINDS
_META_TYPES = {"strategy_name": str, "request_id": str, "metrics": dict,
               "symbol": str, "timeframe": int, "rank": str, "oos_kind": str}


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
    return np.frombuffer(raw, dtype="<i8" if _KINDS.get(name) == "int" else "<f8")


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
            unknown = [h for h in header if h not in _KINDS]
            if unknown:
                raise ValueError(f"{path}: unknown column(s) in header: {', '.join(map(repr, unknown))}"
                                 f"; known columns: {', '.join(_KINDS)}")
            dup = {h for h in header if header.count(h) > 1}
            if dup:
                raise ValueError(f"{path}: duplicate column(s) in header: {', '.join(sorted(dup))}")
            missing = [c for c in codec.REQUIRED if c not in header]
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
    kind = _KINDS[name]
    if cell == "":
        if name in codec.REQUIRED:
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
                if f != f and name not in codec.REQUIRED:
                    return None
                if not f.is_integer():
                    raise ValueError from None
                return int(f)
        f = float(cell)
    except (ValueError, OverflowError):
        hint = " (timestamps are Unix seconds)" if name == "timestamp" else ""
        raise ValueError(f"{path}: line {line}: column {name!r}: bad number {cell!r}{hint}") from None
    if f != f:
        if name in codec.REQUIRED:
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
