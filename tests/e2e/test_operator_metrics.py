"""Issue 15, item 1: metrics an operator can alert on, through a real `python run.py` daemon.

What is proved here (PROTOCOL.md sections 6 and 7):
- every counter and label combination known at start is on the first scrape, at 0, before any
  traffic (so `increase()` sees the first results); the tree's actors and supervisors have
  `pairlane_actor_up` 1 and `pairlane_actor_restarts_total` 0; build info, pairs leader, the stall
  threshold, disk caps and free space and the actor processes' RSS/CPU/fds are exported;
- `admin restart metrics` keeps the pair gauges and the safe-stop alert (pairs re-sends them);
- restart counts keep counting across a supervisor's restart (`restart store`);
- a killed actor shows as down in `pairlane_actor_up` until it runs again;
- `admin alerts` lists the raised alerts (name, severity, reasons, since), `pairlane_alert_active`
  follows them, and a subscriber connecting late is sent every raised alert at once.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

import msgpack
import pytest
import zmq

from tests.e2e.test_pairs_metrics import (PAIRS_CFG, evaluate, inspect, rescue_data, scrape, send_all, val,
                                          wait_metric)
from tests.e2e.util import ERROR_CODES, wait_until

pytestmark = pytest.mark.timeout(180)

ZERO_AT_START = {
    "pairlane_results_total": ("outcome", ("stored_db", "stored_dlq", "failed", "aborted", "abandoned")),
    "pairlane_ingest_messages_total": ("type", ("begin", "chunk", "end", "abort", "result", "live_trades",
                                                "legacy")),
    "pairlane_errors_total": ("code", ERROR_CODES),
    "pairlane_legacy_results_total": ("outcome", ("stored", "failed")),
    "pairlane_dlq_replayed_total": ("outcome", ("landed", "discarded", "failed")),
    "pairlane_alerts_raised_total": ("name", ("ingest_stalled", "dlq_parked", "supervisor_escalated",
                                              "disk_low")),
    "pairlane_alert_active": ("name", ("ingest_stalled", "dlq_parked", "supervisor_escalated", "disk_low")),
}


def get(samples: dict, metric: str, labels: dict | None = None) -> float | None:
    """val() for labels that val's own parameters shadow (`name`)."""
    return samples.get((metric, tuple(sorted((labels or {}).items()))))


def wait_alert_active(d, alert: str, want: float, timeout: float = 10.0) -> dict:
    def ok():
        s, _ = scrape(d)
        return s if get(s, "pairlane_alert_active", {"name": alert}) == want else None
    return wait_until(ok, timeout, 0.1, f"pairlane_alert_active{{name={alert}}} == {want}")


def late_subscriber(d) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(d.cfg["alerts"]["endpoint"])
    return s


def first_alert(sub, pred, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    seen = []
    while (left := deadline - time.monotonic()) > 0:
        if sub.poll(int(left * 1000)):
            a = msgpack.unpackb(sub.recv(), raw=False)
            seen.append(a)
            if pred(a):
                return a
    raise AssertionError(f"no matching alert within {timeout}s; seen {seen}")


def test_every_series_known_at_start_is_on_the_first_scrape_at_zero(make_daemon):
    d = make_daemon({"pairs": PAIRS_CFG, "alerts": {"ingest_stall_s": 1234.0},
                     "store": {"max_bytes": 500_000_000}, "dlq": {"max_bytes": 70_000_000}})
    s, types = scrape(d)   # the first scrape, right after ready: no traffic yet
    for name, (label, values) in ZERO_AT_START.items():
        for v in values:
            assert get(s, name, {label: v}) == 0.0, (name, v)
    for outcome in ("ok", "safe_stop", "error"):   # the start-up evaluation may have run already
        assert val(s, "pairlane_pair_evaluations_total", outcome=outcome) in (0.0, 1.0), outcome
    assert get(s, "pairlane_alerts_raised_total", {"name": "pair_safe_stop"}) in (0.0, 1.0)
    for endpoint, reason in (("gateway", "unknown_key"), ("admin", "unknown_key"), ("admin", "bad_token"),
                             ("legacy", "address_not_allowed")):
        assert val(s, "pairlane_auth_failures_total", endpoint=endpoint, reason=reason) == 0.0
    names = [a["name"] for a in d.status()["actors"]]
    assert {"root", "store", "ingest", "writer", "metrics"} <= set(names)
    for name in names:   # supervisors included
        assert val(s, "pairlane_actor_restarts_total", actor=name) == 0.0, name
        assert val(s, "pairlane_actor_up", actor=name) in (0.0, 1.0), name
    assert types["pairlane_actor_up"] == "gauge" and types["pairlane_process_cpu_seconds"] == "counter"
    version = [k for k in s if k[0] == "pairlane_build_info"]
    assert len(version) == 1 and s[version[0]] == 1.0 and dict(version[0][1])["version"], version
    assert val(s, "pairlane_pairs_leader") == 1.0
    assert val(s, "pairlane_ingest_stall_threshold_seconds") == 1234.0
    assert val(s, "pairlane_disk_cap_bytes", area="store") == 500_000_000
    assert val(s, "pairlane_disk_cap_bytes", area="spool") == 70_000_000
    du = shutil.disk_usage(os.path.dirname(d.db_path))
    assert val(s, "pairlane_disk_size_bytes", area="store") == du.total
    assert 0 < val(s, "pairlane_disk_free_bytes", area="spool") <= du.total

    # every actor up, and its process measured, once the status table has been read
    def all_up():
        s, _ = scrape(d)
        return s if all(val(s, "pairlane_actor_up", actor=n) == 1.0 for n in names) else None
    s = wait_until(all_up, 10, 0.1, "every actor up in /metrics")
    pids = {a["name"]: a["pid"] for a in d.status()["actors"]}
    for name in names:
        assert val(s, "pairlane_process_resident_memory_bytes", actor=name) > 10_000_000, name
        assert val(s, "pairlane_process_open_fds", actor=name) >= 3, name
        assert val(s, "pairlane_process_cpu_seconds_total", actor=name) >= 0.0, name
    with open(f"/proc/{pids['writer']}/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert abs(val(s, "pairlane_process_resident_memory_bytes", actor="writer") - rss) < 50_000_000

    promtool = shutil.which("promtool")
    if promtool:   # issue 15: `promtool check metrics` on a real scrape has nothing to say
        import urllib.request
        with urllib.request.urlopen(f"http://{d.cfg['metrics']['listen']}/metrics", timeout=10) as r:
            body = r.read()
        out = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
        assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out


def test_restarting_the_metrics_actor_keeps_the_pair_gauges_and_the_safe_stop_alert(make_daemon):
    d = make_daemon({"pairs": PAIRS_CFG})
    wait_until(lambda: inspect(d, "pairs")["evaluations"] >= 1, 15, 0.1, "start-up pair evaluation")
    wait_metric(d, "pairlane_pair_safe_stop", 1.0)
    evaluations = inspect(d, "pairs")["evaluations"]

    def restart_metrics(n: int) -> None:
        assert d.admin("restart", {"actor": "metrics"})["ok"]
        d.wait_running("metrics", restarts=n, timeout=20)
        # the new instance serves /metrics once it counted its own restart from the status table
        wait_metric(d, "pairlane_actor_restarts_total", float(n), timeout=10, actor="metrics")

    restart_metrics(1)
    s = wait_metric(d, "pairlane_pair_safe_stop", 1.0, timeout=5)
    assert val(s, "pairlane_pair_slots_filled") == 0.0
    wait_alert_active(d, "pair_safe_stop", 1.0, 5)
    assert [a["name"] for a in d.admin("alerts")["alerts"]] == ["pair_safe_stop"]

    send_all(d, rescue_data(), "rm")
    r = evaluate(d)
    assert len(r["slots"]) == 1 and r["safe_stop"] is False, r
    wait_metric(d, "pairlane_pair_slots_filled", 1.0)
    evaluations += 1

    restart_metrics(2)
    s = wait_metric(d, "pairlane_pair_slots_filled", 1.0, timeout=5)
    assert val(s, "pairlane_pair_safe_stop") == 0.0
    assert get(s, "pairlane_alert_active", {"name": "pair_safe_stop"}) == 0.0
    assert len(d.admin("pairs")["slots"]) == 1
    # re-sent, not re-evaluated
    assert inspect(d, "pairs")["evaluations"] == evaluations


def test_restart_counts_keep_counting_across_a_supervisor_restart(make_daemon):
    d = make_daemon({"pairs": PAIRS_CFG})

    def restart(name: str) -> None:
        before = d.actor("writer")["pid"]
        assert d.admin("restart", {"actor": name})["ok"]
        d.wait_for(lambda: d.actor("writer")["state"] == "RUNNING" and d.actor("writer")["pid"] != before,
                   20, what=f"writer running again after restart {name}")

    restart("writer")
    wait_metric(d, "pairlane_actor_restarts_total", 1.0, actor="writer")
    restart("writer")
    wait_metric(d, "pairlane_actor_restarts_total", 2.0, actor="writer")
    restart("store")     # the store supervisor is new: it counts its children from 0 again
    s = wait_metric(d, "pairlane_actor_restarts_total", 3.0, actor="writer")
    wait_metric(d, "pairlane_actor_restarts_total", 1.0, actor="store")
    restart("writer")
    s = wait_metric(d, "pairlane_actor_restarts_total", 4.0, actor="writer")
    assert val(s, "pairlane_actor_restarts_total", actor="dlq") == 1.0      # restarted with its supervisor
    assert val(s, "pairlane_actor_restarts_total", actor="ingest") == 0.0


def test_a_killed_actor_shows_down_until_it_runs_again(make_daemon):
    # a long restart backoff keeps the killed actor down for several status samples (every 2 s)
    d = make_daemon({"pairs": PAIRS_CFG, "supervision": {"backoff_min_s": 8.0, "backoff_max_s": 8.0}})
    wait_metric(d, "pairlane_actor_up", 1.0, actor="dlq")
    pid = d.actor("dlq")["pid"]
    os.kill(pid, signal.SIGKILL)
    s = wait_metric(d, "pairlane_actor_up", 0.0, timeout=6, actor="dlq")
    assert d.actor("dlq")["state"] in ("BACKOFF", "STARTING", "STOPPED")
    assert val(s, "pairlane_actor_up", actor="writer") == 1.0
    assert val(s, "pairlane_process_open_fds", actor="dlq") is None     # no process to measure
    s = wait_metric(d, "pairlane_actor_up", 1.0, timeout=20, actor="dlq")
    assert val(s, "pairlane_actor_restarts_total", actor="dlq") == 1.0
    assert val(s, "pairlane_process_open_fds", actor="dlq") >= 3


def test_admin_alerts_lists_raised_alerts_and_a_late_subscriber_gets_them(make_daemon):
    d = make_daemon({"pairs": PAIRS_CFG, "alerts": {"ingest_stall_s": 2.0}})
    wait_alert_active(d, "ingest_stalled", 1.0, 15)
    t0 = time.time()
    r = d.admin("alerts")
    assert r["ok"], r
    by_name = {a["name"]: a for a in r["alerts"]}
    a = by_name["ingest_stalled"]
    assert set(a) == {"name", "severity", "reasons", "since"}, a
    assert a["severity"] == "warning" and a["reasons"]["limit_s"] == 2.0, a
    assert d_start(d) <= a["since"] <= t0, a
    s, _ = scrape(d)
    for name in ("ingest_stalled", "pair_safe_stop", "dlq_parked", "disk_low", "supervisor_escalated"):
        assert get(s, "pairlane_alert_active", {"name": name}) == (1.0 if name in by_name else 0.0), (name, by_name)
    out = d.admin_cli("alerts")
    assert out.returncode == 0, out
    assert out.stdout.splitlines()[0].split() == ["NAME", "SEVERITY", "SINCE", "AGE", "REASONS"], out.stdout
    assert any(ln.startswith("ingest_stalled") and "warning" in ln and "limit_s=2.0" in ln
               for ln in out.stdout.splitlines()), out.stdout

    # pair_safe_stop is raised once, at the start-up evaluation, and never re-asserted (interval 3600 s):
    # a subscriber connecting now is sent it at once
    wait_alert_active(d, "pair_safe_stop", 1.0, 15)
    greeted = inspect(d, "metrics")["subscribers_greeted"]
    sub = late_subscriber(d)
    try:
        a = first_alert(sub, lambda a: a["name"] == "pair_safe_stop", 5)
        assert a["state"] == "raised" and a["reasons"].get("no_data") == 1 and a["severity"] == "warning", a
        assert inspect(d, "metrics")["subscribers_greeted"] == greeted + 1
    finally:
        sub.close(0)

    # a result clears the stall: gone from the list and the gauge
    from pairlane.client import Producer, synthetic_columns
    with Producer(d.gateway_endpoint, timeout_s=10) as p:
        p.send_result("al.1", "S", synthetic_columns(10, seed=1))
    wait_alert_active(d, "ingest_stalled", 0.0, 10)
    assert "ingest_stalled" not in {a["name"] for a in d.admin("alerts")["alerts"]}


def d_start(d) -> float:
    rows = d.status()["actors"]
    root = next(a for a in rows if a["name"] == "root")
    return time.time() - root["uptime_s"] - 1.0


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_raised_alert_is_published_again_while_nothing_reasserts_it(make_daemon):
    from pairlane.actors.metrics import REPUBLISH_S
    d = make_daemon({"pairs": PAIRS_CFG})
    wait_alert_active(d, "pair_safe_stop", 1.0, 15)
    sub = late_subscriber(d)
    try:
        first = first_alert(sub, lambda a: a["name"] == "pair_safe_stop", 5)
        again = first_alert(sub, lambda a: a["name"] == "pair_safe_stop", REPUBLISH_S + 10)
        assert again["state"] == "raised" and again["ts"] - first["ts"] >= REPUBLISH_S - 3, (first, again)
        assert inspect(d, "pairs")["evaluations"] == 1    # nobody re-evaluated: the metrics actor re-sent it
    finally:
        sub.close(0)


def log_lines(d, level: str, event: str) -> list[str]:
    """Lines of `event` at `level` (bare or quoted values: the log format may quote them)."""
    lv = re.compile(rf'\blevel="?{level}"?(\s|$)')
    ev = re.compile(rf'\bevent="?{event}"?(\s|$)')
    return [ln for ln in d.log().splitlines() if lv.search(ln) and ev.search(ln)]


def test_an_empty_store_is_a_safe_stop_waiting_for_data_not_an_error(make_daemon):
    d = make_daemon({"pairs": PAIRS_CFG})
    wait_until(lambda: inspect(d, "pairs")["evaluations"] >= 1, 15, 0.1, "start-up pair evaluation")
    d.wait_for(lambda: log_lines(d, "WARNING", "pair_safe_stop"), 10, what="WARNING pair_safe_stop")
    (line,) = log_lines(d, "WARNING", "pair_safe_stop")
    assert re.search(r'\breason="?no_data"?', line) and re.search(r"\bstrategies=0\b", line), line
    assert not [ln for ln in d.log().splitlines() if re.search(r'\blevel="?ERROR"?', ln)], d.log()
    (a,) = d.admin("alerts")["alerts"]     # still a safe stop (no slot to trade), reported as waiting for data
    assert a["name"] == "pair_safe_stop" and a["reasons"] == {"no_data": 1, "strategies": 0}, a
    assert a["severity"] == "warning", a
    assert d.admin("pairs")["safe_stop"] is True

    # data present but no slot filled: an ERROR again, with the exclusion counts
    from pairlane.client import Producer, synthetic_columns
    with Producer(d.gateway_endpoint, timeout_s=10) as p:
        p.send_result("nd.1", "few", synthetic_columns(10, seed=3))
    assert evaluate(d)["safe_stop"] is True
    d.wait_for(lambda: log_lines(d, "ERROR", "pair_safe_stop"), 10, what="ERROR pair_safe_stop")
    (err,) = log_lines(d, "ERROR", "pair_safe_stop")
    assert re.search(r"\bexcluded_too_few_trades=1\b", err) and "no_data" not in err, err
    a = {a["name"]: a for a in d.admin("alerts")["alerts"]}["pair_safe_stop"]
    assert a["reasons"] == {"too_few_trades": 1, "strategies": 1} and a["severity"] == "critical", a
    assert len(log_lines(d, "WARNING", "pair_safe_stop")) == 1
