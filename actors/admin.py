"""The admin actor: ZMQ REP endpoint for operators (PROTOCOL.md section 4).

Owns: the admin socket, the token check, one request at a time (REP), and dispatching each
command through the registry `pairlane.admin_commands.COMMANDS`: the command's args are
checked there, then it runs where its `owner` says. Commands owned by "admin" run here:
supervision commands (status, inspect, restart, inject, stop, help) with the root
supervisor, and the store reads (`result`, `verify`) on a read-only `StoreView` in a reader
thread (one snapshot each; the socket loop and the heartbeats go on meanwhile, and a read
past its deadline is interrupted). Other commands go as `AdminCommand` to their owner actor,
which runs them with `serve_admin`. Every request to another actor carries a correlation id
(`supervision.requests`); one that is not answered in time gets the operator an error reply,
never a hung CLI. Never writes the database.
"""
from __future__ import annotations

import collections
import socket
import threading
from typing import Any, Callable

import msgpack
import zmq

from pairlane.admin_commands import COMMANDS, CommandError, StoreRead, lookup
from pairlane.store import StoreError
from pairlane.stores import backend, open_view
from pairlane.supervision.messages import (InjectFault, InspectReply, InspectRequest, RestartChild,
                                  StatusReply, StatusRequest, StopDaemon)
from pairlane.supervision.requests import Requests

from .base import PairlaneActor
from .messages import AdminCommand, AdminReply
from .zap import curve_server

MAX_REQUEST_BYTES = 65536
# An action that ends this process (stop, restart or a fault of the admin itself) runs this
# long after its reply: ZMQ sends from a background thread, and os._exit or the socket's
# close would otherwise drop the reply the operator is waiting for.
REPLY_FLUSH_S = 0.2
READ_POLL_S = 0.02   # how often a store read in the reader thread is checked for its end
Respond = Callable[[dict], None]


def serve_admin(actor: PairlaneActor, msg: AdminCommand, sender: Any) -> None:
    """Run an AdminCommand in its owner actor: the actor's method named by the command's
    `handler`, called as handler(args, respond). It returns the reply map, or None when it
    will call respond(reply) itself later (exactly once)."""
    def respond(reply: dict) -> None:
        actor.send(sender, AdminReply(msg.token, reply))

    cmd = COMMANDS.get(msg.cmd)
    handler = getattr(actor, cmd.handler, None) if cmd is not None and cmd.owner == actor.name else None
    if handler is None:
        return respond({"ok": False, "error": f"{actor.name} does not serve {msg.cmd!r}"})
    reply = handler(msg.args, respond)
    if reply is not None:
        respond(reply)


class Admin(PairlaneActor):
    def on_start(self) -> None:
        a = self.config["admin"]
        # CURVE (section 7): the ZAP handler is bound before the REP socket; the token is still required
        self.zap, secure = curve_server(self, "admin", a["curve_secret_key"], a["curve_authorized_keys"])
        self.sock = self.bind_socket(zmq.REP, a["endpoint"], MAXMSGSIZE=MAX_REQUEST_BYTES, **secure)
        if self.zap:
            self.zap.watch(self.sock)
        self.token_required = self.config["admin"]["token"]
        self.busy = False          # a request was received and is not answered yet (REP)
        self.requests = Requests(self)
        self.served = 0
        self.errors = 0
        self.deferred: collections.deque = collections.deque()  # actions due REPLY_FLUSH_S after their reply
        self.view = open_view(self.config)
        self.reads: dict[int, dict] = {}   # correlation id -> {"done": Event, "reply": dict}
        self.after(0.1, "poll")

    def on_stop(self) -> None:
        self.view.interrupt()
        super().on_stop()

    def watch_fds(self) -> list:
        zap = self.zap.fds if self.zap and not self._stopping else []
        return zap + ([] if self.busy or self._stopping else [self.sock.FD])

    def on_reload(self, old_config: dict, new_config: dict) -> None:
        if self.zap:  # the authorized keys directory is re-read on every SIGHUP
            self.zap.reload_keys()

    def inspect(self) -> dict:
        waiting = self.requests.waiting_on()
        return {"requests_served": self.served, "errors": self.errors,
                "waiting_on": waiting[0] if waiting else None, "requests": self.requests.stats()}

    # ----- socket -----------------------------------------------------------------------------
    def on_readable(self, fds) -> None:
        self._drain()

    def on_timer(self, payload) -> None:
        if self.requests.on_timer(payload):
            return
        if payload == "poll":
            if not self._stopping:
                self._drain()
                self.after(0.1, "poll")
        elif payload == "deferred":
            if self.deferred:
                self.deferred.popleft()()
        elif isinstance(payload, tuple) and payload[0] == "read":
            self._read_done(payload[1])

    def _drain(self) -> None:
        if self.zap:
            self.zap.drain()
        while not self.busy and not self._stopping and self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.busy = True
            self._handle(frames)

    def _reply(self, reply: dict, after: Callable[[], None] | None = None, defer: bool = False) -> None:
        if not self.busy:  # never a second reply to one REP request
            self.log("WARNING", "admin_reply_dropped", reply=str(reply)[:200])
            return
        self.busy = False
        if not reply.get("ok"):
            self.errors += 1
        self.served += 1
        try:
            self.sock.send(msgpack.packb(reply, use_bin_type=True, default=str))
        except zmq.ZMQError as exc:
            self.log("WARNING", "admin_reply_failed", error=exc)
        if after and defer:
            self.deferred.append(after)
            self.after(REPLY_FLUSH_S, "deferred")
        elif after:
            after()

    def _error(self, text: str) -> None:
        self._reply({"ok": False, "error": text})

    def _ask(self, addr, build: Callable[[int], Any], what: str, timeout_s: float,
             on_reply: Callable[[Any], None]) -> None:
        """Ask another actor; its reply goes to on_reply, or the operator gets an error at the deadline."""
        self.requests.ask(addr, build, what, timeout_s, on_reply,
                          lambda: self._error(f"{what} did not answer within {timeout_s:g} s "
                                              f"(hung or restarting; try again, or `admin status`)"))

    # ----- commands ---------------------------------------------------------------------------
    def _handle(self, frames: list) -> None:
        if len(frames) != 1:
            return self._error("malformed: one frame holding a msgpack map expected")
        try:
            req = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
        except Exception:
            return self._error("malformed: not msgpack")
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return self._error("malformed: expected {\"cmd\": str, \"args\": {...}}")
        if self.token_required and req.get("token") != self.token_required:
            self.metrics.inc("pairlane_auth_failures_total", endpoint="admin", reason="bad_token")
            return self._error("unauthorized: missing or wrong admin token")
        try:
            cmd = lookup(req["cmd"])
            args = cmd.validate(req.get("args") or {})
        except CommandError as exc:
            return self._error(str(exc))
        self.log("DEBUG", "admin_command", cmd=cmd.name)
        if isinstance(cmd, StoreRead):
            return self._read(cmd, args)
        if cmd.owner == "admin":
            reply = getattr(self, cmd.handler)(args, self._reply)
            if reply is not None:
                self._reply(reply)
            return None
        addr = self.peer(cmd.owner)
        if addr is None:
            return self._error(f"command {cmd.name!r} is not available: actor {cmd.owner!r} is not running")
        self._ask(addr, lambda cid: AdminCommand(cid, cmd.name, args), cmd.owner, cmd.timeout_s,
                  lambda msg: self._reply(msg.reply))

    def admin_help(self, args: dict, respond: Respond) -> dict:
        return {"ok": True, "commands": sorted(COMMANDS)}

    def admin_status(self, args: dict, respond: Respond) -> dict | None:
        root = self.peer("root")
        if root is None:
            return {"ok": False, "error": "root supervisor unknown"}

        def status(msg: StatusReply) -> None:
            actors = [{k: v for k, v in r.items() if k != "is_supervisor"} for r in msg.rows]
            reply = {"ok": True, "ready": msg.ready, "daemon": self.daemon_identity(),
                     "pairs_leader": True, "actors": actors}   # SQLite: one daemon, it evaluates pairs
            pairs = self.peer("pairs")
            if backend(self.config) != "postgresql":
                return respond(reply)
            if pairs is None:   # several daemons may share the store: no pairs actor, no leader here
                return respond(dict(reply, pairs_leader=False))
            # the pairs actor holds (or not) the pair-leader lock in PostgreSQL
            self._ask(pairs, InspectRequest, "pairs", COMMANDS["status"].timeout_s,
                      lambda m: respond(dict(reply, pairs_leader=bool(m.state.get("leader", False)))))
        self._ask(root, StatusRequest, "root supervisor", COMMANDS["status"].timeout_s, status)
        return None

    def daemon_identity(self) -> dict:
        """PROTOCOL.md section 7's `daemon` block of `status`: name, host, main pid, store backend."""
        return {"name": self.config["daemon"]["name"], "host": socket.gethostname(),
                "pid": self.main_pid, "store": backend(self.config)}

    def admin_inspect(self, args: dict, respond: Respond) -> dict | None:
        name = args["actor"]
        if name == self.name:
            return {"ok": True, "actor": name, "state": self.inspect()}
        addr = self.peer(name)
        if addr is None:
            return {"ok": False, "error": f"no running actor named {name!r}"}
        self._ask(addr, InspectRequest, name, COMMANDS["inspect"].timeout_s,
                  lambda msg: respond({"ok": True, "actor": msg.name, "state": msg.state}))
        return None

    def admin_restart(self, args: dict, respond: Respond) -> dict | None:
        name = args["actor"]
        if name not in self.directory:
            return {"ok": False, "error": f"no running actor named {name!r}"}
        self._reply({"ok": True, "restarting": name},
                    after=lambda: self.tell("root", RestartChild(name)), defer=name == self.name)
        return None

    def admin_inject(self, args: dict, respond: Respond) -> dict | None:
        if not self.config["admin"]["allow_fault_injection"]:
            return {"ok": False, "error": "fault injection is disabled (set admin.allow_fault_injection = true)"}
        name, fault = args["actor"], args["fault"]
        # itself: its own entry reaches its directory only after its (re)start is registered
        addr = self.myAddress if name == self.name else self.peer(name)
        if addr is None:
            return {"ok": False, "error": f"no running actor named {name!r}"}
        self._reply({"ok": True, "injected": fault, "actor": name},
                    after=lambda: self.send(addr, InjectFault(fault)), defer=name == self.name)
        return None

    def admin_stop(self, args: dict, respond: Respond) -> None:
        self._reply({"ok": True, "stopping": True},
                    after=lambda: self.tell("root", StopDaemon("admin stop")), defer=True)

    # ----- store reads, off the socket loop ----------------------------------------------------
    def _read(self, cmd: StoreRead, args: dict) -> None:
        """Run cmd.read on the view in a reader thread; its reply (or a timeout error, the read
        interrupted) answers the operator."""
        def timed_out() -> None:
            self.reads.pop(cid, None)
            self.view.interrupt()
            self._error(f"{cmd.name} did not finish within {cmd.timeout_s:g} s (database busy or "
                        f"large; try again)")

        cid = self.requests.expect(cmd.name, cmd.timeout_s, self._reply, timed_out)
        slot = self.reads[cid] = {"done": threading.Event(), "reply": None}

        def run() -> None:
            try:
                if not self.view.open():
                    slot["reply"] = {"ok": False, "error": "the database does not exist yet"}
                else:
                    slot["reply"] = cmd.read(self.view, args, self.config)
            except StoreError as exc:
                slot["reply"] = {"ok": False, "error": f"database unavailable: {exc}"}
            except Exception as exc:  # noqa: BLE001 - the operator gets it, the actor lives on
                slot["reply"] = {"ok": False, "error": f"{cmd.name} failed: {type(exc).__name__}: {exc}"}
            slot["done"].set()

        threading.Thread(target=run, name=f"admin-{cmd.name}", daemon=True).start()
        self.after(READ_POLL_S, ("read", cid))

    def _read_done(self, cid: int) -> None:
        slot = self.reads.get(cid)
        if slot is None:
            return  # timed out already
        if not slot["done"].is_set():
            self.after(READ_POLL_S, ("read", cid))
            return
        del self.reads[cid]
        self.requests.answer(cid, slot["reply"])

    # ----- replies from actors ------------------------------------------------------------
    def on_message(self, msg, sender) -> None:
        if isinstance(msg, (StatusReply, InspectReply, AdminReply)):
            self.requests.answer(msg.token, msg)
