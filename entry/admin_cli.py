"""`python run.py admin CMD [ARGS] [--json]`: the operator's client.

Owns: the command line (one subcommand per command of the registry
`pairlane.admin_commands.COMMANDS`, whose arguments, help and rendering it
uses), sending the request to `admin.endpoint` (REQ, msgpack), and printing
the reply as the command renders it (or raw JSON). Exit codes (PROTOCOL.md
section 4): 0 ok, 1 error reply, 3 an actor is FATAL, 4 daemon unreachable.
Stdlib + pyzmq + msgpack only. Never talks to Thespian, and knows no command
by name.
"""
from __future__ import annotations

import argparse
import json
import sys

import msgpack
import zmq

from pairlane.admin_commands import COMMANDS, EXIT_ERROR, EXIT_UNREACHABLE


def request(endpoint: str, cmd: str, args: dict | None = None, token: str = "",
            timeout_s: float = 15.0) -> dict | None:
    """Send one admin request; the reply map, or None when the daemon does not answer."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(msgpack.packb({"cmd": cmd, "args": args or {}, "token": token}, use_bin_type=True))
        if not sock.poll(int(timeout_s * 1000)):
            return None
        return msgpack.unpackb(sock.recv(), raw=False, strict_map_key=False)
    finally:
        sock.close(0)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="run.py admin", description="Talk to a running pairlane daemon's admin endpoint.",
        epilog="examples:\n  python run.py admin status\n  python run.py admin inspect writer --json\n"
               "  python run.py admin dlq.replay --all --rate 5\n"
               "exit codes: 0 ok, 1 error reply, 3 an actor is FATAL, 4 daemon unreachable",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="daemon config file (for admin.endpoint and admin.token)")
    parser.add_argument("--endpoint", help="admin endpoint (default: admin.endpoint of the config)")
    parser.add_argument("--token", help="admin token (default: admin.token of the config)")
    parser.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for a reply")
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
    reply = request(endpoint, ns.cmd, cmd.request_args(ns), token, ns.timeout)
    if reply is None:
        print(f"pairlane admin: no answer from {endpoint} within {ns.timeout:g} s (is the daemon running?)",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    if ns.json:
        print(json.dumps(reply, indent=2, default=str))
    elif reply.get("ok"):
        print(cmd.render(reply))
    else:
        print(f"error: {reply.get('error')}", file=sys.stderr)
    return cmd.exit_code(reply)
