"""The legacy actor: swimmy's S-expression BACKTEST_RESULT on a PULL socket (PROTOCOL.md section 2).

Owns: the legacy socket, parsing one message at a time in a worker thread
(so a 30 MB message never stalls a heartbeat or anyone else), the rules of
section 2 (no request_id: rejected and counted; error: a `failed` result
without trades; no trade_list: a result without trades; reported trades
differing from the list: stored with `truncated = 1` and counted), and
feeding the result into the same chunked path a ZMQ producer uses, as a
producer of its own: it drives the one producer conversation
(pairlane.conversation: begin, chunks within the credit window, end, resume)
over Inbound/Outbound messages to the assembler, with chunk frames from the
one chunk encoder (pairlane.chunks). Never evaluates anything (pairlane.sexpr
only reads), never unpickles.
"""
from __future__ import annotations

import collections
import queue
import threading
import time

import zmq

from pairlane import codec, sexpr
from pairlane.chunks import pack_chunk
from pairlane.conversation import Conversation, Send
from pairlane.store import meta_from_message
from pairlane.vocab import ResultStatus

from .base import PairlaneActor
from .messages import Inbound, LegacyResult, Outbound

ROWS_PER_CHUNK = 2560
# legacy chunks handed to the assembler at once (it lets one big chunk at a time wait at the writer,
# so small native results never queue behind more than one)
MAX_WINDOW = 3
RETRY_S = 1.0        # wait when the assembler is away, or a busy reply names no retry_after_s
MAX_ATTEMPTS = 30    # resumes without progress before the result is given up
STALL_S = 30.0       # silence from the assembler after which the conversation resumes


class Legacy(PairlaneActor):
    def on_start(self) -> None:
        g = self.config["gateway"]
        self.max_bytes = g["legacy_max_bytes"]
        self.sock = self.bind_socket(zmq.PULL, g["legacy_endpoint"], MAXMSGSIZE=self.max_bytes, RCVHWM=16)
        self.results: queue.Queue = queue.Queue()
        self.parsing: dict | None = None          # {"started": t, "bytes": n}
        self.job: dict | None = None              # the result being fed into the chunked path
        self.counts = collections.Counter()
        self.seq = 0
        self.after(0.05, "poll")

    def watch_fds(self) -> list:
        return [self.sock.FD] if self._idle() else []

    def _idle(self) -> bool:
        return self.parsing is None and self.job is None and not self._stopping

    def inspect(self) -> dict:
        job = None
        if self.job is not None:
            conv = self.job["conv"]
            job = {"request_id": self.job["request_id"], "total_chunks": len(conv.ranges),
                   "acked": len(conv.acked), "sent": conv.stats["chunks_sent"],
                   "attempts": conv.stats["begins"]}
        return {"parsing": self.parsing, "job": job, **dict(self.counts)}

    # ----- intake -------------------------------------------------------------------------------------
    def on_readable(self, fds) -> None:
        self._next()

    def on_timer(self, payload) -> None:
        if payload == "poll":
            self._collect()
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

    def _next(self) -> None:
        if not self._idle() or not (self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN):
            return
        try:
            frames = self.sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        self.counts["received"] += 1
        self.metrics.inc("pairlane_ingest_messages_total", type="legacy")
        size = sum(len(f) for f in frames)
        self.metrics.inc("pairlane_ingest_bytes_total", size)
        if len(frames) != 1:
            return self._reject("malformed", f"{len(frames)} frames (one expected)")
        data = frames[0]
        self.parsing = {"started": time.monotonic(), "bytes": size}
        threading.Thread(target=self._parse, args=(data,), daemon=True, name="sexpr").start()

    def _parse(self, data: bytes) -> None:
        try:
            self.results.put(("ok", sexpr.parse_backtest_result(data, max_bytes=self.max_bytes)))
        except sexpr.SexprError as exc:
            self.results.put(("error", str(exc)))
        except Exception as exc:  # never let a parser bug kill the thread silently
            self.results.put(("error", f"{type(exc).__name__}: {exc}"))

    def _reject(self, why: str, detail: str) -> None:
        self.counts[f"rejected_{why}"] += 1
        self.metrics.inc("pairlane_legacy_results_total", outcome=f"rejected_{why}")
        self.log("WARNING", "legacy_rejected", why=why, detail=detail[:300])

    def _collect(self) -> None:
        if self.parsing is None:
            return
        try:
            status, res = self.results.get_nowait()
        except queue.Empty:
            return
        took = time.monotonic() - self.parsing["started"]
        self.parsing = None
        if status == "error":
            return self._reject("malformed", res)
        self._convert(res, took)

    # ----- conversion to the chunked path -----------------------------------------------------------
    def _convert(self, r: sexpr.LegacyResult, took: float) -> None:
        rid = r.request_id
        if rid is None or not codec.REQUEST_ID_RE.fullmatch(str(rid)):
            return self._reject("no_request_id", f"request_id {rid!r} missing or invalid")
        name = r.strategy_name or ""
        if not 1 <= len(name) <= 256:
            return self._reject("malformed", f"request {rid}: strategy_name missing or too long")
        m = {"type": "begin", "request_id": rid, "strategy_name": name, "total_trades": r.total_trades,
             "metrics": {k: v for k, v in r.metrics.items() if k in codec.METRIC_KEYS},
             "symbol": r.symbol, "timeframe": r.timeframe, "rank": r.rank, "oos_kind": r.oos_kind,
             "truncated": r.truncated}
        if r.truncated:
            self.counts["truncated"] += 1
            self.metrics.inc("pairlane_legacy_truncated_total")
            self.log("WARNING", "legacy_truncated", request_id=rid, reported=r.metrics.get("trades"),
                     trade_list=r.total_trades)
        if r.error is not None:
            meta = meta_from_message(dict(m, total_chunks=1, error=r.error), "legacy")
            meta["total_trades"] = 0
            self.tell("writer", LegacyResult(meta, ResultStatus.FAILED))
            self.counts["failed_results"] += 1
            self.metrics.inc("pairlane_legacy_results_total", outcome="failed")
            return
        cols = r.columns if r.has_trade_list else {"timestamp": [], "pnl": []}
        try:
            n = codec.check_columns(cols, rid)
        except codec.ProtocolError as exc:
            return self._reject("bad_trades", f"request {rid}: {exc.message}")
        bounds = [(i, min(n, i + ROWS_PER_CHUNK)) for i in range(0, n, ROWS_PER_CHUNK)] or [(0, 0)]
        m["total_chunks"] = len(bounds)
        self.seq += 1
        conv = Conversation(rid, bounds, timeout_s=STALL_S, retries=MAX_ATTEMPTS, max_window=MAX_WINDOW,
                            default_retry_after_s=RETRY_S)
        self.job = {"request_id": rid, "msg": m, "cols": cols, "conv": conv, "timer_at": None,
                    "identity": f"legacy:{self.seq}".encode(), "started": time.time(), "parse_s": took, "rows": n}
        self._drive(conv.start(time.monotonic()))

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
            self.job = None
            self.counts["stored"] += 1
            self.metrics.inc("pairlane_legacy_results_total", outcome="stored")
            self.log("INFO", "legacy_stored", request_id=rid, trades=job["rows"],
                     parse_s=f"{job['parse_s']:.3f}", total_s=f"{time.time() - job['started']:.3f}",
                     location=conv.stored.get("location"))
            self._next()
        elif conv.failure is not None:
            f = conv.failure
            self.job = None
            if f.exhausted:
                self._reject("gave_up", f"request {rid}: not stored after {f.attempts} attempts ({f.code})")
            else:
                self._reject(f.code, f"request {rid}: {f.message}")
            self._next()
        else:
            wake = conv.wake_at
            if job["timer_at"] is None or wake < job["timer_at"]:
                job["timer_at"] = wake
                self.after(wake - time.monotonic(), ("conv", job["identity"], wake))

    def on_message(self, msg, sender) -> None:
        if not isinstance(msg, Outbound) or self.job is None:
            return
        for identity, reply in msg.replies:
            if self.job is None or identity != self.job["identity"]:
                continue
            self._drive(self.job["conv"].on_reply(reply, time.monotonic()))
