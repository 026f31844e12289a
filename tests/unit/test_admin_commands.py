"""The admin command registry (pairlane.admin_commands): one declaration serves the CLI, the admin
actor's argument check, the owner actor's handler and the rendering; and the read-only StoreView
that `result` and `verify` read."""
from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from pairlane.actors.admin import Admin
from pairlane.actors.dlq import DLQ
from pairlane.actors.metrics import MetricsActor
from pairlane.actors.pairs import PairsActor
from pairlane import admin_commands as ac
from pairlane.store import Store, StoreError, StoreView, meta_from_message

ROOT = Path(__file__).resolve().parents[2]
OWNERS = {"admin": Admin, "dlq": DLQ, "metrics": MetricsActor, "pairs": PairsActor}
# PROTOCOL.md section 4, plus `help`
PROTOCOL_COMMANDS = {"status", "inspect", "result", "dlq.list", "dlq.show", "dlq.replay", "dlq.purge", "pairs",
                     "pairs.evaluate", "verify", "metrics", "restart", "inject", "stop", "help"}
PROTOCOL_COMMANDS |= {"alerts", "results"}   # PROTOCOL.md section 7 additions


def test_the_registry_holds_every_command_of_the_protocol_each_with_help_and_a_known_owner():
    assert set(ac.COMMANDS) == PROTOCOL_COMMANDS
    for name, cmd in ac.COMMANDS.items():
        assert cmd.name == name and cmd.summary, name
        assert cmd.owner in OWNERS, (name, cmd.owner)
        assert cmd.timeout_s > 0


@pytest.mark.parametrize("name", sorted(PROTOCOL_COMMANDS))
def test_every_command_is_executed_by_a_method_of_its_owner(name):
    cmd = ac.COMMANDS[name]
    if isinstance(cmd, ac.StoreRead):  # executed by the command itself, on the admin actor's view
        assert cmd.owner == "admin" and type(cmd).read is not ac.StoreRead.read
    else:
        assert callable(getattr(OWNERS[cmd.owner], cmd.handler, None)), (name, cmd.owner, cmd.handler)


def parse(argv: list[str]):
    """argv as the CLI parses it, with the command's request args."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, cmd in ac.COMMANDS.items():
        cmd.add_arguments(sub.add_parser(name))
    ns = parser.parse_args(argv)
    return ac.COMMANDS[ns.cmd], ns


@pytest.mark.parametrize("argv, args", [
    (["status"], {}),
    (["inspect", "writer"], {"actor": "writer"}),
    (["restart", "dlq"], {"actor": "dlq"}),
    (["inject", "dlq", "hang"], {"actor": "dlq", "fault": "hang"}),
    (["result", "r-1"], {"request_id": "r-1"}),
    (["dlq.list"], {"limit": 100}),
    (["dlq.list", "--limit", "5"], {"limit": 5}),
    (["dlq.show", "it-1"], {"id": "it-1"}),
    (["dlq.replay", "--all", "--rate", "5"], {"all": True, "rate": 5.0}),
    (["dlq.replay", "it-1"], {"id": "it-1", "rate": 10.0}),
    (["dlq.purge", "--all", "--yes"], {"all": True}),
    (["pairs.evaluate"], {}),
])
def test_cli_arguments_become_the_request_args_of_the_protocol_and_pass_the_daemon_check(argv, args):
    cmd, ns = parse(argv)
    assert cmd.request_args(ns) == args
    assert cmd.validate(args) == args
    assert cmd.refuse(ns) is None


@pytest.mark.parametrize("argv", [["inject", "dlq", "melt"], ["dlq.replay"], ["dlq.replay", "x", "--all"],
                                  ["dlq.list", "--limit", "many"], ["result"], ["nope"]])
def test_the_cli_rejects_bad_arguments_before_sending(argv):
    with pytest.raises(SystemExit):
        parse(argv)


def test_purge_without_yes_is_refused_by_the_cli():
    cmd, ns = parse(["dlq.purge", "--all"])
    assert "--yes" in cmd.refuse(ns)


@pytest.mark.parametrize("name, args, text", [
    ("inspect", {}, "inspect needs args.actor (an actor name)"),
    ("inspect", {"actor": 3}, "inspect: actor must be an actor name, not 3"),
    ("restart", {"actor": "root"}, "restart: actor must be an actor below the root"),
    ("inject", {"actor": "dlq", "fault": "melt"}, "fault must be one of crash, hang, exit"),
    ("result", {}, "result needs args.request_id"),
    ("result", {"request_id": 7}, "request_id must be a request id"),
    ("dlq.list", {"limit": 0}, "limit must be a positive integer"),
    ("dlq.list", {"limit": True}, "limit must be a positive integer"),
    ("dlq.list", {"limit": 2.5}, "limit must be a positive integer"),
    ("dlq.show", {}, "dlq.show needs args.id"),
    ("dlq.replay", {"all": True, "rate": -1}, "rate must be a positive number (items per second)"),
    ("dlq.replay", {"all": True, "rate": "fast"}, "rate must be a positive number"),
    ("dlq.replay", {"rate": 1}, "give args.id (an item id from dlq.list) or args.all = true"),
    ("dlq.purge", {"all": "yes"}, "give args.id"),
    ("status", ["not", "a", "map"], "malformed: args must be a map"),
])
def test_bad_daemon_side_args_get_a_clear_error_naming_the_argument(name, args, text):
    with pytest.raises(ac.CommandError) as exc:
        ac.COMMANDS[name].validate(args)
    assert text in str(exc.value)


def test_daemon_side_check_fills_defaults_and_ignores_undeclared_keys():
    assert ac.COMMANDS["dlq.list"].validate({"extra": 1}) == {"limit": 100}
    assert ac.COMMANDS["dlq.replay"].validate({"id": "a", "rate": 3}) == {"id": "a", "rate": 3}
    assert ac.COMMANDS["dlq.purge"].validate({"all": True, "id": "a"}) == {"all": True}


def test_unknown_commands_are_a_clear_error():
    with pytest.raises(ac.CommandError, match="unknown command 'nope'; try `help`"):
        ac.lookup("nope")
    assert ac.lookup("verify") is ac.COMMANDS["verify"]


def status_reply(*states):
    return {"ok": True, "ready": True, "actors": [
        {"name": f"a{i}", "supervisor": "root", "state": s, "pid": 10 + i, "uptime_s": 3725, "restarts": 0,
         "last_exit": None} for i, s in enumerate(states)]}


def test_status_renders_a_table_and_exits_3_when_an_actor_is_fatal():
    cmd = ac.COMMANDS["status"]
    text = cmd.render(status_reply("RUNNING", "FATAL"))
    lines = text.splitlines()
    assert lines[0] == "ready: yes"
    assert lines[1].split() == ["NAME", "SUPERVISOR", "STATE", "PID", "UPTIME", "RESTARTS", "LAST", "EXIT"]
    assert lines[2].split() == ["a0", "root", "RUNNING", "10", "1:02:05", "0", "-"]
    assert cmd.exit_code(status_reply("RUNNING")) == ac.EXIT_OK
    assert cmd.exit_code(status_reply("RUNNING", "FATAL")) == ac.EXIT_FATAL
    assert cmd.exit_code({"ok": False, "error": "x"}) == ac.EXIT_ERROR
    assert ac.COMMANDS["verify"].exit_code({"ok": True, "problems": []}) == ac.EXIT_OK


def test_replies_render_as_text():
    assert ac.COMMANDS["verify"].render({"ok": True, "problems": []}) == "no problems found"
    v = ac.COMMANDS["verify"].render({"ok": True, "problems": [
        {"kind": "orphan_rows", "request_id": "r9", "detail": "trade rows without a live result"}]})
    assert v.splitlines()[0].split() == ["KIND", "REQUEST_ID", "DETAIL"] and "r9" in v
    r = ac.COMMANDS["result"].render({"ok": True, "result": {"request_id": "r1", "status": "complete"}})
    assert r.splitlines() == ["request_id: r1", "status: complete"]
    slot = {"pair_id": "p1", "strategy_a": "A", "strategy_b": "B", "weight_a": 0.5, "weight_b": 0.5,
            "corr": 0.1, "sharpe": 1.0, "profit_factor": 1.5, "score": 2.0}
    p = ac.COMMANDS["pairs"].render({"ok": True, "slots": [slot], "candidates": 2, "excluded": {"missing": 1},
                                     "safe_stop": False, "newest_result_age_s": 1.0})
    assert "PAIR_ID" in p and "p1" in p and "excluded: missing=1" in p
    assert ac.COMMANDS["stop"].render({"ok": True, "stopping": True}) == "stopping: True"


def test_admin_help_lists_every_command_with_its_help():
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), "admin", "--help"], capture_output=True,
                         text=True, cwd=str(ROOT), timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for name, cmd in ac.COMMANDS.items():
        assert f" {name} " in text and " ".join(cmd.summary.split()) in text, name


# ----- the read-only view ------------------------------------------------------------------------------
def meta(rid, total=2, chunks=1):
    return meta_from_message({"request_id": rid, "strategy_name": "S", "total_trades": total,
                              "total_chunks": chunks})


@pytest.fixture
def db(tmp_path):
    s = Store(str(tmp_path / "v.db"))
    s.open()
    s.write_chunk(meta("done"), 0, {"timestamp": [1, 2], "pnl": [1.0, 2.0]}, 2)
    s.write_chunk(meta("half", total=4, chunks=2), 0, {"timestamp": [1, 2], "pnl": [1.0, 2.0]}, 2)
    yield s
    s.close()


def test_view_of_a_missing_database_creates_nothing(tmp_path):
    path = tmp_path / "none.db"
    view = StoreView(str(path))
    assert view.open() is False
    with pytest.raises(StoreError):
        view.verify(60.0)
    assert not path.exists()


def test_result_and_verify_read_through_the_view(db):
    view = StoreView(db.path)
    reply = ac.COMMANDS["result"].read(view, {"request_id": "done"}, {})
    assert reply["ok"] is True
    res = reply["result"]
    assert (res["status"], res["chunks_durable"], res["rows_stored"], res["total_chunks"]) == ("complete", 1, 2, 1)
    half = view.result_info("half")
    assert (half["status"], half["chunks_durable"], half["rows_stored"]) == ("receiving", 1, 2)
    missing = ac.COMMANDS["result"].read(view, {"request_id": "nope"}, {})
    assert missing["ok"] is False and "nope" in missing["error"]
    cfg = {"gateway": {"assembly_timeout_s": 3600.0}}
    assert ac.COMMANDS["verify"].read(view, {}, cfg) == {"ok": True, "problems": []}
    db.conn.execute("INSERT INTO backtest_trade_logs(request_id, strategy_name, seq, timestamp, pnl) "
                    "VALUES ('ghost', 'S', 0, 1, 1.0)")
    probs = ac.COMMANDS["verify"].read(view, {}, cfg)["problems"]
    assert [(p["kind"], p["request_id"]) for p in probs] == [("orphan_rows", "ghost")]
    view.close()


def test_the_view_never_writes_and_never_holds_the_writer_back(db):
    view = StoreView(db.path)
    assert view.result_info("done") is not None
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        view._store.conn.execute("DELETE FROM backtest_results")
    db.write_chunk(meta("half", total=4, chunks=2), 1, {"timestamp": [3, 4], "pnl": [1.0, 1.0]}, 2)
    assert view.result_info("half")["status"] == "complete"  # each call is a fresh snapshot
    view.close()


def test_interrupt_aborts_a_read_in_progress_with_a_store_error(db):
    view = StoreView(db.path)
    assert view.open()
    # a read that would run for ages: interrupted from its own progress handler (as from another thread)
    view._store.conn.set_progress_handler(lambda: view.interrupt(), 1000)
    db.conn.execute("BEGIN")   # one transaction: 20,000 autocommits at synchronous=FULL took 6-60+ s on a busy disk
    db.conn.executemany("INSERT INTO backtest_trade_logs(request_id, strategy_name, seq, timestamp, pnl) "
                        "VALUES ('done', 'S', 0, ?, 1.0)", [(i,) for i in range(20000)])
    db.conn.execute("COMMIT")
    with pytest.raises(StoreError):
        view.verify(3600.0)
    assert view.result_info("done")["status"] == "complete"  # reopened, usable again
    # 'done' has 20,002 rows for 2 trades; 'half' is receiving but not stale (no clock in this test
    # reaches the hour): exactly one problem
    assert [p["kind"] for p in view.verify(3600.0)] == ["row_count"]


def test_text_values_never_show_python_reprs():
    assert ac.fmt_value(True) == "yes" and ac.fmt_value(False) == "no" and ac.fmt_value(None) == "-"
    assert ac.fmt_value({}) == "(none)" and ac.fmt_value([]) == "(none)"
    assert ac.fmt_value(1796014745.25, "last_result_timestamp_seconds") == "2026-11-30T04:59:05Z"
    assert ac.fmt_value(1796014745.25, "completed_at") == "2026-11-30T04:59:05Z"
    assert ac.fmt_value(1796014745.25, "bytes") == "1796014745.25"  # a big number, not a time
    assert ac.fmt_value(0.1 + 0.2) == "0.3" and ac.fmt_value(3.0) == "3"
    text = ac.kv_render({"stopping": True, "last_error": None, "excluded": {}, "at": 1796014745.0,
                         "nested": {"a": False}})
    for bad in ("True", "False", "None", "{}", "1796014745"):
        assert bad not in text, (bad, text)
    assert "excluded: (none)" in text and "  a: no" in text


def test_since_accepts_epoch_ages_and_iso():
    import time as _t
    assert ac.parse_since("1796014745") == 1796014745.0
    assert abs(ac.parse_since("2h") - (_t.time() - 7200)) < 5
    assert ac.parse_since("2026-11-30T04:59:05Z") == 1796014745.0
    assert ac.parse_since("2026-11-30T04:59:05") == 1796014745.0  # UTC when no zone is named
    with pytest.raises(argparse.ArgumentTypeError):
        ac.parse_since("yesterday")
