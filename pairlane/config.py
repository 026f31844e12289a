"""Configuration: load config/default.toml, merge a partial file over it, validate.

Owns: the schema (taken from the defaults file itself: every key and its type),
the start-up checks of PROTOCOL.md sections 0 and 7 (unknown key, wrong type,
non-loopback endpoint unless CURVE keys or a legacy allowlist guard it, keys that
do not load, busy port). Never starts anything and never touches
the database; the single-instance lock lives in `pairlane.lock`.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from pathlib import Path
from typing import Any


def _defaults_path() -> Path:
    """config/default.toml of the source tree, else the copy installed as package data
    (pairlane/defaults/default.toml, see pyproject.toml)."""
    here = Path(__file__).resolve().parent
    source = here.parent / "config" / "default.toml"
    return source if source.is_file() else here / "defaults" / "default.toml"


DEFAULTS_PATH = _defaults_path()


class ConfigError(Exception):
    """A configuration problem; the daemon exits with code 2 and this message."""


def load_defaults() -> dict:
    with open(DEFAULTS_PATH, "rb") as fh:
        return tomllib.load(fh)


def _type_ok(default: Any, value: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, list):
        return isinstance(value, list) and all(isinstance(v, type(default[0])) for v in value) if default else isinstance(value, list)
    return isinstance(value, type(default))


def merge(defaults: dict, override: dict, prefix: str = "") -> dict:
    """Return defaults with override merged in; unknown keys and wrong types raise ConfigError."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in defaults.items()}
    for key, value in override.items():
        name = f"{prefix}{key}"
        if key not in defaults:
            raise ConfigError(f"unknown config key '{name}'")
        dflt = defaults[key]
        if isinstance(dflt, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{name}' must be a table")
            out[key] = merge(dflt, value, name + ".")
            continue
        if not _type_ok(dflt, value):
            raise ConfigError(
                f"config key '{name}' has the wrong type: expected {type(dflt).__name__}, "
                f"got {type(value).__name__} ({value!r})")
        # numbers declared as float in the defaults may be written as ints
        out[key] = float(value) if isinstance(dflt, float) else value
    return out


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_loopback_host(key: str, host: str, remote_needs: str = "") -> None:
    if _is_loopback(host):
        return
    need = remote_needs or "remote access is only possible for the gateway, admin and legacy endpoints"
    raise ConfigError(f"config key '{key}': '{host.strip('[]')}' is not a loopback address "
                      f"(use 127.0.0.1; {need})")


def _check_host(key: str, host: str) -> None:
    """Any IP address (a non-loopback endpoint allowed by section 7); host names are refused:
    ZMQ binds one interface, and the allowlist and keys guard that one."""
    host = host.strip("[]")
    if host == "localhost" or host == "*":
        return
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"config key '{key}': '{host}' is not an IP address (use 0.0.0.0 or an interface's address)")


def parse_tcp_endpoint(key: str, endpoint: str, remote_needs: str = "", remote_ok: bool = False) -> tuple[str, int]:
    """'tcp://127.0.0.1:5590' -> ('127.0.0.1', 5590), or ConfigError naming the key. A non-loopback
    host is accepted only with `remote_ok` (its security is configured); else the error says
    `remote_needs`."""
    if not endpoint.startswith("tcp://"):
        raise ConfigError(f"config key '{key}': endpoint {endpoint!r} must be tcp://HOST:PORT")
    hostport = endpoint[len("tcp://"):]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"config key '{key}': endpoint {endpoint!r} must be tcp://HOST:PORT")
    if remote_ok:
        _check_host(key, host)
    else:
        _check_loopback_host(key, host, remote_needs)
    host = host.strip("[]")
    return ("0.0.0.0" if host == "*" else host), int(port)


def parse_listen(key: str, listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"config key '{key}': {listen!r} must be HOST:PORT")
    _check_loopback_host(key, host)
    return host.strip("[]"), int(port)


def endpoints(cfg: dict) -> dict[str, tuple[str, int]]:
    """Every TCP endpoint the daemon binds, by config key. Non-loopback only where section 7
    allows it: gateway and admin with their CURVE secret key, legacy with a non-empty allowlist."""
    g, a = cfg["gateway"], cfg["admin"]
    eps = {"gateway.endpoint": parse_tcp_endpoint(
               "gateway.endpoint", g["endpoint"], remote_ok=bool(g["curve_secret_key"]),
               remote_needs="a non-loopback gateway needs CURVE: set gateway.curve_secret_key and "
                            "gateway.curve_authorized_keys"),
           "admin.endpoint": parse_tcp_endpoint(
               "admin.endpoint", a["endpoint"], remote_ok=bool(a["curve_secret_key"]),
               remote_needs="a non-loopback admin endpoint needs CURVE: set admin.curve_secret_key and "
                            "admin.curve_authorized_keys"),
           "alerts.endpoint": parse_tcp_endpoint("alerts.endpoint", cfg["alerts"]["endpoint"]),
           "daemon.actor_port": ("127.0.0.1", cfg["daemon"]["actor_port"])}
    if g["legacy_endpoint"]:
        eps["gateway.legacy_endpoint"] = parse_tcp_endpoint(
            "gateway.legacy_endpoint", g["legacy_endpoint"], remote_ok=bool(g["legacy_allow"]),
            remote_needs="a non-loopback legacy endpoint needs gateway.legacy_allow, the IP addresses "
                         "allowed to send")
    if cfg["metrics"]["listen"]:
        eps["metrics.listen"] = parse_listen("metrics.listen", cfg["metrics"]["listen"])
    return eps


def check_security(cfg: dict) -> None:
    """Section 7 keys: CURVE certificates that load, an authorized-keys directory beside each
    secret key, a legacy allowlist of IP addresses."""
    from .zap import load_authorized, load_secret_certificate, parse_allowlist
    for sect in ("gateway", "admin"):
        secret, keys = cfg[sect]["curve_secret_key"], cfg[sect]["curve_authorized_keys"]
        if not secret:
            if keys:
                raise ConfigError(f"config key '{sect}.curve_secret_key' is empty but {sect}.curve_authorized_keys "
                                  f"is set: CURVE needs the server's secret certificate too")
            continue
        try:
            load_secret_certificate(secret)
        except ValueError as exc:
            raise ConfigError(f"config key '{sect}.curve_secret_key': {exc}")
        if not keys:
            raise ConfigError(f"config key '{sect}.curve_authorized_keys' must name the directory of authorized "
                              f"client public certificates when {sect}.curve_secret_key is set")
        try:
            load_authorized(keys)
        except ValueError as exc:
            raise ConfigError(f"config key '{sect}.curve_authorized_keys': {exc}")
    try:
        parse_allowlist(cfg["gateway"]["legacy_allow"])
    except ValueError as exc:
        raise ConfigError(f"config key 'gateway.legacy_allow': {exc}")


def check_values(cfg: dict) -> None:
    """Range checks that types alone do not catch."""
    positive = ["gateway.max_message_bytes", "gateway.legacy_max_bytes", "gateway.credit",
                "gateway.max_result_trades", "gateway.max_requests", "gateway.assembly_timeout_s",
                "dlq.max_attempts", "pairs.interval_s", "pairs.max_pairs", "pairs.window_trades",
                "supervision.max_restarts", "supervision.window_s", "supervision.heartbeat_s",
                "supervision.heartbeat_timeout_s", "supervision.long_work_heartbeat_timeout_s",
                "alerts.ingest_stall_s", "dlq.retry_min_s"]
    for dotted in positive:
        sect, key = dotted.split(".")
        if cfg[sect][key] <= 0:
            raise ConfigError(f"config key '{dotted}' must be > 0 (got {cfg[sect][key]!r})")
    for dotted in ("store.max_bytes", "dlq.max_bytes"):
        sect, key = dotted.split(".")
        if cfg[sect][key] < 0:
            raise ConfigError(f"config key '{dotted}' must be >= 0 (got {cfg[sect][key]!r})")
    if cfg["dlq"]["retry_max_s"] < cfg["dlq"]["retry_min_s"]:
        raise ConfigError("config key 'dlq.retry_max_s' must be >= dlq.retry_min_s")
    suffix = cfg["gateway"]["legacy_oos_suffix"]
    if suffix != suffix.strip() or len(suffix) > 64:
        raise ConfigError("config key 'gateway.legacy_oos_suffix' must be \"\" or at most 64 characters "
                          f"without surrounding whitespace (got {suffix!r})")
    if cfg["pairs"]["bucket"] not in ("day", "exact"):
        raise ConfigError("config key 'pairs.bucket' must be \"day\" or \"exact\"")
    if cfg["daemon"]["log_level"].upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("config key 'daemon.log_level' must be DEBUG, INFO, WARNING or ERROR")
    if cfg["daemon"]["log_format"] not in ("logfmt", "json"):
        raise ConfigError("config key 'daemon.log_format' must be \"logfmt\" or \"json\"")
    if not 1 <= cfg["daemon"]["actor_port"] <= 65535:
        raise ConfigError("config key 'daemon.actor_port' must be a TCP port (1-65535)")
    if cfg["supervision"]["heartbeat_timeout_s"] <= cfg["supervision"]["heartbeat_s"]:
        raise ConfigError("config key 'supervision.heartbeat_timeout_s' must exceed supervision.heartbeat_s")
    check_store_url(cfg)
    check_security(cfg)


def check_store_url(cfg: dict) -> None:
    """`store.url`: "" or a usable postgresql:// URL; `store.max_bytes` is SQLite's only."""
    url = cfg["store"]["url"]
    if not url:
        return
    from .pgstore import check_url, redact
    try:
        check_url(url)
    except ValueError as exc:
        raise ConfigError(f"config key 'store.url': {exc}")
    if cfg["store"]["max_bytes"]:
        raise ConfigError(f"config key 'store.max_bytes' is SQLite's size cap and is not supported with "
                          f"PostgreSQL (store.url = {redact(url)}): set it to 0 and cap the database "
                          f"on the server")


def load(path: str | None) -> dict:
    """Defaults merged with the file at `path` (if any), validated; ConfigError on any problem."""
    cfg = load_defaults()
    if path:
        try:
            with open(path, "rb") as fh:
                override = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found")
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}")
        cfg = merge(cfg, override)
    for sect, key in (("gateway", "curve_secret_key"), ("gateway", "curve_authorized_keys"),
                      ("admin", "curve_secret_key"), ("admin", "curve_authorized_keys")):
        if cfg[sect][key]:  # actors see absolute paths, whatever their working directory
            cfg[sect][key] = os.path.abspath(cfg[sect][key])
    check_values(cfg)
    endpoints(cfg)  # raises on a non-loopback or malformed endpoint
    for sect in ("store", "dlq"):
        p = cfg[sect]["path"]
        cfg[sect]["path"] = p if os.path.isabs(p) else os.path.abspath(p)
    if not cfg["daemon"]["name"]:
        cfg["daemon"]["name"] = socket.gethostname()
    if cfg["daemon"]["log_file"]:
        cfg["daemon"]["log_file"] = os.path.abspath(cfg["daemon"]["log_file"])
    return cfg


def check_ports_free(cfg: dict) -> None:
    """Raise ConfigError naming the key whose port is already taken."""
    seen: dict[tuple[str, int], str] = {}
    for key, (host, port) in endpoints(cfg).items():
        if port == 0:
            continue
        host = "127.0.0.1" if host == "localhost" else host
        if (host, port) in seen:
            raise ConfigError(f"config key '{key}': port {port} is also used by '{seen[(host, port)]}'")
        seen[(host, port)] = key
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"config key '{key}': port {port} on {host} is busy ({exc.strerror})")
        finally:
            s.close()
