"""The contract's closed vocabularies as string enums (PROTOCOL.md sections 1, 3 and 6).

Owns: result statuses, the outcome of one chunk write, alert names and states. Each member *is* its
wire/database string (StrEnum), so it is stored, sent and compared as the plain text the contract
names. Never holds behaviour: the rules that move between these values live in `lifecycle` and `store`.
"""
from __future__ import annotations

from enum import StrEnum


class ResultStatus(StrEnum):
    """`backtest_results.status` (PROTOCOL.md section 3)."""
    RECEIVING = "receiving"
    SPOOLED = "spooled"
    COMPLETE = "complete"
    FAILED = "failed"
    ABANDONED = "abandoned"

    @property
    def stored(self) -> bool:
        """A `stored` reply was (or may have been) given: the result is a promise, never dropped
        except by an operator's `dlq.purge`."""
        return self in (ResultStatus.COMPLETE, ResultStatus.SPOOLED)

    @property
    def final_without_rows(self) -> bool:
        """Ended without a usable result: its rows are removed and late chunks are discarded."""
        return self in (ResultStatus.FAILED, ResultStatus.ABANDONED)


# Statuses a producer may still see as "its" result (begin answers resume / stored, not a fresh start).
VISIBLE_STATUSES = (ResultStatus.RECEIVING, ResultStatus.SPOOLED, ResultStatus.COMPLETE)


class WriteOutcome(StrEnum):
    """What committing one chunk did to its result (`Store.write_chunk`)."""
    RECEIVING = "receiving"      # committed; chunks still missing
    COMPLETE = "complete"        # committed; this was the last chunk and the rows add up
    FAILED = "failed"            # committed the last chunk, but the rows do not add up: rows removed
    DUPLICATE = "duplicate"      # that seq was already committed: nothing written
    DISCARDED = "discarded"      # the result is failed or abandoned: nothing written
    EXISTS = "exists"            # a checked write (new_only) found the request in the store: nothing written


class AlertName(StrEnum):
    """Alerts of PROTOCOL.md section 6."""
    PAIR_SAFE_STOP = "pair_safe_stop"
    INGEST_STALLED = "ingest_stalled"
    DLQ_PARKED = "dlq_parked"
    SUPERVISOR_ESCALATED = "supervisor_escalated"
    DISK_LOW = "disk_low"

    @property
    def severity(self) -> str:
        """The alert's `severity` field: a stalled ingest is a warning (evaluation goes on with stored
        data); every other alert needs an operator."""
        return "warning" if self is AlertName.INGEST_STALLED else "critical"


class AlertState(StrEnum):
    RAISED = "raised"
    CLEARED = "cleared"
