"""Metrics registry of the metrics actor, its HTTP endpoint and the senders' batch helper.

Owns: every pairlane metric name, type, label set and histogram buckets (one
private ``prometheus_client.CollectorRegistry``; PROTOCOL.md section 6);
applying update batches sent by other actors; the Prometheus text exposition;
the plain-map snapshot for ``admin metrics``; the database file size and
growth gauges; the ``/metrics`` HTTP server; ``MetricBatch``, which actors use
to collect updates before sending them.

Never does: touch prometheus_client's global registry or multiprocess mode,
raise on a bad update (it is dropped and counted in
``pairlane_metrics_dropped_total{reason}``), decide what to measure (the
actors do), or use Thespian.

An update is a tuple ``(op, name, labels, value)``: ``op`` is ``"inc"``
(counters and gauges, value >= 0 for counters), ``"set"`` (gauges) or
``"observe"`` (histograms); ``labels`` is a dict with exactly the metric's
label names, or None / {} for a metric without labels; ``value`` is a finite
int or float (not bool).
"""

from __future__ import annotations

import http.server
import logging
import math
import os
import socket
import socketserver
import threading
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE", "METRIC_SPECS", "Metrics", "MetricBatch", "MetricsServer", "serve"]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_SERIES_PER_METRIC = 256     # label sets beyond this are dropped (reason=too_many_series)

_SLOW = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_EVAL = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# name -> (type, help, label names, buckets or None)
METRIC_SPECS: dict[str, tuple[str, str, tuple[str, ...], tuple[float, ...] | None]] = {
    # ingest
    "pairlane_ingest_bytes_total": ("counter", "Bytes of ingest frames received (both endpoints).", (), None),
    "pairlane_ingest_messages_total": ("counter", "Ingest messages received, by message type.", ("type",), None),
    "pairlane_results_total": ("counter", "Results reaching a final or reported outcome, by outcome.", ("outcome",), None),
    "pairlane_result_receive_seconds": ("histogram", "Seconds from a result's begin to its stored reply.", (), _SLOW),
    "pairlane_chunk_assembly_seconds": ("histogram", "Seconds the assembler spends on one chunk.", (), _FAST),
    "pairlane_errors_total": ("counter", "Error replies sent to producers, by error code.", ("code",), None),
    "pairlane_legacy_results_total": ("counter", "Legacy S-expression results, by outcome.", ("outcome",), None),
    "pairlane_legacy_truncated_total": ("counter", "Legacy results stored with truncated = 1.", (), None),
    "pairlane_last_result_timestamp_seconds": ("gauge", "Unix time of the newest stored result.", (), None),
    # store
    "pairlane_sqlite_write_seconds": ("histogram", "Seconds per SQLite write transaction.", (), _FAST),
    "pairlane_sqlite_rows_written_total": ("counter", "Rows committed to SQLite.", (), None),
    "pairlane_db_bytes": ("gauge", "Size of the SQLite database files in bytes.", ("file",), None),
    "pairlane_db_growth_bytes_per_second": ("gauge", "Change of main+wal size per second since the previous sample.", (), None),
    # dead-letter spool
    "pairlane_dlq_items": ("gauge", "Items held in the dead-letter spool.", (), None),
    "pairlane_dlq_parked_items": ("gauge", "Parked items in the dead-letter spool.", (), None),
    "pairlane_dlq_oldest_item_age_seconds": ("gauge", "Age of the oldest dead-letter item (0 when empty).", (), None),
    "pairlane_dlq_bytes": ("gauge", "Bytes held in the dead-letter spool.", (), None),
    "pairlane_dlq_purged_total": ("counter", "Dead-letter items purged by an operator or retention.", (), None),
    "pairlane_dlq_replayed_total": ("counter", "Dead-letter items replayed into the store, by outcome.", ("outcome",), None),
    # supervision
    "pairlane_actor_restarts_total": ("counter", "Actor starts after the first, by actor.", ("actor",), None),
    # pairs
    "pairlane_pair_evaluations_total": ("counter", "Pair evaluations, by outcome.", ("outcome",), None),
    "pairlane_pair_missing_ratio": ("gauge", "Share of strategies excluded because their latest result is missing.", (), None),
    "pairlane_pair_evaluation_seconds": ("histogram", "Seconds per pair evaluation.", (), _EVAL),
    "pairlane_pair_slots_filled": ("gauge", "Pair slots filled by the last evaluation.", (), None),
    "pairlane_pair_safe_stop": ("gauge", "1 while no pair slot is filled (safe stop), else 0.", (), None),
    # alerts and self
    "pairlane_alerts_raised_total": ("counter", "Alerts raised, by alert name.", ("name",), None),
    "pairlane_metrics_dropped_total": ("counter", "Metric updates ignored, by reason.", ("reason",), None),
}

# Label values created at zero at start, so rate() and absent() work from the first scrape.
_PRESET_LABELS: dict[str, tuple[str, ...]] = {
    "pairlane_ingest_messages_total": ("begin", "chunk", "end", "abort", "result", "live_trades", "legacy"),
    "pairlane_db_bytes": ("main", "wal"),
    "pairlane_actor_restarts_total": ("gateway", "legacy", "assembler", "writer", "dlq", "pairs", "metrics", "admin"),
    "pairlane_metrics_dropped_total": ("unknown_name", "bad_op", "bad_labels", "bad_value", "too_many_series"),
}

_OPS_BY_TYPE = {"counter": {"inc"}, "gauge": {"inc", "set"}, "histogram": {"observe"}}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        f = float(value)
    except (OverflowError, ValueError):
        return None
    return f if math.isfinite(f) else None


class Metrics:
    """All pairlane metrics in a private registry.

    ``apply`` is called by the metrics actor's thread while ``render`` may run
    in the HTTP server's thread: prometheus_client values are thread-safe and
    the series bookkeeping is guarded by a lock.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._metrics: dict[str, Any] = {}
        self._series: dict[str, set[tuple[str, ...]]] = {}
        self._lock = threading.Lock()
        self._db_prev: tuple[float, int] | None = None   # (now, main+wal) of the previous sample
        for name, (kind, help_, labels, buckets) in METRIC_SPECS.items():
            if kind == "counter":
                m = Counter(name, help_, labels, registry=self.registry)
            elif kind == "gauge":
                m = Gauge(name, help_, labels, registry=self.registry)
            else:
                m = Histogram(name, help_, labels, registry=self.registry, buckets=buckets)
            self._metrics[name] = m
            self._series[name] = set()
        for name, values in _PRESET_LABELS.items():
            (label,) = METRIC_SPECS[name][2]
            for v in values:
                self._metrics[name].labels(**{label: v})
                self._series[name].add((v,))

    def apply(self, batch: Iterable[Any]) -> None:
        """Apply updates ``(op, name, labels, value)``; bad ones are dropped and counted.

        Never raises, whatever ``batch`` holds.
        """
        try:
            updates = list(batch)
        except Exception:
            self._drop("bad_op")
            return
        for update in updates:
            try:
                self._apply_one(update)
            except Exception:  # never let a sender's bug crash the metrics actor
                self._drop("bad_value")

    def _apply_one(self, update: Any) -> None:
        if not isinstance(update, (tuple, list)) or len(update) != 4:
            self._drop("bad_op")
            return
        op, name, labels, value = update
        spec = METRIC_SPECS.get(name) if isinstance(name, str) else None
        if spec is None or name == "pairlane_metrics_dropped_total":
            self._drop("unknown_name")
            return
        kind, _, label_names, _ = spec
        if op not in _OPS_BY_TYPE[kind]:
            self._drop("bad_op")
            return
        num = _number(value)
        if num is None or (kind == "counter" and num < 0):
            self._drop("bad_value")
            return
        metric = self._metrics[name]
        if label_names:
            if not isinstance(labels, dict) or set(labels) != set(label_names):
                self._drop("bad_labels")
                return
            values = tuple(str(labels[k]) for k in label_names)
            with self._lock:
                known = self._series[name]
                if values not in known:
                    if len(known) >= MAX_SERIES_PER_METRIC:
                        self._drop("too_many_series")
                        return
                    known.add(values)
            target = metric.labels(*values)
        else:
            if labels not in (None, {}):
                self._drop("bad_labels")
                return
            target = metric
        if op == "inc":
            target.inc(num)
        elif op == "set":
            target.set(num)
        else:
            target.observe(num)

    def _drop(self, reason: str) -> None:
        self._metrics["pairlane_metrics_dropped_total"].labels(reason=reason).inc()

    def render(self) -> bytes:
        """Prometheus text exposition (format 0.0.4) of every metric."""
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, Any]:
        """The figures of ``render()`` as a plain, msgpack-able map keyed by metric name.

        Shape:
        - counter or gauge without labels: ``name -> float``
          (counters keep their ``_total`` name);
        - with labels: ``name -> {"label=value": float}``; several labels are
          joined with "," in declaration order (``"a=x,b=y"``); ``{}`` when no
          series exists yet;
        - histogram without labels: ``name -> {"count": float, "sum": float}``;
          with labels: ``name -> {"label=value": {"count": ..., "sum": ...}}``.
        Buckets and ``_created`` timestamps are left out.
        """
        out: dict[str, Any] = {}
        for name, (kind, _, label_names, _) in METRIC_SPECS.items():
            out[name] = {} if (label_names or kind == "histogram") else 0.0
            for family in self._metrics[name].collect():
                for s in family.samples:
                    key = ",".join(f"{k}={s.labels[k]}" for k in label_names)
                    if kind == "histogram":
                        if s.name == name + "_count":
                            field = "count"
                        elif s.name == name + "_sum":
                            field = "sum"
                        else:
                            continue
                        slot = out[name].setdefault(key, {"count": 0.0, "sum": 0.0}) if label_names else out[name]
                        slot[field] = float(s.value)
                    else:
                        if s.name != name:      # skip *_created
                            continue
                        if label_names:
                            out[name][key] = float(s.value)
                        else:
                            out[name] = float(s.value)
            if kind == "histogram" and not label_names:
                out[name].setdefault("count", 0.0)
                out[name].setdefault("sum", 0.0)
        return out

    def track_db_files(self, db_path: str, now: float) -> None:
        """Sample the sizes of ``db_path`` and ``db_path-wal`` (a missing file is 0).

        Sets ``pairlane_db_bytes{file=main|wal}`` and
        ``pairlane_db_growth_bytes_per_second`` = change of main+wal divided by
        the seconds since the previous call (0 on the first call or when the
        clock did not advance; negative after a WAL checkpoint truncates).
        An unreadable file (other than missing) skips this sample.
        """
        sizes = []
        for p in (db_path, db_path + "-wal"):
            try:
                sizes.append(os.stat(p).st_size)
            except (FileNotFoundError, NotADirectoryError):
                sizes.append(0)
            except OSError as exc:
                log.warning("event=db_stat_failed path=%s error=%r", p, exc)
                return
        main, wal = sizes
        db = self._metrics["pairlane_db_bytes"]
        db.labels(file="main").set(main)
        db.labels(file="wal").set(wal)
        total = main + wal
        growth = 0.0
        if self._db_prev is not None:
            prev_now, prev_total = self._db_prev
            if now > prev_now:
                growth = (total - prev_total) / (now - prev_now)
            elif now == prev_now:
                return   # same instant: keep the previous rate and baseline
        self._metrics["pairlane_db_growth_bytes_per_second"].set(growth)
        self._db_prev = (float(now), total)


# --------------------------------------------------------------------- HTTP


class _Handler(http.server.BaseHTTPRequestHandler):
    metrics: Metrics            # set on the per-server subclass
    timeout = 10                # seconds a client may take to send its request
    server_version = "pairlane"

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        if self.path.split("?", 1)[0] != "/metrics":
            self._send(404, b"not found: try /metrics\n", "text/plain; charset=utf-8")
            return
        try:
            body = self.metrics.render()
        except Exception as exc:  # pragma: no cover - render does not fail in practice
            log.exception("event=metrics_render_failed")
            self._send(500, f"render failed: {exc}\n".encode(), "text/plain; charset=utf-8")
            return
        self._send(200, body, CONTENT_TYPE)

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # quiet: no stderr per scrape
        log.debug("event=metrics_http client=%s %s", self.client_address[0], format % args)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True   # TIME_WAIT only; a live listener still gives EADDRINUSE

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup
        # that can stall for seconds; the name is unused here.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]


class MetricsServer:
    """Handle of a running ``/metrics`` server: ``host``, ``port`` (the bound one),
    ``close()`` (stops serving, closes the socket, joins the thread; idempotent)."""

    def __init__(self, server: _Server, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.host: str = server.server_address[0]
        self.port: int = server.server_address[1]
        self._closed = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "MetricsServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def serve(metrics: Metrics, host: str, port: int) -> MetricsServer:
    """Serve ``GET /metrics`` (``metrics.render()``) on exactly ``host:port`` from a
    background daemon thread; any other path answers 404. ``port`` 0 picks a
    free port (see the handle's ``.port``). Raises OSError when the address is
    busy or not local.
    """
    handler = type("MetricsHandler", (_Handler,), {"metrics": metrics})
    server_cls = type("MetricsHTTPServer", (_Server,),
                      {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
    server = server_cls((host, port), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name=f"metrics-http-{server.server_address[1]}", daemon=True)
    thread.start()
    return MetricsServer(server, thread)


# ------------------------------------------------------------------- batches


_LabelKey = tuple[tuple[str, str], ...]


class MetricBatch:
    """Updates collected in a sending actor and flushed to the metrics actor.

    Repeated ``inc`` of one (name, labels) are merged; a ``set`` replaces the
    pending value (and any pending ``inc``) of that series, a later ``inc``
    adds to the pending ``set``; observations are kept in order. Label values
    are converted to str.
    """

    def __init__(self) -> None:
        self._incs: dict[tuple[str, _LabelKey], float] = {}
        self._sets: dict[tuple[str, _LabelKey], float] = {}
        self._observes: list[tuple[str, dict[str, str] | None, float]] = []

    @staticmethod
    def _key(name: str, labels: dict[str, Any]) -> tuple[str, _LabelKey]:
        return name, tuple(sorted((k, str(v)) for k, v in labels.items()))

    def inc(self, name: str, amount: float = 1.0, **labels: Any) -> None:
        key = self._key(name, labels)
        if key in self._sets:
            self._sets[key] += amount
        else:
            self._incs[key] = self._incs.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: Any) -> None:
        key = self._key(name, labels)
        self._incs.pop(key, None)
        self._sets[key] = value

    def observe(self, name: str, value: float, **labels: Any) -> None:
        self._observes.append((name, {k: str(v) for k, v in labels.items()} or None, value))

    def drain(self) -> list[tuple]:
        """Return the pending updates as ``Metrics.apply`` tuples and clear them:
        sets, then incs, then observations."""
        out: list[tuple] = []
        for (name, lk), v in self._sets.items():
            out.append(("set", name, dict(lk) or None, v))
        for (name, lk), v in self._incs.items():
            out.append(("inc", name, dict(lk) or None, v))
        for name, labels, v in self._observes:
            out.append(("observe", name, labels, v))
        self._incs, self._sets, self._observes = {}, {}, []
        return out

    def __len__(self) -> int:
        return len(self._incs) + len(self._sets) + len(self._observes)
