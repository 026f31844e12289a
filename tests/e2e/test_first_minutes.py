"""The README's "First five minutes", run as written against a real daemon: the commands of its
second code block, in order, with PAIRLANE_CONFIG pointing at the test daemon's config (so the
test's own ports and temp dir are used, and no `--config` is added to any command line). It must
end with at least one filled pair slot. Also checks `admin status`'s `daemon` block (PROTOCOL.md
section 7). Never edits the README's commands beyond the interpreter and the path of run.py."""
from __future__ import annotations

import json
import os
import re
import shlex
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pairlane.entry import send
from pairlane.pairs import SECONDS_PER_DAY
from pairlane.synthetic import daily_result_columns, strategy_names
from tests.e2e.util import BACKENDS


REPO = Path(__file__).resolve().parents[2]


def first_five_minutes() -> tuple[list[str], list[str]]:
    """(the daemon's command block, the commands block) of the README section."""
    text = (REPO / "README.md").read_text()
    section = text.split("## First five minutes", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(blocks) == 2, blocks

    def commands(block: str) -> list[str]:
        return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]
    return commands(blocks[0]), commands(blocks[1])


def run(d, command: str) -> subprocess.CompletedProcess:
    argv = shlex.split(command)
    assert argv[:2] == ["python", "run.py"], command
    env = dict(os.environ, PAIRLANE_CONFIG=str(d.config_path))
    return subprocess.run([sys.executable, str(REPO / "run.py"), *argv[2:]], capture_output=True, text=True,
                          timeout=120, cwd=str(d.tmp), env=env)


def test_first_five_minutes_gets_real_pairs(make_daemon):
    daemon_block, steps = first_five_minutes()
    # the daemon: `python run.py` with the default config is what the harness starts, on its own ports
    assert daemon_block == ["pip install -e . && python run.py"]
    d = make_daemon(start=False)
    d.start(env={"PAIRLANE_CONFIG": str(d.config_path)})
    assert steps[0] == "python run.py admin status" and steps[-1] == "python run.py admin stop"
    assert any("send --synthetic" in s and "--strategies" in s for s in steps)
    outputs = {}
    for step in steps:
        if step.endswith("admin stop"):
            continue
        out = run(d, step)
        assert out.returncode == 0, (step, out.stdout, out.stderr, d.log()[-3000:])
        outputs[step] = out.stdout

    # `admin status`: ready, and the daemon block in the header line
    status_text = outputs["python run.py admin status"]
    head = status_text.splitlines()[0]
    assert head.startswith("ready: yes"), status_text
    host = socket.gethostname()
    assert f"daemon: {host}" in head and f"pid: {d.proc.pid}" in head and "store: sqlite" in head, head
    assert "pairs leader: yes" in head, head
    st = d.status()
    assert st["daemon"] == {"name": host, "host": host, "pid": d.proc.pid, "store": "sqlite"}
    assert st["pairs_leader"] is True
    raw = json.loads(run(d, "python run.py admin status --json").stdout)
    assert set(raw["daemon"]) == {"name", "host", "pid", "store"}

    # `admin pairs` (text, as a newcomer sees it): at least one filled slot
    send = next(s for s in steps if "send --synthetic" in s)
    k = int(shlex.split(send)[shlex.split(send).index("--strategies") + 1])
    names = {f"synthetic-0-{i:02d}" for i in range(1, k + 1)}
    pairs_text = outputs["python run.py admin pairs"]
    lines = pairs_text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["PAIR_ID"])
    slot_rows = [line.split() for line in lines[header + 1:] if re.match(r"^[0-9a-f]{16}\s", line)]
    assert slot_rows, pairs_text
    assert all(r[1] in names and r[2] in names and r[1] < r[2] for r in slot_rows), pairs_text
    assert "safe_stop: no" in pairs_text, pairs_text
    # ... and the same slots are in the database
    with sqlite3.connect(d.db_path) as conn:
        stored = {row[0] for row in conn.execute("SELECT pair_id FROM pair_slots")}
        ranks = {row[0] for row in conn.execute(
            "SELECT rank FROM backtest_results WHERE status = 'complete'")}
        strategies = {row[0] for row in conn.execute("SELECT strategy_name FROM backtest_results")}
    assert stored == {r[0] for r in slot_rows}
    assert ranks == {"A"} and strategies == names

    # `admin results`: every strategy, complete
    results_text = outputs["python run.py admin results"]
    for name in names:
        assert re.search(rf"\s{re.escape(name)}\s+complete\s+120\s", results_text), (name, results_text)

    # `admin stop`: graceful, exit 0
    out = run(d, "python run.py admin stop")
    assert out.returncode == 0, out.stderr
    assert d.proc.wait(30) == 0


@pytest.mark.parametrize("backend_store", BACKENDS, indirect=True)
def test_status_names_the_daemon_and_its_store_backend(backend_store, make_daemon):
    d = make_daemon({**backend_store, "daemon": {"name": "ingest-7"}})
    st = d.status()
    backend = "postgresql" if backend_store else "sqlite"
    assert st["daemon"] == {"name": "ingest-7", "host": socket.gethostname(), "pid": d.proc.pid,
                            "store": backend}
    assert st["pairs_leader"] is True
    head = d.admin_cli("status").stdout.splitlines()[0]
    assert "daemon: ingest-7" in head and f"store: {backend}" in head, head
    assert "event=daemon_ready" in d.log() and "daemon=ingest-7" in d.log()


def test_synthetic_strategy_sets_trade_once_a_day():
    names = strategy_names(12, "x")
    assert names[0] == "x-01" and names[-1] == "x-12" and len(set(names)) == 12
    a = daily_result_columns(120, seed=0, strategy=names[0])
    b = daily_result_columns(120, seed=0, strategy=names[1])
    days = np.asarray(a["timestamp"]) // SECONDS_PER_DAY
    assert (np.diff(days) == 1).all() and (days == np.asarray(b["timestamp"]) // SECONDS_PER_DAY).all()
    # hold_time ends before the next trade closes; the two series differ
    assert (np.diff(a["timestamp"]) > a["hold_time"][1:]).all()
    assert abs(np.corrcoef(a["pnl"], b["pnl"])[0, 1]) < 0.3
    assert daily_result_columns(120, seed=0, strategy=names[0])["pnl"].tolist() == a["pnl"].tolist()


@pytest.mark.parametrize("argv", [["--file", "x.json", "--strategies", "3"], ["--synthetic", "5", "--strategies", "0"]])
def test_send_strategies_usage_errors_exit_2(argv, capsys):
    assert send.main(argv) == 2
    assert "--strategies" in capsys.readouterr().err
