"""`python -m pairlane.bench.multi`: issue 14's targets, measured on this machine in one run.

Owns: three measurements with throwaway daemons on free ports in a temp dir, each reported as
medians and ratios (these machines are shared and noisy; never a single absolute time as a verdict):
- `curve`: ingest (send -> stored) through a CURVE gateway against a plain gateway, two daemons of the
  same configuration started side by side, runs interleaved (plain, CURVE, plain, CURVE, ...);
  target: CURVE costs at most 15% (ratio >= 0.85).
- `failover` (needs --store): two daemons on one PostgreSQL store; a Producer([A, B]) sends a result,
  A is SIGKILLed (its whole process group) once rows are flowing, and the time from the kill to the
  Producer's next credit from B is taken (the Producer's progress callback, on B's endpoint); A is
  started again for the next round. Target: median < 5 s. The Producer leaves a daemon whose
  connection drops at once, so its timeout_s (the default 30 s here) only bounds a hung daemon.
- `aggregate` (needs --store): two producers sending at once, both to one daemon, against one to each
  of two daemons on the same store, interleaved; on 2 cores no speed-up is expected, the figure
  shows the cost of sharing.
Never runs in the test suite; never starts or stops a PostgreSQL server (pass --store).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def progress(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"pairlane.bench.multi: {msg}", file=sys.stderr, flush=True)


def send(endpoint, rid: str, cols: dict, **kw) -> float:
    """Seconds from the first frame to `stored`."""
    from pairlane.client import Producer
    with Producer(endpoint, timeout_s=kw.pop("timeout_s", 60.0), **kw) as p:
        t = time.perf_counter()
        reply = p.send_result(rid, f"bench-{rid}", cols)
        dt = time.perf_counter() - t
    assert reply.get("type") == "stored", reply
    return dt


def kill_group(d) -> None:
    """SIGKILL the daemon and its whole actor process group (nothing graceful)."""
    os.kill(d.proc.pid, signal.SIGKILL)
    if d.pgid:
        try:
            os.killpg(d.pgid, signal.SIGKILL)
        except OSError:
            pass
    d.proc.wait(10)
    deadline = time.monotonic() + 10
    while d.all_pids() and time.monotonic() < deadline:
        for pid in d.all_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.05)


# ----- CURVE against plain ------------------------------------------------------------------------------
def keygen(tmp: Path) -> dict:
    kdir, adir = tmp / "keys", tmp / "authorized"
    kdir.mkdir(parents=True)
    adir.mkdir(parents=True)
    for name in ("server", "client"):
        subprocess.run([sys.executable, str(REPO / "run.py"), "keygen", name, "--dir", str(kdir)],
                       check=True, capture_output=True, timeout=60)
    shutil.copy(kdir / "client.key", adir / "client.key")
    return {"secret": str(kdir / "server.key_secret"), "authorized": str(adir),
            "server_public": str(kdir / "server.key"), "client_secret": str(kdir / "client.key_secret")}


def bench_curve(tmp: Path, trades: int, repeat: int, store: str, quiet: bool) -> dict:
    from pairlane.synthetic import result_columns
    from pairlane.entry.harness import Daemon
    keys = keygen(tmp)
    base: dict = {"pairs": {"interval_s": 3600.0}}
    if store:
        base["store"] = {"url": store}
    plain = Daemon(tmp / "plain", dict(base, daemon={"name": "bench-plain"}), name="plain")
    curve = Daemon(tmp / "curve", dict(base, daemon={"name": "bench-curve"},
                                       gateway={"curve_secret_key": keys["secret"],
                                                "curve_authorized_keys": keys["authorized"]}), name="curve")
    run = f"{os.getpid()}-{time.time_ns()}"
    cols = result_columns(trades, seed=3)
    try:
        plain.start()
        curve.start()
        send(plain.gateway_endpoint, f"warm-p-{run}", result_columns(1000, seed=1))
        send(curve.gateway_endpoint, f"warm-c-{run}", result_columns(1000, seed=1),
             server_key=keys["server_public"], client_key=keys["client_secret"])
        p_tps, c_tps = [], []
        for i in range(repeat):
            progress(f"curve vs plain, {trades:,} trades, round {i + 1}/{repeat}", quiet)
            order = (0, 1) if i % 2 == 0 else (1, 0)     # alternate who goes first
            for which in order:
                os.sync()
                if which == 0:
                    p_tps.append(trades / send(plain.gateway_endpoint, f"p{i}-{run}", cols))
                else:
                    c_tps.append(trades / send(curve.gateway_endpoint, f"c{i}-{run}", cols,
                                               server_key=keys["server_public"],
                                               client_key=keys["client_secret"]))
    finally:
        for d in (plain, curve):
            d.close()
    return {"trades": trades, "rounds": repeat, "plain_tps_median": statistics.median(p_tps),
            "curve_tps_median": statistics.median(c_tps),
            "ratio_of_medians": statistics.median(c_tps) / statistics.median(p_tps),
            "ratio_median_of_rounds": statistics.median(c / p for c, p in zip(c_tps, p_tps)),
            "ratios": [round(c / p, 3) for c, p in zip(c_tps, p_tps)], "target_ratio_min": 0.85}


# ----- failover -----------------------------------------------------------------------------------------
def bench_failover(tmp: Path, store: str, trades: int, repeat: int, timeout_s: float, quiet: bool) -> dict:
    from pairlane.client import Producer
    from pairlane.synthetic import result_columns
    from pairlane.entry.harness import Daemon
    over = {"store": {"url": store}, "pairs": {"interval_s": 3600.0}}
    b = Daemon(tmp / "B", dict(over, daemon={"name": "bench-B"}), name="B")
    times: list[float] = []
    run = f"{os.getpid()}-{time.time_ns()}"
    cols = result_columns(trades, seed=4)
    a = None
    try:
        b.start()
        for i in range(repeat):
            progress(f"failover round {i + 1}/{repeat}", quiet)
            a = Daemon(tmp / f"A{i}", dict(over, daemon={"name": f"bench-A{i}"}), name=f"A{i}")
            a.start()
            state: dict = {"acked": 0, "kill_at": None, "next_credit": None}
            p = Producer([a.gateway_endpoint, b.gateway_endpoint], timeout_s=timeout_s, retries=50,
                         max_message_bytes=256 * 1024)

            def on_progress(acked: int, total: int, p=p, state=state) -> None:
                state["acked"] = acked
                if state["kill_at"] is not None and state["next_credit"] is None and p.endpoint == b.gateway_endpoint:
                    state["next_credit"] = time.monotonic()
            out: dict = {}

            def run_send(p=p, out=out, i=i, on_progress=on_progress) -> None:
                try:
                    out["reply"] = p.send_result(f"fo{i}-{run}", "bench-failover", cols, progress=on_progress)
                except Exception as exc:  # noqa: BLE001 - reported below
                    out["error"] = repr(exc)
            t = threading.Thread(target=run_send)
            t.start()
            deadline = time.monotonic() + 120
            while state["acked"] < trades // 5 and time.monotonic() < deadline and t.is_alive():
                time.sleep(0.01)
            state["kill_at"] = time.monotonic()
            kill_group(a)
            t.join(300)
            p.close()
            if "error" in out or state["next_credit"] is None:
                raise RuntimeError(f"failover round {i}: {out} {state}")
            times.append(state["next_credit"] - state["kill_at"])
            a.cleanup()
            a = None
    finally:
        for d in (a, b):
            if d is not None:
                d.close()
    return {"trades": trades, "rounds": repeat, "producer_timeout_s": timeout_s,
            "seconds": [round(x, 3) for x in times], "median_s": statistics.median(times),
            "max_s": max(times), "target_median_s_max": 5.0}


# ----- two daemons + two producers against one daemon ---------------------------------------------------
def bench_aggregate(tmp: Path, store: str, trades: int, repeat: int, quiet: bool) -> dict:
    from pairlane.synthetic import result_columns
    from pairlane.entry.harness import Daemon
    over = {"store": {"url": store}, "pairs": {"interval_s": 3600.0}}
    ds = [Daemon(tmp / f"agg{i}", dict(over, daemon={"name": f"bench-agg{i}"}), name=f"agg{i}") for i in range(2)]
    run = f"{os.getpid()}-{time.time_ns()}"
    cols = [result_columns(trades, seed=10 + k) for k in range(2)]
    one, two = [], []
    try:
        for d in ds:
            d.start()

        def both(endpoints: list[str], tag: str) -> float:
            errs: list = []

            def go(k: int) -> None:
                try:
                    send(endpoints[k], f"{tag}-{k}-{run}", cols[k])
                except Exception as exc:  # noqa: BLE001 - reported below
                    errs.append(exc)
            ths = [threading.Thread(target=go, args=(k,)) for k in range(2)]
            t0 = time.perf_counter()
            for th in ths:
                th.start()
            for th in ths:
                th.join()
            if errs:
                raise RuntimeError(errs)
            return 2 * trades / (time.perf_counter() - t0)
        for i in range(repeat):
            progress(f"aggregate round {i + 1}/{repeat}", quiet)
            os.sync()
            one.append(both([ds[0].gateway_endpoint] * 2, f"one{i}"))
            os.sync()
            two.append(both([d.gateway_endpoint for d in ds], f"two{i}"))
    finally:
        for d in ds:
            d.close()
    return {"trades_per_producer": trades, "rounds": repeat, "one_daemon_tps_median": statistics.median(one),
            "two_daemons_tps_median": statistics.median(two),
            "ratio_two_vs_one": statistics.median(two) / statistics.median(one),
            "ratios": [round(t / o, 3) for t, o in zip(two, one)]}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m pairlane.bench.multi", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", nargs="*", help="curve, failover, aggregate (default: all three)")
    ap.add_argument("--store", default="", metavar="URL", help="postgresql:// URL (failover and aggregate need it)")
    ap.add_argument("--trades", type=int, default=100_000, help="trades per result (curve, aggregate)")
    ap.add_argument("--failover-trades", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--timeout-s", type=float, default=30.0,
                    help="the failover Producer's timeout_s (default: the Producer's own default)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    ns = ap.parse_args(argv)
    ns.what = ns.what or ["curve", "failover", "aggregate"]
    if set(ns.what) - {"curve", "failover", "aggregate"}:
        ap.error(f"unknown measurement(s) {sorted(set(ns.what) - {'curve', 'failover', 'aggregate'})}")
    if ({"failover", "aggregate"} & set(ns.what)) and not ns.store.startswith("postgresql://"):
        ap.error("failover and aggregate need --store postgresql://...")
    out: dict = {}
    tmp = Path(tempfile.mkdtemp(prefix="pairlane-bench-multi-"))
    try:
        if "curve" in ns.what:
            out["curve"] = bench_curve(tmp / "c", ns.trades, ns.repeat, "", ns.quiet)
        if "failover" in ns.what:
            out["failover"] = bench_failover(tmp / "f", ns.store, ns.failover_trades, ns.repeat, ns.timeout_s,
                                             ns.quiet)
        if "aggregate" in ns.what:
            out["aggregate"] = bench_aggregate(tmp / "a", ns.store, ns.trades, ns.repeat, ns.quiet)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if ns.json:
        print(json.dumps(out, indent=2))
    else:
        for section, figs in out.items():
            print(section)
            for k, v in figs.items():
                print(f"  {k:<28} {round(v, 3) if isinstance(v, float) else v}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
