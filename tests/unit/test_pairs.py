"""Unit tests for pairlane.pairs: swimmy's Pair-Composite vectors, a
plain-Python reference implementation checked against the vectorised
evaluate(), exclusion accounting, bucketing and the read-only loader."""

from __future__ import annotations

import math
import sqlite3
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from pairlane import pairs, synthetic
from pairlane.pairs import (
    REASONS,
    Candidate,
    PairsConfig,
    align,
    bucket_series,
    composite_metrics,
    evaluate,
    inverse_vol_weights,
    load_candidates,
    pair_id,
    pearson,
)

DAY = 86400
MIDNIGHT = 1_700_006_400  # 2023-11-15 00:00:00 UTC, a multiple of 86400
assert MIDNIGHT % DAY == 0


# ----------------------------------------------------------------- reference


def fnv1a64(text: str) -> str:
    h = 0xCBF29CE484222325
    for byte in text.encode("utf-8"):
        h ^= byte
        h = (h * 0x100000001B3) % (1 << 64)
    return "%016x" % h


def ref_series(ts, pn, window, bucket):
    order = sorted(range(len(ts)), key=lambda k: ts[k])  # Python's sort is stable
    if len(order) > window:
        order = order[len(order) - window :]
    sums: dict[int, float] = {}
    for k in order:
        key = ts[k] // DAY if bucket == "day" else ts[k]
        sums[key] = sums.get(key, 0.0) + pn[k]
    return {key: sums[key] for key in sorted(sums)}


def ref_mean(xs):
    return sum(xs) / len(xs)


def ref_var(xs):
    m = ref_mean(xs)
    return sum((x - m) ** 2 for x in xs) / len(xs)


def ref_corr(xs, ys):
    mx, my = ref_mean(xs), ref_mean(ys)
    num = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    dx = sum((x - mx) ** 2 for x in xs)
    dy = sum((y - my) ** 2 for y in ys)
    if dx == 0 or dy == 0:
        return 0.0
    return num / math.sqrt(dx * dy)


def ref_pair(name_a, sa, name_b, sb):
    keys = sorted(set(sa) | set(sb))
    xs = [sa.get(k, 0.0) for k in keys]
    ys = [sb.get(k, 0.0) for k in keys]
    corr = ref_corr(xs, ys)
    va, vb = ref_var(xs), ref_var(ys)
    sda, sdb = math.sqrt(va), math.sqrt(vb)
    w1 = 1.0 / sda if sda else 0.0
    w2 = 1.0 / sdb if sdb else 0.0
    wa, wb = (w1 / (w1 + w2), w2 / (w1 + w2)) if w1 + w2 > 0 else (0.5, 0.5)
    p = []
    for x, y in zip(xs, ys):
        v = wa * x + wb * y
        if abs(v) <= 1e-12 * (abs(wa * x) + abs(wb * y)):
            v = 0.0
        p.append(v)
    var_p = ref_var(p)
    if var_p <= 1e-12 * (wa * wa * va + wb * wb * vb) or var_p == 0:
        sharpe = 0.0
    else:
        sharpe = ref_mean(p) / math.sqrt(var_p)
    gains = sum(v for v in p if v > 0)
    losses = sum(-v for v in p if v < 0)
    pf = gains / losses if losses > 0 else 0.0
    return {
        "pair_id": fnv1a64(f"{name_a}|{name_b}"),
        "strategy_a": name_a,
        "strategy_b": name_b,
        "weight_a": wa,
        "weight_b": wb,
        "corr": corr,
        "sharpe": sharpe,
        "profit_factor": pf,
        "score": 0.7 * sharpe + 0.3 * pf,
    }


def ref_evaluate(cands, cfg):
    """Plain-Python Pair-Composite: returns (excluded, candidates, kept pairs
    (unsorted, untruncated), all pairs)."""
    excluded = {r: 0 for r in REASONS}
    latest = {}
    for c in cands:
        latest[c.name] = c
    ranks = {r.upper() for r in cfg.ranks}
    pool = []
    for c in latest.values():
        if c.status != "complete":
            excluded["missing"] += 1
        elif c.rank is not None and c.rank.upper() not in ranks:
            excluded["rank"] += 1
        else:
            pool.append(c)
    groups = {}
    for c in pool:
        groups.setdefault((c.symbol or "", c.timeframe or 0), []).append(c)
    chosen = []
    for members in groups.values():
        members = sorted(members, key=lambda c: (-(c.sharpe or 0.0), c.name))
        chosen += members[: cfg.per_group]
        excluded["not_top_n"] += len(members[cfg.per_group :])
    series = {}
    for c in chosen:
        ts = [int(t) for t in c.timestamps]
        pn = [float(p) for p in c.pnls]
        if len(ts) < cfg.min_trades:
            excluded["too_few_trades"] += 1
            continue
        s = ref_series(ts, pn, cfg.window_trades, cfg.bucket)
        vals = list(s.values())
        if not vals or max(vals) - min(vals) <= 1e-12 * max(abs(v) for v in vals):   # flat but for rounding
            excluded["zero_variance"] += 1
            continue
        series[c.name] = s
    names = sorted(series)
    allp = [
        ref_pair(a, series[a], b, series[b]) for ai, a in enumerate(names) for b in names[ai + 1 :]
    ]
    kept = [p for p in allp if abs(p["corr"]) <= cfg.corr_max]
    if len(kept) < cfg.max_pairs:
        kept += [p for p in allp if cfg.corr_max < abs(p["corr"]) <= cfg.rescue_corr_max]
    return excluded, len(names), kept, allp


def close(a, b, tol=1e-7):
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def check_against_reference(cands, cfg, property_test=False):
    ev = evaluate(cands, cfg)
    excluded, n, kept, allp = ref_evaluate(cands, cfg)
    assert ev.excluded == excluded
    assert ev.candidates == n
    for p in allp:  # threshold ties are decided by rounding; not meaningful
        for thr in (cfg.corr_max, cfg.rescue_corr_max):
            clear = abs(abs(p["corr"]) - thr) > 1e-9
            if property_test:
                assume(clear)
            else:
                assert clear, "fixture sits on a threshold"
    assert len(kept) == len({p["pair_id"] for p in kept}), "reference duplicated a pair"
    assert len(ev.slots) == min(cfg.max_pairs, len(kept))
    assert ev.safe_stop == (not ev.slots)
    by_id = {p["pair_id"]: p for p in kept}
    assert len({s.pair_id for s in ev.slots}) == len(ev.slots)
    for s in ev.slots:
        assert s.pair_id in by_id
        ref = by_id[s.pair_id]
        assert s.strategy_a < s.strategy_b
        for key in ("strategy_a", "strategy_b"):
            assert getattr(s, key) == ref[key]
        for key in ("weight_a", "weight_b", "corr", "sharpe", "profit_factor", "score"):
            assert close(getattr(s, key), ref[key]), (key, getattr(s, key), ref[key])
    for s, t in zip(ev.slots, ev.slots[1:]):
        assert s.score >= t.score - 1e-9
        if s.score == t.score:
            assert s.pair_id < t.pair_id
    if ev.slots:
        chosen = {s.pair_id for s in ev.slots}
        worst = min(s.score for s in ev.slots)
        for p in kept:
            if p["pair_id"] not in chosen:
                assert p["score"] <= worst + 1e-7
    return ev


def cand(name, ts, pn, status="complete", sharpe=1.0, rank=None, symbol=None, timeframe=None):
    return Candidate(name, status, sharpe, rank, symbol, timeframe, np.array(ts, np.int64), np.array(pn, float))


LOOSE = dict(min_trades=1, window_trades=100, per_group=1000)


# ------------------------------------------------------------ swimmy vectors


def test_composite_vector():
    sharpe, pf, score = composite_metrics([1.0, -0.5, 1.0, -0.5])
    assert sharpe == pytest.approx(0.333333, abs=1e-6)
    assert pf == pytest.approx(2.0)
    assert score == pytest.approx(0.833333, abs=1e-6)


def test_composite_edge_cases():
    assert composite_metrics([]) == (0.0, 0.0, 0.0)
    assert composite_metrics([1.0, 1.0]) == (0.0, 0.0, 0.0)  # flat, no losses
    assert composite_metrics([1.0, 3.0])[1] == 0.0  # no losses -> PF 0


def test_inverse_vol_vector():
    wa, wb = inverse_vol_weights([1.0, -1.0], [2.0, -2.0])
    assert wa == pytest.approx(0.666667, abs=1e-6)
    assert wb == pytest.approx(0.333333, abs=1e-6)
    assert inverse_vol_weights([1.0, 1.0], [2.0, 2.0]) == (0.5, 0.5)
    assert inverse_vol_weights([1.0, 1.0], [2.0, -2.0]) == (0.0, 1.0)
    assert inverse_vol_weights([2.0, -2.0], [1.0, 1.0]) == (1.0, 0.0)


def test_correlation_vectors():
    x = [1.0, -2.0, 3.5, 0.0, 7.0]
    assert pearson(x, x) == pytest.approx(1.0)
    assert pearson(x, [-v for v in x]) == pytest.approx(-1.0)
    assert pearson(x, [2.0] * 5) == 0.0
    assert pearson([], []) == 0.0


def test_pair_id_vectors():
    assert fnv1a64("") == "cbf29ce484222325"  # published FNV-1a 64 test vectors
    assert fnv1a64("a") == "af63dc4c8601ec8c"
    assert pair_id("alpha", "beta") == pair_id("beta", "alpha") == fnv1a64("alpha|beta")
    assert pair_id("Zed", "abc") == fnv1a64("Zed|abc")  # code-point order: 'Z' < 'a'
    assert pair_id("é-strat", "e-strat") == fnv1a64("e-strat|é-strat")
    pid = pair_id("x", "y")
    assert len(pid) == 16 and pid == pid.lower() and int(pid, 16) >= 0


def test_evaluate_reproduces_composite_vector():
    t = [MIDNIGHT + k for k in range(4)]
    a = cand("A", t[:2], [2.0, -1.0])
    b = cand("B", t[2:], [2.0, -1.0])
    ev = evaluate([a, b], PairsConfig(bucket="exact", **LOOSE))
    (s,) = ev.slots
    assert (s.strategy_a, s.strategy_b, s.pair_id) == ("A", "B", pair_id("A", "B"))
    assert s.weight_a == pytest.approx(0.5) and s.weight_b == pytest.approx(0.5)
    assert s.sharpe == pytest.approx(0.333333, abs=1e-6)
    assert s.profit_factor == pytest.approx(2.0)
    assert s.score == pytest.approx(0.833333, abs=1e-6)
    assert not ev.safe_stop and ev.candidates == 2


def test_evaluate_weights_and_correlation_extremes():
    t = [MIDNIGHT, MIDNIGHT + 1]
    cfg = PairsConfig(bucket="exact", corr_max=1.0, rescue_corr_max=1.0, **LOOSE)
    (s,) = evaluate([cand("a", t, [1.0, -1.0]), cand("b", t, [2.0, -2.0])], cfg).slots
    assert s.weight_a == pytest.approx(0.666667, abs=1e-6)
    assert s.weight_b == pytest.approx(0.333333, abs=1e-6)
    assert s.corr == pytest.approx(1.0)
    (s,) = evaluate([cand("a", t, [1.0, -3.0]), cand("b", t, [1.0, -3.0])], cfg).slots
    assert s.corr == pytest.approx(1.0)
    (s,) = evaluate([cand("a", t, [1.0, -3.0]), cand("b", t, [-1.0, 3.0])], cfg).slots
    assert s.corr == pytest.approx(-1.0)
    assert s.sharpe == 0.0 and s.profit_factor == 0.0  # the composite is flat
    # both excluded by the default thresholds
    assert evaluate([cand("a", t, [1.0, -3.0]), cand("b", t, [-1.0, 3.0])], PairsConfig(bucket="exact", **LOOSE)).safe_stop


# ------------------------------------------------------------- bucketing


def test_day_buckets_split_at_utc_midnight():
    ts = [MIDNIGHT - 1, MIDNIGHT + 1]  # 23:59:59 and 00:00:01 UTC
    keys, vals = bucket_series(np.array(ts), np.array([1.0, 2.0]), 100, "day")
    assert keys.tolist() == [MIDNIGHT // DAY - 1, MIDNIGHT // DAY]
    assert vals.tolist() == [1.0, 2.0]
    keys, vals = bucket_series(np.array([MIDNIGHT + 1, MIDNIGHT + DAY - 1]), np.array([1.0, 2.0]), 100, "day")
    assert keys.tolist() == [MIDNIGHT // DAY] and vals.tolist() == [3.0]
    # through evaluate: across midnight two buckets (variance), same day one (none)
    cfg = PairsConfig(bucket="day", **LOOSE)
    other = cand("o", [MIDNIGHT + 5 * DAY, MIDNIGHT + 6 * DAY], [1.0, -2.0])
    ev = evaluate([cand("x", ts, [1.0, -1.0]), other], cfg)
    assert ev.excluded["zero_variance"] == 0 and ev.candidates == 2
    ev = evaluate([cand("x", [MIDNIGHT + 1, MIDNIGHT + DAY - 1], [1.0, -1.0]), other], cfg)
    assert ev.excluded["zero_variance"] == 1 and ev.candidates == 1 and ev.safe_stop
    # exact mode keeps them apart
    ev = evaluate([cand("x", [MIDNIGHT + 1, MIDNIGHT + DAY - 1], [1.0, -1.0]), other], PairsConfig(bucket="exact", **LOOSE))
    assert ev.excluded["zero_variance"] == 0


def test_window_is_last_trades_by_timestamp_stable():
    ts = np.array([50, 10, 30, 30, 20])
    pn = np.array([5.0, 1.0, 3.0, 4.0, 2.0])
    keys, vals = bucket_series(ts, pn, 3, "exact")
    assert keys.tolist() == [30, 50] and vals.tolist() == [7.0, 5.0]
    keys, vals = bucket_series(ts, pn, 2, "exact")  # ties keep input order: 3.0 before 4.0
    assert keys.tolist() == [30, 50] and vals.tolist() == [4.0, 5.0]
    keys, vals = bucket_series(np.array([], np.int64), np.array([]), 5, "day")
    assert keys.size == 0 and vals.size == 0


@pytest.mark.parametrize("bucket", ["day", "exact"])
def test_bucketing_all_candidates_at_once_equals_one_by_one(bucket):
    """evaluate buckets every candidate in one pass: the same keys and bit-identical sums as
    bucket_series per candidate (equal timestamps, windows cutting runs of them, empty ones)."""
    rng = np.random.default_rng(8)
    cands = []
    for k in range(60):
        m = int(rng.integers(0, 40)) if k % 9 else 0
        ts = MIDNIGHT + rng.integers(0, 5, size=m) * (DAY // 3) + rng.integers(0, 2, size=m)
        cands.append(cand(f"b{k}", ts, rng.normal(size=m) * 10.0 ** rng.integers(-3, 4, size=m)))
    in_order = [cand(c.name, np.sort(c.timestamps, kind="stable"), c.pnls[np.argsort(c.timestamps, kind="stable")])
                for c in cands]  # as loaded: the one-pass path skips its sort
    for window, cands in [(w, cs) for w in (1, 4, 17, 100) for cs in (cands, in_order)]:
        together = pairs._bucket_all(cands, window, bucket)
        assert len(together) == len(cands)
        for c, (keys, vals) in zip(cands, together):
            want_k, want_v = bucket_series(c.timestamps, c.pnls, window, bucket)
            assert keys.dtype == np.int64 and vals.dtype == np.float64
            assert keys.tolist() == want_k.tolist() and vals.tobytes() == want_v.tobytes()
    assert pairs._bucket_all([], 5, bucket) == []


def test_align_union_zero_filled():
    xa, xb = align(np.array([1, 3]), np.array([1.0, 3.0]), np.array([2, 3]), np.array([20.0, 30.0]))
    assert xa.tolist() == [1.0, 0.0, 3.0] and xb.tolist() == [0.0, 20.0, 30.0]


# -------------------------------------------------------------- exclusions


def test_zero_variance_and_empty_series():
    cfg = PairsConfig(bucket="exact", min_trades=0, per_group=10)
    t = [MIDNIGHT + k for k in range(3)]
    ev = evaluate(
        [
            cand("const", t, [1.5, 1.5, 1.5]),
            cand("empty", [], []),
            cand("single", t[:1], [4.0]),
            cand("ok1", t, [1.0, -1.0, 2.0]),
            cand("ok2", t, [-2.0, 1.0, 1.0]),
        ],
        cfg,
    )
    assert ev.excluded["zero_variance"] == 3
    assert ev.candidates == 2
    assert sum(ev.excluded.values()) + ev.candidates == 5


def test_a_series_flat_but_for_the_rounding_of_its_sums_has_zero_variance():
    """Found by hypothesis: day sums of 0.45 and 0.89 + 0.5 - 0.94 are equal, but one summation order
    gives 0.44999999999999996. Counted as two distinct values, such a strategy stayed in, and with
    weight ~1 on it a pair's Sharpe came out near 1e16 (the reference, summing in another order,
    excluded it). Equal within 1e-12 of the largest magnitude is flat, in either order."""
    cfg = PairsConfig(bucket="day", min_trades=1, per_group=10, window_trades=10)
    day2 = [MIDNIGHT + DAY + k for k in range(3)]
    for pnls in ([0.89, 0.5, -0.94], [-0.94, 0.5, 0.89], [0.5, -0.94, 0.89]):
        ev = evaluate([cand("flat", [MIDNIGHT] + day2, [0.45] + pnls),
                       cand("ok1", [MIDNIGHT, MIDNIGHT + DAY], [1.0, -1.0]),
                       cand("ok2", [MIDNIGHT, MIDNIGHT + DAY], [-2.0, 1.5])], cfg)
        assert ev.excluded["zero_variance"] == 1 and ev.candidates == 2, pnls
    check_against_reference([cand("flat", [MIDNIGHT] + day2, [0.45, 0.89, 0.5, -0.94]),
                             cand("ok1", [MIDNIGHT, MIDNIGHT + DAY], [1.0, -1.0])], cfg)


def test_exclusion_reasons_counted_exactly_once():
    t = [MIDNIGHT + k * DAY for k in range(5)]
    good = [1.0, -1.0, 2.0, 0.5, -0.25]
    cands = [
        # missing beats everything else that is wrong with it
        cand("m1", t[:1], [1.0], status="failed", rank="B"),
        cand("m2", [], [], status="abandoned"),
        # rank beats top-N and too few trades
        cand("r1", t[:1], [1.0], rank="B", sharpe=99.0, symbol="X"),
        # not_top_n: group X keeps the best 2 of x1..x3 (x3 also has too few trades)
        cand("x1", t, good, rank="A", sharpe=3.0, symbol="X"),
        cand("x2", t, good[::-1], rank="s", sharpe=2.0, symbol="X"),
        cand("x3", t[:1], [1.0], rank="A", sharpe=1.0, symbol="X"),
        # too few trades beats zero variance
        cand("f1", t[:2], [1.0, 1.0], symbol="Y"),
        # zero variance
        cand("z1", t, [2.0] * 5, symbol="Z"),
        # no rank at all is eligible
        cand("n1", t, [0.5, 1.0, -2.0, 1.0, 3.0], rank=None, symbol="W"),
    ]
    ev = evaluate(cands, PairsConfig(per_group=2, min_trades=3, bucket="day"))
    assert ev.excluded == {"missing": 2, "rank": 1, "not_top_n": 1, "too_few_trades": 1, "zero_variance": 1}
    assert ev.candidates == 3
    assert sum(ev.excluded.values()) + ev.candidates == len(cands)
    assert set(ev.excluded) == set(REASONS)


def test_top_n_ties_by_name_and_none_sharpe_as_zero():
    t = [MIDNIGHT + k * DAY for k in range(3)]
    cfg = PairsConfig(per_group=1, min_trades=1, corr_max=1.0, rescue_corr_max=1.0)
    # 'b' (sharpe None = 0.0) loses to 'a' (0.0) by name, 'c' is alone in its group
    ev = evaluate(
        [cand("b", t, [1.0, -1.0, 2.0], sharpe=None), cand("a", t, [2.0, 1.0, -1.0], sharpe=0.0), cand("c", t, [0.0, 1.0, -3.0], symbol="S")],
        cfg,
    )
    assert ev.excluded["not_top_n"] == 1
    assert {(s.strategy_a, s.strategy_b) for s in ev.slots} == {("a", "c")}


def test_safe_stop_when_all_have_too_few_trades():
    t = [MIDNIGHT + k * DAY for k in range(10)]
    rng = np.random.default_rng(3)
    cands = [cand(f"s{k}", t, rng.normal(size=10)) for k in range(6)]
    ev = evaluate(cands, PairsConfig(min_trades=11))
    assert ev.safe_stop and ev.slots == [] and ev.candidates == 0
    assert ev.excluded["too_few_trades"] == 6
    assert ev.as_dict()["safe_stop"] is True
    assert evaluate([], PairsConfig()).safe_stop
    ev = evaluate(cands, PairsConfig(min_trades=10, corr_max=1.0, rescue_corr_max=1.0))
    assert len(ev.slots) == 5 and not ev.safe_stop


def test_duplicate_name_last_wins():
    t = [MIDNIGHT + k * DAY for k in range(3)]
    ev = evaluate([cand("a", t, [1.0, 2.0, -1.0]), cand("a", [], [], status="failed")], PairsConfig(min_trades=1))
    assert ev.excluded["missing"] == 1 and ev.candidates == 0


# ------------------------------------------------------------------ rescue


def _rescue_fixture():
    """Series with hand-picked correlations on shared exact buckets."""
    rng = np.random.default_rng(11)
    base = rng.normal(size=40)
    t = [MIDNIGHT + k for k in range(40)]
    out = []
    for k, rho in enumerate([0.0, 0.1, 0.15, 0.2, 0.25, 0.28]):
        noise = rng.normal(size=40)
        out.append(cand(f"s{k}", t, rho * base + math.sqrt(1 - rho * rho) * noise))
    return out


def test_rescue_adds_band_without_duplicates():
    cands = _rescue_fixture()
    for corr_max, rescue in [(0.05, 0.3), (0.1, 0.3), (0.15, 0.25), (0.2, 0.3), (0.0, 1.0)]:
        for max_pairs in (1, 3, 5, 15, 20):
            cfg = PairsConfig(bucket="exact", corr_max=corr_max, rescue_corr_max=rescue, max_pairs=max_pairs, **LOOSE)
            ev = check_against_reference(cands, cfg)
            ids = [s.pair_id for s in ev.slots]
            assert ids, (corr_max, rescue, max_pairs)  # every setting here keeps at least one pair
            assert len(ids) == len(set(ids))
            _, _, kept, allp = ref_evaluate(cands, cfg)
            first = [p for p in allp if abs(p["corr"]) <= corr_max]
            if len(first) >= max_pairs:
                assert all(abs(s.corr) <= corr_max for s in ev.slots)
            else:
                assert len(ev.slots) == min(max_pairs, len(kept))


def test_ties_broken_by_pair_id():
    t = [MIDNIGHT + k * DAY for k in range(6)]
    twin = [1.0, -2.0, 0.5, 3.0, -1.0, 0.25]
    other = [0.5, 1.0, -1.0, 0.25, 2.0, -0.75]
    cands = [cand("twin1", t, twin), cand("twin2", t, twin), cand("zz", t, other)]
    cfg = dict(corr_max=1.0, rescue_corr_max=1.0, **LOOSE)
    ev = evaluate(cands, PairsConfig(max_pairs=2, **cfg))
    assert ev.slots[0].score == ev.slots[1].score
    assert [s.pair_id for s in ev.slots] == sorted([pair_id("twin1", "zz"), pair_id("twin2", "zz")])
    ev = evaluate(cands, PairsConfig(max_pairs=1, **cfg))
    assert ev.slots[0].pair_id == min(pair_id("twin1", "zz"), pair_id("twin2", "zz"))


# ------------------------------------------------------ property and scale

pnl_values = st.integers(-32, 32).map(lambda v: v / 4.0)  # exact binary sums
ts_values = st.builds(
    lambda d, s: MIDNIGHT + d * DAY + s,
    st.integers(-2, 3),
    st.sampled_from([0, 1, 3600, 43200, DAY - 1]),
)


@st.composite
def candidate_lists(draw):
    n = draw(st.integers(0, 7))
    out = []
    for k in range(n):
        m = draw(st.integers(0, 12))
        out.append(
            Candidate(
                name=draw(st.sampled_from(["a", "b", "B", "c", "dd", "é", "x1", "x2"])) + str(k % 3),
                status=draw(st.sampled_from(["complete"] * 6 + ["failed", "abandoned"])),
                sharpe=draw(st.one_of(st.none(), st.sampled_from([0.0, 0.5, 1.0, 2.0]))),
                rank=draw(st.sampled_from([None, None, "A", "S", "B"])),
                symbol=draw(st.sampled_from([None, "EURUSD", "USDJPY"])),
                timeframe=draw(st.sampled_from([None, 15, 60])),
                timestamps=np.array(draw(st.lists(ts_values, min_size=m, max_size=m)), np.int64),
                pnls=np.array(draw(st.lists(pnl_values, min_size=m, max_size=m)), np.float64),
            )
        )
    return out


@st.composite
def configs(draw):
    corr_max = draw(st.sampled_from([0.07, 0.17, 0.23, 0.31, 0.47, 0.61]))
    return PairsConfig(
        per_group=draw(st.integers(1, 4)),
        min_trades=draw(st.integers(0, 5)),
        window_trades=draw(st.integers(1, 10)),
        bucket=draw(st.sampled_from(["day", "exact"])),
        corr_max=corr_max,
        rescue_corr_max=corr_max + draw(st.sampled_from([0.0, 0.09, 0.19])),
        max_pairs=draw(st.integers(0, 6)),
    )


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(candidate_lists(), configs())
def test_evaluate_matches_reference(cands, cfg):
    check_against_reference(cands, cfg, property_test=True)


def _random_pool(n, trades, seed, span_days):
    return _drift_pool(n, trades, seed, span_days, 0.1, prefix="p", share_every=7, share_hours=50, spread=0.2)


@pytest.mark.parametrize("bucket", ["day", "exact"])
def test_pruned_selection_matches_brute_force(bucket):
    cands = _random_pool(70, 30, seed=5, span_days=40)
    cfg = PairsConfig(min_trades=20, window_trades=25, per_group=1000, bucket=bucket, max_pairs=7)
    ev = check_against_reference(cands, cfg)
    assert len(ev.slots) == 7  # the pool fills every slot, so the checks above ran on 7 pairs


def test_dense_and_light_paths_agree(monkeypatch):
    cands = _random_pool(40, 30, seed=9, span_days=20)
    cfg = PairsConfig(min_trades=10, window_trades=30, per_group=1000, max_pairs=8, corr_max=0.3, rescue_corr_max=0.4)
    results = []
    for share in (2, 10**9):  # everything through BLAS, then everything enumerated
        monkeypatch.setattr(pairs, "_DENSE_MIN_SHARE", share)
        monkeypatch.setattr(pairs, "_BLOCK_ELEMS", 64)  # many row blocks
        results.append(evaluate(cands, cfg).as_dict()["slots"])
    assert len(results[0]) == 8, results[0]  # every slot filled: the comparison below is not vacuous
    assert [s["pair_id"] for s in results[0]] == [s["pair_id"] for s in results[1]]
    for a, b in zip(*results):
        for key in ("weight_a", "corr", "sharpe", "profit_factor", "score"):
            assert close(a[key], b[key], 1e-9)


@pytest.mark.parametrize("share", [2, 10**9])   # dense (BLAS) products, then light (enumerated) ones
@pytest.mark.parametrize("bucket", ["day", "exact"])
def test_score_bounds_never_fall_below_the_exact_score(monkeypatch, share, bucket):
    """The pruning bounds (cheap ones, then Hoelder) hold for every pair: a bound below a pair's
    exact score would drop that pair from the selection unseen."""
    monkeypatch.setattr(pairs, "_DENSE_MIN_SHARE", share)
    cands = _random_pool(60, 30, seed=21, span_days=30)
    series = [bucket_series(c.timestamps, c.pnls, 30, bucket) for c in cands]
    mx = pairs._Matrix(series)
    n = len(series)
    blk = mx.block(0, n - 1, 1)
    d = pairs._block_pairs(mx, 0, n - 1, 1, blk)
    valid = np.arange(1, n)[None, :] > np.arange(0, n - 1)[:, None]
    g = pairs._gather(d, valid, 0, 1)
    cheap = g["ub"].copy()
    pairs._holder_bound(mx, g, blk)
    checked = 0
    for q in range(g["i"].size):
        i, j = int(g["i"][q]), int(g["j"][q])
        ka, va = series[i]
        kb, vb = series[j]
        exact = ref_pair("a", dict(zip(ka.tolist(), va.tolist())), "b", dict(zip(kb.tolist(), vb.tolist())))
        assert close(exact["sharpe"], float(g["sharpe"][q]), 1e-9)
        assert cheap[q] >= exact["score"] and g["ub"][q] >= exact["score"], (i, j, exact, cheap[q], g["ub"][q])
        checked += 1
    assert checked == n * (n - 1) // 2
    assert float(np.median(cheap)) < 50   # and the cheap bound is a real bound, not infinity


# ------------------------------------------- screened tiles (issue 16)


_SCREENED_PAIRS = pairs._screened_pairs  # the real one (hypothesis reuses a monkeypatched module)


def _force_screen(monkeypatch, share, rows=3, cols=5):
    """Small tiles and a one-row first block, so that a small pool goes through
    the screened path; returns the list of rows it started at (one per run)."""
    monkeypatch.setattr(pairs, "_FIRST_BLOCK_ELEMS", 1)
    monkeypatch.setattr(pairs, "_TILE_ROWS", rows)
    monkeypatch.setattr(pairs, "_TILE_COLS", cols)
    monkeypatch.setattr(pairs, "_FLUSH_PAIRS", 3)
    monkeypatch.setattr(pairs, "_DENSE_MIN_SHARE", share)
    started = []

    def spy(mx, top, r0, corr_max):
        started.append(r0)
        return _SCREENED_PAIRS(mx, top, r0, corr_max)

    monkeypatch.setattr(pairs, "_screened_pairs", spy)
    return started


def _drift_pool(n, trades, seed, span_days, drift, *, prefix="q", share_every=5, share_hours=20, spread=0.3):
    """n candidates whose mean pnl is drawn around `drift`; every `share_every`-th shares exact
    timestamps (half its trades on whole hours of the first `share_hours`)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        ts = MIDNIGHT + rng.integers(0, span_days * DAY, size=trades)
        if k % share_every == 0:  # some exact-timestamp sharing
            ts[: trades // 2] = MIDNIGHT + rng.integers(0, share_hours, size=trades // 2) * 3600
        pn = np.round(rng.normal(rng.normal(drift, spread), 1.0, size=trades), 2)
        out.append(cand(f"{prefix}{k:03d}", ts, pn, sharpe=float(rng.normal())))
    return out


@pytest.mark.parametrize("share", [2, 10**9])   # dense (float32 BLAS) screen sums, then light (enumerated)
@pytest.mark.parametrize("bucket", ["day", "exact"])
def test_screened_evaluation_matches_reference(monkeypatch, share, bucket):
    """Pairs past the first blocks are screened in tiles without their cross
    products, then evaluated exactly: the slots equal the plain reference's."""
    started = _force_screen(monkeypatch, share)
    hit = 0
    for seed in range(6):
        cands = _drift_pool(45, 24, seed=100 + seed, span_days=25, drift=0.4)
        cfg = PairsConfig(min_trades=10, window_trades=20, per_group=1000, bucket=bucket, max_pairs=1 + seed % 4)
        before = len(started)
        ev = check_against_reference(cands, cfg)
        hit += len(started) > before and started[-1] < 40
        assert len(ev.slots) == cfg.max_pairs
    assert hit >= 5, started  # the screen really ran, over most of each pool


@st.composite
def screened_cases(draw):
    corr_max = draw(st.sampled_from([0.05, 0.12, 0.2, 0.35, 0.6]))
    cfg = PairsConfig(
        min_trades=4,
        window_trades=draw(st.integers(4, 20)),
        per_group=1000,
        bucket=draw(st.sampled_from(["day", "exact"])),
        corr_max=corr_max,
        rescue_corr_max=corr_max + draw(st.sampled_from([0.0, 0.1])),
        max_pairs=draw(st.integers(1, 6)),
    )
    pool = _drift_pool(draw(st.integers(6, 30)), draw(st.integers(4, 24)), draw(st.integers(0, 2**32 - 1)),
                       draw(st.integers(2, 40)), draw(st.sampled_from([0.0, 0.2, 0.6, 1.5])))
    tiles = (draw(st.integers(1, 5)), draw(st.integers(1, 7)))
    return pool, cfg, tiles, draw(st.sampled_from([2, 3, 10**9]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(screened_cases())
def test_screened_evaluation_matches_reference_on_random_pools(monkeypatch, case):
    pool, cfg, tiles, share = case
    started = _force_screen(monkeypatch, share, *tiles)
    check_against_reference(pool, cfg, property_test=True)
    event("screened" if started else "blocks only")  # --hypothesis-show-statistics


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # x^4 overflows at 1e100 (the Hoelder sums only)
@pytest.mark.parametrize("scale", [1.0, 1e-150, 1e-40, 1e40, 1e100])
def test_screened_and_unscreened_evaluations_agree(monkeypatch, scale):
    """The same slots with the screen and without it (corr_max above _SCREEN_CORR_MAX turns it
    off), also when some strategies' bucket sums are beyond float32's range (the screen's E then
    takes float64 products: float32 ones underflowed to 0 and dropped the best pair)."""
    cands = _drift_pool(45, 24, seed=404, span_days=25, drift=0.5)
    for c in cands[::4]:
        c.pnls = c.pnls * scale
    cfg = PairsConfig(min_trades=10, window_trades=20, per_group=1000, max_pairs=4)
    started = _force_screen(monkeypatch, 2)
    screened = evaluate(cands, cfg).as_dict()
    assert started and started[0] < 40
    monkeypatch.setattr(pairs, "_SCREEN_CORR_MAX", -1.0)
    plain = evaluate(cands, cfg).as_dict()
    assert len(started) == 1  # the second run never screened
    slots, want = screened.pop("slots"), plain.pop("slots")
    assert len(want) == cfg.max_pairs and screened == plain
    assert [(s["pair_id"], s["strategy_a"], s["strategy_b"]) for s in slots] == \
        [(s["pair_id"], s["strategy_a"], s["strategy_b"]) for s in want]
    for a, b in zip(slots, want):  # the values, to rounding
        for key in ("weight_a", "weight_b", "corr", "sharpe", "profit_factor", "score"):
            assert close(a[key], b[key], 1e-9), (key, a, b)


@pytest.mark.parametrize("share", [2, 10**9])
@pytest.mark.parametrize("bucket", ["day", "exact"])
@pytest.mark.parametrize("corr_max", [0.1, 0.3, 0.8])
def test_screen_keeps_every_pair_that_can_reach_the_threshold(monkeypatch, share, bucket, corr_max):
    """The screen (float32 products, Sharpe bounded through corr >= -corr_max) is a
    relaxation of the exact path's test |corr| <= corr_max and ub >= theta: a pair
    it dropped that passes that test would be lost from the selection unseen."""
    monkeypatch.setattr(pairs, "_DENSE_MIN_SHARE", share)
    for seed, drift in ((31, 0.3), (32, 1.0), (33, 0.0)):
        cands = _drift_pool(60, 30, seed=seed, span_days=30, drift=drift)
        series = [bucket_series(c.timestamps, c.pnls, 30, bucket) for c in cands]
        mx = pairs._Matrix(series)
        n = len(series)
        d = pairs._block_pairs(mx, 0, n - 1, 1, mx.block(0, n - 1, 1, ("K", "C", "E")))
        valid = np.arange(1, n)[None, :] > np.arange(0, n - 1)[:, None]
        eligible = valid & (np.abs(d["corr"]) <= corr_max)
        ubs = np.sort(d["ub"][eligible & np.isfinite(d["ub"])])
        pruned = 0
        for q in (0.5, 0.9, 0.99, 1.0):
            theta = float(ubs[min(ubs.size - 1, int(q * ubs.size))])
            if theta <= 0.301:
                continue
            screen = pairs._screen_tile(mx, 0, n - 1, 1, n, theta, corr_max)
            need = eligible & (d["ub"] >= theta)
            assert need.any()
            assert not (need & ~screen).any(), np.argwhere(need & ~screen)
            assert not (screen & ~valid).any()
            pruned += int((valid & ~screen).sum())
        assert pruned > 0  # and it is a screen, not a pass-through


@pytest.mark.parametrize("bucket", ["day", "exact"])
def test_bench_evaluates_every_synthetic_strategy(bucket):
    seconds = pairs.bench(40, bucket=bucket)
    assert math.isfinite(seconds) and seconds > 0.0
    # what bench times: all 40 strategies enter pairing and the top slots match the reference
    cands = synthetic.pair_candidates(40, 0)
    assert len(cands) == 40
    ev = check_against_reference(cands, PairsConfig(per_group=40, bucket=bucket))
    assert ev.candidates == 40 and sum(ev.excluded.values()) == 0, ev.excluded
    assert len(ev.slots) == PairsConfig().max_pairs and not ev.safe_stop


# ------------------------------------------------------------------ config


def test_config_from_mapping():
    cfg = PairsConfig.from_mapping({"interval_s": 300, "ranks": ["S"], "bucket": "exact", "corr_max": 0, "max_pairs": 3})
    assert cfg == PairsConfig(ranks=("S",), bucket="exact", corr_max=0.0, max_pairs=3)
    assert PairsConfig.from_mapping({}) == PairsConfig()
    with pytest.raises(ValueError, match="pairs.nope"):
        PairsConfig.from_mapping({"nope": 1})
    with pytest.raises(ValueError, match="pairs.per_group"):
        PairsConfig.from_mapping({"per_group": "50"})
    with pytest.raises(ValueError, match="pairs.max_pairs"):
        PairsConfig.from_mapping({"max_pairs": True})
    with pytest.raises(ValueError, match="pairs.bucket"):
        PairsConfig.from_mapping({"bucket": "hour"})
    with pytest.raises(ValueError, match="pairs.ranks"):
        PairsConfig.from_mapping({"ranks": "AS"})


# ------------------------------------------------------------------ loading

SCHEMA = """
CREATE TABLE backtest_results (
    request_id TEXT PRIMARY KEY, strategy_name TEXT, status TEXT, total_trades INTEGER,
    sharpe REAL, profit_factor REAL, win_rate REAL, max_dd REAL, symbol TEXT,
    timeframe INTEGER, rank TEXT, oos_kind TEXT, truncated INTEGER,
    received_at REAL, completed_at REAL);
CREATE TABLE backtest_trade_logs (
    request_id TEXT, strategy_name TEXT, seq INTEGER, timestamp INTEGER, pnl REAL,
    symbol TEXT, direction TEXT, entry_price REAL, exit_price REAL, sl REAL, tp REAL,
    volume REAL, hold_time INTEGER, rank TEXT, timeframe INTEGER, category TEXT,
    regime TEXT, oos_kind TEXT);
CREATE INDEX btl_request ON backtest_trade_logs(request_id, seq);
CREATE INDEX btl_strategy ON backtest_trade_logs(strategy_name);
"""


def make_db(results, trades):
    conn = sqlite3.connect(":memory:")
    conn.executescript(SCHEMA)
    for r in results:
        conn.execute(
            "INSERT INTO backtest_results (request_id, strategy_name, status, total_trades, sharpe,"
            " symbol, timeframe, rank, completed_at) VALUES (?,?,?,?,?,?,?,?,?)",
            r,
        )
    conn.executemany(
        "INSERT INTO backtest_trade_logs (request_id, strategy_name, seq, timestamp, pnl) VALUES (?,?,?,?,?)",
        trades,
    )
    conn.commit()
    return conn


def test_load_candidates_latest_result_semantics():
    rows = lambda rid, name, pns, t0=MIDNIGHT: [(rid, name, k // 2, t0 + k * DAY, p) for k, p in enumerate(pns)]
    results = [
        ("r-old", "alpha", "complete", 2, 0.1, "EURUSD", 60, "A", 100.0),
        ("r-null", "alpha", "complete", 1, 0.1, "EURUSD", 60, "A", None),  # NULL = oldest
        ("r-new", "alpha", "complete", 3, 0.7, "EURUSD", 60, "S", 200.0),
        ("r-later-receiving", "alpha", "receiving", 9, None, None, None, None, 300.0),
        ("b1", "beta", "complete", 2, 0.5, None, None, None, 100.0),
        ("b2", "beta", "failed", 0, None, None, None, None, 200.0),  # failed latest
        ("g1", "gamma", "abandoned", 5, None, None, None, None, 50.0),
        ("d-a", "delta", "complete", 1, 0.2, None, None, None, 100.0),
        ("d-b", "delta", "complete", 2, 0.3, None, None, None, 100.0),  # tie: larger request_id
        ("e1", "eps", "spooled", 2, None, None, None, None, 100.0),  # never visible
    ]
    trades = (
        rows("r-old", "alpha", [9.0, 9.0])
        + rows("r-null", "alpha", [8.0])
        + rows("r-new", "alpha", [1.0, -1.0, 2.0])
        + rows("b1", "beta", [1.0, 2.0])
        + rows("d-a", "delta", [5.0])
        + rows("d-b", "delta", [3.0, 4.0])
        + rows("e1", "eps", [1.0, 2.0])
    )
    conn = make_db(results, trades)
    got = {c.name: c for c in load_candidates(conn)}
    assert set(got) == {"alpha", "beta", "gamma", "delta"}
    a = got["alpha"]
    assert (a.status, a.sharpe, a.rank, a.symbol, a.timeframe) == ("complete", 0.7, "S", "EURUSD", 60)
    assert a.pnls.tolist() == [1.0, -1.0, 2.0]
    assert a.timestamps.dtype == np.int64 and a.timestamps.tolist() == [MIDNIGHT + k * DAY for k in range(3)]
    assert got["beta"].status == "failed" and got["beta"].pnls.size == 0
    assert got["gamma"].status == "abandoned"
    assert got["delta"].pnls.tolist() == [3.0, 4.0]
    ev = evaluate(list(got.values()), PairsConfig(min_trades=1))
    assert ev.excluded["missing"] == 2

    windowed = {c.name: c for c in load_candidates(conn, window_trades=2)}
    assert windowed["alpha"].pnls.tolist() == [-1.0, 2.0]
    assert windowed["alpha"].trade_count == 3
    assert windowed["beta"].status == "failed"


def test_load_candidates_windowed_equals_full():
    rng = np.random.default_rng(21)
    results, trades = [], []
    for k in range(12):
        rid = f"req-{k:02d}"
        m = int(rng.integers(5, 40))
        status = "complete" if k % 5 else "failed"
        results.append((rid, f"s{k}", status, m, float(rng.normal()), "EURUSD", 60, "A", float(k)))
        # 20 timestamps half a day apart: many equal ones, and the last 12 trades span several UTC
        # days (on 2 days every pair correlates +-1 or is flat and no slot is ever filled)
        ts = MIDNIGHT + rng.integers(0, 20, size=m) * (DAY // 2)
        for q in range(m):
            trades.append((rid, f"s{k}", q // 4, int(ts[q]), float(rng.integers(-8, 9)) / 4))
    order = rng.permutation(len(trades))  # physical order must not matter
    conn = make_db(results, [trades[q] for q in order])
    cfg = PairsConfig(min_trades=10, window_trades=12, corr_max=0.5, rescue_corr_max=0.7)
    full = evaluate(load_candidates(conn), cfg)
    win = evaluate(load_candidates(conn, window_trades=cfg.window_trades), cfg)
    assert full.candidates > 2 and full.excluded["missing"] == 3
    assert len(full.slots) == cfg.max_pairs  # the comparison below compares filled slots
    assert full.as_dict() == win.as_dict()


def test_load_candidates_windowed_rows_are_each_results_last_trades():
    """The one-statement windowed load returns, per latest complete result, exactly the rows
    a per-result ``ORDER BY timestamp DESC, seq DESC, pnl DESC LIMIT window`` returns, in
    ascending order: ties at the window's boundary timestamp, results shorter than the
    window, equal (timestamp, seq) rows ordered by pnl."""
    rng = np.random.default_rng(77)
    results, trades = [], []
    for k in range(25):
        rid = f"w-{k:02d}"
        m = int(rng.integers(0, 30))
        results.append((rid, f"s{k}", "complete" if k % 6 else "abandoned", m, 0.1, None, None, "A", float(k)))
        ts = MIDNIGHT + rng.integers(0, 6, size=m) * 3600  # few distinct timestamps: many ties
        for q in range(m):
            trades.append((rid, f"s{k}", int(rng.integers(0, 3)), int(ts[q]), float(rng.integers(-4, 5))))
    conn = make_db(results, [trades[q] for q in rng.permutation(len(trades))])
    ref_sql = ("SELECT timestamp, pnl FROM backtest_trade_logs WHERE request_id = ? "
               "ORDER BY timestamp DESC, seq DESC, pnl DESC LIMIT ?")
    checked = 0
    for window in (1, 3, 7, 100):
        got = {c.name: c for c in load_candidates(conn, window_trades=window)}
        for rid, name, status, m, *_ in results:
            c = got[name]
            assert c.status == status
            if status != "complete":
                assert c.timestamps.size == 0
                continue
            want = conn.execute(ref_sql, (rid, window)).fetchall()[::-1]
            assert c.timestamps.tolist() == [t for t, _ in want] and c.pnls.tolist() == [p for _, p in want]
            assert c.trade_count == m
            checked += len(want) > 0 and m > window
    assert checked > 20  # the windows really cut results (often inside a run of equal timestamps)


def test_load_candidates_read_only_connection(tmp_path):
    path = tmp_path / "store.db"
    src = make_db(
        [("r1", "s1", "complete", 3, 1.0, None, None, "A", 1.0), ("r2", "s2", "failed", 0, None, None, None, None, 2.0)],
        [("r1", "s1", 0, MIDNIGHT + k, float(k)) for k in range(3)],
    )
    src.execute("VACUUM INTO ?", (str(path),))
    src.close()
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    before = conn.total_changes
    for window in (None, 2):
        got = {c.name: c for c in load_candidates(conn, window_trades=window)}
        assert got["s1"].trade_count == 3 and got["s2"].status == "failed"
        assert not conn.in_transaction
    assert conn.total_changes == before
    conn.execute("BEGIN")  # a caller's own read transaction is left alone
    load_candidates(conn)
    assert conn.in_transaction
    conn.execute("ROLLBACK")


# ------------------------------------------- the pairs actor's evaluation thread


class _ActorHarness:
    """A PairsActor outside Thespian: timers, logs, alerts and slot writes recorded, not sent."""

    def __init__(self, path):
        from pairlane.actors.pairs import PairsActor
        from pairlane.metrics import MetricBatch

        a = PairsActor.__new__(PairsActor)
        a.config = {"store": {"path": str(path)}, "pairs": {"interval_s": 3600.0}}
        a.cfg = PairsConfig(min_trades=1, per_group=1000)
        a.conn = None
        a.last = None
        a.evaluations = a.errors = a.abandoned = 0
        a.running = None
        a.waiting = []
        a._stopping = False
        a.metrics = MetricBatch()
        self.logs, self.written = [], []
        a.after = lambda delay, payload: None
        a.log = lambda level, event, **fields: self.logs.append((level, event, fields))
        a.flush_metrics = lambda: None
        a.alert = lambda *args: None
        a.write_slots = lambda result, respond=None: self.written.append(result)
        self.actor = a

    def poll_until(self, cond, what, timeout=20.0):
        """Drive the actor's eval_poll timer until cond() holds (what the 20 ms timer does)."""
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, what
            self.actor._poll()
            time.sleep(0.005)


def test_evaluation_past_its_deadline_is_given_up_reported_and_the_next_one_runs(monkeypatch, tmp_path):
    """An evaluation outliving EVALUATION_DEADLINE_S (made small here) is given up: its waiter gets
    an error saying why, it is logged and counted, the actor goes on (no restart), and the next
    evaluation runs on a reader connection of its own while the abandoned thread still runs; the
    abandoned result, arriving late, is dropped."""
    from pairlane.actors import pairs as pairs_actor

    path = tmp_path / "store.db"
    src = make_db([("r1", "s1", "complete", 4, 1.0, None, None, "A", 1.0),
                   ("r2", "s2", "complete", 4, 1.0, None, None, "A", 2.0)],
                  [(r, s, 0, MIDNIGHT + k * DAY, float(v)) for r, s, vals in
                   (("r1", "s1", (1, -2, 3, 1)), ("r2", "s2", (2, 1, -1, 4))) for k, v in enumerate(vals)])
    src.execute("VACUUM INTO ?", (str(path),))
    src.close()
    monkeypatch.setattr(pairs_actor, "EVALUATION_DEADLINE_S", 0.3)
    release, hung = threading.Event(), threading.Event()
    real = pairs.evaluate

    def evaluate_first_hangs(cands, cfg):
        if not hung.is_set():
            hung.set()
            release.wait(30)  # never longer than the test
        return real(cands, cfg)

    monkeypatch.setattr(pairs, "evaluate", evaluate_first_hangs)
    h = _ActorHarness(path)
    a = h.actor
    replies = []
    try:
        a.start_evaluation([(replies.append, False)])
        first = a.running
        h.poll_until(lambda: replies, "the hung evaluation's waiter was never answered")
        assert hung.is_set() and not first["done"].is_set()  # it was given up while still running
        assert replies[0]["ok"] is False and "abandoned" in replies[0]["error"], replies
        assert "deadline" in replies[0]["error"]
        assert a.running is None and a.abandoned == 1 and a.errors == 1 and a.evaluations == 0
        assert [e for lvl, e, _ in h.logs if lvl == "ERROR"] == ["pair_evaluation_abandoned"], h.logs

        a.start_evaluation([(replies.append, False)])  # the next one: runs beside the hung thread
        second = a.running
        h.poll_until(lambda: len(replies) == 2, "the next evaluation was never answered")
        assert replies[1]["ok"] is True and replies[1]["strategies"] == 2, replies[1]
        assert a.evaluations == 1 and len(h.written) == 1
        assert second["conn"] is not None and second["conn"] is not first["conn"]
        assert a.conn is None  # the actor's own connection was never lent to an evaluation
        for run in (first, second):
            with pytest.raises(sqlite3.ProgrammingError):
                run["conn"].execute("SELECT 1")  # each evaluation closed its own
    finally:
        release.set()
    h.poll_until(lambda: first["done"].is_set(), "the abandoned thread never ended")
    a._poll()
    assert len(replies) == 2 and a.evaluations == 1 and len(h.written) == 1  # its late result: dropped
