"""How the assembler cuts its writer outbox into WriterBatches (actors.assembler.batch_length), and
which of them the writer may handle before a big chunk waiting there (actors.writer.small_first)."""
from __future__ import annotations

import collections

from pairlane.actors.assembler import batch_length
from pairlane.actors.messages import (BeginRequest, LegacyResult, Lookup, ReplaceSlots, SetStatus, SweepStale,
                                      WriteChunk, WriteLive, WriterBatch)
from pairlane.actors.writer import MAX_PASSES, Writer, carries_big, small_first, touches
from pairlane.lifecycle import BULK_ROWS


def chunk(nbytes: int, rid: str = "R", rows: int = 1) -> WriteChunk:
    return WriteChunk({"request_id": rid}, 0, b"x" * nbytes, rows)


def big(rid: str = "B") -> WriteChunk:
    return chunk(10, rid, BULK_ROWS + 1)


def test_small_messages_go_together_up_to_max_items():
    box = [Lookup("A"), chunk(10), SetStatus("A", "abandoned"), chunk(10), chunk(10)]
    assert batch_length(box, 32, 1000) == 5
    assert batch_length(box, 3, 1000) == 3


def test_chunk_bytes_bound_a_batch_but_the_first_message_always_goes():
    assert batch_length([chunk(600), chunk(600), chunk(10)], 32, 1000) == 1
    assert batch_length([chunk(5000), chunk(10)], 32, 1000) == 1     # bigger than the bound: alone
    assert batch_length([chunk(400), chunk(500), chunk(200)], 32, 1000) == 2
    assert batch_length([Lookup("A"), chunk(900), Lookup("B")], 32, 1000) == 3


def test_empty_outbox_makes_no_batch():
    assert batch_length([], 32, 1000) == 0


def test_a_big_chunk_goes_alone_so_what_follows_can_pass_it_at_the_writer():
    assert not chunk(10, rows=BULK_ROWS).big and big().big
    assert batch_length([big(), chunk(10), Lookup("A")], 32, 1000) == 1
    assert batch_length([Lookup("A"), chunk(10), big(), chunk(10)], 32, 1000) == 2
    assert batch_length([big(), big()], 32, 1000) == 1


A, L, D = "assembler", "legacy", "dlq"   # senders (the writer compares addresses with ==)


def batch(*items) -> WriterBatch:
    return WriterBatch(tuple(items))


def test_what_a_writer_message_touches():
    assert touches(batch(chunk(1, "X"), BeginRequest({"request_id": "Y"}), SetStatus("Z", "failed"),
                         Lookup("X"))) == {"X", "Y", "Z"}
    assert touches(WriteLive("b1", b"", 1)) == {("live", "b1")}
    assert touches(LegacyResult({"request_id": "L"}, "complete")) == {"L"}
    assert touches(batch(chunk(1, "X"), SweepStale(0.0, frozenset()))) is None     # may touch any
    assert touches(ReplaceSlots((), 0.0)) is None
    assert carries_big(batch(Lookup("X"), big())) and carries_big(big()) and not carries_big(batch(chunk(1)))


def test_small_work_of_other_requests_passes_a_big_chunk_waiting_at_the_writer():
    assert small_first([(batch(big("B")), A), (batch(chunk(1, "S")), A)]) == 1
    assert small_first([(batch(big("B")), A), (batch(Lookup("B")), A), (batch(chunk(1, "S")), A)]) == 2
    # a later big chunk does not pass; the small work behind it may (it touches neither)
    assert small_first([(batch(big("B")), A), (batch(big("C")), A), (batch(Lookup("S")), A)]) == 2


def test_nothing_passes_its_own_senders_message_about_the_same_request():
    assert small_first([(batch(big("B")), A), (batch(SetStatus("B", "abandoned")), A)]) == 0
    # passing a message about B to reach one about C would still put C's before B's: only if disjoint
    assert small_first([(batch(big("B")), A), (batch(Lookup("C"), SetStatus("B", "failed")), A),
                        (batch(Lookup("C")), A)]) == 0
    assert small_first([(batch(big("B")), A), (batch(SetStatus("C", "failed")), A),
                        (batch(Lookup("C")), A)]) == 1


def test_a_message_that_may_touch_any_request_neither_passes_nor_is_passed_by_its_sender():
    sweep = batch(SweepStale(0.0, frozenset()))
    assert small_first([(batch(big("B")), A), (sweep, A), (batch(chunk(1, "S")), A)]) == 0
    assert small_first([(batch(big("B"), SweepStale(0.0, frozenset())), A), (batch(chunk(1, "S")), A)]) == 0


def test_another_senders_message_may_pass_as_no_order_holds_between_senders():
    assert small_first([(batch(big("B")), A), (LegacyResult({"request_id": "B"}, "complete"), L)]) == 1
    assert small_first([(batch(big("B")), A), (ReplaceSlots((), 0.0), L)]) == 0   # touches any: waits
    # ... but never past an earlier message of its own about the same request
    assert small_first([(big("B"), D), (batch(big("C")), A), (chunk(1, "B"), D)]) == 0
    assert small_first([(big("B"), D), (batch(big("C")), A), (chunk(1, "X"), D)]) == 2


def test_a_small_first_message_keeps_the_backlog_as_it_was():
    assert small_first([(batch(chunk(1, "S")), A), (batch(chunk(1, "T")), A)]) == 0
    assert small_first([(batch(big("B")), A)]) == 0


def test_a_steady_stream_of_small_work_passes_a_big_chunk_at_most_max_passes_times():
    """The writer's own pick (Writer.lane_pick) over a backlog where small work keeps coming: the big
    chunk goes after MAX_PASSES of it, and the count starts again for the next big chunk."""
    w = Writer()
    w.passed_big, w._waiting_big, w._passes = 0, None, 0
    backlog = collections.deque([(batch(big("B1")), A)] + [(batch(chunk(1, f"S{k}")), A) for k in range(40)]
                                + [(batch(big("B2")), A)] + [(batch(chunk(1, f"T{k}")), A) for k in range(40)])
    order = []
    while backlog:
        i = w.lane_pick(backlog) if carries_big(backlog[0][0]) else 0
        msg, _ = backlog[i]
        del backlog[i]
        order.append(next(iter(touches(msg))))
    assert order.index("B1") == MAX_PASSES
    # the rest of the S-work was ahead of B2 anyway; then B2 waits first in line and T-work passes it
    assert order.index("B2") == 1 + 40 + MAX_PASSES
    assert sorted(order) == sorted(["B1", "B2"] + [f"S{k}" for k in range(40)] + [f"T{k}" for k in range(40)])
    assert w.passed_big == 2 * MAX_PASSES


class FlakyStore:
    """A store whose status writes fail while `down`; records what it applied, in order."""

    def __init__(self):
        self.down, self.applied, self.conn = True, [], object()

    def _do(self, what):
        if self.down:
            from pairlane.store import StoreError
            raise StoreError("connection", "the server is starting up")
        self.applied.append(what)

    def begin(self, meta):
        self._do(("begin", meta["request_id"]))

    def set_status(self, rid, status, error=None):
        self._do(("status", rid, status))


def test_a_status_change_never_overtakes_a_deferred_one():
    """The store failed a request's `begin` (deferred); it is back when its `spooled` comes: that
    must wait for the begin (applied first it changed nothing, and the begin then left the row
    `receiving` for another daemon's sweep to abandon: a multi-daemon chaos run lost a result so)."""
    w = Writer()
    w.name, w.deferred, w.store = "writer", [], FlakyStore()
    w._status_change(("begin", {"request_id": "R"}))
    assert w.store.applied == [] and len(w.deferred) == 1
    w.store.down = False
    w._status_change(("status", "R", "spooled", None))
    assert w.store.applied == [("begin", "R"), ("status", "R", "spooled")] and w.deferred == []
    w._status_change(("status", "S", "abandoned", None))       # nothing waits: applied at once
    assert w.store.applied[-1] == ("status", "S", "abandoned")
    w.store.down = True
    w._status_change(("begin", {"request_id": "T"}))
    w._status_change(("status", "T", "spooled", None))
    assert len(w.deferred) == 2
    w.store.down = False
    w.tick()
    assert w.store.applied[-2:] == [("begin", "T"), ("status", "T", "spooled")] and w.deferred == []


def test_a_checked_write_the_store_holds_or_cannot_take_is_answered_skipped_and_never_spooled(tmp_path):
    from pairlane.chunks import encode_chunk
    from pairlane.metrics import MetricBatch
    from pairlane.store import Store, StoreError, meta_from_message
    from pairlane.synthetic import result_columns
    from pairlane.actors.messages import ChunkDurable, SpoolBatch, WriteSkipped
    w = Writer()
    w.name, w.deferred, w.metrics = "writer", [], MetricBatch()
    w.failures = w.spooled = w.rejected = 0
    w.store = Store(str(tmp_path / "s.db"))
    w.store.open()
    sent = []
    w.send_ordered = lambda addr, msg: sent.append((addr, msg))
    w.directory = {"dlq": "dlq-address"}                       # a dlq is there: a failed write would spool
    raw = encode_chunk("R", 0, result_columns(10, seed=1), 0, 10)
    m = meta_from_message({"request_id": "R", "strategy_name": "S", "total_trades": 10, "total_chunks": 1})
    checked = WriteChunk(m, 0, raw, 10, reply_to="assembler", record=True, new_only=True)
    w._write_chunk(checked, "assembler")
    assert isinstance(sent[-1][1], ChunkDurable) and sent[-1][1].status == "complete"
    w._write_chunk(checked, "assembler")                       # the store holds it now
    assert isinstance(sent[-1][1], WriteSkipped) and sent[-1][1].row["status"] == "complete"
    assert sent[-1][0] == "assembler" and w.store.rows_written == 10

    def down(*args, **kwargs):
        raise StoreError("locked", "database is locked")
    w.store.write_chunk = down
    w._write_chunk(WriteChunk(dict(m, request_id="Q"), 0, raw, 10, reply_to="assembler", record=True,
                              new_only=True), "assembler")
    skipped = sent[-1][1]
    assert isinstance(skipped, WriteSkipped) and skipped.row is None and "locked" in skipped.error
    assert not any(isinstance(msg, SpoolBatch) for _, msg in sent) and w.spooled == 0
    w._write_chunk(WriteChunk(dict(m, request_id="P"), 0, raw, 10, reply_to="assembler", record=True),
                   "assembler")                                # an unchecked one spools as before
    assert isinstance(sent[-1][1], SpoolBatch) and w.spooled == 1
    w.store.close()
