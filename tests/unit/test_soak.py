"""pairlane.soak: slopes, the second-half window, verdicts and rendering, on made-up samples."""
from __future__ import annotations

import csv
import io

import pytest

from pairlane import soak
from pairlane.soak import FAIL, INFO, OK, Sample, Thresholds


def series(process: str, metric: str, values, pid=100, step_s=60.0, t0=0.0) -> list[Sample]:
    return [Sample(t0 + i * step_s, process, pid, metric, float(v)) for i, v in enumerate(values)]


def row(rows, process, metric):
    (r,) = [r for r in rows if r.process == process and r.metric == metric]
    return r


def test_slope_per_hour_of_a_line_is_exact():
    pts = [(t, 10.0 + 0.5 * t / 60.0) for t in range(0, 3600, 60)]  # +0.5 a minute = +30 an hour
    assert soak.slope_per_hour(pts) == pytest.approx(30.0)
    assert soak.slope_per_hour([(0, 5.0), (1800, 5.0)]) == 0.0


def test_slope_needs_two_points_spread_in_time():
    assert soak.slope_per_hour([]) is None
    assert soak.slope_per_hour([(10.0, 1.0)]) is None
    assert soak.slope_per_hour([(10.0, 1.0), (10.0, 2.0)]) is None


def test_slope_ignores_noise_around_a_flat_line():
    noise = [0.3, -0.2, 0.1, -0.3, 0.2, -0.1] * 5
    pts = [(i * 60.0, 40.0 + n) for i, n in enumerate(noise)]
    assert abs(soak.slope_per_hour(pts)) < 1.0


def test_rss_growing_in_the_second_half_fails_and_flat_passes():
    # 60 minutes: the leaky one is flat in the first half then grows 2 MiB/hour
    leak = [40.0] * 30 + [40.0 + 2.0 * i / 60.0 for i in range(30)]
    flat = [40.0 + 5.0 * (i < 30) for i in range(60)]  # warm-up drop in the first half is not judged
    rows = soak.judge(series("writer", "rss_mib", leak) + series("gateway", "rss_mib", flat), end_s=3540)
    assert row(rows, "writer", "rss_mib").verdict == FAIL
    assert row(rows, "writer", "rss_mib").slope_per_hour == pytest.approx(2.0, rel=0.05)
    assert row(rows, "gateway", "rss_mib").verdict == OK
    assert not soak.passed(rows)


def test_threshold_is_strict_and_configurable():
    just = [40.0 + 1.01 * i / 60.0 for i in range(60)]  # just over 1 MiB/hour
    rows = soak.judge(series("w", "rss_mib", just), end_s=3540)
    assert row(rows, "w", "rss_mib").verdict == FAIL
    rows = soak.judge(series("w", "rss_mib", just), end_s=3540, thresholds=Thresholds(rss_mib_per_hour=1.5))
    assert row(rows, "w", "rss_mib").verdict == OK


def test_fds_and_threads_must_be_flat():
    fd_leak = [30] * 30 + [30 + i // 5 for i in range(30)]     # one fd more every 5 minutes
    fd_blip = [30] * 40 + [33] + [30] * 19                     # one sample caught a connection in flight
    thread_leak = [3] * 45 + [4] * 15
    rows = soak.judge(series("a", "fds", fd_leak) + series("b", "fds", fd_blip) +
                      series("c", "threads", thread_leak), end_s=3540)
    assert row(rows, "a", "fds").verdict == FAIL
    assert row(rows, "b", "fds").verdict == OK
    assert row(rows, "c", "threads").verdict == FAIL


def test_a_restarted_process_is_judged_from_its_new_incarnation():
    # pid 1 grew steeply, was restarted at minute 40 as pid 2, which is flat
    s = series("writer", "rss_mib", [40.0 + i for i in range(40)], pid=1) + \
        series("writer", "rss_mib", [35.0] * 20, pid=2, t0=40 * 60.0)
    rows = soak.judge(s, end_s=3540)
    r = row(rows, "writer", "rss_mib")
    assert r.verdict == OK and r.restarted and r.points == 20
    # without the restart the same values fail
    rows = soak.judge(series("writer", "rss_mib", [40.0 + i for i in range(60)]), end_s=3540)
    assert row(rows, "writer", "rss_mib").verdict == FAIL


def test_spool_is_judged_on_its_final_value_and_db_only_reported():
    s = series(soak.GLOBAL, "spool_files", [0, 3, 1, 0]) + series(soak.GLOBAL, "db_bytes", [1e6, 2e6, 3e6, 4e6])
    rows = soak.judge(s, end_s=180, final={"spool_files": 0})
    assert row(rows, soak.GLOBAL, "spool_files").verdict == OK
    assert row(rows, soak.GLOBAL, "db_bytes").verdict == INFO
    rows = soak.judge(s, end_s=180, final={"spool_files": 2})
    assert row(rows, soak.GLOBAL, "spool_files").verdict == FAIL
    assert "2 left" in row(rows, soak.GLOBAL, "spool_files").reason


def test_too_few_points_is_info_not_a_pass_or_fail():
    rows = soak.judge([Sample(100.0, "x", 1, "rss_mib", 5.0)], end_s=100)
    assert row(rows, "x", "rss_mib").verdict == INFO


def test_process_names_from_titles():
    assert soak.process_name("pairlane: writer\0\0", 5, 1) == "writer"
    assert soak.process_name("python run.py --config x", 1, 1) == "main"
    assert soak.process_name("MultiProcAdmin ActorAddr-(T|:1)", 7, 1) == "thespian-admin"
    assert soak.process_name("logger ActorAddr-(T|:2)", 8, 1) == "thespian-logger"
    assert soak.process_name("something else", 9, 1) == "pid-9"


def test_table_and_csv_carry_every_series():
    s = series("writer", "rss_mib", [40, 41, 42, 43]) + series("writer", "fds", [30, 30, 30, 30])
    rows = soak.judge(s, end_s=180)
    text = soak.table(rows)
    assert "writer" in text and "FAIL" in text and "rss_mib" in text and "fds" in text
    md = soak.markdown_table(rows)
    assert md.count("\n") == 3 and md.startswith("| process")
    parsed = list(csv.DictReader(io.StringIO(soak.samples_csv(s))))
    assert len(parsed) == 8
    assert {r["metric"] for r in parsed} == {"rss_mib", "fds"}
    assert float(parsed[-1]["t_s"]) == 180.0


def test_csv_rounds_append_without_repeating_the_header():
    a = series("writer", "fds", [30, 31])
    text = soak.samples_csv(a[:1]) + soak.samples_csv(a[1:], header=False)
    assert text == soak.samples_csv(a)
    assert soak.samples_csv([]).strip() == "t_s,process,pid,metric,value"


def test_compact_table_has_one_row_per_process_and_names_what_failed():
    s = (series("writer", "rss_mib", [40.0 + i for i in range(10)]) + series("writer", "fds", [30] * 10)
         + series("writer", "threads", [1] * 10) + series("gateway", "rss_mib", [42.0] * 10)
         + series("gateway", "fds", [40] * 10) + series("gateway", "threads", [3] * 10)
         + series(soak.GLOBAL, "spool_files", [0] * 10))
    md = soak.compact_markdown(soak.judge(s, end_s=540, final={"spool_files": 0}))
    lines = md.splitlines()
    assert len(lines) == 2 + 2 + 1
    (w,) = [ln for ln in lines if ln.startswith("| writer")]
    (g,) = [ln for ln in lines if ln.startswith("| gateway")]
    assert "FAIL: rss_mib" in w and "| 45 -> 49 | +60.00 (+60.00) |" in w  # +1 MiB a minute, 2nd half
    assert g.endswith("| ok |") and "| 42 -> 42 | +0.00 (+0.00) |" in g
    assert any(ln.startswith("| (spool_files)") and "ok" in ln for ln in lines)


def test_rss_is_judged_on_its_floor_so_transient_buffers_do_not_fail_it():
    # flat at 40 MiB, but samples late in the run catch a 2 MiB buffer being decoded now and then
    spiky = [40.0 + (2.0 if i >= 45 and i % 3 == 0 else 0.0) for i in range(60)]
    rows = soak.judge(series("gateway", "rss_mib", spiky), end_s=3540)
    r = row(rows, "gateway", "rss_mib")
    assert r.slope_per_hour >= 1.0            # the least-squares slope of every point says "leak"
    assert r.floor_slope_per_hour == pytest.approx(0.0) and r.verdict == OK
    # a real leak raises the floor too
    leak = [v + 2.0 * i / 60.0 for i, v in enumerate(spiky)]
    r = row(soak.judge(series("gateway", "rss_mib", leak), end_s=3540), "gateway", "rss_mib")
    assert r.floor_slope_per_hour == pytest.approx(2.0, rel=0.1) and r.verdict == FAIL


def test_floor_points_take_the_lowest_point_of_each_window():
    pts = [(float(t), v) for t, v in enumerate([5, 1, 7, 2, 9, 3, 8, 4, 6, 0, 5, 5])]
    assert soak.floor_points(pts, windows=3) == [(1.0, 1), (5.0, 3), (9.0, 0)]
    assert soak.floor_points(pts[:3]) == pts[:3]


def test_csv_keeps_every_digit_of_byte_counts():
    text = soak.samples_csv([Sample(0.0, soak.GLOBAL, 0, "db_bytes", 2351483600.0)])
    assert text.splitlines()[1].endswith(",2351483600")
