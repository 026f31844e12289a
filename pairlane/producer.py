"""The socket producer: a DEALER connection to pairlane's gateway (PROTOCOL.md section 1).

Owns: the ZMQ socket (connect, send, poll, close), sending a result by
driving the I/O-free pairlane.conversation.Conversation over it (turning its
`Send`s into frames, waiting until its `wake_at`, sleeping out retry_after_s),
`send_live_trades`, and SendError with its operator hints.

Never does: talk to SQLite, read the daemon's configuration, import anything
from the daemon, or retry forever. Validation, planning, encoding and the
rules of the conversation live in pairlane.columns, pairlane.chunks and
pairlane.conversation. A final error or exhausted retries raise SendError;
bad input raises ValueError before anything is sent.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Sequence

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from . import codec
from .chunks import MAX_CHUNK_ROWS, encode_values, pack_chunk, plan
from .columns import check_id, prepare_columns, prepare_live_columns
from .conversation import RETRYABLE, Conversation, Send, retry_after
from .zap import client_curve_options

__all__ = ["Producer", "SendError"]

log = logging.getLogger("pairlane.client")  # the name operators and `run.py send` configure

_HINTS = {
    "timeout": "is pairlane running and listening on this endpoint? "
               "(`python run.py admin status`); resend later with the same request_id",
    "conflict": "this request_id is in progress or stored with another strategy_name or "
                "totals; use a new request_id (or resend exactly the same result)",
    "malformed": "the server could not parse a message: a client/server version mismatch "
                 "or a client bug; report it with this message",
    "too_large": "a frame or the declared totals exceed the server's limits; set "
                 "max_message_bytes to the server's gateway.max_message_bytes or "
                 "split the result",
    "bad_chunk": "the server rejected the data (unequal column lengths, unknown column, "
                 "NaN/inf or bad bin); fix the input and resend under the same request_id",
    "incomplete": "the stored rows did not add up to total_trades and the result was "
                  "marked failed; resend it under a new request_id",
    "busy": "the server stayed busy through every retry; resend later with the same "
            "request_id (nothing is lost: durable chunks are kept)",
    "unavailable": "neither the database nor the spool could take data through every "
                   "retry; check disk space and `python run.py admin status`, then resend "
                   "with the same request_id",
    "unknown_request": "the server kept forgetting this request; check "
                       "gateway.assembly_timeout_s and the daemon's logs",
}


class SendError(Exception):
    """A send failed for good: a final error reply, or no progress after every retry.

    `code` is the protocol error code (or "timeout"); `reply` the server's last
    error map (None for a timeout); `request_id` the request concerned.
    """

    def __init__(self, request_id: str, code: str, server_message: str = "",
                 reply: dict | None = None) -> None:
        self.request_id = request_id
        self.code = code
        self.reply = reply
        self.server_message = server_message
        text = f"request {request_id}: {code}"
        if server_message:
            text += f": {server_message}"
        hint = _HINTS.get(code)
        if hint:
            text += f" -- {hint}"
        super().__init__(text)


FAILOVER_ON = ("timeout", "unavailable")  # replies after which a Producer with several endpoints moves on


class Producer:
    """A DEALER connection to pairlane's gateway that sends results.

    One Producer is one socket: use it from one thread. `timeout_s` is how
    long to wait for any reply before resuming (send `begin` again and resend
    unacknowledged chunks); `retries` bounds consecutive resumes without
    progress (timeouts, busy/unavailable, unknown_request), after which
    SendError. `max_message_bytes` should match the server's
    gateway.max_message_bytes; chunks are planned to ~90% of it.
    `endpoint` may be a list: failover in that order (wrapping round) on
    silence or `unavailable`; the resume's `begin` goes to the next daemon,
    which answers from the chunks already durable in the shared store.
    `server_key` (the server's public certificate file) and `client_key` (this
    producer's secret certificate file) turn on CURVE, for a gateway with
    gateway.curve_secret_key set; a client whose key the server has not
    authorized gets no reply at all (SendError after the retries).
    """

    MAX_RETRY_AFTER_S = 30.0  # cap on a server's retry_after_s

    def __init__(self, endpoint: str | Sequence[str], *, timeout_s: float = 30.0, retries: int = 5,
                 max_message_bytes: int = 1 << 20, identity: bytes | None = None,
                 max_chunk_rows: int = MAX_CHUNK_ROWS, server_key: str | None = None,
                 client_key: str | None = None) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if max_message_bytes < 1024:
            raise ValueError("max_message_bytes must be >= 1024")
        endpoints = [endpoint] if isinstance(endpoint, str) else list(endpoint)
        if not endpoints or not all(isinstance(e, str) and e for e in endpoints):
            raise ValueError(f"endpoint must be a non-empty string or list of them, got {endpoint!r}")
        self.endpoints = endpoints
        self.endpoint = endpoints[0]
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.max_message_bytes = int(max_message_bytes)
        self.max_chunk_rows = int(max_chunk_rows)
        # figures of the last send_result: chunks, chunks_sent, begins, timeouts,
        # busy_waits, max_unacked, window, elapsed_s, failovers
        self.last_stats: dict[str, Any] = {}
        # CURVE (section 7): the server's public certificate and our secret one; set before connect
        self._options: dict[int, Any] = {zmq.LINGER: 0, zmq.SNDTIMEO: max(1, int(self.timeout_s * 1000))}
        if identity is not None:
            self._options[zmq.IDENTITY] = identity
        for name, value in client_curve_options(server_key, client_key).items():
            self._options[getattr(zmq, name)] = value
        self._ctx = zmq.Context()
        self._sock = None
        self._mon = None     # with several endpoints: the socket's monitor (handshakes, disconnects)
        self._up = False     # a handshake with the current endpoint succeeded since the last loss
        self.peer_lost = False  # the daemon we talked to went away (kept until a wait for a reply sees it)
        self._connect(self.endpoint)

    def _connect(self, endpoint: str) -> None:
        """A fresh DEALER on endpoint (the previous one, if any, closed: its late replies are dropped).

        With several endpoints the socket is monitored: once a daemon that completed a handshake
        drops the connection (killed, host gone: the kernel closes its TCP connections), `recv`
        returns at once instead of waiting out timeout_s, so failover does not wait for silence."""
        self._close_socket()
        self._sock = self._ctx.socket(zmq.DEALER)
        for opt, value in self._options.items():
            self._sock.setsockopt(opt, value)
        try:
            self._sock.connect(endpoint)
        except zmq.ZMQError as e:
            self.close()
            raise ValueError(f"cannot connect to {endpoint!r}: {e}") from None
        self.endpoint = endpoint
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._up = self.peer_lost = False
        if len(self.endpoints) > 1:
            self._mon = self._sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
            self._poller.register(self._mon, zmq.POLLIN)

    def _close_socket(self) -> None:
        if self._mon is not None:
            try:
                self._sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self._mon.close(0)
            self._mon = None
        if self._sock is not None and not self._sock.closed:
            self._sock.close(0)

    def failover(self, reason: str = "") -> bool:
        """Move to the next of several endpoints (in order, wrapping round); False with only one.
        The caller resumes there with `begin`: the daemon behind it answers from what is durable."""
        if len(self.endpoints) < 2:
            return False
        old = self.endpoint
        nxt = self.endpoints[(self.endpoints.index(old) + 1) % len(self.endpoints)]
        self._connect(nxt)
        self.last_stats["failovers"] = self.last_stats.get("failovers", 0) + 1
        log.warning("event=send_failover from=%s to=%s reason=%s", old, nxt, reason or "?")
        return True

    # -- low level -----------------------------------------------------------

    def send_raw(self, frame: bytes | list[bytes]) -> None:
        """Send one frame (or a multi-frame message) as is. zmq.Again when it cannot be queued."""
        if isinstance(frame, (bytes, bytearray, memoryview)):
            self._sock.send(frame)
        else:
            self._sock.send_multipart(frame)

    def recv(self, timeout_s: float) -> dict | None:
        """The next reply as a dict, or None when nothing arrives within timeout_s, or (with several
        endpoints) at once while the daemon we were connected to has dropped the connection: then
        `peer_lost` is True, until the next failover.

        A reply that is not a msgpack map comes back as {"type": None, "raw": frames}.
        """
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            # once the daemon is gone, only what it sent before is read: no waiting
            wait_ms = 0 if self.peer_lost else max(0, math.ceil((deadline - time.monotonic()) * 1000))
            ready = dict(self._poller.poll(wait_ms))
            if self._sock in ready:
                break
            if self._mon is not None and self._mon in ready and self._peer_went_away():
                self.peer_lost = True
            if self.peer_lost:   # noticed now or by an earlier call (a drain during a backoff)
                return None
            if not ready or time.monotonic() >= deadline:
                return None
        frames = [f for f in self._sock.recv_multipart() if f]
        if len(frames) == 1:
            try:
                msg = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
            except Exception:
                msg = None
            if isinstance(msg, dict):
                return msg
        return {"type": None, "raw": frames}

    def _peer_went_away(self) -> bool:
        """Read the monitor's events: True when a connection that had completed its handshake closed
        (a refused or never-answering endpoint is left to timeout_s, as before)."""
        lost = False
        while self._mon.poll(0):
            event = recv_monitor_message(self._mon)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._up, lost = True, False
            elif event == zmq.EVENT_DISCONNECTED and self._up:
                self._up, lost = False, True
        return lost

    def close(self) -> None:
        """Close the socket and its context at once (LINGER 0: unsent frames are dropped)."""
        if getattr(self, "_sock", None) is not None:
            self._close_socket()
        ctx = getattr(self, "_ctx", None)
        if ctx is not None and not ctx.closed:
            ctx.term()

    def __enter__(self) -> "Producer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers -------------------------------------------------------------

    def _send(self, msg_or_frame: dict | bytes) -> None:
        frame = msg_or_frame if isinstance(msg_or_frame, bytes) else \
            msgpack.packb(msg_or_frame, use_bin_type=True)
        try:
            self._sock.send(frame)
        except zmq.Again:
            # nobody has taken our messages for timeout_s: treated like a missing reply
            raise _SendBlocked() from None

    def _wait_ours(self, request_id: str, deadline: float) -> dict | None:
        """The next reply for request_id (or an id-less error) before deadline, else None."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            msg = self.recv(left)
            if msg is None:
                if self.peer_lost:
                    raise _PeerLost()
                return None
            if self._ours(msg, request_id):
                return msg

    @staticmethod
    def _ours(msg: dict, request_id: str) -> bool:
        """A reply for request_id, or an error without one."""
        rid = msg.get("request_id")
        return rid == request_id or (rid is None and msg.get("type") == "error")

    # -- results -------------------------------------------------------------

    def send_result(self, request_id: str, strategy_name: str, columns: dict, *,
                    metrics: dict | None = None, meta: dict | None = None,
                    progress: Callable[[int, int], None] | None = None) -> dict:
        """Send one backtest result and return the server's `stored` reply.

        Runs begin -> chunks within the credit window -> end (PROTOCOL.md
        section 1) and resumes on timeouts, busy/unavailable and
        unknown_request. `meta` may carry symbol, timeframe, rank, oos_kind
        (and metrics, used when `metrics` is None). `progress(acked_rows,
        total_rows)` is called whenever chunks are acknowledged. Chunks are
        encoded when sent, never all at once. Raises ValueError for bad input
        (nothing sent) and SendError when the server refuses or retries run out.
        """
        check_id("request_id", request_id)
        if not isinstance(strategy_name, str) or not 1 <= len(strategy_name) <= 256:
            raise ValueError(f"strategy_name must be 1-256 characters, got {strategy_name!r:.300}")
        meta = dict(meta or {})
        if metrics is None:
            metrics = meta.get("metrics")
        if metrics is not None and not isinstance(metrics, dict):
            raise ValueError(f"metrics must be a map, got {type(metrics).__name__}")
        prepared, total_rows = prepare_columns(columns)
        ranges = plan(prepared, total_rows, self.max_message_bytes, self.max_chunk_rows)
        begin: dict[str, Any] = {"type": "begin", "v": 1, "request_id": request_id,
                                 "strategy_name": strategy_name, "total_trades": total_rows,
                                 "total_chunks": len(ranges)}
        if metrics is not None:
            begin["metrics"] = metrics
        for key in ("symbol", "timeframe", "rank", "oos_kind"):
            v = meta.get(key)
            if v is None:
                continue
            typ = int if key == "timeframe" else str
            if not isinstance(v, typ) or isinstance(v, bool):
                raise ValueError(f"meta {key!r} must be {typ.__name__}, got {v!r}")
            begin[key] = v
        return self._converse(request_id, begin, prepared, ranges, progress)

    def send_live_trades(self, batch_id: str, columns: dict) -> dict:
        """Append live trades (one message, idempotent by batch_id); returns the `stored` reply.

        Columns as for results plus `strategy_name` (required), `pair_id` and
        `execution_mode`. The batch must fit in one frame (ValueError otherwise:
        split it into several batches). Resends on timeout and busy/unavailable.
        """
        check_id("batch_id", batch_id)
        prepared, n = prepare_live_columns(columns)
        trades = {c: encode_values(v, codec.LIVE_COLUMN_KINDS[c], 0, n) for c, v in prepared.items()}
        frame = msgpack.packb({"type": "live_trades", "v": 1, "batch_id": batch_id,
                               "trades": trades}, use_bin_type=True)
        if len(frame) > self.max_message_bytes:
            raise ValueError(f"live_trades batch {batch_id} is {len(frame)} bytes, over "
                             f"max_message_bytes={self.max_message_bytes}; send smaller batches")
        strikes = 0
        while True:
            try:
                self._send(frame)
                reply = self._wait_ours(batch_id, time.monotonic() + self.timeout_s)
            except (_SendBlocked, _PeerLost):
                reply = None
            if reply is not None and reply.get("type") == "stored":
                return reply
            if reply is not None and reply.get("type") != "error":
                reply = None  # nothing else answers live_trades: as good as no answer
            code = "timeout" if reply is None else str(reply.get("code"))
            if reply is not None and code not in ("busy", "unavailable"):
                raise SendError(batch_id, code, str(reply.get("message", "")), reply)
            strikes += 1
            if strikes > self.retries:
                if reply is None:
                    raise SendError(batch_id, "timeout", f"no reply from {', '.join(self.endpoints)} in "
                                    f"{strikes} attempt(s) of {self.timeout_s:g}s each")
                raise SendError(batch_id, code, str(reply.get("message", "")), reply)
            log.warning("event=send_resume batch_id=%s reason=%s attempt=%d/%d",
                        batch_id, code, strikes, self.retries)
            if code in FAILOVER_ON and self.failover(code):
                continue  # another daemon: no need to wait out this one's retry_after_s
            if reply is not None:
                time.sleep(self._retry_after(reply))

    def _retry_after(self, reply: dict) -> float:
        return retry_after(reply, max_s=self.MAX_RETRY_AFTER_S)

    # -- the conversation ----------------------------------------------------

    def _converse(self, request_id: str, begin: dict, prepared: dict,
                  ranges: list[tuple[int, int]], progress: Callable[[int, int], None] | None) -> dict:
        """Carry out one Conversation over this socket; its `stored` reply, or SendError."""
        def on_resume(code: str, reply: dict | None) -> None:
            detail = ""
            if code == "timeout" and self.peer_lost:
                detail = f" endpoint={self.endpoint} disconnected=true"
            elif code == "timeout":
                detail = f" endpoint={self.endpoint} waited_s={self.timeout_s:g}"
            elif reply is not None and code in RETRYABLE:
                detail = f" retry_after_s={conv.retry_after(reply):g}"
            log.warning("event=send_resume request_id=%s reason=%s attempt=%d/%d acked_chunks=%d/%d%s",
                        request_id, code, conv.strikes, self.retries, len(conv.acked),
                        len(ranges), detail)
            if code in FAILOVER_ON and self.failover(code):
                switched.append(code)  # the resume's `begin` goes to the next daemon, at once

        switched: list[str] = []
        conv = Conversation(request_id, ranges, timeout_s=self.timeout_s, retries=self.retries,
                            max_retry_after_s=self.MAX_RETRY_AFTER_S, progress=progress,
                            on_resume=on_resume)
        self.last_stats = conv.stats
        begin_frame = msgpack.packb(begin, use_bin_type=True)
        end_frame = msgpack.packb({"type": "end", "v": 1, "request_id": request_id}, use_bin_type=True)

        def frame(s: Send) -> bytes:
            if s.kind == "chunk":
                start, stop = ranges[s.seq]
                return pack_chunk(request_id, s.seq, prepared, start, stop)
            return begin_frame if s.kind == "begin" else end_frame

        t0 = time.monotonic()
        try:
            out = conv.start(t0)
            while True:
                while out:  # send; a frame nobody takes within timeout_s counts as silence
                    try:
                        for s in out:
                            self._send(frame(s))
                        out = []
                    except _SendBlocked:
                        out = conv.blocked(time.monotonic())
                if conv.finished:
                    break
                wake = conv.wake_at
                if conv.backing_off:
                    time.sleep(max(0.0, wake - time.monotonic()))
                    while not conv.finished:  # replies queued while we slept
                        msg = self.recv(0)
                        if msg is None:
                            break
                        if self._ours(msg, request_id):
                            conv.on_reply(msg, time.monotonic())
                    out = conv.tick(time.monotonic())
                    continue
                try:
                    msg = self._wait_ours(request_id, wake)
                except _PeerLost:   # the daemon went away: as good as silence, without waiting it out
                    out = conv.blocked(time.monotonic())
                    switched.clear()
                    continue
                now = time.monotonic()
                out = conv.on_reply(msg, now) if msg is not None else conv.tick(now)
                if switched and conv.backing_off:
                    # the retry_after_s was the old daemon's: the next one is asked now
                    conv.backoff_until = now
                    out = conv.tick(now)
                switched.clear()
        finally:
            conv.stats["elapsed_s"] = time.monotonic() - t0
        if conv.stored is not None:
            return conv.stored
        f = conv.failure
        if f.code == "timeout" and f.reply is None:
            raise SendError(request_id, "timeout", f"no reply from {', '.join(self.endpoints)} in "
                            f"{f.attempts} attempt(s) of {self.timeout_s:g}s each")
        raise SendError(request_id, f.code, f.message, f.reply)


class _SendBlocked(Exception):
    """A send could not be queued within timeout_s."""


class _PeerLost(Exception):
    """The daemon we were talking to dropped the connection (several endpoints only)."""
