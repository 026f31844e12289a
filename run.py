#!/usr/bin/env python3
"""pairlane command line from a source tree (installed, the same is the `pairlane` command).

  python run.py [--config FILE]          run the daemon (default)
  python run.py admin CMD [ARGS] [--json] talk to a running daemon
  python run.py send ...                 send a backtest result (producer)
  python run.py bench [--json]           benchmarks, as ratios against a raw floor
  python run.py chaos --duration S       bounded randomized fault run
  python run.py migrate --from SQLITE_PATH --to URL   copy a SQLite store into PostgreSQL
  python run.py keygen NAME --dir DIR   write a CURVE key pair (DIR/NAME.key, DIR/NAME.key_secret)
  python run.py --version                print the version

`--config FILE` may stand anywhere on the line; without it, $PAIRLANE_CONFIG is used.
The dispatching lives in entry/cli.py.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str]) -> int:
    from pairlane.entry.cli import run
    return run(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
