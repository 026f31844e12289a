"""pairlane's actor base: a supervised Worker that can report metrics and alerts.

Owns: batching metric updates (flushed to the metrics actor every heartbeat,
or when the batch is large) and sending alerts. Never blocks.
"""
from __future__ import annotations

from supervision.worker import Worker

from pairlane.metrics import MetricBatch

from .messages import Alert, MetricUpdates


class PairlaneActor(Worker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.metrics = MetricBatch()

    def flush_metrics(self) -> None:
        if len(self.metrics) and self.peer("metrics") is not None:
            self.tell("metrics", MetricUpdates(tuple(self.metrics.drain())))
        elif len(self.metrics) > 10000:
            self.metrics.drain()  # no metrics actor: never grow without bound

    def on_tick(self) -> None:
        self.flush_metrics()
        self.tick()

    def tick(self) -> None:
        """Per-heartbeat work of subclasses."""

    def alert(self, name: str, state: str, severity: str = "warning", reasons: dict | None = None) -> None:
        self.tell("metrics", Alert(name, state, severity, dict(reasons or {})))
