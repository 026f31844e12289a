"""Metrics registry of the metrics actor, its HTTP endpoint and the senders' batch helper.

Owns: every pairlane metric name, type, label set and histogram buckets (one
private ``prometheus_client.CollectorRegistry``; PROTOCOL.md section 6);
applying update batches sent by other actors; the Prometheus text exposition;
the plain-map snapshot for ``admin metrics``; the database file size and
growth gauges; the series created at zero at start (every label value known
in advance, so ``increase()`` sees the first increments); the per-process
figures read from ``/proc`` (``read_process``); the ``/metrics`` HTTP server
(prometheus_client's WSGI app and server); ``MetricBatch``, which actors use
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

import logging
import math
import os
import socket
import socketserver
import threading
from typing import Any, Iterable
from wsgiref.simple_server import make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, make_wsgi_app
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

from .vocab import AlertName

__all__ = ["ACTORS", "CONTENT_TYPE", "METRIC_SPECS", "Metrics", "MetricBatch", "MetricsServer", "ProcessStat",
           "build_version", "read_process", "serve"]

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
    "pairlane_alert_active": ("gauge", "1 while the alert is raised, else 0.", ("name",), None),
    "pairlane_metrics_dropped_total": ("counter", "Metric updates ignored, by reason.", ("reason",), None),
    "pairlane_auth_failures_total": ("counter", "Connections or requests refused by authentication, "
                                     "by endpoint and reason.", ("endpoint", "reason"), None),
    # state of the tree (from the root's status table)
    "pairlane_actor_up": ("gauge", "1 while the actor (or supervisor) is RUNNING, else 0.", ("actor",), None),
    "pairlane_pairs_leader": ("gauge", "1 while this daemon evaluates pairs (always 1 on a single daemon; "
                              "0 until known).", (), None),
    "pairlane_build_info": ("gauge", "Always 1; the label carries the pairlane version.", ("version",), None),
    # thresholds, caps and disk space, so alerting rules need no copy of the configuration
    "pairlane_ingest_stall_threshold_seconds": ("gauge", "alerts.ingest_stall_s: no new result for this "
                                                "long raises ingest_stalled.", (), None),
    "pairlane_disk_cap_bytes": ("gauge", "Configured size cap of the store or spool (0 = no cap).", ("area",), None),
    "pairlane_disk_free_bytes": ("gauge", "Free bytes on the filesystem holding the store or spool.", ("area",), None),
    "pairlane_disk_size_bytes": ("gauge", "Size in bytes of the filesystem holding the store or spool.", ("area",), None),
    # the actor processes (read from /proc by the pids of the status table)
    "pairlane_process_resident_memory_bytes": ("gauge", "Resident memory of the actor's process.", ("actor",), None),
    "pairlane_process_cpu_seconds_total": ("counter", "User and system CPU seconds of the actor's current "
                                           "process (restarts from 0 with a new process).", ("actor",), None),
    "pairlane_process_open_fds": ("gauge", "Open file descriptors of the actor's process.", ("actor",), None),
}

# Every actor and supervisor of the default tree (actors/tree.py); the metrics actor passes the real list.
ACTORS = ("root", "metrics", "store", "writer", "dlq", "ingest", "assembler", "gateway", "legacy", "pairs",
          "admin")
AREAS = ("store", "spool")
# Metrics set only by the metrics actor itself (never accepted from a sender's batch).
_INTERNAL = {"pairlane_metrics_dropped_total", "pairlane_process_cpu_seconds_total"}

# Label values created at zero at start, so rate(), increase() and absent() see every increment from
# the first scrape (a series born at 4 loses those 4). Actor names come from the tree (`Metrics(actors=)`).
_PRESET_LABELS: dict[str, tuple[str, ...]] = {
    "pairlane_ingest_messages_total": ("begin", "chunk", "end", "abort", "result", "live_trades", "legacy",
                                       "invalid"),
    "pairlane_results_total": ("stored_db", "stored_dlq", "failed", "aborted", "abandoned"),
    "pairlane_errors_total": ("too_large", "malformed", "unknown_request", "bad_chunk", "conflict",
                              "incomplete", "busy", "unavailable"),
    "pairlane_legacy_results_total": ("stored", "failed", "rejected_malformed", "rejected_no_request_id",
                                      "rejected_bad_trades", "rejected_conflict"),
    "pairlane_dlq_replayed_total": ("landed", "discarded", "failed"),
    "pairlane_pair_evaluations_total": ("ok", "safe_stop", "error"),
    "pairlane_alerts_raised_total": tuple(a.value for a in AlertName),
    "pairlane_alert_active": tuple(a.value for a in AlertName),
    "pairlane_db_bytes": ("main", "wal"),
    "pairlane_disk_cap_bytes": AREAS,
    "pairlane_disk_free_bytes": AREAS,
    "pairlane_disk_size_bytes": AREAS,
    "pairlane_metrics_dropped_total": ("unknown_name", "bad_op", "bad_labels", "bad_value", "too_many_series"),
}
# Every reason pairlane.zap can give, per endpoint: CURVE sockets (gateway, admin) refuse an unknown key
# or a malformed ZAP request (ZAP) and count failed handshakes (the socket monitor: a plaintext client,
# another server key); the legacy allowlist (ZAP, NULL mechanism) refuses by address or mechanism;
# the admin token is checked after CURVE.
AUTH_REASONS: dict[str, tuple[str, ...]] = {
    "gateway": ("unknown_key", "wrong_mechanism", "bad_handshake", "malformed"),
    "admin": ("unknown_key", "wrong_mechanism", "bad_handshake", "malformed", "bad_token"),
    "legacy": ("address_not_allowed", "wrong_mechanism", "malformed"),
}
_PRESET_PAIRS: dict[str, tuple[tuple[str, ...], ...]] = {
    "pairlane_auth_failures_total": tuple((e, r) for e, reasons in AUTH_REASONS.items() for r in reasons),
}
_PER_ACTOR = ("pairlane_actor_restarts_total", "pairlane_actor_up")


def build_version() -> str:
    """The installed pairlane version (package metadata), or "unknown" when not installed."""
    try:
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version("pairlane")
        except PackageNotFoundError:
            return "unknown"
    except Exception:  # pragma: no cover - importlib.metadata is in the standard library
        return "unknown"


class ProcessStat(tuple):
    """(rss_bytes, cpu_seconds, open_fds) of one process."""

    __slots__ = ()

    def __new__(cls, rss_bytes: int, cpu_seconds: float, open_fds: int) -> "ProcessStat":
        return super().__new__(cls, (rss_bytes, cpu_seconds, open_fds))

    rss_bytes = property(lambda self: self[0])
    cpu_seconds = property(lambda self: self[1])
    open_fds = property(lambda self: self[2])


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def read_process(pid: int, proc: str = "/proc") -> ProcessStat | None:
    """RSS, CPU seconds (user + system) and open fds of ``pid`` from ``/proc``; None when the
    process is gone or unreadable (never raises)."""
    try:
        with open(f"{proc}/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * _PAGE
        with open(f"{proc}/{pid}/stat") as f:
            stat = f.read()
        # fields after the parenthesised command name (which may hold spaces): utime is the 14th field
        rest = stat[stat.rindex(")") + 2:].split()
        cpu = (int(rest[11]) + int(rest[12])) / _TICKS
        fds = len(os.listdir(f"{proc}/{pid}/fd"))
    except (OSError, ValueError, IndexError):
        return None
    return ProcessStat(rss, cpu, fds)


class _SettableCounter:
    """A counter family whose values are set from outside (CPU seconds read from /proc): what
    prometheus_client's Counter cannot do. ``collect`` yields it like any collector."""

    def __init__(self, name: str, help_: str, label: str) -> None:
        self.name, self.help, self.label = name, help_, label
        self.values: dict[str, float] = {}

    def collect(self):
        fam = CounterMetricFamily(self.name[:-len("_total")], self.help, labels=[self.label])
        for v, x in sorted(self.values.items()):
            fam.add_metric([v], x)
        yield fam

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

    def __init__(self, actors: Iterable[str] = ACTORS, version: str | None = None,
                 pairs_leader: bool = False) -> None:
        """pairs_leader: this daemon is known to evaluate pairs from the start (one daemon: SQLite);
        else pairlane_pairs_leader is 0 until the pairs actor sets it (several daemons may share the
        store, and a follower must never show 1)."""
        self.registry = CollectorRegistry(auto_describe=True)
        self._metrics: dict[str, Any] = {}
        self._series: dict[str, set[tuple[str, ...]]] = {}
        self._lock = threading.Lock()
        self._db_prev: tuple[float, int] | None = None   # (now, main+wal) of the previous sample
        for name, (kind, help_, labels, buckets) in METRIC_SPECS.items():
            if name == "pairlane_process_cpu_seconds_total":
                m = _SettableCounter(name, help_, labels[0])
                self.registry.register(m)
            elif kind == "counter":
                m = Counter(name, help_, labels, registry=self.registry)
            elif kind == "gauge":
                m = Gauge(name, help_, labels, registry=self.registry)
            else:
                m = Histogram(name, help_, labels, registry=self.registry, buckets=buckets)
            self._metrics[name] = m
            self._series[name] = set()
        presets: dict[str, tuple[tuple[str, ...], ...]] = {n: tuple((v,) for v in vs)
                                                           for n, vs in _PRESET_LABELS.items()}
        presets.update(_PRESET_PAIRS)
        for name in _PER_ACTOR:
            presets[name] = tuple((a,) for a in actors)
        for name, values in presets.items():
            for v in values:
                self._metrics[name].labels(*v)
                self._series[name].add(tuple(v))
        self._metrics["pairlane_build_info"].labels(version or build_version()).set(1)
        self._metrics["pairlane_pairs_leader"].set(1 if pairs_leader else 0)

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
        if spec is None or name in _INTERNAL:
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

    def set_processes(self, stats: dict[str, ProcessStat]) -> None:
        """The figures of each actor's process (name -> ProcessStat); actors left out (not running,
        or unreadable) lose their series until they are back."""
        cpu: _SettableCounter = self._metrics["pairlane_process_cpu_seconds_total"]
        rss = self._metrics["pairlane_process_resident_memory_bytes"]
        fds = self._metrics["pairlane_process_open_fds"]
        with self._lock:
            for gone in set(cpu.values) - set(stats):
                for g in (rss, fds):
                    try:
                        g.remove(gone)
                    except KeyError:
                        pass
            cpu.values = {a: float(s.cpu_seconds) for a, s in stats.items()}
            for a, s in stats.items():
                rss.labels(a).set(s.rss_bytes)
                fds.labels(a).set(s.open_fds)

    def track_disk(self, paths: dict[str, str], caps: dict[str, int]) -> dict[str, tuple[int, int]]:
        """Free and total bytes of the filesystem holding each area's path (area -> path: "store"
        -> the database's directory, "spool" -> the spool directory) and the areas' caps;
        returns area -> (free, total) for the areas it could read."""
        out: dict[str, tuple[int, int]] = {}
        for area, cap in caps.items():
            self._metrics["pairlane_disk_cap_bytes"].labels(area).set(cap)
        for area, path in paths.items():
            try:
                du = _disk_usage(path)
            except OSError:
                continue
            self._metrics["pairlane_disk_free_bytes"].labels(area).set(du[0])
            self._metrics["pairlane_disk_size_bytes"].labels(area).set(du[1])
            out[area] = du
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


def _disk_usage(path: str) -> tuple[int, int]:
    """(free bytes for unprivileged users, total bytes) of the filesystem holding ``path``, or of
    its nearest existing ancestor (a spool directory not made yet lives on its parent's disk)."""
    p = os.path.abspath(path or ".")
    while True:
        try:
            st = os.statvfs(p)
            return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        except FileNotFoundError:
            parent = os.path.dirname(p)
            if parent == p:
                raise
            p = parent


def _only_metrics(app):
    """prometheus_client's app answers every path; ours answers /metrics (and 404 elsewhere)."""
    def wrapped(environ, start_response):
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found: try /metrics\n"]
        return app(environ, start_response)
    return wrapped


class _Server(ThreadingWSGIServer):
    """prometheus_client's threaded WSGI server, bound to exactly the given host (IPv4 or IPv6)."""

    allow_reuse_address = True   # TIME_WAIT only; a live listener still gives EADDRINUSE

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can stall for
        # seconds; the name is unused here.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]
        self.setup_environ()


class _Quiet(_SilentHandler):
    timeout = 10                # seconds a client may take to send its request


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
    """Serve ``GET /metrics`` (prometheus_client's WSGI app on ``metrics.registry``) on exactly
    ``host:port`` from a background daemon thread; any other path answers 404. ``port`` 0 picks
    a free port (see the handle's ``.port``). Raises OSError when the address is busy or not
    local.
    """
    server_cls = type("MetricsHTTPServer", (_Server,),
                      {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
    server = make_server(host, port, _only_metrics(make_wsgi_app(metrics.registry)), server_cls,
                         handler_class=_Quiet)
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

    def absorb(self, other: "MetricBatch") -> None:
        """Take other's pending updates as if they had been made here, after ours."""
        for op, name, labels, value in other.drain():
            getattr(self, op)(name, value, **(labels or {}))

    def __len__(self) -> int:
        return len(self._incs) + len(self._sets) + len(self._observes)
