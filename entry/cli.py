"""The `pairlane` command (the same as `python run.py`): dispatch to the daemon or a sub-command.

  pairlane [--config FILE]            run the daemon (default)
  pairlane admin CMD [ARGS] [--json]  talk to a running daemon
  pairlane send ...                   send a backtest result (producer)
  pairlane bench [--json]             benchmarks, as ratios against a raw floor
  pairlane chaos --duration S         bounded randomized fault run
  pairlane migrate --from SQLITE_PATH --to URL   copy a SQLite store into PostgreSQL
  pairlane keygen NAME --dir DIR      write a CURVE key pair (DIR/NAME.key, DIR/NAME.key_secret)
  pairlane --version                  print the version

`--config FILE` may stand anywhere on the line (before or after the sub-command and its
arguments); without it, the environment variable PAIRLANE_CONFIG names the config file
(except for chaos, which only attacks a running daemon when given --config).

Owns: the command line's first word, `--version`, where `--config` is taken from, and a quiet
end when stdout is a closed pipe (`pairlane admin status | head -1`). Never parses a
sub-command's own arguments and never starts anything itself.
"""
from __future__ import annotations

import importlib
import os
import sys

SUBCOMMANDS = {
    "admin": "pairlane.entry.admin_cli",
    "send": "pairlane.entry.send",
    "bench": "pairlane.bench.run",
    "chaos": "pairlane.entry.chaos",
    "migrate": "pairlane.entry.migrate",
    "keygen": "pairlane.entry.keygen",
}
CONFIG_ENV = "PAIRLANE_CONFIG"
TAKES_CONFIG = {"admin", "send", "chaos"}  # and the daemon; `bench` starts its own daemons


def program() -> str:
    """How the user called us: "pairlane" (the console script) or "run.py", for usage lines."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name in ("pairlane", "run.py") else "pairlane"


def version() -> str:
    """The installed distribution's version (package metadata), or 'unknown' when run from a
    source tree that was never installed."""
    try:
        from importlib.metadata import PackageNotFoundError, version as dist_version
        return dist_version("pairlane")
    except PackageNotFoundError:
        return "unknown"


def hoist_config(argv: list[str], environ: dict | None = None) -> tuple[str | None, list[str]]:
    """(config file, argv without `--config FILE` / `--config=FILE`), wherever it stood; the
    config falls back to $PAIRLANE_CONFIG. A `--config` with no value is left for the
    sub-command's parser to refuse."""
    env = os.environ if environ is None else environ
    rest: list[str] = []
    config: str | None = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest.extend(argv[i:])
            break
        if arg == "--config" and i + 1 < len(argv):
            config = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            config = arg[len("--config="):]
            i += 1
            continue
        rest.append(arg)
        i += 1
    if config is None:
        config = env.get(CONFIG_ENV) or None
    return config, rest


def main(argv: list[str]) -> int:
    """Run the command line `argv` (without the program name); returns the exit code."""
    if argv[:1] == ["--version"]:
        print(f"pairlane {version()}")
        return 0
    sub = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    if sub and sub not in TAKES_CONFIG:
        return importlib.import_module(SUBCOMMANDS[sub]).main(argv[1:])
    # chaos never takes $PAIRLANE_CONFIG: with a config it injects faults into that running daemon
    config, rest = hoist_config(argv[1:] if sub else argv, {} if sub == "chaos" else None)
    with_config = (["--config", config] if config else []) + rest
    if sub:
        return importlib.import_module(SUBCOMMANDS[sub]).main(with_config)
    if rest and rest[0] in ("-h", "--help"):
        print("\n\n".join(__doc__.strip().split("\n\n")[1:3]))
        print()
    from pairlane.entry.daemon import main as daemon_main
    return daemon_main(with_config)


def run(argv: list[str]) -> int:
    """main(argv), ending quietly (exit 141, as a shell would) when stdout is a closed pipe."""
    try:
        code = main(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # the reader went away (`| head`): no traceback; stop Python's exit-time flush failing too
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def console() -> None:
    """Entry point of the `pairlane` console script."""
    sys.exit(run(sys.argv[1:]))
