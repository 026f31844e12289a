"""Synthetic data for tests and benchmarks: the one place that makes up trades.

Owns: plausible columnar results for the producer (`result_columns`; one trade a day
for sets of strategies that pair up, `daily_result_columns`, `strategy_names`), swimmy
S-expression BACKTEST_RESULT messages and the columns they carry
(`legacy_message`, `legacy_columns`), and complete candidates for the pairs
bench (`pair_candidates`). Every function is deterministic: the same
arguments (seed included) give the same data, which tests and benches rely on.

Never does: I/O, sockets, the clock, or validation (the data is valid by
construction; pairlane.columns and pairlane.codec check real input).
"""
from __future__ import annotations

import random
import zlib

import numpy as np

from .pairs import SECONDS_PER_DAY, Candidate

__all__ = ["result_columns", "daily_result_columns", "strategy_names", "legacy_columns", "legacy_message",
           "pair_candidates"]

# ----------------------------------------------------------------------------
# producer results (PROTOCOL.md section 1)

_SYMBOLS = (("USDJPY", 150.0, 3, 100_000.0), ("EURUSD", 1.08, 5, 100_000.0),
            ("GBPUSD", 1.27, 5, 100_000.0), ("XAUUSD", 2000.0, 2, 100.0))


def result_columns(n: int, *, seed: int = 0, start_ts: int = 1_700_000_000,
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


def daily_result_columns(n: int, *, seed: int = 0, start_ts: int = 1_700_006_400,
                         strategy: str = "S") -> dict[str, np.ndarray | list]:
    """:func:`result_columns`, but trade i closes on UTC day i after `start_ts` (a day start),
    at a time of day of its own, so a strategy's day-bucketed series (PROTOCOL.md section 5)
    has one point per trade. Strategies sent with the same `start_ts` cover the same days,
    and their PnL are independent draws: most pairs come out weakly correlated, which is what
    `send --strategies K` needs to show real pair slots."""
    cols = result_columns(n, seed=seed, start_ts=start_ts, strategy=strategy)
    rng = np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(strategy.encode("utf-8")), 1])
    # a close before 20:00 UTC; hold_time (< 4 h) stays shorter than the gap to the next day's trade
    offset = rng.integers(0, 20 * 3600, size=n)
    cols["timestamp"] = (start_ts - start_ts % SECONDS_PER_DAY + np.arange(n, dtype=np.int64) * SECONDS_PER_DAY
                         + offset).astype("<i8")
    return cols


def strategy_names(k: int, prefix: str = "synthetic") -> list[str]:
    """`k` distinct strategy names: prefix-01, prefix-02, ... (sorted as numbered)."""
    if k < 1:
        raise ValueError("k must be >= 1")
    width = max(2, len(str(k)))
    return [f"{prefix}-{i:0{width}d}" for i in range(1, k + 1)]


# ----------------------------------------------------------------------------
# legacy S-expression results (PROTOCOL.md section 2)

_T0 = 1709234567


def legacy_columns(n_trades: int, *, seed: int = 0, extra_columns: bool = False) -> dict[str, list]:
    """The exact trade columns :func:`legacy_message` emits for these arguments."""
    rng = random.Random(seed)
    ts: list = []
    pnl: list = []
    t = _T0
    for _ in range(n_trades):
        t += rng.randint(60, 3600)
        ts.append(t)
        r = rng.random()
        if r < 0.05:
            pnl.append(float(rng.randint(-5, 5)))
        elif r < 0.08:
            pnl.append(rng.gauss(0.0, 1e-6))  # repr uses an exponent
        else:
            pnl.append(round(rng.gauss(0.05, 1.5), rng.randint(1, 6)))
    cols: dict = {"timestamp": ts, "pnl": pnl}
    if extra_columns:
        syms = ("USDJPY", "EURUSD", "GBPJPY")
        cols["symbol"] = [syms[rng.randrange(3)] for _ in range(n_trades)]
        cols["direction"] = [rng.choice(("BUY", "SELL")) for _ in range(n_trades)]
        cols["entry_price"] = [round(rng.uniform(100, 160), 3) for _ in range(n_trades)]
        cols["exit_price"] = [round(e + rng.gauss(0, 0.5), 3) for e in cols["entry_price"]]
        cols["sl"] = [None if rng.random() < 0.2 else round(e - 0.5, 3) for e in cols["entry_price"]]
        cols["tp"] = [None if rng.random() < 0.2 else round(e + 0.5, 3) for e in cols["entry_price"]]
        cols["volume"] = [0.01 * rng.randint(1, 100) for _ in range(n_trades)]
        cols["hold_time"] = [rng.randint(1, 10000) for _ in range(n_trades)]
        cols["timeframe"] = [rng.choice((1, 5, 15, 60, 240, None)) for _ in range(n_trades)]
        cols["rank"] = [rng.choice(("A", "S", "B", None)) for _ in range(n_trades)]
        cols["category"] = [rng.choice(("trend", "reversion", "breakout")) for _ in range(n_trades)]
        cols["regime"] = [rng.choice(("bull", "bear", 'ra"n\\ge', None)) for _ in range(n_trades)]
        cols["oos_kind"] = [rng.choice(("wfv", "cpcv", None)) for _ in range(n_trades)]
    return cols


def _lit(v) -> str:
    if v is None:
        return "nil"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def legacy_message(n_trades: int, *, style: str = "dotted", seed: int = 0, request_id: str | None = "R",
              strategy_name: str | None = "S", reported_trades: int | None = None,
              extra_columns: bool = False, with_trade_list: bool = True) -> bytes:
    """A realistic BACKTEST_RESULT of ``n_trades`` trades, UTF-8 encoded.

    ``style`` is ``"dotted"`` (swimmy's backtest service) or ``"lexpr"``
    (Guardian's serde_lexpr: optional values as one-element lists).
    ``reported_trades`` is the ``trades`` count written (default n_trades).
    Trade values are those of :func:`legacy_columns` with the same seed.
    """
    if style not in ("dotted", "lexpr"):
        raise ValueError(f"style must be 'dotted' or 'lexpr', not {style!r}")
    lexpr = style == "lexpr"
    cols = legacy_columns(n_trades, seed=seed, extra_columns=extra_columns)
    rng = random.Random(seed ^ 0x5EED)
    reported = n_trades if reported_trades is None else reported_trades

    def opt(key: str, v) -> str:
        if lexpr:
            return f"({key})" if v is None else f"({key} {_lit(v)})"
        return f"({key} . {_lit(v)})"

    fields = []
    if strategy_name is not None:
        fields.append(f"(strategy_name . {_lit(strategy_name)})")
    if request_id is not None:
        fields.append(f"(request_id . {_lit(request_id)})")
    fields += [
        opt("sharpe", round(rng.gauss(0.5, 0.5), 4)),
        f"(trades . {reported})",
        opt("profit_factor", round(rng.uniform(0.5, 3), 4)),
        opt("win_rate", round(rng.random(), 4)),
        opt("max_dd", round(rng.random() * 0.3, 4)),
        opt("symbol", "USDJPY"),
        opt("timeframe", 60),
        opt("rank", "A"),
        opt("oos_kind", "wfv"),
    ]
    if with_trade_list:
        names = list(cols)
        ts, pnl = cols["timestamp"], cols["pnl"]
        if not extra_columns:
            body = " ".join(f"((timestamp . {a}) (pnl . {b!r}))" for a, b in zip(ts, pnl))
        else:
            extra = names[2:]
            parts = []
            for i in range(n_trades):
                items = [f"(timestamp . {ts[i]})", f"(pnl . {pnl[i]!r})"]
                items += [opt(k, cols[k][i]) for k in extra]
                parts.append("(" + " ".join(items) + ")")
            body = " ".join(parts)
        fields.append(f"(trade_list ({body}))" if lexpr else f"(trade_list . ({body}))")
    inner = "(" + " ".join(fields) + ")"
    if lexpr:
        msg = f'((type . "BACKTEST_RESULT") (result {inner}))'
    else:
        msg = f'((type . "BACKTEST_RESULT") (result . {inner}))'
    return msg.encode("utf-8")


# ----------------------------------------------------------------------------
# pair evaluation (PROTOCOL.md section 5)

def pair_candidates(n_strategies: int, seed: int = 0, trades: int = 120) -> list[Candidate]:
    """Random complete results: ``trades`` trades each over one year, PnL
    normal with a per-strategy drift, ranks A/S, five symbol|timeframe groups."""
    rng = np.random.default_rng(seed)
    start = 1_700_000_000
    out = []
    for s in range(n_strategies):
        ts = np.sort(rng.integers(start, start + 365 * SECONDS_PER_DAY, size=trades))
        pn = rng.normal(rng.normal(0.05, 0.1), 1.0, size=trades)
        out.append(
            Candidate(
                name=f"strat-{s:05d}",
                status="complete",
                sharpe=float(pn.mean() / pn.std()),
                rank="AS"[s % 2],
                symbol=("USDJPY", "EURUSD", "GBPUSD", "AUDUSD", "XAUUSD")[s % 5],
                timeframe=60,
                timestamps=ts,
                pnls=pn,
            )
        )
    return out

