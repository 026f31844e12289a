"""The gateway actor: ZMQ ROUTER for producers (PROTOCOL.md section 1).

Owns: the producer socket, frame-level validation (size cap, msgpack map,
field types, request_id charset -> `too_large` / `malformed` answered at
once), column validation (result to `bad_chunk` at once; chunk verdicts go
with the chunk to the assembler, which answers unknown_request first), the
per-request and total in-flight caps (`busy`), and sending the assembler's
replies. One producer's bad input never affects another. Never decides
anything about a request's lifecycle and never touches the database.
"""
from __future__ import annotations

import secrets
import time

import zmq

from pairlane import codec
from pairlane.lifecycle import BULK_ROWS, INFLIGHT_TIMEOUT_S
from pairlane.stored_replies import StoredReplies

from .base import PairlaneActor
from .messages import DirectOpen, DirectWrite, Inbound, InboundBatch, Outbound
from .zap import curve_server

DRAIN_BATCH = 64
# a frame forwarded this long ago and never released is presumed lost between the actors (with its
# receiver's restart; or on Thespian, for an actor without a lane, under load): stop counting it against the caps. Later
# than the assembler's own safety net (INFLIGHT_TIMEOUT_S), which normally releases first.
LOST_AFTER_S = INFLIGHT_TIMEOUT_S + 30.0
SWEEP_EVERY_S = 5.0


class Gateway(PairlaneActor):
    def on_start(self) -> None:
        g = self.config["gateway"]
        self.limits = codec.Limits(g["max_message_bytes"], g["max_result_trades"], g["max_chunk_rows"])
        self.credit = g["credit"]
        self.max_inflight_bytes = g["max_inflight_bytes"]
        # CURVE (section 7): the ZAP handler is bound before the ROUTER, so nothing is accepted unchecked
        self.zap, secure = curve_server(self, "gateway", g["curve_secret_key"], g["curve_authorized_keys"])
        # MAXMSGSIZE: ZMQ's hard cap, well above ours (frames up to 4x get a `too_large` answer)
        self.sock = self.bind_socket(zmq.ROUTER, g["endpoint"], MAXMSGSIZE=4 * g["max_message_bytes"] + 4096,
                                     RCVHWM=256, SNDHWM=10000, **secure)
        if self.zap:
            self.zap.watch(self.sock)
        self.pending: dict[tuple, int] = {}       # (request_id, seq) -> bytes forwarded, not yet resolved
        self.per_request: dict[str, int] = {}     # request_id -> chunks forwarded, not yet resolved
        self.pending_since: dict[tuple, float] = {}  # (request_id, seq) -> monotonic time forwarded
        self.inflight_bytes = 0
        self.presumed_lost = 0
        self.stored = StoredReplies()              # results just stored: their `end` is answered here
        self._next_sweep = time.monotonic() + SWEEP_EVERY_S
        self.assembler = self.peer("assembler")
        self.writer = self.peer("writer")
        # the direct path (pairlane.lifecycle.Forwarded): every batch forwarded to the assembler is
        # marked (token, count); a new small result goes straight to the writer while the assembler's
        # last DirectOpen named our latest mark
        self.token = secrets.token_hex(4)
        self.forwards = 0
        self.direct_mark: tuple | None = None
        self.direct_keys: set = set()              # in-flight keys of results sent straight
        self.stats = {"messages": 0, "bytes": 0, "errors": 0, "forwarded": 0, "replies": 0, "direct": 0}
        # Inbounds of this drain, sent to the assembler as one message at its end (or once they hold
        # max_message_bytes: an inter-actor message never carries more than one chunk's worth)
        self.forward: list = []
        self.forward_bytes = 0
        self.after(0.05, "poll")

    def watch_fds(self) -> list:
        return [self.sock.FD] + (self.zap.fds if self.zap else [])

    def on_reload(self, old_config: dict, new_config: dict) -> None:
        if self.zap:  # the authorized keys directory is re-read on every SIGHUP
            self.zap.reload_keys()

    def on_directory(self) -> None:
        addr = self.peer("assembler")
        if addr != self.assembler:
            # a restarted assembler forgot what was in flight: so do we
            self.assembler = addr
            self.pending.clear()
            self.pending_since.clear()
            self.per_request.clear()
            self.direct_keys.clear()
            self.inflight_bytes = 0
            self.forwards, self.direct_mark = 0, None
        writer = self.peer("writer")
        if writer != self.writer:
            # a restarted writer was never armed; what we sent the old one straight is lost with it
            # (its producers resend), as the assembler's chunks in flight there are
            self.writer, self.direct_mark = writer, None
            for key in list(self.direct_keys):
                self._release(key)

    def inspect(self) -> dict:
        return dict(self.stats, requests_in_flight=len(self.per_request), presumed_lost=self.presumed_lost,
                    direct_open=self.direct_mark is not None and self.direct_mark == (self.token, self.forwards),
                    ends_answered_here=self.stored.answered,
                    chunks_in_flight=len(self.pending), bytes_in_flight=self.inflight_bytes,
                    endpoint=self.config["gateway"]["endpoint"],
                    auth=self.zap.inspect() if self.zap else None)

    # ----- receiving ---------------------------------------------------------------------------
    def on_readable(self, fds) -> None:
        self._drain()

    def on_timer(self, payload) -> None:
        if payload == "poll":
            self._drain()
            now = time.monotonic()
            if now >= self._next_sweep:
                self._next_sweep = now + SWEEP_EVERY_S
                self.sweep_lost(now)
            if not self._stopping:
                self.after(0.05, "poll")
        elif payload == "drain":
            self._drain()

    def _drain(self) -> None:
        if self.zap:
            self.zap.drain()
        n = 0
        while not self._stopping and self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            self._handle(frames[0], frames[1:])
            n += 1
            if n >= DRAIN_BATCH:  # let heartbeats and replies through, then go on
                self.after(0, "drain")
                break
        self._forward()

    def _forward(self) -> None:
        if self.forward:
            self.forwards += 1
            self.send_ordered(self.assembler, InboundBatch(tuple(self.forward), (self.token, self.forwards)))
        self.forward = []
        self.forward_bytes = 0

    def _error(self, identity: bytes, err: codec.ProtocolError) -> None:
        self.stats["errors"] += 1
        self.metrics.inc("pairlane_errors_total", code=err.code)
        self._send(identity, err.reply())

    def _send(self, identity: bytes, reply: dict) -> None:
        try:
            self.sock.send_multipart([identity, codec.pack(reply)], zmq.NOBLOCK)
            self.stats["replies"] += 1
        except zmq.ZMQError:
            pass  # peer gone or its queue is full: it will resend `begin`

    def _handle(self, identity: bytes, frames: list) -> None:
        size = sum(len(f) for f in frames)
        self.stats["messages"] += 1
        self.stats["bytes"] += size
        self.metrics.inc("pairlane_ingest_bytes_total", size)
        try:
            m = codec.decode_frame(frames, self.limits)
        except codec.ProtocolError as err:
            self.metrics.inc("pairlane_ingest_messages_total", type="invalid")
            return self._error(identity, err)
        t = m["type"]
        self.metrics.inc("pairlane_ingest_messages_total", type=t)
        raw = None
        nrows = 0
        bad = None
        if t in ("chunk", "result", "live_trades"):
            try:
                nrows = codec.check_columns(m["trades"], m["request_id"], live=(t == "live_trades"))
            except codec.ProtocolError as err:
                if t != "chunk":
                    return self._error(identity, err)
                bad = (err.code, err.message)
            if nrows > self.limits.max_chunk_rows:
                return self._error(identity, codec.ProtocolError(
                    "too_large", f"{nrows} rows in one message exceed gateway.max_chunk_rows = "
                    f"{self.limits.max_chunk_rows}; split it into more chunks", m["request_id"]))
            del m["trades"]
            raw = frames[0]
            if t == "result" and nrows != m["total_trades"]:
                # answered by the assembler after its conflict checks (conflict comes before incomplete)
                bad = ("incomplete", f"result has {nrows} rows, total_trades is {m['total_trades']}; "
                                     "nothing was stored")
                raw = None
        if t == "end":
            # stored for good, and nothing of this request still at the assembler whose answer this
            # one could overtake: the assembler would say the same, one hop later
            reply = self.stored.reply_for_end(m["request_id"]) if m["request_id"] not in self.per_request else None
            if reply is not None:
                return self._send(identity, reply)
        elif "request_id" in m:
            self.stored.forget(m["request_id"])   # its answer must not be overtaken by an `end`'s
        if self.assembler is None:
            return self._error(identity, codec.ProtocolError(
                "unavailable", "pairlane is restarting its assembler; retry shortly", m["request_id"], 1.0))
        if raw is not None and bad is None:
            rid = m["request_id"]
            # the key the lifecycle releases: a chunk's (validated) seq, 0 for a result, -1 for a live
            # batch; never a result's own "seq" key (unknown keys are ignored: it may be anything)
            key = (rid, m["seq"] if t == "chunk" else 0 if t == "result" else -1)
            if key not in self.pending:
                if self.per_request.get(rid, 0) >= 2 * self.credit:
                    return self._error(identity, codec.ProtocolError(
                        "busy", f"request {rid} has {self.per_request[rid]} chunks in flight, over its "
                        f"credit window of {self.credit}; wait for credit", rid, 0.5))
                if self.inflight_bytes + len(raw) > self.max_inflight_bytes:
                    return self._error(identity, codec.ProtocolError(
                        "busy", f"{self.inflight_bytes} bytes in flight, at the cap of "
                        f"{self.max_inflight_bytes} (gateway.max_inflight_bytes)", rid, 0.5))
                self.pending[key] = len(raw)
                self.pending_since[key] = time.monotonic()
                self.per_request[rid] = self.per_request.get(rid, 0) + 1
                self.inflight_bytes += len(raw)
        inb = Inbound(identity, m, raw, nrows, bad, time.time())
        if (t == "result" and raw is not None and bad is None and nrows <= BULK_ROWS and not self.forward
                and self.direct_mark == (self.token, self.forwards) and self.writer is not None
                and int(m.get("total_chunks") or 1) == 1):
            # nothing of ours waits at the assembler since it opened the direct path: straight to the writer
            self.stats["direct"] += 1
            self.direct_keys.add(key)
            return self.send_ordered(self.writer, DirectWrite(inb, self.direct_mark))
        self.stats["forwarded"] += 1
        if raw is not None and self.forward_bytes + len(raw) > self.limits.max_message_bytes:
            self._forward()
        self.forward.append(inb)
        self.forward_bytes += len(raw) if raw is not None else 0

    def sweep_lost(self, now: float) -> list[tuple]:
        """Stop counting frames forwarded more than LOST_AFTER_S ago and never released (their
        message or its answer was lost between the actors: nothing else would ever release them,
        and enough of them would make the gateway answer busy to everyone); returns their keys."""
        lost = [k for k, t in self.pending_since.items() if now - t > LOST_AFTER_S]
        for key in lost:
            nbytes = self._release(key)
            if nbytes is None:
                continue
            self.presumed_lost += 1
            self.log("WARNING", "inflight_presumed_lost", request_id=key[0], seq=key[1], bytes=nbytes,
                     after_s=LOST_AFTER_S)
        return lost

    def _release(self, key: tuple) -> int | None:
        """A forwarded frame is done with (answered, or presumed lost): its bytes no longer count in
        flight. Its byte count, or None if it was not (or no longer) counted."""
        self.pending_since.pop(key, None)
        self.direct_keys.discard(key)
        nbytes = self.pending.pop(key, None)
        if nbytes is None:
            return None
        self.inflight_bytes -= nbytes
        left = self.per_request.get(key[0], 1) - 1
        if left > 0:
            self.per_request[key[0]] = left
        else:
            self.per_request.pop(key[0], None)
        return nbytes

    # ----- replies from the assembler -------------------------------------------------------------
    def on_message(self, msg, sender) -> None:
        if isinstance(msg, Outbound):
            for key in msg.resolved:
                self._release(tuple(key))
            for rid, reply in msg.stored:
                self.stored.add(rid, reply)
            for identity, reply in msg.replies:
                if reply.get("type") == "error":
                    self.stats["errors"] += 1
                    self.metrics.inc("pairlane_errors_total", code=reply.get("code", "?"))
                self._send(identity, reply)
            # the FD is edge-triggered: sending may have consumed the edge of pending input
            self._drain()
        elif isinstance(msg, DirectOpen):   # a hint: the writer checks the mark
            self.direct_mark = msg.mark
