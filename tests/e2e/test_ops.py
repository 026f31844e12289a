"""Operators' daily tools (issue 15, PROTOCOL.md section 7) through the real command line and daemon.

What is proved here:
- packaging: a non-editable `pip install .` into a fresh venv gives a `pairlane` command that runs
  `--help`, `--version` and `admin` from another directory, with the default config found as
  package data and no `run` module installed at the top of site-packages;
- the CLI: admin against a stopped daemon exits 4 in under 2 s and prints a JSON error under
  --json; `--config` after the sub-command's arguments and $PAIRLANE_CONFIG are honoured; `send`
  to a dead endpoint fails clearly within its probe time; `admin results` filters by status,
  strategy, since and limit, newest first; text output has no Python reprs; a reader closing
  the pipe early gives no traceback; actor processes are titled `pairlane: <actor>`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pairlane.entry.harness import REPO, Daemon, base_config, write_toml
from pairlane.client import Producer
from pairlane.synthetic import result_columns as synthetic_columns


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], capture_output=True, text=True,
                          cwd=str(cwd), env=env, timeout=timeout)


@pytest.fixture
def dead_config(tmp_path: Path) -> Path:
    """A config whose endpoints are free ports nobody listens on."""
    path = tmp_path / "dead.toml"
    write_toml(path, base_config(tmp_path))
    return path


def _endpoint_of(path: Path, section: str) -> str:
    import tomllib
    return tomllib.loads(path.read_text())[section]["endpoint"]


# ----- packaging ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_non_editable_install_runs_the_pairlane_command_from_another_directory(tmp_path, dead_config):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "tests", "data", "build", "*.egg-info",
                                                             "__pycache__", ".pytest_cache"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    inst = subprocess.run([str(py), "-m", "pip", "install", "--no-deps",
                           "-q", str(src)], capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr
    shutil.rmtree(src)  # the installed copy must stand alone
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PAIRLANE_CONFIG")}
    pairlane = str(venv / "bin" / "pairlane")

    helped = subprocess.run([pairlane, "--help"], capture_output=True, text=True, cwd=elsewhere, env=env, timeout=60)
    assert helped.returncode == 0, helped.stderr
    assert "pairlane admin" in helped.stdout and "--config" in helped.stdout
    assert "usage: pairlane [-h]" in helped.stdout  # the daemon's own usage, named as called
    version = subprocess.run([pairlane, "--version"], capture_output=True, text=True, cwd=elsewhere, env=env,
                             timeout=60)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip().startswith("pairlane ") and "unknown" not in version.stdout
    # the installed package's own default config is the one loaded
    where = subprocess.run([str(py), "-c", "from pairlane import config as c; print(c.DEFAULTS_PATH); "
                            "print(c.load(None)['daemon']['log_format'])"],
                           capture_output=True, text=True, cwd=elsewhere, env=env, timeout=60)
    assert where.returncode == 0, where.stderr
    path, fmt = where.stdout.split()
    assert path.startswith(str(venv)) and Path(path).is_file() and fmt == "logfmt"
    # every command works installed: admin reads the default config and reports the daemon down
    down = subprocess.run([pairlane, "admin", "status", "--json", "--config", str(dead_config)],
                          capture_output=True, text=True, cwd=elsewhere, env=env, timeout=60)
    assert down.returncode == 4, down.stderr
    assert json.loads(down.stdout)["error"] == "unreachable"
    site = next((venv / "lib").glob("python*/site-packages"))
    assert not (site / "run.py").exists(), "a generic top-level `run` module was installed"
    generic = [n for n in ("actors", "supervision", "entry", "bench", "config", "tests") if (site / n).exists()]
    assert generic == [], f"generic top-level names installed into site-packages: {generic}"
    assert (site / "pairlane" / "actors" / "writer.py").is_file()   # the layers live inside pairlane


# ----- the command line -----------------------------------------------------------------------
def test_admin_against_a_stopped_daemon_exits_4_within_2s_with_a_json_error(tmp_path, dead_config):
    t0 = time.monotonic()
    r = run_cli("admin", "--json", "status", "--config", str(dead_config), cwd=tmp_path)
    took = time.monotonic() - t0
    assert r.returncode == 4, (r.stdout, r.stderr)
    assert took < 2.0, took
    err = json.loads(r.stdout)
    assert err["ok"] is False and err["error"] == "unreachable"
    assert err["endpoint"] == _endpoint_of(dead_config, "admin")  # --config after the args was used
    t0 = time.monotonic()
    r = run_cli("admin", "status", cwd=tmp_path, env=dict(os.environ, PAIRLANE_CONFIG=str(dead_config)))
    assert r.returncode == 4 and time.monotonic() - t0 < 2.0
    assert _endpoint_of(dead_config, "admin") in r.stderr  # $PAIRLANE_CONFIG named the endpoint
    assert r.stdout == "" and "Traceback" not in r.stderr


def test_send_to_a_dead_endpoint_fails_clearly_within_its_probe(tmp_path, dead_config):
    t0 = time.monotonic()
    r = run_cli("send", "--synthetic", "10", "--timeout", "2", "--config", str(dead_config), cwd=tmp_path)
    assert r.returncode == 1
    assert time.monotonic() - t0 < 10.0
    assert "unreachable" in r.stderr and _endpoint_of(dead_config, "gateway") in r.stderr


def test_config_errors_name_the_file_wherever_config_stands(tmp_path):
    r = run_cli("admin", "status", "--config", str(tmp_path / "missing.toml"), cwd=tmp_path)
    assert r.returncode == 2 and "missing.toml" in r.stderr


def _send(d: Daemon, rid: str, strategy: str, n: int = 200) -> dict:
    with Producer(d.gateway_endpoint, timeout_s=10) as p:
        return p.send_result(rid, strategy, synthetic_columns(n, seed=len(rid), strategy=strategy))


def test_admin_results_lists_and_filters_newest_first_without_python_reprs(make_daemon):
    d = make_daemon()
    _send(d, "r-a1", "Alpha")
    _send(d, "r-b1", "Beta")
    cut = time.time()
    _send(d, "r-a2", "Alpha", n=300)
    # a failed result: the same id re-begun with fewer trades than declared is not possible from
    # the producer, so mark one failed through the database as the writer would
    import sqlite3
    with sqlite3.connect(d.db_path) as c:
        c.execute("UPDATE backtest_results SET status = 'failed' WHERE request_id = 'r-b1'")

    def results(*args: str) -> list[dict]:
        r = d.admin_cli("results", *args, "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["results"]

    every = results()
    assert [r["request_id"] for r in every] == ["r-a2", "r-b1", "r-a1"]
    assert every[0]["total_trades"] == 300 and every[0]["strategy_name"] == "Alpha"
    assert [r["request_id"] for r in results("--strategy", "Alpha")] == ["r-a2", "r-a1"]
    assert [r["request_id"] for r in results("--status", "failed")] == ["r-b1"]
    assert [r["request_id"] for r in results("--since", f"{cut:.3f}")] == ["r-a2"]
    assert [r["request_id"] for r in results("--limit", "1")] == ["r-a2"]
    assert [r["request_id"] for r in results("--since", "1h", "--status", "complete")] == ["r-a2", "r-a1"]
    bad = d.admin_cli("results", "--status", "bogus")
    assert bad.returncode == 2
    text = d.admin_cli("results", "--strategy", "Alpha")
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    assert lines[0].split()[:3] == ["REQUEST_ID", "STRATEGY", "STATUS"] and len(lines) == 3
    assert "T" in lines[1].split()[5] and lines[1].split()[5].endswith("Z")  # ISO received time
    for cmd in (["results"], ["result", "r-a1"], ["status"], ["inspect", "pairs"], ["inspect", "writer"],
                ["pairs"], ["dlq.list"]):
        out = d.admin_cli(*cmd)
        assert out.returncode == 0, (cmd, out.stderr)
        for repr_word in ("True", "False", "None", "{}"):
            assert repr_word not in out.stdout.split(), (cmd, repr_word, out.stdout)
    received = d.admin_cli("result", "r-a1").stdout
    assert "received_at: 20" in received  # an ISO date, not a raw epoch float


def test_a_closed_pipe_gives_no_traceback_and_actors_are_titled(make_daemon):
    d = make_daemon()
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), "admin", "--config", str(d.config_path),
                             "status"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(d.tmp))
    proc.stdout.close()  # the reader is gone before the reply comes (as `| head` after its line)
    err = proc.stderr.read().decode()
    proc.wait(30)
    proc.stderr.close()
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert proc.returncode == 141  # it did write into the closed pipe, and ended as a shell pipeline would
    for a in d.status()["actors"]:
        with open(f"/proc/{a['pid']}/cmdline", "rb") as fh:
            title = fh.read().replace(b"\0", b" ").decode().strip()
        assert title == f"pairlane: {a['name']}", (a["name"], title)


# ----- signals -----------------------------------------------------------------------------------
def _log_after(d: Daemon, marker: str) -> str:
    text = d.log_path.read_text(errors="replace")
    at = text.find(marker)
    return text[at:] if at >= 0 else ""


def test_sighup_keeps_the_daemon_up_and_applies_log_level_and_pairs_interval(make_daemon):
    import signal
    import tomllib
    d = make_daemon({"pairs": {"interval_s": 300.0}})
    assert d.admin("inspect", {"actor": "pairs"})["state"]["interval_s"] == 300.0
    d.admin("status")
    assert "level=DEBUG" not in d.log_path.read_text()
    pids = {a["name"]: a["pid"] for a in d.status()["actors"]}

    cfg = tomllib.loads(d.config_path.read_text())
    cfg["daemon"]["log_level"] = "DEBUG"
    cfg["pairs"]["interval_s"] = 0.5
    cfg["gateway"]["credit"] = 4  # cannot change while running: reported, not applied
    write_toml(d.config_path, cfg)
    d.proc.send_signal(signal.SIGHUP)

    reloaded = d.wait_for(lambda: _log_after(d, "event=config_reloaded"), 10, what="config_reloaded line")
    first = reloaded.splitlines()[0]
    assert "daemon.log_level" in first and "pairs.interval_s" in first and "gateway.credit" in first
    applied, restart = first.split("applied=")[1], first.split("needs_restart=")[1]
    assert "gateway.credit" in restart and "gateway.credit" not in applied.split("needs_restart=")[0]
    state = d.wait_for(lambda: (s := d.admin("inspect", {"actor": "pairs"})["state"])["interval_s"] == 0.5 and s,
                       10, what="pairs interval 0.5")
    before = state["evaluations"]
    d.wait_for(lambda: d.admin("inspect", {"actor": "pairs"})["state"]["evaluations"] >= before + 2, 15,
               what="evaluations at the new interval")
    # the admin actor logs each command at DEBUG: after the reload such lines appear
    d.wait_for(lambda: (d.admin("status") or True) and "level=DEBUG" in _log_after(d, "event=config_reloaded"),
               10, what="a DEBUG line after the reload")
    assert d.proc.poll() is None
    # a broken config file is refused and the running config kept
    d.config_path.write_text("[daemon\n")
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for(lambda: "event=config_reload_failed" in d.log_path.read_text(), 10, what="config_reload_failed")
    assert d.admin("inspect", {"actor": "pairs"})["state"]["interval_s"] == 0.5 and d.proc.poll() is None
    # SIGHUP restarts nothing, and the daemon still stops gracefully
    assert {a["name"]: a["pid"] for a in d.status()["actors"]} == pids
    assert d.admin("inspect", {"actor": "gateway"})["ok"]
    assert d.stop() == 0
    assert "event=daemon_exit" in d.log_path.read_text()


# ----- logging -----------------------------------------------------------------------------------
_LOGFMT_PAIR = None


def parse_logfmt(line: str) -> dict:
    """key=value pairs, values bare words or JSON strings; AssertionError on anything else or a
    repeated key."""
    import re
    global _LOGFMT_PAIR
    if _LOGFMT_PAIR is None:
        _LOGFMT_PAIR = re.compile(r'([A-Za-z_][A-Za-z0-9_.]*)=("(?:[^"\\]|\\.)*"|[^\s="\\]+)(?: |$)')
    out: dict = {}
    pos = 0
    while pos < len(line):
        m = _LOGFMT_PAIR.match(line, pos)
        assert m, f"not logfmt at {pos}: {line!r}"
        key, raw = m.group(1), m.group(2)
        assert key not in out, f"repeated key {key}: {line!r}"
        out[key] = json.loads(raw) if raw.startswith('"') else raw
        pos = m.end()
    return out


def _exercise(d: Daemon) -> None:
    """Results stored, an actor restarted (child_started with the child's pid), a DLQ list."""
    _send(d, "log-1", "Alpha")
    _send(d, "log-2", "Beta", n=123)
    old = d.actor("writer")["restarts"]
    assert d.admin("restart", {"actor": "writer"})["ok"]
    d.wait_running("writer", restarts=old + 1, timeout=15)
    d.admin("pairs.evaluate")


def test_logfmt_lines_parse_with_unique_keys_and_a_line_per_result_and_a_clean_stop_warns_nothing(make_daemon,
                                                                                                    tmp_path):
    log_file = tmp_path / "logs" / "pairlane.log"
    d = make_daemon({"daemon": {"log_file": str(log_file), "name": "ops-test"},
                     "pairs": {"min_trades": 10_000}})  # every strategy excluded: an alert with a map
    _exercise(d)
    assert d.stop() == 0
    lines = log_file.read_text().splitlines()
    assert len(lines) > 20
    parsed = [parse_logfmt(ln) for ln in lines]
    assert all(p["daemon"] == "ops-test" and p["ts"].endswith("Z") for p in parsed)
    assert {p["level"] for p in parsed} <= {"INFO", "WARNING", "ERROR"}
    raised = next(p for p in parsed if p["event"] == "alert_raised" and p["alert"] == "pair_safe_stop")
    assert json.loads(raised["reasons"])["too_few_trades"] >= 2  # JSON, not a Python repr
    stored = {p["request_id"]: p for p in parsed if p["event"] == "result_stored"}
    assert set(stored) == {"log-1", "log-2"}
    assert stored["log-2"]["trades"] == "123" and stored["log-2"]["location"] == "db"
    assert float(stored["log-2"]["seconds"]) >= 0 and stored["log-2"]["level"] == "INFO"
    started = [p for p in parsed if p["event"] == "child_started" and p["child"] == "writer"]
    assert len(started) >= 2 and all(p["child_pid"] != p["pid"] for p in started)
    stop_at = next(i for i, p in enumerate(parsed) if p["event"] == "daemon_stopping")
    assert [p["event"] for p in parsed[stop_at:] if p["level"] != "INFO"] == []  # a clean stop warns nothing
    assert parsed[-1]["event"] == "daemon_exit" and parsed[-1]["exit_code"] == "0"


def test_json_log_lines_are_objects_and_maps_stay_maps(make_daemon, tmp_path):
    log_file = tmp_path / "json.log"
    d = make_daemon({"daemon": {"log_file": str(log_file), "log_format": "json"},
                     "pairs": {"min_trades": 10_000}})  # every strategy excluded: safe stop with a map
    _exercise(d)
    assert d.stop() == 0
    parsed = [json.loads(ln) for ln in log_file.read_text().splitlines()]
    assert all(isinstance(p, dict) and {"ts", "level", "daemon", "actor", "pid", "event"} <= set(p) for p in parsed)
    stored = [p for p in parsed if p["event"] == "result_stored"]
    assert sorted(p["trades"] for p in stored) == [123, 200]  # numbers stay numbers
    raised = [p for p in parsed if p["event"] == "alert_raised" and p["alert"] == "pair_safe_stop"]
    assert raised and isinstance(raised[0]["reasons"], dict)  # a map is a JSON object, not a repr
    assert raised[0]["reasons"]["too_few_trades"] >= 2
    assert all(isinstance(p["pid"], int) for p in parsed)


def test_log_file_renamed_then_sighup_writes_to_a_new_file(make_daemon, tmp_path):
    import signal
    log_file = tmp_path / "rot.log"
    d = make_daemon({"daemon": {"log_file": str(log_file)}})
    rotated = tmp_path / "rot.log.1"
    os.rename(log_file, rotated)
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for(lambda: log_file.exists() and "event=config_reloaded" in log_file.read_text(), 10,
               what="the reopened log file")
    _send(d, "after-rotate", "Gamma")
    d.wait_for(lambda: "request_id=after-rotate" in log_file.read_text(), 10, what="a result line in the new file")
    # every actor reopened: restart lines of an actor land in the new file too
    assert d.admin("restart", {"actor": "pairs"})["ok"]
    d.wait_for(lambda: "child=pairs" in log_file.read_text(), 10, what="pairs restart in the new file")
    assert "request_id=after-rotate" not in rotated.read_text()
    assert "event=daemon_ready" in rotated.read_text()
    assert d.stop() == 0


# ----- temp dirs -----------------------------------------------------------------------------------
def test_passing_tests_leave_no_temp_dir_behind(tmp_path):
    """pytest's tmp_path_retention_policy = "failed" (pyproject.toml): a passing run removes its
    temp dirs, a failing run keeps the failed test's."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "test_probe.py").write_text(
        "import os\n"
        "def test_writes(tmp_path):\n    (tmp_path / 'big').write_bytes(b'x' * 1000)\n"
        "def test_maybe_fails(tmp_path):\n    (tmp_path / 'f').write_text('x')\n"
        "    assert os.environ.get('PROBE_FAIL') != '1'\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    env["TMPDIR"] = str(tmpdir)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(REPO / "pyproject.toml"),
           "--rootdir", str(probe), str(probe / "test_probe.py")]
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=probe, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert [p for p in tmpdir.rglob("*") if p.is_file()] == []
    bad = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, PROBE_FAIL="1"), cwd=probe, timeout=120)
    assert bad.returncode == 1
    kept = [p.name for p in tmpdir.rglob("*") if p.is_file()]
    assert kept == ["f"], kept  # only the failed test's dir is kept


@pytest.mark.slow
def test_chaos_run_removes_its_temp_dir(tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    r = run_cli("chaos", "--duration", "3", "--json", cwd=tmp_path, env=dict(os.environ, TMPDIR=str(tmpdir)),
                timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert str(tmpdir) in r.stderr  # its daemon did live there
    assert list(tmpdir.iterdir()) == []
