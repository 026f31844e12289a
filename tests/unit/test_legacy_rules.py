"""Unit tests of issue 12's legacy rules outside the parser: the failed-result write
(store), the -OOS suffix (config key and stripping) and the request_id a message
that cannot be read seems to carry. The daemon-level behaviour is in
tests/e2e/test_legacy_swimmy.py and tests/faults/test_legacy_crash.py.
"""
from __future__ import annotations

import pytest

from actors.legacy import guess_request_id, strip_oos
from pairlane import config as cfgmod
from pairlane.config import ConfigError
from pairlane.store import Store, meta_from_message
from pairlane.vocab import ResultStatus


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "s.db"))
    s.open()
    yield s
    s.close()


def failed_meta(rid: str, strategy: str, error: str) -> dict:
    m = meta_from_message({"request_id": rid, "strategy_name": strategy, "total_trades": 0, "total_chunks": 1,
                           "error": error}, "legacy")
    return m


def row(s: Store, rid: str) -> tuple:
    return s.conn.execute("SELECT strategy_name, status, error FROM backtest_results WHERE request_id = ?",
                          (rid,)).fetchall()


def test_later_failed_result_replaces_an_earlier_failed_one(store):
    assert store.write_result_without_trades(failed_meta("MISSING", "A", "e1"), ResultStatus.FAILED) == ""
    assert row(store, "MISSING") == [("A", "failed", "e1")]
    assert store.write_result_without_trades(failed_meta("MISSING", "B", "e2"), ResultStatus.FAILED) == "failed"
    assert row(store, "MISSING") == [("B", "failed", "e2")]


def test_failed_result_never_replaces_a_stored_one(store):
    m = meta_from_message({"request_id": "c", "strategy_name": "S", "total_trades": 2, "total_chunks": 1})
    assert store.write_chunk(m, 0, {"timestamp": [1, 2], "pnl": [1.0, 2.0]}, 2) == "complete"
    assert store.write_result_without_trades(failed_meta("c", "X", "late"), ResultStatus.FAILED) == "complete"
    assert row(store, "c") == [("S", "complete", None)]
    assert store.conn.execute("SELECT count(*) FROM backtest_trade_logs WHERE request_id = 'c'").fetchone()[0] == 2


def test_failed_result_over_a_receiving_one_removes_its_rows(store):
    m = meta_from_message({"request_id": "p", "strategy_name": "S", "total_trades": 4, "total_chunks": 2})
    assert store.write_chunk(m, 0, {"timestamp": [1, 2], "pnl": [1.0, 2.0]}, 2) == "receiving"
    assert store.write_result_without_trades(failed_meta("p", "S", "boom"), ResultStatus.FAILED) == "receiving"
    assert row(store, "p") == [("S", "failed", "boom")]
    assert store.verify(60.0) == []


@pytest.mark.parametrize("name,suffix,want", [
    ("SW-A1-OOS", "-OOS", ("SW-A1", True)),
    ("SW-A1", "-OOS", ("SW-A1", False)),
    ("-OOS", "-OOS", ("-OOS", False)),
    ("SW-A1-OOS", "", ("SW-A1-OOS", False)),
    ("SW-A1-oos", "-OOS", ("SW-A1-oos", False)),
    ("X_OOS", "_OOS", ("X", True)),
])
def test_strip_oos(name, suffix, want):
    assert strip_oos(name, suffix) == want


def test_oos_suffix_config_key(tmp_path):
    assert cfgmod.load(None)["gateway"]["legacy_oos_suffix"] == "-OOS"
    p = tmp_path / "c.toml"
    p.write_text('[gateway]\nlegacy_oos_suffix = ""\n')
    assert cfgmod.load(str(p))["gateway"]["legacy_oos_suffix"] == ""
    for text, what in (('legacy_oos_suffix = 1', "wrong type"), ('legacy_oos_suffix = " -OOS"', "whitespace"),
                       (f'legacy_oos_suffix = "{"x" * 65}"', "64 characters")):
        p.write_text(f"[gateway]\n{text}\n")
        with pytest.raises(ConfigError) as info:
            cfgmod.load(str(p))
        assert "gateway.legacy_oos_suffix" in str(info.value) and what in str(info.value)


def test_guess_request_id_of_an_unreadable_message():
    assert guess_request_id(b'((type . "BACKTEST_RESULT") (result . ((request_id . "R-1") (x') == "R-1"
    assert guess_request_id(b"((request_id R:2) (trade_list ((") == "R:2"
    assert guess_request_id(b"\xff\xfe garbage") is None
