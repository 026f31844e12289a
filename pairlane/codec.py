"""The ingest wire codec: frames in, validated messages out (PROTOCOL.md section 1).

Owns: the column vocabulary of the contract (names, kinds, which are required:
the one definition that the client, the S-expression reader and the store
use), decoding one frame (msgpack map), the field checks that make a message
`malformed` or `too_large`, the column checks that make a chunk a `bad_chunk`,
and turning validated columns into rows for SQLite. Pure functions, no I/O,
no Thespian. Never unpickles or evaluates anything.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from itertools import repeat

import msgpack
import numpy as np

REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
INT_COLS = ("timestamp", "hold_time", "timeframe")
FLOAT_COLS = ("pnl", "entry_price", "exit_price", "sl", "tp", "volume")
STR_COLS = ("symbol", "direction", "rank", "category", "regime", "oos_kind")
LIVE_STR_COLS = ("strategy_name", "pair_id", "execution_mode")
REQUIRED = ("timestamp", "pnl")
MAX_STR = 256
NUL = "\x00"   # no string may hold it: PostgreSQL text cannot, and a stored chunk must land on either store
# the one column vocabulary: chunk column -> kind ("int", "float", "str"), and live_trades' on top
COLUMN_KINDS = {**{c: "int" for c in INT_COLS}, **{c: "float" for c in FLOAT_COLS},
                **{c: "str" for c in STR_COLS}}
LIVE_COLUMN_KINDS = {**COLUMN_KINDS, **{c: "str" for c in LIVE_STR_COLS}}
TYPES = ("begin", "chunk", "end", "abort", "result", "live_trades")
META_STR = ("symbol", "rank", "oos_kind")
METRIC_KEYS = ("sharpe", "profit_factor", "win_rate", "max_dd", "trades")

# backtest_trade_logs column order used for inserts
TRADE_LOG_COLUMNS = ("request_id", "strategy_name", "seq", "timestamp", "pnl", "symbol", "direction",
                     "entry_price", "exit_price", "sl", "tp", "volume", "hold_time", "rank", "timeframe",
                     "category", "regime", "oos_kind")
LIVE_COLUMNS = ("timestamp", "strategy_name", "symbol", "direction", "category", "regime", "pnl",
                "hold_time", "pair_id", "execution_mode")


class ProtocolError(Exception):
    """An error reply: code and message per PROTOCOL.md section 1."""

    def __init__(self, code: str, message: str, request_id: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.retry_after_s = retry_after_s

    def reply(self) -> dict:
        r = {"type": "error", "request_id": self.request_id, "code": self.code, "message": self.message}
        if self.retry_after_s is not None:
            r["retry_after_s"] = float(self.retry_after_s)
        return r


def error_reply(code: str, message: str, request_id: str | None = None,
                retry_after_s: float | None = None) -> dict:
    return ProtocolError(code, message, request_id, retry_after_s).reply()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 1 << 20
    max_result_trades: int = 50_000_000
    max_chunk_rows: int = 32768


def _malformed(msg: str, rid=None) -> ProtocolError:
    return ProtocolError("malformed", msg, rid)


def _check_id(m: dict, key: str = "request_id") -> str:
    rid = m.get(key)
    if not isinstance(rid, str) or not REQUEST_ID_RE.fullmatch(rid):
        raise _malformed(f"{key} must be 1-128 characters of [A-Za-z0-9._:-]",
                         None if not isinstance(rid, str) else rid[:128])
    return rid


def _check_begin_fields(m: dict, rid: str, limits: Limits, is_result: bool) -> None:
    tt = m.get("total_trades")
    if _is_int(tt) and tt > limits.max_result_trades:
        raise ProtocolError("too_large", f"total_trades {tt} exceeds the cap of "
                            f"{limits.max_result_trades} (gateway.max_result_trades)", rid)
    name = m.get("strategy_name")
    if not isinstance(name, str) or not 1 <= len(name) <= 256 or NUL in name:
        raise _malformed("strategy_name must be a string of 1-256 characters without NUL", rid)
    if not _is_int(tt) or tt < 0:
        raise _malformed("total_trades must be an integer >= 0", rid)
    tc = m.get("total_chunks", None if is_result else "missing")
    if is_result:
        if tc is not None and tc != 1:
            raise _malformed("a result message has total_chunks absent or 1", rid)
    else:
        if not _is_int(tc) or tc < 1:
            raise _malformed("total_chunks must be an integer >= 1", rid)
        if tc > max(1, tt):
            raise _malformed(f"total_chunks {tc} exceeds total_trades {tt} (at most one chunk per trade, "
                             "or one empty chunk when there are no trades)", rid)
    metrics = m.get("metrics")
    if metrics is not None:
        if not isinstance(metrics, dict):
            raise _malformed("metrics must be a map", rid)
        for k in METRIC_KEYS:
            v = metrics.get(k)
            if v is not None and (not _is_num(v) or (isinstance(v, float) and not math.isfinite(v))):
                raise _malformed(f"metrics.{k} must be a finite number", rid)
    for k in META_STR:
        v = m.get(k)
        if v is not None and (not isinstance(v, str) or len(v) > MAX_STR or NUL in v):
            raise _malformed(f"{k} must be a string of at most {MAX_STR} characters without NUL", rid)
    tf = m.get("timeframe")
    if tf is not None and not _is_int(tf):
        raise _malformed("timeframe must be an integer", rid)


def _check_trades_shape(m: dict, rid, live: bool = False) -> dict:
    trades = m.get("trades")
    if not isinstance(trades, dict) or not all(isinstance(k, str) for k in trades):
        raise _malformed("trades must be a map of column name -> values", rid)
    for col in REQUIRED + (("strategy_name",) if live else ()):
        if col not in trades:
            raise _malformed(f"trades has no '{col}' column", rid)
    return trades


def decode_frame(frames: list[bytes], limits: Limits) -> dict:
    """One ZMQ message (list of frames) -> a validated message map, or ProtocolError.

    Checks, in PROTOCOL order: too_large (frame size; totals over caps), then
    malformed (everything structural). Column contents are checked later by
    `check_columns` (bad_chunk comes after unknown_request).
    """
    if len(frames) != 1:
        raise _malformed(f"a message is exactly one frame (got {len(frames)})")
    frame = frames[0]
    if len(frame) > limits.max_message_bytes:
        rid = None
        try:
            m = msgpack.unpackb(frame, raw=False, strict_map_key=False)
            if isinstance(m, dict) and isinstance(m.get("request_id"), str):
                rid = m["request_id"][:128]
        except Exception:
            pass
        raise ProtocolError("too_large", f"frame of {len(frame)} bytes exceeds gateway.max_message_bytes "
                            f"= {limits.max_message_bytes}; send the result in smaller chunks", rid)
    try:
        m = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:
        raise _malformed(f"frame is not valid msgpack ({type(exc).__name__})")
    if not isinstance(m, dict):
        raise _malformed("frame must hold one msgpack map")
    t = m.get("type")
    rid_raw = m.get("request_id") if isinstance(m.get("request_id"), str) else None
    if t not in TYPES:
        raise _malformed(f"unknown type {t!r}; expected one of {', '.join(TYPES)}",
                         rid_raw[:128] if rid_raw else None)
    v = m.get("v")
    if v is not None and v != 1:
        raise _malformed(f"unsupported protocol version {v!r} (this is v1)", rid_raw)
    if t == "live_trades":
        _check_id(m, "batch_id")
        _check_trades_shape(m, m["batch_id"], live=True)
        m["request_id"] = m["batch_id"]
        return m
    rid = _check_id(m)
    if t in ("begin", "result"):
        _check_begin_fields(m, rid, limits, t == "result")
        if t == "result":
            _check_trades_shape(m, rid)
            m["total_chunks"] = 1
    elif t == "chunk":
        if not _is_int(m.get("seq")) or m["seq"] < 0:
            raise _malformed("seq must be an integer >= 0", rid)
        _check_trades_shape(m, rid)
    return m


def _numeric_values(name: str, values, kind: str, nullable: bool, rid) -> np.ndarray | list:
    dtype = "<i8" if kind == "int" else "<f8"
    if isinstance(values, (bytes, bytearray)):
        if len(values) % 8:
            raise ProtocolError("bad_chunk", f"column '{name}': bin length {len(values)} is not a multiple of 8", rid)
        arr = np.frombuffer(values, dtype=dtype)
        if kind == "float" and arr.size and not np.isfinite(arr).all():
            raise ProtocolError("bad_chunk", f"column '{name}': NaN or infinity", rid)
        return arr
    if not isinstance(values, list):
        raise ProtocolError("bad_chunk", f"column '{name}' must be a list or a bin", rid)
    types = set(map(type, values))
    allowed = {int} if kind == "int" else {int, float}
    if nullable:
        allowed = allowed | {type(None)}
    bad = types - allowed
    if bad:
        names = ", ".join(sorted(t.__name__ for t in bad))
        raise ProtocolError("bad_chunk", f"column '{name}': values of type {names} "
                            f"(expected {'integers' if kind == 'int' else 'numbers'}"
                            f"{' or nil' if nullable else ''})", rid)
    if kind == "float" and float in types:
        for x in values:
            if x is not None and isinstance(x, float) and not math.isfinite(x):
                raise ProtocolError("bad_chunk", f"column '{name}': NaN or infinity", rid)
    if kind == "int":
        lim = 1 << 63
        for x in values:
            if x is not None and not -lim <= x < lim:
                raise ProtocolError("bad_chunk", f"column '{name}': integer out of int64 range", rid)
    return values


def check_columns(trades: dict, rid: str | None = None, live: bool = False) -> int:
    """Validate chunk columns; returns the row count or raises ProtocolError('bad_chunk')."""
    n = None
    allowed_str = STR_COLS + (LIVE_STR_COLS if live else ())
    for name, values in trades.items():
        if name in INT_COLS:
            vals = _numeric_values(name, values, "int", name != "timestamp", rid)
        elif name in FLOAT_COLS:
            vals = _numeric_values(name, values, "float", name != "pnl", rid)
        elif name in allowed_str:
            if not isinstance(values, list):
                raise ProtocolError("bad_chunk", f"column '{name}' must be a list of strings or nil", rid)
            required = live and name == "strategy_name"
            for x in values:
                if x is None and not required:
                    continue
                if not isinstance(x, str) or len(x) > MAX_STR or (required and not x) or NUL in x:
                    raise ProtocolError("bad_chunk", f"column '{name}': values must be strings of at most "
                                        f"{MAX_STR} characters without NUL{'' if required else ', or nil'}",
                                        rid)
            vals = values
        else:
            raise ProtocolError("bad_chunk", f"unknown column '{name}'", rid)
        if n is None:
            n = len(vals)
        elif len(vals) != n:
            raise ProtocolError("bad_chunk", f"columns of unequal length ('{name}' has {len(vals)}, "
                                f"expected {n})", rid)
    return n or 0


def _as_list(name: str, values) -> list:
    if isinstance(values, (bytes, bytearray)):
        return np.frombuffer(values, dtype="<i8" if name in INT_COLS else "<f8").tolist()
    return values


def trade_log_rows(trades: dict, request_id: str, strategy_name: str, seq: int, n: int):
    """(columns, rows) for backtest_trade_logs: the key columns plus only the trade columns the chunk
    carries (TRADE_LOG_COLUMNS order; absent ones stay NULL), the rows an iterator of tuples. Binding
    only what is there makes swimmy's two-column trades about 2.5x cheaper to insert than 18 columns."""
    names = ["request_id", "strategy_name", "seq"]
    cols = [repeat(request_id, n), repeat(strategy_name, n), repeat(seq, n)]
    for name in TRADE_LOG_COLUMNS[3:]:
        if name in trades:
            names.append(name)
            cols.append(_as_list(name, trades[name]))
    return tuple(names), zip(*cols)


def live_rows(trades: dict, batch_id: str, n: int):
    """Rows for trade_logs (LIVE_COLUMNS + batch_id)."""
    cols = [(_as_list(c, trades[c]) if c in trades else repeat(None, n)) for c in LIVE_COLUMNS]
    cols.append(repeat(batch_id, n))
    return zip(*cols)


def decode_chunk_payload(raw: bytes) -> dict:
    """The trades map of a chunk/result/live_trades frame that already passed the gateway's checks."""
    return msgpack.unpackb(raw, raw=False, strict_map_key=False)["trades"]


def pack(m: dict) -> bytes:
    return msgpack.packb(m, use_bin_type=True)
