"""Section 7 security configuration and ZAP decisions, without a daemon: non-loopback endpoints
accepted only with CURVE keys or a legacy allowlist, key files that must load, and
pairlane.zap's answers (authorized key, unknown key reported once, allowlist by address).
"""
from __future__ import annotations

import pytest
import zmq
import zmq.auth
from zmq.utils import z85

from pairlane import config as cfgmod
from pairlane.config import ConfigError
from pairlane.zap import HANDSHAKE_LOG_EVERY_S, HandshakeLog, ZapPolicy, handshake_reason, load_authorized, parse_allowlist


@pytest.fixture
def keys(tmp_path):
    """server.key/.key_secret in keys/, client alice's public key in authorized/, bob's elsewhere."""
    kdir, adir, other = tmp_path / "keys", tmp_path / "authorized", tmp_path / "other"
    for d in (kdir, adir, other):
        d.mkdir()
    zmq.auth.create_certificates(str(kdir), "server")
    zmq.auth.create_certificates(str(kdir), "alice")
    zmq.auth.create_certificates(str(other), "bob")
    (adir / "alice.key").write_bytes((kdir / "alice.key").read_bytes())
    return {"secret": str(kdir / "server.key_secret"), "public": str(kdir / "server.key"),
            "authorized": str(adir), "alice": str(kdir / "alice.key_secret"),
            "bob": str(other / "bob.key_secret")}


def load(tmp_path, text: str) -> dict:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return cfgmod.load(str(path))


def refused(tmp_path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return str(info.value)


# ----- configuration ------------------------------------------------------------------------------
def test_defaults_have_security_off():
    cfg = cfgmod.load(None)
    assert cfg["gateway"]["curve_secret_key"] == "" and cfg["gateway"]["curve_authorized_keys"] == ""
    assert cfg["admin"]["curve_secret_key"] == "" and cfg["admin"]["curve_authorized_keys"] == ""
    assert cfg["gateway"]["legacy_allow"] == []


@pytest.mark.parametrize("section", ["gateway", "admin"])
def test_non_loopback_without_curve_names_the_endpoint_and_the_key(tmp_path, section):
    msg = refused(tmp_path, f'[{section}]\nendpoint = "tcp://0.0.0.0:5590"\n')
    assert f"'{section}.endpoint'" in msg and f"{section}.curve_secret_key" in msg, msg


@pytest.mark.parametrize("section", ["gateway", "admin"])
def test_non_loopback_with_curve_keys_is_accepted(tmp_path, keys, section):
    cfg = load(tmp_path, f'[{section}]\nendpoint = "tcp://0.0.0.0:5590"\n'
                         f'curve_secret_key = "{keys["secret"]}"\ncurve_authorized_keys = "{keys["authorized"]}"\n')
    assert cfgmod.endpoints(cfg)[f"{section}.endpoint"] == ("0.0.0.0", 5590)


def test_public_certificate_as_secret_key_is_refused(tmp_path, keys):
    msg = refused(tmp_path, f'[gateway]\ncurve_secret_key = "{keys["public"]}"\n'
                            f'curve_authorized_keys = "{keys["authorized"]}"\n')
    assert "'gateway.curve_secret_key'" in msg and "no secret key" in msg, msg


def test_missing_secret_key_file_is_refused(tmp_path, keys):
    msg = refused(tmp_path, f'[admin]\ncurve_secret_key = "{tmp_path}/nope.key_secret"\n'
                            f'curve_authorized_keys = "{keys["authorized"]}"\n')
    assert "'admin.curve_secret_key'" in msg, msg


def test_secret_key_without_authorized_directory_is_refused(tmp_path, keys):
    msg = refused(tmp_path, f'[gateway]\ncurve_secret_key = "{keys["secret"]}"\n')
    assert "'gateway.curve_authorized_keys'" in msg, msg
    msg = refused(tmp_path, f'[gateway]\ncurve_secret_key = "{keys["secret"]}"\n'
                            f'curve_authorized_keys = "{tmp_path}/missing"\n')
    assert "'gateway.curve_authorized_keys'" in msg and "not a directory" in msg, msg


def test_authorized_directory_without_secret_key_is_refused(tmp_path, keys):
    msg = refused(tmp_path, f'[admin]\ncurve_authorized_keys = "{keys["authorized"]}"\n')
    assert "'admin.curve_secret_key'" in msg, msg


def test_host_names_are_refused_even_with_curve(tmp_path, keys):
    msg = refused(tmp_path, f'[gateway]\nendpoint = "tcp://example.com:5590"\n'
                            f'curve_secret_key = "{keys["secret"]}"\ncurve_authorized_keys = "{keys["authorized"]}"\n')
    assert "'gateway.endpoint'" in msg and "not an IP address" in msg, msg


def test_non_loopback_legacy_needs_an_allowlist(tmp_path):
    msg = refused(tmp_path, '[gateway]\nlegacy_endpoint = "tcp://0.0.0.0:5581"\n')
    assert "'gateway.legacy_endpoint'" in msg and "gateway.legacy_allow" in msg, msg
    cfg = load(tmp_path, '[gateway]\nlegacy_endpoint = "tcp://0.0.0.0:5581"\nlegacy_allow = ["10.1.2.3"]\n')
    assert cfgmod.endpoints(cfg)["gateway.legacy_endpoint"] == ("0.0.0.0", 5581)


@pytest.mark.parametrize("value", ['["not-an-ip"]', '[1]', '"10.0.0.1"'])
def test_bad_allowlist_is_refused_naming_the_key(tmp_path, value):
    assert "'gateway.legacy_allow'" in refused(tmp_path, f"[gateway]\nlegacy_allow = {value}\n")


def test_curve_does_not_open_the_other_endpoints(tmp_path, keys):
    msg = refused(tmp_path, f'[gateway]\ncurve_secret_key = "{keys["secret"]}"\n'
                            f'curve_authorized_keys = "{keys["authorized"]}"\n'
                            '[alerts]\nendpoint = "tcp://0.0.0.0:5592"\n')
    assert "'alerts.endpoint'" in msg and "loopback" in msg, msg


# ----- ZAP decisions ------------------------------------------------------------------------------
def _curve_request(key_z85: bytes, rid: bytes = b"1") -> list[bytes]:
    return [b"1.0", rid, b"gateway", b"192.0.2.7", b"", b"CURVE", z85.decode(key_z85)]


def test_authorized_key_is_allowed_and_unknown_key_reported_once(keys):
    policy = ZapPolicy("CURVE", keys=load_authorized(keys["authorized"]))
    alice, _ = zmq.auth.load_certificate(keys["alice"])
    bob, _ = zmq.auth.load_certificate(keys["bob"])
    reply, refusal = policy.decide(_curve_request(alice, b"7"))
    assert refusal is None and reply[1] == b"7" and reply[2] == b"200" and reply[4] == alice
    firsts = []
    for i in range(5):
        reply, refusal = policy.decide(_curve_request(bob, str(i).encode()))
        assert reply[2] == b"400" and refusal.reason == "unknown_key" and refusal.who == bob.decode()
        firsts.append(refusal.first)
    assert firsts == [True, False, False, False, False]
    # authorized later (SIGHUP), then removed again: reported again
    policy.set_keys(policy.keys | {bob})
    assert policy.decide(_curve_request(bob))[1] is None
    policy.set_keys(policy.keys - {bob})
    assert policy.decide(_curve_request(bob))[1].first is True


def test_null_mechanism_is_filtered_by_address():
    policy = ZapPolicy("NULL", addresses=parse_allowlist(["127.0.0.1", " 10.0.0.5 "]))
    ok, refusal = policy.decide([b"1.0", b"a", b"legacy", b"127.0.0.1", b"", b"NULL"])
    assert refusal is None and ok[2] == b"200"
    no, refusal = policy.decide([b"1.0", b"b", b"legacy", b"127.0.0.2", b"", b"NULL"])
    assert no[2] == b"400" and refusal.reason == "address_not_allowed" and refusal.who == "127.0.0.2"
    assert policy.decide([b"1.0", b"c", b"legacy", b"127.0.0.2", b"", b"NULL"])[1].first is False


def test_mechanism_mismatch_and_malformed_requests_are_refused(keys):
    policy = ZapPolicy("CURVE", keys=load_authorized(keys["authorized"]))
    reply, refusal = policy.decide([b"1.0", b"x", b"gateway", b"127.0.0.1", b"", b"NULL"])
    assert reply[2] == b"400" and refusal.reason == "wrong_mechanism"
    reply, refusal = policy.decide([b"9.9", b"x", b"gateway", b"127.0.0.1", b"", b"CURVE", b"k" * 32])
    assert reply[2] == b"400" and refusal.reason == "malformed"


def test_keyless_handshake_failures_are_named_and_logged_at_most_once_a_minute():
    assert handshake_reason(zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH) == "wrong_mechanism"
    assert handshake_reason(zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC) == "bad_handshake"
    log = HandshakeLog()
    assert log.failed("bad_handshake", 100.0) == 1          # the first at once
    assert [log.failed("bad_handshake", 100.0 + i) for i in range(1, 6)] == [0] * 5
    assert log.failed("wrong_mechanism", 101.0) == 1        # per reason
    assert log.failed("bad_handshake", 100.0 + HANDSHAKE_LOG_EVERY_S) == 6   # the 5 held back and this one
