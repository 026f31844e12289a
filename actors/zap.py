"""The ZAP handler of one actor's socket: CURVE keys for the gateway and admin, the legacy allowlist.

Owns: the REP socket on `inproc://zeromq.zap.01` in the actor's own ZMQ context (every
socket-owning actor is its own process, so each has its own context and handler), bound
before the served socket so no connection is ever accepted unauthenticated; answering its
requests from the actor's loop (its FD is watched like the served socket's, drained
edge-triggered); logging and counting each refusal once per key or address
(`pairlane_auth_failures_total{endpoint,reason}`); re-reading the authorized keys directory
on SIGHUP. The decisions themselves are pairlane.zap's. Never blocks, never uses a thread.
"""
from __future__ import annotations

import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from pairlane.zap import (HandshakeLog, ZapPolicy, handshake_reason, load_authorized, load_secret_certificate,
                          parse_allowlist)

from .base import PairlaneActor

ZAP_ENDPOINT = "inproc://zeromq.zap.01"


class ZapHandler:
    def __init__(self, actor: PairlaneActor, label: str, policy: ZapPolicy, keys_dir: str = ""):
        self.actor = actor
        self.label = label
        self.policy = policy
        self.keys_dir = keys_dir
        self.sock = zmq.Context.instance().socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)
        actor._sockets.append(self.sock)   # closed with the actor's other sockets on stop
        self.allowed = 0
        self.refused = 0
        self.handshakes_failed = 0
        self.monitor: zmq.Socket | None = None
        self.handshake_log = HandshakeLog()

    def watch(self, served: zmq.Socket) -> None:
        """Also report handshakes of `served` that fail before ZAP is asked (a plaintext client on a
        CURVE socket, a client using another server key): they carry no key, so each is counted and
        they are logged at most once a minute per reason."""
        self.monitor = served.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                                 | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self.actor._sockets.append(self.monitor)

    @property
    def fds(self) -> list:
        return [self.sock.FD] + ([self.monitor.FD] if self.monitor is not None else [])

    def drain(self) -> None:
        """Answer every waiting ZAP request and read the monitor's events."""
        self._drain_zap()
        if self.monitor is not None:
            self._drain_monitor()

    def _drain_monitor(self) -> None:
        while self.monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            value = int(event["value"]) if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL else 0
            reason = handshake_reason(value)
            self.handshakes_failed += 1
            self.actor.metrics.inc("pairlane_auth_failures_total", endpoint=self.label, reason=reason)
            n = self.handshake_log.failed(reason, time.monotonic())
            if n:
                self.actor.log("WARNING", "auth_handshake_failed", endpoint=self.label, reason=reason,
                               failures=n, detail="a client without CURVE or with another server key; "
                               "no reply is sent; logged at most once a minute")

    def _drain_zap(self) -> None:
        """Answer every waiting ZAP request (the FD is edge-triggered: check EVENTS again each time)."""
        while self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            reply, refusal = self.policy.decide(frames)
            try:
                self.sock.send_multipart(reply, zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                self.actor.log("WARNING", "zap_reply_failed", endpoint=self.label, error=exc)
            if refusal is None:
                self.allowed += 1
                continue
            self.refused += 1
            if refusal.first:
                self.actor.log("WARNING", "auth_refused", endpoint=self.label, reason=refusal.reason,
                               peer=refusal.who, detail="no reply is sent; further refusals of this "
                               "peer are not logged again")
                self.actor.metrics.inc("pairlane_auth_failures_total", endpoint=self.label,
                                       reason=refusal.reason)

    def reload_keys(self) -> None:
        """Re-read the authorized keys directory (SIGHUP); on an error keep the keys in force."""
        if not self.keys_dir:
            return
        try:
            keys = load_authorized(self.keys_dir)
        except ValueError as exc:
            self.actor.log("ERROR", "auth_keys_reload_failed", endpoint=self.label, error=str(exc),
                           kept=len(self.policy.keys))
            return
        self.policy.set_keys(keys)
        self.actor.log("INFO", "auth_keys_loaded", endpoint=self.label, keys=len(keys), directory=self.keys_dir)

    def inspect(self) -> dict:
        return {"mechanism": self.policy.mechanism, "allowed": self.allowed, "refused": self.refused,
                "handshakes_failed": self.handshakes_failed,
                "authorized_keys": len(self.policy.keys), "allow": sorted(self.policy.addresses)}


def curve_server(actor: PairlaneActor, label: str, secret_path: str, keys_dir: str) -> tuple[ZapHandler | None, dict]:
    """(handler, socket options) for a socket named `label` whose CURVE keys are configured;
    (None, {}) when `secret_path` is empty (plain loopback socket, as before). Call
    `handler.watch(socket)` once the socket exists."""
    if not secret_path:
        return None, {}
    _public, secret = load_secret_certificate(secret_path)
    policy = ZapPolicy("CURVE", keys=load_authorized(keys_dir))
    handler = ZapHandler(actor, label, policy, keys_dir)
    actor.log("INFO", "auth_keys_loaded", endpoint=label, keys=len(policy.keys), directory=keys_dir)
    return handler, {"CURVE_SECRETKEY": secret, "CURVE_SERVER": 1, "ZAP_DOMAIN": label.encode()}


def address_filter(actor: PairlaneActor, label: str, allow: list) -> tuple[ZapHandler | None, dict]:
    """(handler, socket options) for a NULL-mechanism socket restricted to `allow` (IP addresses);
    (None, {}) when the list is empty."""
    if not allow:
        return None, {}
    handler = ZapHandler(actor, label, ZapPolicy("NULL", addresses=parse_allowlist(allow)))
    return handler, {"ZAP_DOMAIN": label.encode()}
