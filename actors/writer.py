"""The writer actor: the only writing store connection (SQLite, or PostgreSQL with store.url).

Owns: committing chunks, live trades, result statuses and pair slots through
`pairlane.store`, answering the assembler's lookups, and routing every batch
the database does not take to the dlq actor (or, when there is none, telling
the producer `unavailable`). A chunk's raw frame is decoded here, once, right
before its rows are inserted. Never retries or sleeps in a handler (the
busy timeout is short; the dlq retries), so it always meets its heartbeat.
"""
from __future__ import annotations

import time

from pairlane import codec
from pairlane.lifecycle import producer_meta, stored_reply
from pairlane.metrics import MetricBatch
from pairlane.store import StoreError, meta_from_message
from pairlane.stores import backend, open_store
from pairlane.vocab import ResultStatus, WriteOutcome

from .base import PairlaneActor
from .messages import (ArmDirect, BeginRequest, ChunkDurable, ChunkRejected, DirectArmed, DirectDone,
                       DirectRefused, DirectWrite, LegacyResult, LegacyWritten,
                       LiveDone, Lookup, LookupReply, Outbound, ReplaceSlots, RetryDone, SetStatus, SlotsWritten,
                       SpoolBatch, SweepDone, SweepStale, WriteChunk, WriteLive, WriterBatch,
                       WriterBatchDone, WriteSkipped)

MAX_DEFERRED = 10000
MAX_PASSES = 16     # messages that may pass one waiting big chunk; then it goes (never starved by small work)


def carries_big(msg) -> bool:
    """A big chunk (WriteChunk.big), alone or in a WriterBatch."""
    items = msg.items if isinstance(msg, WriterBatch) else (msg,)
    return any(getattr(item, "big", False) for item in items)


def touches(msg) -> frozenset | None:
    """The requests (and live batches) a writer message reads or writes; None when it may touch any
    (a sweep, pair slots, anything else)."""
    keys = set()
    for item in (msg.items if isinstance(msg, WriterBatch) else (msg,)):
        if isinstance(item, (WriteChunk, BeginRequest, LegacyResult)):
            keys.add(item.meta["request_id"])
        elif isinstance(item, (SetStatus, Lookup)):
            keys.add(item.request_id)
        elif isinstance(item, WriteLive):
            keys.add(("live", item.batch_id))
        elif isinstance(item, DirectWrite):
            keys.add(item.inbound.msg["request_id"])
        else:
            return None
    return frozenset(keys)


def small_first(backlog) -> int:
    """Which of the writer's backlog of (message, sender), in arrival order, goes next when the first
    carries a big chunk: the first later message without a big chunk that may pass every message
    it would pass, else the first. A message may pass another sender's (no order was ever promised
    between senders) and its own sender's when the two touch different requests; a message that may
    touch any request (`touches` None) neither passes nor is passed by its sender's."""
    if not backlog or not carries_big(backlog[0][0]):
        return 0
    passed: list = []   # (sender, touches) of the messages left waiting
    for i, (msg, sender) in enumerate(backlog):
        keys = touches(msg)
        if i and keys is not None and not carries_big(msg) and all(
                s != sender or (k is not None and not k & keys) for s, k in passed):
            return i
        passed.append((sender, keys))
    return 0


class Writer(PairlaneActor):
    _batch_to = None              # the WriterBatch's sender while one is handled
    _batch_replies: list = []     # what send_ordered held back for it meanwhile
    _batch_answers: list = []     # producer answers of grouped chunks, sent once the batch is handled

    def on_start(self) -> None:
        self._batch_replies = []
        self._batch_answers = []
        self.store = open_store(self.config)
        self.deferred: list = []       # status changes that failed: retried every tick
        self.spooled = 0
        self.rejected = 0
        self.passed_big = 0            # times small work went before a big chunk waiting here
        self._waiting_big = None       # the big chunk small work is passing, and how many passed it
        self._passes = 0
        self.failures = 0
        self.group_commits = 0      # transactions that committed several chunks (`_write_group`)
        self.grouped_chunks = 0
        self.group_failures = 0
        self.direct_mark = None     # the gateway mark DirectWrites must carry (ArmDirect), None: take none
        self.direct_writes = 0
        self.direct_refused = 0
        try:
            self.store.open()
        except StoreError as exc:
            self.log("ERROR", "store_open_failed", error=exc, reason=exc.reason)

    def on_stop(self) -> None:
        self.store.close()

    def inspect(self) -> dict:
        st = self.store
        return {"rows_written": st.rows_written, "commits": st.commits, "last_commit_at": st.last_commit_at,
                "last_error": st.last_error, "failures": self.failures, "spooled_batches": self.spooled,
                "rejected_batches": self.rejected, "deferred_status_changes": len(self.deferred),
                "db_bytes": st.file_sizes(), "path": st.path, "max_bytes": st.max_bytes,
                "backend": backend(self.config), "group_commits": self.group_commits,
                "grouped_chunks": self.grouped_chunks, "group_failures": self.group_failures,
                "passed_big_chunks": self.passed_big, "direct_armed": self.direct_mark is not None,
                "direct_writes": self.direct_writes, "direct_refused": self.direct_refused}

    def send_ordered(self, addr, msg) -> None:
        if self._batch_to is not None and addr == self._batch_to:
            self._batch_replies.append(msg)   # answered together once the batch is handled
        else:
            super().send_ordered(addr, msg)

    def lane_defers(self, msg) -> bool:
        return carries_big(msg)

    def lane_pick(self, backlog) -> int:
        """Small work first: a big chunk waiting here (the assembler sends BULK_WINDOW of them, one
        written, the next waiting) is passed by what came after it and may go first (small_first),
        so a small result waits for at most the big chunk being written, and the writer never idles
        between big ones for a round trip through the assembler. At most MAX_PASSES messages pass
        one big chunk: a steady stream of small chunks must not hold a big transfer back for good."""
        head = backlog[0][0]
        if head is not self._waiting_big:
            self._waiting_big, self._passes = head, 0
        i = small_first(backlog) if self._passes < MAX_PASSES else 0
        if i:
            self._passes += 1
            self.passed_big += 1
        else:
            self._waiting_big = None   # it goes now
        return i

    def on_message(self, msg, sender) -> None:
        if isinstance(msg, WriterBatch):
            self._batch_to, self._batch_replies, self._batch_answers = sender, [], []
            try:
                self._handle_batch(msg.items, sender)
            finally:
                replies, self._batch_to, self._batch_replies = tuple(self._batch_replies), None, []
                answers, self._batch_answers = self._batch_answers, []
            # the producers' answers first: they wait on them (a one-message result's round trip), the
            # assembler's bookkeeping does not. Nothing orders the two for the assembler anyway: the
            # producer's next message reaches it from the gateway, on another connection
            if answers:
                self.tell("gateway", Outbound(tuple(a for a, _ in answers), tuple(k for _, k in answers)))
            self.send_ordered(sender, WriterBatchDone(replies))
        elif isinstance(msg, WriteChunk):
            self._write_chunk(msg, sender)
        elif isinstance(msg, DirectWrite):
            self._write_direct(msg)
        elif isinstance(msg, ArmDirect):
            self.direct_mark = msg.mark
            self.send_ordered(sender, DirectArmed(msg.epoch))
        elif isinstance(msg, WriteLive):
            self._write_live(msg, sender)
        elif isinstance(msg, Lookup):
            try:
                row = self.store.lookup(msg.request_id)
                self.send_ordered(sender, LookupReply(msg.request_id, row))
            except StoreError as exc:
                self.send_ordered(sender, LookupReply(msg.request_id, None, str(exc)))
        elif isinstance(msg, BeginRequest):
            self._status_change(("begin", msg.meta))
        elif isinstance(msg, SetStatus):
            self._status_change(("status", msg.request_id, msg.status, msg.error))
        elif isinstance(msg, LegacyResult):
            self._status_change(("legacy", msg.meta, msg.status, msg.reply_to, msg.token))
        elif isinstance(msg, SweepStale):
            try:
                ids = self.store.abandon_stale(msg.older_than, set(msg.active))
                for rid in ids:
                    self.log("WARNING", "stale_request_abandoned", request_id=rid)
                    self.metrics.inc("pairlane_results_total", outcome=ResultStatus.ABANDONED)
            except StoreError:
                pass
            # the assembler reads locally again only once it knows the sweep is behind it (without this
            # answer, every lookup after the first sweep queued at the writer behind bulk chunks)
            self.send_ordered(sender, SweepDone())
        elif isinstance(msg, ReplaceSlots):
            try:
                self.store.replace_pair_slots(list(msg.slots), msg.evaluated_at)
                self.send_ordered(sender, SlotsWritten(msg.token, True))
            except StoreError as exc:
                self.send_ordered(sender, SlotsWritten(msg.token, False, str(exc)))

    # ----- writes -------------------------------------------------------------------------------
    def _handle_batch(self, items: tuple, sender) -> None:
        """A WriterBatch's items in order; each run of two or more chunks that can share a transaction
        is committed as one (`_write_group`)."""
        i = 0
        while i < len(items):
            n = 0
            while i + n < len(items) and self._groupable(items[i + n], sender):
                n += 1
            if n >= 2:
                self._write_group(items[i:i + n], sender)
                i += n
            else:
                self.on_message(items[i], sender)
                i += 1

    def _groupable(self, item, sender) -> bool:
        """A chunk whose every effect waits for the batch's end (its answers go with WriterBatchDone)
        and that needs no status change of its own first."""
        return (isinstance(item, WriteChunk) and item.item_id is None and item.reply_to == sender
                and (not item.record or self.store.RECORDS_WITH_CHUNK))

    def _write_group(self, run: tuple, sender) -> None:
        """Group commit: several chunks in one transaction, one COMMIT (one fsync). Each chunk's
        answers are queued until the batch ends, so none leaves before that commit. If the group
        fails, nothing of it was written: what it queued is taken back and each chunk is written in
        a transaction of its own, so a chunk the database does not take goes to the dlq alone."""
        replies, answers = len(self._batch_replies), len(self._batch_answers)
        outer, self.metrics = self.metrics, MetricBatch()   # the group's own, kept only if it commits
        failed = None
        try:
            with self.store.group():
                for w in run:
                    self._write_chunk(w, sender, grouped=True)
        except StoreError as exc:
            failed = exc
        finally:
            grouped, self.metrics = self.metrics, outer
        if failed is not None:
            del self._batch_replies[replies:]
            del self._batch_answers[answers:]
            self.group_failures += 1
            self.log("INFO", "group_commit_failed", chunks=len(run), reason=failed.reason, error=failed)
            for w in run:
                self._write_chunk(w, sender)
            return
        outer.absorb(grouped)
        self.group_commits += 1
        self.grouped_chunks += len(run)

    def _write_chunk(self, w: WriteChunk, sender, grouped: bool = False) -> None:
        t0 = time.perf_counter()
        record = w.record and self.store.RECORDS_WITH_CHUNK
        if w.new_only and not record:   # the check needs the write's own transaction
            return self.send_ordered(w.reply_to, WriteSkipped(w.meta["request_id"], None,
                                                              "this store cannot check and write at once"))
        if w.record and not record:   # this store records in a transaction of its own, first
            self._status_change(("begin", w.meta))
        try:
            trades = codec.decode_chunk_payload(w.raw)
            if record:
                status = self.store.write_chunk(w.meta, w.seq, trades, w.nrows, record=True, new_only=w.new_only)
            else:
                status = self.store.write_chunk(w.meta, w.seq, trades, w.nrows)
        except StoreError as exc:
            if grouped:   # the whole group is rolled back and its chunks written one by one
                raise
            if w.new_only:   # not known to be new: never spooled; the lifecycle takes the usual way
                return self.send_ordered(w.reply_to, WriteSkipped(w.meta["request_id"], None, str(exc)))
            if record:   # as if the BeginRequest had come first: recorded now, or deferred and retried
                self._status_change(("begin", w.meta))
            return self._failed(w, sender, exc)
        elapsed = time.perf_counter() - t0
        if status == WriteOutcome.EXISTS:   # a checked write: the request is there, nothing was written
            try:
                row, error = self.store.lookup(w.meta["request_id"]), None
            except StoreError as exc:
                row, error = None, str(exc)
            return self.send_ordered(w.reply_to, WriteSkipped(w.meta["request_id"], row, error))
        answered = None
        if w.answer is not None and w.reply_to is not None and status == WriteOutcome.COMPLETE \
                and self.peer("gateway") is not None:
            # a one-message result is complete and durable: its producer hears it now, one hop sooner
            # (a group's answers wait for the group's commit: the batch's end)
            identity, reply = w.answer
            answer = ((identity, reply), (w.meta["request_id"], w.seq))
            if grouped:
                self._batch_answers.append(answer)
            else:
                self.tell("gateway", Outbound((answer[0],), (answer[1],)))
            answered = identity
        wrote = self._count_write(elapsed, status, w.nrows)
        if w.item_id is not None:  # reason tells the dlq a duplicate or discarded (result gone) apart
            reason = "" if wrote else str(status)
            self.send_ordered(sender, RetryDone(w.item_id, True, reason))
            if status == WriteOutcome.COMPLETE:
                self.log("INFO", "result_complete_from_dlq", request_id=w.meta["request_id"])
        if w.reply_to is not None:
            self.send_ordered(w.reply_to, ChunkDurable(w.meta["request_id"], w.seq, "db", status, w.nrows,
                                                       answered))

    def _write_direct(self, d: DirectWrite) -> None:
        """A new one-message result straight from the gateway (pairlane.lifecycle.Forwarded): written,
        checked as WriteChunk.new_only writes are, only while armed with its mark and with no status
        change of ours waiting; its producer is told `stored` and the assembler hears of it after the
        commit. Anything else (not armed, the store holds the request, the store failed: nothing was
        written) goes to the assembler as if from the gateway, the usual way, which spools if it must."""
        inb = d.inbound
        assembler = self.peer("assembler")
        if d.mark != self.direct_mark or self.deferred or assembler is None or self.peer("gateway") is None:
            return self._refuse_direct(inb, assembler)
        meta = producer_meta(meta_from_message(inb.msg, inb.origin), inb.origin)
        rid = meta["request_id"]
        t0 = time.perf_counter()
        try:
            trades = codec.decode_chunk_payload(inb.raw)
            status = self.store.write_chunk(meta, 0, trades, inb.nrows, record=True, new_only=True)
        except StoreError as exc:
            self.log("INFO", "direct_write_failed", request_id=rid, reason=exc.reason, error=exc)
            return self._refuse_direct(inb, assembler)
        if status != WriteOutcome.COMPLETE:   # `exists`: the usual way answers stored or conflict
            return self._refuse_direct(inb, assembler)
        self.direct_writes += 1
        self.tell("gateway", Outbound(((inb.identity, stored_reply(rid, meta["total_trades"], "db")),), ((rid, 0),)))
        self.send_ordered(assembler, DirectDone(meta, inb.nrows, inb.identity, inb.received_at))
        self._count_write(time.perf_counter() - t0, status, inb.nrows)

    def _count_write(self, elapsed: float, status: WriteOutcome, nrows: int) -> bool:
        """The metrics of one chunk's write that took `elapsed` s and left its result `status`;
        whether it wrote rows (not a duplicate, nor for a result gone)."""
        self.metrics.observe("pairlane_sqlite_write_seconds", elapsed)
        wrote = status not in (WriteOutcome.DUPLICATE, WriteOutcome.DISCARDED)
        if wrote:
            self.metrics.inc("pairlane_sqlite_rows_written_total", nrows)
        if status == WriteOutcome.COMPLETE:
            self.metrics.set("pairlane_last_result_timestamp_seconds", time.time())
        return wrote

    def _refuse_direct(self, inb, assembler) -> None:
        self.direct_refused += 1
        if assembler is not None:
            self.send_ordered(assembler, DirectRefused(inb))
        # else: lost as it would be in flight to a restarting assembler; its producer resends

    def _write_live(self, w: WriteLive, sender) -> None:
        t0 = time.perf_counter()
        try:
            trades = codec.decode_chunk_payload(w.raw)
            status = self.store.write_live(w.batch_id, trades, w.nrows)
        except StoreError as exc:
            return self._failed(w, sender, exc)
        self.metrics.observe("pairlane_sqlite_write_seconds", time.perf_counter() - t0)
        if status == "stored":
            self.metrics.inc("pairlane_sqlite_rows_written_total", w.nrows)
        if w.item_id is not None:
            self.send_ordered(sender, RetryDone(w.item_id, True))
        if w.reply_to is not None:
            self.send_ordered(w.reply_to, LiveDone(w.batch_id, w.nrows, "db", status))

    def _failed(self, w, sender, exc: StoreError) -> None:
        self.failures += 1
        self.log("WARNING", "write_failed", request_id=getattr(w, "meta", {}).get("request_id", getattr(w, "batch_id", None)),
                 seq=getattr(w, "seq", None), reason=exc.reason, error=exc)
        if w.item_id is not None:  # a dlq retry: the item stays in the spool
            self.send_ordered(sender, RetryDone(w.item_id, False, exc.reason, str(exc)))
            return
        dlq = self.peer("dlq")
        if dlq is not None:
            self.spooled += 1
            self.send_ordered(dlq, SpoolBatch(w, exc.reason, str(exc)))
            return
        self.rejected += 1
        msg = f"the database cannot take data ({exc.reason}: {exc}) and the dead-letter queue is not running"
        if isinstance(w, WriteChunk):
            self.send_ordered(w.reply_to, ChunkRejected(w.meta["request_id"], w.seq, "unavailable", msg, 5.0))
        else:
            self.send_ordered(w.reply_to, LiveDone(w.batch_id, w.nrows, "", "", "unavailable", msg, 5.0))

    def _status_change(self, change: tuple) -> None:
        """Apply a status change now or, when it fails or earlier ones still wait, in order after
        them (retried every tick), never before them: a `spooled` applied while its request's
        `begin` waited changed nothing, and the begin then left the row `receiving`, for a sweep
        (another daemon's, on a shared store) to abandon a result already answered `stored`."""
        waiting = bool(self.deferred)
        if waiting or not self._apply_status(change):
            if waiting:
                self.log("WARNING", "status_change_deferred", change=change[0], reason="behind_deferred",
                         waiting=len(self.deferred))
            if len(self.deferred) < MAX_DEFERRED:
                self.deferred.append(change)
        if waiting:
            self._retry_deferred()

    def _apply_status(self, change: tuple, retrying: bool = False) -> bool:
        try:
            if change[0] == "begin":
                self.store.begin(change[1])
            elif change[0] == "status":
                self.store.set_status(change[1], change[2], change[3])
            elif change[0] == "legacy":
                before = self.store.write_result_without_trades(change[1], change[2])
                if change[3] is not None:  # the legacy actor removes its spooled message only now
                    self.send_ordered(change[3], LegacyWritten(change[4], change[1]["request_id"], before))
            return True
        except StoreError as exc:
            if not retrying:
                self.log("WARNING", "status_change_deferred", change=change[0], reason=exc.reason, error=exc)
            return False

    def _retry_deferred(self) -> None:
        """The deferred status changes, in order, until one fails again."""
        pending, self.deferred = self.deferred, []
        for i, change in enumerate(pending):
            if not self._apply_status(change, retrying=True):
                self.deferred = pending[i:] + self.deferred
                break

    def tick(self) -> None:
        if self.deferred:
            self._retry_deferred()
        if self.store.conn is None:
            try:
                self.store.open()
            except StoreError:
                pass
