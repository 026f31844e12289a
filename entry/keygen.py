"""`python run.py keygen NAME --dir DIR`: write a CURVE key pair in ZeroMQ's certificate format.

Owns: the command line; the files are written by pyzmq's `zmq.auth.create_certificates`:
DIR/NAME.key (public: give it to the other side, e.g. into a daemon's
gateway.curve_authorized_keys directory) and DIR/NAME.key_secret (secret: stays with its owner,
mode 0600). Never overwrites an existing key pair and never talks to a daemon.

Exit codes: 0 written; 2 bad arguments or a key pair of that name already in DIR.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import zmq.auth

from pairlane.entry.cli import program

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=program() + " keygen",
        description="Write a CURVE key pair: DIR/NAME.key (public) and DIR/NAME.key_secret (secret).",
        epilog="examples:\n"
               "  python run.py keygen server --dir /etc/pairlane/keys      # gateway.curve_secret_key\n"
               "  python run.py keygen farm-01 --dir ~/.pairlane             # a producer\n"
               "  cp ~/.pairlane/farm-01.key /etc/pairlane/authorized/ && kill -HUP $(pidof pairlane)\n"
               "exit codes: 0 written, 2 bad arguments or the key pair exists",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", metavar="NAME", help="key pair name: 1-128 chars of [A-Za-z0-9._-]")
    p.add_argument("--dir", required=True, metavar="DIR", help="directory to write into (created if missing)")
    return p


def main(argv: list[str]) -> int:
    """Run `keygen` with argv (the arguments after `keygen`); returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if not NAME_RE.fullmatch(args.name):
        print(f"{program()} keygen: error: NAME {args.name!r} must be 1-128 chars of [A-Za-z0-9._-]",
              file=sys.stderr)
        return 2
    public = os.path.join(args.dir, args.name + ".key")
    secret = public + "_secret"
    for path in (public, secret):
        if os.path.exists(path):
            print(f"{program()} keygen: error: {path} exists; not overwritten (remove it, or pick another NAME)",
                  file=sys.stderr)
            return 2
    try:
        os.makedirs(args.dir, exist_ok=True)
        public, secret = zmq.auth.create_certificates(args.dir, args.name)
        os.chmod(secret, 0o600)
    except OSError as exc:
        print(f"{program()} keygen: error: cannot write into {args.dir}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"public key: {public}\nsecret key: {secret} (keep it private)")
    return 0
