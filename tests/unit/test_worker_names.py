"""An actor's own helper must never shadow one of the supervision Worker's private methods: the
Worker calls those from its loop (ticks, heartbeats, stall watch), so a same-named method in an
actor breaks that actor at its first tick (it happened: MetricsActor._check_stall(now))."""
from __future__ import annotations

import inspect

from pairlane.actors import admin, assembler, base, dlq, gateway, legacy, metrics, pairs, tree, writer
from pairlane.supervision.worker import Worker


def _private(cls) -> set[str]:
    return {n for n in vars(cls) if n.startswith("_") and not n.startswith("__")}


def test_no_actor_shadows_a_private_method_of_the_worker():
    worker_private = set().union(*(_private(c) for c in Worker.__mro__ if c is not object))
    clashes = []
    for mod in (admin, assembler, base, dlq, gateway, legacy, metrics, pairs, tree, writer):
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, Worker) and cls.__module__ == mod.__name__:
                clashes += [f"{cls.__name__}.{n}" for n in sorted(_private(cls) & worker_private)]
    assert clashes == []
