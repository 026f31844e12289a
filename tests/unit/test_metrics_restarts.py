"""Unit test of how the metrics actor turns status rows into restart counts (actors/metrics.py):
a supervisor that is itself restarted counts its children's restarts from 0 again, and the
counter must keep counting through that."""
from __future__ import annotations

import types

import pytest

from pairlane.actors.metrics import MetricsActor


def counter():
    fake = types.SimpleNamespace(restarts_seen={})
    total = 0

    def see(restarts: int, pid: int | None) -> int:
        nonlocal total
        total += MetricsActor._restart_delta(fake, "writer", restarts, pid)
        return total
    return see


@pytest.mark.parametrize("rows, want", [
    ([(0, None), (0, 10)], 0),                                   # first start: not a restart
    ([(0, 10), (1, 11), (2, 12)], 2),                            # restarts under one supervisor
    ([(0, 10), (2, 12)], 2),                                     # two restarts between two samples
    ([(0, 10), (1, 11), (2, 12), (2, None), (0, None), (0, 20), (1, 21)], 4),   # supervisor restarted
    ([(0, 10), (1, 11), (2, 12), (0, 20), (1, 21)], 4),          # ... its first sample already running
    ([(0, 10), (1, 11), (2, 12), (1, 21)], 4),                   # ... and restarted once before a sample
    ([(0, 10), (0, None), (0, 20)], 1),                          # a new supervisor, equal count: new pid
    ([(0, 10), (0, 10), (0, None), (0, 10)], 0),                 # same process seen again
    ([(3, 30)], 3),                                              # a restarted metrics actor starts from the table
])
def test_restart_counts_keep_counting_across_a_supervisor_restart(rows, want):
    see = counter()
    total = 0
    for restarts, pid in rows:
        total = see(restarts, pid)
    assert total == want
