"""supervision.log: logfmt and JSON lines, unique keys, JSON-encoded values, file reopen."""
from __future__ import annotations

import json
import os

import pytest

from pairlane.supervision import log as slog


@pytest.fixture(autouse=True)
def _restore():
    yield
    slog.configure("logfmt", "", None)
    slog.set_level("INFO")


def test_logfmt_values_are_bare_words_or_json():
    assert slog.logfmt_value("writer") == "writer"
    assert slog.logfmt_value("two words") == '"two words"'
    assert slog.logfmt_value('say "x"\nnext') == '"say \\"x\\"\\nnext"'
    assert slog.logfmt_value("") == '""'
    assert slog.logfmt_value(True) == "true" and slog.logfmt_value(None) == "null"
    assert slog.logfmt_value(1.5) == "1.5" and slog.logfmt_value(7) == "7"
    assert json.loads(json.loads(slog.logfmt_value({"a": 1, "b": [1, 2]}))) == {"a": 1, "b": [1, 2]}
    assert slog.logfmt_value(ValueError("bad")) == '"ValueError: bad"'


def test_a_line_has_unique_keys_static_fields_and_renamed_collisions(capsys):
    slog.configure("logfmt", "", {"daemon": "box"})
    slog.log("INFO", "child_started", actor="sup", pid=42, child="x", reasons={"k": "v w"})
    line = capsys.readouterr().err.strip()
    keys = [kv.split("=", 1)[0] for kv in line.split(" ") if "=" in kv and not kv.startswith('"')]
    assert keys[:6] == ["ts", "level", "daemon", "actor", "pid", "event"]
    assert "pid_=42" in line and f"pid={os.getpid()}" in line
    assert len(keys) == len(set(keys))
    assert 'reasons="{\\"k\\":\\"v w\\"}"' in line


def test_json_lines_and_the_level_threshold(capsys):
    slog.configure("json", "", {"daemon": "box"})
    slog.log("DEBUG", "hidden")
    slog.log("WARNING", "shown", actor="a", n=3, m={"x": [1]})
    out = capsys.readouterr().err.strip().splitlines()
    assert len(out) == 1
    obj = json.loads(out[0])
    assert obj["event"] == "shown" and obj["level"] == "WARNING" and obj["daemon"] == "box"
    assert obj["n"] == 3 and obj["m"] == {"x": [1]}
    slog.set_level("DEBUG")
    slog.log("DEBUG", "now_shown")
    assert json.loads(capsys.readouterr().err)["event"] == "now_shown"


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError):
        slog.configure("xml")


def test_reopen_after_a_rename_writes_to_a_new_file(tmp_path):
    path = tmp_path / "d" / "x.log"
    slog.configure("logfmt", str(path))
    slog.log("INFO", "first")
    os.rename(path, tmp_path / "x.log.1")
    slog.log("INFO", "second")   # still the renamed file, as logrotate expects until SIGHUP
    slog.reopen()
    slog.log("INFO", "third")
    assert "event=first" in (tmp_path / "x.log.1").read_text()
    assert "event=second" in (tmp_path / "x.log.1").read_text()
    assert "event=third" in path.read_text() and "event=second" not in path.read_text()
