#!/usr/bin/env python3
"""pairlane command line.

  python run.py [--config FILE]          run the daemon (default)
  python run.py admin CMD [ARGS] [--json] talk to a running daemon
  python run.py send ...                 send a backtest result (producer)
  python run.py bench [--json]           benchmarks, as ratios against a raw floor
  python run.py chaos --duration S       bounded randomized fault run
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SUBCOMMANDS = {
    "admin": "entry.admin_cli",
    "send": "entry.send",
    "bench": "bench.run",
    "chaos": "entry.chaos",
}


def main(argv: list[str]) -> int:
    if argv and argv[0] in SUBCOMMANDS:
        import importlib
        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print()
    from entry.daemon import main as daemon_main
    return daemon_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
