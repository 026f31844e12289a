"""The assembler actor: the Thespian shell around `pairlane.lifecycle` (PROTOCOL.md section 1).

Owns: translating messages from the gateway, writer, dlq and legacy actor into lifecycle events and
carrying out the lifecycle's effects: replies (to the gateway, or to the actor a legacy producer
speaks through), the gateway's in-flight releases, writes and status changes for the writer,
inventory requests to the dlq, metrics and logs. Every rule of the request lifecycle lives in
`pairlane.lifecycle`, not here. Chunks pass through as raw bytes and are never kept.
Reads the database only to carry out a lookup the lifecycle allows to be answered locally: a
read-only connection answers without queueing behind bulk writes at the writer (all writes go
through the writer).
With PostgreSQL (several daemons may share the store) it also carries out the lifecycle's Claim and
Unclaim through its own `pgstore.PgLeases` session: a request's lease is a session advisory lock,
so it dies with this daemon (PROTOCOL.md section 7, multi-daemon rules).
"""
from __future__ import annotations

import time

from pairlane import lifecycle as lc
from pairlane.store import StoreError, meta_from_message
from pairlane.stores import backend, open_store

from .base import PairlaneActor
from .messages import (ArmDirect, BeginRequest, ChunkDurable, ChunkRejected, DirectArmed, DirectDone, DirectOpen,
                       DirectRefused, Inbound, InboundBatch, Inventory, InventoryRequest, LiveDone, Lookup,
                       LookupReply, Outbound, SetStatus, SweepDone, SweepStale, WriteChunk, WriteLive, WriterBatch,
                       WriterBatchDone, WriteSkipped)

MAX_REPLY_TARGETS = 1000
MAX_REPLY_ACTORS = 16           # addresses of the actors legacy producers speak through (restarts make new ones)
WRITER_WINDOW = 2               # WriterBatches at the writer at once: one handled, the next one waiting
                                # (one more while a big chunk waits there: _send_batches)
BATCH_MAX_ITEMS = 32            # writer messages in one WriterBatch


def batch_length(outbox: list, max_items: int, max_bytes: int) -> int:
    """How many of outbox's first messages go in the next WriterBatch: at most max_items, and no more
    chunk bytes (`raw`) than max_bytes, except that the first message always goes. A big chunk goes
    alone, so that what follows it is free to pass it at the writer (Writer.lane_pick)."""
    n, size = 0, 0
    for msg in outbox:
        big = getattr(msg, "big", False)
        size += len(getattr(msg, "raw", b"") or b"")
        if n and (n >= max_items or size > max_bytes or big):
            break
        n += 1
        if big:
            break
    return n


class Assembler(PairlaneActor):
    def on_start(self) -> None:
        g = self.config["gateway"]
        self.writer = self.peer("writer")
        self.dlq = self.peer("dlq")
        self.leases = None
        if backend(self.config) == "postgresql":
            from pairlane.pgstore import PgLeases
            self.leases = PgLeases(self.config["store"]["url"], "pairlane-leases " + self.config["daemon"]["name"])
        self.reader = open_store(self.config, busy_timeout_ms=100, readonly=True)
        # checked writes where the writer's store records a request in its chunk's transaction (SQLite)
        self.life = lc.Lifecycle(g["credit"], g["max_requests"], g["assembly_timeout_s"],
                                 clock=time.monotonic, wall=time.time, writer_up=self.writer is not None,
                                 claims=self.leases is not None, checked_writes=self.reader.RECORDS_WITH_CHUNK)
        self.replies: list = []
        self.released: list = []
        self.stored: list = []     # (request_id, stored reply) for the gateway (lc.Stored)
        self.side_replies: list = []                        # (actor, identity, reply) not via the gateway
        self.reply_targets: dict = {}                       # identity -> actor, for non-ZMQ producers
        self.reply_actors: dict = {}                        # str(address) -> the one address object kept
        # writer messages go out in order, in WriterBatches, at most WRITER_WINDOW of them unanswered:
        # what comes meanwhile waits here and goes in the next batch (fewer transport round trips)
        self.outbox: list = []
        self.batches_out = 0
        self.batch_max_bytes = g["max_message_bytes"]   # one chunk's worth (a single bigger one goes alone)
        self._feed(lc.Peers(self.writer is not None, self.dlq is not None, dlq_changed=True))

    def on_stop(self) -> None:
        self.reader.close()
        if self.leases is not None:
            self.leases.close()   # every lease this daemon held is free for the others now

    def inspect(self) -> dict:
        return dict(self.life.inspect(), writer_batches_out=self.batches_out, writer_outbox=len(self.outbox),
                    reply_targets=len(self.reply_targets), reply_actors=len(self.reply_actors))

    # ----- events in ---------------------------------------------------------------------------------
    def on_message(self, msg, sender) -> None:
        if isinstance(msg, WriterBatchDone):
            if sender == self.writer:   # not a batch the previous writer took with it
                self.batches_out = max(0, self.batches_out - 1)
            for reply in msg.replies:
                self._event_in(reply)
        elif isinstance(msg, InboundBatch):
            if msg.mark is not None:
                self._feed(lc.Forwarded(msg.mark))
            for inb in msg.items:
                self._feed(self._event(inb))
        else:
            self._event_in(msg)
        self._flush()

    def _event_in(self, msg) -> None:
        if isinstance(msg, Inbound):
            self._feed(self._event(msg))
        elif isinstance(msg, DirectDone):
            self._feed(lc.DirectStored(msg.meta["request_id"], msg.meta, msg.nrows, msg.identity, msg.received_at))
        elif isinstance(msg, DirectRefused):
            self._feed(self._event(msg.inbound))
        elif isinstance(msg, DirectArmed):
            self._feed(lc.ArmAck(msg.epoch))
        elif isinstance(msg, ChunkDurable):
            self._feed(lc.Durable(msg.request_id, msg.seq, msg.location, msg.status, msg.nrows, msg.answered))
        elif isinstance(msg, WriteSkipped):
            self._feed(lc.Skipped(msg.request_id, msg.row, failed=msg.row is None))
        elif isinstance(msg, ChunkRejected):
            self._feed(lc.Rejected(msg.request_id, msg.seq, msg.code, msg.message, msg.retry_after_s))
        elif isinstance(msg, LookupReply):
            self._feed(lc.LookupAnswer(msg.request_id, msg.row))
        elif isinstance(msg, SweepDone):
            self._feed(lc.SweepDone())
        elif isinstance(msg, LiveDone):
            self._feed(lc.LiveDone(msg.batch_id, msg.nrows, msg.location, msg.code, msg.message,
                                   msg.retry_after_s))
        elif isinstance(msg, Inventory):
            self._feed(lc.Inventory(msg.items))

    def _event(self, inb: Inbound):
        m = inb.msg
        t, rid = m["type"], m["request_id"]
        if inb.reply_to is not None:  # a legacy producer: its replies go back through that actor
            # every message brings its own unpickled copy of the legacy actor's address (about 1 KB of
            # objects): keep one per actor, so a remembered identity costs only its bytes
            addr = self.reply_actors.setdefault(str(inb.reply_to), inb.reply_to)
            if len(self.reply_actors) > MAX_REPLY_ACTORS:
                self.reply_actors.pop(next(iter(self.reply_actors)))
            self.reply_targets[inb.identity] = addr
            if len(self.reply_targets) > MAX_REPLY_TARGETS:
                self.reply_targets.pop(next(iter(self.reply_targets)))
        if t == "live_trades":
            return lc.LiveTrades(rid, inb.identity, inb.raw, inb.nrows)
        if t in ("begin", "result"):
            cls = lc.Result if t == "result" else lc.Begin
            return cls(rid, inb.identity, meta_from_message(m, inb.origin), inb.bad, inb.origin, inb.raw, inb.nrows)
        if t == "chunk":
            return lc.Chunk(rid, inb.identity, m["seq"], inb.raw, inb.nrows, inb.bad)
        return (lc.End if t == "end" else lc.Abort)(rid, inb.identity)

    def on_directory(self) -> None:
        writer, dlq = self.peer("writer"), self.peer("dlq")
        writer_changed = writer != self.writer
        lost = writer_changed or (dlq != self.dlq and self.dlq is not None)
        dlq_changed = dlq != self.dlq
        if writer_changed:   # what waited for (or went to) the old writer is lost with it
            self.outbox.clear()
            self.batches_out = 0
        self.writer, self.dlq = writer, dlq
        if lost or dlq_changed:
            self._feed(lc.Peers(writer is not None, dlq is not None, lost, dlq_changed, writer_changed))
            self._flush()

    def tick(self) -> None:
        if self.leases is not None and self.life.leases and not self.life.reclaiming and not self.leases.alive():
            self._feed(lc.LeasesLost())   # cut (server restart, pg_terminate_backend): claim them again
        self._feed(lc.Tick())
        self._flush()

    # ----- effects out -------------------------------------------------------------------------------
    def _feed(self, event) -> None:
        for eff in self.life.handle(event):
            self._do(eff)

    def _do(self, eff) -> None:
        if isinstance(eff, lc.Reply):
            target = self.reply_targets.get(eff.identity)
            if target is not None:
                self.side_replies.append((target, eff.identity, eff.reply))
            else:
                self.replies.append((eff.identity, eff.reply))
        elif isinstance(eff, lc.Release):
            self.released.append((eff.request_id, eff.seq))
        elif isinstance(eff, lc.Stored):
            self.stored.append((eff.request_id, eff.reply))
        elif isinstance(eff, lc.Write):
            # a producer speaking through another actor (legacy) is answered by us, never by the writer
            answer = eff.answer if eff.answer is not None and eff.answer[0] not in self.reply_targets else None
            self._to_writer(WriteChunk(eff.meta, eff.seq, eff.raw, eff.nrows, reply_to=self.myAddress,
                                       record=eff.record, answer=answer, new_only=eff.new_only))
        elif isinstance(eff, lc.WriteLive):
            self._to_writer(WriteLive(eff.batch_id, eff.raw, eff.nrows, reply_to=self.myAddress))
        elif isinstance(eff, lc.Record):
            self._to_writer(BeginRequest(eff.meta))
        elif isinstance(eff, lc.SetStatus):
            self._to_writer(SetStatus(eff.request_id, str(eff.status), eff.error))
        elif isinstance(eff, lc.Sweep):
            self._to_writer(SweepStale(eff.older_than, eff.active))
        elif isinstance(eff, lc.Lookup):
            self._lookup(eff)
        elif isinstance(eff, lc.Claim):
            had = set(self.leases.held)
            self._feed(self._claim(eff.request_id))
            if had - self.leases.held:   # the session was lost (and reopened): those leases may be others' now
                self._feed(lc.LeasesLost())
        elif isinstance(eff, lc.Unclaim):
            try:
                self.leases.release_request(eff.request_id)
            except StoreError as exc:   # the session is gone, and every lease with it
                self.log("WARNING", "lease_release_failed", request_id=eff.request_id, error=exc)
        elif isinstance(eff, lc.Arm):
            self._to_writer(ArmDirect(eff.mark, eff.epoch))
        elif isinstance(eff, lc.DirectOpen):
            self.tell("gateway", DirectOpen(eff.mark))
        elif isinstance(eff, lc.AskInventory):
            if self.dlq is not None:
                self.send_ordered(self.dlq, InventoryRequest())
        elif isinstance(eff, lc.Metric):
            getattr(self.metrics, eff.op)(eff.name, eff.value, **dict(eff.labels))
        elif isinstance(eff, lc.Log):
            self.log(eff.level, eff.event, **dict(eff.fields))

    def _claim(self, rid: str) -> lc.Claimed:
        try:
            return lc.Claimed(rid, self.leases.try_request(rid))
        except StoreError as exc:
            if rid not in self.life.reclaiming:   # a lease being re-taken is tried again every tick: no flood
                self.log("WARNING", "lease_claim_failed", request_id=rid, error=exc)
            return lc.Claimed(rid, False, failed=True)

    def _to_writer(self, msg) -> None:
        if self.writer is not None:
            self.outbox.append(msg)

    def _send_batches(self) -> None:
        # with a big chunk waiting at the writer behind the one it writes, one batch more: small work
        # sent now is there to pass the waiting one when the first is done (Writer.lane_pick)
        window = WRITER_WINDOW + (self.life.bulk_at_writer >= lc.BULK_WINDOW)
        while self.outbox and self.batches_out < window and self.writer is not None:
            n = batch_length(self.outbox, BATCH_MAX_ITEMS, self.batch_max_bytes)
            items, self.outbox = tuple(self.outbox[:n]), self.outbox[n:]
            self.send_ordered(self.writer, WriterBatch(items))
            self.batches_out += 1

    def _lookup(self, eff: lc.Lookup) -> None:
        """Read locally when the lifecycle allows it (and the database answers), else ask the writer,
        whose answer comes in order after the status changes we sent it."""
        row = self._local_read(eff.request_id) if eff.local_ok else False
        if row is not False:
            self._feed(lc.LookupAnswer(eff.request_id, row))
        elif self.writer is not None:
            self._to_writer(Lookup(eff.request_id))
        else:
            self._feed(lc.LookupAnswer(eff.request_id, None, failed=True))

    def _local_read(self, rid: str):
        """The database's row for rid, None if there is no database yet, False if it cannot be read."""
        try:
            if not self.reader.open_readonly():
                return None
            return self.reader.lookup(rid)
        except StoreError:
            self.reader.close()
            return False

    def _flush(self) -> None:
        self._feed(lc.Flush())
        self._send_batches()
        if (self.replies or self.released or self.stored) and self.peer("gateway") is not None:
            # a result's last credit and its Stored go in one message: the gateway knows it is
            # stored before the producer can send `end`
            self.tell("gateway", Outbound(tuple(self.replies), tuple(self.released), tuple(self.stored)))
        self.replies = []
        self.released = []
        self.stored = []
        for target, identity, reply in self.side_replies:
            self.send_ordered(target, Outbound(((identity, reply),), ()))
        self.side_replies = []
