"""Configuration checks of PROTOCOL.md section 0, without a daemon: defaults,
merging, unknown keys, wrong types, non-loopback endpoints, busy ports and
the single-instance locks. Each refusal must name the offending key.
(The same refusals through a real `python run.py` are in tests/e2e/test_foundation.py.)
"""
from __future__ import annotations

import socket

import pytest

from pairlane import config as cfgmod
from pairlane.config import ConfigError
from pairlane.lock import InstanceLock, LockBusy
from tests.harness import free_port


def load_toml(tmp_path, text: str) -> dict:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return cfgmod.load(str(path))


def refused(tmp_path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_toml(tmp_path, text)
    return str(info.value)


# ----- defaults and merging -------------------------------------------------------------------------
def test_defaults_load_and_match_the_protocol_table():
    cfg = cfgmod.load(None)
    assert cfg["daemon"]["actor_port"] == 19590
    assert cfg["gateway"]["endpoint"] == "tcp://127.0.0.1:5590"
    assert cfg["gateway"]["legacy_endpoint"] == "tcp://127.0.0.1:5581"
    assert cfg["admin"]["endpoint"] == "tcp://127.0.0.1:5591"
    assert cfg["admin"]["token"] == "" and cfg["admin"]["allow_fault_injection"] is False
    assert cfg["metrics"]["listen"] == "127.0.0.1:9591"
    assert cfg["alerts"]["endpoint"] == "tcp://127.0.0.1:5592"
    assert cfg["gateway"]["max_message_bytes"] == 1048576 and cfg["gateway"]["credit"] == 8
    assert cfg["supervision"]["max_restarts"] == 5 and cfg["supervision"]["window_s"] == 10


def test_every_default_key_is_commented_in_the_defaults_file():
    lines = [ln.strip() for ln in cfgmod.DEFAULTS_PATH.read_text().splitlines()]
    for i, line in enumerate(lines):
        if not line or line.startswith(("#", "[")):
            continue
        j = i - 1  # walk up over the keys that share one comment
        while j >= 0 and lines[j] and not lines[j].startswith(("#", "[")):
            j -= 1
        assert j >= 0 and lines[j].startswith("#"), f"no comment above: {line}"


def test_a_partial_file_merges_over_the_defaults(tmp_path):
    cfg = load_toml(tmp_path, '[daemon]\nlog_level = "DEBUG"\n[supervision]\nwindow_s = 3\n')
    assert cfg["daemon"]["log_level"] == "DEBUG"
    assert cfg["daemon"]["actor_port"] == 19590  # untouched neighbour
    assert cfg["supervision"]["window_s"] == 3.0 and isinstance(cfg["supervision"]["window_s"], float)
    assert cfg["gateway"]["credit"] == 8


def test_relative_store_and_spool_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_toml(tmp_path, '[store]\npath = "x/p.db"\n[dlq]\npath = "x/dlq"\n')
    assert cfg["store"]["path"] == str(tmp_path / "x" / "p.db")
    assert cfg["dlq"]["path"] == str(tmp_path / "x" / "dlq")


def test_missing_file_and_invalid_toml_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        cfgmod.load(str(tmp_path / "nope.toml"))
    assert "not valid TOML" in refused(tmp_path, "[daemon\nactor_port = 1\n")


# ----- unknown keys and wrong types ---------------------------------------------------------------------
@pytest.mark.parametrize("text,key", [
    ("[daemon]\nbogus = 1\n", "daemon.bogus"),
    ("[gateway]\nendpiont = \"tcp://127.0.0.1:5590\"\n", "gateway.endpiont"),
    ("[nosuchsection]\nx = 1\n", "nosuchsection"),
    ("toplevel = 1\n", "toplevel"),
])
def test_unknown_key_is_refused_naming_it(tmp_path, text, key):
    msg = refused(tmp_path, text)
    assert f"'{key}'" in msg and "unknown" in msg


@pytest.mark.parametrize("text,key", [
    ('[daemon]\nactor_port = "19590"\n', "daemon.actor_port"),       # str for int
    ("[daemon]\nactor_port = 19590.5\n", "daemon.actor_port"),        # float for int
    ("[daemon]\nactor_port = true\n", "daemon.actor_port"),           # bool for int
    ("[admin]\nallow_fault_injection = 1\n", "admin.allow_fault_injection"),  # int for bool
    ("[admin]\nallow_fault_injection = \"yes\"\n", "admin.allow_fault_injection"),
    ("[daemon]\nlog_level = 3\n", "daemon.log_level"),                # int for str
    ('[supervision]\nwindow_s = "10"\n', "supervision.window_s"),     # str for float
    ("[supervision]\nwindow_s = true\n", "supervision.window_s"),     # bool for float
    ('[pairs]\nranks = "A"\n', "pairs.ranks"),                        # str for list
    ("[pairs]\nranks = [1, 2]\n", "pairs.ranks"),                     # wrong item type
    ("daemon = 5\n", "daemon"),                                       # scalar for table
    ("[daemon]\nactor_port = {a = 1}\n", "daemon.actor_port"),        # table for scalar
])
def test_wrong_type_is_refused_naming_the_key(tmp_path, text, key):
    msg = refused(tmp_path, text)
    assert f"'{key}'" in msg, msg


@pytest.mark.parametrize("text,key", [
    ("[daemon]\nactor_port = 0\n", "daemon.actor_port"),
    ("[daemon]\nactor_port = 70000\n", "daemon.actor_port"),
    ('[daemon]\nlog_level = "LOUD"\n', "daemon.log_level"),
    ("[gateway]\ncredit = 0\n", "gateway.credit"),
    ("[supervision]\nheartbeat_s = 3\nheartbeat_timeout_s = 2\n", "supervision.heartbeat_timeout_s"),
    ("[store]\nmax_bytes = -1\n", "store.max_bytes"),
])
def test_out_of_range_value_is_refused_naming_the_key(tmp_path, text, key):
    assert f"'{key}'" in refused(tmp_path, text)


# ----- loopback only ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("section,key,value", [
    ("gateway", "endpoint", "tcp://0.0.0.0:5590"),
    ("gateway", "endpoint", "tcp://10.0.0.1:5590"),
    ("gateway", "endpoint", "tcp://*:5590"),
    ("gateway", "endpoint", "tcp://eth0:5590"),
    ("gateway", "endpoint", "tcp://example.com:5590"),
    ("gateway", "legacy_endpoint", "tcp://0.0.0.0:5581"),
    ("admin", "endpoint", "tcp://10.0.0.1:5591"),
    ("admin", "endpoint", "tcp://[::]:5591"),
    ("alerts", "endpoint", "tcp://192.168.1.10:5592"),
    ("metrics", "listen", "0.0.0.0:9591"),
    ("metrics", "listen", "10.0.0.1:9591"),
])
def test_non_loopback_endpoint_is_refused_naming_the_key(tmp_path, section, key, value):
    msg = refused(tmp_path, f'[{section}]\n{key} = "{value}"\n')
    assert f"'{section}.{key}'" in msg and "loopback" in msg, msg


@pytest.mark.parametrize("section,key,value", [
    ("gateway", "endpoint", "127.0.0.1:5590"),    # no scheme
    ("gateway", "endpoint", "ipc:///tmp/x"),
    ("admin", "endpoint", "tcp://127.0.0.1"),     # no port
    ("metrics", "listen", "127.0.0.1"),
])
def test_malformed_endpoint_is_refused_naming_the_key(tmp_path, section, key, value):
    assert f"'{section}.{key}'" in refused(tmp_path, f'[{section}]\n{key} = "{value}"\n')


def test_loopback_forms_and_disabled_endpoints_are_accepted(tmp_path):
    cfg = load_toml(tmp_path, '[gateway]\nendpoint = "tcp://127.0.0.2:5590"\nlegacy_endpoint = ""\n'
                              '[metrics]\nlisten = ""\n[alerts]\nendpoint = "tcp://localhost:5592"\n')
    eps = cfgmod.endpoints(cfg)
    assert "gateway.legacy_endpoint" not in eps and "metrics.listen" not in eps
    assert eps["gateway.endpoint"] == ("127.0.0.2", 5590)


# ----- busy ports ---------------------------------------------------------------------------------------------
def _cfg_on_free_ports() -> dict:
    cfg = cfgmod.load(None)
    cfg["daemon"]["actor_port"] = free_port()
    for sect, key in (("gateway", "endpoint"), ("gateway", "legacy_endpoint"), ("admin", "endpoint"),
                      ("alerts", "endpoint")):
        cfg[sect][key] = f"tcp://127.0.0.1:{free_port()}"
    cfg["metrics"]["listen"] = f"127.0.0.1:{free_port()}"
    return cfg


def test_free_ports_pass_the_port_check():
    cfgmod.check_ports_free(_cfg_on_free_ports())


@pytest.mark.parametrize("key", ["daemon.actor_port", "gateway.endpoint", "gateway.legacy_endpoint",
                                 "admin.endpoint", "alerts.endpoint", "metrics.listen"])
def test_busy_port_is_refused_naming_the_key(key):
    cfg = _cfg_on_free_ports()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        sect, k = key.split(".")
        if key == "daemon.actor_port":
            cfg[sect][k] = port
        elif key == "metrics.listen":
            cfg[sect][k] = f"127.0.0.1:{port}"
        else:
            cfg[sect][k] = f"tcp://127.0.0.1:{port}"
        with pytest.raises(ConfigError) as info:
            cfgmod.check_ports_free(cfg)
    assert f"'{key}'" in str(info.value) and str(port) in str(info.value) and "busy" in str(info.value)


def test_the_same_port_for_two_endpoints_is_refused_naming_both():
    cfg = _cfg_on_free_ports()
    cfg["alerts"]["endpoint"] = cfg["admin"]["endpoint"]
    with pytest.raises(ConfigError) as info:
        cfgmod.check_ports_free(cfg)
    assert "'alerts.endpoint'" in str(info.value) and "'admin.endpoint'" in str(info.value)


# ----- single-instance locks --------------------------------------------------------------------------------
def test_instance_lock_refuses_a_second_holder_and_names_the_holder(tmp_path):
    first = InstanceLock(str(tmp_path / "db.lock"), f"store {tmp_path / 'db'}").acquire()
    try:
        with pytest.raises(LockBusy) as info:
            InstanceLock(str(tmp_path / "db.lock"), f"store {tmp_path / 'db'}").acquire()
        msg = str(info.value)
        assert "in use by another pairlane daemon" in msg and str(tmp_path / "db") in msg
        assert f"pid {__import__('os').getpid()}" in msg
    finally:
        first.release()
    InstanceLock(str(tmp_path / "db.lock"), "store").acquire().release()  # free again once released


def test_instance_lock_creates_missing_directories(tmp_path):
    lock = InstanceLock(str(tmp_path / "a" / "b" / ".lock"), "spool").acquire()
    assert (tmp_path / "a" / "b" / ".lock").exists()
    lock.release()
