"""The writer actor: the only writing store connection (SQLite, or PostgreSQL with store.url).

Owns: committing chunks, live trades, result statuses and pair slots through
`pairlane.store`, answering the assembler's lookups, and routing every batch
the database does not take to the dlq actor (or, when there is none, telling
the producer `unavailable`). A chunk's raw frame is decoded here, once, right
before its rows are inserted. Never retries or sleeps (the busy timeout is
short; the dlq retries).

Two threads. The actor's own thread only takes messages, queues them and sends
what the work produced; the database thread does the work (`WriterCore`), one
message at a time, taking from a `pairlane.workqueue.WorkQueue`: small work
(a 10-trade result, a status change, a lookup) goes before big chunks of other
requests, never before earlier work of its own request. So the assembler can
keep several big chunks here (no idle round trip between them) without making
small results wait behind them. The database thread wakes the actor through a
pipe; a message it has worked on longer than the writer's heartbeat deadline
crashes the actor, so a hung database is still restarted by the supervisor.
"""
from __future__ import annotations

import collections
import os
import sys
import threading
import time
import traceback

from pairlane import codec
from pairlane.lifecycle import BULK_ROWS
from pairlane.metrics import MetricBatch
from pairlane.store import StoreError
from pairlane.stores import backend, open_store
from pairlane.vocab import ResultStatus, WriteOutcome

from pairlane.supervision import stacks
from pairlane.supervision.log import log
from pairlane.supervision.worker import CRASH_EXIT_CODE
from pairlane.workqueue import Job, WorkQueue

from .base import PairlaneActor
from .messages import (BeginRequest, ChunkDurable, ChunkRejected, LegacyResult, LegacyWritten,
                       LiveDone, Lookup, LookupReply, Outbound, ReplaceSlots, RetryDone, SetStatus, SlotsWritten,
                       SpoolBatch, SweepDone, SweepStale, WriteChunk, WriteLive, WriterBatch,
                       WriterBatchDone)

MAX_DEFERRED = 10000
SWITCH_INTERVAL_S = 0.001   # the actor's thread gets the GIL back from the database thread within 1 ms
TICK = "writer.tick"        # the database thread's per-heartbeat work (WriterCore.tick)


def job_of(msg, sender, big_rows: int) -> Job:
    """The queue's view of a message: the keys it stays in order with, and whether it is big (a chunk
    of more than big_rows rows, or a batch holding one). A message it does not know is a barrier."""
    if isinstance(msg, WriterBatch):
        keys: set = set()
        big = False
        for item in msg.items:
            sub = job_of(item, sender, big_rows)
            if sub.keys is None:
                return Job((msg, sender), None, big or sub.big)
            keys |= sub.keys
            big = big or sub.big
        return Job((msg, sender), frozenset(keys), big)
    if isinstance(msg, (WriteChunk, BeginRequest)):
        return Job((msg, sender), frozenset({("r", msg.meta["request_id"])}),
                   isinstance(msg, WriteChunk) and msg.nrows > big_rows)
    if isinstance(msg, WriteLive):
        return Job((msg, sender), frozenset({("l", msg.batch_id)}), msg.nrows > big_rows)
    if isinstance(msg, (Lookup, SetStatus)):
        return Job((msg, sender), frozenset({("r", msg.request_id)}))
    if isinstance(msg, LegacyResult):
        return Job((msg, sender), frozenset({("r", msg.meta["request_id"])}))
    if isinstance(msg, ReplaceSlots):
        return Job((msg, sender), frozenset({("slots",)}))
    if msg == TICK:   # retries of deferred changes were never ordered with anything
        return Job((msg, sender), frozenset())
    return Job((msg, sender), None)   # SweepStale, and anything new: in order with everything


class WriterCore:
    """Everything the writer does with the database, run on the writer's database thread, one
    message at a time. It sends nothing itself: what it would send is recorded in `out`, in order, and
    the actor sends it once the message is handled (only the actor's thread uses Thespian)."""

    _batch_to = None              # the WriterBatch's sender while one is handled

    def __init__(self, config: dict, peer, name: str):
        self.config = config
        self.peer = peer              # name -> address, read from the actor's directory
        self.name = name
        self.out: list = []           # (address, or an actor's name, message) for the actor to send
        self.metrics = MetricBatch()
        self._batch_replies: list = []     # what send_ordered held back for the batch's sender meanwhile
        self._batch_answers: list = []     # producer answers for the gateway, sent right after WriterBatchDone
        self.sizes: dict = {}              # file_sizes() as of the last tick (PostgreSQL's is a query)
        self.store = open_store(self.config)
        self.deferred: list = []       # status changes that failed: retried every tick
        self.spooled = 0
        self.rejected = 0
        self.failures = 0
        self.group_commits = 0      # transactions that committed several chunks (`_write_group`)
        self.grouped_chunks = 0
        self.group_failures = 0
        try:
            self.store.open()
        except StoreError as exc:
            self.log("ERROR", "store_open_failed", error=exc, reason=exc.reason)
        self.sizes = self.store.file_sizes()

    def inspect(self) -> dict:
        st = self.store
        return {"rows_written": st.rows_written, "commits": st.commits, "last_commit_at": st.last_commit_at,
                "last_error": st.last_error, "failures": self.failures, "spooled_batches": self.spooled,
                "rejected_batches": self.rejected, "deferred_status_changes": len(self.deferred),
                "db_bytes": self.sizes, "path": st.path, "max_bytes": st.max_bytes,
                "backend": backend(self.config), "group_commits": self.group_commits,
                "grouped_chunks": self.grouped_chunks, "group_failures": self.group_failures}

    def send_ordered(self, addr, msg) -> None:
        if self._batch_to is not None and addr == self._batch_to:
            self._batch_replies.append(msg)   # answered together once the batch is handled
        else:
            self.out.append((addr, msg))

    def tell(self, name: str, msg) -> None:
        self.out.append((name, msg))

    def log(self, level: str, event: str, **fields) -> None:
        log(level, event, actor=self.name, **fields)

    def on_message(self, msg, sender) -> None:
        if msg == TICK:
            self.tick()
        elif isinstance(msg, WriterBatch):
            self._batch_to, self._batch_replies, self._batch_answers = sender, [], []
            try:
                self._handle_batch(msg.items, sender)
            finally:
                replies, self._batch_to, self._batch_replies = tuple(self._batch_replies), None, []
                answers, self._batch_answers = self._batch_answers, []
            # the assembler's answer first: the producer's next message makes the assembler send to us,
            # and Thespian loses a round (tens of ms) when two actors send to each other at once
            self.send_ordered(sender, WriterBatchDone(replies))
            if answers:
                self.tell("gateway", Outbound(tuple(a for a, _ in answers), tuple(k for _, k in answers)))
        elif isinstance(msg, WriteChunk):
            self._write_chunk(msg, sender)
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
                and (not item.record or getattr(self.store, "RECORDS_WITH_CHUNK", False)))

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
        record = w.record and getattr(self.store, "RECORDS_WITH_CHUNK", False)
        if w.record and not record:   # this store records in a transaction of its own, first
            self._status_change(("begin", w.meta))
        try:
            trades = codec.decode_chunk_payload(w.raw)
            if record:
                status = self.store.write_chunk(w.meta, w.seq, trades, w.nrows, record=True)
            else:
                status = self.store.write_chunk(w.meta, w.seq, trades, w.nrows)
        except StoreError as exc:
            if grouped:   # the whole group is rolled back and its chunks written one by one
                raise
            if record:   # as if the BeginRequest had come first: recorded now, or deferred and retried
                self._status_change(("begin", w.meta))
            return self._failed(w, sender, exc)
        self.metrics.observe("pairlane_sqlite_write_seconds", time.perf_counter() - t0)
        wrote = status not in (WriteOutcome.DUPLICATE, WriteOutcome.DISCARDED)
        if wrote:
            self.metrics.inc("pairlane_sqlite_rows_written_total", w.nrows)
        if status == WriteOutcome.COMPLETE:
            self.metrics.set("pairlane_last_result_timestamp_seconds", time.time())
        if w.item_id is not None:  # reason tells the dlq a duplicate or discarded (result gone) apart
            reason = "" if wrote else str(status)
            self.send_ordered(sender, RetryDone(w.item_id, True, reason))
            if status == WriteOutcome.COMPLETE:
                self.log("INFO", "result_complete_from_dlq", request_id=w.meta["request_id"])
        answered = None
        if w.answer is not None and w.reply_to is not None and status == WriteOutcome.COMPLETE \
                and self.peer("gateway") is not None:
            # a one-message result is complete and durable: its producer hears it now, one hop sooner
            identity, reply = w.answer
            answer = ((identity, reply), (w.meta["request_id"], w.seq))
            if self._batch_to is not None:
                self._batch_answers.append(answer)
            else:
                self.tell("gateway", Outbound((answer[0],), (answer[1],)))
            answered = identity
        if w.reply_to is not None:
            self.send_ordered(w.reply_to, ChunkDurable(w.meta["request_id"], w.seq, "db", status, w.nrows,
                                                       answered))

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

    def _status_change(self, change: tuple, retrying: bool = False) -> bool:
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
                if len(self.deferred) < MAX_DEFERRED:
                    self.deferred.append(change)
            return False

    def tick(self) -> None:
        """Per heartbeat: retry deferred status changes, reopen a lost database, note its size."""
        if self.deferred:
            pending, self.deferred = self.deferred, []
            for i, change in enumerate(pending):
                if not self._status_change(change, retrying=True):
                    self.deferred = pending[i:] + self.deferred
                    break
        if self.store.conn is None:
            try:
                self.store.open()
            except StoreError:
                pass
        self.sizes = self.store.file_sizes()


class Writer(PairlaneActor):
    """The shell: queues each message for the database thread and sends what its work produced."""

    def on_start(self) -> None:
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.core = WriterCore(self.config, self.peer, self.name)
        self.big_rows = BULK_ROWS
        self.queue = WorkQueue()
        self.cv = threading.Condition()
        self.done: collections.deque = collections.deque()   # (out, metrics) of finished work, in order
        self.running: tuple | None = None                     # (job, monotonic start) on the database thread
        self.closing = False
        self.tick_queued = False
        self.jobs_done = 0
        # never closed: a database thread still working at stop must not write to a reused fd
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.deadline_s = self.spec.heartbeat_timeout_s or self.settings.heartbeat_timeout_s
        self.thread = threading.Thread(target=self._db_thread, name="writer-db", daemon=True)
        self.thread.start()

    def watch_fds(self) -> list:
        return [] if self._stopping else [self.wake_r]

    def on_message(self, msg, sender) -> None:
        self._put(job_of(msg, sender, self.big_rows))

    def _put(self, job: Job) -> None:
        job.put_at = time.monotonic()
        with self.cv:
            self.queue.put(job)
            self.cv.notify()

    def on_readable(self, fds) -> None:
        if self.wake_r in fds:
            try:
                while os.read(self.wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        self._send_done()

    def _send_done(self) -> None:
        while True:
            with self.cv:
                if not self.done:
                    return
                out, metrics = self.done.popleft()
            for target, msg in out:
                if isinstance(target, str):
                    self.tell(target, msg)
                else:
                    self.send_ordered(target, msg)
            if metrics is not None:
                self.metrics.absorb(metrics)

    def on_tick(self) -> None:
        self._send_done()   # what the database thread finished goes out, its metrics with this flush
        super().on_tick()

    def tick(self) -> None:
        running = self.running
        if running is not None and time.monotonic() - running[1] > self.deadline_s:
            job, started = running
            # as if the watchdog had found the actor silent: the supervisor restarts the writer, and
            # whatever this work was, it was not acknowledged (its answers wait in `out` until it ends)
            self.log("ERROR", "writer_db_stuck", seconds=round(time.monotonic() - started, 3),
                     message=type(job.work[0]).__name__, deadline_s=self.deadline_s, stack=stacks.thread_stack(self.thread.ident))
            raise RuntimeError(f"the database thread has worked on one message for over {self.deadline_s} s")
        if not self.tick_queued:
            self.tick_queued = True
            self._put(job_of(TICK, None, self.big_rows))

    def _db_thread(self) -> None:
        core = self.core
        while True:
            with self.cv:
                while not self.queue and not self.closing:
                    self.cv.wait()
                job = self.queue.take()
                if job is None:   # closing, and nothing left
                    return
                self.running = (job, time.monotonic())
            try:
                core.on_message(*job.work)
            except BaseException as exc:  # let it crash, as an exception in an actor's handler does
                log("ERROR", "crash", actor=self.name, error=f"{type(exc).__name__}: {exc}",
                    traceback=traceback.format_exc())
                os._exit(CRASH_EXIT_CODE)
            if job.work[0] == TICK:
                self.tick_queued = False
            out, core.out = core.out, []
            metrics = None
            if len(core.metrics):
                metrics, core.metrics = core.metrics, MetricBatch()
            with self.cv:
                self.running = None
                self.jobs_done += 1
                if out or metrics is not None:
                    self.done.append((out, metrics))
            if out or metrics is not None:
                try:
                    os.write(self.wake_w, b"x")
                except BlockingIOError:   # the pipe is full: the actor has wake-ups waiting already
                    pass

    def on_stop(self) -> None:
        """Finish the work already queued (within the stop's time), send its answers, close."""
        with self.cv:
            self.closing = True
            self.cv.notify()
        budget = max(0.5, (self.spec.shutdown_s if self.spec else 5.0) - 1.0)
        self.thread.join(budget)
        self._send_done()
        if not self.thread.is_alive():
            self.core.store.close()

    def inspect(self) -> dict:
        running = self.running
        with self.cv:
            queued, big = len(self.queue), self.queue.big()
        return dict(self.core.inspect(), queued=queued, queued_big=big, overtaken=self.queue.overtaken_total,
                    jobs_done=self.jobs_done,
                    running_s=None if running is None else round(time.monotonic() - running[1], 3))
