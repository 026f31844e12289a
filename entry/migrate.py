"""`python run.py migrate --from SQLITE_PATH --to URL`: copy a SQLite store into PostgreSQL.

Owns: the command line (arguments, a progress bar on stderr, the final per-table count table,
exit codes). What is copied and how lives in `pairlane.migrate`. Never starts a daemon and
never writes the SQLite file. Run it with the daemon stopped (or pointed elsewhere): results
still receiving are not copied.

Exit codes: 0 copied and every count matches; 1 a count differs or the copy failed midway
(rerun: what was copied is skipped); 2 bad arguments, or a database that cannot be opened.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from pairlane.store import StoreError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run.py migrate",
        description="Copy complete results with their trades, live trades and pair history from a SQLite "
                    "store into PostgreSQL. Idempotent: rerunning adds nothing.",
        epilog="exit codes: 0 done, counts equal; 1 counts differ or the copy failed (rerun resumes); "
               "2 bad arguments or a database that cannot be opened\n"
               "example: python run.py migrate --from data/pairlane.db --to postgresql://pairlane@db/pairlane",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="src", required=True, metavar="SQLITE_PATH", help="the SQLite database file")
    p.add_argument("--to", dest="dst", required=True, metavar="URL", help="postgresql://user@host:port/db")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


class Bar:
    """A one-line progress bar on stderr, redrawn at most 10 times a second."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.last = 0.0

    def __call__(self, table: str, done: int, total: int) -> None:
        now = time.monotonic()
        if self.quiet or (now - self.last < 0.1 and done < total):
            return
        self.last = now
        width = 30
        fill = int(width * done / total) if total else width
        sys.stderr.write(f"\r{table:<13} [{'#' * fill}{'.' * (width - fill)}] {done}/{total}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    from pairlane.pgstore import check_url, redact
    try:
        check_url(args.dst)
    except ValueError as exc:
        print(f"run.py migrate: --to: {exc}", file=sys.stderr)
        return 2
    if not os.path.isfile(args.src):
        print(f"run.py migrate: --from: {args.src} is not a file", file=sys.stderr)
        return 2
    from pairlane.migrate import migrate
    try:
        rep = migrate(args.src, args.dst, Bar(args.quiet))
    except StoreError as exc:
        print(f"run.py migrate: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a failure midway: what is copied stays, a rerun resumes
        print(f"\nrun.py migrate: failed: {type(exc).__name__}: {exc} (rerun to resume)", file=sys.stderr)
        return 1
    c, s = rep.copied, rep.skipped
    print(f"migrated {args.src} -> {redact(args.dst)} in {rep.seconds:.1f}s: "
          f"{c['results']} results ({c['trades']} trades), {c['live_batches']} live batches "
          f"({c['live_trades']} trades), {c['pair_history']} pair history rows, {c['pair_slots']} pair slots; "
          f"already there: {s['results']} results, {s['live_batches']} live batches, "
          f"{s['pair_history']} pair evaluations")
    print(f"{'TABLE':<20} {'SOURCE':>12} {'TARGET':>12}  CHECK")
    for table, (src, dst) in rep.counts.items():
        print(f"{table:<20} {src:>12} {dst:>12}  {'ok' if src == dst else 'DIFFERS'}")
    return 0 if rep.ok else 1
