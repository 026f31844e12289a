"""The legacy actor: swimmy's S-expression BACKTEST_RESULT on a PULL socket (PROTOCOL.md section 2).

Owns: the legacy socket, parsing one message at a time in a worker thread
(so a 30 MB message never stalls a heartbeat or anyone else), the rules of
section 2 (no request_id: rejected and counted; error: a `failed` result
without trades; no trade_list: a result without trades; reported trades
differing from the list: stored with `truncated = 1` and counted), and
feeding the result into the same chunked path a ZMQ producer uses (begin,
chunks within the credit window, end), as a producer of its own. Never
evaluates anything (pairlane.sexpr only reads), never unpickles.
"""
from __future__ import annotations

import collections
import queue
import threading
import time

import numpy as np
import zmq

from pairlane import codec, sexpr
from pairlane.store import meta_from_message

from .base import PairlaneActor
from .messages import Inbound, LegacyResult, Outbound

ROWS_PER_CHUNK = 2560
# legacy chunks handed to the assembler at once (it lets one big chunk at a time wait at the writer,
# so small native results never queue behind more than one)
MAX_WINDOW = 3
RETRY_S = 1.0
MAX_ATTEMPTS = 30


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
            job = {k: self.job[k] for k in ("request_id", "total_chunks", "acked", "sent", "attempts")}
            job["acked"] = len(self.job["acked"])
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
        elif payload == "retry" and self.job is not None:
            self._begin()
        elif isinstance(payload, tuple) and payload[0] == "stall":
            # no answer for a while (assembler restarted, replies lost): begin again, as a producer would
            if self.job is not None and self.job["identity"] == payload[1] and self.job["attempts"] == payload[2]:
                self._begin()

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
            self.tell("writer", LegacyResult(meta, "failed"))
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
        self.job = {"request_id": rid, "msg": m, "cols": cols, "bounds": bounds, "total_chunks": len(bounds),
                    "identity": f"legacy:{self.seq}".encode(), "acked": set(), "sent": 0, "window": 0,
                    "next": 0, "attempts": 0, "started": time.time(), "parse_s": took, "rows": n}
        self._begin()

    def _frame(self, seq: int) -> tuple[bytes, int]:
        a, b = self.job["bounds"][seq]
        trades = {}
        for k, v in self.job["cols"].items():
            part = v[a:b]
            if k in codec.INT_COLS and None not in part:
                trades[k] = np.asarray(part, dtype="<i8").tobytes()
            elif k in codec.FLOAT_COLS and None not in part:
                trades[k] = np.asarray(part, dtype="<f8").tobytes()
            else:
                trades[k] = part
        return codec.pack({"type": "chunk", "request_id": self.job["request_id"], "seq": seq,
                           "trades": trades}), b - a

    def _inbound(self, msg: dict, raw: bytes | None = None, nrows: int = 0) -> None:
        self.tell("assembler", Inbound(self.job["identity"], msg, raw, nrows, None, time.time(),
                                       origin="legacy", reply_to=self.myAddress))

    def _begin(self) -> None:
        job = self.job
        job["attempts"] += 1
        if job["attempts"] > MAX_ATTEMPTS:
            self._reject("gave_up", f"request {job['request_id']}: not stored after {MAX_ATTEMPTS} attempts")
            self.job = None
            return
        if self.peer("assembler") is None:
            self.after(RETRY_S, "retry")
            return
        job["window"] = 0
        job["inflight"] = set()
        self._inbound(dict(job["msg"]))
        self.after(30.0, ("stall", job["identity"], job["attempts"]))

    def _pump(self) -> None:
        job = self.job
        while len(job["inflight"]) < job["window"]:
            seq = next((s for s in range(job["total_chunks"])
                        if s not in job["acked"] and s not in job["inflight"]), None)
            if seq is None:
                break
            raw, nrows = self._frame(seq)
            job["inflight"].add(seq)
            job["sent"] += 1
            self._inbound({"type": "chunk", "request_id": job["request_id"], "seq": seq}, raw, nrows)
        if len(job["acked"]) == job["total_chunks"] and not job.get("end_sent"):
            job["end_sent"] = True
            self._inbound({"type": "end", "request_id": job["request_id"]})

    def on_message(self, msg, sender) -> None:
        if not isinstance(msg, Outbound) or self.job is None:
            return
        for identity, reply in msg.replies:
            if identity != self.job["identity"]:
                continue
            t = reply.get("type")
            if t == "credit" and "seq" not in reply:
                self.job["window"] = min(MAX_WINDOW, reply["credit"])
                self.job["end_sent"] = False
                self._pump()
            elif t == "credit":
                self.job["acked"].add(reply["seq"])
                self.job["inflight"].discard(reply["seq"])
                self._pump()
            elif t == "stored":
                job = self.job
                self.job = None
                self.counts["stored"] += 1
                self.metrics.inc("pairlane_legacy_results_total", outcome="stored")
                self.log("INFO", "legacy_stored", request_id=job["request_id"], trades=job["rows"],
                         parse_s=f"{job['parse_s']:.3f}", total_s=f"{time.time() - job['started']:.3f}",
                         location=reply.get("location"))
                self._next()
            elif t == "error":
                code = reply.get("code")
                if code in ("busy", "unavailable", "unknown_request") or (code == "incomplete" and reply.get("missing")):
                    self.job["acked"] -= set(reply.get("missing") or ())
                    self.after(float(reply.get("retry_after_s") or RETRY_S), "retry")
                    self.job["window"] = 0
                else:
                    self._reject(code or "error", f"request {self.job['request_id']}: {reply.get('message')}")
                    self.job = None
                    self._next()
