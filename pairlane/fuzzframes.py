"""Hostile frames for the fuzz run: valid protocol messages, then mutated the way a broken or
malicious producer would (hypothesis-style: shrink, swap types, blow up sizes), and garbage.

Owns: making a valid begin/chunk/end/abort/result/live_trades map for a request id
(`valid_message`), the named mutations of PROTOCOL.md section 1 frames (field dropped, wrong
type, huge declared sizes, bad seq, bad columns, bad id, deep nesting, type swapped, and on the
packed bytes truncate, extend, flip, multi-frame, non-map, oversize, garbage), which of them
must be answered with an error whatever the daemon's state (`MUST_FAIL`), and mutations of
legacy S-expressions. Every function takes its `random.Random`: the same seed gives the same
frames.

Never does: sockets, the clock, or deciding what the daemon answered (entry/fuzz.py does).
"""
from __future__ import annotations

import math
import random
import struct

import msgpack

# a mutation that, applied to any valid frame, leaves a frame the contract must answer with an error
MUST_FAIL = frozenset({"truncate", "extend", "multi_frame", "non_map", "oversize", "garbage", "bad_id",
                       "deep_nest", "drop_type"})
MAP_MUTATIONS = ("drop_field", "drop_type", "wrong_type", "huge_size", "bad_seq", "bad_columns", "bad_id",
                 "deep_nest", "type_swap", "extra_key")
BYTE_MUTATIONS = ("truncate", "extend", "flip", "multi_frame", "non_map", "oversize", "garbage")
KINDS = ("begin", "chunk", "end", "abort", "result", "live_trades")

_ODD_VALUES = (0, -1, 1.5, float("nan"), float("inf"), "", "x" * 300, None, True, [], {}, [1, "a"], {"a": 1},
               b"\x00\x01", 2 ** 64 - 1, -(2 ** 63), "0")
_HUGE = (10 ** 12, 2 ** 63 - 1, 2 ** 64 - 1, -(2 ** 63), 10 ** 9, 1 << 40)


def _trades(rng: random.Random, n: int, live: bool = False) -> dict:
    cols: dict = {"timestamp": [1_700_000_000 + 60 * i for i in range(n)],
                  "pnl": [round(rng.gauss(0.0, 1.0), 2) for _ in range(n)]}
    if rng.random() < 0.5:
        cols["symbol"] = [rng.choice(("USDJPY", "EURUSD")) for _ in range(n)]
    if rng.random() < 0.3:
        cols["volume"] = struct.pack(f"<{n}d", *([0.1] * n))  # a numeric column as a bin
    if live:
        cols["strategy_name"] = ["fz-live"] * n
    return cols


def valid_message(rng: random.Random, rid: str, kind: str | None = None) -> dict:
    """A valid message of `kind` (random when None) for request (or batch) id `rid`."""
    kind = kind or rng.choice(KINDS)
    n = rng.randint(0, 20)
    if kind in ("begin", "result"):
        m = {"type": kind, "v": 1, "request_id": rid, "strategy_name": f"fz-{rng.randint(0, 9)}",
             "total_trades": n if kind == "result" else 2 * max(1, n), "total_chunks": 1 if kind == "result" else 2}
        if rng.random() < 0.5:
            m["metrics"] = {"sharpe": 0.5, "profit_factor": 1.2, "win_rate": 0.5, "max_dd": 0.1, "trades": n}
        if rng.random() < 0.5:
            m.update(symbol="USDJPY", timeframe=60, rank="A", oos_kind="wfv")
        if kind == "result":
            m["trades"] = _trades(rng, n)
        return m
    if kind == "chunk":
        return {"type": "chunk", "request_id": rid, "seq": rng.randint(0, 1), "trades": _trades(rng, n)}
    if kind == "live_trades":
        return {"type": "live_trades", "v": 1, "batch_id": rid, "trades": _trades(rng, max(1, n), live=True)}
    return {"type": kind, "request_id": rid}


def _id_key(m: dict) -> str:
    return "batch_id" if m.get("type") == "live_trades" else "request_id"


def mutate_map(rng: random.Random, m: dict, how: str) -> dict:
    """A copy of m with one structural mutation `how` (one of MAP_MUTATIONS)."""
    m = dict(m)
    if how == "drop_field":
        if m:
            del m[rng.choice(sorted(m))]
    elif how == "drop_type":
        m.pop("type", None)
    elif how == "wrong_type":
        key = rng.choice(sorted(m))
        old = m[key]
        choices = [v for v in _ODD_VALUES if type(v) is not type(old)]
        m[key] = rng.choice(choices)
    elif how == "huge_size":
        for key in ("total_trades", "total_chunks", "seq"):
            if key in m or rng.random() < 0.3:
                m[key] = rng.choice(_HUGE)
    elif how == "bad_seq":
        m["seq"] = rng.choice((-1, 2, 3, 10 ** 9, 2 ** 64 - 1, 1.0, "0", None, [0]))
    elif how == "bad_columns":
        trades = dict(m.get("trades") or {"timestamp": [1], "pnl": [1.0]})
        trick = rng.choice(("unequal", "unknown", "bin7", "nan", "bool", "nested", "missing_pnl", "not_map"))
        if trick == "unequal":
            trades["pnl"] = list(trades.get("pnl", [])) + [1.0]
        elif trick == "unknown":
            trades["no_such_column"] = [1] * len(trades.get("pnl", []))
        elif trick == "bin7":
            trades["pnl"] = b"\x00" * 7
        elif trick == "nan":
            trades["pnl"] = [rng.choice((float("nan"), float("inf"), -math.inf))] * max(1, len(trades.get("pnl", [])))
            trades["timestamp"] = [1] * len(trades["pnl"])
        elif trick == "bool":
            trades["pnl"] = [True] * len(trades.get("pnl", []))
        elif trick == "nested":
            trades["pnl"] = [[1.0]] * len(trades.get("pnl", []))
        elif trick == "missing_pnl":
            trades.pop("pnl", None)
        else:
            trades = rng.choice(([], "trades", 7, None))
        m["trades"] = trades
        m.setdefault("type", "chunk")
    elif how == "bad_id":
        m[_id_key(m)] = rng.choice(("", "x" * 129, "bad id!", "caf\u00e9", "a/b", 7, None, b"rid", ["r"]))
    elif how == "deep_nest":
        m[_id_key(m)] = DEEP  # packed as arrays nested rng-deep by pack_map
    elif how == "type_swap":
        m["type"] = rng.choice([k for k in KINDS if k != m.get("type")] + ["", "BEGIN", "x" * 50])
    elif how == "extra_key":
        m[rng.choice(("zz", "trace", "x" * 40))] = rng.choice(_ODD_VALUES)
    else:
        raise ValueError(f"unknown map mutation {how!r}")
    return m


DEEP = "\x00deep\x00"  # placeholder for a value nested deeper than msgpack's packer allows


def _pack(obj, depth: int = 2000) -> bytes:
    """msgpack of obj; a DEEP value becomes `depth` nested one-element arrays around nil (written
    by hand: the packer itself refuses such depth, an unpacker must cope)."""
    packed = msgpack.packb(obj, use_bin_type=True)
    marker = msgpack.packb(DEEP, use_bin_type=True)
    return packed.replace(marker, b"\x91" * depth + b"\xc0") if marker in packed else packed


def mutate_bytes(rng: random.Random, packed: bytes, how: str, max_message_bytes: int) -> list[bytes]:
    """Frames (usually one) from the valid packed frame with byte mutation `how` (BYTE_MUTATIONS)."""
    if how == "truncate":
        return [packed[:rng.randrange(len(packed))]]
    if how == "extend":
        return [packed + rng.randbytes(rng.randint(1, 64))]
    if how == "flip":
        b = bytearray(packed)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return [bytes(b)]
    if how == "multi_frame":
        return [packed] * rng.randint(2, 4)
    if how == "non_map":
        return [_pack(rng.choice(([1, 2, 3], 7, "begin", None, 1.5, b"\x81", [packed])))]
    if how == "oversize":
        return [packed + b"\x00" * rng.randint(max_message_bytes, 2 * max_message_bytes)]
    if how == "garbage":
        return [rng.randbytes(rng.randint(0, 512))]
    raise ValueError(f"unknown byte mutation {how!r}")


def fuzz_frame(rng: random.Random, rid: str, max_message_bytes: int = 1 << 20,
               oversize_share: float = 0.01) -> tuple[str, list[bytes]]:
    """(mutation name, frames) for one hostile message built on a valid message for `rid`."""
    base = valid_message(rng, rid)
    if rng.random() < 0.55:
        how = rng.choice(MAP_MUTATIONS)
        return how, [_pack(mutate_map(rng, base, how), rng.randint(600, 5000))]
    how = rng.choice(BYTE_MUTATIONS)
    if how == "oversize" and rng.random() > oversize_share * len(BYTE_MUTATIONS):
        how = "truncate"
    return how, mutate_bytes(rng, _pack(base), how, max_message_bytes)


def legacy_mutation(rng: random.Random, valid: bytes) -> tuple[str, bytes]:
    """(mutation name, S-expression bytes) built on a valid legacy message."""
    how = rng.choice(("truncate", "flip", "extend", "deep_parens", "unbalanced", "not_utf8", "garbage"))
    if how == "truncate":
        return how, valid[:rng.randrange(len(valid))]
    if how == "flip":
        b = bytearray(valid)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return how, bytes(b)
    if how == "extend":
        return how, valid + b" " + rng.choice((b"(", b")", b"((x . 1)", b'"', b"#t"))
    if how == "deep_parens":
        depth = rng.randint(1000, 20000)
        return how, b"(" * depth + b"x" + b")" * depth
    if how == "unbalanced":
        return how, valid.replace(b")", b"", rng.randint(1, 5))
    if how == "not_utf8":
        return how, valid[:20] + b"\xff\xfe" + valid[20:]
    return how, rng.randbytes(rng.randint(0, 2048))
