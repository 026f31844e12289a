"""pairlane's actor base: a supervised Worker that can report metrics and alerts.

Owns: batching metric updates (flushed to the metrics actor every heartbeat,
or when the batch is large) and sending alerts. Never blocks.
"""
from __future__ import annotations

import zmq

from pairlane.supervision.worker import Worker

from pairlane.metrics import MetricBatch
from pairlane.vocab import AlertName, AlertState

from .messages import Alert, MetricUpdates


class PairlaneActor(Worker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.metrics = MetricBatch()
        self._sockets: list = []
        self._metrics_seen = None   # the metrics actor address our gauges and alerts last went to

    def bind_socket(self, kind: int, endpoint: str, **options: int) -> zmq.Socket:
        """A ZMQ socket bound to endpoint (LINGER 0 plus the given options), closed on stop."""
        sock = zmq.Context.instance().socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        for name, value in options.items():
            sock.setsockopt(getattr(zmq, name), value)
        sock.bind(endpoint)
        self._sockets.append(sock)
        return sock

    def on_stop(self) -> None:
        self.close_sockets()

    def close_sockets(self) -> None:
        for sock in self._sockets:
            try:
                sock.close(0)
            except zmq.ZMQError:
                pass
        self._sockets = []

    def flush_metrics(self) -> None:
        if len(self.metrics) and self.peer("metrics") is not None:
            self.tell("metrics", MetricUpdates(tuple(self.metrics.drain())))
        elif len(self.metrics) > 10000:
            self.metrics.drain()  # no metrics actor: never grow without bound

    def metrics_restarted(self) -> bool:
        """True once for each metrics actor address the directory shows (the first one included):
        a restarted metrics actor starts from zero, so the gauges and raised alerts an actor owns
        must be sent to it again, not only at their next change."""
        addr = self.peer("metrics")
        if addr is None or addr == self._metrics_seen:
            return False
        self._metrics_seen = addr
        return True

    def on_tick(self) -> None:
        self.flush_metrics()
        self.tick()

    def tick(self) -> None:
        """Per-heartbeat work of subclasses."""

    def alert(self, name: AlertName, state: AlertState, reasons: dict | None = None) -> None:
        self.tell("metrics", Alert(name, state, dict(reasons or {})))
