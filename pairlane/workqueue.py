"""The writer's queue: small work first, without reordering what must stay in order.

Pure (no threads, no Thespian): the writer actor puts each message it gets into a `WorkQueue`, and its
database thread takes them out with `take()`. The rule:

- a *small* job may overtake *big* ones (a 10-trade result need not wait behind a 1 MiB chunk of
  another request), but never a job that shares one of its keys (its own request's earlier work), so
  every request's messages are handled in the order they were sent;
- a job with `keys=None` is a barrier: it overtakes nothing and nothing overtakes it;
- the job at the front is overtaken at most `max_overtakes` times in a row, so big work is never
  starved by a steady stream of small work.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

MAX_OVERTAKES = 16


@dataclass
class Job:
    """One unit of the writer's work. keys: what it must stay in order with (e.g. `("r", request_id)`);
    None for a barrier. big: holds the database long (a big chunk)."""

    work: Any
    keys: frozenset | None
    big: bool = False
    put_at: float = 0.0
    meta: dict = field(default_factory=dict)


class WorkQueue:
    def __init__(self, max_overtakes: int = MAX_OVERTAKES):
        self.jobs: collections.deque = collections.deque()
        self.max_overtakes = max_overtakes
        self.overtakes = 0          # of the current front job, in a row
        self.overtaken_total = 0    # small jobs taken before a big one ahead of them (inspect)

    def __len__(self) -> int:
        return len(self.jobs)

    def put(self, job: Job) -> None:
        self.jobs.append(job)

    def big(self) -> int:
        return sum(1 for j in self.jobs if j.big)

    def take(self) -> Job | None:
        """The next job to run, removed from the queue; None when it is empty."""
        if not self.jobs:
            return None
        i = self._overtaker() if self.overtakes < self.max_overtakes else None
        if i is None:
            self.overtakes = 0
            return self.jobs.popleft()
        self.overtakes += 1
        self.overtaken_total += 1
        job = self.jobs[i]
        del self.jobs[i]
        return job

    def _overtaker(self) -> int | None:
        """The index of the first small job that may run before the front job: every job ahead of it
        is big (small ones ahead would run first anyway) or shares no key with it, and none of
        them is a barrier, nor is it one."""
        if not self.jobs[0].big:
            return None
        ahead: set = set()
        for i, job in enumerate(self.jobs):
            if job.keys is None:
                return None
            if i and not job.big and ahead.isdisjoint(job.keys):
                return i
            ahead.update(job.keys)
        return None
