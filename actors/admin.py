"""The admin actor: ZMQ REP endpoint for operators (PROTOCOL.md section 4).

Owns: the admin socket, the token check, one request at a time (REP), and
routing each command to the actor that owns the figures: supervision
commands (status, inspect, restart, inject, stop) are served here with the
root supervisor; data commands are forwarded as `AdminCommand` to their
owner. An actor that does not answer in time gets the operator an error
reply, never a hung CLI. Never reads the database itself.
"""
from __future__ import annotations

import itertools
import time

import msgpack
import zmq

from supervision.messages import (InjectFault, InspectReply, InspectRequest, RestartChild,
                                  StatusReply, StatusRequest, StopDaemon)

from .base import PairlaneActor
from .messages import AdminCommand, AdminReply

# command -> actor that executes it (daemon side); absent actor -> clear error
ROUTES = {
    "result": "pairs", "verify": "pairs",   # read-only views: never stall the writer
    "dlq.list": "dlq", "dlq.show": "dlq", "dlq.replay": "dlq", "dlq.purge": "dlq",
    "pairs": "pairs", "pairs.evaluate": "pairs",
    "metrics": "metrics",
}
LOCAL = ("status", "inspect", "restart", "inject", "stop", "help")
SLOW = {"pairs.evaluate": 60.0, "verify": 60.0, "dlq.purge": 30.0}
FAULTS = ("crash", "hang", "exit")
MAX_REQUEST_BYTES = 65536
# An action that ends this process (stop, restart or a fault of the admin itself) runs this
# long after its reply: ZMQ sends from a background thread, and os._exit or the socket's
# close would otherwise drop the reply the operator is waiting for.
REPLY_FLUSH_S = 0.2


class Admin(PairlaneActor):
    def on_start(self) -> None:
        self.sock = self.bind_socket(zmq.REP, self.config["admin"]["endpoint"], MAXMSGSIZE=MAX_REQUEST_BYTES)
        self.token_required = self.config["admin"]["token"]
        self.pending = None  # (token, deadline, after_reply)
        self.tokens = itertools.count(1)
        self.served = 0
        self.errors = 0
        self.deferred: dict = {}  # key -> action to run REPLY_FLUSH_S after its reply
        self.after(0.1, "poll")

    def watch_fds(self) -> list:
        return [] if self.pending or self._stopping else [self.sock.FD]

    def inspect(self) -> dict:
        return {"requests_served": self.served, "errors": self.errors,
                "waiting_on": self.pending[3] if self.pending else None}

    # ----- socket -----------------------------------------------------------------------------
    def on_readable(self, fds) -> None:
        self._drain()

    def on_timer(self, payload) -> None:
        if payload == "poll":
            if not self._stopping:
                self._drain()
                self.after(0.1, "poll")
        elif isinstance(payload, tuple) and payload[0] == "deferred":
            action = self.deferred.pop(payload[1], None)
            if action is not None:
                action()
        elif isinstance(payload, tuple) and payload[0] == "timeout":
            if self.pending and self.pending[0] == payload[1]:
                what = self.pending[3]
                self._reply({"ok": False, "error": f"{what} did not answer within {payload[2]:g} s "
                                                   f"(hung or restarting; try again, or `admin status`)"})

    def _drain(self) -> None:
        while self.pending is None and not self._stopping and self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(frames)

    def _reply(self, reply: dict, after=None, defer: bool = False) -> None:
        self.pending = None
        if not reply.get("ok"):
            self.errors += 1
        self.served += 1
        try:
            self.sock.send(msgpack.packb(reply, use_bin_type=True, default=str))
        except zmq.ZMQError as exc:
            self.log("WARNING", "admin_reply_failed", error=exc)
        if after and defer:
            key = next(self.tokens)
            self.deferred[key] = after
            self.after(REPLY_FLUSH_S, ("deferred", key))
        elif after:
            after()

    def _await(self, what: str, timeout: float) -> int:
        token = next(self.tokens)
        self.pending = (token, time.monotonic() + timeout, None, what)
        self.after(timeout, ("timeout", token, timeout))
        return token

    # ----- commands ---------------------------------------------------------------------------
    def _handle(self, frames: list) -> None:
        if len(frames) != 1:
            return self._reply({"ok": False, "error": "malformed: one frame holding a msgpack map expected"})
        try:
            req = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
        except Exception:
            return self._reply({"ok": False, "error": "malformed: not msgpack"})
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return self._reply({"ok": False, "error": "malformed: expected {\"cmd\": str, \"args\": {...}}"})
        if self.token_required and req.get("token") != self.token_required:
            return self._reply({"ok": False, "error": "unauthorized: missing or wrong admin token"})
        cmd = req["cmd"]
        args = req.get("args") or {}
        if not isinstance(args, dict):
            return self._reply({"ok": False, "error": "malformed: args must be a map"})
        self.log("DEBUG", "admin_command", cmd=cmd)
        if cmd in LOCAL:
            return getattr(self, "_cmd_" + cmd)(args)
        owner = ROUTES.get(cmd)
        if owner is None:
            return self._reply({"ok": False, "error": f"unknown command {cmd!r}; try `help`"})
        addr = self.peer(owner)
        if addr is None:
            return self._reply({"ok": False, "error": f"command {cmd!r} is not available: actor "
                                                      f"{owner!r} is not running"})
        token = self._await(owner, SLOW.get(cmd, 10.0))
        self.send(addr, AdminCommand(token, cmd, args))

    def _cmd_help(self, args) -> None:
        self._reply({"ok": True, "commands": sorted(list(LOCAL) + list(ROUTES))})

    def _cmd_status(self, args) -> None:
        root = self.peer("root")
        if root is None:
            return self._reply({"ok": False, "error": "root supervisor unknown"})
        token = self._await("root supervisor", 5.0)
        self.send(root, StatusRequest(token))

    def _cmd_inspect(self, args) -> None:
        name = args.get("actor")
        if not isinstance(name, str):
            return self._reply({"ok": False, "error": "inspect needs args.actor (an actor name)"})
        if name == self.name:
            state = self.inspect()
            return self._reply({"ok": True, "actor": name, "state": state})
        addr = self.peer(name)
        if addr is None:
            return self._reply({"ok": False, "error": f"no running actor named {name!r}"})
        token = self._await(name, 5.0)
        self.send(addr, InspectRequest(token))

    def _cmd_restart(self, args) -> None:
        name = args.get("actor")
        if not isinstance(name, str) or name == "root":
            return self._reply({"ok": False, "error": "restart needs args.actor (an actor below the root)"})
        if name not in self.directory:
            return self._reply({"ok": False, "error": f"no running actor named {name!r}"})
        self._reply({"ok": True, "restarting": name},
                    after=lambda: self.tell("root", RestartChild(name)), defer=name == self.name)

    def _cmd_inject(self, args) -> None:
        if not self.config["admin"]["allow_fault_injection"]:
            return self._reply({"ok": False, "error": "fault injection is disabled "
                                                      "(set admin.allow_fault_injection = true)"})
        name, fault = args.get("actor"), args.get("fault")
        if fault not in FAULTS:
            return self._reply({"ok": False, "error": f"inject needs args.fault, one of {', '.join(FAULTS)}"})
        # itself: its own entry reaches its directory only after its (re)start is registered
        addr = self.myAddress if name == self.name else self.peer(name) if isinstance(name, str) else None
        if addr is None:
            return self._reply({"ok": False, "error": f"no running actor named {name!r}"})
        self._reply({"ok": True, "injected": fault, "actor": name},
                    after=lambda: self.send(addr, InjectFault(fault)), defer=name == self.name)

    def _cmd_stop(self, args) -> None:
        self._reply({"ok": True, "stopping": True},
                    after=lambda: self.tell("root", StopDaemon("admin stop")), defer=True)

    # ----- replies from actors ------------------------------------------------------------
    def on_message(self, msg, sender) -> None:
        if isinstance(msg, StatusReply):
            if self.pending and self.pending[0] == msg.token:
                actors = [{k: v for k, v in r.items() if k != "is_supervisor"} for r in msg.rows]
                self._reply({"ok": True, "ready": msg.ready, "actors": actors})
        elif isinstance(msg, InspectReply):
            if self.pending and self.pending[0] == msg.token:
                self._reply({"ok": True, "actor": msg.name, "state": msg.state})
        elif isinstance(msg, AdminReply):
            if self.pending and self.pending[0] == msg.token:
                self._reply(msg.reply)
