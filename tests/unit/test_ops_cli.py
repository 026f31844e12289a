"""The operators' command line and config keys without a daemon: where --config is taken from,
the [daemon] log keys, and which changed keys SIGHUP applies."""
from __future__ import annotations

import socket

import pytest

from pairlane.entry.cli import hoist_config
from pairlane.entry.daemon import config_changes, reloadable
from pairlane import config as cfgmod


@pytest.mark.parametrize("argv,env,want", [
    (["admin", "status", "--config", "a.toml"], {}, ("a.toml", ["admin", "status"])),
    (["--config=a.toml", "admin", "status"], {}, ("a.toml", ["admin", "status"])),
    (["admin", "--json", "status"], {"PAIRLANE_CONFIG": "env.toml"}, ("env.toml", ["admin", "--json", "status"])),
    (["status", "--config", "a.toml"], {"PAIRLANE_CONFIG": "env.toml"}, ("a.toml", ["status"])),  # the flag wins
    (["status"], {}, (None, ["status"])),
    (["status", "--config"], {}, (None, ["status", "--config"])),  # no value: the parser refuses it
    (["x", "--", "--config", "a"], {}, (None, ["x", "--", "--config", "a"])),
])
def test_config_is_taken_from_anywhere_on_the_line_or_the_environment(argv, env, want):
    assert hoist_config(argv, env) == want


def load(tmp_path, text: str) -> dict:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return cfgmod.load(str(p))


def test_daemon_name_defaults_to_the_host_name_and_log_keys_are_checked(tmp_path):
    cfg = cfgmod.load(None)
    assert cfg["daemon"]["name"] == socket.gethostname()
    assert cfg["daemon"]["log_format"] == "logfmt" and cfg["daemon"]["log_file"] == ""
    cfg = load(tmp_path, '[daemon]\nname = "east-1"\nlog_format = "json"\nlog_file = "x.log"\n')
    assert cfg["daemon"]["name"] == "east-1" and cfg["daemon"]["log_file"].endswith("/x.log")
    with pytest.raises(cfgmod.ConfigError, match="daemon.log_format"):
        load(tmp_path, '[daemon]\nlog_format = "xml"\n')
    with pytest.raises(cfgmod.ConfigError, match="daemon.log_file"):
        load(tmp_path, '[daemon]\nlog_file = 3\n')


def test_sighup_applies_only_the_keys_that_can_change_safely():
    old = cfgmod.load(None)
    new = {s: dict(t) for s, t in old.items()}
    new["daemon"]["log_level"] = "DEBUG"
    new["pairs"]["interval_s"] = 1.0
    new["pairs"]["corr_max"] = 0.1
    new["alerts"]["ingest_stall_s"] = 10.0
    new["dlq"]["retry_max_s"] = 9.0
    new["gateway"]["endpoint"] = "tcp://127.0.0.1:1"
    new["store"]["path"] = "/elsewhere.db"
    changed = config_changes(old, new)
    assert changed == sorted(["daemon.log_level", "pairs.interval_s", "pairs.corr_max", "alerts.ingest_stall_s",
                              "dlq.retry_max_s", "gateway.endpoint", "store.path"])
    assert [k for k in changed if not reloadable(k)] == ["gateway.endpoint", "store.path"]


def test_the_dispatcher_hands_the_config_on_but_never_the_environment_to_chaos(monkeypatch):
    from types import SimpleNamespace

    import pairlane.entry.cli as cli
    seen: dict = {}
    monkeypatch.setattr(cli.importlib, "import_module",
                        lambda name: SimpleNamespace(main=lambda argv: seen.setdefault(name, argv) and 0))
    monkeypatch.setenv("PAIRLANE_CONFIG", "env.toml")
    cli.main(["admin", "status", "--config", "a.toml"])
    cli.main(["send", "--synthetic", "5"])
    cli.main(["chaos", "--duration", "5"])
    cli.main(["bench", "--json"])
    assert seen == {"pairlane.entry.admin_cli": ["--config", "a.toml", "status"],
                    "pairlane.entry.send": ["--config", "env.toml", "--synthetic", "5"],
                    "pairlane.entry.chaos": ["--duration", "5"],
                    "pairlane.bench.run": ["--json"]}


def test_version_comes_from_the_package_metadata(capsys):
    from importlib.metadata import version

    import pairlane.entry.cli as cli
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"pairlane {version('pairlane')}"
