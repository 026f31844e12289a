"""`python run.py chaos --soak --duration S`: hours of ordinary traffic, sampled for creep.

Owns: the soak run. It starts a real daemon in a temp dir, drives steady mixed traffic
through it (native results of 10 to 100k trades by `chaos.Traffic`, legacy S-expressions on
the legacy PUSH socket, live trades, admin polling, pair evaluations), optionally injects
chaos's faults now and then, and every `--sample-s` reads from /proc each process of the
daemon (RSS, open fds, threads; actor processes are titled `pairlane: <actor>`), the spool's
file count and bytes and the database size. At the end it stops the traffic, waits for the
spool to drain, runs chaos's checker plus the legacy and live-trade checks, and hands the
samples to `pairlane.soak` for the slopes and verdicts. Output: a text table (or `--json`),
`--csv PATH` of the samples, a progress line per sample on stderr; exit 1 on a failed
verdict or an unclean check.

Never does: judge anything itself (pairlane.soak does), attack a daemon it did not start,
or trust log lines (the checks read the database).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq

from pairlane import soak
from pairlane.client import Producer, SendError
from pairlane.synthetic import legacy_message

from . import chaos
from .harness import Daemon, add_keep_argument, render_health

LIVE_STRATEGY = "soak-live"


# ----- sampling --------------------------------------------------------------------------------------------
def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return None


def proc_figures(pid: int) -> dict[str, float] | None:
    """RSS (MiB), open fds and threads of pid from /proc; None when it is gone."""
    status = _read(f"/proc/{pid}/status")
    if status is None:
        return None
    fig: dict[str, float] = {}
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            fig["rss_mib"] = int(line.split()[1]) / 1024.0
        elif line.startswith("Threads:"):
            fig["threads"] = int(line.split()[1])
    try:
        fig["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    if "rss_mib" not in fig:  # a zombie has no VmRSS
        return None
    return fig


def spool_figures(path: str) -> dict[str, float]:
    """Files (the lock file aside) and their bytes under the spool directory, quarantine included."""
    files = size = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            if name == ".lock":
                continue
            try:
                size += os.stat(os.path.join(root, name)).st_size
                files += 1
            except OSError:
                continue
    return {"spool_files": files, "spool_bytes": size}


def db_bytes(db_path: str) -> int:
    total = 0
    for suffix in ("", "-wal"):
        try:
            total += os.stat(db_path + suffix).st_size
        except OSError:
            pass
    return total


def take_sample(d: Daemon, t_s: float) -> list[soak.Sample]:
    """One round of samples: every live process of the daemon, then the spool and the database."""
    out: list[soak.Sample] = []
    main_pid = d.proc.pid if d.proc is not None else None
    seen: set[str] = set()
    for pid in d.all_pids():
        cmd = _read(f"/proc/{pid}/cmdline")
        fig = proc_figures(pid)
        if cmd is None or fig is None:
            continue
        name = soak.process_name(cmd, pid, main_pid)
        if name in seen:  # two live processes of one name (a restart in progress): keep the first
            continue
        seen.add(name)
        out += [soak.Sample(t_s, name, pid, m, float(fig[m])) for m in soak.PROCESS_METRICS]
    glob = spool_figures(d.cfg["dlq"]["path"])
    glob["db_bytes"] = db_bytes(d.db_path)
    out += [soak.Sample(t_s, soak.GLOBAL, 0, m, float(v)) for m, v in glob.items()]
    return out


# ----- the traffic besides chaos.Traffic ------------------------------------------------------------------
class Mix:
    """Legacy S-expressions, live trades, admin polling and pair evaluations, each in a thread at a
    steady pace, recording what was sent and what came back."""

    def __init__(self, d: Daemon, seed: int, legacy_every_s: float = 2.0, live_every_s: float = 1.0,
                 admin_every_s: float = 2.0, pairs_every_s: float = 60.0):
        self.d = d
        self.seed = seed
        self.every = {"legacy": legacy_every_s, "live": live_every_s, "admin": admin_every_s,
                      "pairs": pairs_every_s}
        self.lock = threading.Lock()
        self.legacy_sent: dict[str, int] = {}      # request_id -> trades
        self.live_stored: dict[str, int] = {}      # batch_id -> rows (a `stored` reply came)
        self.live_unsure: dict[str, int] = {}      # batch_id -> rows (no promise: may or may not be stored)
        self.counts = {"admin_ok": 0, "admin_failed": 0, "pairs_ok": 0, "pairs_failed": 0}
        self.max_restarts = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> "Mix":
        for name in ("legacy", "live", "admin", "pairs"):
            if self.every[name] > 0:
                t = threading.Thread(target=getattr(self, f"_{name}"), daemon=True, name=f"soak-{name}")
                t.start()
                self._threads.append(t)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))

    def _legacy(self) -> None:
        endpoint = self.d.cfg["gateway"].get("legacy_endpoint")
        if not endpoint:
            return
        rng = random.Random(self.seed * 7 + 1)
        ctx = zmq.Context.instance()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 5000)
        push.setsockopt(zmq.SNDHWM, 100)
        push.connect(endpoint)
        k = 0
        try:
            while not self._stop.wait(self.every["legacy"]):
                n = rng.randint(10, 2000)
                rid = f"soak-leg-{self.seed}-{k}"
                msg = legacy_message(n, style=rng.choice(("dotted", "lexpr")), seed=rng.randrange(1 << 30),
                                     request_id=rid, strategy_name=f"soak-leg-{k % 5}")
                try:
                    push.send(msg, zmq.NOBLOCK)
                except zmq.Again:
                    continue  # the daemon is not taking legacy messages now (a fault): not sent, not checked
                with self.lock:
                    self.legacy_sent[rid] = n
                k += 1
        finally:
            push.close()

    def _live(self) -> None:
        rng = random.Random(self.seed * 7 + 2)
        k = 0
        with Producer(self.d.gateway_endpoint, timeout_s=4.0, retries=30) as p:
            while not self._stop.wait(self.every["live"]):
                n = rng.randint(1, 200)
                bid = f"soak-live-{self.seed}-{k}"
                k += 1
                cols = {"timestamp": [1_700_000_000 + k * 1000 + i for i in range(n)],
                        "pnl": [round(rng.gauss(0, 1), 2) for _ in range(n)],
                        "strategy_name": [LIVE_STRATEGY] * n,
                        "symbol": [rng.choice(("USDJPY", "EURUSD")) for _ in range(n)],
                        "pair_id": [None] * n}
                try:
                    p.send_live_trades(bid, cols)
                    with self.lock:
                        self.live_stored[bid] = n
                except SendError:
                    with self.lock:
                        self.live_unsure[bid] = n

    def _admin(self) -> None:
        cmds = ("status", "metrics", "dlq.list", "status", "pairs", "alerts")
        k = 0
        while not self._stop.wait(self.every["admin"]):
            cmd = cmds[k % len(cmds)]
            k += 1
            reply = self.d.admin(cmd, {"limit": 10} if cmd == "dlq.list" else None, timeout=10.0)
            with self.lock:
                self.counts["admin_ok" if reply and reply.get("ok") else "admin_failed"] += 1
                if cmd == "status" and reply and reply.get("ok"):
                    self.max_restarts = max(self.max_restarts, sum(a.get("restarts", 0) for a in reply["actors"]))

    def _pairs(self) -> None:
        while not self._stop.wait(self.every["pairs"]):
            reply = self.d.admin("pairs.evaluate", timeout=120.0)
            with self.lock:
                self.counts["pairs_ok" if reply and reply.get("ok") else "pairs_failed"] += 1


def check_mix(db_path: str, mix: Mix, wait_s: float = 120.0) -> dict:
    """Every legacy message sent reached `complete` with exactly its trades, and trade_logs holds
    every stored live batch once (at most the unsure ones besides)."""
    deadline = time.monotonic() + wait_s
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        while True:
            status = dict(conn.execute("SELECT request_id, status FROM backtest_results "
                                       "WHERE request_id LIKE 'soak-leg-%'").fetchall())
            pending = [r for r in mix.legacy_sent if status.get(r) != "complete"]
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        counts = dict(conn.execute("SELECT request_id, count(*) FROM backtest_trade_logs "
                                   "WHERE request_id LIKE 'soak-leg-%' GROUP BY request_id"))
        wrong = [r for r, n in mix.legacy_sent.items() if status.get(r) == "complete" and counts.get(r, 0) != n]
        live_rows = conn.execute("SELECT count(*) FROM trade_logs WHERE strategy_name = ?",
                                 (LIVE_STRATEGY,)).fetchone()[0]
    finally:
        conn.close()
    want = sum(mix.live_stored.values())
    unsure = sum(mix.live_unsure.values())
    return {"legacy_sent": len(mix.legacy_sent), "legacy_lost": len(pending), "legacy_wrong_rows": len(wrong),
            "live_batches": len(mix.live_stored), "live_rows_expected": want, "live_rows": live_rows,
            "live_ok": want <= live_rows <= want + unsure}


# ----- the run -----------------------------------------------------------------------------------------------
def wait_spool_empty(d: Daemon, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        fig = spool_figures(d.cfg["dlq"]["path"])
        if fig["spool_files"] == 0 or time.monotonic() > deadline:
            return fig
        time.sleep(0.5)


def run_soak(d: Daemon, duration: float, sample_s: float, seed: int = 0, faults: bool = False,
             fault_every_s: float = 60.0, producers: int = 1, min_trades: int = 10, max_trades: int = 100_000,
             result_pause_s: float = 3.0, pairs_every_s: float = 60.0, out=sys.stderr,
             thresholds: soak.Thresholds = soak.Thresholds(), csv_path: str | None = None) -> dict:
    """Drive the mix for `duration` seconds, sampling every `sample_s`; returns the summary
    (samples, verdict rows, checks, ok). With csv_path each round of samples is appended there as
    it is taken, so a run that dies early still leaves its samples."""
    if csv_path:
        Path(csv_path).write_text(soak.samples_csv([]))
    rng = random.Random(seed)
    traffic = chaos.Traffic(d.gateway_endpoint, producers=producers, min_trades=min_trades, max_trades=max_trades,
                            seed=seed, prefix="soak", pause_s=result_pause_s, log_uniform=True).start()
    mix = Mix(d, seed, pairs_every_s=pairs_every_s).start()
    samples: list[soak.Sample] = []
    injected: dict[str, int] = {}
    max_writers = 0
    t0 = time.monotonic()
    next_sample = t0
    next_fault = t0 + fault_every_s
    fault_kinds = [f for f in chaos.FAULTS if f != "kill_daemon"]
    try:
        while True:
            now = time.monotonic()
            if now >= t0 + duration:
                break
            if now >= next_sample:
                batch = take_sample(d, now - t0)
                samples += batch
                if csv_path:
                    with open(csv_path, "a") as fh:
                        fh.write(soak.samples_csv(batch, header=False))
                max_writers = max(max_writers, chaos.writers_alive(d.db_path))
                by = {(s.process, s.metric): s.value for s in batch}
                rss = sum(v for (p, m), v in by.items() if m == "rss_mib")
                print(f"soak: {(now - t0) / 60:5.1f}/{duration / 60:.1f} min  results {len(traffic.stored)}  "
                      f"legacy {len(mix.legacy_sent)}  live {len(mix.live_stored)}  "
                      f"admin {mix.counts['admin_ok']}  pairs {mix.counts['pairs_ok']}  "
                      f"rss total {rss:.1f} MiB  writer {by.get(('writer', 'rss_mib'), 0):.1f} MiB  "
                      f"spool {by.get((soak.GLOBAL, 'spool_files'), 0):.0f}  "
                      f"db {by.get((soak.GLOBAL, 'db_bytes'), 0) / 2**20:.0f} MiB", file=out, flush=True)
                next_sample += sample_s
            if faults and now >= next_fault:
                fault = rng.choice(fault_kinds)
                if fault == "kill_actor":
                    chaos.kill_actor(d, rng.choice(chaos.ACTORS))
                elif fault == "hang":
                    chaos.hang_actor(d, rng.choice(chaos.ACTORS))
                elif fault == "kill_supervisor":
                    chaos.kill_actor(d, rng.choice(chaos.SUPERVISORS))
                elif fault == "lock_db":
                    lock = chaos.DbLock(d.db_path)
                    time.sleep(rng.uniform(1.0, 5.0))
                    lock.release()
                elif fault == "fuzz":
                    chaos.fuzz(d, 100, rng.randrange(1 << 30))
                injected[fault] = injected.get(fault, 0) + 1
                print(f"soak: fault {fault}", file=out, flush=True)
                next_fault += fault_every_s
            time.sleep(max(0.05, min(next_sample, next_fault if faults else next_sample, t0 + duration)
                           - time.monotonic()))
    finally:
        end_s = time.monotonic() - t0
        traffic.stop()
        mix.stop()
    chaos.wait_all_running(d, timeout=60.0)
    final_spool = wait_spool_empty(d, 120.0)
    res = chaos.check(d.db_path, dict(traffic.stored))
    mixed = check_mix(d.db_path, mix)
    rows = soak.judge(samples, end_s, final_spool, thresholds)
    restarts = sum(a.get("restarts", 0) for a in d.status()["actors"])
    checks = {"results_sent": len(traffic.sent), "results_stored": len(traffic.stored),
              "results_not_stored_errors": len(traffic.errors), "lost": len(res["lost"]),
              "duplicates": res["duplicate_rows"], "wrong_row_counts": len(res["wrong_row_counts"]),
              "partial_visible": len(res["partial_visible"]), "max_writers_seen": max_writers,
              **mixed, **{k: v for k, v in mix.counts.items()}, "actor_restarts": restarts,
              "faults": injected, "health": d.health_events()}
    clean = chaos._clean({"lost": checks["lost"], "duplicates": checks["duplicates"],
                          "partial_visible": checks["partial_visible"],
                          "wrong_row_counts": checks["wrong_row_counts"], "max_writers_seen": max_writers}) \
        and (faults or checks["legacy_lost"] == 0) and checks["legacy_wrong_rows"] == 0 and checks["live_ok"] \
        and (faults or restarts == 0)
    # (with faults, a legacy message still queued in the socket of a legacy process that is killed is
    # gone: PUSH/PULL has no acknowledgement and the contract promises only what was taken off the
    # socket; such losses are reported, not failed)
    return {"duration_s": round(end_s, 1), "sample_s": sample_s, "samples": samples, "rows": rows,
            "final_spool": final_spool, "checks": checks, "checks_ok": clean,
            "verdict_ok": soak.passed(rows), "ok": clean and soak.passed(rows)}


def render(summary: dict) -> str:
    c = summary["checks"]
    lines = [f"soak: {summary['duration_s'] / 60:.1f} min, a sample every {summary['sample_s']:g} s; "
             f"slopes over the second half",
             soak.table(summary["rows"]), "",
             f"results: {c['results_stored']} stored of {c['results_sent']} sent, lost {c['lost']}, "
             f"duplicates {c['duplicates']}, wrong row counts {c['wrong_row_counts']}, "
             f"partial visible {c['partial_visible']}, max writers {c['max_writers_seen']}",
             f"legacy: {c['legacy_sent']} sent, lost {c['legacy_lost']}, wrong rows {c['legacy_wrong_rows']}; "
             f"live: {c['live_batches']} batches, {c['live_rows']} rows (expected {c['live_rows_expected']})",
             f"admin: {c['admin_ok']} ok, {c['admin_failed']} failed; pair evaluations: {c['pairs_ok']} ok, "
             f"{c['pairs_failed']} failed; actor restarts {c['actor_restarts']}; faults {c['faults'] or 'none'}",
             render_health(c.get("health", {})),
             f"verdict: {'PASS' if summary['ok'] else 'FAIL'} (series {'ok' if summary['verdict_ok'] else 'FAIL'}, "
             f"checks {'ok' if summary['checks_ok'] else 'FAIL'})"]
    return "\n".join(lines)


def as_json(summary: dict) -> dict:
    out = {k: v for k, v in summary.items() if k not in ("samples", "rows")}
    out["series"] = [r.as_dict() for r in summary["rows"]]
    out["sample_rounds"] = len({s.t_s for s in summary["samples"]})
    out["table"] = soak.table(summary["rows"])
    out["markdown"] = soak.markdown_table(summary["rows"])
    out["compact"] = soak.compact_markdown(summary["rows"])
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="run.py chaos --soak", description="A long run of steady mixed traffic through a daemon of its "
        "own (native results of 10 to 100k trades, legacy S-expressions, live trades, admin polling, pair "
        "evaluations), sampling every process's RSS, fds and threads, the spool and the database; then the "
        "slope of each series over the second half with a verdict, and the chaos checker.",
        epilog="examples:\n  python run.py chaos --soak --duration 3600 --json > soak.json\n"
               "  python run.py chaos --soak --duration 600 --sample-s 10 --faults --csv samples.csv\n"
               "verdict: RSS slope < 1 MiB/hour per process, fds and threads flat, spool empty at the end, "
               "0 lost, 0 duplicates, nothing partial (and no actor restart without --faults); exit 1 otherwise",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=3600.0, help="seconds of traffic (default 3600)")
    ap.add_argument("--sample-s", type=float, default=60.0, help="seconds between samples (default 60)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--faults", action="store_true", help="inject one of chaos's faults (no daemon kill) "
                    "every --fault-every-s")
    ap.add_argument("--fault-every-s", type=float, default=60.0)
    ap.add_argument("--producers", type=int, default=1, help="native producer threads (default 1)")
    ap.add_argument("--result-pause-s", type=float, default=3.0, help="a producer's rest between results")
    ap.add_argument("--max-trades", type=int, default=100_000)
    ap.add_argument("--pairs-every-s", type=float, default=60.0)
    ap.add_argument("--json", action="store_true", help="the summary as JSON on stdout")
    ap.add_argument("--csv", metavar="PATH", help="write every sample (long form) to PATH")
    add_keep_argument(ap)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.config:
        ap.error("--soak starts a daemon of its own; it takes no --config")
    if ns.duration <= 0 or ns.sample_s <= 0 or ns.sample_s > ns.duration:
        ap.error("--duration and --sample-s must be > 0, --sample-s at most --duration")
    tmp = Path(tempfile.mkdtemp(prefix="pairlane-soak-"))
    d = Daemon(tmp / "daemon", {"dlq": {"retry_min_s": 0.2, "retry_max_s": 2.0},
                                "gateway": {"assembly_timeout_s": 30.0},
                                "pairs": {"interval_s": 300.0}})
    print(f"soak: starting a daemon in {tmp}", file=sys.stderr)
    summary = None
    try:
        d.start()
        summary = run_soak(d, ns.duration, ns.sample_s, seed=ns.seed, faults=ns.faults,
                           fault_every_s=ns.fault_every_s, producers=ns.producers, max_trades=ns.max_trades,
                           result_pause_s=ns.result_pause_s, pairs_every_s=ns.pairs_every_s, csv_path=ns.csv)
    finally:
        # a run whose data checks failed keeps the daemon's files (and says where); a creeping series
        # alone does not: the samples tell that story
        d.close_and_remove(tmp, keep=ns.keep or summary is None or not summary["checks_ok"])
    if ns.json:
        print(json.dumps(as_json(summary), indent=2))
    else:
        print(render(summary))
    return 0 if summary["ok"] else 1
