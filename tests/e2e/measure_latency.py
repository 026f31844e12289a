"""Measure restart and watchdog latency of a real daemon (not a test: pytest does not collect it).

  python tests/e2e/measure_latency.py [--n 10] [--actor admin] [--json]

restart latency: SIGKILL of the actor's pid -> `admin status` shows it RUNNING
with a new pid. watchdog latency: `inject hang` -> RUNNING with a new pid
(dominated by supervision.heartbeat_timeout_s, default 3 s). Status is
polled every 5 ms with a 0.2 s request timeout. Crashes are spaced past
supervision.window_s (set to 1 s here) so each restart is a first restart
(backoff 25-50 ms), as after an isolated crash in production; the other
settings are the defaults. Always tears the daemon down.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.harness import Daemon  # noqa: E402

WINDOW_S = 1.0


def rows(d: Daemon) -> dict | None:
    st = d.admin("status", timeout=0.2)
    if not st or not st.get("ok"):
        return None
    d._learn_pids(st)
    return {a["name"]: a for a in st["actors"]}


def wait_new_instance(d: Daemon, name: str, old_pid: int, t0: float, timeout: float) -> float:
    while time.monotonic() - t0 < timeout:
        r = rows(d)
        if r and r[name]["state"] == "RUNNING" and r[name]["pid"] not in (None, old_pid):
            return time.monotonic() - t0
        time.sleep(0.005)
    raise RuntimeError(f"{name} not RUNNING again within {timeout}s\n{d.log()[-3000:]}")


def current_pid(d: Daemon, name: str) -> int:
    for _ in range(200):
        r = rows(d)
        if r and r[name]["state"] == "RUNNING" and r[name]["pid"]:
            return r[name]["pid"]
        time.sleep(0.02)
    raise RuntimeError(f"{name} is not RUNNING")


def measure(d: Daemon, name: str, n: int, how: str) -> list[float]:
    out = []
    for _ in range(n):
        time.sleep(WINDOW_S + 0.3)  # past the crash window: every restart is a first one
        old = current_pid(d, name)
        t0 = time.monotonic()
        if how == "kill":
            os.kill(old, signal.SIGKILL)
        else:
            reply = d.admin("inject", {"actor": name, "fault": "hang"}, timeout=2.0)
            assert reply and reply.get("ok"), reply
        out.append(wait_new_instance(d, name, old, t0, 15.0))
    return out


def summary(values: list[float]) -> dict:
    return {"n": len(values), "median_s": round(statistics.median(values), 4),
            "max_s": round(max(values), 4), "min_s": round(min(values), 4),
            "all_s": [round(v, 4) for v in values]}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--actor", default="admin")
    p.add_argument("--json", action="store_true")
    ns = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pairlane-latency-") as tmp:
        d = Daemon(Path(tmp), {"supervision": {"window_s": WINDOW_S}})
        try:
            d.start()
            result = {"actor": ns.actor,
                      "restart_after_sigkill": summary(measure(d, ns.actor, ns.n, "kill")),
                      "watchdog_after_hang": summary(measure(d, ns.actor, ns.n, "hang"))}
        finally:
            d.close()
    if ns.json:
        print(json.dumps(result, indent=2))
    else:
        for key in ("restart_after_sigkill", "watchdog_after_hang"):
            s = result[key]
            print(f"{ns.actor} {key}: median {s['median_s'] * 1000:.0f} ms, max {s['max_s'] * 1000:.0f} ms, "
                  f"min {s['min_s'] * 1000:.0f} ms (n={s['n']})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
