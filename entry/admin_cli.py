"""`python run.py admin CMD [ARGS] [--json]`: the operator's client.

Owns: client-side parsing of each command's arguments, sending the request
to `admin.endpoint` (REQ, msgpack), and rendering the reply as a table (or
raw JSON). Exit codes (PROTOCOL.md section 4): 0 ok, 1 error reply, 3 an
actor is FATAL, 4 daemon unreachable. Stdlib + pyzmq + msgpack only. Never
talks to Thespian.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import msgpack
import zmq

from supervision.states import State

EXIT_OK, EXIT_ERROR, EXIT_FATAL, EXIT_UNREACHABLE = 0, 1, 3, 4


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


def _fmt_uptime(s) -> str:
    s = int(s or 0)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}"


def table(rows: list[list], headers: list[str]) -> str:
    cells = [headers] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


class Command:
    """Base: `name`, docstring = help, `add_args` (client parsing), `args` -> request args,
    `render` -> text. Execution happens in the daemon."""

    name = ""

    def add_args(self, p: argparse.ArgumentParser) -> None:
        pass

    def args(self, ns) -> dict:
        return {}

    def render(self, reply: dict) -> str:
        return "\n".join(f"{k}: {v}" for k, v in reply.items() if k != "ok")


def _kv_render(d: dict, indent: str = "") -> str:
    lines = []
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append(f"{indent}{k}:")
            lines.append(_kv_render(v, indent + "  "))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            heads = list(v[0].keys())
            lines.append(f"{indent}{k}:")
            lines.append("\n".join(indent + "  " + ln for ln in
                                   table([[r.get(h) for h in heads] for r in v], [h.upper() for h in heads]).splitlines()))
        else:
            lines.append(f"{indent}{k}: {v}")
    return "\n".join(lines)


class Status(Command):
    """Every actor and supervisor: NAME, SUPERVISOR, STATE, PID, UPTIME, RESTARTS, LAST EXIT."""

    name = "status"

    def render(self, reply):
        rows = [[a["name"], a["supervisor"], a["state"], a["pid"], _fmt_uptime(a["uptime_s"]),
                 a["restarts"], a.get("last_exit") or "-"] for a in reply.get("actors", [])]
        head = f"ready: {'yes' if reply.get('ready') else 'no'}"
        return head + "\n" + table(rows, ["NAME", "SUPERVISOR", "STATE", "PID", "UPTIME", "RESTARTS", "LAST EXIT"])


class ActorArg(Command):
    def add_args(self, p):
        p.add_argument("actor", help="actor name (see `admin status`)")

    def args(self, ns):
        return {"actor": ns.actor}


class Inspect(ActorArg):
    """An actor's own figures (in-flight requests, rows written, queue depths, ...)."""

    name = "inspect"

    def render(self, reply):
        return f"actor: {reply.get('actor')}\n" + _kv_render(reply.get("state", {}))


class Restart(ActorArg):
    """Restart an actor (and, for a supervisor, its subtree) through its supervisor."""

    name = "restart"


class Inject(ActorArg):
    """Inject a fault into an actor: crash, hang or exit (needs admin.allow_fault_injection)."""

    name = "inject"

    def add_args(self, p):
        super().add_args(p)
        p.add_argument("fault", choices=["crash", "hang", "exit"])

    def args(self, ns):
        return {"actor": ns.actor, "fault": ns.fault}


class Stop(Command):
    """Graceful shutdown of the daemon (children stop in reverse start order)."""

    name = "stop"


class Result(Command):
    """A result's backtest_results row plus chunks durable / total."""

    name = "result"

    def add_args(self, p):
        p.add_argument("request_id")

    def args(self, ns):
        return {"request_id": ns.request_id}

    def render(self, reply):
        return _kv_render(reply.get("result") or {})


class Verify(Command):
    """Consistency check: results whose rows differ from total_trades, orphan rows, stale `receiving`."""

    name = "verify"

    def render(self, reply):
        probs = reply.get("problems", [])
        if not probs:
            return "no problems found"
        return table([[p.get("kind"), p.get("request_id"), p.get("detail")] for p in probs],
                     ["KIND", "REQUEST_ID", "DETAIL"])


class DlqList(Command):
    """Dead-letter items: ID, REQUEST_ID, STAGE, REASON, ATTEMPTS, AGE, BYTES, PARKED."""

    name = "dlq.list"

    def add_args(self, p):
        p.add_argument("--limit", type=int, default=100)

    def args(self, ns):
        return {"limit": ns.limit}

    def render(self, reply):
        now = time.time()
        rows = [[i["id"], i["request_id"], i["stage"], i["reason"], i["attempts"],
                 f"{now - i['first_failed_at']:.0f}s", i["bytes"], "yes" if i["parked"] else "no"]
                for i in reply.get("items", [])]
        return table(rows, ["ID", "REQUEST_ID", "STAGE", "REASON", "ATTEMPTS", "AGE", "BYTES", "PARKED"])


class OneOrAll(Command):
    def add_args(self, p):
        g = p.add_mutually_exclusive_group(required=True)
        g.add_argument("id", nargs="?", help="item id")
        g.add_argument("--all", action="store_true", help="every item")

    def args(self, ns):
        return {"all": True} if ns.all else {"id": ns.id}


class DlqShow(Command):
    """One dead-letter item with its last error and a payload summary."""

    name = "dlq.show"

    def add_args(self, p):
        p.add_argument("id")

    def args(self, ns):
        return {"id": ns.id}

    def render(self, reply):
        return _kv_render(reply.get("item") or {})


class DlqReplay(OneOrAll):
    """Replay one or all dead-letter items now, at a rate limit (items/s); progress in `inspect dlq`."""

    name = "dlq.replay"

    def add_args(self, p):
        super().add_args(p)
        p.add_argument("--rate", type=float, default=10.0, help="items per second (default 10)")

    def args(self, ns):
        a = super().args(ns)
        a["rate"] = ns.rate
        return a


class DlqPurge(OneOrAll):
    """Delete one or all dead-letter items for good (a `stored` promise is broken: needs --yes)."""

    name = "dlq.purge"

    def add_args(self, p):
        super().add_args(p)
        p.add_argument("--yes", action="store_true", help="confirm: the data is gone for good")


class Pairs(Command):
    """Pair slots, candidates, exclusions by reason, safe stop and data age."""

    name = "pairs"

    def render(self, reply):
        out = [f"safe_stop: {reply.get('safe_stop')}   candidates: {reply.get('candidates')}   "
               f"newest_result_age_s: {reply.get('newest_result_age_s')}"]
        slots = reply.get("slots", [])
        out.append(table([[s["pair_id"], s["strategy_a"], s["strategy_b"], f"{s['weight_a']:.3f}",
                           f"{s['weight_b']:.3f}", f"{s['corr']:.3f}", f"{s['sharpe']:.3f}",
                           f"{s['profit_factor']:.3f}", f"{s['score']:.3f}"] for s in slots],
                         ["PAIR_ID", "A", "B", "W_A", "W_B", "CORR", "SHARPE", "PF", "SCORE"]))
        excl = reply.get("excluded", {})
        out.append("excluded: " + (", ".join(f"{k}={v}" for k, v in excl.items()) or "none"))
        return "\n".join(out)


class PairsEvaluate(Pairs):
    """Evaluate pairs now, then show them as `pairs` does."""

    name = "pairs.evaluate"


class MetricsCmd(Command):
    """The figures of /metrics as a map."""

    name = "metrics"

    def render(self, reply):
        return _kv_render(reply.get("metrics", {}))


COMMANDS = {c.name: c for c in (Status(), Inspect(), Restart(), Inject(), Stop(), Result(), Verify(),
                                DlqList(), DlqShow(), DlqReplay(), DlqPurge(), Pairs(), PairsEvaluate(),
                                MetricsCmd())}


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
        p = sub.add_parser(name, help=(cmd.__doc__ or "").strip().splitlines()[0], description=cmd.__doc__)
        cmd.add_args(p)
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
    if ns.cmd == "dlq.purge" and not ns.yes:
        print("dlq.purge deletes data that pairlane promised to store; add --yes to confirm", file=sys.stderr)
        return 1
    reply = request(endpoint, ns.cmd, cmd.args(ns), token, ns.timeout)
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
    if not reply.get("ok"):
        return EXIT_ERROR
    if ns.cmd == "status" and any(a.get("state") == State.FATAL.value for a in reply.get("actors", [])):
        return EXIT_FATAL
    return EXIT_OK
