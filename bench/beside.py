"""`python -m pairlane.bench.beside`: small results beside a big transfer.

Owns: one measurement with a throwaway daemon (free ports, a temp dir). A big result (18 columns,
chunks planned by bytes, so about 1 MiB each) is sent while 10-trade `result` round trips are timed
on another DEALER, one after another until the big result is stored. Each round reports the round
trips' p50/p99/max and the big result's trades/s; the summary is the median over rounds (these
machines are shared and noisy). No target of issue 16 measures this; README "Performance" explains
the figures: with one SQLite writer, a small result waits for the big chunk being written.
`--wait-s` first waits out the assembler's start grace (LOCAL_LOOKUP_GRACE_S), during which a new
request's lookup goes through the writer too and so waits a second time. Never runs in the test suite.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path


def one_round(d, trades: int, run: str) -> dict:
    from pairlane.client import Producer
    from pairlane.synthetic import result_columns

    from .run import _pct, result_round_trips
    small = result_columns(10, seed=3)
    big = result_columns(trades, seed=4)
    out: dict = {}

    def send_big() -> None:
        t = time.perf_counter()
        try:
            with Producer(d.gateway_endpoint, timeout_s=60) as p:
                out["reply"] = p.send_result(f"big-{run}", "Big", big)
            out["s"] = time.perf_counter() - t
        except Exception as exc:  # noqa: BLE001 - reported below
            out["error"] = exc

    th = threading.Thread(target=send_big, daemon=True)
    th.start()
    lat: list[float] = []
    k = 0
    while th.is_alive():
        lat += result_round_trips(d.gateway_endpoint, f"s-{run}-{k}", small, 5)
        k += 1
    th.join()
    if "error" in out:
        raise RuntimeError(f"the big result failed: {out['error']}")
    return {"small_results": len(lat), "p50_ms": _pct(lat, 0.5), "p99_ms": _pct(lat, 0.99),
            "max_ms": 1000 * max(lat), "big_tps": trades / out["s"]}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m pairlane.bench.beside", description=__doc__.split("\n\n")[0])
    ap.add_argument("--trades", type=int, default=300_000, help="trades in the big result (default 300,000)")
    ap.add_argument("--rounds", type=int, default=3, help="big results, one after another (median)")
    ap.add_argument("--wait-s", type=float, default=None,
                    help="seconds to wait after start (default: the assembler's start grace plus 1 s)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    ns = ap.parse_args(argv)
    if ns.trades < 1 or ns.rounds < 1:
        ap.error("--trades and --rounds must be positive")
    from pairlane.entry.harness import Daemon
    from pairlane.lifecycle import LOCAL_LOOKUP_GRACE_S

    from .run import progress
    wait_s = LOCAL_LOOKUP_GRACE_S + 1.0 if ns.wait_s is None else ns.wait_s
    tmp = Path(tempfile.mkdtemp(prefix="pairlane-bench-beside-"))
    d = Daemon(tmp / "d", {"pairs": {"interval_s": 3600.0}}, name="beside")
    rounds = []
    try:
        d.start()
        time.sleep(wait_s)
        for i in range(ns.rounds):
            progress(f"round {i + 1}/{ns.rounds}: {ns.trades:,} trades with small results beside", ns.quiet)
            rounds.append(one_round(d, ns.trades, f"{i}-{time.time_ns()}"))
    finally:
        d.close()
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"trades": ns.trades, "wait_s": wait_s, "rounds": rounds,
           **{f"{k}_median": statistics.median(r[k] for r in rounds)
              for k in ("p50_ms", "p99_ms", "max_ms", "big_tps")}}
    if ns.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"small results beside a {ns.trades:,}-trade result (1 MiB chunks), medians of {ns.rounds}:")
        print(f"  p50 {out['p50_ms_median']:.1f} ms, p99 {out['p99_ms_median']:.1f} ms, "
              f"max {out['max_ms_median']:.1f} ms; big result {out['big_tps_median']:,.0f} trades/s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
