"""Unit tests of the metrics registry, its HTTP endpoint and MetricBatch (pairlane.metrics)."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import msgpack
import pytest

from pairlane.metrics import METRIC_SPECS, MetricBatch, Metrics, ProcessStat, read_process, serve

REQUIRED = [
    "pairlane_ingest_bytes_total", "pairlane_ingest_messages_total", "pairlane_results_total",
    "pairlane_result_receive_seconds", "pairlane_chunk_assembly_seconds",
    "pairlane_sqlite_write_seconds", "pairlane_sqlite_rows_written_total", "pairlane_dlq_items",
    "pairlane_dlq_oldest_item_age_seconds", "pairlane_actor_restarts_total",
    "pairlane_pair_evaluations_total", "pairlane_pair_missing_ratio",
    "pairlane_pair_evaluation_seconds", "pairlane_pair_slots_filled", "pairlane_pair_safe_stop",
    "pairlane_db_bytes", "pairlane_db_growth_bytes_per_second",
    "pairlane_last_result_timestamp_seconds", "pairlane_legacy_truncated_total",
    "pairlane_errors_total", "pairlane_legacy_results_total", "pairlane_dlq_parked_items",
    "pairlane_dlq_purged_total", "pairlane_alerts_raised_total", "pairlane_metrics_dropped_total",
]
TYPES = {
    "pairlane_ingest_bytes_total": "counter", "pairlane_ingest_messages_total": "counter",
    "pairlane_results_total": "counter", "pairlane_result_receive_seconds": "histogram",
    "pairlane_chunk_assembly_seconds": "histogram", "pairlane_sqlite_write_seconds": "histogram",
    "pairlane_sqlite_rows_written_total": "counter", "pairlane_dlq_items": "gauge",
    "pairlane_dlq_oldest_item_age_seconds": "gauge", "pairlane_actor_restarts_total": "counter",
    "pairlane_pair_evaluations_total": "counter", "pairlane_pair_missing_ratio": "gauge",
    "pairlane_pair_evaluation_seconds": "histogram", "pairlane_pair_slots_filled": "gauge",
    "pairlane_pair_safe_stop": "gauge", "pairlane_db_bytes": "gauge",
    "pairlane_db_growth_bytes_per_second": "gauge", "pairlane_last_result_timestamp_seconds": "gauge",
    "pairlane_legacy_truncated_total": "counter",
}


def _lines(m: Metrics) -> list[str]:
    return m.render().decode().splitlines()


def _value(m: Metrics, sample: str) -> float:
    for line in _lines(m):
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{sample} not in render output")


@pytest.mark.parametrize("name", REQUIRED)
def test_every_contract_name_is_exposed_with_its_type(name):
    text = Metrics().render().decode()
    assert f"# TYPE {name} " in text
    if name in TYPES:
        assert f"# TYPE {name} {TYPES[name]}\n" in text


def test_unlabelled_metrics_have_a_sample_from_the_start():
    m = Metrics()
    assert _value(m, "pairlane_ingest_bytes_total") == 0.0
    assert _value(m, "pairlane_dlq_items") == 0.0
    assert _value(m, "pairlane_sqlite_write_seconds_count") == 0.0
    assert _value(m, 'pairlane_db_bytes{file="main"}') == 0.0
    assert _value(m, 'pairlane_db_bytes{file="wal"}') == 0.0
    assert _value(m, 'pairlane_actor_restarts_total{actor="writer"}') == 0.0


def test_two_instances_do_not_share_a_registry():
    a, b = Metrics(), Metrics()
    a.apply([("inc", "pairlane_ingest_bytes_total", None, 5)])
    assert _value(b, "pairlane_ingest_bytes_total") == 0.0


def test_apply_inc_set_observe_shows_in_render_and_snapshot():
    m = Metrics()
    m.apply([
        ("inc", "pairlane_ingest_bytes_total", None, 123),
        ("inc", "pairlane_ingest_messages_total", {"type": "begin"}, 2),
        ("inc", "pairlane_results_total", {"outcome": "stored"}, 1.0),
        ("set", "pairlane_dlq_items", None, 7),
        ("inc", "pairlane_dlq_items", {}, 1),
        ("observe", "pairlane_sqlite_write_seconds", None, 0.25),
        ("observe", "pairlane_sqlite_write_seconds", None, 0.75),
        ("set", "pairlane_pair_safe_stop", None, 1),
    ])
    assert _value(m, "pairlane_ingest_bytes_total") == 123.0
    assert _value(m, 'pairlane_ingest_messages_total{type="begin"}') == 2.0
    assert _value(m, 'pairlane_results_total{outcome="stored"}') == 1.0
    assert _value(m, "pairlane_dlq_items") == 8.0
    assert _value(m, "pairlane_sqlite_write_seconds_count") == 2.0
    assert _value(m, "pairlane_sqlite_write_seconds_sum") == 1.0
    assert _value(m, 'pairlane_sqlite_write_seconds_bucket{le="0.5"}') == 1.0

    snap = m.snapshot()
    assert snap["pairlane_ingest_bytes_total"] == 123.0
    assert snap["pairlane_ingest_messages_total"]["type=begin"] == 2.0
    assert snap["pairlane_ingest_messages_total"]["type=chunk"] == 0.0
    # every outcome known at start exists at 0 (issue 15); "stored" is a label no sender uses
    assert snap["pairlane_results_total"] == {"outcome=stored": 1.0, "outcome=stored_db": 0.0,
                                              "outcome=stored_dlq": 0.0, "outcome=failed": 0.0,
                                              "outcome=aborted": 0.0, "outcome=abandoned": 0.0}
    assert snap["pairlane_pair_evaluations_total"] == {"outcome=ok": 0.0, "outcome=safe_stop": 0.0,
                                                       "outcome=error": 0.0}
    assert snap["pairlane_dlq_items"] == 8.0
    assert snap["pairlane_pair_safe_stop"] == 1.0
    assert snap["pairlane_sqlite_write_seconds"] == {"count": 2.0, "sum": 1.0}
    assert snap["pairlane_pair_evaluation_seconds"] == {"count": 0.0, "sum": 0.0}
    assert snap["pairlane_db_bytes"] == {"file=main": 0.0, "file=wal": 0.0}
    assert set(snap) == set(METRIC_SPECS)
    assert not any(k.endswith("_created") for k in snap)
    msgpack.packb(snap)  # plain enough for the admin reply


@pytest.mark.parametrize("update, reason", [
    (("inc", "pairlane_no_such_metric", None, 1), "unknown_name"),
    (("inc", 42, None, 1), "unknown_name"),
    (("inc", "pairlane_metrics_dropped_total", {"reason": "bad_op"}, 1), "unknown_name"),
    (("set", "pairlane_ingest_bytes_total", None, 1), "bad_op"),          # set on a counter
    (("observe", "pairlane_dlq_items", None, 1), "bad_op"),               # observe on a gauge
    (("frobnicate", "pairlane_dlq_items", None, 1), "bad_op"),
    (("inc", "pairlane_dlq_items"), "bad_op"),                            # wrong arity
    ("not a tuple", "bad_op"),
    (None, "bad_op"),
    (("inc", "pairlane_ingest_messages_total", None, 1), "bad_labels"),   # labels missing
    (("inc", "pairlane_ingest_messages_total", {"kind": "x"}, 1), "bad_labels"),
    (("inc", "pairlane_ingest_messages_total", {"type": "x", "extra": "y"}, 1), "bad_labels"),
    (("inc", "pairlane_ingest_bytes_total", {"type": "x"}, 1), "bad_labels"),
    (("inc", "pairlane_ingest_bytes_total", None, -1), "bad_value"),      # counters only go up
    (("inc", "pairlane_ingest_bytes_total", None, "1"), "bad_value"),
    (("inc", "pairlane_ingest_bytes_total", None, True), "bad_value"),
    (("set", "pairlane_dlq_items", None, float("nan")), "bad_value"),
    (("observe", "pairlane_sqlite_write_seconds", None, float("inf")), "bad_value"),
])
def test_bad_updates_are_ignored_and_counted_never_raise(update, reason):
    m = Metrics()
    before = m.render()
    m.apply([update, ("inc", "pairlane_ingest_bytes_total", None, 1)])
    assert m.snapshot()["pairlane_metrics_dropped_total"][f"reason={reason}"] == 1.0
    assert m.snapshot()["pairlane_ingest_bytes_total"] == 1.0   # the good one still applied
    assert before != m.render()


def test_apply_of_a_non_iterable_does_not_raise():
    m = Metrics()
    m.apply(None)  # type: ignore[arg-type]
    m.apply(5)     # type: ignore[arg-type]
    assert m.snapshot()["pairlane_metrics_dropped_total"]["reason=bad_op"] == 2.0


def test_label_values_are_capped_per_metric():
    from pairlane.metrics import MAX_SERIES_PER_METRIC
    m = Metrics()
    preset = len(m.snapshot()["pairlane_errors_total"])   # the error codes created at 0 (issue 15)
    assert preset == 8
    m.apply([("inc", "pairlane_errors_total", {"code": f"c{i}"}, 1)
             for i in range(MAX_SERIES_PER_METRIC + 10)])
    snap = m.snapshot()
    assert len(snap["pairlane_errors_total"]) == MAX_SERIES_PER_METRIC
    assert snap["pairlane_metrics_dropped_total"]["reason=too_many_series"] == 10.0 + preset


def test_label_values_are_escaped_in_exposition():
    m = Metrics()
    m.apply([("inc", "pairlane_errors_total", {"code": 'we"ird\nx'}, 1)])
    assert 'pairlane_errors_total{code="we\\"ird\\nx"} 1.0' in m.render().decode()


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def test_serve_answers_metrics_404s_elsewhere_and_close_frees_the_port():
    m = Metrics()
    m.apply([("inc", "pairlane_ingest_bytes_total", None, 42)])
    handle = serve(m, "127.0.0.1", 0)
    try:
        assert handle.port > 0 and handle.host == "127.0.0.1"
        base = f"http://127.0.0.1:{handle.port}"
        status, ctype, body = _get(base + "/metrics")
        assert status == 200
        assert ctype.startswith("text/plain; version=0.0.4")
        assert b"pairlane_ingest_bytes_total 42.0" in body
        assert _get(base + "/metrics?x=1")[0] == 200
        assert _get(base + "/")[0] == 404
        assert _get(base + "/metricsx")[0] == 404
    finally:
        handle.close()
    handle.close()  # idempotent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{handle.port}/metrics", timeout=2)
    # The port is free again: a restarted metrics actor can bind it (SO_REUSEADDR,
    # as any server uses, since served connections leave TIME_WAIT entries).
    again = serve(m, "127.0.0.1", handle.port)
    try:
        assert _get(f"http://127.0.0.1:{again.port}/metrics")[0] == 200
    finally:
        again.close()
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", handle.port))
        s.listen()
    finally:
        s.close()


def test_serve_binds_exactly_the_given_host():
    handle = serve(Metrics(), "127.0.0.1", 0)
    try:
        assert handle._server.socket.getsockname()[0] == "127.0.0.1"
    finally:
        handle.close()


def test_serve_on_a_busy_port_raises_oserror():
    handle = serve(Metrics(), "127.0.0.1", 0)
    try:
        with pytest.raises(OSError):
            serve(Metrics(), "127.0.0.1", handle.port)
    finally:
        handle.close()


def test_track_db_files_sizes_and_growth(tmp_path):
    m = Metrics()
    db = tmp_path / "p.db"
    m.track_db_files(str(db), now=100.0)               # nothing exists yet
    s = m.snapshot()
    assert s["pairlane_db_bytes"] == {"file=main": 0.0, "file=wal": 0.0}
    assert s["pairlane_db_growth_bytes_per_second"] == 0.0

    db.write_bytes(b"x" * 1000)
    (tmp_path / "p.db-wal").write_bytes(b"w" * 500)
    m.track_db_files(str(db), now=110.0)
    s = m.snapshot()
    assert s["pairlane_db_bytes"] == {"file=main": 1000.0, "file=wal": 500.0}
    assert s["pairlane_db_growth_bytes_per_second"] == pytest.approx(150.0)

    (tmp_path / "p.db-wal").unlink()                   # checkpoint: the WAL goes away
    m.track_db_files(str(db), now=115.0)
    s = m.snapshot()
    assert s["pairlane_db_bytes"]["file=wal"] == 0.0
    assert s["pairlane_db_growth_bytes_per_second"] == pytest.approx(-100.0)
    assert _value(m, 'pairlane_db_bytes{file="main"}') == 1000.0


def test_track_db_files_first_call_with_existing_file_reports_zero_growth(tmp_path):
    db = tmp_path / "p.db"
    db.write_bytes(b"x" * 4096)
    m = Metrics()
    m.track_db_files(str(db), now=1.0)
    assert m.snapshot()["pairlane_db_growth_bytes_per_second"] == 0.0
    assert m.snapshot()["pairlane_db_bytes"]["file=main"] == 4096.0


def test_metric_batch_merges_incs_and_drains():
    b = MetricBatch()
    b.inc("pairlane_ingest_bytes_total", 100)
    b.inc("pairlane_ingest_bytes_total", 50)
    b.inc("pairlane_ingest_messages_total", type="chunk")
    b.inc("pairlane_ingest_messages_total", type="chunk")
    b.inc("pairlane_ingest_messages_total", type="begin")
    b.observe("pairlane_sqlite_write_seconds", 0.1)
    b.observe("pairlane_sqlite_write_seconds", 0.2)
    b.set("pairlane_dlq_items", 3)
    b.set("pairlane_dlq_items", 4)
    assert len(b) == 6
    batch = b.drain()
    assert len(b) == 0 and b.drain() == []
    assert ("inc", "pairlane_ingest_bytes_total", None, 150.0) in batch
    assert ("inc", "pairlane_ingest_messages_total", {"type": "chunk"}, 2.0) in batch
    assert ("inc", "pairlane_ingest_messages_total", {"type": "begin"}, 1.0) in batch
    assert ("set", "pairlane_dlq_items", None, 4) in batch
    assert [u for u in batch if u[0] == "observe"] == [
        ("observe", "pairlane_sqlite_write_seconds", None, 0.1),
        ("observe", "pairlane_sqlite_write_seconds", None, 0.2)]
    assert len(batch) == 6

    m = Metrics()
    m.apply(batch)
    s = m.snapshot()
    assert s["pairlane_ingest_bytes_total"] == 150.0
    assert s["pairlane_ingest_messages_total"]["type=chunk"] == 2.0
    assert s["pairlane_dlq_items"] == 4.0
    assert s["pairlane_sqlite_write_seconds"]["count"] == 2.0
    assert s["pairlane_metrics_dropped_total"]["reason=bad_op"] == 0.0


def test_metric_batch_set_then_inc_on_a_gauge_keeps_order_semantics():
    b = MetricBatch()
    b.inc("pairlane_dlq_items", 5)
    b.set("pairlane_dlq_items", 10)      # overrides the earlier inc
    b.inc("pairlane_dlq_items", 2)       # applies on top of the set
    assert b.drain() == [("set", "pairlane_dlq_items", None, 12)]


def test_metric_batch_label_order_and_types_do_not_split_series():
    b = MetricBatch()
    b.inc("pairlane_actor_restarts_total", actor="writer")
    b.inc("pairlane_errors_total", code=404)
    b.inc("pairlane_errors_total", code="404")
    batch = b.drain()
    assert ("inc", "pairlane_errors_total", {"code": "404"}, 2.0) in batch
    assert len(batch) == 2


# ----------------------------------------------------------------- issue 15: zeros, new gauges, /proc
ZERO_SERIES = [
    'pairlane_results_total{outcome="stored_db"}', 'pairlane_results_total{outcome="stored_dlq"}',
    'pairlane_results_total{outcome="failed"}', 'pairlane_results_total{outcome="aborted"}',
    'pairlane_results_total{outcome="abandoned"}', 'pairlane_ingest_messages_total{type="live_trades"}',
    'pairlane_errors_total{code="malformed"}', 'pairlane_errors_total{code="busy"}',
    'pairlane_pair_evaluations_total{outcome="ok"}', 'pairlane_pair_evaluations_total{outcome="safe_stop"}',
    'pairlane_pair_evaluations_total{outcome="error"}', 'pairlane_alerts_raised_total{name="pair_safe_stop"}',
    'pairlane_alerts_raised_total{name="disk_low"}', 'pairlane_legacy_results_total{outcome="stored"}',
    'pairlane_legacy_results_total{outcome="rejected_malformed"}', 'pairlane_dlq_replayed_total{outcome="landed"}',
    'pairlane_actor_restarts_total{actor="store"}', 'pairlane_actor_restarts_total{actor="root"}',
    'pairlane_auth_failures_total{endpoint="gateway",reason="unknown_key"}',
    'pairlane_alert_active{name="ingest_stalled"}', 'pairlane_actor_up{actor="writer"}',
]


@pytest.mark.parametrize("sample", ZERO_SERIES)
def test_every_known_series_exists_at_zero_from_the_start(sample):
    assert _value(Metrics(), sample) == 0.0


def test_actor_series_follow_the_given_tree_and_build_info_carries_the_version():
    m = Metrics(actors=("root", "only"), version="9.9.9")
    text = m.render().decode()
    assert 'pairlane_actor_up{actor="only"} 0.0' in text
    assert 'pairlane_actor_restarts_total{actor="writer"}' not in text
    assert _value(m, 'pairlane_build_info{version="9.9.9"}') == 1.0
    assert _value(m, "pairlane_pairs_leader") == 0.0            # unknown until the pairs actor says
    assert _value(Metrics(pairs_leader=True), "pairlane_pairs_leader") == 1.0   # one daemon (SQLite)


def test_every_auth_failure_reason_zap_can_give_is_preset_for_its_endpoints():
    """The reasons are read from pairlane/zap.py's source, so a new one cannot miss its zero series."""
    import inspect
    import re

    from pairlane import zap
    from pairlane.metrics import AUTH_REASONS
    src = inspect.getsource(zap)
    zap_reasons = set(re.findall(r'_refuse\(rid, "(\w+)"', src)) | set(re.findall(r'Refusal\("(\w+)"', src))
    zap_reasons |= {zap.handshake_reason(zap._MECHANISM_MISMATCH), zap.handshake_reason(0)}
    assert {"unknown_key", "wrong_mechanism", "bad_handshake", "address_not_allowed", "malformed"} <= zap_reasons
    m = Metrics()
    for endpoint in ("gateway", "admin"):                       # CURVE: any reason of the ZAP or the monitor
        for reason in zap_reasons - {"address_not_allowed"}:
            assert reason in AUTH_REASONS[endpoint]
            assert _value(m, f'pairlane_auth_failures_total{{endpoint="{endpoint}",reason="{reason}"}}') == 0.0
    for reason in zap_reasons - {"unknown_key", "bad_handshake"}:   # the legacy allowlist: NULL, no monitor
        assert _value(m, f'pairlane_auth_failures_total{{endpoint="legacy",reason="{reason}"}}') == 0.0
    assert _value(m, 'pairlane_auth_failures_total{endpoint="admin",reason="bad_token"}') == 0.0


def test_senders_cannot_set_internal_metrics():
    m = Metrics()
    m.apply([("inc", "pairlane_process_cpu_seconds_total", {"actor": "x"}, 1)])
    assert m.snapshot()["pairlane_metrics_dropped_total"]["reason=unknown_name"] == 1.0
    assert m.snapshot()["pairlane_process_cpu_seconds_total"] == {}


def test_read_process_of_this_process_and_of_a_missing_pid(tmp_path):
    import os
    st = read_process(os.getpid())
    assert st is not None and st.rss_bytes > 1_000_000 and st.cpu_seconds > 0 and st.open_fds >= 3
    fake = tmp_path / "proc" / "42"
    (fake / "fd").mkdir(parents=True)
    for i in range(5):
        (fake / "fd" / str(i)).write_text("")
    (fake / "statm").write_text("1000 250 10 1 0 100 0\n")
    (fake / "stat").write_text("42 (a (weird) name) S 1 42 42 0 -1 4194560 10 0 0 0 300 200 0 0 20 0 1 0\n")
    st = read_process(42, proc=str(tmp_path / "proc"))
    import pairlane.metrics as pm
    assert st == (250 * pm._PAGE, 500 / pm._TICKS, 5)
    assert read_process(2 ** 30) is None


def test_set_processes_shows_and_drops_series():
    m = Metrics()
    m.set_processes({"writer": ProcessStat(1000, 2.5, 7), "dlq": ProcessStat(2000, 1.0, 9)})
    assert _value(m, 'pairlane_process_resident_memory_bytes{actor="writer"}') == 1000.0
    assert _value(m, 'pairlane_process_cpu_seconds_total{actor="writer"}') == 2.5
    assert _value(m, 'pairlane_process_open_fds{actor="dlq"}') == 9.0
    assert "# TYPE pairlane_process_cpu_seconds_total counter" in m.render().decode()
    m.set_processes({"writer": ProcessStat(1100, 3.0, 8)})
    text = m.render().decode()
    assert 'actor="dlq"' not in "\n".join(ln for ln in text.splitlines() if ln.startswith("pairlane_process"))
    snap = m.snapshot()
    assert snap["pairlane_process_cpu_seconds_total"] == {"actor=writer": 3.0}
    assert snap["pairlane_process_open_fds"] == {"actor=writer": 8.0}


def test_track_disk_exports_caps_and_free_space(tmp_path):
    m = Metrics()
    got = m.track_disk({"store": str(tmp_path), "spool": str(tmp_path / "not" / "yet")},
                       {"store": 5000, "spool": 0})
    assert set(got) == {"store", "spool"} and 0 < got["store"][0] <= got["store"][1]
    assert _value(m, 'pairlane_disk_cap_bytes{area="store"}') == 5000.0
    assert _value(m, 'pairlane_disk_cap_bytes{area="spool"}') == 0.0
    assert _value(m, 'pairlane_disk_free_bytes{area="spool"}') > 0
    assert _value(m, 'pairlane_disk_size_bytes{area="store"}') >= _value(m, 'pairlane_disk_free_bytes{area="store"}')


def test_served_by_prometheus_client_with_openmetrics_on_request():
    m = Metrics()
    handle = serve(m, "127.0.0.1", 0)
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{handle.port}/metrics",
                                     headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        with urllib.request.urlopen(req, timeout=5) as r:
            body = r.read().decode()
            assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        assert body.rstrip().endswith("# EOF")
    finally:
        handle.close()
