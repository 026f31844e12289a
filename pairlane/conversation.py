"""The producer side of one chunked request (PROTOCOL.md section 1), as an I/O-free state machine.

Owns: the one producer conversation pairlane has, driven by the socket
client (pairlane.client.Producer, over a DEALER) and by the legacy actor
(over Thespian messages): begin -> a credit window -> chunks within it ->
per-chunk credits -> end -> stored / incomplete / errors; resume on silence
(begin again, resend every chunk not yet acknowledged); wait retry_after_s on
busy/unavailable, then resume; start over on unknown_request; resend the seqs
an `incomplete` names; give up after `retries` resumes without progress.

It is told what happened (`start`, `on_reply`, `tick`, `blocked`, each with
the current time) and answers with the frames to send next, as `Send(kind,
seq)` with kind "begin", "chunk" or "end". `wake_at` says when `tick` has
something to do; `stored` / `failure` say it is finished.

Never does: sockets, encoding, reading the clock, sleeping, logging. The
driver builds and sends the frames, filters replies by request_id, waits
until `wake_at`, and turns `failure` into its own error.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

__all__ = ["Send", "Failure", "Conversation", "RETRYABLE", "retry_after"]

RETRYABLE = ("busy", "unavailable")  # error codes answered by waiting retry_after_s, then resuming


def retry_after(reply: dict, default_s: float = 0.0, min_s: float = 0.01, max_s: float = 30.0) -> float:
    """The wait a busy/unavailable reply asks for (its retry_after_s, else default_s), within [min_s, max_s]."""
    try:
        v = float(reply.get("retry_after_s") or default_s)
    except (TypeError, ValueError):
        v = default_s
    return min(max(v, min_s), max_s)


class Send(NamedTuple):
    """A frame to send now: kind is "begin", "chunk" (with its seq) or "end"."""

    kind: str
    seq: int | None = None


@dataclass(frozen=True)
class Failure:
    """Why a conversation ended without `stored`.

    code: the protocol error code, or "timeout" when nothing came back.
    exhausted: True when retries ran out (the code is then the last reason to
    resume), False for a final error reply. reply: the server's last error map
    (None after silence). attempts: the strikes counted (resumes without progress).
    """

    code: str
    message: str
    reply: dict | None
    exhausted: bool
    attempts: int


class Conversation:
    """One request's conversation, from the producer's side. See the module docstring.

    ranges: the row range [start, stop) of each chunk (its index is the seq).
    timeout_s: silence after which the producer resumes. retries: resumes
    without progress allowed before giving up. max_window: cap on the
    server's credit window (None: the server's). default_retry_after_s: the
    wait after busy/unavailable when the reply names none; waits are kept
    within [min_retry_after_s, max_retry_after_s]. progress(acked_rows,
    total_rows) is called on each newly acknowledged chunk; on_resume(code,
    reply) before each resume that retries still allow.
    """

    def __init__(self, request_id: str, ranges: Sequence[tuple[int, int]], *, timeout_s: float,
                 retries: int, max_window: int | None = None, default_retry_after_s: float = 0.0,
                 min_retry_after_s: float = 0.01, max_retry_after_s: float = 30.0,
                 progress: Callable[[int, int], None] | None = None,
                 on_resume: Callable[[str, dict | None], None] | None = None) -> None:
        if not ranges:
            raise ValueError("a request has at least one chunk")
        self.request_id = request_id
        self.ranges = list(ranges)
        self.total_rows = sum(b - a for a, b in self.ranges)
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.max_window = max_window
        self.default_retry_after_s = float(default_retry_after_s)
        self.min_retry_after_s = float(min_retry_after_s)
        self.max_retry_after_s = float(max_retry_after_s)
        self.progress = progress
        self.on_resume = on_resume

        self.acked: set[int] = set()
        self.acked_rows = 0
        self.in_flight: set[int] = set()   # sent since the last window grant, not acknowledged
        self.to_send: deque[int] = deque()
        self.window = 0                    # 0 while waiting for a window grant
        self.end_sent = False              # `end` sent since the latest begin
        self.ends = 0                      # `end`s sent in this conversation
        self.strikes = 0                   # consecutive resumes without progress
        self.incomplete_rounds = 0
        self.deadline: float | None = None        # silence until then -> resume
        self.backoff_until: float | None = None   # waiting out retry_after_s until then
        self.stored: dict | None = None
        self.failure: Failure | None = None
        self.stats: dict[str, Any] = {
            "request_id": request_id, "chunks": len(self.ranges), "chunks_sent": 0, "begins": 0,
            "timeouts": 0, "busy_waits": 0, "max_unacked": 0, "window": None, "elapsed_s": 0.0}

    # -- state ----------------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.stored is not None or self.failure is not None

    @property
    def backing_off(self) -> bool:
        """Waiting out a retry_after_s (replies now only count acks, stored and final errors)."""
        return self.backoff_until is not None and not self.finished

    @property
    def wake_at(self) -> float | None:
        """When `tick` next has something to do (None once finished)."""
        if self.finished:
            return None
        return self.backoff_until if self.backoff_until is not None else self.deadline

    def retry_after(self, reply: dict) -> float:
        """The wait a busy/unavailable reply asks for, within the bounds."""
        return retry_after(reply, self.default_retry_after_s, self.min_retry_after_s,
                           self.max_retry_after_s)

    # -- events in ------------------------------------------------------------------------------------

    def start(self, now: float) -> list[Send]:
        """The first frames: a begin."""
        if self.finished or self.stats["begins"]:
            return []
        return self._resume(now)

    def tick(self, now: float) -> list[Send]:
        """Time passed: resume after a backoff, or after `timeout_s` of silence."""
        if self.finished:
            return []
        if self.backoff_until is not None:
            if now < self.backoff_until:
                return []
            return self._resume(now)
        if self.deadline is not None and now >= self.deadline:
            if self._strike("timeout", None):
                return self._resume(now)
        return []

    def blocked(self, now: float, wait_s: float = 0.0) -> list[Send]:
        """A frame could not be handed on: counted as silence; resume now, or after wait_s."""
        if self.finished:
            return []
        if not self._strike("timeout", None):
            return []
        if wait_s > 0:
            self.backoff_until = now + wait_s
            return []
        return self._resume(now)

    def on_reply(self, msg: dict, now: float) -> list[Send]:
        """A reply for this request (or an id-less error) arrived."""
        if self.finished:
            return []
        self.deadline = now + self.timeout_s
        kind = msg.get("type")
        code = msg.get("code") if kind == "error" else None
        if kind == "stored":
            self.stored = msg
            return []
        if self.backoff_until is not None:
            # replies queued before the wait: acks count, final errors end it, the rest is stale
            if kind == "credit" and "seq" in msg:
                self._ack(msg.get("seq"))
            elif kind == "incomplete" or code == "incomplete":
                self._incomplete(msg)  # its seqs go out again with the resume
            elif kind == "error" and code not in (*RETRYABLE, "unknown_request"):
                self._fail("error" if code is None else str(code), msg)
            return []
        if kind == "credit":
            if "seq" in msg:
                self._ack(msg.get("seq"))
            else:
                try:
                    window = max(1, int(msg.get("credit") or 1))
                except (TypeError, ValueError):
                    window = 1
                if self.max_window is not None:
                    window = min(window, self.max_window)
                self.window = window
                self.stats["window"] = window
                self.in_flight.clear()  # credits granted before are void
            return self._pump()
        if kind == "incomplete" or code == "incomplete":
            return self._incomplete(msg)
        if kind == "error":
            code = "error" if code is None else str(code)
            if code in RETRYABLE:
                if self._strike(code, msg):
                    self.backoff_until = now + self.retry_after(msg)
                return []
            if code == "unknown_request":
                if self.window == 0:
                    return []  # a stale answer to a chunk sent before our latest begin
                if not self._strike(code, msg):
                    return []
                # the server lost the request: everything goes again
                self.acked.clear()
                self.acked_rows = 0
                return self._resume(now)
            self._fail(code, msg)
        return []  # anything else (aborted, unknown types) is ignored

    # -- internals ------------------------------------------------------------------------------------

    def _resume(self, now: float) -> list[Send]:
        """Ask for a fresh window; every seq not yet acknowledged goes out again."""
        self.backoff_until = None
        self.in_flight.clear()
        self.to_send = deque(s for s in range(len(self.ranges)) if s not in self.acked)
        self.window = 0
        self.end_sent = False
        self.stats["begins"] += 1
        self.deadline = now + self.timeout_s
        return [Send("begin")]

    def _pump(self) -> list[Send]:
        """Chunks while the window has room; `end` once everything is acknowledged."""
        out: list[Send] = []
        while self.window and len(self.in_flight) < self.window and self.to_send:
            seq = self.to_send.popleft()
            if seq in self.acked or seq in self.in_flight:
                continue
            out.append(Send("chunk", seq))
            self.in_flight.add(seq)
            self.stats["chunks_sent"] += 1
            self.stats["max_unacked"] = max(self.stats["max_unacked"], len(self.in_flight))
        if self.window and not self.end_sent and len(self.acked) == len(self.ranges):
            self.end_sent = True
            self.ends += 1
            out.append(Send("end"))
        return out

    def _ack(self, seq: Any) -> None:
        if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < len(self.ranges):
            return
        self.in_flight.discard(seq)
        if seq in self.acked:
            return
        self.acked.add(seq)
        start, stop = self.ranges[seq]
        self.acked_rows += stop - start
        self.strikes = 0
        if self.progress is not None:
            self.progress(self.acked_rows, self.total_rows)

    def _incomplete(self, msg: dict) -> list[Send]:
        missing = msg.get("missing")
        if not self.ends or not isinstance(missing, list) or not missing:
            self._fail("incomplete", msg)  # rows do not add up: the result failed
            return []
        self.incomplete_rounds += 1
        if self.incomplete_rounds > max(1, self.retries):
            self._fail("incomplete", msg, f"server still misses seqs {missing[:10]} after "
                                          f"{self.incomplete_rounds - 1} resends")
            return []
        for seq in missing:
            if not isinstance(seq, int) or not 0 <= seq < len(self.ranges):
                continue
            if seq in self.acked:
                self.acked.discard(seq)
                start, stop = self.ranges[seq]
                self.acked_rows -= stop - start
            self.in_flight.discard(seq)
            self.to_send.append(seq)
        self.end_sent = False
        if self.backoff_until is not None:
            return []
        return self._pump()

    def _strike(self, code: str, reply: dict | None) -> bool:
        """Count a resume without progress; False (and failed) once retries are exhausted."""
        self.strikes += 1
        if code == "timeout":
            self.stats["timeouts"] += 1
        elif code in RETRYABLE:
            self.stats["busy_waits"] += 1
        if self.strikes > self.retries:
            message = (f"no reply in {self.strikes} attempt(s) of {self.timeout_s:g}s each"
                       if reply is None else str(reply.get("message", "")))
            self.failure = Failure(code, message, reply, True, self.strikes)
            return False
        if self.on_resume is not None:
            self.on_resume(code, reply)
        return True

    def _fail(self, code: str, reply: dict, message: str | None = None) -> None:
        self.failure = Failure(code, str(reply.get("message", "")) if message is None else message,
                               reply, False, self.strikes)
