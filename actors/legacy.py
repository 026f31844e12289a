"""The legacy actor: swimmy's S-expression BACKTEST_RESULT on a PULL socket (PROTOCOL.md sections 2 and 7).

Owns: the legacy socket; the legacy spool (``<dlq.path>/legacy/``, a
pairlane.spool.Spool of raw messages): every message taken off the socket is
written there durably (fsync) before it is parsed, and removed only once its
outcome is durable, so a crash of this actor or of the daemon loses none
(they are parsed and fed again at the next start; the chunked path is
idempotent). Bounded: with SPOOL_MAX_ITEMS messages (or no room for one more
of ``legacy_max_bytes``) waiting, the socket is not read and ZMQ's high-water
mark pushes back on swimmy's PUSH; nothing is dropped.

Parsing one message at a time in a worker thread (so a 30 MB message never
stalls a heartbeat or anyone else), the rules of section 2 (no request_id:
rejected; error, or a trade with a non-finite pnl: a `failed` result without
trades; no trade_list: a result without trades; a list shorter than the
reported trades: stored with `truncated = 1`), the `gateway.legacy_oos_suffix`
rule (section 7), and feeding the result into the same chunked path a ZMQ
producer uses, as a producer of its own: it drives the one producer
conversation (pairlane.conversation) over Inbound/Outbound messages to the
assembler, with chunk frames from the one chunk encoder (pairlane.chunks).

Every message ends in exactly one outcome (stored complete, stored failed,
rejected), logged with its request_id and strategy and counted once, after it
is durable. Never evaluates anything (pairlane.sexpr only reads), never
unpickles, never writes the database (the writer does, and says when).
"""
from __future__ import annotations

import collections
import os
import queue
import re
import threading
import time

import numpy as np
import zmq

from pairlane import codec, sexpr
from pairlane.chunks import pack_chunk
from pairlane.conversation import Conversation, Send
from pairlane.spool import Spool, SpoolFull
from pairlane.store import meta_from_message
from pairlane.vocab import ResultStatus

from .base import PairlaneActor
from .messages import Inbound, LegacyResult, LegacyWritten, Outbound
from .zap import address_filter

# Rows in one legacy chunk (measured before lanes). Every chunk costs fixed hops and writer work, and the writer
# idles a round trip between big chunks (one at a time there); a small native result waits for at
# most one. Measured with the faster parse, interleaved, 4 rounds of 5 messages each (busy 2-core
# machine): 2560 rows 179k trades/s, small results alongside p50 27.7 ms, p99 67 ms; 3072 181k,
# 27.8 / 56 ms; 4096 190k, 32.0 / 70 ms. Streaming 10 messages: 4096 +10-20% trades/s, p99 +5-10 ms;
# 5120 and 8192 faster still, p99 +10-30 ms. Larger chunks buy a few % at the small results' cost.
ROWS_PER_CHUNK = 2560
# legacy chunks handed to the assembler at once (it lets one big chunk at a time wait at the writer,
# so small native results never queue behind more than one)
MAX_WINDOW = 3
RETRY_S = 1.0        # wait when the assembler is away, or a busy reply names no retry_after_s
MAX_ATTEMPTS = 30    # resumes without progress before the conversation starts over (the message stays)
STALL_S = 30.0       # silence from the assembler after which the conversation resumes
AGAIN_S = 5.0        # wait before a conversation that ran out of attempts starts over
WRITE_RESEND_S = 5.0  # a failed result the writer has not confirmed is sent again after this
SPOOL_DIR = "legacy"  # under dlq.path (its single-instance lock covers it)
SPOOL_MAX_ITEMS = 32  # messages waiting at most; then the socket is not read
SPOOL_MAX_FACTOR = 4  # ... and at most this many legacy_max_bytes of them
INTAKE_BUDGET_S = 0.5  # longest stretch of spooling in one handler (heartbeats go on)
OOS_KIND = "OOS"
_RID_GUESS = re.compile(rb'request[-_]id\s*(?:\.\s*)?"?([A-Za-z0-9._:-]{1,128})')


def guess_request_id(data: bytes) -> str | None:
    """The request_id a message seems to carry, for the log line of one that cannot be read."""
    m = _RID_GUESS.search(data[-4096:]) or _RID_GUESS.search(data[:4096])
    return m.group(1).decode("ascii") if m else None


def wire_arrays(cols: dict) -> dict:
    """`cols` with each numeric column whose values are all ints (int columns) or all ints and floats
    (float columns) turned into a little-endian array, once: the chunk encoder then sends slices of it
    as they are (no per-chunk list-to-array conversion) and the check reads it as a bin. A column
    holding None, another type, or an int beyond int64 stays a list (and codec.check_columns judges
    it as before)."""
    out = dict(cols)
    for name, values in cols.items():
        kind = codec.COLUMN_KINDS.get(name)
        if kind not in ("int", "float") or not isinstance(values, list) or not values:
            continue
        types = set(map(type, values))
        if not types <= ({int} if kind == "int" else {int, float}):
            continue
        try:
            out[name] = np.array(values, dtype="<i8" if kind == "int" else "<f8")
        except OverflowError:
            pass
    return out


def check_wire_columns(cols: dict, rid: str | None) -> int:
    """codec.check_columns over `wire_arrays` output (arrays checked as the bins they become)."""
    return codec.check_columns({k: v.tobytes() if isinstance(v, np.ndarray) else v for k, v in cols.items()}, rid)


def strip_oos(name: str, suffix: str) -> tuple[str, bool]:
    """(name without `suffix`, True) when it ends in it (and is longer), else (name, False)."""
    if suffix and len(name) > len(suffix) and name.endswith(suffix):
        return name[:-len(suffix)], True
    return name, False


class Legacy(PairlaneActor):
    def on_start(self) -> None:
        g = self.config["gateway"]
        self.max_bytes = g["legacy_max_bytes"]
        self.oos_suffix = g["legacy_oos_suffix"]
        self.spool = Spool(os.path.join(self.config["dlq"]["path"], SPOOL_DIR))
        self.spool_cap = SPOOL_MAX_FACTOR * self.max_bytes
        self.todo: collections.deque = collections.deque(it.id for it in self.spool.items())
        self.replayed: set = set(self.todo)
        for name, reason in self.spool.quarantined:
            self.log("ERROR", "legacy_spool_quarantined", file=name, reason=reason,
                     detail="a spooled message failed its checks; kept in quarantine/ for an operator")
        if self.todo:
            self.log("WARNING", "legacy_spool_replay", messages=len(self.todo), bytes=self.spool.total_bytes)
        # gateway.legacy_allow (section 7): a ZAP address filter (NULL mechanism), bound before the PULL
        self.zap, secure = address_filter(self, "legacy", g["legacy_allow"])
        self.sock = self.bind_socket(zmq.PULL, g["legacy_endpoint"], MAXMSGSIZE=self.max_bytes, RCVHWM=4,
                                     **secure)
        self.results: queue.Queue = queue.Queue()
        # the parse thread writes a byte here when it is done, so the loop collects at once (not at
        # the next poll); never closed: a thread still parsing at stop must not write to a reused fd
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.held: bytes | None = None            # taken off the socket, not yet spooled (disk full)
        self.current: dict | None = None          # the spooled message being handled
        self.parsing: dict | None = None          # {"started": t, "bytes": n}
        self.job: dict | None = None              # the result being fed into the chunked path
        self.pending: dict | None = None          # a failed result the writer has not confirmed yet
        self.counts = collections.Counter()
        self.seq = 0
        self.after(0.05, "poll")

    def watch_fds(self) -> list:
        zap = self.zap.fds if self.zap and not self._stopping else []
        wake = [self.wake_r] if self.parsing is not None and not self._stopping else []
        return zap + wake + ([self.sock.FD] if self._room() else [])

    def _room(self) -> bool:
        return (not self._stopping and self.held is None and len(self.spool) < SPOOL_MAX_ITEMS
                and self.spool.total_bytes + self.max_bytes <= self.spool_cap)

    def inspect(self) -> dict:
        job = None
        if self.job is not None:
            conv = self.job["conv"]
            job = {"request_id": self.job["request_id"], "total_chunks": len(conv.ranges),
                   "acked": len(conv.acked), "sent": conv.stats["chunks_sent"],
                   "attempts": conv.stats["begins"]}
        spool = {"messages": len(self.spool), "bytes": self.spool.total_bytes, "waiting": len(self.todo),
                 "held_unspooled": self.held is not None, "path": self.spool.path}
        return {"parsing": self.parsing, "job": job, "spool": spool, **dict(self.counts),
                "auth": self.zap.inspect() if self.zap else None}

    # ----- intake: socket -> spool ----------------------------------------------------------------
    def on_readable(self, fds) -> None:
        if self.wake_r in fds:
            try:
                while os.read(self.wake_r, 64):
                    pass
            except BlockingIOError:
                pass
            self._collect()
        self._intake()
        self._next()

    def on_timer(self, payload) -> None:
        if payload == "poll":
            self._collect()
            self._intake()
            self._next()
            if not self._stopping:
                self.after(0.02 if self.parsing else 0.1, "poll")
        elif isinstance(payload, tuple) and payload[0] == "conv":
            # the conversation's wake-up: a retry_after_s over, or silence (assembler restarted, replies lost)
            job = self.job
            if job is None or job["identity"] != payload[1]:
                return
            if job["timer_at"] == payload[2]:
                job["timer_at"] = None
            self._drive(job["conv"].tick(time.monotonic()))
        elif isinstance(payload, tuple) and payload[0] == "again":
            job = self.job
            if job is not None and job["identity"] == payload[1]:
                self._start_conversation()
        elif isinstance(payload, tuple) and payload[0] == "write":
            if self.pending is not None and self.pending["token"] == payload[1]:
                self._send_failed()

    def _intake(self) -> None:
        """Take messages off the socket while the spool has room, each spooled durably at once."""
        if self.zap:
            self.zap.drain()
        if self.held is not None and not self._spool(self.held):
            return
        t0 = time.monotonic()
        while self._room() and time.monotonic() - t0 < INTAKE_BUDGET_S:
            if not (self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN):
                return
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.counts["received"] += 1
            self.metrics.inc("pairlane_ingest_messages_total", type="legacy")
            self.metrics.inc("pairlane_ingest_bytes_total", sum(len(f) for f in frames))
            if len(frames) != 1:
                self._outcome("rejected_malformed", "WARNING", "legacy_rejected", None, None, why="malformed",
                              detail=f"{len(frames)} frames (one expected)")
                continue
            if not self._spool(frames[0]):
                return

    def _spool(self, data: bytes) -> bool:
        try:
            item = self.spool.put(request_id=None, seq=None, stage="legacy", reason="received", error="",
                                  payload=data, meta={"received_at": time.time()})
        except (SpoolFull, OSError) as exc:
            if self.held is None:
                self.counts["spool_write_failures"] += 1
                self.log("ERROR", "legacy_spool_write_failed", error=exc, bytes=len(data),
                         detail="the message is held in memory and the socket is not read until it is spooled")
            self.held = data
            return False
        if self.held is not None:
            self.log("INFO", "legacy_spool_write_recovered", bytes=len(data))
        self.held = None
        self.todo.append(item.id)
        return True

    # ----- spool -> parse --------------------------------------------------------------------------
    def _next(self) -> None:
        """Start on the oldest spooled message, if nothing is being handled."""
        while self.current is None and self.todo and not self._stopping:
            sid = self.todo.popleft()
            try:
                item = self.spool.get(sid)
            except KeyError:
                # corrupt (moved to quarantine/) or gone: say so, it cannot be parsed
                self.counts["spool_lost"] += 1
                self.log("ERROR", "legacy_spool_unreadable", spool_id=sid, quarantined=self.spool.quarantined[-1:])
                continue
            replay = sid in self.replayed
            self.replayed.discard(sid)
            if replay:
                self.counts["replayed"] += 1
            self.current = {"id": sid, "replay": replay, "bytes": len(item.payload)}
            self.parsing = {"started": time.monotonic(), "bytes": len(item.payload)}
            threading.Thread(target=self._parse, args=(item.payload,), daemon=True, name="sexpr").start()

    def _parse(self, data: bytes) -> None:
        try:
            self.results.put(("ok", sexpr.parse_backtest_result(data, max_bytes=self.max_bytes), None))
        except sexpr.SexprError as exc:
            self.results.put(("error", str(exc), guess_request_id(data)))
        except Exception as exc:  # never let a parser bug kill the thread silently
            self.results.put(("error", f"{type(exc).__name__}: {exc}", guess_request_id(data)))
        try:
            os.write(self.wake_w, b"\0")
        except OSError:   # full (the loop is behind: it collects anyway) or gone
            pass

    def _collect(self) -> None:
        if self.parsing is None:
            return
        try:
            status, res, rid = self.results.get_nowait()
        except queue.Empty:
            return
        took = time.monotonic() - self.parsing["started"]
        self.parsing = None
        if status == "error":
            return self._done("rejected_malformed", rid, None, why="malformed", detail=res)
        self._convert(res, took)

    # ----- outcomes -----------------------------------------------------------------------------------
    def _outcome(self, outcome: str, level: str, event: str, rid, strategy, replay: bool = False,
                 **fields) -> None:
        """Log and count one message's outcome (once it is durable). `replay`: it was found in the
        spool at start (its outcome may have been logged once already, just before a crash)."""
        key = "failed_results" if outcome == "failed" else outcome
        self.counts[key] += 1
        self.metrics.inc("pairlane_legacy_results_total", outcome=outcome)
        if replay:
            fields["replayed"] = True
        if "detail" in fields:
            fields["detail"] = str(fields["detail"])[:300]
        self.log(level, event, request_id=rid, strategy=strategy, **fields)

    def _done(self, outcome: str, rid, strategy, **fields) -> None:
        """The current message's outcome is durable: log and count it, then drop it from the spool."""
        cur, self.current = self.current, None
        replay = cur is not None and cur["replay"]
        if outcome == "stored":
            self._outcome(outcome, "INFO", "legacy_stored", rid, strategy, replay, **fields)
        elif outcome == "failed":
            self._outcome(outcome, "WARNING", "legacy_failed", rid, strategy, replay, **fields)
        else:
            self._outcome(outcome, "WARNING", "legacy_rejected", rid, strategy, replay, **fields)
        self.job = None
        self.pending = None
        if cur is not None:
            try:
                self.spool.remove(cur["id"])
            except KeyError:
                pass
        self._intake()
        self._next()

    # ----- conversion to the chunked path -----------------------------------------------------------
    def _convert(self, r: sexpr.LegacyResult, took: float) -> None:
        rid = r.request_id
        name = r.strategy_name or ""
        if rid is None or not codec.REQUEST_ID_RE.fullmatch(str(rid)):
            return self._done("rejected_no_request_id", rid, name or None, why="no_request_id",
                              detail=f"request_id {rid!r} missing or invalid")
        if not 1 <= len(name) <= 256:
            return self._done("rejected_malformed", rid, name[:64] or None, why="malformed",
                              detail=f"request {rid}: strategy_name missing or too long")
        name, oos = strip_oos(name, self.oos_suffix)
        m = {"type": "begin", "request_id": rid, "strategy_name": name, "total_trades": r.total_trades,
             "metrics": {k: v for k, v in r.metrics.items() if k in codec.METRIC_KEYS},
             "symbol": r.symbol, "timeframe": r.timeframe, "rank": r.rank,
             "oos_kind": OOS_KIND if oos else r.oos_kind, "truncated": r.truncated}
        if r.error is not None:
            meta = meta_from_message(dict(m, total_chunks=1, error=r.error), "legacy")
            meta["total_trades"] = 0
            meta["truncated"] = 0
            self.seq += 1
            self.pending = {"token": self.seq, "meta": meta, "request_id": rid, "strategy": name}
            return self._send_failed()
        cols = r.columns if r.has_trade_list else {"timestamp": [], "pnl": []}
        if oos and r.total_trades:
            kinds = cols.get("oos_kind")
            cols = dict(cols, oos_kind=[OOS_KIND] * r.total_trades if kinds is None
                        else [OOS_KIND if k is None else k for k in kinds])
        cols = wire_arrays(cols)
        try:
            n = check_wire_columns(cols, rid)
        except codec.ProtocolError as exc:
            return self._done("rejected_bad_trades", rid, name, why="bad_trades", detail=f"request {rid}: {exc.message}")
        bounds = [(i, min(n, i + ROWS_PER_CHUNK)) for i in range(0, n, ROWS_PER_CHUNK)] or [(0, 0)]
        m["total_chunks"] = len(bounds)
        self.job = {"request_id": rid, "strategy": name, "msg": m, "cols": cols, "bounds": bounds,
                    "conv": None, "timer_at": None, "identity": b"", "started": time.time(),
                    "parse_s": took, "rows": n, "truncated": r.truncated, "reported": r.metrics.get("trades")}
        self._start_conversation()

    def _send_failed(self) -> None:
        """Hand the failed result to the writer (again, until it confirms the write)."""
        p = self.pending
        self.tell("writer", LegacyResult(p["meta"], ResultStatus.FAILED, self.myAddress, p["token"]))
        self.after(WRITE_RESEND_S, ("write", p["token"]))

    def _start_conversation(self) -> None:
        job = self.job
        self.seq += 1
        job["identity"] = f"legacy:{os.getpid()}:{self.seq}".encode()
        job["timer_at"] = None
        job["conv"] = Conversation(job["request_id"], job["bounds"], timeout_s=STALL_S, retries=MAX_ATTEMPTS,
                                   max_window=MAX_WINDOW, default_retry_after_s=RETRY_S)
        self._drive(job["conv"].start(time.monotonic()))

    def _drive(self, sends: list[Send]) -> None:
        """Hand the conversation's frames to the assembler, then finish the job or wait for its wake-up."""
        job = self.job
        conv: Conversation = job["conv"]
        rid = job["request_id"]
        while sends:
            s, sends = sends[0], sends[1:]
            if s.kind == "begin":
                msg, raw, nrows = dict(job["msg"]), None, 0
            elif s.kind == "chunk":
                a, b = conv.ranges[s.seq]
                msg, raw, nrows = {"type": "chunk", "request_id": rid, "seq": s.seq}, \
                    pack_chunk(rid, s.seq, job["cols"], a, b), b - a
            else:
                msg, raw, nrows = {"type": "end", "request_id": rid}, None, 0
            inbound = Inbound(job["identity"], msg, raw, nrows, None, time.time(), origin="legacy",
                              reply_to=self.myAddress)
            if not self.tell("assembler", inbound):
                sends = conv.blocked(time.monotonic(), RETRY_S)  # no assembler now: begin again later
        if conv.stored is not None:
            if job["truncated"]:
                self.counts["truncated"] += 1
                self.metrics.inc("pairlane_legacy_truncated_total")
                self.log("WARNING", "legacy_truncated", request_id=rid, strategy=job["strategy"],
                         reported=job["reported"], trade_list=job["rows"])
            self._done("stored", rid, job["strategy"], status=ResultStatus.COMPLETE, trades=job["rows"],
                       oos_kind=job["msg"]["oos_kind"], parse_s=f"{job['parse_s']:.3f}",
                       total_s=f"{time.time() - job['started']:.3f}", location=conv.stored.get("location"))
        elif conv.failure is not None:
            f = conv.failure
            if f.exhausted:
                # busy, unavailable or silence: transient. The message stays spooled; start over later.
                self.counts["conversation_restarts"] += 1
                self.log("WARNING", "legacy_retry", request_id=rid, strategy=job["strategy"], code=f.code,
                         attempts=f.attempts, again_in_s=AGAIN_S)
                self.after(AGAIN_S, ("again", job["identity"]))
            else:
                self._done(f"rejected_{f.code}", rid, job["strategy"], why=f.code,
                           detail=f"request {rid}: {f.message}")
        else:
            wake = conv.wake_at
            if job["timer_at"] is None or wake < job["timer_at"]:
                job["timer_at"] = wake
                self.after(wake - time.monotonic(), ("conv", job["identity"], wake))

    def on_message(self, msg, sender) -> None:
        if isinstance(msg, LegacyWritten):
            p = self.pending
            if p is None or msg.token != p["token"]:
                return  # a resend's second confirmation
            if msg.before and ResultStatus(msg.before).stored:
                return self._done("rejected_conflict", p["request_id"], p["strategy"], why="conflict",
                                  detail=f"request {p['request_id']}: a stored ({msg.before}) result has this "
                                         "request_id; a failed result never replaces it")
            return self._done("failed", p["request_id"], p["strategy"], status=ResultStatus.FAILED,
                              error=str(p["meta"].get("error"))[:300], oos_kind=p["meta"].get("oos_kind"),
                              replaced=msg.before or None)
        if not isinstance(msg, Outbound) or self.job is None or self.job["conv"] is None:
            return
        for identity, reply in msg.replies:
            if self.job is None or identity != self.job["identity"]:
                continue
            self._drive(self.job["conv"].on_reply(reply, time.monotonic()))
