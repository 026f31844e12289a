"""The admin commands of PROTOCOL.md section 4, one small class each: the one registry.

Owns, per command: its name; its help (the class docstring); its arguments (`Arg`), from which
both the CLI's argparse parser and the daemon-side check of a request's `args` are built, so a
bad argument gets the same clear error from either side; the actor that owns and executes it
(`owner`, an actor name) and the name of the method that runs it there (`handler`, by default
`admin_<name with . as _>`); how long the admin actor waits for that actor (`timeout_s`); and
how its reply is rendered as text and which exit code it gives. `result` and `verify` go
further and execute here (`read`), on a read-only `pairlane.store.StoreView`.

Both `entry/admin_cli.py` (client) and `actors/admin.py` (daemon) read `COMMANDS`; adding a
command is one class here plus, unless it reads the store, its handler method in the owner actor.
Pure: no sockets, no Thespian, no zmq; never sends or executes a request itself (except `read`,
which is handed its view).
"""
from __future__ import annotations

import argparse
import datetime
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from .vocab import ResultStatus

EXIT_OK, EXIT_ERROR, EXIT_FATAL, EXIT_UNREACHABLE = 0, 1, 3, 4
FATAL = "FATAL"   # the `state` of a status row whose supervisor gave up (PROTOCOL.md section 4)
FAULTS = ("crash", "hang", "exit")
DEFAULT_TIMEOUT_S = 10.0
REQUIRED = object()


class CommandError(ValueError):
    """A request the daemon refuses before running it (unknown command, bad args); str() is the
    text of the error reply."""


@dataclass(frozen=True)
class Arg:
    """One argument of a command. Without a default it is required (positional on the command
    line); with one, it is the option `--name`. `check` is an extra condition on the value and
    `must` says in words what the value must be (it is the error text)."""

    name: str
    must: str
    type: type = str
    default: Any = REQUIRED
    choices: tuple = ()
    check: Callable[[Any], bool] | None = None
    help: str | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool):  # bool is an int to Python, never to an operator
            ok = self.type is bool
        elif self.type is float:
            ok = isinstance(value, (int, float))
        else:
            ok = isinstance(value, self.type)
        if ok and self.choices:
            ok = value in self.choices
        return ok and (self.check is None or bool(self.check(value)))

    def add_to(self, p: argparse.ArgumentParser) -> None:
        kw: dict = {"help": self.help}
        if self.choices:
            kw["choices"] = self.choices
        if self.type in (int, float):
            kw["type"] = self.type
        if self.required:
            p.add_argument(self.name, **kw)
        else:
            p.add_argument("--" + self.name.replace("_", "-"), dest=self.name, default=self.default, **kw)


def _positive(v) -> bool:
    return v > 0


class Command:
    """Base of every command: a name, a docstring (its help), `arguments`, an `owner` actor.

    Client side: `add_arguments` (argparse), `request_args` (namespace -> request args),
    `refuse` (a client-side refusal before sending), `render` (reply -> text), `exit_code`.
    Daemon side: `validate` (request args -> checked args, or CommandError), `handler`.
    """

    name: ClassVar[str] = ""
    owner: ClassVar[str] = "admin"
    arguments: ClassVar[tuple[Arg, ...]] = ()
    one_or_all: ClassVar[bool] = False   # takes {"id": X} or {"all": true}
    timeout_s: ClassVar[float] = DEFAULT_TIMEOUT_S

    @property
    def handler(self) -> str:
        """The owner actor's method that executes this command: handler(args, respond)."""
        return "admin_" + self.name.replace(".", "_")

    @property
    def summary(self) -> str:
        return (self.__doc__ or "").strip().splitlines()[0]

    # ----- client side ----------------------------------------------------------------------
    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        if self.one_or_all:
            g = p.add_mutually_exclusive_group(required=True)
            g.add_argument("id", nargs="?", help="item id")
            g.add_argument("--all", action="store_true", help="every item")
        for a in self.arguments:
            a.add_to(p)

    def request_args(self, ns: argparse.Namespace) -> dict:
        out: dict = {}
        if self.one_or_all:
            out.update({"all": True} if ns.all else {"id": ns.id})
        out.update({a.name: getattr(ns, a.name) for a in self.arguments})
        return out

    def refuse(self, ns: argparse.Namespace) -> str | None:
        """Why the CLI will not send this request (None: send it)."""
        return None

    def render(self, reply: dict) -> str:
        return "\n".join(f"{k}: {v}" for k, v in reply.items() if k != "ok")

    def exit_code(self, reply: dict) -> int:
        return EXIT_OK if reply.get("ok") else EXIT_ERROR

    # ----- daemon side ----------------------------------------------------------------------
    def validate(self, args: Any) -> dict:
        """The request's args checked against `arguments`, defaults filled in; CommandError
        naming the argument and what it must be. Keys it does not declare are ignored."""
        if not isinstance(args, dict):
            raise CommandError("malformed: args must be a map")
        out: dict = {}
        if self.one_or_all:
            if args.get("all") is True:
                out["all"] = True
            elif isinstance(args.get("id"), str):
                out["id"] = args["id"]
            else:
                raise CommandError("give args.id (an item id from dlq.list) or args.all = true")
        for a in self.arguments:
            value = args.get(a.name)
            if value is None:
                if a.required:
                    raise CommandError(f"{self.name} needs args.{a.name} ({a.must})")
                value = a.default
            elif not a.accepts(value):
                raise CommandError(f"{self.name}: {a.name} must be {a.must}, not {value!r}")
            out[a.name] = value
        return out


class StoreRead(Command):
    """A command that reads the store: executed by `read` on a read-only StoreView, in one
    snapshot, by the admin actor (off its socket loop)."""

    def read(self, view: Any, args: dict, config: dict) -> dict:
        raise NotImplementedError


# ----- rendering helpers --------------------------------------------------------------------------
def fmt_uptime(s: Any) -> str:
    s = int(s or 0)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}"


EPOCH_MIN = 1e9  # a number this large under a time-like key is a Unix timestamp (2001 on)
_TIME_KEY = re.compile(r"(_at|_ts|^ts|^since|_since|^at|_time|timestamp|timestamp_seconds)$")


def iso(ts: float) -> str:
    """Unix seconds -> '2026-11-30T02:10:00Z' (UTC, whole seconds)."""
    return datetime.datetime.fromtimestamp(float(ts), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def fmt_value(v: Any, key: str = "") -> str:
    """One value as an operator reads it: yes/no, '-' for nothing, ISO for timestamps under a
    time-like key, '(none)' for an empty map or list, lists of scalars comma-joined; never a
    Python repr."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)) and key and _TIME_KEY.search(key) and v >= EPOCH_MIN:
        return iso(v)
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            return str(v)
        if v == 0 or abs(v) >= 1e-3:
            return f"{v:.6f}".rstrip("0").rstrip(".")  # no exponent, at most 6 decimals
        return f"{v:.3g}"
    if isinstance(v, (dict, list, tuple)) and not v:
        return "(none)"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt_value(x, key) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k}={fmt_value(x, str(k))}" for k, x in v.items())
    return str(v)


def table(rows: list[list], headers: list[str]) -> str:
    """Columns padded to their widest cell; a cell is rendered by fmt_value under its header."""
    cells = [headers] + [[v if isinstance(v, str) else fmt_value(v, h.lower()) for v, h in zip(r, headers)]
                         for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def kv_render(d: dict, indent: str = "") -> str:
    lines = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            lines.append(f"{indent}{k}:")
            lines.append(kv_render(v, indent + "  "))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            heads = list(v[0].keys())
            lines.append(f"{indent}{k}:")
            lines.append("\n".join(indent + "  " + ln for ln in
                                   table([[r.get(h) for h in heads] for r in v], [h.upper() for h in heads]).splitlines()))
        else:
            lines.append(f"{indent}{k}: {fmt_value(v, str(k))}")
    return "\n".join(lines)


def parse_since(text: str) -> float:
    """A --since value as Unix seconds: a number (Unix seconds), an age ('90s', '30m', '2h',
    '7d': that long ago) or an ISO 8601 time (UTC unless it names a zone)."""
    text = text.strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text)
    if m:
        return time.time() - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: give Unix seconds, an age like 2h or 7d, or ISO 8601") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.timezone.utc)
    return dt.timestamp()


def fmt_age(seconds: Any) -> str:
    """An age in seconds as '42s', '5m', '3h', '2d'."""
    s = max(0.0, float(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit}"
    return f"{s:.0f}s"


ACTOR = Arg("actor", "an actor name", help="actor name (see `admin status`)")


# ----- supervision: served by the admin actor with the root supervisor -----------------------------
class Status(Command):
    """Every actor and supervisor: NAME, SUPERVISOR, STATE, PID, UPTIME, RESTARTS, LAST EXIT."""

    name = "status"
    timeout_s = 5.0

    def render(self, reply):
        rows = [[a["name"], a["supervisor"], a["state"], a["pid"], fmt_uptime(a["uptime_s"]),
                 a["restarts"], a.get("last_exit") or "-"] for a in reply.get("actors", [])]
        head = f"ready: {'yes' if reply.get('ready') else 'no'}"
        d = reply.get("daemon")
        if d:
            head += (f"  daemon: {d.get('name')}  host: {d.get('host')}  pid: {d.get('pid')}  "
                     f"store: {d.get('store')}")
        if "pairs_leader" in reply:
            head += f"  pairs leader: {'yes' if reply['pairs_leader'] else 'no'}"
        return head + "\n" + table(rows, ["NAME", "SUPERVISOR", "STATE", "PID", "UPTIME", "RESTARTS", "LAST EXIT"])

    def exit_code(self, reply):
        code = super().exit_code(reply)
        if code == EXIT_OK and any(a.get("state") == FATAL for a in reply.get("actors", [])):
            return EXIT_FATAL
        return code


class Inspect(Command):
    """An actor's own figures (in-flight requests, rows written, queue depths, ...)."""

    name = "inspect"
    arguments = (ACTOR,)
    timeout_s = 5.0

    def render(self, reply):
        return f"actor: {reply.get('actor')}\n" + kv_render(reply.get("state", {}))


class Restart(Command):
    """Restart an actor (and, for a supervisor, its subtree) through its supervisor."""

    name = "restart"
    arguments = (Arg("actor", "an actor below the root", check=lambda v: v != "root",
                     help="actor name (see `admin status`)"),)


class Inject(Command):
    """Inject a fault into an actor: crash, hang or exit (needs admin.allow_fault_injection)."""

    name = "inject"
    arguments = (ACTOR, Arg("fault", "one of " + ", ".join(FAULTS), choices=FAULTS))


class Stop(Command):
    """Graceful shutdown of the daemon (children stop in reverse start order)."""

    name = "stop"


class Help(Command):
    """The names of every command the daemon serves."""

    name = "help"

    def render(self, reply):
        return "\n".join(reply.get("commands", []))


# ----- the store, read-only ---------------------------------------------------------------------
class Result(StoreRead):
    """A result's backtest_results row plus chunks durable / total."""

    name = "result"
    arguments = (Arg("request_id", "a request id"),)

    def read(self, view, args, config):
        info = view.result_info(args["request_id"])
        if info is None:
            return {"ok": False, "error": f"no result with request_id {args['request_id']!r}"}
        return {"ok": True, "result": info}

    def render(self, reply):
        return kv_render(reply.get("result") or {})


class Verify(StoreRead):
    """Consistency check: results whose rows differ from total_trades, orphan rows, stale `receiving`."""

    name = "verify"
    timeout_s = 60.0

    def read(self, view, args, config):
        return {"ok": True, "problems": view.verify(config["gateway"]["assembly_timeout_s"])}

    def render(self, reply):
        probs = reply.get("problems", [])
        if not probs:
            return "no problems found"
        return table([[p.get("kind"), p.get("request_id"), p.get("detail")] for p in probs],
                     ["KIND", "REQUEST_ID", "DETAIL"])


class Results(StoreRead):
    """backtest_results rows, newest first: REQUEST_ID, STRATEGY, STATUS, TRADES, SOURCE, RECEIVED, AGE."""

    name = "results"
    arguments = (Arg("status", "one of " + ", ".join(ResultStatus), default=None, choices=tuple(ResultStatus),
                     help="only results with this status"),
                 Arg("strategy", "a strategy name", default=None, help="only this strategy's results"),
                 Arg("since", "Unix seconds", float, default=None, check=lambda v: v >= 0,
                     help="only results received at or after this time"),
                 Arg("limit", "a positive integer", int, default=100, check=_positive,
                     help="at most this many rows (default 100)"))

    def add_arguments(self, p):
        for a in self.arguments:
            if a.name == "since":
                p.add_argument("--since", type=parse_since, default=None,
                               help="received at or after: Unix seconds, an age (30m, 2h, 7d) or ISO 8601")
            else:
                a.add_to(p)

    def read(self, view, args, config):
        return {"ok": True, "results": view.results(args["status"], args["strategy"], args["since"],
                                                    args["limit"])}

    def render(self, reply):
        now = time.time()
        rows = []
        for r in reply.get("results", []):
            when = r.get("received_at") or r.get("completed_at") or r.get("updated_at")
            rows.append([r["request_id"], r["strategy_name"], r["status"], r["total_trades"], r.get("source"),
                         iso(when) if when else "-", fmt_age(now - when) if when else "-"])
        return table(rows, ["REQUEST_ID", "STRATEGY", "STATUS", "TRADES", "SOURCE", "RECEIVED", "AGE"])


# ----- the dead-letter queue: served by the dlq actor -------------------------------------------
class DlqList(Command):
    """Dead-letter items: ID, REQUEST_ID, STAGE, REASON, ATTEMPTS, AGE, BYTES, PARKED."""

    name = "dlq.list"
    owner = "dlq"
    arguments = (Arg("limit", "a positive integer", int, default=100, check=_positive),)

    def render(self, reply):
        now = time.time()
        rows = [[i["id"], i["request_id"], i["stage"], i["reason"], i["attempts"],
                 fmt_age(now - i["first_failed_at"]), i["bytes"], "yes" if i["parked"] else "no"]
                for i in reply.get("items", [])]
        return table(rows, ["ID", "REQUEST_ID", "STAGE", "REASON", "ATTEMPTS", "AGE", "BYTES", "PARKED"])


class DlqShow(Command):
    """One dead-letter item with its last error and a payload summary."""

    name = "dlq.show"
    owner = "dlq"
    arguments = (Arg("id", "an item id from dlq.list"),)

    def render(self, reply):
        return kv_render(reply.get("item") or {})


class DlqReplay(Command):
    """Replay one or all dead-letter items now, at a rate limit (items/s); progress in `inspect dlq`."""

    name = "dlq.replay"
    owner = "dlq"
    one_or_all = True
    arguments = (Arg("rate", "a positive number (items per second)", float, default=10.0, check=_positive,
                     help="items per second (default 10)"),)


class DlqPurge(Command):
    """Delete one or all dead-letter items for good (a `stored` promise is broken: needs --yes)."""

    name = "dlq.purge"
    owner = "dlq"
    one_or_all = True
    timeout_s = 30.0

    def add_arguments(self, p):
        super().add_arguments(p)
        p.add_argument("--yes", action="store_true", help="confirm: the data is gone for good")

    def refuse(self, ns):
        if not ns.yes:
            return "dlq.purge deletes data that pairlane promised to store; add --yes to confirm"
        return None


# ----- pairs and metrics ------------------------------------------------------------------------
class Pairs(Command):
    """Pair slots, candidates, exclusions by reason, safe stop and data age."""

    name = "pairs"
    owner = "pairs"

    def render(self, reply):
        age = reply.get("newest_result_age_s")
        out = [f"safe_stop: {fmt_value(reply.get('safe_stop'))}   candidates: {fmt_value(reply.get('candidates'))}   "
               f"newest_result_age: {'-' if age is None else fmt_age(age)}"]
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
    timeout_s = 60.0


class Metrics(Command):
    """The figures of /metrics as a map."""

    name = "metrics"
    owner = "metrics"

    def render(self, reply):
        return kv_render(reply.get("metrics", {}))


class Alerts(Command):
    """The raised alerts: NAME, SEVERITY, SINCE (UTC), AGE, REASONS."""

    name = "alerts"
    owner = "metrics"

    def render(self, reply):
        now = time.time()
        rows = [[a["name"], a["severity"],
                 time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(a["since"])) if a.get("since") else "",
                 f"{max(0.0, now - a['since']):.0f}s" if a.get("since") else "",
                 " ".join(f"{k}={v}" for k, v in (a.get("reasons") or {}).items())]
                for a in reply.get("alerts", [])]
        if not rows:
            return "no alert raised"
        return table(rows, ["NAME", "SEVERITY", "SINCE", "AGE", "REASONS"])


COMMANDS: dict[str, Command] = {c.name: c for c in (
    Status(), Inspect(), Restart(), Inject(), Stop(), Result(), Results(), Verify(), DlqList(), DlqShow(),
    DlqReplay(), DlqPurge(), Pairs(), PairsEvaluate(), Metrics(), Alerts(), Help())}


def lookup(name: Any) -> Command:
    """The command named `name`; CommandError (the reply text) if there is none."""
    cmd = COMMANDS.get(name) if isinstance(name, str) else None
    if cmd is None:
        raise CommandError(f"unknown command {name!r}; try `help`")
    return cmd
