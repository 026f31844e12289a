"""Validation and preparation of result columns on the producer side (PROTOCOL.md section 1).

Owns: checking columnar input (a dict of column name -> list, tuple, numpy or
pandas values, all of one length) against the contract's column vocabulary
(pairlane.codec) before anything is sent, and normalising it for encoding:
numeric columns without missing values become little-endian numpy arrays,
numeric columns with missing values lists of Python numbers and None, string
columns lists. Also the request_id/batch_id check.

Never does: I/O, encoding frames, talking to the server. Every problem is a
ValueError naming the column and the row (rows count from 0). Numeric values
must be finite numbers (booleans are not numbers); an optional numeric
column may hold None, and NaN there also means "missing".
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from . import codec

__all__ = ["prepare_columns", "prepare_live_columns", "check_id", "first_true"]

_INT64_MAX = 2**63 - 1


def check_id(what: str, value: Any) -> None:
    """ValueError unless `value` is a valid request_id / batch_id (1-128 of [A-Za-z0-9._:-])."""
    if not isinstance(value, str) or not codec.REQUEST_ID_RE.fullmatch(value):
        raise ValueError(f"{what} must be 1-128 characters of [A-Za-z0-9._:-], got {value!r}")


def _bad(name: str, row: int | None, problem: str) -> ValueError:
    where = f"column {name!r}" + (f" row {row}" if row is not None else "")
    return ValueError(f"{where}: {problem}")


def first_true(mask: np.ndarray) -> int:
    """Index of the first True in a boolean array (which has one)."""
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
                raise _bad(name, first_true(nan), "NaN is not allowed in a required column")
            if (~finite & ~nan).any():
                raise _bad(name, first_true(~finite & ~nan), "infinity is not allowed")
            return _numeric_list(name, arr.tolist(), kind, required)  # NaN -> None
        if kind == "float":
            return arr.astype("<f8", copy=False)
        whole = arr == np.floor(arr)
        if not whole.all():
            i = first_true(~whole)
            raise _bad(name, i, f"expected a whole number, got {arr[i]!r}")
        if (np.abs(arr) >= 2.0**63).any():
            raise _bad(name, first_true(np.abs(arr) >= 2.0**63), "does not fit in int64")
        return arr.astype("<i8")
    if kind == "float":
        return arr.astype("<f8")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > _INT64_MAX:
        raise _bad(name, first_true(arr > _INT64_MAX), "does not fit in int64")
    return arr.astype("<i8", copy=False)


def _prepare_strings(name: str, values: Any, required: bool) -> list:
    seq = values.tolist() if isinstance(values, np.ndarray) else list(values)
    types = set(map(type, seq))
    # fast path (C-level passes): only strings, none too long, none empty where required, no NUL
    if types <= {str} and (not seq or (max(map(len, seq)) <= codec.MAX_STR and (not required or min(map(len, seq)) > 0)
                                       and codec.NUL not in "".join(seq))):
        return seq
    for i, v in enumerate(seq):  # slow path: find the first offending row for the message
        if v is None:
            if required:
                raise _bad(name, i, "missing value (this column is required)")
        elif not isinstance(v, str):
            raise _bad(name, i, f"expected a string or None, got {type(v).__name__} {v!r:.40}")
        elif len(v) > codec.MAX_STR or (required and not v):
            raise _bad(name, i, f"strings must be {'1' if required else '0'}-{codec.MAX_STR} characters, "
                                f"got {len(v)}")
        elif codec.NUL in v:
            raise _bad(name, i, "strings must not contain NUL (U+0000)")
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
    return _prepare(columns, codec.COLUMN_KINDS, codec.REQUIRED)


def prepare_live_columns(columns: dict) -> tuple[dict[str, np.ndarray | list], int]:
    """As prepare_columns, for live_trades: chunk columns plus strategy_name (required),
    pair_id and execution_mode."""
    return _prepare(columns, codec.LIVE_COLUMN_KINDS, codec.REQUIRED + ("strategy_name",))
