"""Unit tests of issue 12's legacy rules outside the parser: the -OOS suffix (config key and
stripping) and the request_id a message that cannot be read seems to carry. The failed-result
write is a store rule, tested on both backends in tests/unit/test_store_backends.py. The daemon-level behaviour is in
tests/e2e/test_legacy_swimmy.py and tests/faults/test_legacy_crash.py.
"""
from __future__ import annotations

import pytest

from pairlane.actors.legacy import guess_request_id, strip_oos
from pairlane import config as cfgmod
from pairlane.config import ConfigError


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
