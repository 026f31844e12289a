"""The request lifecycle (pairlane.lifecycle), row by row from PROTOCOL.md section 1, without processes.

A `World` plays the assembler's surroundings: it carries out effects the way the actor does, with a
fake writer that holds writes until the test makes them durable (committing them in a fake store
that applies `lifecycle.settle`, as the real store does) and answers lookups from that fake store.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pairlane import lifecycle as lc
from pairlane.vocab import ResultStatus, WriteOutcome


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def meta(rid, chunks=3, trades=30, strategy="S"):
    return {"request_id": rid, "strategy_name": strategy, "total_trades": trades, "total_chunks": chunks,
            "truncated": 0}


class Probe(lc.Lifecycle):
    """The lifecycle, noting for every reply it emits which chunks of that request were in flight
    and which were durable at that moment (every effect goes out through `_emit`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.at_reply: list = []     # (reply, inflight seqs, durable seqs), in order

    def _emit(self, eff) -> None:
        if isinstance(eff, lc.Reply):
            req = self.reqs.get(eff.reply.get("request_id"))
            self.at_reply.append((eff.reply, frozenset(req.inflight) if req else frozenset(),
                                  frozenset(req.durable) if req else frozenset()))
        super()._emit(eff)

    def handle(self, ev) -> list:
        out = super().handle(ev)
        # the count the busy check reads and the indexes the tick walks are kept, not scanned: they
        # must always equal the scan
        assert self.reqs.receiving == sum(r.status == lc.ResultStatus.RECEIVING for r in self.reqs.values())
        assert self.reqs.receiving_reqs == {rid: r for rid, r in self.reqs.items()
                                            if r.status == lc.ResultStatus.RECEIVING}
        assert set(self.reqs.finished) == {rid for rid, r in self.reqs.items()
                                           if r.status != lc.ResultStatus.RECEIVING}
        return out


class World:
    def __init__(self, credit=4, max_requests=4, timeout=60.0, writer_up=True, dlq_up=False, auto_lookup=True,
                 claims=False, checked=False):
        self.clock = Clock()
        self.lc = Probe(credit, max_requests, timeout, clock=self.clock, wall=self.clock,
                        writer_up=writer_up, dlq_up=dlq_up, claims=claims, checked_writes=checked)
        self.others: set = set()     # request leases other daemons hold (claims=True)
        self.mine: set = set()       # request leases this daemon holds, as the store sees them
        self.store_down = False      # claims fail: nobody can tell who holds a lease
        self.clock.t += lc.LOCAL_LOOKUP_GRACE_S + 1
        self.db: dict = {}           # rid -> {"meta", "status", "chunks": {seq: rows}}
        self.pending: list = []      # Write effects the writer has not answered
        self.lookups: list = []      # Lookup effects not answered (auto_lookup=False)
        self.auto_lookup = auto_lookup
        self.effects: list = []      # every effect, in order
        self.released: list = []
        self.spooled: dict = {}      # rid -> seqs the fake dlq holds

    # --- the fake store, with the store's rules ---
    def row(self, rid):
        r = self.db.get(rid)
        if r is None:
            return None
        m = r["meta"]
        return {"request_id": rid, "status": str(r["status"]), "strategy_name": m["strategy_name"],
                "total_trades": m["total_trades"], "total_chunks": m["total_chunks"], "durable": dict(r["chunks"])}

    def _insert(self, m):
        self.db.setdefault(m["request_id"], {"meta": m, "status": ResultStatus.RECEIVING, "chunks": {}})

    def record(self, m) -> None:
        r = self.db.get(m["request_id"])
        if r is not None and r["status"].final_without_rows:
            del self.db[m["request_id"]]
        self._insert(m)

    def commit(self, w: lc.Write) -> WriteOutcome:
        rid = w.meta["request_id"]
        if w.record:
            self.record(w.meta)
        self._insert(w.meta)
        r = self.db[rid]
        if r["status"].final_without_rows:
            return WriteOutcome.DISCARDED
        if w.seq in r["chunks"]:
            return WriteOutcome.DUPLICATE
        r["chunks"][w.seq] = w.nrows
        out = lc.settle(r["meta"]["total_chunks"], r["meta"]["total_trades"], len(r["chunks"]),
                        sum(r["chunks"].values()))
        if out == WriteOutcome.COMPLETE:
            r["status"] = ResultStatus.COMPLETE
        elif out == WriteOutcome.FAILED:
            r["status"] = ResultStatus.FAILED
            r["chunks"] = {}
        return out

    # --- driving ---
    def send(self, ev) -> list[dict]:
        out = []
        for e in self.lc.handle(ev):
            self.effects.append(e)
            if isinstance(e, lc.Reply):
                out.append(e.reply)
            elif isinstance(e, lc.Release):
                self.released.append((e.request_id, e.seq))
            elif isinstance(e, lc.Write):
                self.pending.append(e)
            elif isinstance(e, lc.Record):
                self.record(e.meta)
            elif isinstance(e, lc.SetStatus):
                r = self.db.get(e.request_id)
                if r is None:
                    continue
                if e.status.final_without_rows and not r["status"].stored:
                    r["status"], r["chunks"] = e.status, {}
                elif e.status == ResultStatus.SPOOLED and r["status"] == ResultStatus.RECEIVING:
                    r["status"] = e.status
            elif isinstance(e, lc.Claim) and self.store_down:
                out += self.send(lc.Claimed(e.request_id, False, failed=True))
            elif isinstance(e, lc.Claim):
                ok = e.request_id not in self.others
                if ok:
                    self.mine.add(e.request_id)
                out += self.send(lc.Claimed(e.request_id, ok))
            elif isinstance(e, lc.Unclaim):
                assert e.request_id in self.mine, e
                self.mine.discard(e.request_id)
            elif isinstance(e, lc.Lookup):
                if self.auto_lookup:
                    out += self.send(lc.LookupAnswer(e.request_id, self.row(e.request_id)))
                else:
                    self.lookups.append(e)
        return out

    def begin(self, rid, chunks=3, trades=30, strategy="S", who=b"p"):
        return self.send(lc.Begin(rid, who, meta(rid, chunks, trades, strategy)))

    def chunk(self, rid, seq, nrows=10, who=b"p", bad=None):
        return self.send(lc.Chunk(rid, who, seq, b"raw", nrows, bad))

    def end(self, rid, who=b"p"):
        return self.send(lc.End(rid, who))

    def abort(self, rid, who=b"p"):
        return self.send(lc.Abort(rid, who))

    def durable(self, i=0, location="db"):
        w = self.pending.pop(i)
        if w.new_only:   # a checked write: done only if the store does not hold the request, never spooled
            rid = w.meta["request_id"]
            r = self.db.get(rid)
            if location != "db":
                return self.send(lc.Skipped(rid, None, failed=True))
            if r is not None and not r["status"].final_without_rows:
                return self.send(lc.Skipped(rid, self.row(rid)))
        if location == "db":
            outcome = self.commit(w)
        else:
            outcome = ResultStatus.SPOOLED
            self.spooled.setdefault(w.meta["request_id"], set()).add(w.seq)
        return self.send(lc.Durable(w.meta["request_id"], w.seq, location, outcome, w.nrows))

    def durable_all(self):
        out = []
        while self.pending:
            out += self.durable()
        return out

    def tick(self, dt=0.0):
        self.clock.t += dt
        return self.send(lc.Tick())

    def writes(self):
        return [e for e in self.effects if isinstance(e, lc.Write)]

    def statuses(self, rid):
        return [e.status for e in self.effects if isinstance(e, lc.SetStatus) and e.request_id == rid]


def only(replies):
    assert len(replies) == 1, replies
    return replies[0]


def code(replies):
    r = only(replies)
    assert r["type"] == "error", r
    return r["code"]


# ----- settle: the one completion rule -------------------------------------------------------------
@pytest.mark.parametrize("total_chunks,total_trades,durable_chunks,durable_rows,expected", [
    (3, 30, 2, 20, WriteOutcome.RECEIVING),
    (3, 30, 2, 30, WriteOutcome.RECEIVING),      # rows add up early: still waiting for a chunk
    (3, 30, 3, 30, WriteOutcome.COMPLETE),
    (3, 30, 3, 29, WriteOutcome.FAILED),
    (3, 30, 3, 31, WriteOutcome.FAILED),
    (1, 0, 1, 0, WriteOutcome.COMPLETE),         # no trades: one chunk with empty columns
])
def test_settle(total_chunks, total_trades, durable_chunks, durable_rows, expected):
    assert lc.settle(total_chunks, total_trades, durable_chunks, durable_rows) == expected


# ----- begin ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("credit,chunks,window", [(4, 1, 1), (4, 3, 3), (4, 4, 4), (4, 10, 4), (8, 100, 8)])
def test_begin_new_grants_min_of_credit_and_total_chunks(credit, chunks, window):
    w = World(credit=credit)
    assert only(w.begin("R", chunks=chunks, trades=chunks)) == {"type": "credit", "request_id": "R", "credit": window}
    assert any(isinstance(e, lc.Record) for e in w.effects)  # visible as receiving at once


def test_begin_again_same_totals_full_window_and_durable_chunks_kept():
    w = World(credit=2)
    w.begin("R", chunks=4, trades=40)
    w.chunk("R", 0)
    w.chunk("R", 1)
    w.durable()
    assert only(w.begin("R", chunks=4, trades=40, who=b"q"))["credit"] == 2   # full window again
    assert only(w.chunk("R", 0, who=b"q")) == {"type": "credit", "request_id": "R", "credit": 1, "seq": 0}
    assert len(w.writes()) == 2  # the durable seq 0 was not written again
    assert only(w.durable()) == {"type": "credit", "request_id": "R", "credit": 1, "seq": 1}


@pytest.mark.parametrize("other", [dict(strategy="T"), dict(trades=31), dict(chunks=4)])
def test_begin_with_other_totals_is_conflict_in_progress_and_stored(other):
    w = World()
    w.begin("R")
    args = dict(chunks=3, trades=30, strategy="S") | other
    assert code(w.begin("R", **args)) == "conflict"
    for s in range(3):
        w.chunk("R", s)
    w.durable_all()
    assert code(w.begin("R", **args)) == "conflict"       # stored, remembered
    w.lc.recent.clear()
    w.lc.reqs.clear()
    assert code(w.begin("R", **args)) == "conflict"       # stored, known from the store's row only


def one_stored_result(rid: str, trades: int) -> tuple[World, dict]:
    """A world where `rid`, one chunk of `trades` rows, is stored; and its `stored` reply."""
    w = World()
    w.begin(rid, chunks=1, trades=trades)
    w.chunk(rid, 0)
    w.durable()
    return w, {"type": "stored", "request_id": rid, "trades": trades, "trades_ref": rid, "location": "db"}


def test_begin_for_stored_request_answers_stored_at_once():
    w, stored = one_stored_result("R", 10)
    assert only(w.begin("R", chunks=1, trades=10)) == stored
    w.lc.reqs.clear()                                           # left memory: recent answers
    assert only(w.begin("R", chunks=1, trades=10)) == stored
    w.lc.recent.clear()                                         # after a restart: the store answers
    assert only(w.begin("R", chunks=1, trades=10)) == stored
    assert only(w.end("R")) == stored


def test_a_stored_result_leaves_recent_after_its_max_age_and_the_store_answers_the_same():
    w, stored = one_stored_result("R", 10)
    w.tick(lc.RECENT_MAX_AGE_S / 2)
    assert "R" in w.lc.recent
    lookups = sum(isinstance(e, lc.Lookup) for e in w.effects)
    assert only(w.begin("R", chunks=1, trades=10)) == stored       # from memory: no lookup
    assert sum(isinstance(e, lc.Lookup) for e in w.effects) == lookups
    w.tick(lc.RECENT_MAX_AGE_S)
    assert "R" not in w.lc.recent and "R" not in w.lc.reqs
    assert only(w.begin("R", chunks=1, trades=10)) == stored       # from the store: same answer
    assert sum(isinstance(e, lc.Lookup) for e in w.effects) == lookups + 1
    assert code(w.begin("R", chunks=1, trades=11)) == "conflict"


def test_a_finished_request_is_forgotten_once_idle_30_s_and_one_touched_since_later():
    w, stored = one_stored_result("R", 10)
    w2, _ = one_stored_result("S", 10)
    w.lc.reqs["S"] = w2.lc.reqs["S"]                       # both finished now
    w.tick(29.0)
    assert {"R", "S"} <= set(w.lc.reqs)
    assert only(w.begin("S", chunks=1, trades=10)) == stored | {"request_id": "S", "trades_ref": "S"}
    w.tick(2.0)                                            # R idle 31 s; S touched 2 s ago
    assert "R" not in w.lc.reqs and "S" in w.lc.reqs
    assert only(w.begin("R", chunks=1, trades=10)) == stored   # `recent` answers for it
    w.tick(30.0)                                           # S idle 32 s, but queued again 30 s ago
    assert "S" in w.lc.reqs
    w.tick(1.0)
    assert "S" not in w.lc.reqs


def test_the_tick_visits_only_finished_requests_queued_long_enough_ago():
    """Finished requests wait in the order they finished: the tick stops at the first queued less
    than the idle time ago, and never walks the rest (19 ms a tick at 24,000 of them)."""
    clock = Clock()
    reqs = lc.Requests(clock)
    for k, rid in enumerate(("a", "b", "c")):
        clock.t = 10.0 * k
        req = lc.Req(meta=meta(rid), identity=b"p", window=1, began_at=0.0, last_activity=0.0)
        reqs[rid] = req
        reqs.set_status(req, ResultStatus.COMPLETE)
    clock.t = 35.0                                         # all three idle 35 s; b and c queued < 30 s ago
    assert reqs.expired_finished(30.0) == ["a"]
    clock.t = 45.0
    assert reqs.expired_finished(30.0) == ["a", "b"]       # nothing popped them: still there
    reqs.pop("a")
    reqs["b"].inflight[0] = (10, 44.0)                     # a chunk in flight: kept, queued again
    clock.t = 55.0
    assert reqs.expired_finished(30.0) == ["c"] and list(reqs.finished) == ["c", "b"]
    assert reqs.receiving == 0 and set(reqs.finished) == {"b", "c"}


def test_the_last_credit_and_the_stored_notice_leave_in_one_handle():
    """The gateway may answer `end` itself once it holds a result's Stored: that notice must go out
    with the last chunk's credit (one Outbound), before the producer can send its `end`."""
    w = World()
    w.begin("R", chunks=2, trades=20)
    w.chunk("R", 0)
    w.chunk("R", 1)
    w.durable()
    effects = w.lc.handle(lc.Durable("R", 1, "db", WriteOutcome.COMPLETE, 10))
    kinds = [type(e) for e in effects]
    assert lc.Stored in kinds and lc.Reply in kinds, kinds
    stored = next(e for e in effects if isinstance(e, lc.Stored))
    assert stored.reply == {"type": "stored", "request_id": "R", "trades": 20, "trades_ref": "R", "location": "db"}
    assert only(w.end("R")) == stored.reply                        # the assembler's own answer is the same


def test_a_one_message_result_sends_the_gateway_no_stored_notice():
    """No Stored for a one-message `result`. Nobody sends `end` after it, so the notice would be
    useless, and it is not free: it would be one extra assembler->gateway message per result
    (usually the writer has already answered the producer), crossing the producer's next message
    at the gateway; Thespian loses a round of tens of ms whenever two actors send to each other at
    once (measured: result p99 37 ms instead of 7-9 ms)."""
    w = World()
    w.send(result("R"))
    write = w.pending.pop()
    effects = w.lc.handle(lc.Durable("R", 0, "db", w.commit(write), 10, answered=write.answer[0]))
    assert not any(isinstance(e, lc.Stored) for e in effects) and w.lc.reqs["R"].status == ResultStatus.COMPLETE


def test_hash_ring_never_forgets_its_last_slots_keys_and_never_grows():
    ring = lc.HashRing(64)
    nbytes = ring.ring.nbytes
    keys = [f"rid-{i}" for i in range(200)]
    for i, k in enumerate(keys):
        assert k not in ring   # a collision would be allowed (a safe yes); these keys have none
        ring.add(k)
        assert all(x in ring for x in keys[max(0, i - 63):i + 1])
    assert len(ring) == 64 and ring.ring.nbytes == nbytes
    assert sum(k in ring for k in keys[:136]) == 0             # the older ones are gone (no collisions here)


def test_resume_after_restart_from_store_row_and_dlq_inventory():
    w = World(dlq_up=True)
    w.db["R"] = {"meta": meta("R", 3, 30), "status": ResultStatus.RECEIVING, "chunks": {0: 10}}
    w.send(lc.Inventory((("R", 1, 10, lc.totals(meta("R", 3, 30))),)))
    assert only(w.begin("R"))["credit"] == 3
    assert only(w.chunk("R", 0))["seq"] == 0 and only(w.chunk("R", 1))["seq"] == 1  # both durable: credit at once
    assert not any(isinstance(e, lc.Record) for e in w.effects)  # resumed, not started over
    w.chunk("R", 2)
    w.durable()
    assert only(w.end("R"))["location"] == "dlq"
    assert ResultStatus.SPOOLED in w.statuses("R")


def test_begin_over_max_requests_is_busy_and_retryable():
    w = World(max_requests=2)
    w.begin("A")
    w.begin("B")
    r = only(w.begin("C"))
    assert r["code"] == "busy" and r["retry_after_s"] > 0
    assert code(w.begin("A", trades=1)) == "conflict"          # conflict is decided before busy
    assert only(w.begin("A"))["type"] == "credit"              # a resend of one in progress is not busy
    w.abort("A")
    assert only(w.begin("C"))["type"] == "credit"


def test_pending_lookups_count_toward_max_requests():
    w = World(max_requests=1, auto_lookup=False)
    assert w.begin("A") == [] and len(w.lookups) == 1
    assert code(w.begin("B")) == "busy"


# ----- chunk ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setup,event,expected", [
    ("none", lc.Chunk("R", b"p", 0, b"raw", 10), "unknown_request"),
    ("none", lc.Chunk("R", b"p", 9, b"raw", 10, ("bad_chunk", "NaN")), "unknown_request"),  # unknown first
    ("none", lc.End("R", b"p"), "unknown_request"),
    ("begun", lc.Chunk("R", b"p", 3, b"raw", 10), "bad_chunk"),                              # 0..2
    ("begun", lc.Chunk("R", b"p", 0, b"raw", 10, ("bad_chunk", "NaN")), "bad_chunk"),
    ("aborted", lc.Chunk("R", b"p", 0, b"raw", 10), "unknown_request"),
    ("abandoned", lc.Chunk("R", b"p", 0, b"raw", 10), "unknown_request"),
    ("abandoned", lc.End("R", b"p"), "unknown_request"),
])
def test_error_codes(setup, event, expected):
    w = World()
    if setup != "none":
        w.begin("R")
    if setup == "aborted":
        w.abort("R")
    if setup == "abandoned":
        w.tick(61)
    assert code(w.send(event)) == expected
    if isinstance(event, lc.Chunk):
        assert w.released[-1] == ("R", event.seq) and w.pending == []


def test_chunk_becoming_durable_earns_credit_one():
    w = World()
    w.begin("R")
    assert w.chunk("R", 2) == []
    assert only(w.durable()) == {"type": "credit", "request_id": "R", "credit": 1, "seq": 2}
    w.chunk("R", 1)
    assert only(w.durable(location="dlq")) == {"type": "credit", "request_id": "R", "credit": 1, "seq": 1}


def test_duplicate_of_durable_seq_earns_credit_at_once_and_is_ignored():
    w = World()
    w.begin("R")
    w.chunk("R", 0)
    w.durable()
    assert only(w.chunk("R", 0)) == {"type": "credit", "request_id": "R", "credit": 1, "seq": 0}
    assert len(w.writes()) == 1 and ("R", 0) in w.released


def test_duplicate_of_inflight_seq_is_dropped_silently():
    w = World()
    w.begin("R")
    w.chunk("R", 0)
    assert w.chunk("R", 0) == [] and len(w.writes()) == 1
    assert only(w.durable()) == {"type": "credit", "request_id": "R", "credit": 1, "seq": 0}  # exactly one


def test_rejected_chunk_is_answered_and_no_longer_in_flight():
    w = World()
    w.begin("R")
    w.chunk("R", 0)
    w.pending.clear()
    r = only(w.send(lc.Rejected("R", 0, "unavailable", "disk full", 5.0)))
    assert r["code"] == "unavailable" and r["retry_after_s"] == 5.0
    assert w.chunk("R", 0) == [] and len(w.writes()) == 2   # accepted again


def test_unavailable_while_writer_is_down():
    w = World()
    w.begin("R")
    w.send(lc.Peers(writer_up=False, dlq_up=False, lost=True))
    assert code(w.chunk("R", 0)) == "unavailable"


def test_writer_lost_releases_inflight_and_chunks_are_accepted_again():
    w = World()
    w.begin("R")
    w.chunk("R", 0)
    w.pending.clear()
    w.send(lc.Peers(writer_up=True, dlq_up=False, lost=True))
    assert ("R", 0) in w.released
    assert w.chunk("R", 0) == [] and len(w.writes()) == 2


# ----- completion and end ---------------------------------------------------------------------------
def test_complete_without_end():
    w = World()
    w.begin("R")
    for s in (2, 0, 1):
        w.chunk("R", s)
    w.durable_all()
    assert w.lc.reqs["R"].status == ResultStatus.COMPLETE
    assert lc.Metric("inc", "pairlane_results_total", 1.0, (("outcome", "stored_db"),)) in w.effects
    assert only(w.end("R"))["type"] == "stored"


def test_end_waits_for_chunks_in_flight():
    w = World()
    w.begin("R", chunks=2, trades=20)
    w.chunk("R", 0)
    w.chunk("R", 1)
    assert w.end("R") == []
    assert only(w.durable())["type"] == "credit"
    replies = w.durable()
    assert [r["type"] for r in replies] == ["credit", "stored"] and replies[1]["trades"] == 20


def test_end_with_missing_seqs_is_incomplete_with_missing_list():
    w = World()
    w.begin("R", chunks=5, trades=50)
    w.chunk("R", 1)
    w.chunk("R", 3)
    w.durable()
    assert w.end("R") == []              # seq 3 in flight: answered once durable
    credit, r = w.durable()
    assert credit["seq"] == 3 and r["code"] == "incomplete" and r["missing"] == [0, 2, 4]
    for s in (0, 2, 4):                  # not final: send them, then end again
        w.chunk("R", s)
    w.durable_all()
    assert only(w.end("R"))["type"] == "stored"


def test_missing_list_is_at_most_1000():
    w = World()
    w.begin("R", chunks=5000, trades=5000)
    r = only(w.end("R"))
    assert r["code"] == "incomplete" and r["missing"] == list(range(1000))


def test_rows_not_adding_up_fail_the_result_and_end_gets_incomplete():
    w = World()
    w.begin("R", chunks=2, trades=25)
    w.chunk("R", 0)
    w.chunk("R", 1)
    w.durable_all()
    assert w.lc.reqs["R"].status == ResultStatus.FAILED
    r = only(w.end("R"))
    assert r["code"] == "incomplete" and r["missing"] == [0, 1]
    assert only(w.begin("R", chunks=2, trades=25))["credit"] == 2   # begin again starts over


def test_rows_not_adding_up_decided_here_when_chunks_are_spooled():
    w = World(dlq_up=True)
    w.begin("R", chunks=2, trades=25)
    w.chunk("R", 0)
    w.chunk("R", 1)
    w.durable(location="dlq")
    w.durable(location="dlq")
    assert ResultStatus.FAILED in w.statuses("R")
    assert code(w.end("R")) == "incomplete"


def test_spooled_result_is_stored_in_dlq():
    w = World(dlq_up=True)
    w.begin("R", chunks=1, trades=10)
    w.chunk("R", 0)
    w.durable(location="dlq")
    assert w.statuses("R") == [ResultStatus.SPOOLED]
    assert only(w.end("R"))["location"] == "dlq"


# ----- abort and abandonment ------------------------------------------------------------------------
def test_abort_drops_the_request_and_its_rows():
    w = World()
    w.begin("R")
    w.chunk("R", 0)
    assert only(w.abort("R")) == {"type": "aborted", "request_id": "R"}
    assert w.statuses("R") == [ResultStatus.ABANDONED] and ("R", 0) in w.released
    assert code(w.end("R")) == "unknown_request"
    assert w.durable() == []             # its late answer credits no one


def test_abort_answers_an_end_waiting_for_chunks_in_flight():
    """Found by the direct path's model (test_direct_path): an `end` waiting for chunks in flight
    was never answered when another message aborted the request meanwhile."""
    w = World()
    w.begin("R", chunks=2, trades=20, who=b"p")
    w.chunk("R", 0, who=b"p")
    assert w.end("R", who=b"p") == []                    # waits for chunk 0
    replies = w.abort("R", who=b"q")
    assert [(r["type"], r.get("code")) for r in replies] == [("error", "unknown_request"), ("aborted", None)]
    assert [e.identity for e in w.effects if isinstance(e, lc.Reply)][-2:] == [b"p", b"q"]


def test_abort_of_stored_request_is_conflict():
    w = World()
    w.begin("R", chunks=1, trades=10)
    w.chunk("R", 0)
    w.durable()
    assert code(w.abort("R")) == "conflict"
    w.lc.reqs.clear()
    w.lc.recent.clear()
    assert code(w.abort("R")) == "conflict"     # known only to the store
    assert w.statuses("R") == []


def test_abort_of_unknown_request_asks_the_store_then_answers_aborted():
    w = World()
    assert only(w.abort("R"))["type"] == "aborted"


def test_abandoned_after_idle_timeout():
    w = World(timeout=60)
    w.begin("R")
    assert w.tick(59) == [] and "R" in w.lc.reqs
    w.chunk("R", 0)
    w.durable()
    w.tick(59)
    assert "R" in w.lc.reqs                 # activity restarted the timer
    w.tick(2)
    assert "R" not in w.lc.reqs and w.statuses("R") == [ResultStatus.ABANDONED]
    assert code(w.chunk("R", 1)) == "unknown_request"


def test_not_abandoned_while_chunks_wait_on_the_daemon():
    w = World(timeout=60)
    w.begin("R")
    w.chunk("R", 0)
    w.tick(100)
    assert "R" in w.lc.reqs and w.statuses("R") == []
    assert only(w.durable())["type"] == "credit"
    w.tick(61)
    assert "R" not in w.lc.reqs and w.statuses("R") == [ResultStatus.ABANDONED]


def test_chunk_without_answer_stops_being_in_flight_after_timeout():
    w = World(timeout=1000)
    w.begin("R")
    w.chunk("R", 0)
    w.tick(lc.INFLIGHT_TIMEOUT_S + 1)
    assert w.lc.reqs["R"].inflight == {} and ("R", 0) in w.released


def test_lookup_timeout_is_busy():
    w = World(auto_lookup=False)
    w.begin("R")
    w.end("R")                                # queued behind the lookup
    replies = w.tick(lc.LOOKUP_TIMEOUT_S + 1)
    assert [r["code"] for r in replies] == ["busy", "busy"]


def test_queued_messages_run_after_the_lookup_answer():
    w = World(auto_lookup=False)
    w.begin("R")
    w.chunk("R", 0)
    assert w.lookups and w.pending == []
    replies = w.send(lc.LookupAnswer("R", None))
    assert [r["type"] for r in replies] == ["credit"] and len(w.pending) == 1


def test_lookups_go_through_the_writer_after_a_status_change():
    w = World()
    w.begin("R")
    w.abort("R")
    w.lc.reqs.clear()
    w.begin("R")
    assert [e.local_ok for e in w.effects if isinstance(e, lc.Lookup)] == [True, False]


# ----- result (one message) ----------------------------------------------------------------------
def result(rid, trades=10, nrows=10, bad=None, strategy="S"):
    return lc.Result(rid, b"p", meta(rid, 1, trades, strategy), bad, "zmq", b"raw", nrows)


def test_result_happy_path():
    w = World()
    assert w.send(result("R")) == [] and len(w.pending) == 1
    assert only(w.durable()) == {"type": "stored", "request_id": "R", "trades": 10, "trades_ref": "R",
                                 "location": "db"}
    assert only(w.send(result("R")))["type"] == "stored"


def test_result_resent_while_written_waits_for_the_write_then_each_message_is_answered():
    """PROTOCOL.md: a `result` is answered `stored` or with an error. The resend is written once
    and answered after the first, not dropped silently as an in-flight chunk is."""
    w = World()
    w.send(result("R"))
    assert w.send(result("R")) == [] and len(w.pending) == 1
    assert [r["type"] for r in w.durable()] == ["stored", "stored"] and not w.pending
    assert w.released.count(("R", 0)) == 2


def test_result_resent_after_the_writers_answer_but_before_its_durable_is_answered():
    """The writer answers the producer before it tells us (the producer is waiting; we are not), so
    the producer can send the result again before we learn it is stored: it must hear `stored`."""
    w = World()
    w.send(result("R"))
    write = w.pending.pop()
    assert w.send(result("R")) == []                     # sent after the writer's answer reached b"p"
    replies = w.send(lc.Durable("R", 0, "db", w.commit(write), 10, answered=b"p"))
    assert only(replies)["type"] == "stored" and not w.pending
    # the first frame was released at the gateway by the writer's answer; the second by ours
    assert w.released == [("R", 0)]


def test_result_resent_after_it_is_stored_is_answered_and_released():
    w = World()
    w.send(result("R"))
    w.durable()
    w.released.clear()
    assert only(w.send(result("R")))["type"] == "stored" and w.released == [("R", 0)]
    w.lc.reqs.clear()                                    # answered from `recent`
    assert only(w.send(result("R")))["type"] == "stored" and w.released == [("R", 0)] * 2
    w.lc.recent.clear()                                  # answered from the database
    assert only(w.send(result("R")))["type"] == "stored" and w.released == [("R", 0)] * 3


# ----- checked writes (SQLite): a new one-message result is written without a lookup first ---------
def test_checked_write_of_a_new_result_skips_the_lookup_and_is_stored():
    w = World(checked=True)
    assert w.send(result("R")) == []
    assert not any(isinstance(e, lc.Lookup) for e in w.effects)
    assert [(x.seq, x.record, x.new_only) for x in w.writes()] == [(0, True, True)]
    assert only(w.durable())["type"] == "stored" and w.db["R"]["status"] == ResultStatus.COMPLETE
    assert w.lc.reqs["R"].checking is None and w.lc.stats["checked_writes"] == 1


def test_checked_write_finding_the_result_stored_answers_stored_or_conflict_without_writing():
    w = World(checked=True)
    w.db["R"] = {"meta": meta("R", 1, 10), "status": ResultStatus.COMPLETE, "chunks": {0: 10}}
    w.db["X"] = {"meta": meta("X", 1, 10, "other"), "status": ResultStatus.COMPLETE, "chunks": {0: 10}}
    w.send(result("R"))
    w.send(result("X"))
    replies = w.durable() + w.durable()
    assert [r["type"] for r in replies] == ["stored", "error"] and replies[1]["code"] == "conflict"
    assert not w.pending and "R" not in w.lc.reqs and "X" not in w.lc.reqs
    assert sorted(w.released) == [("R", 0), ("X", 0)]          # both frames released at the gateway
    assert w.lc.stats["checked_writes_skipped"] == 2


def test_checked_write_finding_the_result_receiving_resumes_it_the_usual_way():
    w = World(checked=True)
    w.db["R"] = {"meta": meta("R", 1, 10), "status": ResultStatus.RECEIVING, "chunks": {}}
    w.send(result("R"))
    assert w.durable() == []                                   # skipped: written again, unchecked
    assert [x.new_only for x in w.writes()] == [True, False]
    assert only(w.durable())["type"] == "stored" and w.db["R"]["status"] == ResultStatus.COMPLETE


def test_checked_write_the_store_could_not_take_goes_through_a_lookup_and_may_spool():
    w = World(checked=True, dlq_up=True)
    w.send(result("R"))
    assert w.durable(location="dlq") == []                      # never spooled as a checked write
    assert [e.request_id for e in w.effects if isinstance(e, lc.Lookup)] == ["R"]
    assert [x.new_only for x in w.writes()] == [True, False]
    assert only(w.durable(location="dlq"))["location"] == "dlq"


def test_what_waits_behind_a_checked_write_is_answered_once_it_is_known():
    w = World(checked=True)
    w.db["R"] = {"meta": meta("R", 1, 10), "status": ResultStatus.COMPLETE, "chunks": {0: 10}}
    w.send(result("R"))
    assert w.abort("R", who=b"a") == [] and w.send(result("R", strategy="T")) == []
    replies = w.durable()
    assert [(r["type"], r.get("code")) for r in replies] == [("stored", None), ("error", "conflict"),
                                                              ("error", "conflict")]


def test_a_checked_write_lost_with_the_writer_or_unanswered_is_forgotten_and_starts_over():
    w = World(checked=True)
    w.send(result("R"))
    w.pending.clear()
    assert w.send(lc.Peers(writer_up=True, dlq_up=False, lost=True)) == []
    assert "R" not in w.lc.reqs and w.released == [("R", 0)]
    w.send(result("R"))                                         # the resend: checked again
    assert [x.new_only for x in w.writes()] == [True, True]
    w.pending.clear()
    w.send(result("R"))                                         # again: held behind the write in flight
    assert "R" in w.lc.reqs and w.lc.reqs["R"].held
    w.tick(lc.INFLIGHT_TIMEOUT_S + 1)                           # its answer never came
    assert [x.new_only for x in w.writes()][-1] is True and w.lc.reqs["R"].checking is not None
    assert only(w.durable())["type"] == "stored"


def test_results_that_may_not_skip_the_lookup():
    big = lc.BULK_ROWS + 1
    w = World(checked=True, dlq_up=True)
    w.send(result("B", trades=big, nrows=big))                  # big: waits for the bulk window
    w.lc.inventory["D"] = {0: (10, (1, 10))}                    # the dlq holds a chunk of it
    w.send(result("D"))
    assert [e.request_id for e in w.effects if isinstance(e, lc.Lookup)] == ["B", "D"]
    assert not any(x.new_only for x in w.writes())
    plain = World()                                             # a store that cannot check (PostgreSQL)
    plain.send(result("R"))
    assert [e.request_id for e in plain.effects if isinstance(e, lc.Lookup)] == ["R"]


def test_small_result_is_recorded_in_its_chunk_write_big_one_at_once():
    w = World()
    w.send(result("R"))
    assert not any(isinstance(e, lc.Record) for e in w.effects)       # one message to the writer
    assert [(x.seq, x.record) for x in w.writes()] == [(0, True)]
    w.durable()
    assert w.db["R"]["status"] == ResultStatus.COMPLETE
    big = lc.BULK_ROWS + 1
    w.send(result("B", trades=big, nrows=big))
    kinds = [type(e).__name__ for e in w.effects if isinstance(e, (lc.Record, lc.Write))]
    assert kinds[-2:] == ["Record", "Write"] and not w.writes()[-1].record  # visible while it waits


def test_result_answered_by_the_writer_is_not_answered_twice():
    w = World()
    w.send(result("R"))
    stored = {"type": "stored", "request_id": "R", "trades": 10, "trades_ref": "R", "location": "db"}
    write = w.pending.pop()
    assert write.answer == (b"p", stored)
    outcome = w.commit(write)
    assert w.send(lc.Durable("R", 0, "db", outcome, 10, answered=b"p")) == []   # the writer told b"p"
    assert w.lc.reqs["R"].status == ResultStatus.COMPLETE and only(w.send(result("R"))) == stored


def test_result_resent_from_another_socket_while_written_gets_its_answer():
    w = World()
    w.send(result("R"))
    assert w.send(lc.Result("R", b"q", meta("R", 1, 10), None, "zmq", b"raw", 10)) == []
    write = w.pending.pop()
    outcome = w.commit(write)
    replies = w.send(lc.Durable("R", 0, "db", outcome, 10, answered=write.answer[0]))
    assert only(replies)["type"] == "stored"     # b"q" is not who the writer told


def test_abort_of_a_result_being_written_waits_for_the_write_then_is_conflict():
    """The writer tells the producer `stored` itself, a message that can reach the producer (and its
    abort reach us) before the writer's answer reaches us: the abort waits for that answer."""
    w = World()
    w.send(result("R"))
    assert w.abort("R", who=b"a") == []
    write = w.pending.pop()
    replies = w.send(lc.Durable("R", 0, "db", w.commit(write), 10, answered=b"p"))
    assert only(replies)["code"] == "conflict" and w.lc.reqs["R"].status == ResultStatus.COMPLETE
    assert w.statuses("R") == [] and w.db["R"]["status"] == ResultStatus.COMPLETE
    assert [e.identity for e in w.effects if isinstance(e, lc.Reply)] == [b"a"]   # p heard the writer


def test_abort_of_a_result_the_database_did_not_take_is_aborted_once_the_write_is_answered():
    w = World()
    w.send(result("R"))
    assert w.abort("R", who=b"a") == []
    write = w.pending.pop()
    replies = w.send(lc.Rejected("R", write.seq, "unavailable", "the database is full", 5.0))
    assert [r.get("code", r["type"]) for r in replies] == ["unavailable", "aborted"]
    assert "R" not in w.lc.reqs


def test_abort_waiting_for_a_write_the_restarted_writer_lost_is_told_to_retry():
    w = World()
    w.send(result("R"))
    w.abort("R", who=b"a")
    w.pending.clear()
    replies = w.send(lc.Peers(True, False, lost=True))
    assert [(r["code"], r["request_id"]) for r in replies] == [("busy", "R")]
    assert w.lc.reqs["R"].held == []


def test_abort_waiting_for_a_write_is_answered_when_another_daemon_took_the_request():
    w = World(claims=True)
    w.send(result("R"))
    w.abort("R", who=b"a")
    w.mine.clear()
    w.others.add("R")
    replies = w.send(lc.LeasesLost())
    assert sorted(r["code"] for r in replies) == ["unavailable", "unavailable"]   # the result's and the abort's
    assert {e.identity for e in w.effects if isinstance(e, lc.Reply)} == {b"p", b"a"}


def test_a_begin_of_a_result_being_written_waits_for_the_write_then_is_stored():
    """Not only an abort: any message of the producer's about the result can overtake the writer's
    answer to us. A begin answered before it would have got a resume credit for a stored result."""
    w = World()
    w.send(result("R"))
    assert w.send(lc.Begin("R", b"p", meta("R", 1, 10), None, "zmq")) == []
    write = w.pending.pop()
    replies = w.send(lc.Durable("R", 0, "db", w.commit(write), 10, answered=b"p"))
    assert only(replies)["type"] == "stored"


def test_messages_held_for_a_result_being_written_are_handled_in_order_after_a_rejection():
    w = World()
    w.send(result("R"))
    w.send(lc.Begin("R", b"p", meta("R", 1, 10), None, "zmq"))   # a producer starting over
    w.abort("R", who=b"p")                                       # and giving up
    write = w.pending.pop()
    replies = w.send(lc.Rejected("R", write.seq, "unavailable", "the database is full", 5.0))
    assert [r.get("code", r["type"]) for r in replies] == ["unavailable", "credit", "aborted"]
    assert "R" not in w.lc.reqs and w.statuses("R") == [ResultStatus.ABANDONED]


def test_messages_held_for_one_result_are_capped():
    w = World()
    w.send(result("R"))
    for _ in range(lc.MAX_HELD):
        assert w.abort("R", who=b"a") == []
    over = w.abort("R", who=b"b")
    assert [(r["code"], r["retry_after_s"]) for r in over] == [("busy", 0.5)]
    replies = w.send(lc.Durable("R", 0, "db", w.commit(w.pending.pop()), 10, answered=b"p"))
    assert [r["code"] for r in replies] == ["conflict"] * lc.MAX_HELD


def test_chunked_writes_carry_no_answer():
    w = World()
    w.begin("R", chunks=2, trades=20)
    w.chunk("R", 0)
    assert [x.answer for x in w.writes()] == [None]


def test_small_result_after_an_abandoned_one_starts_over_in_its_write():
    w = World()
    w.db["R"] = {"meta": meta("R", 1, 10), "status": ResultStatus.ABANDONED, "chunks": {}}
    w.send(result("R"))
    assert [x.record for x in w.writes()] == [True]
    assert only(w.durable())["type"] == "stored" and w.db["R"]["status"] == ResultStatus.COMPLETE
    w.lc.reqs.clear()
    w.lc.recent.clear()
    w.send(result("R"))       # a later lookup of it goes through the writer, which recorded it
    assert [e.local_ok for e in w.effects if isinstance(e, lc.Lookup)] == [True, False]


def test_lookups_are_local_again_once_the_writer_confirms_the_sweep():
    w = World(timeout=10.0)
    w.clock.t += lc.LOCAL_LOOKUP_GRACE_S + 6
    w.tick()
    assert any(isinstance(e, lc.Sweep) for e in w.effects)
    w.send(result("A"))
    w.send(lc.SweepDone())
    w.send(result("B"))
    assert [e.local_ok for e in w.effects if isinstance(e, lc.Lookup)] == [False, True]


@pytest.mark.parametrize("case,expected", [
    ("rows_differ", "incomplete"),
    ("chunked_in_progress", "conflict"),
    ("chunked_in_progress_rows_differ", "conflict"),   # conflict before incomplete
    ("other_totals_stored", "conflict"),
    ("busy", "busy"),
])
def test_result_errors(case, expected):
    w = World(max_requests=1)
    bad = ("incomplete", "rows differ") if "rows_differ" in case else None
    if case.startswith("chunked"):
        w.begin("R", chunks=1, trades=10)
    if case == "other_totals_stored":
        w.send(result("R"))
        w.durable()
        assert code(w.send(result("R", trades=11, nrows=11))) == expected
        return
    if case == "busy":
        w.begin("A")
    assert code(w.send(result("R", bad=bad))) == expected
    assert w.pending == [] or case.startswith("chunked")


# ----- live trades ------------------------------------------------------------------------------------
def test_live_trades_pass_through():
    w = World()
    effs = w.lc.handle(lc.LiveTrades("B1", b"p", b"raw", 3))
    assert effs == [lc.WriteLive("B1", b"raw", 3)]
    replies = w.send(lc.LiveDone("B1", 3, "db"))
    assert replies == [{"type": "stored", "request_id": "B1", "trades": 3, "trades_ref": "B1", "location": "db"}]


# ----- the bulk window towards the writer ------------------------------------------------------------
def test_at_most_bulk_window_big_chunks_at_the_writer():
    n = lc.BULK_WINDOW + 1
    w = World(credit=n + 1)
    w.begin("R", chunks=n + 1, trades=n * 2000 + 5)
    for seq in range(n):
        w.chunk("R", seq, nrows=2000)
    w.chunk("R", n, nrows=5)
    # a small chunk passes the big one waiting
    assert [x.seq for x in w.pending] == list(range(lc.BULK_WINDOW)) + [n]
    w.durable(0)
    assert [x.seq for x in w.pending] == list(range(1, lc.BULK_WINDOW)) + [n, n - 1]


# ----- invariants over random event orders -----------------------------------------------------------
RIDS = ("A", "B", "C")
KINDS = (["begin"] * 2 + ["chunk"] * 5 + ["durable"] * 5 + ["end"] * 2 + ["lookup"] * 2
         + ["abort", "rejected", "tick", "lost", "session"])   # mostly the happy path, every disturbance mixed in
TOTALS = [(3, 30), (3, 31), (1, 10), (2, 4000)]     # (3, 31) never adds up; (2, 4000) has big chunks
TICKS = [0.5, 5.0, 31.0, 61.0, 130.0]
ACTIONS = st.tuples(st.sampled_from(KINDS), st.integers(0, 59), st.integers(0, 59))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ACTIONS, min_size=10, max_size=80), st.booleans(), st.booleans())
def test_invariants_over_random_event_orders(actions, auto_lookup, claims):
    credit, max_requests = 2, 3
    w = World(credit=credit, max_requests=max_requests, timeout=60, dlq_up=True, auto_lookup=auto_lookup,
              claims=claims)
    stored: dict = {}            # rid -> trades of its first `stored`
    balance: dict = {}           # rid -> chunks the producer may still send (a careful producer)
    sent: dict = {}              # rid -> seqs sent and not yet acknowledged
    ever: dict = {}              # rid -> every seq ever sent
    begun: dict = {}             # rid -> (total_chunks, total_trades) of the producer's last begin
    for kind, x, y in actions:
        rid = RIDS[x % len(RIDS)] if kind in ("begin", "chunk", "end", "abort") else None
        if rid is not None and rid in stored and kind != "begin":
            continue             # a producer that saw `stored` is done with R (it may still begin again)
        if kind == "begin":
            chunks, trades = begun[rid] = TOTALS[y % len(TOTALS)]
            replies = w.begin(rid, chunks, trades)
        elif kind == "chunk":
            if balance.get(rid, 0) <= 0 or rid not in begun:
                continue         # the producer sends only with credit
            chunks, trades = begun[rid]
            variant = y % 10     # 0..5: the next seq not sent, 6, 7: any seq, 8: rows off by one, 9: out of range
            fresh = [s for s in range(chunks) if s not in ever.get(rid, ())]
            seq = chunks if variant == 9 else fresh[0] if fresh and variant < 6 else (x // len(RIDS)) % chunks
            nrows = trades // chunks + (variant == 8)
            balance[rid] -= 1
            sent.setdefault(rid, []).append(seq)
            ever.setdefault(rid, set()).add(seq)
            replies = w.chunk(rid, seq, nrows)
        elif kind == "end":
            replies = w.end(rid)
        elif kind == "abort":
            replies = w.abort(rid)
            balance.pop(rid, None)
            sent.pop(rid, None)
        elif kind == "durable":
            if not w.pending:
                continue
            replies = w.durable(x % len(w.pending), "dlq" if y % 3 == 0 else "db")
        elif kind == "rejected":
            if not w.pending:
                continue
            p = w.pending.pop(x % len(w.pending))
            replies = w.send(lc.Rejected(p.meta["request_id"], p.seq, "unavailable", "full", 1.0))
        elif kind == "tick":
            replies = w.tick(TICKS[y % len(TICKS)])
        elif kind == "lookup":
            if not w.lookups:
                continue
            q = w.lookups.pop(x % len(w.lookups))
            replies = w.send(lc.LookupAnswer(q.request_id, w.row(q.request_id)))
        elif kind == "session":  # the lease session was cut; another daemon may have taken one lease meanwhile
            w.mine.clear()
            steal = RIDS[x % len(RIDS)] if y % 2 and claims else None
            if steal is not None:
                w.others.add(steal)
            replies = w.send(lc.LeasesLost())
            w.others.discard(steal)  # that daemon is done with it
            if steal is not None and steal not in w.lc.reqs:
                balance.pop(steal, None)   # its producer was told to go elsewhere
                sent.pop(steal, None)
        else:                    # the writer restarted: what it held is lost
            w.pending.clear()
            sent.clear()         # the producer hears nothing, and resends after its next begin
            replies = w.send(lc.Peers(writer_up=True, dlq_up=True, lost=True))
        for r in replies:
            rr = r["request_id"]
            if r["type"] == "stored":
                assert stored.setdefault(rr, r["trades"]) == r["trades"], "a second stored with other totals"
            elif r["type"] == "credit":
                assert rr not in stored, f"credit after stored for {rr}: {r}"
                if "seq" in r:
                    assert r["seq"] in ever.get(rr, ()), f"credit for a chunk never sent: {r}"
                    if r["seq"] in sent.get(rr, []):
                        sent[rr].remove(r["seq"])
                        balance[rr] = balance.get(rr, 0) + 1
                else:            # a (re)begin: credits granted before are void
                    balance[rr] = r["credit"] - len(sent.get(rr, []))
                    assert r["credit"] <= credit
        # unacknowledged chunks never exceed the window; memory is bounded by the configuration
        for rr, req in w.lc.reqs.items():
            assert len(req.inflight) <= req.window
            assert len(req.inflight) <= len(sent.get(rr, []))
        assert sum(1 for q in w.lc.reqs.values() if q.status == ResultStatus.RECEIVING) <= max_requests
        assert len(w.lc.bulk_waiting) <= sum(len(q.inflight) for q in w.lc.reqs.values())
        assert len(w.lc.recent) <= lc.RECENT_DONE and w.lc.status_sent.ring.nbytes == 8 * lc.STATUS_SENT_SLOTS
        assert set(w.lc.lookups) <= set(RIDS)
        # leases (claims=True): held exactly for what is being assembled here, never beyond max_requests
        receiving = {r for r, q in w.lc.reqs.items() if q.status == ResultStatus.RECEIVING}
        assert w.lc.leases == w.mine
        assert w.lc.leases <= receiving | set(w.lc.lookups) and len(w.lc.leases) <= max_requests
        assert receiving <= w.lc.leases if claims else not w.lc.leases


@pytest.mark.parametrize("drop", ["abort", "abandon"])
def test_dlq_chunks_of_an_earlier_request_never_count_for_a_new_one_with_other_totals(drop):
    w = World(dlq_up=True)
    w.begin("R", chunks=2, trades=20)
    w.chunk("R", 1)
    w.durable(location="dlq")
    if drop == "abort":
        w.abort("R")
    else:
        w.tick(61)
    assert only(w.begin("R", chunks=1, trades=10))["credit"] == 1     # a new request, nothing sent yet
    r = only(w.end("R"))                  # the old request's seq 1 is not this one's seq 0
    assert r["code"] == "incomplete" and r["missing"] == [0]


# ----- invariants for a producer that completes its requests ---------------------------------------
# The producer sends what it has credit for, ends when everything is sent and begins again after an
# error that says so, always with the same totals for a request_id (other totals only once stored:
# see test_dlq_chunks_of_an_earlier_request_never_count_for_a_new_one_with_other_totals); the daemon side makes most
# chunks durable and answers lookups. So most requests get stored, and
# then the producer keeps poking them (begin again, end again, resend any chunk) while the writer,
# the dlq, timers and lookups interleave. Invariants (PROTOCOL.md section 1):
#   - after `stored` for R, no credit for R opens a window again: the only credit R may still earn
#     is `credit: 1` with the seq of a durable chunk (a resent duplicate, or a late copy landing);
#   - every `stored` for R names the same trades, its request's total_trades, and every seq of R is
#     durable (in the database or the dlq) when it is sent;
#   - `stored` or `incomplete` (the answers to `end`) only while no chunk of R is in flight without
#     being durable ("the reply comes once every chunk received so far is durable");
#   - a chunk credit names a seq the producer sent; unacknowledged chunks never exceed the window;
#   - memory is bounded by the configuration (requests receiving, chunks in flight, big chunks at
#     the writer, lookups, remembered results).
P_TOTALS = [(1, 10), (2, 20), (3, 30), (2, 20), (3, 30), (2, 4000), (3, 31)]   # (2, 4000): big chunks; (3, 31) fails
P_KINDS = (["step"] * 6 + ["durable"] * 7 + ["after"] * 3   # durable: a write or a lookup is answered
           + ["dup", "begin", "end", "abort", "rejected", "tick", "lost", "lookup"])
P_ACTIONS = st.tuples(st.sampled_from(P_KINDS), st.integers(0, 59), st.integers(0, 59), st.integers(0, 9))


class Producer:
    """One careful producer per request_id: sends only with credit, resends what it must."""

    def __init__(self):
        self.asked = None        # (chunks, trades) of its last begin
        self.totals = None       # (chunks, trades) of the request it got a window for
        self.balance = 0
        self.sent: set = set()   # seqs sent and not acknowledged
        self.acked: set = set()  # seqs credited
        self.stored = None       # trades of its `stored`
        self.done = None         # (chunks, trades) of the request stored
        self.since_end: set = set()  # seqs sent since its last `end`

    def reset(self):
        self.totals, self.balance, self.sent, self.acked = None, 0, set(), set()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(P_ACTIONS, min_size=30, max_size=100), st.booleans())
def test_invariants_for_a_producer_that_completes_its_requests(actions, auto_lookup):
    credit, max_requests = 2, 2
    w = World(credit=credit, max_requests=max_requests, timeout=60, dlq_up=True, auto_lookup=auto_lookup)
    prod = {rid: Producer() for rid in RIDS}
    ever: dict = {rid: set() for rid in RIDS}      # every seq ever sent for rid
    stored: dict = {}                              # rid -> trades of its first `stored`

    def end(rid):
        prod[rid].since_end = set()
        return w.end(rid)

    def send_chunk(rid, p, seq):
        chunks, trades = p.totals
        p.since_end.add(seq)
        if seq not in p.sent:
            p.balance -= 1
            p.sent.add(seq)
        ever[rid].add(seq)
        return w.chunk(rid, seq, trades // chunks)

    for kind, x, y, z in actions:
        rid = RIDS[x % len(RIDS)]
        p = prod[rid]
        w.lc.at_reply.clear()
        if kind == "after" or (kind == "step" and p.stored is not None):
            done = [r for r in RIDS if prod[r].stored is not None]
            if not done:
                continue
            rid = done[y % len(done)]
            p = prod[rid]
            chunks, trades = p.done
            if x % 3 == 0:
                event("begin again after stored")
                w.begin(rid, chunks, trades)
            elif x % 3 == 1:
                event("end again after stored")
                end(rid)
            else:                # a duplicate needs no credit: it is answered at once
                ever[rid].add(y % chunks)
                w.chunk(rid, y % chunks, trades // chunks)
        elif kind == "step":
            if p.totals is None:
                p.asked = p.asked or P_TOTALS[y % len(P_TOTALS)]
                w.begin(rid, *p.asked)
            else:
                chunks, _ = p.totals
                fresh = [s for s in range(chunks) if s not in p.acked and s not in p.sent]
                if fresh and p.balance > 0:
                    send_chunk(rid, p, fresh[y % len(fresh)])
                else:
                    if rid in w.lc.reqs and w.lc.reqs[rid].inflight and not end(rid):
                        event("end waits for chunks in flight")
                    else:
                        end(rid)
        elif kind == "dup":
            if p.totals is None or p.balance <= 0 or not ever[rid]:
                continue
            send_chunk(rid, p, sorted(ever[rid])[y % len(ever[rid])] % p.totals[0])
        elif kind == "begin":    # again; other totals only once stored (a conflict)
            if p.stored is not None and y % 4 == 0:
                other = [t for t in P_TOTALS if t != p.done]
                w.begin(rid, *other[y % len(other)])
            elif p.asked is not None:
                w.begin(rid, *p.asked)
        elif kind == "end":
            end(rid)
        elif kind == "abort":
            if y % 2:
                w.abort(rid)
        elif kind == "durable" and w.pending and not (w.lookups and y % 3 == 0):
            w.durable(x % len(w.pending), "dlq" if y % 4 == 0 else "db")
        elif kind in ("durable", "lookup"):       # the store answers a lookup
            if not w.lookups:
                continue
            q = w.lookups.pop(x % len(w.lookups))
            w.send(lc.LookupAnswer(q.request_id, w.row(q.request_id)))
        elif kind == "rejected":
            if not w.pending:
                continue
            q = w.pending.pop(x % len(w.pending))
            w.send(lc.Rejected(q.meta["request_id"], q.seq, "unavailable", "full", 1.0))
            qp = prod[q.meta["request_id"]]
            if q.seq in qp.sent:             # it is no longer in flight: the producer resends it
                qp.sent.discard(q.seq)
                qp.balance += 1
        elif kind == "tick":
            w.tick(TICKS[y % len(TICKS)])
        else:                    # the writer restarted: what it held is lost; producers resend it
            w.pending.clear()
            for q in prod.values():
                q.balance += len(q.sent)
                q.sent.clear()
            w.send(lc.Peers(writer_up=True, dlq_up=True, lost=True))
        if z < 5 and w.pending:  # then, most of the time, the oldest write lands or a lookup is answered
            w.durable(0, "dlq" if z == 4 else "db")
        elif z < 7 and w.lookups:
            q = w.lookups.pop(0)
            w.send(lc.LookupAnswer(q.request_id, w.row(q.request_id)))

        for r, inflight, durable in w.lc.at_reply:
            rr, q = r["request_id"], prod[r["request_id"]]
            held = set(w.db[rr]["chunks"]) if rr in w.db else set()
            held |= w.spooled.get(rr, set())
            if r["type"] == "credit" and rr in stored:
                assert "seq" in r and r["credit"] == 1, f"a window for {rr} after its stored: {r}"
                assert r["seq"] in held, f"credit after stored for {rr} for a chunk not durable: {r}"
            if r["type"] == "stored" or r.get("code") == "incomplete":
                assert not inflight - durable, f"{r} while seqs {sorted(inflight - durable)} are in flight"
            if r["type"] == "stored":
                assert stored.setdefault(rr, r["trades"]) == r["trades"], f"a second stored with other totals: {r}"
                m = w.db[rr]["meta"]
                assert r["trades"] == m["total_trades"], r
                assert held >= set(range(m["total_chunks"])), f"{r} with seqs {sorted(held)} durable"
                if q.stored is None:
                    q.stored, q.done = r["trades"], q.totals or q.asked
                    q.reset()
                    event("stored")
            elif r["type"] == "credit" and q.stored is None:
                if "seq" in r:
                    assert r["seq"] in ever[rr], f"credit for a chunk never sent: {r}"
                    q.acked.add(r["seq"])
                    if r["seq"] in q.sent:
                        q.sent.discard(r["seq"])
                        q.balance += 1
                else:            # a (re)begin: credits granted before are void
                    assert r["credit"] <= credit
                    if q.totals != q.asked:
                        q.reset()
                        q.totals = q.asked
                    q.balance = r["credit"] - len(q.sent)
            elif r["type"] == "aborted" or r.get("code") == "unknown_request":
                q.reset()        # begin again
            elif r.get("code") == "incomplete":
                for s in r.get("missing", ()):       # neither durable nor in flight: send again
                    if s in q.since_end:  # sent after the `end` this answers: its own credit comes
                        continue
                    q.acked.discard(s)
                    if s in q.sent:
                        q.sent.discard(s)
                        q.balance += 1
        # unacknowledged chunks never exceed the window; memory is bounded by the configuration
        for rr, req in w.lc.reqs.items():
            assert len(req.inflight) <= req.window <= credit
            if prod[rr].stored is None:
                assert set(req.inflight) <= prod[rr].sent
        for q in prod.values():
            assert len(q.sent) <= credit
        assert sum(1 for q in w.lc.reqs.values() if q.status == ResultStatus.RECEIVING) <= max_requests
        assert sum(len(q.inflight) for q in w.lc.reqs.values()) <= credit * len(RIDS)
        assert len(w.lc.bulk_waiting) <= sum(len(q.inflight) for q in w.lc.reqs.values())
        assert w.lc.bulk_at_writer <= lc.BULK_WINDOW
        assert set(w.lc.lookups) <= set(RIDS) and set(w.lc.reqs) <= set(RIDS) and not w.lc.live
        assert len(w.lc.recent) <= len(RIDS) and w.lc.status_sent.ring.nbytes == 8 * lc.STATUS_SENT_SLOTS


# ----- several daemons on one store: the claim rule (PROTOCOL.md section 7) -------------------------
def test_without_claims_no_lease_is_ever_asked_for():
    w = World()
    w.begin("R", chunks=1, trades=10)
    w.chunk("R", 0)
    w.durable()
    assert not any(isinstance(e, (lc.Claim, lc.Unclaim)) for e in w.effects)


@pytest.mark.parametrize("how", ["begin", "result"])
def test_begin_of_a_request_another_daemon_holds_is_busy_with_retry_after(how):
    w = World(claims=True)
    w.others.add("R")
    ev = lc.Result("R", b"p", meta("R", 1, 10), raw=b"raw", nrows=10) if how == "result" else \
        lc.Begin("R", b"p", meta("R"))
    r = only(w.send(ev))
    assert r["code"] == "busy" and r["retry_after_s"] == lc.CLAIM_RETRY_S
    assert not any(isinstance(e, (lc.Lookup, lc.Record, lc.Write)) for e in w.effects)  # nothing touched
    assert ("R", 0) in w.released if how == "result" else True
    assert w.lc.leases == set() and w.lc.lookups == {}


def test_lease_is_claimed_before_the_lookup_and_the_store_decides_the_resume():
    w = World(claims=True)
    w.db["R"] = {"meta": meta("R", 3, 30), "status": ResultStatus.RECEIVING, "chunks": {0: 10, 1: 10}}
    assert only(w.begin("R"))["credit"] == 3
    kinds = [type(e) for e in w.effects]
    assert kinds.index(lc.Claim) < kinds.index(lc.Lookup)
    assert only(w.chunk("R", 1))["seq"] == 1 and len(w.writes()) == 0   # durable at the previous owner
    assert w.lc.leases == {"R"} == w.mine


def test_lease_freed_by_the_dead_owner_is_taken_over():
    w = World(claims=True)
    w.others.add("R")
    assert code(w.begin("R")) == "busy"
    w.others.discard("R")                       # the owner's session ended
    assert only(w.begin("R"))["type"] == "credit"
    assert w.mine == {"R"}


@pytest.mark.parametrize("finish", ["stored", "aborted", "abandoned", "failed", "stored_at_lookup"])
def test_lease_is_given_back_when_the_request_is_no_longer_assembled_here(finish):
    w = World(claims=True)
    if finish == "stored_at_lookup":
        w.db["R"] = {"meta": meta("R", 1, 10), "status": ResultStatus.COMPLETE, "chunks": {0: 10}}
        assert only(w.begin("R", chunks=1, trades=10))["type"] == "stored"
    else:
        w.begin("R", chunks=1, trades=10)
        assert w.mine == {"R"}
        if finish == "stored":
            w.chunk("R", 0)
            w.durable()
        elif finish == "failed":
            w.chunk("R", 0, nrows=9)
            w.durable()
        elif finish == "aborted":
            w.abort("R")
        else:
            w.tick(61.0)
    assert w.mine == set() and w.lc.leases == set()
    assert sum(isinstance(e, lc.Unclaim) for e in w.effects) == 1


def test_held_lease_is_not_claimed_again_and_leases_stay_within_max_requests():
    w = World(claims=True, max_requests=2)
    w.begin("A")
    w.begin("A", who=b"q")                       # a resend: no second claim
    assert sum(isinstance(e, lc.Claim) for e in w.effects) == 1
    w.begin("B")
    assert code(w.begin("C")) == "busy"          # over max_requests: not even claimed
    assert sum(isinstance(e, lc.Claim) for e in w.effects) == 2 and w.mine == {"A", "B"}


def test_late_claim_answer_for_nobody_is_given_back():
    w = World(claims=True)
    w.mine.add("Z")                              # the store granted it, but nobody waits for it any more
    out = w.send(lc.Claimed("Z", True))
    assert out == [] and any(isinstance(e, lc.Unclaim) and e.request_id == "Z" for e in w.effects)
    assert w.lc.leases == set()


def test_store_not_answering_the_claim_is_busy():
    w = World(claims=True)
    w.lc.handle(lc.Begin("R", b"p", meta("R")))  # the Claim effect, unanswered by the World
    r = only([e.reply for e in w.lc.handle(lc.Claimed("R", False, failed=True)) if isinstance(e, lc.Reply)])
    assert r["code"] == "busy" and r["retry_after_s"] > 0


# ----- the lease session cut while receiving (PostgreSQL restart, pg_terminate_backend) -------------
def test_leases_lost_with_their_session_are_taken_again_and_assembly_goes_on():
    w = World(claims=True)
    w.begin("R")
    w.chunk("R", 0)
    w.mine.clear()                               # the server released them with the session
    assert w.send(lc.LeasesLost()) == []
    assert w.mine == {"R"} == w.lc.leases and not w.lc.reclaiming
    assert only(w.durable())["seq"] == 0         # nothing changed for the producer
    assert w.chunk("R", 1) == [] and len(w.pending) == 1


def test_lease_another_daemon_took_meanwhile_stops_assembly_here_and_sends_the_producer_elsewhere():
    w = World(claims=True, credit=lc.BULK_WINDOW + 2)
    last = lc.BULK_WINDOW + 1                    # chunks 1..BULK_WINDOW at the writer, `last` waiting
    w.begin("R", chunks=last + 1, trades=(last + 1) * 2000)
    w.chunk("R", 0, nrows=2000)
    w.durable()                                  # acknowledged: durable in the shared store
    for seq in range(1, last + 1):
        w.chunk("R", seq, nrows=2000)
    w.mine.clear()
    w.others.add("R")                            # the other daemon's producer began R there meanwhile
    r = only(w.send(lc.LeasesLost()))
    assert r["code"] == "unavailable" and r["retry_after_s"] > 0 and "another pairlane daemon" in r["message"]
    assert "R" not in w.lc.reqs and w.lc.leases == set() and not w.lc.bulk_waiting
    assert ("R", last) in w.released             # never sent to the writer
    at_writer = range(1, last)
    assert w.durable_all() == [] and all(("R", s) in w.released for s in at_writer)   # written, never credited
    assert w.db["R"]["chunks"] == {s: 2000 for s in range(last)} and w.db["R"]["status"] == ResultStatus.RECEIVING
    assert not any(isinstance(e, (lc.SetStatus, lc.Unclaim)) and e.request_id == "R" for e in w.effects)
    assert code(w.chunk("R", last, nrows=2000)) == "unknown_request"
    assert code(w.begin("R", chunks=last + 1, trades=(last + 1) * 2000)) == "busy"


def test_leases_not_retaken_while_the_store_is_down_are_claimed_at_each_tick():
    w = World(claims=True)
    w.begin("R")
    w.mine.clear()
    w.store_down = True
    assert w.send(lc.LeasesLost()) == [] and w.lc.reclaiming == {"R"}
    assert w.tick(0.5) == [] and w.lc.reclaiming == {"R"} and "R" in w.lc.reqs
    w.store_down = False
    w.tick(0.5)
    assert w.lc.reclaiming == set() and w.mine == {"R"} == w.lc.leases
    claims = [e for e in w.effects if isinstance(e, lc.Claim)]
    assert len(claims) == 4                      # the begin, the loss, two ticks
