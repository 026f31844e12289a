"""`python run.py send ...`: send one backtest result to a running pairlane.

Owns: the command line of the producer tool (arguments, reading the gateway
endpoint and max_message_bytes from a config file, progress bar, output and
exit codes). The protocol itself lives in `pairlane.client`.

Never does: start or stop the daemon, touch its database, or validate the
daemon's whole configuration (only the two gateway keys it needs are read).

Exit codes: 0 stored; 1 the server refused or did not answer (SendError);
2 bad arguments, config or input file; 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import uuid
from typing import Any, TextIO

import numpy as np

from pairlane.client import MAX_CHUNK_ROWS, Producer, SendError, load_file
from pairlane.client import log as client_log
from pairlane.synthetic import daily_result_columns, strategy_names
from pairlane.synthetic import result_columns as synthetic_columns

from pairlane.entry.cli import program

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5590"
DEFAULT_MAX_MESSAGE_BYTES = 1048576
from pairlane.codec import REQUEST_ID_RE as _ID_RE

EPILOG = """\
examples:
  # 100,000 synthetic trades to the default endpoint (tcp://127.0.0.1:5590)
  python run.py send --synthetic 100000

  # the same data again (same --seed) under a fixed id: the second send
  # returns the first one's `stored` reply and stores nothing twice
  python run.py send --synthetic 5000 --seed 7 --strategy S-7 --request-id bt-7

  # 6 strategies (synthetic-0-01 .. synthetic-0-06, rank A, one trade a day, weakly
  # correlated): enough for `admin pairs.evaluate` to fill pair slots
  python run.py send --synthetic 120 --strategies 6

  # two daemons on one PostgreSQL store: failover on silence or `unavailable`
  python run.py send --synthetic 100000 --endpoint tcp://a:5590 --endpoint tcp://b:5590

  # a gateway with CURVE (keys from `python run.py keygen`)
  python run.py send --synthetic 1000 --endpoint tcp://daemon-host:5590 \\
      --server-key server.key --client-key farm-01.key_secret

  # a file; endpoint and max_message_bytes come from the daemon's config
  python run.py send --config config/local.toml --file results/S-42.json

  # a CSV (needs a header with at least timestamp,pnl) with its metadata
  python run.py send --file trades.csv --strategy S-42 --symbol USDJPY \\
      --timeframe 60 --rank A --json

file formats:
  .json / .msgpack  a list of trade maps, or {"trades": [...] or {column: [...]},
                    "strategy_name": ..., "metrics": {...}, "symbol": ...,
                    "timeframe": ..., "rank": ..., "oos_kind": ..., "request_id": ...}
  .csv              header row with timestamp,pnl and optionally symbol,
                    direction, entry_price, exit_price, sl, tp, volume,
                    hold_time, timeframe, rank, category, regime, oos_kind
  timestamps are Unix seconds (UTC); empty cells / null mean "missing".

resuming: a send that fails (exit 1) or is interrupted can simply be run
again with the same --request-id: chunks the daemon already made durable are
not stored twice.

unreachable daemon: before sending, the gateway endpoint is probed; if it refuses
connections for 5 s (or --timeout, if shorter) the send fails at once with exit 1
("daemon unreachable"). A daemon that accepts but does not answer is retried:
--retries resumes of --timeout seconds each (defaults 5 and 30).

exit codes: 0 stored, 1 refused by the daemon, unreachable, or no answer after
retries, 2 bad arguments or input file, 130 interrupted.
"""
UNREACHABLE_PROBE_S = 5.0


class _UsageError(Exception):
    """Bad arguments, config or input: exit 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=program() + " send",
        description="Send one backtest result (synthetic or from a file) to a running\n"
                    "pairlane daemon over its ingest protocol (PROTOCOL.md section 1) and\n"
                    "wait until it is stored: durable in the database or the dead-letter spool.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to send (--synthetic or --file)")
    src = what.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", type=int, metavar="N",
                     help="generate N plausible trades (the same for the same --seed and strategy name)")
    src.add_argument("--file", metavar="PATH", help="read trades from a .json, .msgpack or .csv file")
    what.add_argument("--seed", type=int, default=0, help="seed for --synthetic (default: 0)")
    what.add_argument("--strategies", type=int, metavar="K",
                      help="with --synthetic: send K results, one per strategy (named <--strategy or "
                           "synthetic-SEED>-01..K, rank A unless --rank), one trade a day, PnL "
                           "independent per strategy so pairs qualify; --request-id gets the same suffix")
    where = p.add_argument_group("where to")
    where.add_argument("--endpoint", action="append", metavar="EP",
                       help="gateway endpoint (default: gateway.endpoint from "
                       f"--config, else {DEFAULT_ENDPOINT}); repeat it for failover between daemons "
                       "sharing one store, in that order")
    where.add_argument("--config", metavar="FILE",
                       help="the daemon's TOML config; gateway.endpoint and "
                            "gateway.max_message_bytes are taken from it "
                            f"(defaults: {DEFAULT_ENDPOINT}, {DEFAULT_MAX_MESSAGE_BYTES})")
    where.add_argument("--server-key", metavar="PUBLIC_CERT",
                       help="the daemon's public certificate, for a gateway with CURVE (with --client-key)")
    where.add_argument("--client-key", metavar="SECRET_CERT",
                       help="this producer's secret certificate (`run.py keygen`); its public part must be "
                            "in the daemon's gateway.curve_authorized_keys")
    ident = p.add_argument_group("result identity")
    ident.add_argument("--request-id", help="1-128 chars of [A-Za-z0-9._:-] (default: the file's "
                       "request_id, else a new send-<uuid>); reuse it to resume or resend")
    ident.add_argument("--strategy", metavar="NAME", help="strategy name (default: the file's "
                       "strategy_name; synthetic-<seed> for --synthetic)")
    ident.add_argument("--symbol", help="result symbol (overrides the file's)")
    ident.add_argument("--timeframe", type=int, help="result timeframe (overrides the file's)")
    ident.add_argument("--rank", help="result rank, e.g. S, A, B (overrides the file's)")
    ident.add_argument("--oos-kind", help="out-of-sample kind (overrides the file's)")
    beh = p.add_argument_group("behaviour and output")
    beh.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                     help="wait this long for a reply before resuming (default: 30)")
    beh.add_argument("--retries", type=int, default=5,
                     help="resumes in a row without progress before giving up (default: 5)")
    beh.add_argument("--json", action="store_true", help="print the daemon's stored reply as JSON")
    beh.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    return p


def _read_config(path: str) -> tuple[str, int, int]:
    """gateway.endpoint, max_message_bytes and max_chunk_rows of a daemon config (merged over defaults)."""
    from pairlane import config as cfgmod
    try:
        gw = cfgmod.load(path)["gateway"]
    except cfgmod.ConfigError as e:
        raise _UsageError(str(e)) from None
    return gw["endpoint"], gw["max_message_bytes"], gw["max_chunk_rows"]


class _Progress:
    """A one-line text progress bar on a TTY stream, redrawn at most 10 times a second."""

    WIDTH = 30

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.t0 = time.monotonic()
        self.last = 0.0
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < 0.1 and done < total:
            return
        self.last = now
        frac = done / total if total else 1.0
        fill = int(self.WIDTH * frac)
        rate = done / max(now - self.t0, 1e-9)
        self.stream.write(f"\r[{'#' * fill}{'.' * (self.WIDTH - fill)}] {done:,}/{total:,} "
                          f"{frac * 100:5.1f}% {rate:,.0f} rows/s ")
        self.stream.flush()
        self.drawn = True

    def finish(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()


class _StderrLog(logging.Handler):
    """Shows the client's resume warnings on stderr, below the progress bar."""

    def __init__(self, bar: _Progress | None, quiet: bool) -> None:
        super().__init__(logging.ERROR if quiet else logging.WARNING)
        self.bar = bar

    def emit(self, record: logging.LogRecord) -> None:
        if self.bar is not None and self.bar.drawn:
            sys.stderr.write("\n")
            self.bar.drawn = False
        sys.stderr.write(f"run.py send: {record.getMessage()}\n")
        sys.stderr.flush()


def _source(args: argparse.Namespace) -> tuple[dict, dict[str, Any], str]:
    """(columns, meta, strategy name) from --synthetic or --file."""
    if args.synthetic is not None:
        if args.synthetic < 0:
            raise _UsageError("--synthetic N needs N >= 0")
        strategy = args.strategy or f"synthetic-{args.seed}"
        # the name is mixed into the seed: two strategies never send identical series
        make = daily_result_columns if args.strategies else synthetic_columns
        cols = make(args.synthetic, seed=args.seed, strategy=strategy)
        return cols, {"metrics": _metrics(cols["pnl"])}, strategy
    try:
        cols, meta = load_file(args.file)
    except OSError as e:
        raise _UsageError(f"cannot read {args.file}: {e.strerror or e}") from None
    except ValueError as e:
        raise _UsageError(str(e)) from None
    strategy = args.strategy or meta.get("strategy_name", "")
    if not strategy:
        raise _UsageError(f"{args.file} names no strategy_name; pass --strategy NAME")
    return cols, meta, strategy


def _metrics(pnl: np.ndarray) -> dict[str, float | int]:
    """Summary metrics of a pnl series (sent with synthetic results)."""
    n = len(pnl)
    if n == 0:
        return {"sharpe": 0.0, "profit_factor": 0.0, "win_rate": 0.0, "max_dd": 0.0, "trades": 0}
    sd = float(pnl.std())
    gains, losses = float(pnl[pnl > 0].sum()), float(-pnl[pnl < 0].sum())
    equity = np.cumsum(pnl)
    max_dd = float(np.max(np.maximum.accumulate(np.maximum(equity, 0.0)) - equity))
    return {"sharpe": float(pnl.mean()) / sd if sd else 0.0,
            "profit_factor": gains / losses if losses else 0.0,
            "win_rate": float((pnl > 0).mean()), "max_dd": max_dd, "trades": n}


def _run_strategies(args: argparse.Namespace) -> int:
    """--strategies K: K sends, one per strategy name; stops at the first that fails."""
    if args.synthetic is None:
        raise _UsageError("--strategies K needs --synthetic N")
    if args.strategies < 1:
        raise _UsageError("--strategies K needs K >= 1")
    names = strategy_names(args.strategies, args.strategy or f"synthetic-{args.seed}")
    for name in names:
        one = argparse.Namespace(**vars(args))
        one.one_of_set = True
        one.strategy = name
        one.rank = args.rank or "A"
        if args.request_id:
            one.request_id = f"{args.request_id}-{name.rsplit('-', 1)[1]}"
        code = _run(one)
        if code:
            return code
    return 0


def main(argv: list[str]) -> int:
    """Run `send` with argv (the arguments after `send`); returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, message already printed)
        return int(e.code or 0)
    try:
        return _run(args)
    except _UsageError as e:
        print(f"run.py send: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.strategies is not None and not getattr(args, "one_of_set", False):
        return _run_strategies(args)
    endpoint, max_bytes, max_rows = None, None, MAX_CHUNK_ROWS
    if args.config:
        endpoint, max_bytes, max_rows = _read_config(args.config)
    endpoints = args.endpoint or [endpoint or DEFAULT_ENDPOINT]
    max_bytes = max_bytes or DEFAULT_MAX_MESSAGE_BYTES
    if args.timeout <= 0:
        raise _UsageError("--timeout must be > 0")
    if args.retries < 0:
        raise _UsageError("--retries must be >= 0")
    cols, meta, strategy = _source(args)
    if len(strategy) > 256:
        raise _UsageError("--strategy must be at most 256 characters")
    request_id = args.request_id or meta.get("request_id") or f"send-{uuid.uuid4().hex}"
    if not _ID_RE.fullmatch(request_id):
        raise _UsageError(f"request id {request_id!r} must be 1-128 characters of [A-Za-z0-9._:-]")
    for key in ("symbol", "timeframe", "rank", "oos_kind"):
        if getattr(args, key) is not None:
            meta[key] = getattr(args, key)
    n = len(cols["pnl"])
    from pairlane.entry.admin_cli import reachable
    downs = []
    for i, endpoint in enumerate(endpoints):   # start at the first that accepts connections
        down = reachable(endpoint, min(UNREACHABLE_PROBE_S, args.timeout) / len(endpoints))
        if not down:
            endpoints = endpoints[i:] + endpoints[:i]
            break
        downs.append(f"{endpoint}: {down}")
    else:
        print(f"run.py send: failed: daemon unreachable at {'; '.join(downs)} "
              f"(is pairlane running and listening on this endpoint?)", file=sys.stderr)
        return 1

    bar = _Progress(sys.stderr) if (not args.quiet and sys.stderr.isatty()) else None
    t0 = time.monotonic()
    try:
        producer = Producer(endpoints, timeout_s=args.timeout, retries=args.retries,
                            max_message_bytes=max_bytes, max_chunk_rows=max_rows,
                            server_key=args.server_key, client_key=args.client_key)
    except ValueError as e:
        raise _UsageError(str(e)) from None
    handler = _StderrLog(bar, args.quiet)
    client_log.addHandler(handler)
    try:
        reply = producer.send_result(request_id, strategy, cols, meta=meta, progress=bar)
    except ValueError as e:
        raise _UsageError(str(e)) from None
    except SendError as e:
        if bar:
            bar.finish()
        print(f"run.py send: failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if bar:
            bar.finish()
        print(f"run.py send: interrupted; run again with --request-id {request_id} to resume",
              file=sys.stderr)
        return 130
    finally:
        client_log.removeHandler(handler)
        producer.close()
    if bar:
        bar.finish()
    elapsed = time.monotonic() - t0
    if args.json:
        print(json.dumps(reply, sort_keys=True, default=repr))
    elif not args.quiet:
        trades = reply.get("trades", n)
        rate = (trades if isinstance(trades, int) else n) / max(elapsed, 1e-9)
        print(f"stored request_id={reply.get('request_id', request_id)} trades={trades} "
              f"location={reply.get('location', '?')} in {elapsed:.2f}s ({rate:,.0f} trades/s)")
    return 0
