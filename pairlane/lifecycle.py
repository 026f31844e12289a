"""The request lifecycle of PROTOCOL.md section 1 as an I/O-free state machine.

Owns: the state of requests in progress (totals, durable and in-flight seqs, the producer's identity,
idle timers), the credit window and per-chunk credits, duplicates, resend and resume (durable seqs come
from the store's row and the dlq's inventory), completion without waiting for `end` (decided by
`settle`, the one place pairlane decides it, also used by the store's transaction), `abort`,
abandonment after `assembly_timeout_s`, busy caps, the bulk window towards the writer, and lookups
of requests not in memory. Events go in through `Lifecycle.handle`; effects (frozen dataclasses) come
out, and the assembler actor carries them out. Never touches sockets, actors, the database or the
system clock: time comes from the injected `clock` (monotonic) and `wall` (Unix seconds) callables.
Memory is bounded by configuration: chunks pass through as raw bytes and are never kept after they
were handed to the writer.
"""
from __future__ import annotations

import collections

import numpy as np
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from .codec import error_reply
from .vocab import VISIBLE_STATUSES, ResultStatus, WriteOutcome

RECENT_DONE = 10000          # stored results remembered (answer begin/end/chunk without a lookup)
RECENT_MAX_AGE_S = 600.0     # ... for at most this long: a producer's resends come within seconds; older
                             # ones are answered from the store (same answer), and the cache stops
                             # growing once a steady load has run this long, not after RECENT_DONE results
STATUS_SENT_SLOTS = 4 * RECENT_DONE  # a request sends 1-3 status changes: room for RECENT_DONE requests
LOOKUP_TIMEOUT_S = 10.0      # the store did not answer a lookup: `busy`
LOCAL_LOOKUP_GRACE_S = 10.0  # after start, lookups go through the writer (a predecessor's changes may be queued)
BULK_ROWS = 1024             # chunks with more rows are "big": at most BULK_WINDOW of them at the writer
BULK_WINDOW = 2              # one written, one waiting there: small work passes it (Writer.lane_pick)
INFLIGHT_TIMEOUT_S = 120.0   # no answer from writer/dlq for this long: the chunk is presumed lost
MAX_MISSING = 1000           # `missing` lists at most this many seqs
MAX_HELD = 64                # messages held for one one-message result being written (more: `busy`)
CLAIM_RETRY_S = 2.0          # `busy` because another daemon holds the request's lease: retry after this
INVENTORY_REFRESH_S = 2.0    # while the dlq holds chunks, its inventory is asked for again this often


def settle(total_chunks: int, total_trades: int, durable_chunks: int, durable_rows: int) -> WriteOutcome:
    """Is this result complete? The one rule: every chunk durable and the rows add up to total_trades.
    RECEIVING while chunks are missing, COMPLETE when the rows add up, FAILED when they do not."""
    if durable_chunks < total_chunks:
        return WriteOutcome.RECEIVING
    return WriteOutcome.COMPLETE if durable_rows == total_trades else WriteOutcome.FAILED


def stored_reply(rid: str, trades: int, location: str) -> dict:
    return {"type": "stored", "request_id": rid, "trades": trades, "trades_ref": rid, "location": location}


def producer_meta(meta: dict, origin: str) -> dict:
    """A copy of a begin's or result's results-row fields as they are stored: only a legacy producer
    may mark a result truncated."""
    meta = dict(meta)
    if origin != "legacy":
        meta["truncated"] = 0
    return meta


def credit_reply(rid: str, credit: int, seq: int | None = None) -> dict:
    r = {"type": "credit", "request_id": rid, "credit": credit}
    if seq is not None:
        r["seq"] = seq
    return r


def totals(meta: dict) -> tuple:
    """What must match for a begin to be the same request (else `conflict`)."""
    return (meta["strategy_name"], meta["total_trades"], meta["total_chunks"])


class HashRing:
    """The keys added last (up to `slots`), as 64-bit hashes in a ring allocated and touched at
    start, so its memory never grows. Membership never says no for a key among the last `slots`
    added; it may say yes for another key whose hash collides (odds about slots / 2**64): use it
    only where a wrong yes is safe (here: a lookup goes through the writer, slower, same answer)."""

    def __init__(self, slots: int) -> None:
        self.ring = np.ones(slots, dtype=np.int64)   # written now: the pages are resident from the start
        self.filled = 0
        self.pos = 0

    def add(self, key: str) -> None:
        self.ring[self.pos] = hash(key)
        self.pos = (self.pos + 1) % len(self.ring)
        self.filled = min(self.filled + 1, len(self.ring))

    def __contains__(self, key: str) -> bool:
        return bool(self.filled) and bool((self.ring[:self.filled] == hash(key)).any())

    def __len__(self) -> int:
        return self.filled


# ----- events in ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Begin:
    """meta: the results-row fields (store.meta_from_message). bad: (code, message) of a result whose
    rows failed validation, answered after the conflict checks."""
    request_id: str
    identity: bytes
    meta: dict
    bad: tuple | None = None
    origin: str = "zmq"          # only legacy may set `truncated`
    raw: bytes | None = None
    nrows: int = 0
    kind: ClassVar[str] = "begin"


@dataclass(frozen=True)
class Result(Begin):
    """A one-message result: a begin whose only chunk (seq 0) is `raw`."""
    kind: ClassVar[str] = "result"


@dataclass(frozen=True)
class Chunk:
    request_id: str
    identity: bytes
    seq: int
    raw: bytes | None = None
    nrows: int = 0
    bad: tuple | None = None
    kind: ClassVar[str] = "chunk"


@dataclass(frozen=True)
class End:
    request_id: str
    identity: bytes
    raw: ClassVar[None] = None
    kind: ClassVar[str] = "end"


@dataclass(frozen=True)
class Abort:
    request_id: str
    identity: bytes
    raw: ClassVar[None] = None
    kind: ClassVar[str] = "abort"


@dataclass(frozen=True)
class LiveTrades:
    request_id: str              # the batch_id
    identity: bytes
    raw: bytes
    nrows: int
    kind: ClassVar[str] = "live_trades"


@dataclass(frozen=True)
class Durable:
    """A chunk committed (location db; outcome a WriteOutcome) or spooled (location dlq)."""
    request_id: str
    seq: int
    location: str
    outcome: str
    nrows: int
    answered: bytes | None = None   # the producer identity the writer already told `stored` (Write.answer)


@dataclass(frozen=True)
class Rejected:
    """Neither the database nor the spool took a chunk."""
    request_id: str
    seq: int
    code: str
    message: str
    retry_after_s: float | None = None


@dataclass(frozen=True)
class LiveDone:
    batch_id: str
    nrows: int
    location: str
    code: str | None = None
    message: str | None = None
    retry_after_s: float | None = None


@dataclass(frozen=True)
class Skipped:
    """The writer did not do a checked write (Write.new_only): the store holds the request already
    (row: what `Lookup` would have answered), or it could not tell (failed: row None)."""
    request_id: str
    row: dict | None
    failed: bool = False


@dataclass(frozen=True)
class LookupAnswer:
    """The store's row for request_id (plus `durable` {seq: rows}) or None; failed: nobody could read it."""
    request_id: str
    row: dict | None
    failed: bool = False


@dataclass(frozen=True)
class Inventory:
    """((request_id, seq, nrows, totals), ...) of every chunk the dlq holds; totals: `totals()` of the
    request the chunk was sent under."""
    items: tuple


@dataclass(frozen=True)
class SweepDone:
    """The writer applied (or gave up on) the last Sweep."""


@dataclass(frozen=True)
class Peers:
    """The writer/dlq changed. lost: a restarted writer (or dlq) lost whatever we had sent it."""
    writer_up: bool
    dlq_up: bool
    lost: bool = False
    dlq_changed: bool = False
    writer_changed: bool = False   # a new writer incarnation (or none): it was never armed


@dataclass(frozen=True)
class Claimed:
    """The answer to Claim: ok, this daemon now holds request_id's lease; not ok, another daemon does
    (or, with failed, nobody could tell: the store did not answer)."""
    request_id: str
    ok: bool
    failed: bool = False


@dataclass(frozen=True)
class LeasesLost:
    """The session holding this daemon's leases ended (connection cut, server restarted): the server
    released every lease. Each is claimed again (Claim, answered by Claimed); a request whose lease
    another daemon took meanwhile is no longer assembled here."""


@dataclass(frozen=True)
class Tick:
    """Timers: in-flight timeouts, abandonment, completed requests leaving memory, lookups, sweeps."""


# The direct path. While no request is in progress here and one-message results flow (`_quiet`), the
# gateway may hand a new small one-message result straight to the writer, which checks in the write's
# own transaction that the store does not hold it (as a checked write does), writes it and answers its
# producer: the result skips this lifecycle's hop, and we hear of it afterwards (DirectStored). The
# writer takes such a write only while armed with the gateway's mark on the last producer messages we
# handled: the gateway stamps each batch it forwards here (Forwarded) and sends a result straight only
# while the mark we told it is its own latest. Any event but the few `_keeps_direct` allows disarms
# first; Arm and Disarm go to the writer in order with our other writes, so what we send it after a
# Disarm (a lookup, a Record, a write) comes after every direct write it took; and lookups are not
# answered locally until the writer confirmed it.

@dataclass(frozen=True)
class Forwarded:
    """The gateway's mark (its incarnation, and how many batches it forwarded here) on the batch of
    producer messages whose events follow."""
    mark: tuple


@dataclass(frozen=True)
class Flush:
    """The actor is about to send the effects of what it received: the moment to arm, if quiet."""


@dataclass(frozen=True)
class ArmAck:
    """The writer applied the Arm or Disarm numbered epoch."""
    epoch: int


@dataclass(frozen=True)
class DirectStored:
    """The writer wrote a new one-message result the gateway handed it straight (complete, committed)
    and told its producer `stored`. received_at: wall time at the gateway."""
    request_id: str
    meta: dict
    nrows: int
    identity: bytes
    received_at: float


# ----- effects out --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    """Send `reply` to the producer `identity` (the gateway, or the actor that produced it)."""
    identity: bytes
    reply: dict


@dataclass(frozen=True)
class Stored:
    """request_id is stored for good: `reply` is what every later `end` for it gets (the gateway
    may answer such an `end` itself, without a round trip through the assembler)."""
    request_id: str
    reply: dict


@dataclass(frozen=True)
class Release:
    """The gateway stops counting (request_id, seq) against its in-flight budget (seq -1: live batch)."""
    request_id: str
    seq: int


@dataclass(frozen=True)
class Write:
    """Forward a chunk to the writer. record: make the request visible first, as Record does, in
    the chunk's own transaction (a one-message result: one commit and one message, not two)."""
    meta: dict
    seq: int
    raw: bytes | None
    nrows: int
    record: bool = False
    answer: tuple | None = None    # (identity, reply): a one-message result's `stored` reply, for the
                                   # writer to send itself right after the commit that completes it
    new_only: bool = False         # a checked write: done only if the store does not hold the request
                                   # (the lookup happens in the write's transaction), else Skipped


@dataclass(frozen=True)
class WriteLive:
    batch_id: str
    raw: bytes
    nrows: int


@dataclass(frozen=True)
class Record:
    """Make the request visible as `receiving` (a failed or abandoned one starts over)."""
    meta: dict


@dataclass(frozen=True)
class SetStatus:
    request_id: str
    status: ResultStatus
    error: str | None = None


@dataclass(frozen=True)
class Lookup:
    """Ask the store for request_id's row; answer with LookupAnswer. local_ok: a read-only connection
    may answer (no status change of ours for it can still be queued at the writer); else the writer
    must, in order."""
    request_id: str
    local_ok: bool


@dataclass(frozen=True)
class Sweep:
    """Abandon `receiving` results idle since older_than (wall) and not in active."""
    older_than: float
    active: frozenset


@dataclass(frozen=True)
class Claim:
    """Take request_id's lease (several daemons on one store, PROTOCOL.md section 7); answer Claimed."""
    request_id: str


@dataclass(frozen=True)
class Unclaim:
    """Give request_id's lease back: this daemon no longer assembles it."""
    request_id: str


@dataclass(frozen=True)
class AskInventory:
    """Ask the dlq which chunks it holds."""


@dataclass(frozen=True)
class Arm:
    """For the writer: take results straight from the gateway while its mark is `mark`; mark None:
    take none (Disarm). Answered by ArmAck(epoch)."""
    mark: tuple | None
    epoch: int


@dataclass(frozen=True)
class DirectOpen:
    """For the gateway: results may go straight to the writer while its last mark is `mark`; None: not."""
    mark: tuple | None


@dataclass(frozen=True)
class Metric:
    op: str                      # inc | set | observe
    name: str
    value: float = 1.0
    labels: tuple = ()


@dataclass(frozen=True)
class Log:
    level: str
    event: str
    fields: tuple = ()


# ----- state ---------------------------------------------------------------------------------------
@dataclass
class Req:
    meta: dict
    identity: bytes
    window: int
    began_at: float                                    # wall
    last_activity: float                               # clock
    kind: str = "chunked"                              # chunked | result
    durable: dict = field(default_factory=dict)        # seq -> (rows, location)
    inflight: dict = field(default_factory=dict)       # seq -> (rows, sent_at)
    status: ResultStatus = ResultStatus.RECEIVING      # RECEIVING | COMPLETE | FAILED
    end_waiting: bytes | None = None
    # the producer's messages about a one-message result whose write is in flight, handled once it is
    # answered: the writer tells the producer `stored` itself, so the producer's next message (an abort,
    # a begin, the result again) can reach us before the writer's answer does
    held: list = field(default_factory=list)
    answered: bytes | None = None                      # identity the writer told `stored` itself
    # the result whose checked write (Write.new_only) is in flight: the request may still turn out to
    # be in the store, and then this Req was never real (`_skipped`)
    checking: Any = None

    @property
    def rid(self) -> str:
        return self.meta["request_id"]

    def location(self) -> str:
        return "dlq" if any(loc == "dlq" for _, loc in self.durable.values()) else "db"

    def missing(self, limit: int = MAX_MISSING) -> list[int]:
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


class Requests(dict):
    """request_id -> Req, indexed by status. The busy check needs the count of those still
    `receiving` on every producer message, and the heartbeat tick acts only on those and on the
    finished ones idle long enough to forget; finished requests stay here up to 30 s, so scanning
    them all cost O(requests): 0.1 ms a message at 1,000 requests, and 19 ms a tick at 24,000
    (30 s of small results at 800/s). Change a request's status only with `set_status`."""

    def __init__(self, clock: Callable[[], float]):
        super().__init__()
        self.clock = clock
        self.receiving_reqs: dict = {}   # rid -> Req, those `receiving`
        # rid -> when it was (last) queued, oldest first: the finished ones, for `expired_finished`
        self.finished: collections.OrderedDict = collections.OrderedDict()

    @property
    def receiving(self) -> int:
        return len(self.receiving_reqs)

    def _index(self, rid: str, req: Req) -> None:
        if req.status == ResultStatus.RECEIVING:
            self.finished.pop(rid, None)
            self.receiving_reqs[rid] = req
        else:
            self.receiving_reqs.pop(rid, None)
            if rid not in self.finished:
                self.finished[rid] = self.clock()

    def __setitem__(self, rid: str, req: Req) -> None:
        self.pop(rid, None)
        super().__setitem__(rid, req)
        self._index(rid, req)

    def __delitem__(self, rid: str) -> None:
        self.pop(rid)

    def pop(self, rid: str, *default):
        req = super().pop(rid, *default)
        if isinstance(req, Req):
            self.receiving_reqs.pop(rid, None)
            self.finished.pop(rid, None)
        return req

    def clear(self) -> None:
        super().clear()
        self.receiving_reqs.clear()
        self.finished.clear()

    def set_status(self, req: Req, status: ResultStatus) -> None:
        req.status = status
        if self.get(req.rid) is req:
            self._index(req.rid, req)

    def expired_finished(self, idle_s: float) -> list[str]:
        """Finished requests idle over `idle_s` with nothing in flight, oldest first, visiting only
        those queued over `idle_s` ago. One busy since it was queued goes to the back, stamped now:
        it is forgotten up to `idle_s` later than its idleness alone would say, never sooner."""
        now = self.clock()
        out, busy = [], []
        for rid, queued_at in self.finished.items():
            if now - queued_at <= idle_s:
                break
            req = self[rid]
            (out if now - req.last_activity > idle_s and not req.inflight else busy).append(rid)
        for rid in busy:
            self.finished.move_to_end(rid)
            self.finished[rid] = now
        return out


def _release_key(ev) -> tuple | None:
    """The gateway counts a chunk or result frame in flight until it is released."""
    if ev.raw is None:
        return None
    return (ev.request_id, getattr(ev, "seq", 0))


class Lifecycle:
    def __init__(self, credit: int, max_requests: int, assembly_timeout_s: float, *,
                 clock: Callable[[], float], wall: Callable[[], float],
                 writer_up: bool = True, dlq_up: bool = False, claims: bool = False,
                 checked_writes: bool = False):
        self.credit = credit
        self.max_requests = max_requests
        self.timeout_s = assembly_timeout_s
        self.clock = clock
        self.wall = wall
        self.writer_up = writer_up
        self.dlq_up = dlq_up
        self.claims = claims          # several daemons may share the store: a request needs its lease
        # the writer can look a request up in the transaction that writes it (SQLite): a new small
        # one-message result is written at once instead of after a lookup (`_may_check`)
        self.checked_writes = checked_writes
        self.claiming: set = set()    # rids whose Claim is unanswered (their events wait in `lookups`)
        self.leases: set = set()      # rids whose lease this daemon holds
        self.reclaiming: set = set()  # leases lost with their session, to be re-taken (claimed at each Tick)
        self.reqs = Requests(clock)
        self.lookups: dict[str, tuple[float, list]] = {}    # rid -> (asked_at, queued events)
        self.recent: collections.OrderedDict = collections.OrderedDict()  # rid -> (totals, trades, location)
        self.live: dict[str, bytes] = {}                     # batch_id -> identity waiting
        self.inventory: dict[str, dict] = {}                 # rid -> {seq: (rows, totals)} held by the dlq
        self.status_sent = HashRing(STATUS_SENT_SLOTS)        # rids with status changes sent
        self.sweep_pending = False                           # a Sweep the writer has not confirmed yet
        self.bulk_waiting: collections.deque = collections.deque()  # big chunks not yet at the writer
        self.bulk_at_writer = 0
        self.stats: collections.Counter = collections.Counter()
        self.started = clock()
        self.last_sweep = self.started
        # the direct path: None (the writer takes no direct write, confirmed), or (state, mark) with
        # state arming (Arm sent), open (the writer confirmed, the gateway was told) or closing
        # (Disarm sent, unconfirmed: lookups go through the writer)
        self.direct: tuple | None = None
        self.direct_epoch = 0          # numbers Arm/Disarm; the ArmAck of the latest one counts
        self.inventory_asked = float("-inf")   # clock of the last AskInventory
        self.gateway_mark: tuple | None = None
        # the last producer message was a one-message result: only then is arming worth it. After
        # anything else the next message is likely another begin, chunk or end, which would only
        # disarm again, and a begin's lookup could not be read locally meanwhile
        self.results_flowing = False
        self._out: list = []

    def handle(self, ev) -> list:
        """Feed one event; returns the effects to carry out, in order."""
        self._out = []
        if self.direct is not None and self.direct[0] != "closing" and not self._keeps_direct(ev):
            self._disarm()
        self._HANDLERS[type(ev)](self, ev)
        if self.leases:
            self._unclaim_finished()
        out, self._out = self._out, []
        return out

    def inspect(self) -> dict:
        return {"requests_in_flight": len(self.reqs),
                "receiving": self._receiving(),
                "chunks_in_flight": sum(len(r.inflight) for r in self.reqs.values()),
                "rows_in_flight": sum(n for r in self.reqs.values() for n, _ in r.inflight.values()),
                "lookups_pending": len(self.lookups), "live_batches_pending": len(self.live),
                "dlq_inventory_chunks": sum(len(v) for v in self.inventory.values()),
                "big_chunks_at_writer": self.bulk_at_writer, "big_chunks_waiting": len(self.bulk_waiting),
                "sweep_pending": self.sweep_pending,
                "recent_results": len(self.recent), "leases": len(self.leases),
                "direct": self.direct[0] if self.direct else "closed",
                "leases_reclaiming": len(self.reclaiming), **dict(self.stats)}

    # ----- effect helpers -------------------------------------------------------------------------
    def _emit(self, eff) -> None:
        self._out.append(eff)

    def _reply(self, identity: bytes, reply: dict) -> None:
        self._emit(Reply(identity, reply))

    def _err(self, identity: bytes, code: str, message: str, rid: str | None, retry: float | None = None) -> None:
        self._emit(Reply(identity, error_reply(code, message, rid, retry)))

    def _release(self, rid: str, seq: int) -> None:
        self._emit(Release(rid, seq))

    def _release_ev(self, ev) -> None:
        key = _release_key(ev)
        if key is not None:
            self._emit(Release(*key))

    def _refuse(self, events: list, code: str, message: str, rid: str, retry: float) -> None:
        """Answer each of events (producer messages held or queued) with an error, and release it."""
        for ev in events:
            self._release_ev(ev)
            self._err(ev.identity, code, message, rid, retry)

    def _metric(self, op: str, name: str, value: float = 1.0, **labels) -> None:
        self._emit(Metric(op, name, value, tuple(labels.items())))

    def _to_writer(self, eff) -> None:
        """A status change for the writer; lookups of that request must go through the writer now."""
        self._mark_status_sent(eff.meta["request_id"] if isinstance(eff, Record) else eff.request_id)
        self._emit(eff)

    def _mark_status_sent(self, rid: str) -> None:
        self.status_sent.add(rid)

    def _receiving(self) -> int:
        return self.reqs.receiving

    # ----- producer messages ---------------------------------------------------------------------
    def _inbound(self, ev) -> None:
        self.stats[f"in_{ev.kind}"] += 1
        self.results_flowing = isinstance(ev, Result)
        self._dispatch(ev)

    def _dispatch(self, ev) -> None:
        if ev.request_id in self.lookups:
            self.lookups[ev.request_id][1].append(ev)
            return
        req = self.reqs.get(ev.request_id)
        if req is not None and req.kind == "result" and req.inflight:
            # the result itself again too: its producer may have been told `stored` by the writer
            # already and sent it again, and it must hear `stored` for that message as well
            if len(req.held) >= MAX_HELD:
                self._release_ev(ev)
                return self._err(ev.identity, "busy", f"request {ev.request_id} is being written; retry",
                                 ev.request_id, 0.5)
            req.held.append(ev)   # answered once the write is (`_replay_held`)
            return
        if isinstance(ev, Result):
            self._result(ev)
        elif isinstance(ev, Begin):
            self._begin(ev)
        elif isinstance(ev, Chunk):
            self._chunk(ev)
        elif isinstance(ev, End):
            self._end(ev)
        else:
            self._abort(ev)

    def _live_trades(self, ev: LiveTrades) -> None:
        self.stats["in_live_trades"] += 1
        self.results_flowing = False
        if not self.writer_up:
            self._release(ev.request_id, -1)
            return self._err(ev.identity, "unavailable", "pairlane's writer is restarting", ev.request_id, 1.0)
        self.live[ev.request_id] = ev.identity
        self._emit(WriteLive(ev.request_id, ev.raw, ev.nrows))

    def _busy(self, ev) -> bool:
        active = self._receiving() + len(self.lookups)
        if active >= self.max_requests:
            self._release_ev(ev)
            self._err(ev.identity, "busy", f"{active} requests in progress, at gateway.max_requests "
                      f"= {self.max_requests}", ev.request_id, 1.0)
            return True
        return False

    def _start_lookup(self, ev) -> None:
        rid = ev.request_id
        local_ok = self._local_ok(rid)
        if not local_ok and not self.writer_up:
            self._release_ev(ev)
            return self._err(ev.identity, "unavailable", "pairlane's writer is restarting", rid, 1.0)
        self.lookups[rid] = (self.clock(), [ev])
        if self.claims and isinstance(ev, Begin) and rid not in self.leases:
            # the lookup must come after the lease: the store then shows what a previous owner made durable
            self.claiming.add(rid)
            return self._emit(Claim(rid))
        self._lookup(rid, local_ok)

    def _local_ok(self, rid: str) -> bool:
        """May a lookup of rid read the store itself, not through the writer? Not while a status change
        of rid, a sweep or a predecessor's writes may wait at the writer, nor while the writer may take
        a direct write (an Arm sent, no Disarm confirmed): the read could miss what it writes."""
        return (rid not in self.status_sent and not self.sweep_pending and self.direct is None
                and self.clock() - self.started >= LOCAL_LOOKUP_GRACE_S)

    def _lookup(self, rid: str, local_ok: bool) -> None:
        self.stats["lookups_local" if local_ok else "lookups_via_writer"] += 1
        self._emit(Lookup(rid, local_ok))

    def _claimed(self, ev: Claimed) -> None:
        """The claim rule: only the lease holder assembles a request; everyone else is told `busy`."""
        rid = ev.request_id
        if rid in self.reclaiming:
            return self._reclaimed(ev)
        if rid not in self.claiming:   # nobody waits (timed out, writer lost): give it back
            if ev.ok:
                self.leases.add(rid)
            return
        self.claiming.discard(rid)
        if ev.ok:
            self.leases.add(rid)
            self.stats["claims_won"] += 1
            local_ok = self._local_ok(rid)
            if local_ok or self.writer_up:
                return self._lookup(rid, local_ok)
        _, queued = self.lookups.pop(rid, (None, []))
        if ev.ok:
            text, retry = "pairlane's writer is restarting", 1.0
            code = "unavailable"
        elif ev.failed:
            code, text, retry = "busy", "the store did not say whether another daemon owns this request", 1.0
        else:
            self.stats["claims_lost"] += 1
            code, retry = "busy", CLAIM_RETRY_S
            text = f"request {rid} is being assembled by another pairlane daemon; retry"
        self._refuse(queued, code, text, rid, retry)

    def _leases_lost(self, ev: LeasesLost) -> None:
        """Every lease went with its session: claim each again before anything else of ours needs it."""
        if not self.leases:
            return
        self.stats["lease_sessions_lost"] += 1
        self._emit(Log("WARNING", "leases_lost", (("requests", len(self.leases)),)))
        self.reclaiming |= self.leases
        for rid in sorted(self.leases):
            self._emit(Claim(rid))

    def _reclaimed(self, ev: Claimed) -> None:
        """A lease lost with its session, claimed again. Taken: nothing changes. Another daemon holds it
        now: stop assembling the request here (what was acknowledged is durable in the shared store; the
        chunks at the writer are written once, like any duplicate) and tell its producer `unavailable`,
        so it moves to the daemon that owns it and resumes there. Unknown (the store did not answer):
        claimed again at the next Tick."""
        rid = ev.request_id
        if ev.failed:
            return
        self.reclaiming.discard(rid)
        if ev.ok:
            self.stats["leases_retaken"] += 1
            return
        self.stats["leases_taken_by_other"] += 1
        self.leases.discard(rid)
        text = (f"request {rid}'s lease was lost with this daemon's database session and another pairlane "
                "daemon holds it now: send begin to that daemon")
        req = self.reqs.pop(rid, None)
        if req is not None:
            if any(w.meta["request_id"] == rid for w in self.bulk_waiting):  # never sent: nothing to write
                for w in self.bulk_waiting:
                    if w.meta["request_id"] == rid:
                        self._release(rid, w.seq)
                self.bulk_waiting = collections.deque(w for w in self.bulk_waiting if w.meta["request_id"] != rid)
            # chunks at the writer are released (and counted) when their answer comes: never credited
            self._err(req.identity, "unavailable", text, rid, CLAIM_RETRY_S)
        _, queued = self.lookups.pop(rid, (None, []))
        # no answer of the writer's reaches them now
        self._refuse((req.held if req is not None else []) + queued, "unavailable", text, rid, CLAIM_RETRY_S)
        self._emit(Log("WARNING", "lease_taken_by_other", (("request_id", rid),
                                                             ("durable", len(req.durable) if req else 0))))

    def _unclaim_finished(self) -> None:
        """Give back every lease whose request is no longer being assembled here (stored, failed,
        aborted, abandoned, or its begin answered otherwise)."""
        for rid in list(self.leases):
            req = self.reqs.get(rid)
            if rid in self.lookups or (req is not None and req.status == ResultStatus.RECEIVING):
                continue
            self.leases.discard(rid)
            self.reclaiming.discard(rid)
            self._emit(Unclaim(rid))

    def _conflict(self, ev) -> None:
        self._release_ev(ev)
        self.stats["conflicts"] += 1
        self._err(ev.identity, "conflict", f"request {ev.request_id} exists with another strategy_name or "
                  "totals; use a new request_id", ev.request_id)

    def _may_check(self, ev) -> bool:
        """Whether ev may skip the lookup: a valid small one-message result, nothing of it in the dlq,
        written by a writer that checks in the write's transaction that the store does not hold it
        (ordered after every status change we sent, like a lookup through the writer)."""
        return (self.checked_writes and isinstance(ev, Result) and ev.bad is None and ev.raw is not None
                and ev.nrows <= BULK_ROWS and self.writer_up and not self.claims
                and ev.request_id not in self.inventory)

    def _begin(self, ev: Begin, row: dict | None = None, looked_up: bool = False,
               checking: bool = False) -> None:
        rid = ev.request_id
        meta = producer_meta(ev.meta, ev.origin)
        req = self.reqs.get(rid)
        if req is not None:
            if totals(req.meta) != totals(meta):
                return self._conflict(ev)
            if ev.bad is not None:
                return self._err(ev.identity, ev.bad[0], ev.bad[1], rid)
            req.identity = ev.identity
            req.last_activity = self.clock()
            if req.status == ResultStatus.COMPLETE:
                self._release_ev(ev)   # a `result` frame again: the gateway counted it in flight
                return self._reply(ev.identity, stored_reply(rid, meta["total_trades"], req.location()))
            if req.status == ResultStatus.FAILED:
                self.reqs.pop(rid)  # start over
                return self._begin(ev)
            return self._reply(ev.identity, credit_reply(rid, req.window))  # resume: full window
        if rid in self.recent:
            key, trades, loc, _ = self.recent[rid]
            if key != totals(meta):
                return self._conflict(ev)
            if ev.bad is not None:
                return self._err(ev.identity, ev.bad[0], ev.bad[1], rid)
            self._release_ev(ev)
            return self._reply(ev.identity, stored_reply(rid, trades, loc))
        if not looked_up:
            if ev.bad is None and self._busy(ev):
                return
            if self._may_check(ev):
                return self._begin(ev, None, looked_up=True, checking=True)
            return self._start_lookup(ev)
        visible = row is not None and row["status"] in VISIBLE_STATUSES
        if visible and totals(row) != totals(meta):
            return self._conflict(ev)
        if ev.bad is not None:
            return self._err(ev.identity, ev.bad[0], ev.bad[1], rid)
        if visible and row["status"] == ResultStatus.COMPLETE:
            self._remember(rid, meta, "db")
            self._release_ev(ev)
            return self._reply(ev.identity, stored_reply(rid, row["total_trades"], "db"))
        now = self.clock()
        req = Req(meta=meta, identity=ev.identity, window=min(self.credit, meta["total_chunks"]),
                  began_at=self.wall(), last_activity=now,
                  kind="result" if isinstance(ev, Result) else "chunked")
        if visible:  # receiving or spooled: resume with what the database holds
            for seq, rows in row["durable"].items():
                req.durable[seq] = (rows, "db")
        for seq, (rows, held_for) in self.inventory.get(rid, {}).items():
            if held_for == totals(meta):  # chunks of an earlier request under this id are not this one's
                req.durable.setdefault(seq, (rows, "dlq"))
        self.reqs[rid] = req
        self.stats["begun"] += 1
        if req.kind == "result":
            # a small one-message result is recorded in its chunk's transaction (the writer takes our
            # messages in order, so nothing can see it between the two); a big one waits for the bulk
            # window, so it is recorded at once, as a chunked request is
            record = (not visible and ev.nrows <= BULK_ROWS and ev.bad is None and self.writer_up
                      and 0 not in req.durable)
            if not visible and not record:
                self._to_writer(Record(meta))
            if checking:
                req.checking = ev
                self.stats["checked_writes"] += 1
            return self._chunk(Chunk(rid, ev.identity, 0, ev.raw, ev.nrows, ev.bad), record, checking)
        if not visible:
            self._to_writer(Record(meta))  # visible as `receiving` at once (or starts over)
        self._reply(ev.identity, credit_reply(rid, req.window))
        self._settle(req)

    def _result(self, ev: Result, row: dict | None = None, looked_up: bool = False) -> None:
        rid = ev.request_id
        req = self.reqs.get(rid)
        if req is not None and req.status != ResultStatus.COMPLETE:
            same = req.kind == "result" and totals(req.meta) == totals(ev.meta)
            if same and ev.bad is not None:
                return self._err(ev.identity, ev.bad[0], ev.bad[1], rid)
            if same and req.status == ResultStatus.RECEIVING:
                # the same one-message result again, its write not in flight (the writer could not
                # take it; one in flight holds it in `_dispatch`): its only chunk, written now
                return self._chunk(Chunk(rid, ev.identity, 0, ev.raw, ev.nrows, None))
            self._release_ev(ev)
            return self._err(ev.identity, "conflict", f"request {rid} is in progress (as a chunked request "
                             "or with another strategy_name or totals)", rid)
        self._begin(ev, row, looked_up)

    def _chunk(self, ev: Chunk, record: bool = False, new_only: bool = False) -> None:
        rid, seq = ev.request_id, ev.seq
        req = self.reqs.get(rid)
        if req is None:
            self._release(rid, seq)
            if rid in self.recent:
                return self._reply(ev.identity, credit_reply(rid, 1, seq))
            return self._err(ev.identity, "unknown_request", f"request {rid} is not in progress "
                             "(never begun, finished, abandoned or lost in a restart): send begin again", rid)
        req.last_activity = self.clock()
        req.identity = ev.identity
        if ev.bad is not None:
            self._release(rid, seq)
            return self._err(ev.identity, ev.bad[0], ev.bad[1], rid)
        if seq >= req.meta["total_chunks"]:
            self._release(rid, seq)
            return self._err(ev.identity, "bad_chunk",
                             f"seq {seq} out of range 0..{req.meta['total_chunks'] - 1}", rid)
        if seq in req.durable:
            self._release(rid, seq)
            if req.kind == "result":
                return self._reply(ev.identity, stored_reply(rid, req.meta["total_trades"], req.location()))
            return self._reply(ev.identity, credit_reply(rid, 1, seq))
        if seq in req.inflight:
            return  # dropped silently: its credit comes when it is durable (the gateway still counts it)
        if not self.writer_up:
            self._release(rid, seq)
            return self._err(ev.identity, "unavailable", "pairlane's writer is restarting", rid, 1.0)
        req.inflight[seq] = (ev.nrows, self.clock())
        if record:
            self._mark_status_sent(rid)
        answer = None
        if req.kind == "result":   # the only reply a commit that completes it can lead to (see _settle)
            answer = (ev.identity, stored_reply(rid, req.meta["total_trades"], "db"))
        work = Write(req.meta, seq, ev.raw, ev.nrows, record, answer, new_only)
        if ev.nrows > BULK_ROWS:
            # a small result's chunk must never wait at the writer for more than the big one being
            # written: the writer lets small work pass the one waiting (BULK_WINDOW - 1 of them)
            self.bulk_waiting.append(work)
            self._feed_bulk()
        else:
            self._emit(work)

    def _feed_bulk(self) -> None:
        while self.bulk_waiting and self.bulk_at_writer < BULK_WINDOW and self.writer_up:
            work = self.bulk_waiting.popleft()
            req = self.reqs.get(work.meta["request_id"])
            if req is None or work.seq not in req.inflight:
                self._release(work.meta["request_id"], work.seq)  # aborted or abandoned meanwhile
                continue
            self.bulk_at_writer += 1
            self._emit(work)

    def _bulk_done(self, sent, nrows=None) -> None:
        """A chunk came back from the writer: if it was a big one, let the next big one go."""
        rows = sent[0] if sent is not None else nrows
        if rows is not None and rows > BULK_ROWS and self.bulk_at_writer > 0:
            self.bulk_at_writer -= 1
            self._feed_bulk()

    def _end(self, ev: End, row: dict | None = None, looked_up: bool = False) -> None:
        rid = ev.request_id
        req = self.reqs.get(rid)
        if req is None:
            if rid in self.recent:
                _, trades, loc, _ = self.recent[rid]
                return self._reply(ev.identity, stored_reply(rid, trades, loc))
            if not looked_up:
                return self._start_lookup(ev)
            if row is not None and row["status"] == ResultStatus.COMPLETE:
                return self._reply(ev.identity, stored_reply(rid, row["total_trades"], "db"))
            return self._err(ev.identity, "unknown_request", f"request {rid} is not in progress: send begin", rid)
        req.last_activity = self.clock()
        req.identity = ev.identity
        if req.inflight:
            req.end_waiting = ev.identity  # answered once every chunk received so far is durable
            return
        self._answer_end(req, ev.identity)

    def _answer_end(self, req: Req, identity: bytes) -> None:
        if req.status == ResultStatus.COMPLETE:
            return self._reply(identity, stored_reply(req.rid, req.meta["total_trades"], req.location()))
        if req.status == ResultStatus.FAILED:
            self.reqs.pop(req.rid, None)
            r = error_reply("incomplete", "every chunk arrived but the rows do not add up to "
                            "total_trades; the result failed and its rows were removed: begin again", req.rid)
            r["missing"] = list(range(min(req.meta["total_chunks"], MAX_MISSING)))
            return self._reply(identity, r)
        r = error_reply("incomplete", f"{req.missing_count()} chunk(s) never arrived: send them, "
                        f"then end again (`missing` lists at most {MAX_MISSING})", req.rid)
        r["missing"] = req.missing(MAX_MISSING)
        self._reply(identity, r)

    def _abort(self, ev: Abort, row: dict | None = None, looked_up: bool = False) -> None:
        rid = ev.request_id
        req = self.reqs.get(rid)
        if ((req is not None and req.status == ResultStatus.COMPLETE) or rid in self.recent
                or (row is not None and ResultStatus(row["status"]).stored)):
            return self._err(ev.identity, "conflict", f"request {rid} is already stored; abort drops only "
                             "unfinished requests", rid)
        if req is None and not looked_up and self.writer_up:
            # not in memory (e.g. after a restart): it may be stored; ask the store before answering
            return self._start_lookup(ev)
        if req is not None:
            self.reqs.pop(rid)
            for seq in req.inflight:
                self._release(rid, seq)
            if req.end_waiting is not None:   # an `end` waiting for chunks in flight: no longer in progress
                self._err(req.end_waiting, "unknown_request", f"request {rid} was aborted: send begin again", rid)
            if any(w.meta["request_id"] == rid for w in self.bulk_waiting):  # free their bytes now
                self.bulk_waiting = collections.deque(w for w in self.bulk_waiting if w.meta["request_id"] != rid)
        if self.writer_up:
            self._to_writer(SetStatus(rid, ResultStatus.ABANDONED, "aborted by producer"))
        self._metric("inc", "pairlane_results_total", outcome="aborted")
        self._reply(ev.identity, {"type": "aborted", "request_id": rid})

    # ----- answers from the writer, the dlq and the store ------------------------------------------
    def _durable(self, ev: Durable) -> None:
        if ev.answered is None:   # else the writer's answer released it at the gateway
            self._release(ev.request_id, ev.seq)
        req = self.reqs.get(ev.request_id)
        if ev.location == "dlq":  # whose chunk it is, unknown once the request left memory: never counted
            self.inventory.setdefault(ev.request_id, {})[ev.seq] = (ev.nrows, totals(req.meta) if req else None)
        sent = req.inflight.pop(ev.seq, None) if req is not None else None
        self._bulk_done(sent, ev.nrows)
        if req is None:
            return
        req.checking = None   # written: the request was new
        if sent is not None:
            self._metric("observe", "pairlane_chunk_assembly_seconds", self.clock() - sent[1])
        if ev.outcome != WriteOutcome.DISCARDED:
            self._durable_chunk(req, ev)
        self._replay_held(req)

    def _durable_chunk(self, req: Req, ev: Durable) -> None:
        req.durable[ev.seq] = (ev.nrows, ev.location)
        if ev.answered is not None:
            req.answered = ev.answered
        if ev.outcome == WriteOutcome.FAILED:
            self.reqs.set_status(req, ResultStatus.FAILED)
        if req.kind == "chunked":
            self._reply(req.identity, credit_reply(req.rid, 1, ev.seq))
        self._settle(req)

    def _settle(self, req: Req) -> None:
        """All chunks durable? Then the result is complete (or failed) now, `end` or not."""
        total = req.meta["total_chunks"]
        all_durable = len(req.durable) == total
        if all_durable and req.status == ResultStatus.RECEIVING:
            rows = sum(r for r, _ in req.durable.values())
            if settle(total, req.meta["total_trades"], len(req.durable), rows) == WriteOutcome.FAILED:
                self.reqs.set_status(req, ResultStatus.FAILED)
                self._to_writer(SetStatus(req.rid, ResultStatus.FAILED,
                                          f"rows add up to {rows}, total_trades is {req.meta['total_trades']}"))
            else:
                self.reqs.set_status(req, ResultStatus.COMPLETE)
                loc = req.location()
                if loc == "dlq":
                    self._to_writer(SetStatus(req.rid, ResultStatus.SPOOLED))
                self._remember(req.rid, req.meta, loc, tell_gateway=req.kind == "chunked")
                self._stored(req.rid, req.meta["total_trades"], loc, req.began_at)
        if req.status == ResultStatus.FAILED and all_durable:
            self._metric("inc", "pairlane_results_total", outcome="failed")
            self.stats["failed"] += 1
        if req.kind == "result" and all_durable:
            if req.status == ResultStatus.COMPLETE:
                if req.answered != req.identity:   # else the writer told this producer already
                    self._reply(req.identity, stored_reply(req.rid, req.meta["total_trades"], req.location()))
            else:
                self._err(req.identity, "incomplete", "the result's rows do not add up to total_trades", req.rid)
                self.reqs.pop(req.rid, None)
            return
        if req.end_waiting is not None and not req.inflight:
            identity, req.end_waiting = req.end_waiting, None
            self._answer_end(req, identity)

    def _stored(self, rid: str, trades: int, location: str, began_at: float) -> None:
        """A result was stored for good just now: its metrics and its log line."""
        self._metric("inc", "pairlane_results_total", outcome="stored_" + location)
        now = self.wall()
        self._metric("observe", "pairlane_result_receive_seconds", now - began_at)
        self._metric("set", "pairlane_last_result_timestamp_seconds", now)
        self._emit(Log("INFO", "result_stored", (
            ("request_id", rid), ("trades", trades), ("seconds", round(now - began_at, 3)), ("location", location))))
        self.stats["completed"] += 1

    def _remember(self, rid: str, meta: dict, location: str, tell_gateway: bool = True) -> None:
        """tell_gateway: emit Stored, for the gateway to answer the next `end` itself (a chunked
        result's, or a stored one a `begin` found). Not for a one-message `result`: nobody sends
        `end` after it, and the notice would cost one extra assembler->gateway message per result
        (usually the writer has already answered its producer, so nothing else of it goes from the
        assembler to the gateway). That message crosses the producer's next message at the gateway,
        and Thespian loses a round of tens of ms whenever two actors send to each other at once:
        measured before lanes (supervision/lanes.py), result p99 37 ms instead of 7-9 ms."""
        if tell_gateway:
            self._emit(Stored(rid, stored_reply(rid, meta["total_trades"], location)))
        self.recent[rid] = (totals(meta), meta["total_trades"], location, self.clock())
        self.recent.move_to_end(rid)
        while len(self.recent) > RECENT_DONE:
            self.recent.popitem(last=False)
        self._forget_old()

    def _forget_old(self) -> None:
        """Stored results older than RECENT_MAX_AGE_S leave `recent` (the store answers for them)."""
        horizon = self.clock() - RECENT_MAX_AGE_S
        while self.recent and next(iter(self.recent.values()))[3] < horizon:
            self.recent.popitem(last=False)

    def _skipped(self, ev: Skipped) -> None:
        """A checked write the writer did not do: this Req was never real. Its result goes the usual
        way now: with the row the writer read (conflict, stored, or resume), or, when the store could
        not tell, through a lookup and a write that spools if it must. Then what was held for it."""
        req = self.reqs.get(ev.request_id)
        if req is None or req.checking is None:
            return   # given up meanwhile (writer lost, answer timed out): the producer resends
        self._unmake(req)
        self.stats["checked_writes_skipped"] += 1
        if ev.failed:
            self._start_lookup(req.checking)
        else:
            self._result(req.checking, ev.row, looked_up=True)
        self._replay_held(req)

    def _unmake(self, req: Req) -> None:
        """Forget a Req made for a checked write the writer did not (or may not have) done: what was
        held for it is then replayed (`_replay_held`) as if the request had never been seen."""
        self.reqs.pop(req.rid, None)
        req.inflight.clear()

    def _rejected(self, ev: Rejected) -> None:
        self._release(ev.request_id, ev.seq)
        req = self.reqs.get(ev.request_id)
        sent = req.inflight.pop(ev.seq, None) if req is not None else None
        self._bulk_done(sent, None)
        if req is None:
            return
        self._err(req.identity, ev.code, ev.message, req.rid, ev.retry_after_s)
        self._replay_held(req)

    def _replay_held(self, req: Req) -> None:
        """The messages held while req's write was in flight, handled in order as if they came now
        (an abort gets `conflict` if the result is stored, `aborted` if not; a begin or the result
        again gets `stored`), once nothing of req is in flight any more."""
        if req.held and not req.inflight:
            held, req.held = req.held, []
            for ev in held:
                self._dispatch(ev)

    def _live_done(self, ev: LiveDone) -> None:
        self._release(ev.batch_id, -1)
        identity = self.live.pop(ev.batch_id, None)
        if identity is None:
            return
        if ev.code:
            return self._err(identity, ev.code, ev.message or "", ev.batch_id, ev.retry_after_s)
        self._reply(identity, stored_reply(ev.batch_id, ev.nrows, ev.location))

    def _looked_up(self, ev: LookupAnswer) -> None:
        entry = self.lookups.pop(ev.request_id, None)
        if entry is None:
            return
        queued = entry[1]
        if ev.failed:
            return self._refuse(queued, "unavailable", "pairlane's writer is restarting", ev.request_id, 1.0)
        first, rest = queued[0], queued[1:]
        if isinstance(first, Result):
            self._result(first, ev.row, True)
        elif isinstance(first, Begin):
            self._begin(first, ev.row, True)
        elif isinstance(first, End):
            self._end(first, ev.row, True)
        elif isinstance(first, Abort):
            self._abort(first, ev.row, True)
        for q in rest:
            self._dispatch(q)

    def _inventory(self, ev: Inventory) -> None:
        self.inventory = {}
        for rid, seq, rows, held_for in ev.items:
            self.inventory.setdefault(rid, {})[seq] = (rows, tuple(held_for))

    def _sweep_done(self, ev: SweepDone) -> None:
        self.sweep_pending = False

    def _peers(self, ev: Peers) -> None:
        self.writer_up = ev.writer_up
        if ev.writer_changed:   # the new writer was never armed; the old one's answers no longer count
            self.direct = None
            self.direct_epoch += 1
        if ev.lost:
            # a restarted writer (or dlq, which may have held a batch from the writer) lost what we
            # had sent: those chunks are no longer in flight; producers resend them
            self.sweep_pending = False
            self.bulk_waiting.clear()   # their seqs are in req.inflight: released just below
            self.bulk_at_writer = 0
            for req in list(self.reqs.values()):
                for seq in req.inflight:
                    self._release(req.rid, seq)
                req.inflight.clear()
                # whether its write landed, only the store can say
                self._refuse(req.held, "busy", "pairlane's writer restarted; retry", req.rid, 0.5)
                req.held = []
                if req.checking is not None:   # never known to be new: its resend starts over
                    self._unmake(req)
            for rid, (_, queued) in self.lookups.items():
                self._refuse(queued, "busy", "pairlane's writer restarted; retry", rid, 0.5)
            self.lookups.clear()
            self.claiming.clear()
            for batch_id, identity in self.live.items():
                self._err(identity, "busy", "pairlane's writer restarted; retry", batch_id, 0.5)
                self._release(batch_id, -1)
            self.live.clear()
        if ev.dlq_changed:
            self.dlq_up = ev.dlq_up
            if ev.dlq_up:
                self._emit(AskInventory())

    # ----- the direct path (see Forwarded) ---------------------------------------------------------
    def _forwarded(self, ev: Forwarded) -> None:
        self.gateway_mark = ev.mark   # the events of its messages follow (and disarm)

    def _keeps_direct(self, ev) -> bool:
        """May ev be handled with the writer armed? Only if it begins, looks up and sends the writer
        nothing: the answer to a checked write (a new one-message result, which the writer took before
        the Arm it sent after it) that replays no held message, and the events in _KEEPS_DIRECT."""
        if type(ev) in _KEEPS_DIRECT:
            return True
        if type(ev) is Durable and ev.location == "db":
            req = self.reqs.get(ev.request_id)
            return req is not None and req.checking is not None and not req.held
        return False

    def _quiet(self) -> bool:
        """One-message results are flowing, and nothing here that a direct write could race: no request
        in progress but new one-message results whose checked write the writer takes before the Arm;
        nothing being looked up, nothing in the dlq, no big chunk on its way; a store that checks in
        the write's transaction, a writer, and no other daemon's leases to respect."""
        return (self.checked_writes and self.writer_up and not self.claims and self.gateway_mark is not None
                and self.results_flowing and not self.lookups and not self.inventory
                and not self.bulk_waiting and not self.bulk_at_writer
                and all(r.checking is not None and not r.held for r in self.reqs.receiving_reqs.values()))

    def _on_flush(self, ev: Flush) -> None:
        if self.direct is None and self._quiet():
            self.direct_epoch += 1
            self.direct = ("arming", self.gateway_mark)
            self._emit(Arm(self.gateway_mark, self.direct_epoch))

    def _disarm(self) -> None:
        self.stats["direct_closed"] += 1
        if self.direct[0] == "open":
            self._emit(DirectOpen(None))
        self.direct_epoch += 1
        self.direct = ("closing", None)
        self._emit(Arm(None, self.direct_epoch))

    def _arm_ack(self, ev: ArmAck) -> None:
        if self.direct is None or ev.epoch != self.direct_epoch:
            return   # an earlier command's, or a previous writer's
        state, mark = self.direct
        if state == "closing":
            self.direct = None
        elif state == "arming":
            self.direct = ("open", mark)
            self._emit(DirectOpen(mark))

    def _direct_stored(self, ev: DirectStored) -> None:
        """What `_begin` and `_durable` would have recorded of the result: it is complete, the writer
        answered its producer, and it is remembered as any stored one-message result is."""
        rid = ev.request_id
        self.stats["in_result"] += 1
        self.stats["direct_writes"] += 1
        self.results_flowing = True
        old = self.reqs.get(rid)
        if rid in self.lookups or (old is not None and old.status == ResultStatus.RECEIVING):
            # its producer sent it again meanwhile, and that went the usual way: the writer took this
            # write before the Disarm it then got, so what that way asks the store finds it stored
            return self._stored(rid, ev.meta["total_trades"], "db", ev.received_at)
        self.stats["begun"] += 1
        now = self.clock()
        req = Req(meta=ev.meta, identity=ev.identity, window=1, began_at=ev.received_at, last_activity=now,
                  kind="result")
        self.reqs[rid] = req
        self._durable_chunk(req, Durable(rid, 0, "db", WriteOutcome.COMPLETE, ev.nrows, ev.identity))

    # ----- timers --------------------------------------------------------------------------------------
    def _tick(self, ev: Tick) -> None:
        now = self.clock()
        self._forget_old()
        for rid in sorted(self.reclaiming):   # the store did not answer last time
            self._emit(Claim(rid))
        lost = []
        # safety net: a chunk whose answer was lost is not in flight forever
        for req in [r for r in self.reqs.values() if r.inflight]:
            for seq, (rows, sent_at) in list(req.inflight.items()):
                if now - sent_at > INFLIGHT_TIMEOUT_S and not any(
                        w.meta["request_id"] == req.rid and w.seq == seq for w in self.bulk_waiting):
                    req.inflight.pop(seq)
                    self._release(req.rid, seq)
                    self._bulk_done((rows, sent_at))
                    self._emit(Log("WARNING", "chunk_answer_lost", (("request_id", req.rid), ("seq", seq))))
                    lost.append(req)
        for req in lost:
            if req.checking is not None:   # never known to be new: what was held starts over
                self._unmake(req)
            self._replay_held(req)
        for rid, req in list(self.reqs.receiving_reqs.items()):
            idle = now - req.last_activity
            if not req.inflight and idle > self.timeout_s:
                self.reqs.pop(rid)
                self.stats["abandoned"] += 1
                self._metric("inc", "pairlane_results_total", outcome="abandoned")
                self._emit(Log("WARNING", "request_abandoned", (
                    ("request_id", rid), ("idle_s", f"{idle:.1f}"), ("durable", len(req.durable)),
                    ("total_chunks", req.meta["total_chunks"]))))
                if self.writer_up:
                    self._to_writer(SetStatus(rid, ResultStatus.ABANDONED, f"idle for {idle:.0f}s"))
        for rid in self.reqs.expired_finished(min(self.timeout_s, 30.0)):
            self.reqs.pop(rid)  # finished: `recent` answers from now on
        for rid, (asked_at, queued) in list(self.lookups.items()):
            if now - asked_at > LOOKUP_TIMEOUT_S:
                self.lookups.pop(rid)
                self.claiming.discard(rid)
                self._refuse(queued, "busy", "the database did not answer in time; retry", rid, 1.0)
        if now - self.last_sweep > max(1.0, self.timeout_s / 2) and self.writer_up:
            self.last_sweep = now
            # a request with chunks waiting in the dlq is stored, never stale (PROTOCOL section 1)
            active = frozenset(self.reqs) | frozenset(self.lookups) | frozenset(self.inventory)
            self.sweep_pending = True
            self._emit(Sweep(self.wall() - self.timeout_s, active))
            if self.dlq_up:
                self.inventory_asked = now
                self._emit(AskInventory())  # landed or purged items drop out
        if self.inventory and self.dlq_up and now - self.inventory_asked >= INVENTORY_REFRESH_S:
            # the dlq says nothing when an item lands: while it holds any, ask again (the direct
            # path stays closed, and checked writes skipped, for as long as we believe it does)
            self.inventory_asked = now
            self._emit(AskInventory())

    _HANDLERS: ClassVar[dict] = {
        Begin: _inbound, Result: _inbound, Chunk: _inbound, End: _inbound, Abort: _inbound,
        LiveTrades: _live_trades, Durable: _durable, Rejected: _rejected, LiveDone: _live_done,
        LookupAnswer: _looked_up, Skipped: _skipped, Claimed: _claimed, LeasesLost: _leases_lost, Inventory: _inventory,
        SweepDone: _sweep_done, Peers: _peers, Tick: _tick,
        Forwarded: _forwarded, Flush: _on_flush, ArmAck: _arm_ack, DirectStored: _direct_stored,
    }


# events that leave the direct path open: they begin nothing here and look nothing up
_KEEPS_DIRECT = frozenset({Forwarded, Flush, ArmAck, DirectStored, Tick, SweepDone})
