"""Unit tests of issue 12's legacy rules outside the parser: the -OOS suffix (config key and
stripping) and the request_id a message that cannot be read seems to carry. The failed-result
write is a store rule, tested on both backends in tests/unit/test_store_backends.py. The daemon-level behaviour is in
tests/e2e/test_legacy_swimmy.py and tests/faults/test_legacy_crash.py.
"""
from __future__ import annotations

import pytest

import msgpack
import numpy as np

from pairlane.actors.legacy import check_wire_columns, guess_request_id, strip_oos, wire_arrays
from pairlane import codec
from pairlane.chunks import pack_chunk
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


def _frame_trades(cols, a, b):
    return msgpack.unpackb(pack_chunk("R", 0, cols, a, b), raw=False)["trades"]


def test_wire_arrays_send_the_same_frames_as_the_lists():
    cols = {"timestamp": [1, 2, 3, 1 << 40], "pnl": [0.5, -1, 2.25, 0.0], "symbol": ["A", None, "B", "C"],
            "sl": [1.0, None, 2.0, 3.0], "hold_time": [5, 6, 7, 8]}
    arr = wire_arrays(cols)
    assert isinstance(arr["timestamp"], np.ndarray) and arr["timestamp"].dtype == np.dtype("<i8")
    assert isinstance(arr["pnl"], np.ndarray) and arr["pnl"].dtype == np.dtype("<f8")
    assert arr["sl"] is cols["sl"] and arr["symbol"] is cols["symbol"]   # None inside: stays a list
    assert check_wire_columns(arr, "R") == codec.check_columns(cols, "R") == 4
    for a, b in ((0, 4), (1, 3), (3, 4)):
        assert _frame_trades(arr, a, b) == _frame_trades(cols, a, b)


@pytest.mark.parametrize("cols", [
    {"timestamp": [1, 2], "pnl": [0.5, float("nan")]},
    {"timestamp": [1, 2], "pnl": [0.5, 1.0], "sl": [float("inf"), 1.0]},
    {"timestamp": [1, 1 << 63], "pnl": [0.5, 1.0]},
    {"timestamp": [1, True], "pnl": [0.5, 1.0]},
    {"timestamp": [1, 2.0], "pnl": [0.5, 1.0]},
    {"timestamp": [1, 2], "pnl": [0.5, "x"]},
    {"timestamp": [1, 2], "pnl": [0.5]},
    {"timestamp": [1, 2], "pnl": [0.5, 1.0], "symbol": ["a\x00", "b"]},
])
def test_check_wire_columns_rejects_what_check_columns_rejects(cols):
    with pytest.raises(codec.ProtocolError) as want:
        codec.check_columns(cols, "R")
    with pytest.raises(codec.ProtocolError) as got:
        check_wire_columns(wire_arrays(cols), "R")
    assert got.value.code == want.value.code == "bad_chunk"
    assert got.value.message == want.value.message
