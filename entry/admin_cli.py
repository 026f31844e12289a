"""`python run.py admin CMD [ARGS] [--json]`: the operator's client.

Owns: the command line (one subcommand per command of the registry
`pairlane.admin_commands.COMMANDS`, whose arguments, help and rendering it
uses), sending the request to `admin.endpoint` (REQ, msgpack), and printing
the reply as the command renders it (or raw JSON). Exit codes (PROTOCOL.md
section 4): 0 ok, 1 error reply, 3 an actor is FATAL, 4 daemon unreachable (a refused
connection is known within 1 s; under --json a JSON error object is printed too).
Stdlib + pyzmq + msgpack only. Never talks to Thespian, and knows no command
by name.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import time

import msgpack
import zmq

from pairlane.admin_commands import COMMANDS, EXIT_ERROR, EXIT_UNREACHABLE

from pairlane.entry.cli import program


def request(endpoint: str, cmd: str, args: dict | None = None, token: str = "",
            timeout_s: float = 15.0, curve: dict | None = None) -> dict | None:
    """Send one admin request; the reply map, or None when the daemon does not answer.
    `curve`: client socket options from pairlane.zap.client_curve_options (CURVE admin)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    for name, value in (curve or {}).items():
        sock.setsockopt(getattr(zmq, name), value)
    try:
        sock.connect(endpoint)
        sock.send(msgpack.packb({"cmd": cmd, "args": args or {}, "token": token}, use_bin_type=True))
        if not sock.poll(int(timeout_s * 1000)):
            return None
        return msgpack.unpackb(sock.recv(), raw=False, strict_map_key=False)
    finally:
        sock.close(0)


PROBE_S = 1.0  # how long an endpoint may refuse connections before the daemon counts as down


def reachable(endpoint: str, within_s: float = PROBE_S) -> str | None:
    """None if something accepts TCP connections at a tcp:// endpoint within `within_s` (retried:
    the admin actor may be restarting), else why not. Other transports are not probed."""
    if not endpoint.startswith("tcp://"):
        return None
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    deadline = time.monotonic() + within_s
    why = "no answer"
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=max(0.05, left)):
                return None
        except (OSError, ValueError) as exc:
            why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        if time.monotonic() + 0.1 >= deadline:
            return why
        time.sleep(0.1)


def _unreachable(endpoint: str, detail: str, as_json: bool) -> int:
    message = f"no answer from {endpoint}: {detail} (is the daemon running?)"
    if as_json:
        print(json.dumps({"ok": False, "error": "unreachable", "endpoint": endpoint, "detail": message}))
    print(f"pairlane admin: {message}", file=sys.stderr)
    return EXIT_UNREACHABLE


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=program() + " admin", description="Talk to a running pairlane daemon's admin endpoint.",
        epilog="examples:\n  python run.py admin status\n  python run.py admin inspect writer --json\n"
               "  python run.py admin dlq.replay --all --rate 5\n"
               "exit codes: 0 ok, 1 error reply, 3 an actor is FATAL, 4 daemon unreachable",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="daemon config file (for admin.endpoint and admin.token)")
    parser.add_argument("--endpoint", help="admin endpoint (default: admin.endpoint of the config)")
    parser.add_argument("--token", help="admin token (default: admin.token of the config)")
    parser.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for a reply")
    parser.add_argument("--server-key", metavar="PUBLIC_CERT",
                        help="the daemon's public certificate, for an admin socket with CURVE (with --client-key)")
    parser.add_argument("--client-key", metavar="SECRET_CERT",
                        help="this operator's secret certificate (its public part authorized on the daemon)")
    parser.add_argument("--json", action="store_true", help="print the raw reply as JSON")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="CMD")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.summary, description=cmd.__doc__)
        cmd.add_arguments(p)
        # SUPPRESS: without it the subcommand's default (False) overwrites a --json given before CMD
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="print the raw reply as JSON")
    ns = parser.parse_args(argv)
    from pairlane import config as cfgmod
    try:
        cfg = cfgmod.load(ns.config)
    except cfgmod.ConfigError as exc:
        print(f"pairlane admin: configuration error: {exc}", file=sys.stderr)
        return 2
    endpoint = ns.endpoint or cfg["admin"]["endpoint"]
    token = ns.token if ns.token is not None else cfg["admin"]["token"]
    cmd = COMMANDS[ns.cmd]
    refusal = cmd.refuse(ns)
    if refusal:
        print(refusal, file=sys.stderr)
        return EXIT_ERROR
    from pairlane.zap import client_curve_options
    try:
        curve = client_curve_options(ns.server_key, ns.client_key)
    except ValueError as exc:
        print(f"pairlane admin: {exc}", file=sys.stderr)
        return 2
    down = reachable(endpoint, min(PROBE_S, ns.timeout))
    if down:
        return _unreachable(endpoint, down, ns.json)
    reply = request(endpoint, ns.cmd, cmd.request_args(ns), token, ns.timeout, curve)
    if reply is None:
        return _unreachable(endpoint, f"no reply within {ns.timeout:g} s", ns.json)
    if ns.json:
        print(json.dumps(reply, indent=2, default=str))
    elif reply.get("ok"):
        print(cmd.render(reply))
    else:
        print(f"error: {reply.get('error')}", file=sys.stderr)
    return cmd.exit_code(reply)
