"""The dlq actor: the dead-letter queue keeper (PROTOCOL.md sections 1 and 4).

Owns: the spool (`pairlane.spool`), taking every batch the writer could not
commit (durable on disk before the producer's credit), automatic redelivery
to the writer with exponential backoff and jitter, parking after
`dlq.max_attempts` (kept, never dropped, `dlq_parked` alert), operator
replay (one or all, rate-limited, one replay at a time, progress in
`inspect dlq`) and purge (the admin commands dlq.*: their handlers below, the
commands declared in pairlane.admin_commands), the inventory of spooled chunks the assembler
needs to resume, and the dlq metrics. Never writes SQLite itself and never
drops an item on its own.
"""
from __future__ import annotations

import collections
import time

from pairlane import spool as spoolmod
from pairlane.lifecycle import totals
from pairlane.spool import Spool, SpoolFull
from pairlane.vocab import AlertName, AlertState, ResultStatus

from .base import PairlaneActor
from .admin import serve_admin
from .messages import (AdminCommand, ChunkDurable, ChunkRejected, Inventory, InventoryRequest,
                       LiveDone, RetryDone, SpoolBatch, WriteChunk, WriteLive)

RETRY_TIMEOUT_S = 30.0
RETRY_WINDOW = 2
FULL_RETRY_AFTER_S = 5.0


class DLQ(PairlaneActor):
    def on_start(self) -> None:
        d = self.config["dlq"]
        self.spool = Spool(d["path"], d["max_bytes"])
        self.min_s, self.max_s = float(d["retry_min_s"]), float(d["retry_max_s"])
        self.max_attempts = d["max_attempts"]
        self.inflight: dict[str, float] = {}    # item id -> sent at
        self.healthy = False                    # last retry landed: the rest need not wait
        self.replay: dict | None = None         # {"ids": deque, "rate", "total", "done", "ok", "failed", ...}
        self.counts = collections.Counter()
        for name, reason in self.spool.quarantined:
            self.log("ERROR", "dlq_item_quarantined", file=name, reason=reason)
            self.counts["quarantined_total"] += 1
        if len(self.spool):
            self.log("WARNING", "dlq_items_recovered", items=len(self.spool), bytes=self.spool.total_bytes)
        self._gauges()
        if self.spool.parked_count:
            self._parked_alert()
        self.metrics_restarted()   # the metrics actor of now has just been sent all of it
        self.after(0.1, "retry")

    def on_reload(self, old_config: dict, new_config: dict) -> None:
        """SIGHUP: new retry bounds apply to the next retry scheduled (dlq.path and max_bytes need a restart)."""
        d = new_config["dlq"]
        self.min_s, self.max_s = float(d["retry_min_s"]), float(d["retry_max_s"])
        self.max_attempts = d["max_attempts"]

    def inspect(self) -> dict:
        oldest = self.spool.oldest_first_failed_at
        rp = None
        if self.replay is not None:
            rp = {k: v for k, v in self.replay.items() if k != "ids"}
            rp["remaining"] = len(self.replay["ids"])
        # event counters first: a counter must never hide a live figure of the same name
        return {**dict(self.counts), "depth": len(self.spool), "bytes": self.spool.total_bytes,
                "oldest_item_age_s": round(time.time() - oldest, 3) if oldest else 0.0,
                "parked": self.spool.parked_count, "retries_in_flight": len(self.inflight),
                "replay": rp, "quarantined": [q[0] for q in self.spool.quarantined],
                "max_bytes": self.spool.max_bytes}

    # ----- intake ------------------------------------------------------------------------------
    def on_message(self, msg, sender) -> None:
        if isinstance(msg, SpoolBatch):
            self._take(msg)
        elif isinstance(msg, RetryDone):
            self._retried(msg)
        elif isinstance(msg, InventoryRequest):
            self.send_ordered(sender, self._inventory())
        elif isinstance(msg, AdminCommand):
            serve_admin(self, msg, sender)

    def _inventory(self) -> Inventory:
        return Inventory(tuple((it.request_id, it.seq, it.meta.get("nrows", 0), totals(it.meta["meta"]))
                               for it in self.spool.items() if it.stage == "chunk"))

    def on_directory(self) -> None:
        self.inflight.clear()  # a restarted writer lost what we sent it; retry later
        if self.metrics_restarted():   # it starts from zero: our gauges and a parked alert again
            self._gauges()
            if self.spool.parked_count:
                self._parked_alert()
            self.flush_metrics()

    def _take(self, sb: SpoolBatch) -> None:
        w = sb.work
        now = time.time()
        if isinstance(w, WriteChunk):
            kw = dict(request_id=w.meta["request_id"], seq=w.seq, stage="chunk",
                      meta={"meta": w.meta, "nrows": w.nrows})
        else:
            kw = dict(request_id=w.batch_id, seq=None, stage="live_trades", meta={"nrows": w.nrows})
        try:
            item = self.spool.put(reason=sb.reason, error=sb.error, payload=w.raw, now=now,
                                  next_retry_at=now + spoolmod.backoff(1, self.min_s, self.max_s), **kw)
        except (SpoolFull, OSError) as exc:
            self.counts["rejected"] += 1
            self.log("ERROR", "dlq_full", request_id=kw["request_id"], error=exc)
            msg = (f"the database cannot take data ({sb.reason}) and the dead-letter spool is full "
                   f"({exc}); keep the data and retry")
            if isinstance(w, WriteChunk):
                self.send_ordered(w.reply_to, ChunkRejected(w.meta["request_id"], w.seq, "unavailable", msg,
                                                            FULL_RETRY_AFTER_S))
            else:
                self.send_ordered(w.reply_to, LiveDone(w.batch_id, w.nrows, "", "", "unavailable", msg,
                                                       FULL_RETRY_AFTER_S))
            return
        self.healthy = False
        self.counts["spooled"] += 1
        self.log("WARNING", "dlq_spooled", item=item.id, request_id=item.request_id, seq=item.seq,
                 reason=sb.reason, bytes=item.bytes)
        if isinstance(w, WriteChunk):
            self.send_ordered(w.reply_to, ChunkDurable(w.meta["request_id"], w.seq, "dlq", ResultStatus.SPOOLED, w.nrows))
        else:
            self.send_ordered(w.reply_to, LiveDone(w.batch_id, w.nrows, "dlq", "stored"))
        self._gauges()

    # ----- retry ------------------------------------------------------------------------------------
    def on_timer(self, payload) -> None:
        if payload != "retry":
            return
        now = time.time()
        for iid, sent in list(self.inflight.items()):
            if now - sent > RETRY_TIMEOUT_S:
                self.inflight.pop(iid)
        writer = self.peer("writer")
        if writer is not None:
            self._feed_replay(now, writer)
            if self.healthy:
                due = [it for it in self.spool.items() if not it.parked]
            else:  # earliest due first: oldest-id-first starved the newest items while the db failed
                due = sorted(self.spool.due(now), key=lambda it: (it.next_retry_at, it.id))
            for it in due:
                if len(self.inflight) >= RETRY_WINDOW:
                    break
                if it.id not in self.inflight:
                    self._send_retry(it.id, writer, now)
        self._gauges()
        if not self._stopping:
            self.after(0.1 if (self.healthy and len(self.spool)) or self.replay else 0.25, "retry")

    def _send_retry(self, iid: str, writer, now: float) -> bool:
        try:
            it = self.spool.get(iid)
        except KeyError:
            return False
        if it.stage == "chunk":
            work = WriteChunk(it.meta["meta"], it.seq, it.payload, it.meta["nrows"], None, it.id)
        else:
            work = WriteLive(it.request_id, it.payload, it.meta["nrows"], None, it.id)
        self.inflight[iid] = now
        self.send_ordered(writer, work)
        return True

    def _retried(self, rd: RetryDone) -> None:
        self.inflight.pop(rd.item_id, None)
        replaying = self.replay is not None and rd.item_id in self.replay["waiting"]
        if replaying:
            self.replay["waiting"].discard(rd.item_id)
            self.replay["ok" if rd.ok else "failed"] += 1
        if rd.item_id not in self.spool:
            return
        now = time.time()
        if rd.ok:
            it = self.spool.header(rd.item_id)
            self.spool.remove(rd.item_id)
            self.healthy = True
            # `discarded`: its result was abandoned or failed meanwhile, the rows were not kept
            outcome = "discarded" if rd.reason == "discarded" else "landed"
            self.counts[outcome] += 1
            self.metrics.inc("pairlane_dlq_replayed_total", outcome=outcome)
            self.log("WARNING" if outcome == "discarded" else "INFO", f"dlq_item_{outcome}", item=rd.item_id,
                     request_id=it.request_id, seq=it.seq, attempts=it.attempts,
                     age_s=f"{now - it.first_failed_at:.1f}")
        else:
            self.healthy = False
            it = self.spool.header(rd.item_id)
            attempts = it.attempts + 1
            park = it.parked or attempts >= self.max_attempts + 1
            self.spool.record_failure(rd.item_id, rd.error, rd.reason, now,
                                      now + spoolmod.backoff(attempts, self.min_s, self.max_s), park)
            self.metrics.inc("pairlane_dlq_replayed_total", outcome="failed")
            if park and not it.parked:
                self.counts["parked_total"] += 1
                self.log("ERROR", "dlq_item_parked", item=rd.item_id, request_id=it.request_id,
                         attempts=attempts, error=rd.error)
                self._parked_alert()
        self._gauges()
        if self.spool.parked_count == 0:
            self.alert(AlertName.DLQ_PARKED, AlertState.CLEARED)

    def _parked_alert(self) -> None:
        self.alert(AlertName.DLQ_PARKED, AlertState.RAISED, {"parked": self.spool.parked_count,
                                                         "items": len(self.spool)})

    def _gauges(self) -> None:
        oldest = self.spool.oldest_first_failed_at
        self.metrics.set("pairlane_dlq_items", float(len(self.spool)))
        self.metrics.set("pairlane_dlq_parked_items", float(self.spool.parked_count))
        self.metrics.set("pairlane_dlq_bytes", float(self.spool.total_bytes))
        self.metrics.set("pairlane_dlq_oldest_item_age_seconds", time.time() - oldest if oldest else 0.0)

    # ----- operator ------------------------------------------------------------------------------------
    def _feed_replay(self, now: float, writer) -> None:
        rp = self.replay
        if rp is None:
            return
        budget = int((now - rp["started_at"]) * rp["rate"]) + 1 - rp["sent"]
        while budget > 0 and rp["ids"]:
            iid = rp["ids"].popleft()
            if iid in self.spool and iid not in self.inflight and self._send_retry(iid, writer, now):
                rp["waiting"].add(iid)
                rp["sent"] += 1
            else:
                rp["skipped"] += 1
            budget -= 1
        if not rp["ids"] and not rp["waiting"]:
            rp["finished_at"] = now
            self.log("INFO", "dlq_replay_finished", ok=rp["ok"], failed=rp["failed"], skipped=rp["skipped"])
            self.replay = None

    # admin commands (declared, with their args checked, in pairlane.admin_commands)
    def admin_dlq_list(self, args: dict, respond) -> dict:
        return {"ok": True, "total": len(self.spool),
                "items": [self._row(it) for it in self.spool.items()[:args["limit"]]]}

    def admin_dlq_show(self, args: dict, respond) -> dict:
        try:
            it = self.spool.get(args["id"])
        except KeyError:
            return {"ok": False, "error": f"no dlq item {args['id']!r}"}
        row = self._row(it)
        row.update(error=it.error, next_retry_at=it.next_retry_at, stage=it.stage,
                   payload={"bytes": len(it.payload), "rows": it.meta.get("nrows"),
                            "strategy_name": (it.meta.get("meta") or {}).get("strategy_name"),
                            "total_chunks": (it.meta.get("meta") or {}).get("total_chunks")})
        return {"ok": True, "item": row}

    def admin_dlq_replay(self, args: dict, respond) -> dict:
        ids = self._select(args)
        if isinstance(ids, str):
            return {"ok": False, "error": ids}
        if self.replay is not None:
            return {"ok": False, "error": "a replay is already running (see `inspect dlq`); wait for it"}
        rate = args["rate"]
        now = time.time()
        for iid in ids:  # an operator replay unparks: the item gets its automatic retries again
            self.spool.set_parked(iid, False, now, reset_attempts=True)
        self.replay = {"ids": collections.deque(ids), "rate": float(rate), "total": len(ids), "sent": 0,
                       "ok": 0, "failed": 0, "skipped": 0, "waiting": set(), "started_at": now}
        self.log("INFO", "dlq_replay_started", items=len(ids), rate=rate)
        if self.spool.parked_count == 0:
            self.alert(AlertName.DLQ_PARKED, AlertState.CLEARED)
        return {"ok": True, "queued": len(ids)}

    def admin_dlq_purge(self, args: dict, respond) -> dict:
        ids = self._select(args)
        if isinstance(ids, str):
            return {"ok": False, "error": ids}
        for iid in ids:
            it = self.spool.header(iid)
            self.spool.remove(iid)
            self.inflight.pop(iid, None)
            self.counts["purged"] += 1
            self.metrics.inc("pairlane_dlq_purged_total")
            self.log("WARNING", "dlq_item_purged", item=iid, request_id=it.request_id, seq=it.seq)
        self._gauges()
        if self.spool.parked_count == 0:
            self.alert(AlertName.DLQ_PARKED, AlertState.CLEARED)
        return {"ok": True, "purged": len(ids)}

    def _select(self, args: dict) -> list[str] | str:
        """The item ids of a one-or-all argument (checked in shape already); an error text if the
        one item is not held."""
        if args.get("all") is True:
            return [it.id for it in self.spool.items()]
        iid = args["id"]
        if iid not in self.spool:
            return f"no dlq item {iid!r}"
        return [iid]

    @staticmethod
    def _row(it) -> dict:
        return {"id": it.id, "request_id": it.request_id, "seq": it.seq, "stage": it.stage,
                "reason": it.reason, "attempts": it.attempts, "first_failed_at": it.first_failed_at,
                "last_failed_at": it.last_failed_at, "bytes": it.bytes, "parked": it.parked}
