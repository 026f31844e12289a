"""The assembler actor: each request's lifecycle (PROTOCOL.md section 1).

Owns: the in-memory state of requests in progress (totals, durable and
in-flight seqs, the producer's identity, idle timers), the credit window and
per-chunk credits, duplicate handling, resend and resume (durable seqs are
recovered from the database through the writer and from the dlq's
inventory, so a restarted assembler or daemon resumes), completion without
waiting for `end`, `abort`, and abandonment after `assembly_timeout_s`.
Memory is bounded by credit x chunk size x max_requests: chunks pass through
as raw bytes and are never kept. Never touches the database or the sockets.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any

from pairlane import codec
from pairlane.store import Store, StoreError, meta_from_message

from .base import PairlaneActor
from .messages import (BeginRequest, ChunkDurable, ChunkRejected, Inbound, Inventory,
                       InventoryRequest, LiveDone, Lookup, LookupReply, Outbound, SetStatus, SweepDone, SweepStale,
                       WriteChunk, WriteLive)

RECENT_DONE = 10000
LOOKUP_TIMEOUT_S = 10.0
LOCAL_LOOKUP_GRACE_S = 10.0
BULK_ROWS = 1024        # chunks with more rows are "big": at most BULK_WINDOW of them at the writer
BULK_WINDOW = 1
INFLIGHT_TIMEOUT_S = 120.0  # no answer from writer/dlq for this long: the chunk is presumed lost


@dataclass
class Req:
    meta: dict
    identity: bytes
    window: int
    kind: str = "chunked"                              # chunked | result
    durable: dict = field(default_factory=dict)        # seq -> (rows, location)
    inflight: dict = field(default_factory=dict)       # seq -> (rows, sent_at)
    status: str = "receiving"                          # receiving | complete | failed
    end_waiting: bytes | None = None
    reply_to: Any = None                               # None: the gateway; else the legacy actor
    began_at: float = field(default_factory=time.time)
    last_activity: float = field(default_factory=time.monotonic)

    @property
    def rid(self) -> str:
        return self.meta["request_id"]

    def same(self, meta: dict) -> bool:
        return all(self.meta[k] == meta[k] for k in ("strategy_name", "total_trades", "total_chunks"))

    def location(self) -> str:
        return "dlq" if any(loc == "dlq" for _, loc in self.durable.values()) else "db"

    def missing(self, limit: int = 1000) -> list[int]:
        """The first `limit` seqs neither durable nor in flight. Stops early: the cost is bounded by the
        chunks that did arrive, never by a declared total_chunks (up to max_result_trades)."""
        out = []
        for s in range(self.meta["total_chunks"]):
            if s not in self.durable and s not in self.inflight:
                out.append(s)
                if len(out) >= limit:
                    break
        return out

    def missing_count(self) -> int:
        return self.meta["total_chunks"] - len(self.durable.keys() | self.inflight.keys())


def stored_reply(rid: str, trades: int, location: str) -> dict:
    return {"type": "stored", "request_id": rid, "trades": trades, "trades_ref": rid, "location": location}


class Assembler(PairlaneActor):
    def on_start(self) -> None:
        g = self.config["gateway"]
        self.credit = g["credit"]
        self.max_requests = g["max_requests"]
        self.timeout_s = g["assembly_timeout_s"]
        self.reqs: dict[str, Req] = {}
        self.lookups: dict[str, tuple[float, list]] = {}   # rid -> (sent_at, queued Inbound)
        self.recent: collections.OrderedDict = collections.OrderedDict()  # rid -> (key, trades, location)
        self.live: dict[str, bytes] = {}                    # batch_id -> identity waiting
        self.inventory: dict[str, dict] = {}                # rid -> {seq: rows} held by the dlq
        self.replies: list = []
        self.resolved: list = []
        self.side_replies: list = []                        # (actor, identity, reply) not via the gateway
        self.reply_targets: dict = {}                       # identity -> actor, for non-ZMQ producers
        self.writer = self.peer("writer")
        self.dlq = self.peer("dlq")
        self.stats = collections.Counter()
        if self.dlq is not None:
            self.send_ordered(self.dlq, InventoryRequest())
        self.last_sweep = time.monotonic()
        self.started = time.monotonic()
        self.status_sent: collections.OrderedDict = collections.OrderedDict()  # rids with status changes sent
        self.sweep_pending = False          # a SweepStale the writer has not confirmed yet
        self.bulk_waiting: collections.deque = collections.deque()  # big chunks not yet sent to the writer
        self.bulk_at_writer = 0
        self.reader = Store(self.config["store"]["path"], busy_timeout_ms=100)

    def on_stop(self) -> None:
        self.reader.close()

    def inspect(self) -> dict:
        return {"requests_in_flight": len(self.reqs),
                "receiving": sum(1 for r in self.reqs.values() if r.status == "receiving"),
                "chunks_in_flight": sum(len(r.inflight) for r in self.reqs.values()),
                "rows_in_flight": sum(n for r in self.reqs.values() for n, _ in r.inflight.values()),
                "lookups_pending": len(self.lookups), "live_batches_pending": len(self.live),
                "dlq_inventory_chunks": sum(len(v) for v in self.inventory.values()),
                "big_chunks_at_writer": self.bulk_at_writer, "big_chunks_waiting": len(self.bulk_waiting),
                "recent_results": len(self.recent), **dict(self.stats)}

    # ----- plumbing ----------------------------------------------------------------------------
    def _reply(self, identity: bytes, reply: dict) -> None:
        target = self.reply_targets.get(identity)
        if target is not None:
            self.side_replies.append((target, identity, reply))
        else:
            self.replies.append((identity, reply))

    def _err(self, identity: bytes, code: str, message: str, rid: str | None, retry: float | None = None) -> None:
        self._reply(identity, codec.error_reply(code, message, rid, retry))

    def _flush(self) -> None:
        if (self.replies or self.resolved) and self.peer("gateway") is not None:
            self.tell("gateway", Outbound(tuple(self.replies), tuple(self.resolved)))
        self.replies = []
        self.resolved = []
        for target, identity, reply in self.side_replies:
            self.send_ordered(target, Outbound(((identity, reply),), ()))
        self.side_replies = []

    def on_directory(self) -> None:
        writer, dlq = self.peer("writer"), self.peer("dlq")
        if writer != self.writer or (dlq != self.dlq and self.dlq is not None):
            # a restarted writer (or dlq, which may have held a batch from the writer) lost what
            # we had sent: those chunks are no longer in flight; producers resend them
            self.writer = writer
            self.sweep_pending = False
            self.bulk_waiting.clear()   # their seqs are in req.inflight: resolved just below
            self.bulk_at_writer = 0
            for req in self.reqs.values():
                for seq in req.inflight:
                    self.resolved.append((req.rid, seq))
                req.inflight.clear()
            for rid, (_, queued) in list(self.lookups.items()):
                for inb in queued:
                    self._err(inb.identity, "busy", "pairlane's writer restarted; retry", rid, 0.5)
                    if inb.raw is not None:
                        self.resolved.append((rid, inb.msg.get("seq", 0)))
            self.lookups.clear()
            for batch_id, identity in self.live.items():
                self._err(identity, "busy", "pairlane's writer restarted; retry", batch_id, 0.5)
                self.resolved.append((batch_id, -1))
            self.live.clear()
            self._flush()
        if dlq != self.dlq:
            self.dlq = dlq
            if dlq is not None:
                self.send_ordered(dlq, InventoryRequest())

    # ----- messages ---------------------------------------------------------------------------------
    def on_message(self, msg, sender) -> None:
        if isinstance(msg, Inbound):
            self._inbound(msg)
        elif isinstance(msg, ChunkDurable):
            self._durable(msg)
        elif isinstance(msg, ChunkRejected):
            self._rejected(msg)
        elif isinstance(msg, LookupReply):
            self._looked_up(msg)
        elif isinstance(msg, SweepDone):
            self.sweep_pending = False
        elif isinstance(msg, LiveDone):
            self._live_done(msg)
        elif isinstance(msg, Inventory):
            self.inventory = {}
            for rid, seq, rows in msg.items:
                self.inventory.setdefault(rid, {})[seq] = rows
        self._flush()

    def _inbound(self, inb: Inbound) -> None:
        m = inb.msg
        t = m["type"]
        rid = m["request_id"]
        self.stats[f"in_{t}"] += 1
        if inb.reply_to is not None:
            self.reply_targets[inb.identity] = inb.reply_to
            if len(self.reply_targets) > 1000:
                self.reply_targets.pop(next(iter(self.reply_targets)))
        if t == "live_trades":
            if self.writer is None:
                self.resolved.append((rid, -1))
                return self._err(inb.identity, "unavailable", "pairlane's writer is restarting", rid, 1.0)
            self.live[rid] = inb.identity
            self.send_ordered(self.writer, WriteLive(rid, inb.raw, inb.nrows, reply_to=self.myAddress))
            return
        if rid in self.lookups:
            self.lookups[rid][1].append(inb)
            return
        handler = getattr(self, "_on_" + t)
        handler(inb, rid)

    def _start_lookup(self, inb: Inbound, rid: str) -> None:
        row = self._local_lookup(rid)
        if row is not False:
            self.lookups[rid] = (time.monotonic(), [inb])
            return self._looked_up(LookupReply(rid, row))
        if self.writer is None:
            if inb.raw is not None:
                self.resolved.append((rid, inb.msg.get("seq", 0)))
            return self._err(inb.identity, "unavailable", "pairlane's writer is restarting", rid, 1.0)
        self.lookups[rid] = (time.monotonic(), [inb])
        self.send_ordered(self.writer, Lookup(rid))

    def _local_lookup(self, rid: str):
        """The database's view of rid read here (no queueing behind bulk writes at the writer), or
        False when only the writer can answer in order: a status change for rid was sent to it and
        may not be applied yet, or this assembler has just started (its predecessor's changes may
        still be queued there)."""
        if rid in self.status_sent or self.sweep_pending or \
                time.monotonic() - self.started < LOCAL_LOOKUP_GRACE_S:
            return False
        try:
            if not self.reader.open_readonly():
                return None
            return self.reader.lookup(rid)
        except StoreError:
            self.reader.close()
            return False

    def _to_writer_status(self, msg) -> None:
        """Send a status change to the writer, remembering that lookups of it must go through there."""
        rid = msg.meta["request_id"] if isinstance(msg, BeginRequest) else msg.request_id
        self.status_sent[rid] = None
        self.status_sent.move_to_end(rid)
        while len(self.status_sent) > RECENT_DONE:
            self.status_sent.popitem(last=False)
        self.send_ordered(self.writer, msg)

    def _busy_check(self, inb: Inbound, rid: str) -> bool:
        active = sum(1 for r in self.reqs.values() if r.status == "receiving") + len(self.lookups)
        if active >= self.max_requests:
            if inb.raw is not None:
                self.resolved.append((rid, inb.msg.get("seq", 0)))
            self._err(inb.identity, "busy", f"{active} requests in progress, at gateway.max_requests "
                      f"= {self.max_requests}", rid, 1.0)
            return True
        return False

    def _recent_key(self, meta: dict) -> tuple:
        return (meta["strategy_name"], meta["total_trades"], meta["total_chunks"])

    def _on_begin(self, inb: Inbound, rid: str, row: dict | None = None, looked_up: bool = False) -> None:
        meta = meta_from_message(inb.msg, inb.origin)
        if inb.origin != "legacy":
            meta["truncated"] = 0
        req = self.reqs.get(rid)
        if req is not None:
            if not req.same(meta):
                return self._conflict(inb, rid, req.meta)
            if inb.bad is not None:
                return self._bad_result(inb, rid)
            req.identity = inb.identity
            req.last_activity = time.monotonic()
            if req.status == "complete":
                return self._reply(inb.identity, stored_reply(rid, req.meta["total_trades"], req.location()))
            if req.status == "failed":
                self.reqs.pop(rid)  # start over
                return self._on_begin(inb, rid)
            return self._reply(inb.identity, {"type": "credit", "request_id": rid, "credit": req.window})
        if rid in self.recent:
            key, trades, loc = self.recent[rid]
            if key != self._recent_key(meta):
                return self._conflict(inb, rid, None)
            if inb.bad is not None:
                return self._bad_result(inb, rid)
            return self._reply(inb.identity, stored_reply(rid, trades, loc))
        if not looked_up:
            if inb.bad is None and self._busy_check(inb, rid):
                return
            return self._start_lookup(inb, rid)
        if row is not None and row["status"] in ("complete", "receiving", "spooled"):
            if (row["strategy_name"], row["total_trades"], row["total_chunks"]) != self._recent_key(meta):
                return self._conflict(inb, rid, None)
        if inb.bad is not None:
            return self._bad_result(inb, rid)
        if row is not None and row["status"] in ("complete", "receiving", "spooled"):
            if row["status"] == "complete":
                self._remember(rid, meta, "db")
                return self._reply(inb.identity, stored_reply(rid, row["total_trades"], "db"))
        req = Req(meta=meta, identity=inb.identity, window=min(self.credit, meta["total_chunks"]),
                  kind="result" if inb.msg["type"] == "result" else "chunked")
        if row is not None and row["status"] in ("receiving", "spooled"):
            for seq, rows in row["durable"].items():
                req.durable[seq] = (rows, "db")
        for seq, rows in self.inventory.get(rid, {}).items():
            req.durable.setdefault(seq, (rows, "dlq"))
        self.reqs[rid] = req
        self.stats["begun"] += 1
        if row is None or row["status"] in ("failed", "abandoned"):
            self._to_writer_status(BeginRequest(meta))  # visible as `receiving` at once (or starts over)
        if req.kind == "result":
            return self._on_chunk(Inbound(inb.identity, dict(inb.msg, seq=0), inb.raw, inb.nrows, inb.bad,
                                          inb.received_at, inb.origin, inb.reply_to), rid)
        self._reply(inb.identity, {"type": "credit", "request_id": rid, "credit": req.window})
        self._settle(req)

    def _on_result(self, inb: Inbound, rid: str, row=None, looked_up=False) -> None:
        req = self.reqs.get(rid)
        if req is not None and req.status != "complete":
            same = req.kind == "result" and req.same(meta_from_message(inb.msg, inb.origin))
            if same and inb.bad is not None:
                return self._bad_result(inb, rid)
            if same and req.status == "receiving":
                # the same one-message result again while the first is being written (a producer
                # resending after a timeout): a duplicate of its only chunk, answered once durable
                return self._on_chunk(Inbound(inb.identity, dict(inb.msg, seq=0), inb.raw, inb.nrows, None,
                                              inb.received_at, inb.origin, inb.reply_to), rid)
            if inb.raw is not None:
                self.resolved.append((rid, 0))
            return self._err(inb.identity, "conflict", f"request {rid} is in progress (as a chunked request "
                             "or with another strategy_name or totals)", rid)
        self._on_begin(inb, rid, row, looked_up)

    def _bad_result(self, inb: Inbound, rid: str) -> None:
        """A result message whose verdict (`incomplete`: rows differ from total_trades) comes after the
        conflict checks, as PROTOCOL.md orders them. Nothing of it is written."""
        self._err(inb.identity, inb.bad[0], inb.bad[1], rid)

    def _conflict(self, inb: Inbound, rid: str, meta: dict | None) -> None:
        if inb.raw is not None:
            self.resolved.append((rid, inb.msg.get("seq", 0)))
        self.stats["conflicts"] += 1
        self._err(inb.identity, "conflict", f"request {rid} exists with another strategy_name or totals; "
                  "use a new request_id", rid)

    def _looked_up(self, msg: LookupReply) -> None:
        entry = self.lookups.pop(msg.request_id, None)
        if entry is None:
            return
        queued = entry[1]
        row = msg.row
        first, rest = queued[0], queued[1:]
        t = first.msg["type"]
        if t in ("begin", "result"):
            getattr(self, "_on_" + t)(first, msg.request_id, row, True)
        elif t == "end":
            self._on_end(first, msg.request_id, row, True)
        elif t == "abort":
            self._on_abort(first, msg.request_id, row, True)
        for inb in rest:
            self._inbound(inb)

    def _on_chunk(self, inb: Inbound, rid: str) -> None:
        seq = inb.msg["seq"]
        req = self.reqs.get(rid)
        key = (rid, seq)
        if req is None:
            self.resolved.append(key)
            if rid in self.recent:
                return self._reply(inb.identity, {"type": "credit", "request_id": rid, "credit": 1, "seq": seq})
            return self._err(inb.identity, "unknown_request", f"request {rid} is not in progress "
                             "(never begun, finished, abandoned or lost in a restart): send begin again", rid)
        req.last_activity = time.monotonic()
        req.identity = inb.identity
        if inb.bad is not None:
            self.resolved.append(key)
            return self._err(inb.identity, inb.bad[0], inb.bad[1], rid)
        if seq >= req.meta["total_chunks"]:
            self.resolved.append(key)
            return self._err(inb.identity, "bad_chunk", f"seq {seq} out of range 0..{req.meta['total_chunks'] - 1}", rid)
        if seq in req.durable:
            self.resolved.append(key)
            if req.kind == "result":
                return self._reply(inb.identity, stored_reply(rid, req.meta["total_trades"], req.location()))
            return self._reply(inb.identity, {"type": "credit", "request_id": rid, "credit": 1, "seq": seq})
        if seq in req.inflight:
            return  # dropped silently: its credit comes when it is durable (gateway still counts it)
        if self.writer is None:
            self.resolved.append(key)
            return self._err(inb.identity, "unavailable", "pairlane's writer is restarting", rid, 1.0)
        req.inflight[seq] = (inb.nrows, time.monotonic())
        work = WriteChunk(req.meta, seq, inb.raw, inb.nrows, reply_to=self.myAddress)
        if inb.nrows > BULK_ROWS:
            # Thespian delivers our messages to the writer in order, one per turn of its loop: a
            # small result's chunk must never queue behind more than BULK_WINDOW big ones.
            self.bulk_waiting.append(work)
            self._feed_bulk()
        else:
            self.send_ordered(self.writer, work)

    def _feed_bulk(self) -> None:
        while self.bulk_waiting and self.bulk_at_writer < BULK_WINDOW and self.writer is not None:
            work = self.bulk_waiting.popleft()
            req = self.reqs.get(work.meta["request_id"])
            if req is None or work.seq not in req.inflight:
                self.resolved.append((work.meta["request_id"], work.seq))  # aborted or abandoned meanwhile
                continue
            self.bulk_at_writer += 1
            self.send_ordered(self.writer, work)

    def _durable(self, msg: ChunkDurable) -> None:
        key = (msg.request_id, msg.seq)
        self.resolved.append(key)
        if msg.location == "dlq":
            self.inventory.setdefault(msg.request_id, {})[msg.seq] = msg.nrows
        req = self.reqs.get(msg.request_id)
        sent = req.inflight.pop(msg.seq, None) if req is not None else None
        self._bulk_done(sent, msg.nrows)
        if req is None:
            return
        if sent is not None:
            self.metrics.observe("pairlane_chunk_assembly_seconds", time.monotonic() - sent[1])
        if msg.status == "discarded":
            return
        req.durable[msg.seq] = (msg.nrows, msg.location)
        if msg.status == "failed":
            req.status = "failed"
        if req.kind == "chunked":
            self._reply(req.identity, {"type": "credit", "request_id": req.rid, "credit": 1, "seq": msg.seq})
        self._settle(req)

    def _settle(self, req: Req) -> None:
        """All chunks durable? Then the result is complete (or failed) now, `end` or not."""
        total = req.meta["total_chunks"]
        if len(req.durable) == total and req.status == "receiving":
            rows = sum(r for r, _ in req.durable.values())
            if rows != req.meta["total_trades"]:
                req.status = "failed"
                self._to_writer_status(SetStatus(req.rid, "failed",
                                                 f"rows add up to {rows}, total_trades is {req.meta['total_trades']}"))
            else:
                req.status = "complete"
                loc = req.location()
                if loc == "dlq":
                    self._to_writer_status(SetStatus(req.rid, "spooled"))
                self._remember(req.rid, req.meta, loc)
                self.metrics.inc("pairlane_results_total", outcome="stored_" + loc)
                self.metrics.observe("pairlane_result_receive_seconds", time.time() - req.began_at)
                self.metrics.set("pairlane_last_result_timestamp_seconds", time.time())
                self.stats["completed"] += 1
        if req.status == "failed" and len(req.durable) == total:
            self.metrics.inc("pairlane_results_total", outcome="failed")
            self.stats["failed"] += 1
        if req.kind == "result" and len(req.durable) == total:
            if req.status == "complete":
                self._reply(req.identity, stored_reply(req.rid, req.meta["total_trades"], req.location()))
            else:
                self._err(req.identity, "incomplete", "the result's rows do not add up to total_trades", req.rid)
                self.reqs.pop(req.rid, None)
            return
        if req.end_waiting is not None and not req.inflight:
            identity, req.end_waiting = req.end_waiting, None
            self._answer_end(req, identity)

    def _bulk_done(self, sent, nrows=None) -> None:
        """A chunk came back from the writer: if it was a big one, let the next big one go."""
        rows = sent[0] if sent is not None else nrows
        if rows is not None and rows > BULK_ROWS and self.bulk_at_writer > 0:
            self.bulk_at_writer -= 1
            self._feed_bulk()

    def _remember(self, rid: str, meta: dict, location: str) -> None:
        self.recent[rid] = (self._recent_key(meta), meta["total_trades"], location)
        self.recent.move_to_end(rid)
        while len(self.recent) > RECENT_DONE:
            self.recent.popitem(last=False)

    def _rejected(self, msg: ChunkRejected) -> None:
        self.resolved.append((msg.request_id, msg.seq))
        req = self.reqs.get(msg.request_id)
        sent = req.inflight.pop(msg.seq, None) if req is not None else None
        self._bulk_done(sent, None)
        if req is None:
            return
        self._err(req.identity, msg.code, msg.message, req.rid, msg.retry_after_s)

    def _live_done(self, msg: LiveDone) -> None:
        self.resolved.append((msg.batch_id, -1))
        identity = self.live.pop(msg.batch_id, None)
        if identity is None:
            return
        if msg.code:
            return self._err(identity, msg.code, msg.message or "", msg.batch_id, msg.retry_after_s)
        self._reply(identity, stored_reply(msg.batch_id, msg.nrows, msg.location))

    def _on_end(self, inb: Inbound, rid: str, row=None, looked_up=False) -> None:
        req = self.reqs.get(rid)
        if req is None:
            if rid in self.recent:
                _, trades, loc = self.recent[rid]
                return self._reply(inb.identity, stored_reply(rid, trades, loc))
            if not looked_up:
                return self._start_lookup(inb, rid)
            if row is not None and row["status"] == "complete":
                return self._reply(inb.identity, stored_reply(rid, row["total_trades"], "db"))
            return self._err(inb.identity, "unknown_request", f"request {rid} is not in progress: send begin", rid)
        req.last_activity = time.monotonic()
        req.identity = inb.identity
        if req.inflight:
            req.end_waiting = inb.identity
            return
        self._answer_end(req, inb.identity)

    def _answer_end(self, req: Req, identity: bytes) -> None:
        if req.status == "complete":
            return self._reply(identity, stored_reply(req.rid, req.meta["total_trades"], req.location()))
        if req.status == "failed":
            self.reqs.pop(req.rid, None)
            r = codec.error_reply("incomplete", "every chunk arrived but the rows do not add up to "
                                  "total_trades; the result failed and its rows were removed: begin again",
                                  req.rid)
            r["missing"] = list(range(min(req.meta["total_chunks"], 1000)))
            return self._reply(identity, r)
        r = codec.error_reply("incomplete", f"{req.missing_count()} chunk(s) never arrived: send them, "
                              "then end again (`missing` lists at most 1000)", req.rid)
        r["missing"] = req.missing(1000)
        self._reply(identity, r)

    def _on_abort(self, inb: Inbound, rid: str, row=None, looked_up=False) -> None:
        req = self.reqs.get(rid)
        if ((req is not None and req.status == "complete") or rid in self.recent
                or (row is not None and row["status"] in ("complete", "spooled"))):
            return self._err(inb.identity, "conflict", f"request {rid} is already stored; abort drops only "
                             "unfinished requests", rid)
        if req is None and not looked_up and self.writer is not None:
            # not in memory (e.g. after a restart): it may be stored; ask the database before answering
            return self._start_lookup(inb, rid)
        if req is not None:
            self.reqs.pop(rid)
            for seq in req.inflight:
                self.resolved.append((rid, seq))
        if self.writer is not None:
            self._to_writer_status(SetStatus(rid, "abandoned", "aborted by producer"))
        self.metrics.inc("pairlane_results_total", outcome="aborted")
        self._reply(inb.identity, {"type": "aborted", "request_id": rid})

    # ----- timers -----------------------------------------------------------------------------------
    def tick(self) -> None:
        now = time.monotonic()
        for req in self.reqs.values():  # safety net: a chunk whose answer was lost is not in flight forever
            for seq, (rows, sent_at) in list(req.inflight.items()):
                if now - sent_at > INFLIGHT_TIMEOUT_S and not any(
                        w.meta["request_id"] == req.rid and w.seq == seq for w in self.bulk_waiting):
                    req.inflight.pop(seq)
                    self.resolved.append((req.rid, seq))
                    self._bulk_done((rows, sent_at))
                    self.log("WARNING", "chunk_answer_lost", request_id=req.rid, seq=seq)
        for rid, req in list(self.reqs.items()):
            idle = now - req.last_activity
            if req.status == "receiving" and not req.inflight and idle > self.timeout_s:
                self.reqs.pop(rid)
                self.stats["abandoned"] += 1
                self.metrics.inc("pairlane_results_total", outcome="abandoned")
                self.log("WARNING", "request_abandoned", request_id=rid, idle_s=f"{idle:.1f}",
                         durable=len(req.durable), total_chunks=req.meta["total_chunks"])
                if self.writer is not None:
                    self._to_writer_status(SetStatus(rid, "abandoned", f"idle for {idle:.0f}s"))
            elif req.status != "receiving" and idle > min(self.timeout_s, 30.0) and not req.inflight:
                self.reqs.pop(rid)
        for rid, (sent_at, queued) in list(self.lookups.items()):
            if now - sent_at > LOOKUP_TIMEOUT_S:
                self.lookups.pop(rid)
                for inb in queued:
                    if inb.raw is not None:
                        self.resolved.append((rid, inb.msg.get("seq", 0)))
                    self._err(inb.identity, "busy", "the database did not answer in time; retry", rid, 1.0)
        if now - self.last_sweep > max(1.0, self.timeout_s / 2) and self.writer is not None:
            self.last_sweep = now
            # a request with chunks waiting in the dlq is stored, never stale (PROTOCOL section 1)
            active = frozenset(self.reqs) | frozenset(self.lookups) | frozenset(self.inventory)
            self.sweep_pending = True
            self.send_ordered(self.writer, SweepStale(time.time() - self.timeout_s, active))
            if self.dlq is not None:
                self.send_ordered(self.dlq, InventoryRequest())  # landed or purged items drop out
        self._flush()
