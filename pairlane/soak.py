"""Soak analysis: from resource samples to a verdict on whether anything creeps.

Owns: naming a daemon process from its title (`pairlane: <actor>`), the least-squares slope
of a series per hour, the "second half of the run" window (restricted to the process
incarnation alive at its end, so an actor restarted by a fault starts a fresh series), the
verdict rules of issue 17 (RSS slope under 1 MiB/hour, fds and threads flat, spool empty at
the end, database size reported only), and rendering: the text table, the JSON rows and the
CSV of the samples.

Never does: read /proc, talk to the daemon, sleep or look at a clock. The entry layer
(`entry/soak.py`) samples and feeds the values in; everything here is a pure function of them.
"""
from __future__ import annotations

import csv
import io
import statistics
from dataclasses import asdict, dataclass

PROCESS_METRICS = ("rss_mib", "fds", "threads")
GLOBAL_METRICS = ("spool_files", "spool_bytes", "db_bytes")
GLOBAL = "-"  # the process column of a daemon-wide metric

OK, FAIL, INFO = "ok", "FAIL", "info"


def process_name(cmdline: str, pid: int, main_pid: int | None) -> str:
    """A stable name for one process of a daemon: the actor of a `pairlane: <actor>` title,
    `main` for the daemon's main process, `thespian-admin` / `thespian-logger` for Thespian's
    own processes, else `pid-<pid>`."""
    title = cmdline.replace("\0", " ").strip()
    if pid == main_pid:
        return "main"
    if title.startswith("pairlane: "):
        return title[len("pairlane: "):].split()[0] if title[len("pairlane: "):].split() else f"pid-{pid}"
    if title.startswith("MultiProcAdmin"):
        return "thespian-admin"
    if title.startswith("logger"):
        return "thespian-logger"
    return f"pid-{pid}"


@dataclass(frozen=True)
class Sample:
    """One value of one series at one time: t_s seconds since the run started; pid 0 and
    process GLOBAL for daemon-wide metrics."""

    t_s: float
    process: str
    pid: int
    metric: str
    value: float


@dataclass(frozen=True)
class Thresholds:
    """Issue 17's limits. `fds_tol`/`threads_tol`: how much the median of the last quarter of
    the window may exceed the median of its first quarter and still count as flat (a Thespian
    message opens a short-lived TCP connection, so an fd sample can catch one in flight)."""

    rss_mib_per_hour: float = 1.0
    fds_tol: float = 2.0
    threads_tol: float = 0.0


@dataclass
class SeriesVerdict:
    """One row of the table: a series over the judged window and what it says."""

    process: str
    metric: str
    points: int
    first: float | None
    last: float | None
    min: float | None
    max: float | None
    slope_per_hour: float | None
    growth: float | None
    verdict: str
    reason: str = ""
    restarted: bool = False
    floor_slope_per_hour: float | None = None   # rss_mib: the slope its verdict is on (see floor_points)

    def as_dict(self) -> dict:
        return asdict(self)


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (t_s, value) points, in value units per hour; None with fewer than
    two points or no spread in time."""
    if len(points) < 2:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    sxx = sum((t - mt) ** 2 for t, _ in points)
    if sxx <= 0:
        return None
    sxy = sum((t - mt) * (v - mv) for t, v in points)
    return sxy / sxx * 3600.0


FLOOR_WINDOWS = 6


def floor_points(points: list[tuple[float, float]], windows: int = FLOOR_WINDOWS) -> list[tuple[float, float]]:
    """The RSS floor: the time span cut into `windows` equal parts (fewer when there are fewer
    than two points a part), and in each the lowest point. A leak raises the floor; a sample
    that catches a transient buffer (a 1 MiB chunk being decoded) does not."""
    if len(points) < 4:
        return list(points)
    k = max(2, min(windows, len(points) // 2))
    t0, t1 = points[0][0], points[-1][0]
    width = (t1 - t0) / k or 1.0
    lows: dict[int, tuple[float, float]] = {}
    for t, v in points:
        i = min(k - 1, int((t - t0) / width))
        if i not in lows or v < lows[i][1]:
            lows[i] = (t, v)
    return [lows[i] for i in sorted(lows)]


def flat_growth(values: list[float]) -> float | None:
    """Median of the last quarter minus median of the first quarter (at least one point each);
    None with fewer than two values."""
    if len(values) < 2:
        return None
    q = max(1, len(values) // 4)
    return statistics.median(values[-q:]) - statistics.median(values[:q])


def group(samples: list[Sample]) -> dict[tuple[str, str], list[Sample]]:
    """Samples by (process, metric), each list in time order."""
    out: dict[tuple[str, str], list[Sample]] = {}
    for s in sorted(samples, key=lambda s: s.t_s):
        out.setdefault((s.process, s.metric), []).append(s)
    return out


def window(series: list[Sample], start_s: float) -> tuple[list[Sample], bool]:
    """The points at or after start_s that belong to the process incarnation of the last point
    (same pid); and whether an earlier incarnation was cut off (the process was restarted)."""
    if not series:
        return [], False
    last_pid = series[-1].pid
    late = [s for s in series if s.t_s >= start_s]
    mine = [s for s in late if s.pid == last_pid]
    return mine, len(mine) != len(late) or any(s.pid != last_pid for s in series)


def judge(samples: list[Sample], end_s: float, final: dict[str, float] | None = None,
          thresholds: Thresholds = Thresholds()) -> list[SeriesVerdict]:
    """A verdict per series over the second half of a run that ended at end_s.

    rss_mib: the slope of its floor (floor_points) below thresholds.rss_mib_per_hour, the
    least-squares slope of every point reported beside it; fds, threads: flat (growth within the
    tolerance); spool_files and spool_bytes: the `final` value (sampled after traffic stopped
    and the spool drained) must be 0; db_bytes and anything else: reported, never judged.
    A series with fewer than two points in the window is INFO (too short to judge).
    """
    rows: list[SeriesVerdict] = []
    start = end_s / 2.0
    for (proc, metric), series in sorted(group(samples).items()):
        pts, restarted = window(series, start)
        vals = [s.value for s in pts]
        slope = slope_per_hour([(s.t_s, s.value) for s in pts])
        growth = flat_growth(vals)
        row = SeriesVerdict(proc, metric, len(pts), vals[0] if vals else None, vals[-1] if vals else None,
                            min(vals) if vals else None, max(vals) if vals else None, slope, growth, INFO,
                            restarted=restarted)
        if metric in ("spool_files", "spool_bytes") and final is not None and metric in final:
            row.last = final[metric]
            row.verdict = OK if final[metric] == 0 else FAIL
            row.reason = "empty at the end" if row.verdict == OK else f"{final[metric]:g} left at the end"
        elif metric in ("rss_mib", "fds", "threads") and slope is None:
            row.reason = "too few samples in the second half"
        elif metric == "rss_mib":
            floor = slope_per_hour(floor_points([(s.t_s, s.value) for s in pts]))
            row.floor_slope_per_hour = floor if floor is not None else slope
            ok = row.floor_slope_per_hour < thresholds.rss_mib_per_hour
            row.verdict = OK if ok else FAIL
            row.reason = (f"floor slope {row.floor_slope_per_hour:+.2f} {'<' if ok else '>='} "
                          f"{thresholds.rss_mib_per_hour:g} MiB/h")
        elif metric in ("fds", "threads"):
            tol = thresholds.fds_tol if metric == "fds" else thresholds.threads_tol
            ok = growth <= tol
            row.verdict = OK if ok else FAIL
            row.reason = f"flat (growth {growth:+g} <= {tol:g})" if ok else f"grew {growth:+g} (> {tol:g})"
        rows.append(row)
    return rows


def passed(rows: list[SeriesVerdict]) -> bool:
    """No FAIL among the rows."""
    return all(r.verdict != FAIL for r in rows)


def _fmt(v: float | None, digits: int = 1) -> str:
    if v is None:
        return "-"
    if float(v).is_integer() and abs(v) < 1e15:
        return f"{int(v):,}"
    return f"{v:,.{digits}f}"


def table(rows: list[SeriesVerdict], metrics: tuple[str, ...] = PROCESS_METRICS + GLOBAL_METRICS) -> str:
    """The plot-free text table: one line per series, grouped by metric."""
    head = ("process", "metric", "pts", "first", "last", "min", "max", "slope/h", "floor/h", "verdict")
    lines = [head]
    order = {m: i for i, m in enumerate(metrics)}
    for r in sorted(rows, key=lambda r: (order.get(r.metric, len(order)), r.process)):
        digits = 2 if r.metric == "rss_mib" else 0
        slope = "-" if r.slope_per_hour is None else f"{r.slope_per_hour:+,.{2 if r.metric == 'rss_mib' else 1}f}"
        verdict = r.verdict + (f" ({r.reason})" if r.reason else "") + (" [restarted]" if r.restarted else "")
        floor = "-" if r.floor_slope_per_hour is None else f"{r.floor_slope_per_hour:+,.2f}"
        lines.append((r.process, r.metric, str(r.points), _fmt(r.first, digits), _fmt(r.last, digits),
                      _fmt(r.min, digits), _fmt(r.max, digits), slope, floor, verdict))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    out = []
    for line in lines:
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
        out.append("  ".join(cells + [line[-1]]))
    return "\n".join(out)


def markdown_table(rows: list[SeriesVerdict], metrics: tuple[str, ...] = PROCESS_METRICS + GLOBAL_METRICS) -> str:
    """The same rows as a Markdown table (for the README and notes)."""
    order = {m: i for i, m in enumerate(metrics)}
    out = ["| process | metric | first | last | max | slope/h (2nd half) | verdict |", "|---|---|---:|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: (order.get(r.metric, len(order)), r.process)):
        digits = 2 if r.metric == "rss_mib" else 0
        slope = "-" if r.slope_per_hour is None else f"{r.slope_per_hour:+,.{2 if r.metric == 'rss_mib' else 1}f}"
        out.append(f"| {r.process} | {r.metric} | {_fmt(r.first, digits)} | {_fmt(r.last, digits)} | "
                   f"{_fmt(r.max, digits)} | {slope} | {r.verdict}{' (' + r.reason + ')' if r.reason else ''} |")
    return "\n".join(out)


def compact_markdown(rows: list[SeriesVerdict]) -> str:
    """One Markdown row per process (RSS first -> last, slope, verdict; fds and threads first ->
    last and verdict), then one per daemon-wide series: the README's form of the table."""
    by: dict[str, dict[str, SeriesVerdict]] = {}
    for r in rows:
        by.setdefault(r.process, {})[r.metric] = r

    def span(r: SeriesVerdict | None, digits: int) -> str:
        return "-" if r is None else f"{_fmt(r.first, digits)} -> {_fmt(r.last, digits)}"

    out = ["| process | RSS MiB (2nd half) | RSS slope MiB/h: floor (all points) | fds | threads | verdict |",
           "|---|---:|---:|---:|---:|---|"]
    for proc in sorted(p for p in by if p != GLOBAL):
        m = by[proc]
        rss = m.get("rss_mib")
        slope = "-" if rss is None or rss.slope_per_hour is None else (
            f"{rss.floor_slope_per_hour:+.2f} ({rss.slope_per_hour:+.2f})" if rss.floor_slope_per_hour is not None
            else f"({rss.slope_per_hour:+.2f})")
        bad = [f"{k} {m[k].reason}" for k in PROCESS_METRICS if k in m and m[k].verdict == FAIL]
        verdict = "FAIL: " + "; ".join(bad) if bad else (
            "ok" if all(m[k].verdict == OK for k in PROCESS_METRICS if k in m) else "too short to judge")
        if any(m[k].restarted for k in m):
            verdict += " (restarted)"
        out.append(f"| {proc} | {span(rss, 2)} | {slope} | {span(m.get('fds'), 0)} | "
                   f"{span(m.get('threads'), 0)} | {verdict} |")
    for metric in GLOBAL_METRICS:
        r = by.get(GLOBAL, {}).get(metric)
        if r is not None:
            slope = "-" if r.slope_per_hour is None else f"{r.slope_per_hour:+,.0f}/h"
            out.append(f"| ({metric}) | {span(r, 0)} | {slope} | | | {r.verdict}"
                       f"{' (' + r.reason + ')' if r.reason else ''} |")
    return "\n".join(out)


def samples_csv(samples: list[Sample], header: bool = True) -> str:
    """The samples in long form (t_s, process, pid, metric, value), one per line, for plotting;
    without the header line when appending a round to a file already started."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow(["t_s", "process", "pid", "metric", "value"])
    for s in sorted(samples, key=lambda s: (s.t_s, s.process, s.metric)):
        value = f"{s.value:.3f}" if s.metric == "rss_mib" else (
            f"{s.value:.0f}" if float(s.value).is_integer() else repr(s.value))  # bytes: every digit
        w.writerow([f"{s.t_s:.1f}", s.process, s.pid, s.metric, value])
    return buf.getvalue()

