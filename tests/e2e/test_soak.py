"""`run.py chaos --soak` end to end: a short soak through a real daemon it starts itself.

The run is short (about 45 s, a sample every 3 s), so its slopes say little about leaks;
what this proves is the machinery on real samples: every actor process found by its title
and sampled, each series judged over the second half, the spool sampled and empty at the
end, the mixed traffic stored exactly (the chaos checker plus the legacy and live checks),
the CSV written, and the exit code agreeing with the verdict.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from pairlane.entry.chaos import ACTORS
from pairlane.entry.harness import REPO

pytestmark = pytest.mark.slow


def test_short_soak_samples_every_actor_and_checks_the_data(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(REPO))
    env.pop("PAIRLANE_CONFIG", None)
    csv_path = tmp_path / "samples.csv"
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), "chaos", "--soak", "--duration", "45",
                           "--sample-s", "3", "--pairs-every-s", "15", "--max-trades", "20000",
                           "--result-pause-s", "1", "--json", "--csv", str(csv_path)],
                          capture_output=True, text=True, timeout=400, env=env, cwd=str(tmp_path))
    assert proc.stdout, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    c = out["checks"]
    # the data: every promise kept, nothing twice, nothing partial
    assert c["results_stored"] >= 3 and c["lost"] == 0 and c["duplicates"] == 0, c
    assert c["wrong_row_counts"] == 0 and c["partial_visible"] == 0 and c["max_writers_seen"] == 1, c
    assert c["legacy_sent"] >= 10 and c["legacy_lost"] == 0 and c["legacy_wrong_rows"] == 0, c
    assert c["live_batches"] >= 10 and c["live_ok"] and c["live_rows"] == c["live_rows_expected"], c
    assert c["admin_ok"] >= 10 and c["admin_failed"] == 0 and c["pairs_ok"] >= 1, c
    assert c["actor_restarts"] == 0 and out["checks_ok"] is True, c
    assert c["health"]["watchdog_kill"] == 0 and set(c["health"]) >= {"loop_stalled", "tx_dropped"}, c["health"]
    # the samples: every actor (and supervisor) by its title, each metric judged on real points
    assert out["sample_rounds"] >= 12
    series = {(r["process"], r["metric"]): r for r in out["series"]}
    for name in ACTORS + ("store", "ingest", "root", "main"):
        for metric in ("rss_mib", "fds", "threads"):
            r = series[(name, metric)]
            assert r["points"] >= 5 and r["verdict"] in ("ok", "FAIL"), r
            assert r["slope_per_hour"] is not None and r["first"] > 0, r
    assert series[("-", "spool_files")]["verdict"] == "ok" and out["final_spool"]["spool_files"] == 0
    assert series[("-", "db_bytes")]["max"] > 0
    assert out["ok"] == (out["verdict_ok"] and out["checks_ok"])
    assert proc.returncode == (0 if out["ok"] else 1), proc.stderr[-2000:]
    # progress on stderr, one line per sample
    assert proc.stderr.count("soak: ") >= 12
    # the CSV holds every sample
    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    assert {r["process"] for r in rows} >= set(ACTORS)
    assert len({r["t_s"] for r in rows}) == out["sample_rounds"]
    # a clean run leaves no daemon directory behind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("pairlane-soak-")]
