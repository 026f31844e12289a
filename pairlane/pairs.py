"""Pair-Composite evaluation (PROTOCOL.md section 5), as pure logic.

This module owns the whole decision of which strategy pairs fill the slots:
the candidate pool (latest result per strategy, rank and top-N filters,
exclusion reasons), the bucketed PnL series, the union-aligned Pearson
correlation with its rescue band, inverse-volatility weights, the composite
Sharpe / profit factor / score, the ranking, and ``pair_id``. It also owns the
read-only SQL that loads candidates from the store.

It never writes to the database (no INSERT/UPDATE/DDL: ``pair_slots`` is
written by the writer actor), never opens sockets, never touches Thespian,
never reads the clock except in ``bench``, and keeps no state between calls.

Semantics follow swimmy's school-pair-composite-*.lisp; choices where the
contract is silent:

* Strategies are identified by name; if ``evaluate`` is given the same name
  twice the last one wins. Any status other than ``complete`` counts as
  ``missing``.
* Rank: ``None`` means "carries no rank" and is eligible; otherwise the rank
  is compared case-insensitively, ignoring a leading ``:`` (Lisp keywords).
* Top-N groups are ``symbol|timeframe`` with ``None`` read as ``""`` / ``0``
  (as swimmy); order is sharpe descending (``None``/NaN read as 0.0, as
  swimmy), then name ascending.
* Window: the last ``window_trades`` trades by timestamp, stable, i.e. equal
  timestamps keep their input order (``load_candidates`` delivers rows
  ordered by seq, timestamp, pnl).
* Zero variance: a bucketed series whose values all lie within 1e-12 of its
  largest magnitude of each other, i.e. equal but for the rounding of their
  sums (0.89 + 0.5 - 0.94 is not 0.45 in floating point, summed in one order,
  and is in another), and an empty one (possible when ``min_trades`` is 0).
  PnLs are assumed finite (ingest rejects NaN and infinities).
* Weights are ``1/sd`` normalised, as swimmy's ``inverse-vol-weights``: a side
  whose aligned sd is 0 gets weight 0 (the other side gets 1), both 0 gives
  0.5/0.5. Zero-variance strategies are excluded before pairing, so inside
  ``evaluate`` both sds are always positive.
* A composite bucket whose value cancels to within 1e-12 of the magnitude of
  its two weighted parts counts as exactly 0 (neither gain nor loss), so that
  rounding noise cannot turn "no losses" (PF 0) into a huge PF. A composite
  whose variance is below 1e-12 of ``wa^2 var_a + wb^2 var_b`` is flat
  (Sharpe 0).
* ``Evaluation.candidates`` counts strategies that passed every check;
  ``candidates + sum(excluded.values())`` is the number of strategies seen.
  ``excluded`` always holds all five reasons.

Performance: per-pair sums over union-aligned, zero-filled series are matrix
products over the buckets two strategies share (dense BLAS for buckets shared
by many strategies, enumeration for buckets shared by few), computed for the
pairs i < j only, in blocks of about 2**20 pairs (the first one small), so
memory stays near O(n * buckets + 2**20) rather than O(n**2) whatever n.
Correlation, weights and Sharpe of every pair come from those moments,
broadcast over the 2-D block. The profit factor needs per-bucket signs; it is
computed exactly only for pairs whose score upper bound can still reach the
current top ``max_pairs``: Sharpe is exact, and PF = (T + D) / (T - D) for the
composite sum D > 0 is bounded through lower bounds of T = sum|p|:
sum p^2 / max|p|, and wa L1_a + wb L1_b - 2 sqrt(wa wb) sum_shared sqrt|a b|
(from |a + b| >= |a| + |b| - 2 min(|a|, |b|); tight when few buckets are
shared; one more matrix product), and, when a block still leaves many pairs,
Hoelder's sum|p| >= (sum p^2)^1.5 / (sum p^4)^0.5 (three more products).

Past the first blocks (once the rescue band is settled and the threshold is
above 0.3), pairs are screened in cache-sized tiles without their cross
products C: float32 products give the union size (exact: small integers) and E
(inflated by its rounding bound), and Sharpe is bounded through corr >=
-corr_max, all in float64 arithmetic with margins, so the screen passes every
pair the block path would evaluate; the few that pass (about 1 in 3,000 at
10,000 strategies) get their sums gathered exactly and go the block path's way.
Matrix products run on the calling thread only (``_one_blas_thread``).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import math
import os
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

import numpy as np
from numpy.typing import ArrayLike

from .vocab import ResultStatus

__all__ = [
    "REASONS",
    "Candidate",
    "Evaluation",
    "PairsConfig",
    "Slot",
    "align",
    "bench",
    "bucket_series",
    "composite_metrics",
    "evaluate",
    "inverse_vol_weights",
    "load_candidates",
    "pair_id",
    "pearson",
]

REASONS: tuple[str, ...] = ("missing", "rank", "not_top_n", "too_few_trades", "zero_variance")

SECONDS_PER_DAY = 86400
SHARPE_WEIGHT = 0.7
PF_WEIGHT = 0.3

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK64 = 0xFFFFFFFFFFFFFFFF

_FLAT_REL = 1e-12  # composite bucket / variance treated as exactly flat below this
_BOUND_SLACK = 1e-6  # relative slack on the PF bound (keeps pruning exact under rounding)
_BLOCK_ELEMS = 1 << 20  # pairs per block (rows * columns): bounds the memory of one block
_BATCH_ELEMS = 1 << 20  # exact-PF batch size target (pairs * series length)
_FIRST_BLOCK_ELEMS = 1 << 13  # pairs in the first block
_HOLDER_MIN = 1 << 14  # a block leaving at least this many pairs gets the Hoelder bound
_DENSE_MIN_SHARE = 64  # a bucket shared by at least this many strategies goes to BLAS
_TILE_ROWS = 128  # screened tiles (after the first blocks): rows x columns, cache-sized
_TILE_COLS = 256
_FLUSH_PAIRS = 256  # screened pairs evaluated exactly as soon as this many have passed
_SCREEN_CORR_MAX = 0.9  # above this corr_max the screen's Sharpe bound is too loose: blocks only


# --------------------------------------------------------------------------- ids


def pair_id(a: str, b: str) -> str:
    """FNV-1a 64 of ``"<smaller>|<larger>"`` (UTF-8), 16 lowercase hex digits."""
    lo, hi = (a, b) if a <= b else (b, a)
    h = _FNV_OFFSET
    for byte in f"{lo}|{hi}".encode("utf-8"):
        h = ((h ^ byte) * _FNV_PRIME) & _MASK64
    return f"{h:016x}"


# ------------------------------------------------------------------------ config


@dataclass(frozen=True)
class PairsConfig:
    ranks: tuple[str, ...] = ("A", "S")
    per_group: int = 50
    min_trades: int = 100
    window_trades: int = 100
    bucket: str = "day"  # "day" (UTC day) or "exact" (timestamp)
    corr_max: float = 0.2
    rescue_corr_max: float = 0.3
    max_pairs: int = 5

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", tuple(self.ranks))
        if self.bucket not in ("day", "exact"):
            raise ValueError(f"pairs.bucket: must be 'day' or 'exact', got {self.bucket!r}")
        for key, low in (("per_group", 0), ("min_trades", 0), ("window_trades", 1), ("max_pairs", 0)):
            if getattr(self, key) < low:
                raise ValueError(f"pairs.{key}: must be >= {low}")
        for key in ("corr_max", "rescue_corr_max"):
            v = getattr(self, key)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"pairs.{key}: must be a finite number >= 0")

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> PairsConfig:
        """Build from the ``[pairs]`` table; ``interval_s`` is ignored (it
        belongs to the actor). Unknown keys and wrong types raise ValueError
        naming ``pairs.<key>``."""
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in m.items():
            if key == "interval_s":
                continue
            if key not in known:
                raise ValueError(f"pairs.{key}: unknown key")
            if key == "ranks":
                if not isinstance(value, (list, tuple)) or not all(isinstance(r, str) for r in value):
                    raise ValueError("pairs.ranks: must be a list of strings")
                value = tuple(value)
            elif key == "bucket":
                if not isinstance(value, str):
                    raise ValueError("pairs.bucket: must be a string")
            elif key in ("per_group", "min_trades", "window_trades", "max_pairs"):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"pairs.{key}: must be an integer")
            else:  # corr_max, rescue_corr_max
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"pairs.{key}: must be a number")
                value = float(value)
            kwargs[key] = value
        return cls(**kwargs)


# ----------------------------------------------------------------- data classes


@dataclass
class Candidate:
    """One strategy's latest result."""

    name: str
    status: str  # a ResultStatus: complete, failed or abandoned
    sharpe: float | None = None
    rank: str | None = None
    symbol: str | None = None
    timeframe: int | None = None
    timestamps: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # int64 Unix s
    pnls: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))
    # Row count of the result when timestamps/pnls hold only its last trades
    # (load_candidates with window_trades); None means len(timestamps).
    n_trades: int | None = None

    def __post_init__(self) -> None:
        self.timestamps = np.asarray(self.timestamps, dtype=np.int64).reshape(-1)
        self.pnls = np.asarray(self.pnls, dtype=np.float64).reshape(-1)
        if self.timestamps.shape != self.pnls.shape:
            raise ValueError(f"{self.name}: timestamps and pnls differ in length")

    @property
    def trade_count(self) -> int:
        return len(self.timestamps) if self.n_trades is None else int(self.n_trades)


@dataclass
class Slot:
    pair_id: str
    strategy_a: str  # strategy_a < strategy_b
    strategy_b: str
    weight_a: float
    weight_b: float
    corr: float
    sharpe: float
    profit_factor: float
    score: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Evaluation:
    slots: list[Slot]
    candidates: int  # strategies that passed every check and entered pairing
    excluded: dict[str, int]  # reason -> count, all of REASONS present
    safe_stop: bool  # True when no slot is filled

    def as_dict(self) -> dict[str, Any]:
        return {
            "slots": [s.as_dict() for s in self.slots],
            "candidates": self.candidates,
            "excluded": dict(self.excluded),
            "safe_stop": self.safe_stop,
        }


# ---------------------------------------------------- scalar reference helpers


def bucket_series(
    timestamps: ArrayLike, pnls: ArrayLike, window_trades: int, bucket: str = "day"
) -> tuple[np.ndarray, np.ndarray]:
    """Last ``window_trades`` trades by timestamp (stable), PnL summed per
    bucket. Returns (bucket keys ascending int64, sums float64)."""
    ts = np.asarray(timestamps, dtype=np.int64)
    pn = np.asarray(pnls, dtype=np.float64)
    if ts.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.float64)
    order = np.argsort(ts, kind="stable")[-window_trades:]
    t = ts[order]
    p = pn[order]
    keys = t // SECONDS_PER_DAY if bucket == "day" else t
    starts = np.concatenate(([0], np.flatnonzero(keys[1:] != keys[:-1]) + 1))
    return keys[starts], np.add.reduceat(p, starts)


def _each_ascending(ts: np.ndarray, cid: np.ndarray) -> bool:
    """Whether the timestamps are ascending within each candidate (cid ascending)."""
    return bool(((ts[1:] >= ts[:-1]) | (cid[1:] != cid[:-1])).all())


def _bucket_all(cands: list[Candidate], window_trades: int, bucket: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """``bucket_series`` of every candidate, in one pass over all their trades (same
    order of additions, so the same sums)."""
    lens = np.fromiter((c.timestamps.size for c in cands), dtype=np.int64, count=len(cands))
    total = int(lens.sum())
    if total == 0:
        return [(np.empty(0, np.int64), np.empty(0, np.float64)) for _ in cands]
    ts = np.concatenate([c.timestamps for c in cands])
    pn = np.concatenate([c.pnls for c in cands])
    cid = np.repeat(np.arange(len(cands), dtype=np.int64), lens)
    if _each_ascending(ts, cid):
        order = np.arange(total)  # loaded and synthetic trades come in timestamp order
    else:
        order = np.lexsort((ts, cid))  # by candidate, then timestamp; stable, as bucket_series
    keep = np.cumsum(lens)[cid] - np.arange(total) <= window_trades  # each one's last trades
    order, cid = order[keep], cid[keep]
    t, p = ts[order], pn[order]
    keys = t // SECONDS_PER_DAY if bucket == "day" else t
    new = np.ones(keys.size, dtype=bool)
    new[1:] = (keys[1:] != keys[:-1]) | (cid[1:] != cid[:-1])
    starts = np.flatnonzero(new)
    sums = np.add.reduceat(p, starts)
    bkeys, bcid = keys[starts], cid[starts]
    bounds = np.searchsorted(bcid, np.arange(len(cands) + 1))
    return [(bkeys[lo:hi], sums[lo:hi]) for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist())]


def align(
    keys_a: np.ndarray, vals_a: np.ndarray, keys_b: np.ndarray, vals_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Two bucketed series on the union of their buckets, missing ones 0.0."""
    keys = np.union1d(keys_a, keys_b)
    xa = np.zeros(keys.size)
    xb = np.zeros(keys.size)
    xa[np.searchsorted(keys, keys_a)] = vals_a
    xb[np.searchsorted(keys, keys_b)] = vals_b
    return xa, xb


def pearson(xs: ArrayLike, ys: ArrayLike) -> float:
    """Pearson correlation; 0.0 when a side has no variance or lengths differ."""
    x = np.asarray(xs, dtype=np.float64).reshape(-1)
    y = np.asarray(ys, dtype=np.float64).reshape(-1)
    if x.size == 0 or x.size != y.size:
        return 0.0
    dx = x - x.mean()
    dy = y - y.mean()
    den_x = float(dx @ dx)
    den_y = float(dy @ dy)
    if den_x == 0.0 or den_y == 0.0:
        return 0.0
    return max(-1.0, min(1.0, float(dx @ dy) / math.sqrt(den_x * den_y)))


def _weights_from_sd(sa: float, sb: float) -> tuple[float, float]:
    if sa == 0.0 and sb == 0.0:
        return 0.5, 0.5
    if sa == 0.0:
        return 0.0, 1.0
    if sb == 0.0:
        return 1.0, 0.0
    return sb / (sa + sb), sa / (sa + sb)


def inverse_vol_weights(xs: ArrayLike, ys: ArrayLike) -> tuple[float, float]:
    """Inverse population-sd weights normalised to 1 (see module doc for sd 0)."""
    return _weights_from_sd(float(np.std(np.asarray(xs, float))), float(np.std(np.asarray(ys, float))))


def composite_metrics(pnls: ArrayLike) -> tuple[float, float, float]:
    """(Sharpe, profit factor, score) of a composite PnL series: Sharpe =
    mean / population sd (0 when sd is 0), PF = gains / |losses| (0 without
    losses), score = 0.7 * Sharpe + 0.3 * PF."""
    p = np.asarray(pnls, dtype=np.float64)
    if p.size == 0:
        return 0.0, 0.0, 0.0
    sd = float(p.std())
    sharpe = float(p.mean()) / sd if sd > 0 else 0.0
    gains = float(p[p > 0].sum())
    losses = float(-p[p < 0].sum())
    pf = gains / losses if losses > 0 else 0.0
    return sharpe, pf, SHARPE_WEIGHT * sharpe + PF_WEIGHT * pf


# ------------------------------------------------------------------- the pool


def _norm_rank(rank: str) -> str:
    return str(rank).strip().lstrip(":").upper()


def _sharpe_key(s: float | None) -> float:
    if s is None:
        return 0.0
    s = float(s)
    return 0.0 if math.isnan(s) else s


def evaluate(cands: list[Candidate], cfg: PairsConfig) -> Evaluation:
    """Run Pair-Composite selection over one candidate per strategy."""
    excluded = dict.fromkeys(REASONS, 0)
    latest: dict[str, Candidate] = {}
    for c in cands:
        latest[c.name] = c

    ranks = {_norm_rank(r) for r in cfg.ranks}
    pool: list[Candidate] = []
    for c in latest.values():
        if c.status != ResultStatus.COMPLETE:
            excluded["missing"] += 1
        elif c.rank is not None and _norm_rank(c.rank) not in ranks:
            excluded["rank"] += 1
        else:
            pool.append(c)

    groups: dict[tuple[str, int], list[Candidate]] = {}
    for c in pool:
        key = (c.symbol or "", int(c.timeframe or 0))
        groups.setdefault(key, []).append(c)
    top: list[Candidate] = []
    for members in groups.values():
        members.sort(key=lambda c: (-_sharpe_key(c.sharpe), c.name))
        top.extend(members[: cfg.per_group])
        excluded["not_top_n"] += max(0, len(members) - cfg.per_group)

    names: list[str] = []
    series: list[tuple[np.ndarray, np.ndarray]] = []
    enough: list[Candidate] = []
    for c in sorted(top, key=lambda c: c.name):
        if c.trade_count < cfg.min_trades:
            excluded["too_few_trades"] += 1
        else:
            enough.append(c)
    for c, (keys, vals) in zip(enough, _bucket_all(enough, cfg.window_trades, cfg.bucket)):
        if vals.size == 0 or vals.max() - vals.min() <= _FLAT_REL * np.abs(vals).max():
            excluded["zero_variance"] += 1
            continue
        names.append(c.name)
        series.append((keys, vals))

    slots = _select_pairs(names, series, cfg)
    return Evaluation(slots=slots, candidates=len(names), excluded=excluded, safe_stop=not slots)


# -------------------------------------------------------------- pair moments


def _dense_ranks(keys: np.ndarray) -> np.ndarray:
    """The rank of each key among the distinct keys (as ``np.unique``'s inverse): through
    a presence table when the keys span a small range (day numbers), else by sorting."""
    if keys.size == 0:
        return np.empty(0, np.int64)
    lo, hi = int(keys.min()), int(keys.max())
    if hi - lo <= 4 * keys.size + 1024:
        rel = keys - lo
        present = np.zeros(hi - lo + 1, dtype=bool)
        present[rel] = True
        return (np.cumsum(present) - 1)[rel].astype(np.int64)
    return np.unique(keys, return_inverse=True)[1].reshape(-1).astype(np.int64)


class _Matrix:
    """Zero-filled strategies x buckets data, in the forms the pair sums need.

    ``block(r0, r1)`` gives, for rows r0..r1-1 against every column strategy,
    sums over the buckets the two share: count K, x_i x_j (C), x_i^3 x_j
    (C31), x_i x_j^3 (C13), x_i^2 x_j^2 (C22). Buckets held by a single
    strategy contribute only to that strategy's own sums and are skipped.
    """

    def __init__(self, series: list[tuple[np.ndarray, np.ndarray]]) -> None:
        n = len(series)
        self.n = n
        lens = np.fromiter((len(k) for k, _ in series), dtype=np.int64, count=n)
        self.lens = lens
        allk = np.concatenate([k for k, _ in series])
        x = np.concatenate([v for _, v in series])
        sid = np.repeat(np.arange(n, dtype=np.int64), lens)
        col = _dense_ranks(allk)
        ncols = int(col.max()) + 1 if col.size else 0
        self.ncols = ncols

        # per-strategy sums over its own buckets
        cnt = lens.astype(np.float64)
        self.cnt = cnt
        self.S = np.bincount(sid, weights=x, minlength=n)
        mu = self.S / cnt
        dev = x - mu[sid]
        self.M2 = np.bincount(sid, weights=dev * dev, minlength=n)
        self.B = self.S * mu  # S^2 / n
        self.Q4 = np.bincount(sid, weights=(x * x) ** 2, minlength=n)
        self.Mabs = np.zeros(n)  # largest |bucket value| per strategy (the cheap PF bounds)
        np.maximum.at(self.Mabs, sid, np.abs(x))
        self.L1 = np.bincount(sid, weights=np.abs(x), minlength=n)

        # padded rows for the exact per-bucket pass (pad key = ncols, value 0)
        w = int(lens.max()) if n else 0
        self.width = w
        self.KP = np.full((n, w), ncols, dtype=np.int64)
        self.VP = np.zeros((n, w), dtype=np.float64)
        pos_in_row = np.arange(x.size, dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
        self.KP[sid, pos_in_row] = col
        self.VP[sid, pos_in_row] = x

        # split shared buckets into dense (many holders) and light (few)
        share = np.bincount(col, minlength=ncols)
        es = share[col]
        dense_cols = np.flatnonzero(share >= max(_DENSE_MIN_SHARE, 2))
        self.dense = dense_cols.size > 0
        if self.dense:
            dmap = np.full(ncols, -1, dtype=np.int64)
            dmap[dense_cols] = np.arange(dense_cols.size)
            sel = es >= max(_DENSE_MIN_SHARE, 2)
            h = dense_cols.size
            self.Dm = np.zeros((n, h))
            self.Dx = np.zeros((n, h))
            self.Dm[sid[sel], dmap[col[sel]]] = 1.0
            self.Dx[sid[sel], dmap[col[sel]]] = x[sel]
            self.Ds = np.sqrt(np.abs(self.Dx))

        light = (es >= 2) & (es < _DENSE_MIN_SHARE)
        la: list[np.ndarray] = []
        lb: list[np.ndarray] = []
        lxa: list[np.ndarray] = []
        lxb: list[np.ndarray] = []
        if light.any():
            idx = np.flatnonzero(light)
            order = idx[np.lexsort((sid[idx], col[idx]))]  # by bucket, then strategy
            ks = es[order]
            for k in np.unique(ks):
                sel = order[ks == k]  # whole buckets of k holders, contiguous
                s2 = sid[sel].reshape(-1, k)
                x2 = x[sel].reshape(-1, k)
                ia, ib = np.triu_indices(int(k), 1)
                la.append(s2[:, ia].ravel())
                lb.append(s2[:, ib].ravel())
                lxa.append(x2[:, ia].ravel())
                lxb.append(x2[:, ib].ravel())
        if la:
            a = np.concatenate(la)
            o = np.argsort(a, kind="stable")
            self.la = a[o]
            self.lb = np.concatenate(lb)[o]
            self.lxa = np.concatenate(lxa)[o]
            self.lxb = np.concatenate(lxb)[o]
        else:
            self.la = self.lb = np.empty(0, np.int64)
            self.lxa = self.lxb = np.empty(0, np.float64)

        # the light sums once per pair (i < j), keyed i * n + j ascending: the gathered
        # (exact) and tiled (screening) paths look pairs up here
        keys = self.la * n + self.lb
        self.lkeys, inv = np.unique(keys, return_inverse=True)
        inv = inv.reshape(-1)
        nk = self.lkeys.size
        xa, xb = self.lxa, self.lxb
        self.lsum = {
            "K": np.bincount(inv, minlength=nk).astype(np.float64),
            "C": np.bincount(inv, weights=xa * xb, minlength=nk),
            "E": np.bincount(inv, weights=np.sqrt(np.abs(xa * xb)), minlength=nk),
            "C31": np.bincount(inv, weights=xa**3 * xb, minlength=nk),
            "C13": np.bincount(inv, weights=xa * xb**3, minlength=nk),
            "C22": np.bincount(inv, weights=(xa * xb) ** 2, minlength=nk),
        }
        self._scr: dict[str, Any] | None = None
        self._powers: dict[str, np.ndarray] = {}

    @property
    def Dx2(self) -> np.ndarray:
        """x^2 of the dense buckets (the Hoelder bound's products only: made on first use)."""
        if "2" not in self._powers:
            self._powers["2"] = self.Dx * self.Dx
        return self._powers["2"]

    @property
    def Dx3(self) -> np.ndarray:
        if "3" not in self._powers:
            self._powers["3"] = self.Dx2 * self.Dx
        return self._powers["3"]

    def block(self, r0: int, r1: int, c0: int = 0,
              which: tuple[str, ...] = ("K", "C", "E", "C31", "C13", "C22")) -> dict[str, np.ndarray]:
        """The sums named in ``which`` for rows r0..r1-1 against columns c0..n-1
        (shape (r1 - r0, n - c0)); c0 <= r0 + 1. E sums sqrt(|x_i x_j|)."""
        n = self.n
        b = r1 - r0
        c = n - c0
        out: dict[str, np.ndarray] = {}
        if self.dense:
            Dm, Dx, Dx2, Dx3 = self.Dm, self.Dx, self.Dx2, self.Dx3
            products = {"K": (Dm, Dm), "C": (Dx, Dx), "C31": (Dx3, Dx), "C13": (Dx, Dx3), "C22": (Dx2, Dx2),
                        "E": (self.Ds, self.Ds)}
            for key in which:
                left, right = products[key]
                out[key] = left[r0:r1] @ right[c0:].T
        else:
            out = {k: np.zeros((b, c)) for k in which}
        lo, hi = np.searchsorted(self.la, [r0, r1])
        if hi > lo:
            # light pairs have lb > la >= r0, so lb >= c0 whenever c0 <= r0 + 1
            flat = (self.la[lo:hi] - r0) * c + (self.lb[lo:hi] - c0)
            xa = self.lxa[lo:hi]
            xb = self.lxb[lo:hi]
            size = b * c
            weights = {"K": lambda: None, "C": lambda: xa * xb, "C31": lambda: xa**3 * xb,
                       "C13": lambda: xa * xb**3, "C22": lambda: (xa * xb) ** 2,
                       "E": lambda: np.sqrt(np.abs(xa * xb))}
            for key in which:
                out[key] += np.bincount(flat, weights=weights[key](), minlength=size).reshape(b, c)
        return out

    def pair_sums(self, ia: np.ndarray, ib: np.ndarray, which: tuple[str, ...]) -> dict[str, np.ndarray]:
        """The sums named in ``which`` (as ``block``) for the pairs (ia[q], ib[q]),
        ia < ib, 1-D, gathered: for the few pairs the screen leaves."""
        P = ia.size
        out = {key: np.zeros(P) for key in which}
        if self.dense and P:
            forms = {"K": ("Dm", "Dm"), "C": ("Dx", "Dx"), "E": ("Ds", "Ds"), "C31": ("Dx3", "Dx"),
                     "C13": ("Dx", "Dx3"), "C22": ("Dx2", "Dx2")}
            step = max(1, _BATCH_ELEMS // max(1, self.Dx.shape[1]))
            for q0 in range(0, P, step):
                ra, rb = ia[q0 : q0 + step], ib[q0 : q0 + step]
                rows: dict[tuple[str, int], np.ndarray] = {}
                for key in which:
                    left, right = forms[key]
                    if (left, 0) not in rows:
                        rows[(left, 0)] = getattr(self, left)[ra]
                    if (right, 1) not in rows:
                        rows[(right, 1)] = getattr(self, right)[rb]
                    out[key][q0 : q0 + step] = np.einsum("ij,ij->i", rows[(left, 0)], rows[(right, 1)])
        if self.lkeys.size and P:
            key = ia * self.n + ib
            pos = np.minimum(np.searchsorted(self.lkeys, key), self.lkeys.size - 1)
            hit = np.flatnonzero(self.lkeys[pos] == key)
            for k in which:
                out[k][hit] += self.lsum[k][pos[hit]]
        return out

    def screen_sums(self, r0: int, r1: int, c0: int, c1: int, e_scale: float) -> tuple[np.ndarray, np.ndarray]:
        """For the tile rows r0..r1-1 x columns c0..c1-1: the union size m (exact:
        integer sums in float32) and ``e_scale`` times an upper bound of E (float32
        products, inflated by their worst rounding error), both 2-D float64."""
        scr = self._screen_prep()
        if self.dense:
            m = (scr["L"][r0:r1] @ scr["R"][c0:c1].T).astype(np.float64)
            E = (scr["S"][r0:r1] @ scr["S"][c0:c1].T).astype(np.float64)
            E *= e_scale * scr["inflate"]
        else:
            m = self.cnt[r0:r1, None] + self.cnt[None, c0:c1]
            E = np.zeros((r1 - r0, c1 - c0))
        if self.lkeys.size:
            rows = np.arange(r0, r1, dtype=np.int64) * self.n
            lo = np.searchsorted(self.lkeys, rows + c0)
            hi = np.searchsorted(self.lkeys, rows + c1)
            cnt = hi - lo
            total = int(cnt.sum())
            if total:
                idx = np.repeat(lo - np.cumsum(cnt) + cnt, cnt) + np.arange(total)
                k = self.lkeys[idx]
                ri, ci = k // self.n - r0, k % self.n - c0
                m[ri, ci] -= self.lsum["K"][idx]
                E[ri, ci] += (e_scale * (1.0 + 1e-12)) * self.lsum["E"][idx]
        return m, E

    def _screen_prep(self) -> dict[str, Any]:
        if self._scr is None:
            scr: dict[str, Any] = {}
            if self.dense:
                h = self.Dm.shape[1]
                one = np.ones((self.n, 1))
                cnt = self.cnt[:, None]
                # [Dm, n_i, 1] . [-Dm, 1, n_j] = n_i + n_j - K: integers, exact in float32 below 2^24
                exact32 = float(self.cnt.max()) * 2 + h < 2.0**24
                scr["L"] = np.ascontiguousarray(np.hstack([self.Dm, cnt, one]), dtype=np.float32 if exact32 else None)
                scr["R"] = np.ascontiguousarray(np.hstack([-self.Dm, one, cnt]), dtype=np.float32 if exact32 else None)
                ax = np.abs(self.Dx[self.Dx != 0])
                if ax.size == 0 or (ax.min() >= 1e-30 and ax.max() <= 1e30):
                    # h non-negative float32 products of two rounded factors, none under- or
                    # overflowing in that range: |error| <= (h + 3) u E
                    scr["S"] = np.ascontiguousarray(self.Ds, dtype=np.float32)
                    scr["inflate"] = 1.0 + 2.0 * (h + 4) * 2.0**-24
                else:  # bucket sums beyond float32's comfortable range: float64 products
                    scr["S"] = self.Ds
                    scr["inflate"] = 1.0 + 2.0 * (h + 4) * 2.0**-53
            self._scr = scr
        return self._scr

    def exact_gains_losses(
        self, ia: np.ndarray, ib: np.ndarray, wa: np.ndarray, wb: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Gains and |losses| of the composite wa*a + wb*b over the union of
        buckets, per pair, summed from non-negative terms only."""
        P = ia.size
        w = self.width
        stride = self.ncols + 2
        off = (np.arange(P, dtype=np.int64) * stride)[:, None]
        A = (self.KP[ia] + off).ravel()
        Bk = self.KP[ib]
        Bk = np.where(Bk == self.ncols, self.ncols + 1, Bk) + off  # pads never match
        Bf = Bk.ravel()
        pos = np.searchsorted(Bf, A)
        np.minimum(pos, Bf.size - 1, out=pos)
        hit = Bf[pos] == A
        xa = self.VP[ia].ravel()
        xb = self.VP[ib].ravel()
        row = np.repeat(np.arange(P, dtype=np.int64), w)
        hit_b = np.zeros(Bf.size, dtype=bool)
        hit_b[pos[hit]] = True

        only_a = np.where(hit, 0.0, xa)
        only_b = np.where(hit_b, 0.0, xb)
        ga = np.bincount(row, weights=np.maximum(only_a, 0.0), minlength=P)
        la = np.bincount(row, weights=np.maximum(-only_a, 0.0), minlength=P)
        gb = np.bincount(row, weights=np.maximum(only_b, 0.0), minlength=P)
        lb = np.bincount(row, weights=np.maximum(-only_b, 0.0), minlength=P)

        hr = row[hit]
        pa = wa[hr] * xa[hit]
        pb = wb[hr] * xb[pos[hit]]
        p = pa + pb
        p[np.abs(p) <= _FLAT_REL * (np.abs(pa) + np.abs(pb))] = 0.0
        gi = np.bincount(hr, weights=np.maximum(p, 0.0), minlength=P)
        li = np.bincount(hr, weights=np.maximum(-p, 0.0), minlength=P)
        return wa * ga + wb * gb + gi, wa * la + wb * lb + li


def _side(mx: _Matrix, idx: Any) -> dict[str, np.ndarray]:
    """Per-strategy sums of the strategies ``idx`` selects (a slice or index array,
    shaped for broadcasting by the caller)."""
    return {"cnt": mx.cnt[idx], "M2": mx.M2[idx], "B": mx.B[idx], "S": mx.S[idx],
            "Mabs": mx.Mabs[idx], "L1": mx.L1[idx]}


def _block_pairs(mx: _Matrix, r0: int, r1: int, c0: int, blk: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """For every (i, j) of the block (rows r0..r1-1, columns c0..n-1, 2-D arrays,
    broadcast from per-strategy sums, no gathers): see ``_pair_stats``."""
    I, J = slice(r0, r1), slice(c0, mx.n)
    return _pair_stats(_side(mx, (I, None)), _side(mx, (None, J)), blk["K"], blk["C"], blk["E"])


def _pair_stats(a: dict[str, np.ndarray], b: dict[str, np.ndarray], K: np.ndarray, C: np.ndarray,
                E: np.ndarray) -> dict[str, np.ndarray]:
    """Union size m, zero-filled variances, covariance, Pearson correlation,
    inverse-vol weights, composite sum D, its sum of squares, Sharpe, and a cheap
    score upper bound ``ub`` (profit factor bounded through sum|p| >= sum p^2 /
    max|p| and the shared-bucket bound on E), from the per-strategy sums of both
    sides (``_side``, broadcastable) and the shared sums K, C, E."""
    ni, nj = a["cnt"], b["cnt"]
    m = ni + nj - K  # union size
    # variance of a zero-filled aligned series, from non-negative terms:
    # m*var = M2_i + (S_i^2 / n_i) * (m - n_i) / m, and m - n_i = n_j - K
    va = (a["M2"] + a["B"] * (nj - K) / m) / m
    vb = (b["M2"] + b["B"] * (ni - K) / m) / m
    cov = (C - a["S"] * b["S"] / m) / m
    den = np.sqrt(va * vb)
    corr = np.divide(cov, den, out=np.zeros_like(cov), where=den > 0)
    np.clip(corr, -1.0, 1.0, out=corr)

    sa, sb = np.sqrt(va), np.sqrt(vb)
    ssum = sa + sb
    both = (sa > 0) & (sb > 0)
    if both.all():
        wa, wb = sb / ssum, sa / ssum
    else:  # cannot happen inside evaluate (zero-variance series are excluded)
        ssum = np.where(both, ssum, 1.0)
        wa = np.where(both, sb / ssum, np.where(sa > 0, 1.0, np.where(sb > 0, 0.0, 0.5)))
        wb = np.where(both, sa / ssum, np.where(sb > 0, 1.0, np.where(sa > 0, 0.0, 0.5)))
    D = wa * a["S"] + wb * b["S"]  # sum of the composite
    mean_p = D / m
    parts = wa * wa * va + wb * wb * vb
    var_p = parts + 2.0 * wa * wb * cov
    live = var_p > _FLAT_REL * parts
    sharpe = np.divide(mean_p, np.sqrt(np.maximum(var_p, 0.0)), out=np.zeros_like(mean_p), where=live)
    sum2 = m * (np.maximum(var_p, 0.0) + mean_p * mean_p)
    # |p| <= wa max|x_i| + wb max|x_j| in every bucket, so sum|p| >= sum2 / that
    pmax = wa * a["Mabs"] + wb * b["Mabs"]
    t_lb = np.divide(sum2, pmax, out=np.zeros_like(sum2), where=pmax > 0)
    # |a + b| >= |a| + |b| - 2 min(|a|, |b|) and min(u, v) <= sqrt(uv): sum|p| >=
    # wa L1_i + wb L1_j - 2 sqrt(wa wb) E (E over shared buckets; tight when few are shared),
    # less a margin for rounding and for composite buckets flattened to 0
    l1 = wa * a["L1"] + wb * b["L1"]
    cross = 2.0 * np.sqrt(wa * wb) * E
    np.maximum(t_lb, (l1 - cross) - 1e-9 * (l1 + cross), out=t_lb)
    ub = _score_bound(sharpe, D, t_lb)
    return {"m": m, "va": va, "vb": vb, "cov": cov, "corr": corr, "wa": wa, "wb": wb,
            "D": D, "sum2": sum2, "sharpe": sharpe, "ub": ub}


def _score_bound(sharpe: np.ndarray, D: np.ndarray, t_lb: np.ndarray) -> np.ndarray:
    """Score upper bound from Sharpe (exact) and a lower bound t_lb of T = sum|p|:
    PF = G / L with G - L = D and G + L = T, so for D > 0 PF = (T + D) / (T - D),
    decreasing in T; for D <= 0, PF <= 1."""
    t_lb = np.maximum(np.abs(D), t_lb) * (1.0 - _BOUND_SLACK)
    gap = t_lb - D
    pf_ub = np.divide(t_lb + D, gap, out=np.full_like(gap, np.inf), where=gap > 0)
    pf_ub[D <= 0] = 1.0
    ub = SHARPE_WEIGHT * sharpe + PF_WEIGHT * pf_ub
    ub += 1e-9 * (1.0 + np.abs(ub))
    ub[np.isnan(ub)] = np.inf
    return ub


def _holder_bound(mx: _Matrix, d: dict[str, np.ndarray], blk: dict[str, np.ndarray] | None) -> None:
    """Tightens ``ub`` of gathered pairs (keys li, lj, i, j) with Hoelder's
    T >= (sum p^2)^1.5 / (sum p^4)^0.5 (in place)."""
    i, j = d["i"], d["j"]
    if blk is None:  # gathered pairs: their sums one by one
        g = mx.pair_sums(i, j, ("C31", "C13", "C22"))
        c31, c13, c22 = g["C31"], g["C13"], g["C22"]
    else:
        li, lj = d["li"], d["lj"]
        c31, c13, c22 = blk["C31"][li, lj], blk["C13"][li, lj], blk["C22"][li, lj]
    wa, wb, sum2 = d["wa"], d["wb"], d["sum2"]
    wa2, wb2 = wa * wa, wb * wb
    sum4 = (
        wa2 * wa2 * mx.Q4[i]
        + 4.0 * wa2 * wa * wb * c31
        + 6.0 * wa2 * wb2 * c22
        + 4.0 * wa * wb2 * wb * c13
        + wb2 * wb2 * mx.Q4[j]
    )
    holder = sum2 * np.sqrt(np.divide(sum2, sum4, out=np.zeros_like(sum2), where=sum4 > 0))
    d["ub"] = np.minimum(d["ub"], _score_bound(d["sharpe"], d["D"], holder))


class _Top:
    """The best ``k`` exact results so far, by score desc then pair_id asc."""

    def __init__(self, k: int, names: list[str]) -> None:
        self.k = k
        self.names = names
        self.items: list[tuple[float, str, Slot]] = []

    @property
    def theta(self) -> float:
        return self.items[-1][0] if len(self.items) >= self.k else -math.inf

    def offer(self, mx: _Matrix, cand: dict[str, np.ndarray]) -> None:
        """Evaluate candidates in descending upper-bound order until no
        remaining one can reach the top."""
        order = np.argsort(-cand["ub"], kind="stable")
        ub = cand["ub"][order]
        start = 0
        batch = 64
        cap = max(64, _BATCH_ELEMS // max(1, mx.width))
        total = order.size
        while start < total:
            theta = self.theta
            if ub[start] < theta:
                break
            end = min(total, start + batch)
            # no point evaluating the tail of this batch that cannot compete
            end = start + int(np.searchsorted(-ub[start:end], -theta, side="right"))
            sel = order[start:end]
            self._evaluate(mx, {k: v[sel] for k, v in cand.items()})
            start = end
            batch = min(cap, batch * 2)

    def _evaluate(self, mx: _Matrix, c: dict[str, np.ndarray]) -> None:
        G, L = mx.exact_gains_losses(c["i"], c["j"], c["wa"], c["wb"])
        with np.errstate(divide="ignore", invalid="ignore"):
            pf = np.where(L > 0, G / np.where(L > 0, L, 1.0), 0.0)
        score = SHARPE_WEIGHT * c["sharpe"] + PF_WEIGHT * pf
        theta = self.theta
        for q in np.flatnonzero(score >= theta):
            a, b = self.names[int(c["i"][q])], self.names[int(c["j"][q])]
            pid = pair_id(a, b)
            sc = float(score[q])
            self.items.append(
                (
                    sc,
                    pid,
                    Slot(
                        pair_id=pid,
                        strategy_a=a,
                        strategy_b=b,
                        weight_a=float(c["wa"][q]),
                        weight_b=float(c["wb"][q]),
                        corr=float(c["corr"][q]),
                        sharpe=float(c["sharpe"][q]),
                        profit_factor=float(pf[q]),
                        score=sc,
                    ),
                )
            )
        self.items.sort(key=lambda t: (-t[0], t[1]))
        del self.items[self.k :]


_blas_lock = threading.Lock()
_blas_local: Any = False  # openblas_set_num_threads_local, None when unavailable, False before the look-up


def _blas_threads_local() -> Any:
    """numpy's bundled OpenBLAS ``openblas_set_num_threads_local`` (sets the BLAS
    thread count of the calling thread only, OpenBLAS >= 0.3.27), or None."""
    global _blas_local
    with _blas_lock:
        if _blas_local is False:
            _blas_local = None
            libs = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
            for path in sorted(glob.glob(os.path.join(libs, "*openblas*"))):
                try:
                    fn = ctypes.CDLL(path).openblas_set_num_threads_local
                except (OSError, AttributeError):
                    continue
                fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
                _blas_local = fn
                break
        return _blas_local


@contextlib.contextmanager
def _one_blas_thread() -> Any:
    """Matrix products on the calling thread only while inside. The products are
    small tiles between element-wise work: with a second BLAS thread spinning
    beside that work on a busy machine an evaluation ran 2-3x slower (issue 16)."""
    fn = _blas_threads_local()
    if fn is None:
        yield
        return
    before = fn(1)
    try:
        yield
    finally:
        fn(before)


def _select_pairs(names: list[str], series: list[tuple[np.ndarray, np.ndarray]], cfg: PairsConfig) -> list[Slot]:
    with _one_blas_thread():
        return _select_pairs_in(names, series, cfg)


def _select_pairs_in(names: list[str], series: list[tuple[np.ndarray, np.ndarray]], cfg: PairsConfig) -> list[Slot]:
    n = len(names)
    k = cfg.max_pairs
    if n < 2 or k <= 0:
        return []
    mx = _Matrix(series)
    top = _Top(k, names)
    count1 = 0
    band: list[dict[str, np.ndarray]] | None = []  # rescue band while it may matter
    r0 = 0
    while r0 < n - 1:
        if band is None and _screen_applies(cfg, top.theta):
            _screened_pairs(mx, top, r0, cfg.corr_max)
            break
        # rows r0..r1-1 against columns r0+1..n-1 (the pairs i < j of these rows): about
        # _BLOCK_ELEMS pairs per block whatever n, so memory stays bounded
        c0 = r0 + 1
        # the first block is small: it sets a threshold cheaply, which prunes the big ones
        target = _FIRST_BLOCK_ELEMS if r0 == 0 else _BLOCK_ELEMS
        r1 = r0 + max(1, min(n - 1 - r0, target // (n - c0)))
        blk = mx.block(r0, r1, c0, ("K", "C", "E"))
        d = _block_pairs(mx, r0, r1, c0, blk)
        valid = np.arange(c0, n)[None, :] > np.arange(r0, r1)[:, None]
        absr = np.abs(d["corr"])
        keep = valid & (absr <= cfg.corr_max)
        count1 += int(keep.sum())
        if band is not None and count1 >= k:
            band = None
        if band is not None:
            # pairs of the rescue band, kept whatever their bound until k pairs pass corr_max
            sel = valid & ~keep & (absr <= cfg.rescue_corr_max)
            if sel.any():
                band.append(_gather(d, sel, r0, c0))
        keep &= d["ub"] >= top.theta
        if keep.any():
            cand = _gather(d, keep, r0, c0)
            if cand["i"].size >= _HOLDER_MIN:  # many left: worth the three more products
                _holder_bound(mx, cand, mx.block(r0, r1, c0, ("C31", "C13", "C22")))
                cand = {key: v[cand["ub"] >= top.theta] for key, v in cand.items()}
            if cand["i"].size:
                top.offer(mx, cand)
        del blk, d
        r0 = r1
    if band:
        top.offer(mx, {key: np.concatenate([b[key] for b in band]) for key in band[0]})
    return [item[2] for item in top.items]


def _screen_applies(cfg: PairsConfig, theta: float) -> bool:
    """The screen needs the rescue band settled (``band is None``, checked by the
    caller), a threshold above 0.3 (the best score a pair with D <= 0 can reach:
    Sharpe <= 0, PF <= 1) and corr_max well below 1 (its Sharpe bound)."""
    return math.isfinite(theta) and theta > PF_WEIGHT + 1e-3 and cfg.corr_max <= _SCREEN_CORR_MAX


def _screened_pairs(mx: _Matrix, top: _Top, r0: int, corr_max: float) -> None:
    """The pairs i < j of rows r0..n-2, in tiles of _TILE_ROWS x _TILE_COLS, each
    screened without its cross products C (float32 K and E, float64 arithmetic);
    the few pairs that pass get their exact sums gathered and go the usual way
    (corr filter, ``ub``, Hoelder when many, ``top.offer``).

    The screen passes every pair whose ``ub`` (``_pair_stats``) can reach the
    threshold with |corr| <= corr_max. With weights wa ~ sd_b, wb ~ sd_a
    (scaled by m: sd~ = m sd = sqrt(m M2 + B (m - n)), sum of non-negative terms):
    Sharpe = (S_a / sd~_a + S_b / sd~_b) / sqrt(2 + 2 corr) <= D / P / sqrt(2 - 2 corr_max)
    with D = sd~_b S_a + sd~_a S_b and P = sd~_a sd~_b (no C needed), and PF <= (T + D) /
    (T - D) with T >= max(D, sd~_b L1_a + sd~_a L1_b - 2 sqrt(P) E) as in ``_pair_stats``
    (a D <= 0 pair scores <= 0.3 < theta). ``ub >= theta`` is then, division-free,
    T (w - 0.3) <= D (w + 0.3) with w = theta - 0.7 Sharpe bound. Margins: T's bound
    is taken 2e-6 lower (``_pair_stats`` uses 1e-6), E is inflated by its float32
    error bound, the Sharpe bound and theta each by 1e-6."""
    n = mx.n
    for p0 in range(r0, n - 1, _TILE_ROWS):
        p1 = min(n - 1, p0 + _TILE_ROWS)
        found_i: list[np.ndarray] = []
        found_j: list[np.ndarray] = []
        found = 0
        for q0 in range(p0 + 1, n, _TILE_COLS):
            q1 = min(n, q0 + _TILE_COLS)
            li, lj = np.nonzero(_screen_tile(mx, p0, p1, q0, q1, top.theta, corr_max))
            if li.size:
                found_i.append(li + p0)
                found_j.append(lj + q0)
                found += li.size
            if found >= _FLUSH_PAIRS or (found and q1 == n):
                # evaluate now: a raised threshold screens the next tiles harder
                _offer_gathered(mx, top, np.concatenate(found_i), np.concatenate(found_j), corr_max)
                found_i, found_j, found = [], [], 0


def _screen_tile(mx: _Matrix, p0: int, p1: int, q0: int, q1: int, theta: float, corr_max: float) -> np.ndarray:
    """The screen of ``_screened_pairs`` for rows p0..p1-1 x columns q0..q1-1:
    True where a pair i < j may still reach ``theta`` with |corr| <= corr_max."""
    y_coef = SHARPE_WEIGHT * (1.0 + 1e-6) / math.sqrt(2.0 - 2.0 * min(1.0 - 1e-3, corr_max + 1e-6))
    theta_s = theta - 1e-6 * (1.0 + abs(theta))
    shrink = (1.0 - 2e-6) * (1.0 - 2e-9)
    e_scale = 2.0 * (1.0 - 2e-6) * (1.0 + 2e-9)
    I, J = slice(p0, p1), slice(q0, q1)
    cnt, M2, B, S, L1 = mx.cnt, mx.M2, mx.B, mx.S, mx.L1
    m, E = mx.screen_sums(p0, p1, q0, q1, e_scale)
    t = m - cnt[I, None]
    t *= B[I, None]
    sa = m * M2[I, None]
    sa += t
    np.sqrt(sa, out=sa)  # sd~_a
    np.subtract(m, cnt[None, J], out=t)
    t *= B[None, J]
    sb = m * M2[None, J]
    sb += t
    np.sqrt(sb, out=sb)  # sd~_b
    D = sb * S[I, None]
    np.multiply(sa, S[None, J], out=t)
    D += t
    T = sb * (L1[I, None] * shrink)
    np.multiply(sa, L1[None, J] * shrink, out=t)
    T += t
    np.multiply(sa, sb, out=sa)  # P
    np.sqrt(sa, out=sb)
    sb *= E
    T -= sb  # lower bound of T, scaled
    np.maximum(T, D, out=T)
    np.divide(D, sa, out=sb)
    sb *= -y_coef
    sb += theta_s  # w
    np.subtract(sb, PF_WEIGHT, out=t)
    t *= T
    sb += PF_WEIGHT
    sb *= D
    ok = ~(t > sb)  # written so that NaN (overflowing sums) passes, as ub NaN -> inf does
    ok &= ~(D <= 0)
    if q0 < p1:  # the tile crosses the diagonal: only j > i
        ok &= np.arange(q0, q1)[None, :] > np.arange(p0, p1)[:, None]
    return ok


def _offer_gathered(mx: _Matrix, top: _Top, i: np.ndarray, j: np.ndarray, corr_max: float) -> None:
    """The exact path for pairs (i, j) the screen left: their sums gathered, then
    the corr filter, ``ub`` (and Hoelder when many are left) and ``top.offer``."""
    step = max(1, _BLOCK_ELEMS // 4)
    for q0 in range(0, i.size, step):
        ii, jj = i[q0 : q0 + step], j[q0 : q0 + step]
        g = mx.pair_sums(ii, jj, ("K", "C", "E"))
        d = _pair_stats(_side(mx, ii), _side(mx, jj), g["K"], g["C"], g["E"])
        d.update(i=ii, j=jj)
        keep = (np.abs(d["corr"]) <= corr_max) & (d["ub"] >= top.theta)
        cand = {key: v[keep] for key, v in d.items()}
        if cand["i"].size >= _HOLDER_MIN:
            _holder_bound(mx, cand, None)
            cand = {key: v[cand["ub"] >= top.theta] for key, v in cand.items()}
        if cand["i"].size:
            top.offer(mx, cand)


def _gather(d: dict[str, np.ndarray], sel: np.ndarray, r0: int, c0: int) -> dict[str, np.ndarray]:
    """The pairs of a block where ``sel`` holds, as 1-D arrays (with i, j, li, lj)."""
    li, lj = np.nonzero(sel)
    out = {key: v[li, lj] for key, v in d.items()}
    out.update(li=li, lj=lj, i=li + r0, j=lj + c0)
    return out


# ------------------------------------------------------------------ loading

_LATEST_CTE = """
WITH ranked AS (
    SELECT request_id, strategy_name, status, sharpe, rank, symbol, timeframe, total_trades,
           ROW_NUMBER() OVER (PARTITION BY strategy_name
                              ORDER BY completed_at DESC NULLS LAST, request_id DESC) AS rn
    FROM backtest_results
    WHERE status IN ('complete', 'failed', 'abandoned')
), latest AS (
    SELECT request_id, strategy_name, status, sharpe, rank, symbol, timeframe, total_trades,
           CASE WHEN status = 'complete' THEN
               ROW_NUMBER() OVER (PARTITION BY status = 'complete' ORDER BY request_id) - 1
           END AS k
    FROM ranked
    WHERE rn = 1
)
"""

_LATEST_SQL = _LATEST_CTE + """
SELECT request_id, strategy_name, status, sharpe, rank, symbol, timeframe, total_trades, k
FROM latest
ORDER BY strategy_name
"""

_ALL_ROWS_SQL = _LATEST_CTE + """
SELECT l.k, t.timestamp, t.pnl
FROM latest AS l
JOIN backtest_trade_logs AS t ON t.request_id = l.request_id
WHERE l.status = 'complete'
ORDER BY l.k, t.seq, t.timestamp, t.pnl
"""

# The last ``window`` trades of every latest complete result in one statement: each
# result's rows from its window-th latest timestamp on (found on the index led by
# request_id and timestamp; the earliest one when it has fewer rows), so a result of
# millions of rows is never read whole. Ties at that timestamp may add rows: the
# caller keeps the last ``window`` of the order (timestamp, seq, pnl).
_WINDOW_ALL_SQL = _LATEST_CTE + """
SELECT l.k, t.timestamp, t.pnl
FROM latest AS l
JOIN backtest_trade_logs AS t ON t.request_id = l.request_id
WHERE l.status = 'complete'
  AND t.timestamp >= COALESCE(
      (SELECT b.timestamp FROM backtest_trade_logs AS b WHERE b.request_id = l.request_id
       ORDER BY b.timestamp DESC LIMIT 1 OFFSET ?),
      (SELECT min(b.timestamp) FROM backtest_trade_logs AS b WHERE b.request_id = l.request_id))
ORDER BY l.k, t.timestamp, t.seq, t.pnl
"""

_ROW_DTYPE = np.dtype([("k", np.int64), ("t", np.int64), ("p", np.float64)])

_COUNT_SQL = "SELECT COUNT(*) FROM backtest_trade_logs WHERE request_id = ?"


def load_candidates(conn: sqlite3.Connection, window_trades: int | None = None) -> list[Candidate]:
    """Each strategy's latest result among complete/failed/abandoned (by
    completed_at, NULL oldest, then request_id). Trade rows are read for
    ``complete`` results only, ordered by seq, timestamp, pnl.

    Only SELECTs, all inside one read transaction (opened here unless the
    caller has one) so that a writer committing meanwhile cannot mix
    snapshots; works on a ``mode=ro`` connection.

    With ``window_trades`` only the last that many trades by timestamp are
    read per result (one statement for all results, each bounded below by
    its window-th latest timestamp through an index led by request_id) and ``n_trades`` carries the result's ``total_trades``
    (a complete result has exactly that many rows); ``evaluate`` then gives
    the same answer as with all rows as long as ``window_trades`` >= the
    config's. Prefer it in the daemon: one result may hold millions of rows.
    """
    own = not conn.in_transaction
    if own:
        conn.execute("BEGIN")
    try:
        return _load(conn, window_trades)
    finally:
        if own:
            conn.execute("ROLLBACK")  # nothing was written; just end the snapshot


def _load(conn: sqlite3.Connection, window_trades: int | None) -> list[Candidate]:
    out: list[Candidate] = []
    complete: dict[int, tuple[str, Candidate, int | None]] = {}
    for request_id, name, status, sharpe, rank, symbol, timeframe, total, k in conn.execute(_LATEST_SQL):
        c = Candidate(
            name=str(name),
            status=str(status),
            sharpe=None if sharpe is None else float(sharpe),
            rank=None if rank is None else str(rank),
            symbol=None if symbol is None else str(symbol),
            timeframe=None if timeframe is None else int(timeframe),
        )
        out.append(c)
        if status == ResultStatus.COMPLETE:
            complete[int(k)] = (request_id, c, None if total is None else int(total))

    if window_trades is not None:
        limit = int(window_trades)
        if limit >= 1 and complete:
            rows = np.fromiter(conn.execute(_WINDOW_ALL_SQL, (limit - 1,)), dtype=_ROW_DTYPE)
            bounds = np.searchsorted(rows["k"], np.arange(len(complete) + 1))
            # keep the last `limit` rows of each result (ties at its boundary timestamp)
            end = np.repeat(bounds[1:], np.diff(bounds))
            keep = end - np.arange(rows.size) <= limit
            if not keep.all():
                rows = rows[keep]
                bounds = np.searchsorted(rows["k"], np.arange(len(complete) + 1))
            ts, pn = rows["t"], rows["p"]
            for idx, (_, c, _) in complete.items():
                lo, hi = bounds[idx], bounds[idx + 1]
                if hi > lo:
                    c.timestamps = ts[lo:hi].copy()
                    c.pnls = pn[lo:hi].copy()
        for request_id, c, total in complete.values():
            if total is None:
                total = conn.execute(_COUNT_SQL, (request_id,)).fetchone()[0]
            c.n_trades = int(total)
        return out

    rows = conn.execute(_ALL_ROWS_SQL).fetchall()
    if rows:
        k = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        ts = np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows))
        pn = np.fromiter((r[2] for r in rows), dtype=np.float64, count=len(rows))
        bounds = np.searchsorted(k, np.arange(len(complete) + 1))
        for idx, (_, c, _) in complete.items():
            lo, hi = bounds[idx], bounds[idx + 1]
            c.timestamps = ts[lo:hi].copy()
            c.pnls = pn[lo:hi].copy()
    return out


# -------------------------------------------------------------------- bench


def bench(n_strategies: int, seed: int = 0, bucket: str = "day") -> float:
    """Seconds ``evaluate`` takes over ``n_strategies`` synthetic strategies
    that all enter pairing (per_group large enough), 100-trade windows."""
    from .synthetic import pair_candidates  # synthetic builds on Candidate: imported late, no cycle

    cands = pair_candidates(n_strategies, seed)
    cfg = PairsConfig(per_group=max(1, n_strategies), bucket=bucket)
    t0 = time.perf_counter()
    evaluate(cands, cfg)
    return time.perf_counter() - t0
