"""Messages between pairlane's actors (the application vocabulary).

Owns: every message that carries application work or admin requests between
actors. Each is a frozen dataclass with documented fields. Bounded: no message
carries more than one chunk (`gateway.max_message_bytes`) of data. Never
holds decoded trade rows (raw msgpack bytes travel; they are decoded once,
where rows are needed).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pairlane.lifecycle import BULK_ROWS
from pairlane.vocab import AlertName, AlertState


@dataclass(frozen=True)
class AdminCommand:
    """Admin actor -> the actor that owns `cmd` (pairlane.admin_commands), which runs it with
    actors.admin.serve_admin and answers AdminReply with the same token.

    token: the admin actor's correlation id (supervision.requests). cmd: the command name.
    args: the request's args, already checked against the command's declaration.
    """

    token: int
    cmd: str
    args: dict


@dataclass(frozen=True)
class AdminReply:
    """Owner actor -> admin. token: the AdminCommand's. reply: the full admin reply map,
    {"ok": True, ...} or {"ok": False, "error": ...}."""

    token: int
    reply: dict


@dataclass(frozen=True)
class MetricUpdates:
    """Any actor -> metrics: a batch of ("inc"|"set"|"observe", name, labels, value) tuples."""

    updates: tuple


@dataclass(frozen=True)
class Alert:
    """Any actor -> metrics (which owns the PUB socket): raise or clear a named alert."""

    name: AlertName
    state: AlertState
    reasons: dict = field(default_factory=dict)


# ----- ingest path ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Inbound:
    """Gateway -> assembler: one validated producer message.

    identity: the ROUTER identity of the DEALER that sent it (replies go there).
    msg: the message map without its `trades` (small). raw: the whole frame for
    chunk/result/live_trades (decoded again only by the writer). nrows: rows in
    the frame. bad: (code, message) when the columns failed validation (answered
    after the unknown_request check). received_at: wall time at the gateway.
    """

    identity: bytes
    msg: dict
    raw: bytes | None = None
    nrows: int = 0
    bad: tuple | None = None
    received_at: float = 0.0
    origin: str = "zmq"          # zmq | legacy (only legacy may set `truncated`)
    reply_to: Any = None         # None: replies go to the gateway (ZMQ identity); else this actor


@dataclass(frozen=True)
class InboundBatch:
    """Gateway -> assembler: the Inbounds of one drain of the producer socket, in arrival order
    (one Thespian message instead of one per frame: each costs a transport round trip).
    mark: (the gateway incarnation's token, how many batches it has forwarded to this assembler,
    this one included): the direct path's fence (pairlane.lifecycle.Forwarded)."""

    items: tuple
    mark: tuple | None = None


@dataclass(frozen=True)
class Outbound:
    """Assembler -> gateway: replies to send (identity, reply map), the (request_id, seq) of
    chunks the gateway no longer counts as in flight, and (request_id, stored reply) of results
    stored for good, whose next `end` the gateway may answer itself."""

    replies: tuple = ()
    resolved: tuple = ()
    stored: tuple = ()


@dataclass(frozen=True)
class WriteChunk:
    """Assembler -> writer (and dlq -> writer on retry): commit one chunk.

    meta: the results-row fields (store.meta_from_message). raw: the frame bytes.
    reply_to: the actor to tell ChunkDurable/ChunkRejected (None on DLQ retries).
    item_id: the DLQ item being retried, if any.
    record: do what BeginRequest does first, in the chunk's transaction (a one-message result).
    answer: (identity, reply) of a one-message result: when the commit completes the result, the
    writer sends it to the gateway itself (saving the trip through the assembler) and says so in
    ChunkDurable.answered; never for anything else, never before the commit.
    new_only: a checked write (with record, a new one-message result): written only if the store
    does not hold the request, checked in the write's own transaction; else, or when the store fails,
    nothing is written (never spooled) and the writer answers WriteSkipped instead of ChunkDurable.
    """

    meta: dict
    seq: int
    raw: bytes
    nrows: int
    reply_to: Any = None
    item_id: str | None = None
    record: bool = False
    answer: tuple | None = None
    new_only: bool = False

    @property
    def big(self) -> bool:
        """More than BULK_ROWS rows: at most BULK_WINDOW at the writer, each alone in its WriterBatch,
        and small work may pass one waiting there (Writer.lane_pick)."""
        return self.nrows > BULK_ROWS


@dataclass(frozen=True)
class WriteLive:
    """Assembler -> writer (and dlq -> writer on retry): append live trades, idempotent by batch_id."""

    batch_id: str
    raw: bytes
    nrows: int
    reply_to: Any = None
    item_id: str | None = None


@dataclass(frozen=True)
class ChunkDurable:
    """Writer or dlq -> assembler: the chunk is durable. location: db | dlq. status: the result's
    status after a db commit (receiving, complete, failed, duplicate, discarded) or 'spooled'.
    answered: the producer identity the writer already sent WriteChunk.answer to, else None."""

    request_id: str
    seq: int
    location: str
    status: str
    nrows: int
    answered: bytes | None = None


@dataclass(frozen=True)
class ChunkRejected:
    """Writer or dlq -> assembler: neither the database nor the spool took the chunk."""

    request_id: str
    seq: int
    code: str
    message: str
    retry_after_s: float | None = None


@dataclass(frozen=True)
class LiveDone:
    """Writer/dlq -> assembler: a live_trades batch is durable (or rejected when code is set)."""

    batch_id: str
    nrows: int
    location: str
    status: str
    code: str | None = None
    message: str | None = None
    retry_after_s: float | None = None


@dataclass(frozen=True)
class Lookup:
    """Assembler -> writer: what does the database know of request_id?"""

    request_id: str


@dataclass(frozen=True)
class LookupReply:
    """row: the backtest_results row plus `durable` {seq: rows}, or None; error: text if unreadable."""

    request_id: str
    row: dict | None
    error: str | None = None


@dataclass(frozen=True)
class BeginRequest:
    """Assembler -> writer: record a request as `receiving` (best effort; chunks carry meta too)."""

    meta: dict


@dataclass(frozen=True)
class SetStatus:
    """Assembler -> writer: abandoned | failed (rows removed) | spooled."""

    request_id: str
    status: str
    error: str | None = None


@dataclass(frozen=True)
class SweepStale:
    """Assembler -> writer: abandon `receiving` results idle since older_than and not in active."""

    older_than: float
    active: frozenset


@dataclass(frozen=True)
class SweepDone:
    """Writer -> assembler: the SweepStale it sent is applied (or failed and changed nothing)."""


@dataclass(frozen=True)
class WriteSkipped:
    """Writer -> assembler: a checked write (WriteChunk.new_only) was not done: the store holds the
    request (row: what a Lookup answers), or could not tell (row None, error)."""

    request_id: str
    row: dict | None
    error: str | None = None


@dataclass(frozen=True)
class WriterBatch:
    """Assembler -> writer: writer messages (WriteChunk, WriteLive, BeginRequest, SetStatus, Lookup,
    SweepStale) handled in this order, each exactly as if sent alone (a chunk is still one
    transaction, committed before its ChunkDurable), answered by one WriterBatchDone. Bounded by
    the assembler (a few chunks; big ones one at a time)."""

    items: tuple


@dataclass(frozen=True)
class WriterBatchDone:
    """Writer -> assembler: every answer the WriterBatch's items produced for the assembler
    (ChunkDurable, ChunkRejected, LiveDone, LookupReply, SweepDone), in order; sent when the whole
    batch is handled, so the assembler knows it left the writer."""

    replies: tuple


@dataclass(frozen=True)
class DirectWrite:
    """Gateway -> writer: a new small one-message result, sent straight (the direct path, PROTOCOL.md
    section 1's promises unchanged: see pairlane.lifecycle.Forwarded). The writer writes it, checked,
    only while armed with `mark`; else it hands `inbound` to the assembler (DirectRefused)."""

    inbound: Inbound
    mark: tuple


@dataclass(frozen=True)
class ArmDirect:
    """Assembler -> writer, in order with its writes: take DirectWrites marked `mark` (None: take
    none). Answered by DirectArmed(epoch), in the batch's WriterBatchDone."""

    mark: tuple | None
    epoch: int


@dataclass(frozen=True)
class DirectArmed:
    """Writer -> assembler: ArmDirect `epoch` is in force."""

    epoch: int


@dataclass(frozen=True)
class DirectDone:
    """Writer -> assembler: a DirectWrite is committed, its result complete, its producer told `stored`."""

    meta: dict
    nrows: int
    identity: bytes
    received_at: float


@dataclass(frozen=True)
class DirectRefused:
    """Writer -> assembler: a DirectWrite the writer did not write (not armed for its mark, the store
    holds the request, or the store failed): it goes the usual way now, as if from the gateway."""

    inbound: Inbound


@dataclass(frozen=True)
class DirectOpen:
    """Assembler -> gateway: send new small results straight to the writer while your last mark is
    `mark` (None: send none)."""

    mark: tuple | None


@dataclass(frozen=True)
class LegacyResult:
    """Legacy -> writer: a legacy result without trades (status complete or failed).
    reply_to: told LegacyWritten with `token` once the write committed (None: no reply)."""

    meta: dict
    status: str
    reply_to: Any = None
    token: int = 0


@dataclass(frozen=True)
class LegacyWritten:
    """Writer -> legacy: the LegacyResult with `token` is applied. before: the row's status before
    the write ("" when there was none); a stored one (complete, spooled) was kept, not replaced."""

    token: int
    request_id: str
    before: str


# ----- dead-letter queue ------------------------------------------------------------------------
@dataclass(frozen=True)
class SpoolBatch:
    """Writer -> dlq: a batch the database did not take. work: the WriteChunk or WriteLive."""

    work: Any
    reason: str
    error: str


@dataclass(frozen=True)
class RetryDone:
    """Writer -> dlq: outcome of a retried item. ok: landed (or was a duplicate / discarded)."""

    item_id: str
    ok: bool
    reason: str = ""
    error: str = ""


@dataclass(frozen=True)
class InventoryRequest:
    """Assembler -> dlq: which chunks do you hold?"""


@dataclass(frozen=True)
class Inventory:
    """Dlq -> assembler: ((request_id, seq, nrows, totals), ...) of every chunk item held; totals
    (lifecycle.totals of the item's request) tell an earlier request under the same id apart."""

    items: tuple


# ----- pairs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReplaceSlots:
    """Pairs -> writer: replace pair_slots whole and append to pair_slots_history."""

    slots: tuple
    evaluated_at: float
    reply_to: Any = None
    token: int = 0


@dataclass(frozen=True)
class SlotsWritten:
    token: int
    ok: bool
    error: str | None = None


# ----- cheap string forms ---------------------------------------------------------------------------
# Thespian formats every message it sends with str() for its own logging (TransmitIntent.identify),
# whether or not the log line is emitted. The dataclass repr of a 1 MiB bytes field is a 4 MB string:
# that made a chunk hop cost ~30 ms instead of ~7 ms. Messages therefore print sizes, not payloads.
def _compact_repr(self) -> str:
    parts = []
    for name in self.__dataclass_fields__:
        v = getattr(self, name)
        if isinstance(v, (bytes, bytearray, memoryview)):
            parts.append(f"{name}=<{len(v)} bytes>")
        elif isinstance(v, (tuple, list, dict, frozenset)) and len(v) > 8:
            parts.append(f"{name}=<{type(v).__name__} of {len(v)}>")
        else:
            s = repr(v)
            parts.append(f"{name}={s[:120] + '...' if len(s) > 120 else s}")
    return f"{type(self).__name__}({', '.join(parts)})"


for _cls in list(globals().values()):
    if isinstance(_cls, type) and hasattr(_cls, "__dataclass_fields__") and _cls.__module__ == __name__:
        _cls.__repr__ = _compact_repr
        _cls.__str__ = _compact_repr
