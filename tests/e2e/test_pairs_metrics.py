"""Pair evaluator, metrics reporter and safe-stop alerts, through a real `python run.py` daemon.

What is proved here (PROTOCOL.md sections 4, 5, 6):
- `pairs.evaluate` selects exactly the pairs an independent, plain-Python
  reference computation of section 5 selects from the same trades (pair_ids,
  weights, corr, Sharpe, PF, score to 1e-9), with the correlation filter, the
  rescue band, the trade window and every exclusion reason at work; the
  `pair_slots` table holds them (strategy_a < strategy_b, replaced whole) and
  `pair_slots_history` is appended on every evaluation; `admin pairs` prints them.
- Only strategies with too few trades: safe stop (ERROR log line, gauge 1,
  `pair_safe_stop` alert raised on the PUB socket with the exclusion counts,
  `pairs` reply); enough trades later: slots filled, alert cleared, gauge 0.
- No result for `alerts.ingest_stall_s`: `ingest_stalled` raised (evaluation
  goes on with stored data); a new result clears it.
- `/metrics` over HTTP carries every metric name of section 6 with the values
  this test caused; `admin metrics` returns the same figures as a map.

Alerts are read with a SUB socket subscribed to everything before the
triggering action; every daemon is torn down by the `make_daemon` fixture,
which fails the test if a process is left.
"""
from __future__ import annotations

import contextlib
import http.client
import math
import os
import signal
import time

import msgpack
import numpy as np
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from pairlane import pairs as pairlogic
from pairlane.client import Producer
from tests.e2e.util import BACKENDS, Dealer, db, wait_until

DAY = 86400
T0 = 1_700_006_400          # 2023-11-15 00:00:00 UTC (a multiple of 86400)
assert T0 % DAY == 0

PAIRS_CFG = {"interval_s": 3600.0}   # only the start-up evaluation and ours
SLOT_FIELDS = ("pair_id", "strategy_a", "strategy_b", "weight_a", "weight_b", "corr", "sharpe",
               "profit_factor", "score")
TOL = 1e-9

# PROTOCOL.md section 6, exactly: name -> kind
SECTION6 = {
    "pairlane_ingest_bytes_total": "counter",
    "pairlane_ingest_messages_total": "counter",
    "pairlane_results_total": "counter",
    "pairlane_result_receive_seconds": "histogram",
    "pairlane_chunk_assembly_seconds": "histogram",
    "pairlane_sqlite_write_seconds": "histogram",
    "pairlane_sqlite_rows_written_total": "counter",
    "pairlane_dlq_items": "gauge",
    "pairlane_dlq_oldest_item_age_seconds": "gauge",
    "pairlane_actor_restarts_total": "counter",
    "pairlane_pair_evaluations_total": "counter",
    "pairlane_pair_missing_ratio": "gauge",
    "pairlane_pair_evaluation_seconds": "histogram",
    "pairlane_pair_slots_filled": "gauge",
    "pairlane_pair_safe_stop": "gauge",
    "pairlane_db_bytes": "gauge",
    "pairlane_db_growth_bytes_per_second": "gauge",
    "pairlane_last_result_timestamp_seconds": "gauge",
    "pairlane_legacy_truncated_total": "counter",
}


# ------------------------------------------------------------------------------- test data
def orthonormal(n: int, k: int, seed: int) -> np.ndarray:
    """k orthonormal columns of length n, each orthogonal to the constant vector (mean 0)."""
    rng = np.random.default_rng(seed)
    m = np.column_stack([np.ones(n), rng.normal(size=(n, k))])
    q, _ = np.linalg.qr(m)
    return q[:, 1:] * math.sqrt(n)        # population sd 1, mean 0


def daily_trades(day_values, hour: int, lead_in: int = 0, lead_scale: float = 50.0, seed: int = 0):
    """One trade per UTC day at `hour`: `lead_in` noisy trades (large, so they would spoil
    every correlation if the trade window did not drop them), then one per value."""
    rng = np.random.default_rng(seed)
    lead = list(rng.normal(0.0, lead_scale, size=lead_in))
    pnl = [float(x) for x in lead + list(day_values)]
    ts = [T0 + d * DAY + hour * 3600 + 17 for d in range(len(pnl))]
    return {"timestamp": ts, "pnl": pnl}


def designed(u: np.ndarray, combo: dict[int, float], mean: float, sd: float) -> np.ndarray:
    """mean + sd * (sum of c * u[:, i]); sum of c^2 = 1 gives a series whose correlation
    with another such series is the dot product of their coefficient vectors."""
    x = sum(c * u[:, i] for i, c in combo.items())
    return mean + sd * x


# ----------------------------------------------------------- independent reference (section 5)
def fnv1a64(text: str) -> str:
    h = 0xCBF29CE484222325
    for byte in text.encode("utf-8"):
        h = ((h ^ byte) * 0x100000001B3) % (1 << 64)
    return "%016x" % h


def _mean(xs):
    return sum(xs) / len(xs)


def _psd(xs):
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def _corr(xs, ys):
    mx, my = _mean(xs), _mean(ys)
    num = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    dx = sum((x - mx) ** 2 for x in xs)
    dy = sum((y - my) ** 2 for y in ys)
    return 0.0 if dx == 0 or dy == 0 else num / math.sqrt(dx * dy)


def reference(strategies: dict, *, min_trades=100, window=100, corr_max=0.2, rescue=0.3, max_pairs=5,
              ranks=("A", "S")):
    """Plain-Python PROTOCOL.md section 5 over {name: (columns, rank)} (one complete result
    each, all in one symbol|timeframe group of fewer than per_group strategies).
    Returns (slots, excluded, all scored pairs)."""
    excluded = {"missing": 0, "rank": 0, "not_top_n": 0, "too_few_trades": 0, "zero_variance": 0}
    series = {}
    for name, (cols, rank) in sorted(strategies.items()):
        if rank is not None and rank not in ranks:
            excluded["rank"] += 1
            continue
        ts, pn = cols["timestamp"], cols["pnl"]
        if len(ts) < min_trades:
            excluded["too_few_trades"] += 1
            continue
        order = sorted(range(len(ts)), key=lambda k: ts[k])[-window:]
        buckets: dict[int, float] = {}
        for k in order:
            buckets[ts[k] // DAY] = buckets.get(ts[k] // DAY, 0.0) + pn[k]
        if len(set(buckets.values())) < 2:
            excluded["zero_variance"] += 1
            continue
        series[name] = buckets
    scored = []
    names = sorted(series)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            keys = sorted(set(series[a]) | set(series[b]))
            xa = [series[a].get(k, 0.0) for k in keys]
            xb = [series[b].get(k, 0.0) for k in keys]
            corr = _corr(xa, xb)
            sa, sb = _psd(xa), _psd(xb)
            wa, wb = sb / (sa + sb), sa / (sa + sb)
            p = [wa * x + wb * y for x, y in zip(xa, xb)]
            sd = _psd(p)
            sharpe = _mean(p) / sd if sd > 0 else 0.0
            gains = sum(v for v in p if v > 0)
            losses = -sum(v for v in p if v < 0)
            pf = gains / losses if losses > 0 else 0.0
            scored.append({"pair_id": fnv1a64(f"{a}|{b}"), "strategy_a": a, "strategy_b": b,
                           "weight_a": wa, "weight_b": wb, "corr": corr, "sharpe": sharpe,
                           "profit_factor": pf, "score": 0.7 * sharpe + 0.3 * pf})
    kept = [s for s in scored if abs(s["corr"]) <= corr_max]
    if len(kept) < max_pairs:
        kept = [s for s in scored if abs(s["corr"]) <= rescue]
    kept.sort(key=lambda s: (-s["score"], s["pair_id"]))
    return kept[:max_pairs], excluded, scored


def assert_well_posed(scored, slots, corr_max=0.2, rescue=0.3):
    """The test data keeps clear of every boundary, so 1e-9 comparisons are meaningful."""
    for s in scored:
        for edge in (corr_max, rescue):
            assert abs(abs(s["corr"]) - edge) > 1e-6, s
    scores = sorted((s["score"] for s in scored), reverse=True)
    for x, y in zip(scores, scores[1:]):
        assert x - y > 1e-6, "near-tie in the test data"
    assert slots


def assert_slots_match(got: list[dict], want: list[dict]) -> None:
    assert [s["pair_id"] for s in got] == [s["pair_id"] for s in want], (got, want)
    for g, w in zip(got, want):
        assert (g["strategy_a"], g["strategy_b"]) == (w["strategy_a"], w["strategy_b"])
        assert g["strategy_a"] < g["strategy_b"]
        for f in ("weight_a", "weight_b", "corr", "sharpe", "profit_factor", "score"):
            assert abs(g[f] - w[f]) <= TOL, (f, g, w)


def candidates_from(strategies: dict) -> list[pairlogic.Candidate]:
    return [pairlogic.Candidate(name=n, status="complete", sharpe=0.0, rank=r, symbol="USDJPY", timeframe=60,
                                timestamps=c["timestamp"], pnls=c["pnl"])
            for n, (c, r) in strategies.items()]


# ------------------------------------------------------------------------------- plumbing
def send_all(d, strategies: dict, prefix: str) -> dict:
    """Each strategy as one result through the Producer; returns {name: stored reply}."""
    out = {}
    with Producer(d.gateway_endpoint, timeout_s=20) as p:
        for name, (cols, rank) in strategies.items():
            meta = {"symbol": "USDJPY", "timeframe": 60}
            if rank is not None:
                meta["rank"] = rank
            r = p.send_result(f"{prefix}.{name}", name, cols, metrics={"sharpe": 0.5}, meta=meta)
            assert r["type"] == "stored" and r["trades"] == len(cols["pnl"]), r
            out[name] = r
    return out


def evaluate(d) -> dict:
    r = d.admin("pairs.evaluate", timeout=60)
    assert r and r.get("ok") is True, r
    assert "warning" not in r, r
    for k in ("slots", "candidates", "excluded", "safe_stop", "newest_result_age_s"):
        assert k in r, (k, r)
    return r


def db_rows(d, sql: str, args=()) -> list[dict]:
    with contextlib.closing(db(d)) as c:   # sqlite3, or PostgreSQL when the daemon runs on it
        cur = c.execute(sql, args)
        cols = [x[0] for x in cur.description]
        return [dict(zip(cols, row)) for row in cur.fetchall()]


@contextlib.contextmanager
def alert_sub(d):
    """A SUB socket on alerts.endpoint subscribed to everything, connected before use."""
    s = zmq.Context.instance().socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(d.cfg["alerts"]["endpoint"])
    time.sleep(0.5)      # PUB/SUB slow joiner: let the subscription reach the publisher
    try:
        yield s
    finally:
        s.close(0)


def next_alert(sub, pred, timeout: float, seen: list | None = None) -> dict:
    """The next alert frame satisfying pred (all frames read are appended to `seen`)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not sub.poll(int(left * 1000)):
            raise AssertionError(f"no matching alert within {timeout}s; seen: {seen}")
        frames = sub.recv_multipart()
        assert len(frames) == 1, frames
        a = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
        assert set(a) == {"type", "name", "state", "severity", "reasons", "ts"}, a
        if seen is not None:
            seen.append(a)
        assert a["type"] == "alert" and a["state"] in ("raised", "cleared"), a
        assert isinstance(a["name"], str) and isinstance(a["severity"], str), a
        assert isinstance(a["reasons"], dict) and isinstance(a["ts"], float), a
        if pred(a):
            return a


def scrape(d) -> tuple[dict, dict]:
    """GET /metrics over HTTP -> ({(sample name, labels): value}, {family name: type})."""
    host, port = d.cfg["metrics"]["listen"].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read().decode()
        assert resp.status == 200, (resp.status, body[:300])
        assert resp.getheader("Content-Type", "").startswith("text/plain"), resp.getheaders()
    finally:
        conn.close()
    samples, types = {}, {}
    for fam in text_string_to_metric_families(body):
        types[fam.name] = fam.type
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def val(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def wait_metric(d, name: str, want, timeout: float = 10.0, **labels) -> dict:
    def ok():
        s, _ = scrape(d)
        v = val(s, name, **labels)
        return s if (v is not None and (want(v) if callable(want) else v == want)) else None
    try:
        return wait_until(ok, timeout, interval=0.1, what=f"{name}{labels} == {want}")
    except AssertionError:
        s, _ = scrape(d)
        raise AssertionError(f"{name}{labels} = {val(s, name, **labels)}, wanted {want}\n{d.log()[-3000:]}")


def inspect(d, actor: str) -> dict:
    r = d.admin("inspect", {"actor": actor})
    assert r and r.get("ok"), r
    return r["state"]


# ---------------------------------------------------------------------- pair selection
def selection_data() -> dict:
    """Six strategies of designed correlation over the last 100 UTC days (after 20 noisy
    lead-in trades the 100-trade window drops), plus one of each exclusion reason."""
    u = orthonormal(100, 6, seed=7)
    spec = {   # name: (coefficients on u, mean, sd)
        "pm-alpha": ({0: 1.0}, 0.55, 1.0),
        "pm-bravo": ({1: 1.0}, 0.10, 0.8),
        "pm-charlie": ({0: 0.95, 2: math.sqrt(1 - 0.95 ** 2)}, 0.50, 1.1),   # corr(alpha) 0.95
        "pm-delta": ({1: 0.9, 3: math.sqrt(1 - 0.81)}, 0.12, 0.7),            # corr(bravo) 0.9
        "pm-echo": ({4: 1.0}, 0.20, 1.3),
        "pm-foxtrot": ({4: 0.25, 5: math.sqrt(1 - 0.0625)}, 0.30, 0.9),       # corr(echo) 0.25: rescue band
    }
    out = {}
    for i, (name, (combo, mean, sd)) in enumerate(spec.items()):
        out[name] = (daily_trades(designed(u, combo, mean, sd), hour=i + 1, lead_in=20, seed=100 + i), "A")
    rng = np.random.default_rng(3)
    out["pm-short"] = (daily_trades(rng.normal(0.3, 1, 60), hour=9), "S")                 # too_few_trades
    out["pm-rank-b"] = (daily_trades(rng.normal(0.9, 1, 120), hour=10), "B")              # rank
    out["pm-flat"] = (daily_trades([0.25] * 120, hour=11), None)                           # zero_variance
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend_store", BACKENDS, indirect=True)
def test_pairs_evaluate_selects_the_reference_pairs_and_writes_pair_slots(backend_store, make_daemon):
    d = make_daemon(dict(backend_store, pairs=PAIRS_CFG))
    # the start-up evaluation (no data: nothing written) happens first, so every later one is ours
    wait_until(lambda: inspect(d, "pairs")["evaluations"] >= 1, 15, 0.1, "start-up pair evaluation")
    print(f"\nstart-up evaluation (empty store) {inspect(d, 'pairs')['last_evaluation_s'] * 1000:.2f} ms")
    data = selection_data()
    want, excluded, scored = reference(data)
    assert_well_posed(scored, want)
    # the data exercises the filter: without it a correlated pair (alpha, charlie: 0.95) would be picked
    unfiltered = sorted(scored, key=lambda s: (-s["score"], s["pair_id"]))[:5]
    assert any(abs(s["corr"]) > 0.3 for s in unfiltered)
    assert not {s["pair_id"] for s in unfiltered if abs(s["corr"]) > 0.2} & {s["pair_id"] for s in want}
    assert len(want) == 5 and all(abs(s["corr"]) <= 0.2 for s in want)
    # the in-process evaluator agrees with the independent reference on the same data
    ev = pairlogic.evaluate(candidates_from(data), pairlogic.PairsConfig())
    assert_slots_match([s.as_dict() for s in ev.slots], want)

    send_all(d, data, "sel")
    t0 = time.time()
    r = evaluate(d)
    took = time.time() - t0
    assert r["safe_stop"] is False
    assert r["candidates"] == 6
    assert r["excluded"] == excluded == {"missing": 0, "rank": 1, "not_top_n": 0, "too_few_trades": 1,
                                         "zero_variance": 1}
    assert_slots_match(r["slots"], want)
    assert 0 <= r["newest_result_age_s"] < 60
    print(f"pairs.evaluate round trip {took * 1000:.1f} ms, evaluation_s {r['evaluation_s'] * 1000:.2f} ms")

    # pair_slots holds exactly these (replaced whole), history has them under the same evaluated_at
    slots_db = db_rows(d, "SELECT * FROM pair_slots ORDER BY score DESC, pair_id")
    assert_slots_match(slots_db, want)
    assert all(s["evaluated_at"] == r["evaluated_at"] for s in slots_db)
    hist = db_rows(d, "SELECT * FROM pair_slots_history WHERE evaluated_at = ? ORDER BY score DESC, pair_id",
                   (r["evaluated_at"],))
    assert_slots_match(hist, want)
    n_hist = db_rows(d, "SELECT count(*) AS n FROM pair_slots_history")[0]["n"]
    assert n_hist == 5      # the start-up evaluation had nothing to write

    # `pairs` answers the last evaluation without evaluating again
    p = d.admin("pairs")
    assert p["ok"] and p["evaluated_at"] == r["evaluated_at"] and p["slots"] == r["slots"], p
    assert p["excluded"] == r["excluded"] and p["safe_stop"] is False and p["candidates"] == 6

    # a second evaluation: same selection, table replaced, history appended
    r2 = evaluate(d)
    print(f"second evaluation_s {r2['evaluation_s'] * 1000:.2f} ms")
    assert r2["evaluated_at"] > r["evaluated_at"]
    assert_slots_match(r2["slots"], want)
    slots_db2 = db_rows(d, "SELECT * FROM pair_slots ORDER BY score DESC, pair_id")
    assert len(slots_db2) == 5 and all(s["evaluated_at"] == r2["evaluated_at"] for s in slots_db2)
    assert db_rows(d, "SELECT count(*) AS n FROM pair_slots_history")[0]["n"] == n_hist + 5
    assert db_rows(d, "SELECT count(*) AS n FROM pair_slots_history WHERE evaluated_at = ?",
                   (r["evaluated_at"],))[0]["n"] == 5

    # the operator's table
    cli = d.admin_cli("pairs")
    assert cli.returncode == 0, (cli.stdout, cli.stderr)
    for s in want:
        line = next((ln for ln in cli.stdout.splitlines() if s["pair_id"] in ln), None)
        assert line is not None, cli.stdout
        assert s["strategy_a"] in line and s["strategy_b"] in line, line
    cj = d.admin_cli("pairs", "--json")
    assert cj.returncode == 0, cj.stderr


# ------------------------------------------------------------------------ safe stop
def rescue_data() -> dict:
    """Three strategies whose only pair under rescue_corr_max is in the rescue band."""
    u = orthonormal(100, 4, seed=11)
    spec = {
        "ss-one": ({0: 1.0}, 0.30, 1.0),
        "ss-two": ({0: 0.25, 1: math.sqrt(1 - 0.0625)}, 0.20, 0.8),          # corr(one) 0.25
        "ss-three": ({0: 0.6, 1: 0.6, 2: math.sqrt(1 - 0.72)}, 0.25, 1.2),   # corr(one) 0.6, corr(two) ~0.71
    }
    return {name: (daily_trades(designed(u, combo, mean, sd), hour=i + 1), "A")
            for i, (name, (combo, mean, sd)) in enumerate(spec.items())}


@pytest.mark.timeout(120)
def test_too_few_trades_raise_safe_stop_and_enough_trades_clear_it(make_daemon):
    d = make_daemon({"pairs": PAIRS_CFG})
    rng = np.random.default_rng(5)
    short = {name: (daily_trades(rng.normal(0.2, 1.0, 99 - 10 * i), hour=i + 1), "A")
             for i, name in enumerate(("ss-one", "ss-two", "ss-three"))}
    with alert_sub(d) as sub:
        send_all(d, short, "short")
        r = evaluate(d)
        assert r["safe_stop"] is True and r["slots"] == [] and r["candidates"] == 0, r
        assert r["excluded"]["too_few_trades"] == 3 and sum(r["excluded"].values()) == 3, r
        p = d.admin("pairs")
        assert p["ok"] and p["safe_stop"] is True and p["excluded"]["too_few_trades"] == 3, p

        seen: list = []
        a = next_alert(sub, lambda a: a["name"] == "pair_safe_stop" and a["state"] == "raised"
                       and a["reasons"].get("too_few_trades") == 3, 10, seen)
        assert a["severity"] in ("critical", "error", "warning"), a
        d.wait_for(lambda: any("level=ERROR" in ln and "event=pair_safe_stop" in ln
                               and "too_few_trades=3" in ln for ln in d.log().splitlines()),
                   10, what="ERROR pair_safe_stop log line")
        s = wait_metric(d, "pairlane_pair_safe_stop", 1.0)
        assert val(s, "pairlane_pair_slots_filled") == 0.0
        assert db_rows(d, "SELECT count(*) AS n FROM pair_slots")[0]["n"] == 0
        # published again at each evaluation while raised
        t_again = time.time()
        assert evaluate(d)["safe_stop"] is True
        next_alert(sub, lambda a: a["name"] == "pair_safe_stop" and a["state"] == "raised"
                   and a["ts"] >= t_again and a["reasons"].get("too_few_trades") == 3, 10, seen)

        # newer results with enough trades for the same strategies: the latest result counts
        good = rescue_data()
        want, excluded, scored = reference(good)
        assert_well_posed(scored, want)
        assert len(want) == 1 and 0.2 < abs(want[0]["corr"]) <= 0.3      # filled from the rescue band
        send_all(d, good, "good")
        r2 = evaluate(d)
        assert r2["safe_stop"] is False and r2["candidates"] == 3, r2
        assert r2["excluded"] == excluded and sum(excluded.values()) == 0
        assert_slots_match(r2["slots"], want)
        assert_slots_match(db_rows(d, "SELECT * FROM pair_slots"), want)
        next_alert(sub, lambda a: a["name"] == "pair_safe_stop" and a["state"] == "cleared", 10, seen)
        s = wait_metric(d, "pairlane_pair_safe_stop", 0.0)
        assert val(s, "pairlane_pair_slots_filled") == 1.0
        assert d.admin("pairs")["safe_stop"] is False


# ------------------------------------------------------------------------ ingest stall
@pytest.mark.timeout(120)
def test_ingest_stall_raises_an_alert_and_a_new_result_clears_it(make_daemon):
    d = make_daemon({"pairs": PAIRS_CFG, "alerts": {"ingest_stall_s": 3.0}})
    rng = np.random.default_rng(9)
    cols = daily_trades(rng.normal(0.1, 1.0, 120), hour=2)
    with alert_sub(d) as sub, Producer(d.gateway_endpoint, timeout_s=20) as p:
        t_send = time.time()
        p.send_result("stall.1", "st-one", cols, metrics={"sharpe": 0.1}, meta={"rank": "A"})
        t_stored = time.time()
        seen: list = []
        # a stall raised at start-up (no result since the daemon started) may still be re-published
        # until our result reaches the metrics actor: wait for the one that counts from our result
        a = next_alert(sub, lambda a: a["name"] == "ingest_stalled" and a["state"] == "raised"
                       and a["ts"] - a["reasons"]["seconds_since_last_result"] >= t_send - 0.2, 12, seen)
        assert a["ts"] - t_send >= 3.0 - 0.1, (a, t_send)
        assert 3.0 <= a["reasons"]["seconds_since_last_result"] < 3.0 + 2.0 + 1.0, a   # checked every 2 s
        assert a["reasons"]["limit_s"] == 3.0 and a["severity"] == "warning", a
        assert t_stored - t_send < 3.0, "the result itself took longer than the stall limit"
        # published again at each check (every 2 s) while raised
        again = next_alert(sub, lambda x: x["name"] == "ingest_stalled" and x["ts"] > a["ts"], 5, seen)
        assert again["state"] == "raised", again
        assert again["reasons"]["seconds_since_last_result"] > a["reasons"]["seconds_since_last_result"]
        # evaluation goes on with stored data while ingest is stalled
        r = evaluate(d)
        assert r["newest_result_age_s"] >= 3.0 and r["excluded"]["too_few_trades"] == 0, r
        assert d.admin("inspect", {"actor": "metrics"})["state"]["alerts"]["ingest_stalled"] == "raised"

        t_new = time.time()
        p.send_result("stall.2", "st-two", cols, metrics={"sharpe": 0.1}, meta={"rank": "A"})
        c = next_alert(sub, lambda a: a["name"] == "ingest_stalled" and a["state"] == "cleared"
                       and a["ts"] >= t_new, 8, seen)
        assert c["ts"] - t_new < 5.0, c


# ---------------------------------------------------------------------------- metrics
def chunk(rid: str, seq: int, cols: dict, a: int, b: int) -> dict:
    return {"type": "chunk", "request_id": rid, "seq": seq,
            "trades": {k: v[a:b] for k, v in cols.items()}}


class Counting(Dealer):
    """A raw DEALER that counts what it sends, by message type and in bytes."""

    def __init__(self, endpoint):
        super().__init__(endpoint)
        self.bytes = 0
        self.types: dict[str, int] = {}

    def send(self, msg) -> None:
        frame = msgpack.packb(msg, use_bin_type=True)
        self.bytes += len(frame)
        self.types[msg["type"]] = self.types.get(msg["type"], 0) + 1
        self.sock.send(frame)


def send_chunked(g: Counting, rid: str, name: str, cols: dict, n_chunks: int, meta: dict) -> dict:
    n = len(cols["pnl"])
    r = g.rt({"type": "begin", "request_id": rid, "strategy_name": name, "total_trades": n,
              "total_chunks": n_chunks, **meta})
    assert r == {"type": "credit", "request_id": rid, "credit": n_chunks}, r
    per = -(-n // n_chunks)
    for seq in range(n_chunks):
        g.send(chunk(rid, seq, cols, seq * per, min(n, (seq + 1) * per)))
    acks = [g.recv(10) for _ in range(n_chunks)]
    assert sorted(a["seq"] for a in acks) == list(range(n_chunks)), acks
    return g.rt({"type": "end", "request_id": rid})


@pytest.mark.timeout(150)
def test_metrics_endpoint_and_admin_metrics_report_what_happened(make_daemon):
    d = make_daemon({"pairs": PAIRS_CFG})
    # the start-up evaluation (no data yet: a safe stop) happens first; ours come after it
    wait_until(lambda: inspect(d, "pairs")["evaluations"] >= 1, 15, 0.1, "start-up pair evaluation")
    wait_metric(d, "pairlane_pair_evaluations_total", 1.0, outcome="safe_stop")

    u = orthonormal(100, 2, seed=21)
    cols_a = daily_trades(designed(u, {0: 1.0}, 0.3, 1.0), hour=1, lead_in=20)
    cols_b = daily_trades(designed(u, {1: 1.0}, 0.2, 0.9), hour=2, lead_in=20)
    cols_c = daily_trades(list(np.random.default_rng(2).normal(0, 1, 30)), hour=3)
    t_first = time.time()
    with Counting(d.gateway_endpoint) as g:
        meta = {"symbol": "EURUSD", "timeframe": 15, "rank": "S", "metrics": {"sharpe": 0.4}}
        r = send_chunked(g, "m.a", "mx-a", cols_a, 3, meta)
        assert r["type"] == "stored" and r["trades"] == 120, r
        r = send_chunked(g, "m.b", "mx-b", cols_b, 2, meta)
        assert r["type"] == "stored" and r["trades"] == 120, r
        r = g.rt({"type": "result", "request_id": "m.c", "strategy_name": "mx-c", "total_trades": 30,
                  "trades": cols_c, **meta})
        assert r["type"] == "stored" and r["trades"] == 30, r
        # rows that do not add up: failed (its 5 committed rows are removed again)
        r = g.rt({"type": "begin", "request_id": "m.f", "strategy_name": "mx-failed", "total_trades": 10,
                  "total_chunks": 1})
        assert r["type"] == "credit", r
        g.send(chunk("m.f", 0, cols_c, 0, 5))
        assert g.recv(10)["type"] == "credit"
        r = g.rt({"type": "end", "request_id": "m.f"})
        assert r["type"] == "error" and r["code"] == "incomplete", r
        # aborted by its producer
        r = g.rt({"type": "begin", "request_id": "m.x", "strategy_name": "mx-aborted", "total_trades": 10,
                  "total_chunks": 2})
        assert r["type"] == "credit", r
        r = g.rt({"type": "abort", "request_id": "m.x"})
        assert r == {"type": "aborted", "request_id": "m.x"}, r
        zmq_bytes, types = g.bytes, dict(g.types)
    assert types == {"begin": 4, "chunk": 6, "end": 3, "result": 1, "abort": 1}

    # one legacy S-expression that reports 5 trades but lists 2 (Guardian's truncation)
    legacy = (b'((type . "BACKTEST_RESULT") (result . ((strategy_name . "mx-legacy") (request_id . "m.l") '
              b'(sharpe . 0.1) (trades . 5) (rank . "A") '
              b"(trade_list . (((timestamp . 1709234567) (pnl . 0.75)) "
              b"((timestamp . 1709238567) (pnl . -0.25)))))))")
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 2000)
    push.connect(d.cfg["gateway"]["legacy_endpoint"])
    push.send(legacy)
    push.close()
    wait_until(lambda: db_rows(d, "SELECT status FROM backtest_results WHERE request_id = 'm.l'")
               == [{"status": "complete"}], 15, 0.1, "legacy result complete")
    t_last = time.time()

    r = evaluate(d)
    # strategies: a, b (pair), c and legacy (too few trades), failed and aborted (missing)
    assert r["excluded"] == {"missing": 2, "rank": 0, "not_top_n": 0, "too_few_trades": 2,
                             "zero_variance": 0}, r
    assert len(r["slots"]) == 1 and r["safe_stop"] is False, r
    assert db_rows(d, "SELECT status FROM backtest_results WHERE request_id IN ('m.f', 'm.x') "
                      "ORDER BY request_id") == [{"status": "failed"}, {"status": "abandoned"}]

    trades_stored = 120 + 120 + 30 + 2
    rows_committed = trades_stored + 5        # the failed result's rows were committed, then removed
    # every actor sends its batch of updates once per heartbeat: wait until the last ones are in
    for name, want, labels in (("pairlane_pair_evaluations_total", 1.0, {"outcome": "ok"}),
                               ("pairlane_sqlite_rows_written_total", rows_committed, {}),
                               ("pairlane_ingest_bytes_total", zmq_bytes + len(legacy), {}),
                               ("pairlane_ingest_messages_total", 1.0, {"type": "legacy"}),
                               ("pairlane_ingest_messages_total", 1.0, {"type": "abort"}),
                               ("pairlane_results_total", 1.0, {"outcome": "aborted"})):
        wait_metric(d, name, float(want), **labels)
    time.sleep(1.0)     # a heartbeat or two more: nothing may be counted twice
    s, families = scrape(d)

    # every name of section 6 is exposed, with its type
    for name, kind in SECTION6.items():
        fam = name[:-len("_total")] if kind == "counter" else name
        assert families.get(fam) == kind, (name, families.get(fam))
        suffixes = ("_count", "_sum", "_bucket") if kind == "histogram" else ("",)
        for suf in suffixes:
            assert any(k[0] == name + suf for k in s), f"{name}{suf} missing from /metrics"

    # ingest
    assert val(s, "pairlane_ingest_bytes_total") == zmq_bytes + len(legacy)
    for t, n in {**types, "legacy": 1, "live_trades": 0}.items():
        assert val(s, "pairlane_ingest_messages_total", type=t) == n, (t, n)
    assert val(s, "pairlane_results_total", outcome="stored_db") == 4.0      # a, b, c, legacy
    assert val(s, "pairlane_results_total", outcome="failed") == 1.0
    assert val(s, "pairlane_results_total", outcome="aborted") == 1.0
    assert val(s, "pairlane_results_total", outcome="stored_dlq") in (None, 0.0)
    assert val(s, "pairlane_result_receive_seconds_count") == 4.0
    assert val(s, "pairlane_chunk_assembly_seconds_count") >= 7.0             # 6 chunks + 1 result
    assert val(s, "pairlane_legacy_truncated_total") == 1.0
    assert t_first - 1 <= val(s, "pairlane_last_result_timestamp_seconds") <= t_last + 1
    assert abs(val(s, "pairlane_last_result_timestamp_seconds") - time.time()) < 60
    # store
    assert val(s, "pairlane_sqlite_rows_written_total") == rows_committed
    assert db_rows(d, "SELECT count(*) AS n FROM backtest_trade_logs")[0]["n"] == trades_stored
    assert val(s, "pairlane_sqlite_write_seconds_count") >= 1.0
    assert val(s, "pairlane_db_bytes", file="main") > 0
    assert val(s, "pairlane_db_bytes", file="wal") >= 0
    assert math.isfinite(val(s, "pairlane_db_growth_bytes_per_second"))
    # dead-letter spool: untouched
    assert val(s, "pairlane_dlq_items") == 0.0
    assert val(s, "pairlane_dlq_oldest_item_age_seconds") == 0.0
    # pairs: the start-up safe stop and our evaluation
    assert val(s, "pairlane_pair_evaluations_total", outcome="safe_stop") == 1.0
    assert val(s, "pairlane_pair_evaluations_total", outcome="ok") == 1.0
    assert val(s, "pairlane_pair_evaluations_total", outcome="error") in (None, 0.0)
    assert val(s, "pairlane_pair_evaluation_seconds_count") == 2.0
    assert val(s, "pairlane_pair_evaluation_seconds_sum") > 0
    assert val(s, "pairlane_pair_missing_ratio") == pytest.approx(2 / 6)
    assert val(s, "pairlane_pair_slots_filled") == 1.0
    assert val(s, "pairlane_pair_safe_stop") == 0.0

    # restarts: SIGKILL legacy's process; the root's status is sampled every 2 s
    actors = [a["name"] for a in d.status()["actors"]]
    for name in actors:
        if val(s, "pairlane_actor_restarts_total", actor=name) is not None:
            assert val(s, "pairlane_actor_restarts_total", actor=name) == 0.0, name
    for name in ("gateway", "legacy", "assembler", "writer", "dlq", "pairs", "metrics", "admin"):
        assert val(s, "pairlane_actor_restarts_total", actor=name) == 0.0, name
    os.kill(d.actor("legacy")["pid"], signal.SIGKILL)
    d.wait_running("legacy", restarts=1, timeout=15)
    s = wait_metric(d, "pairlane_actor_restarts_total", 1.0, timeout=10, actor="legacy")
    for name in actors:
        if name != "legacy":
            assert val(s, "pairlane_actor_restarts_total", actor=name) in (None, 0.0), name

    # admin `metrics`: the same figures as a map
    compare_admin_and_http(d)


VOLATILE = ("pairlane_db_bytes", "pairlane_db_growth_bytes_per_second", "pairlane_dlq_oldest_item_age_seconds",
            # issue 15: the actor processes' figures and free disk change by themselves
            "pairlane_process_", "pairlane_disk_free_bytes")


def snapshot_as_samples(snap: dict) -> dict:
    """admin `metrics` map -> {(sample name, labels): value} as the HTTP scrape gives them."""
    out = {}
    for name, v in snap.items():
        if isinstance(v, dict) and set(v) == {"count", "sum"} and not any("=" in k for k in v):
            out[(name + "_count", ())] = v["count"]
            out[(name + "_sum", ())] = v["sum"]
        elif isinstance(v, dict):
            for key, x in v.items():
                labels = tuple(sorted(tuple(p.split("=", 1)) for p in key.split(","))) if key else ()
                if isinstance(x, dict):
                    out[(name + "_count", labels)] = x["count"]
                    out[(name + "_sum", labels)] = x["sum"]
                else:
                    out[(name, labels)] = x
        else:
            out[(name, ())] = v
    return out


def compare_admin_and_http(d) -> None:
    def one_try():
        before, _ = scrape(d)
        r = d.admin("metrics")
        after, _ = scrape(d)
        assert r and r.get("ok"), r
        got = snapshot_as_samples(r["metrics"])
        http_view = {k: v for k, v in after.items()
                     if not k[0].endswith(("_bucket", "_created")) and not k[0].startswith(VOLATILE)}
        stable = all(before.get(k) == v for k, v in http_view.items())
        return got, http_view, stable

    for _ in range(5):
        got, http_view, stable = one_try()
        if stable:
            break
        time.sleep(0.5)
    assert stable, "metrics kept changing"
    for name in SECTION6:
        assert name in {k[0] for k in got} | {k[0][:-len("_count")] for k in got if k[0].endswith("_count")}, name
    missing = {k: v for k, v in http_view.items() if k not in got}
    assert not missing, f"in /metrics but not in admin metrics: {missing}"
    differ = {k: (v, got[k]) for k, v in http_view.items() if got[k] != v}
    assert not differ, f"admin metrics differ from /metrics: {differ}"
    for k in got:
        if not k[0].startswith(VOLATILE):
            assert k in http_view, f"in admin metrics but not in /metrics: {k}"
