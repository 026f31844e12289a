"""Request/reply between actors: correlation ids, deadlines, and an answer for every request.

Owns: numbering the requests an actor sends (`Correlator.open` -> a correlation id the other
actor echoes in its reply), remembering what to do with each reply (`on_reply`), and turning a
missed deadline into a call of the request's `on_timeout`, so the asker always answers its own
client (an error reply), never hangs. A reply after its deadline, or with an id that was never
opened, is dropped and counted (`late`). `Requests` binds a Correlator to a Worker: it sends the
request and arms a wakeup at its deadline.

Generic: knows nothing of what the requests mean nor of any application. Never retries, never
blocks, and never touches a message beyond handing it to `on_reply`.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable

DEADLINE_TIMER = "pl.request.deadline"


@dataclass
class Pending:
    """One request awaiting its reply."""

    id: int
    what: str            # who or what is being asked (for errors and `inspect`)
    timeout_s: float
    deadline: float      # on the correlator's clock
    on_reply: Callable[[Any], None]
    on_timeout: Callable[[], None]


class Correlator:
    """The correlation table. Pure logic over an injectable monotonic clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._ids = itertools.count(1)
        self._pending: dict[int, Pending] = {}
        self.answered = 0
        self.expired = 0
        self.late = 0

    def open(self, what: str, timeout_s: float, on_reply: Callable[[Any], None],
             on_timeout: Callable[[], None]) -> int:
        """Register a request; its correlation id (never 0, never reused)."""
        cid = next(self._ids)
        self._pending[cid] = Pending(cid, what, float(timeout_s), self._clock() + float(timeout_s),
                                     on_reply, on_timeout)
        return cid

    def answer(self, cid: Any, reply: Any) -> bool:
        """Hand `reply` to the on_reply of request `cid`; False (and counted late) if that request
        is not pending: answered already, timed out, or never opened."""
        p = self._pending.pop(cid, None) if isinstance(cid, int) else None
        if p is None:
            self.late += 1
            return False
        self.answered += 1
        p.on_reply(reply)
        return True

    def time_out(self, cid: Any) -> bool:
        """Request `cid` reached its deadline: call its on_timeout. False if it is no longer pending."""
        p = self._pending.pop(cid, None) if isinstance(cid, int) else None
        if p is None:
            return False
        self.expired += 1
        p.on_timeout()
        return True

    def expire(self, now: float | None = None) -> int:
        """Time out every request whose deadline has passed; how many."""
        now = self._clock() if now is None else now
        due = [cid for cid, p in self._pending.items() if p.deadline <= now]
        for cid in due:
            self.time_out(cid)
        return len(due)

    def cancel(self, cid: int) -> bool:
        """Forget request `cid` without calling anything (its reply will be dropped as late)."""
        return self._pending.pop(cid, None) is not None

    def waiting_on(self) -> list[str]:
        """`what` of every pending request, oldest first."""
        return [p.what for p in self._pending.values()]

    def stats(self) -> dict:
        return {"pending": len(self._pending), "answered": self.answered, "expired": self.expired,
                "late": self.late}

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, cid: object) -> bool:
        return cid in self._pending


class Requests(Correlator):
    """A Correlator bound to an actor (a supervision Worker, or anything with `send`,
    `send_ordered` and `after(delay_s, payload)`): `ask` sends, `expect` waits for an answer
    that arrives another way; both arm a wakeup at the deadline. The actor's `on_timer` passes
    every payload to `on_timer` first, its `on_message` every reply to `answer`."""

    def __init__(self, actor: Any, clock: Callable[[], float] = time.monotonic):
        super().__init__(clock)
        self._actor = actor

    def ask(self, addr: Any, build: Callable[[int], Any], what: str, timeout_s: float,
            on_reply: Callable[[Any], None], on_timeout: Callable[[], None], ordered: bool = False) -> int:
        """Send build(correlation id) to addr; on_reply(reply) or, past timeout_s, on_timeout()."""
        cid = self.expect(what, timeout_s, on_reply, on_timeout)
        (self._actor.send_ordered if ordered else self._actor.send)(addr, build(cid))
        return cid

    def expect(self, what: str, timeout_s: float, on_reply: Callable[[Any], None],
               on_timeout: Callable[[], None]) -> int:
        """Open a request whose answer the caller delivers itself with `answer`."""
        cid = self.open(what, timeout_s, on_reply, on_timeout)
        self._actor.after(timeout_s, (DEADLINE_TIMER, cid))
        return cid

    def on_timer(self, payload: Any) -> bool:
        """True if payload was one of our deadline wakeups (then handled)."""
        if isinstance(payload, tuple) and len(payload) == 2 and payload[0] == DEADLINE_TIMER:
            self.time_out(payload[1])
            return True
        return False
