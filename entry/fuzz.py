"""`python run.py chaos --fuzz --frames N --garbage-bytes B`: hostile input at volume.

Owns: the fuzz run. It starts a real daemon (or takes one from the caller), lets real
producers (`chaos.Traffic`) store results throughout, and meanwhile
- sends N hostile frames from `pairlane.fuzzframes` to the gateway in lockstep (one frame,
  then its reply, from a few DEALERs in parallel), so each reply is attributed to its frame;
  a fuzz frame that opened a request is followed by an `abort` so the fuzz never holds the
  gateway's request slots;
- pushes B bytes of garbage, half at the gateway (large random frames, pipelined, replies
  counted) and half at the legacy socket (random bytes, deep parentheses, mutated
  S-expressions), interleaved with mutated legacy messages;
then checks: every fuzz frame answered (an error for every mutation in MUST_FAIL; a frame whose
message Thespian lost between two actors, which the receiving actor counts, is the one allowed
silence: its producer would resend), nothing left counted in flight at the gateway, every
garbage frame answered or counted in the daemon's metrics, every legacy message ending in
exactly one counted outcome, no actor restarted, the daemon's RSS back within 10% of its
pre-fuzz level, and the real producers' results stored exactly (chaos's checker).

Never does: trust log lines, or send a frame ZMQ itself would drop unseen (over 4x
max_message_bytes).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import zmq

from pairlane.actors.gateway import LOST_AFTER_S
from pairlane import fuzzframes
from pairlane.synthetic import legacy_message

from . import chaos
from .harness import Daemon, add_keep_argument, render_health
from .soak import proc_figures, spool_figures


def daemon_rss_mib(d: Daemon) -> float:
    """The sum of the RSS of every process of the daemon."""
    total = 0.0
    for pid in d.all_pids():
        fig = proc_figures(pid)
        if fig:
            total += fig["rss_mib"]
    return total


def _metric_sum(metrics: dict, name: str, label: str | None = None) -> float:
    v = metrics.get(name, 0.0)
    if isinstance(v, dict):
        return sum(x for k, x in v.items() if label is None or k == label)
    return float(v)


def metrics(d: Daemon) -> dict:
    reply = d.admin("metrics", timeout=10.0)
    assert reply and reply.get("ok"), reply
    return reply["metrics"]


def delivery_gaps(d: Daemon) -> int:
    """Messages between actors that never arrived, as the receivers' resequencers counted them
    (gaps given up on after a few seconds: supervision/ordering.py), summed over the actors."""
    total = 0
    for name in chaos.ACTORS:
        reply = d.admin("inspect", {"actor": name}, timeout=10.0) or {}
        total += int(((reply.get("state") or {}).get("delivery") or {}).get("gaps_skipped", 0))
    return total


def restarts(d: Daemon) -> tuple[int, bool]:
    st = d.status()
    return sum(a.get("restarts", 0) for a in st["actors"]), all(a["state"] == "RUNNING" for a in st["actors"])


class Sender(threading.Thread):
    """A sending thread whose exception is kept (`error`) for the verdict instead of lost."""

    error: str | None = None

    def run(self) -> None:
        try:
            self.work()
        except Exception as exc:  # reported in the summary's failures
            self.error = f"{self.name}: {type(exc).__name__}: {exc}"

    def work(self) -> None:
        raise NotImplementedError


class Lockstep(Sender):
    """One DEALER sending fuzz frames one at a time and waiting for each reply."""

    def __init__(self, endpoint: str, seed: int, frames: int, max_message_bytes: int, wait_s: float = 15.0):
        super().__init__(daemon=True, name=f"fuzz-{seed}")
        self.endpoint, self.seed, self.frames = endpoint, seed, frames
        self.max_message_bytes, self.wait_s = max_message_bytes, wait_s
        self.by_kind: dict[str, dict[str, int]] = {}   # mutation -> reply type/code -> count
        self.unanswered: list[str] = []                 # mutations that got no reply at all
        self.late: set[str] = set()                     # ids of the frames that went unanswered
        self.must_fail_not_error: list[tuple[str, dict]] = []
        self.sent = self.aborts = self.bytes = 0

    def _wait(self, sock: zmq.Socket, rid: str, want: str | None = None) -> dict | None:
        """The reply to the frame for rid: the next reply, skipping late replies naming a request
        whose frame went unanswered before (`self.late`), and with `want` anything but that type.
        (A reply naming another fuzz id is this frame's: a flipped bit can rename the request.)"""
        deadline = time.monotonic() + self.wait_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000)):
                return None
            reply = msgpack.unpackb(sock.recv(), raw=False)
            other = reply.get("request_id")
            if isinstance(other, str) and other in self.late and other != rid:
                continue
            if want is not None and reply.get("type") != want:
                continue
            return reply

    def work(self) -> None:
        rng = random.Random(self.seed)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        try:
            for k in range(self.frames):
                rid = f"fz-{self.seed}-{k}"
                how, frames = fuzzframes.fuzz_frame(rng, rid, self.max_message_bytes)
                sock.send_multipart(frames)
                self.sent += 1
                self.bytes += sum(len(f) for f in frames)
                reply = self._wait(sock, rid)
                key = "none" if reply is None else (
                    f"error:{reply.get('code')}" if reply.get("type") == "error" else str(reply.get("type")))
                self.by_kind.setdefault(how, {}).setdefault(key, 0)
                self.by_kind[how][key] += 1
                if reply is None:
                    self.unanswered.append(how)
                    self.late.add(rid)
                elif how in fuzzframes.MUST_FAIL and reply.get("type") != "error":
                    self.must_fail_not_error.append((how, reply))
                if reply is not None and reply.get("type") == "credit" and isinstance(reply.get("request_id"), str):
                    # the mutation opened a request: free its slot (max_requests) at once
                    sock.send(msgpack.packb({"type": "abort", "request_id": reply["request_id"]}))
                    self.aborts += 1
                    self._wait(sock, reply["request_id"], want="aborted")
        finally:
            sock.close(0)


class GatewayGarbage(Sender):
    """Large random frames at the gateway, pipelined; counts the replies."""

    def __init__(self, endpoint: str, seed: int, nbytes: int, max_message_bytes: int):
        super().__init__(daemon=True, name="garbage-gateway")
        self.endpoint, self.seed, self.nbytes, self.max = endpoint, seed, nbytes, max_message_bytes
        self.sent = self.bytes = self.replies = self.errors = 0

    def work(self) -> None:
        rng = random.Random(self.seed)
        pool = [rng.randbytes(self.max) for _ in range(8)]
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 64)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.connect(self.endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN | zmq.POLLOUT)
        try:
            while self.bytes < self.nbytes or self.replies < self.sent:
                events = dict(poller.poll(10_000))
                if not events:
                    break  # 10 s without anything to do: the rest is not coming
                if events.get(sock, 0) & zmq.POLLIN:
                    while sock.poll(0, zmq.POLLIN):
                        reply = msgpack.unpackb(sock.recv(), raw=False)
                        self.replies += 1
                        self.errors += reply.get("type") == "error"
                if self.bytes < self.nbytes and events.get(sock, 0) & zmq.POLLOUT:
                    size = rng.randint(self.max // 4, self.max)
                    start = rng.randrange(self.max - size + 1)
                    frame = bytes([rng.randrange(256)]) + pool[rng.randrange(8)][start:start + size - 1]
                    sock.send(frame, zmq.NOBLOCK)
                    self.sent += 1
                    self.bytes += len(frame)
                    if self.bytes >= self.nbytes:
                        poller.modify(sock, zmq.POLLIN)
        finally:
            sock.close(0)


class LegacyGarbage(Sender):
    """Garbage and mutated S-expressions at the legacy PUSH socket."""

    def __init__(self, endpoint: str, seed: int, nbytes: int, frames: int, chunk: int = 1 << 20):
        super().__init__(daemon=True, name="garbage-legacy")
        self.endpoint, self.seed, self.nbytes, self.frames, self.chunk = endpoint, seed, nbytes, frames, chunk
        self.sent = self.bytes = 0
        self.by_kind: dict[str, int] = {}

    def work(self) -> None:
        rng = random.Random(self.seed)
        pool = [rng.randbytes(self.chunk) for _ in range(8)]
        sock = zmq.Context.instance().socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 30_000)
        sock.setsockopt(zmq.SNDHWM, 16)
        sock.connect(self.endpoint)
        k = 0
        try:
            while self.bytes < self.nbytes or k < self.frames:
                if k < self.frames and (self.bytes >= self.nbytes or rng.random() < 0.5):
                    valid = legacy_message(rng.randint(0, 50), style=rng.choice(("dotted", "lexpr")),
                                           seed=rng.randrange(1 << 30), request_id=f"fzl-{self.seed}-{k}",
                                           strategy_name="fz-legacy")
                    how, msg = fuzzframes.legacy_mutation(rng, valid)
                    k += 1
                else:
                    how = "big_garbage"
                    size = rng.randint(self.chunk // 4, self.chunk)
                    msg = (b"(((" if rng.random() < 0.3 else b"") + pool[rng.randrange(8)][:size]
                sock.send(msg)
                self.sent += 1
                self.bytes += len(msg)
                self.by_kind[how] = self.by_kind.get(how, 0) + 1
        finally:
            sock.close()


def run_fuzz(d: Daemon, frames: int, garbage_bytes: int, seed: int = 0, lanes: int = 2,
             producers: int = 2, max_trades: int = 100_000, out=sys.stderr) -> dict:
    """The fuzz run against daemon d (which must have a legacy endpoint); returns the summary."""
    max_bytes = int(d.cfg.get("gateway", {}).get("max_message_bytes", 1 << 20))
    traffic = chaos.Traffic(d.gateway_endpoint, producers=producers, min_trades=10, max_trades=max_trades,
                            seed=seed, prefix="fuzzreal", pause_s=0.5).start()
    traffic.wait_stored(producers, timeout=120.0)
    restarts0, _ = restarts(d)
    gaps0 = delivery_gaps(d)
    m0 = metrics(d)
    rss0 = daemon_rss_mib(d)
    print(f"fuzz: real producers storing ({len(traffic.stored)} so far); daemon RSS {rss0:.1f} MiB; "
          f"sending {frames} fuzz frames and {garbage_bytes / 2**20:.0f} MiB of garbage", file=out, flush=True)
    t0 = time.monotonic()
    per = [frames // lanes + (1 if i < frames % lanes else 0) for i in range(lanes)]
    steps = [Lockstep(d.gateway_endpoint, seed * 100 + i, n, max_bytes) for i, n in enumerate(per)]
    gg = GatewayGarbage(d.gateway_endpoint, seed * 100 + 50, garbage_bytes // 2, max_bytes)
    legacy_ep = d.cfg["gateway"]["legacy_endpoint"]
    lg = LegacyGarbage(legacy_ep, seed * 100 + 60, garbage_bytes - garbage_bytes // 2, max(1, frames // 5))
    workers = steps + [gg, lg]
    for w in workers:
        w.start()
    while any(w.is_alive() for w in workers):
        time.sleep(2.0)
        print(f"fuzz: {time.monotonic() - t0:5.0f} s  frames {sum(s.sent for s in steps)}/{frames}  "
              f"gateway garbage {gg.bytes / 2**20:.0f} MiB  legacy {lg.bytes / 2**20:.0f} MiB  "
              f"real stored {len(traffic.stored)}", file=out, flush=True)
    fuzz_s = time.monotonic() - t0
    # every legacy message ends in exactly one counted outcome
    legacy0 = _metric_sum(m0, "pairlane_legacy_results_total")
    deadline = time.monotonic() + 300.0
    while True:
        m1 = metrics(d)
        legacy_counted = _metric_sum(m1, "pairlane_legacy_results_total") - legacy0
        if legacy_counted >= lg.sent or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    traffic.stop()
    chaos.wait_all_running(d, timeout=60.0)
    # RSS back within 10% of the pre-fuzz level (give the allocator a minute to hand memory back)
    deadline = time.monotonic() + 60.0
    rss_peak = rss1 = daemon_rss_mib(d)
    while rss1 > 1.10 * rss0 and time.monotonic() < deadline:
        time.sleep(1.0)
        rss1 = daemon_rss_mib(d)
    # nothing the fuzz sent may stay counted in flight at the gateway once the traffic has stopped (a
    # message lost between the actors is released by the gateway's safety net after LOST_AFTER_S)
    gaps = delivery_gaps(d) - gaps0
    deadline = time.monotonic() + (30.0 if gaps == 0 else LOST_AFTER_S + 15.0)
    while True:
        gw = d.admin("inspect", {"actor": "gateway"}, timeout=10.0) or {}
        in_flight = (gw.get("state") or {}).get("bytes_in_flight")
        if in_flight == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    restarts1, running = restarts(d)
    m1 = metrics(d)
    invalid = _metric_sum(m1, "pairlane_ingest_messages_total", "type=invalid") - \
        _metric_sum(m0, "pairlane_ingest_messages_total", "type=invalid")
    res = chaos.check(d.db_path, dict(traffic.stored))
    by_kind: dict[str, dict[str, int]] = {}
    for s in steps:
        for how, codes in s.by_kind.items():
            for code, n in codes.items():
                by_kind.setdefault(how, {}).setdefault(code, 0)
                by_kind[how][code] += n
    unanswered = sum(len(s.unanswered) for s in steps)
    must_fail_bad = [x for s in steps for x in s.must_fail_not_error]
    spool = spool_figures(d.cfg["dlq"]["path"])
    summary = {
        "fuzz_seconds": round(fuzz_s, 1),
        "frames_sent": sum(s.sent for s in steps), "frame_bytes": sum(s.bytes for s in steps),
        "frames_unanswered": unanswered, "must_fail_not_error": len(must_fail_bad),
        "messages_lost_between_actors": gaps,
        "must_fail_examples": [f"{h}: {r}" for h, r in must_fail_bad[:5]],
        "aborts_sent": sum(s.aborts for s in steps), "replies_by_mutation": by_kind,
        "gateway_garbage_frames": gg.sent, "gateway_garbage_bytes": gg.bytes,
        "gateway_garbage_replies": gg.replies, "gateway_garbage_errors": gg.errors,
        "invalid_counted": invalid,
        "legacy_frames": lg.sent, "legacy_bytes": lg.bytes, "legacy_by_kind": lg.by_kind,
        "legacy_outcomes_counted": legacy_counted,
        "legacy_outcomes": {k: v - m0.get("pairlane_legacy_results_total", {}).get(k, 0.0)
                            for k, v in m1.get("pairlane_legacy_results_total", {}).items()},
        "spool_files_after": spool["spool_files"], "gateway_bytes_in_flight_after": in_flight,
        "restarts_before": restarts0, "restarts_after": restarts1, "all_running": running,
        "rss_before_mib": round(rss0, 1), "rss_after_mib": round(rss1, 1), "rss_peak_after_mib": round(rss_peak, 1),
        "real_sent": len(traffic.sent), "real_stored": len(traffic.stored), "real_errors": len(traffic.errors),
        "lost": len(res["lost"]), "duplicates": res["duplicate_rows"],
        "wrong_row_counts": len(res["wrong_row_counts"]), "partial_visible": len(res["partial_visible"]),
        "health": d.health_events(),
    }
    gateway_garbage_ok = gg.replies == gg.sent or invalid >= gg.sent
    summary["failures"] = [why for ok, why in [
        (summary["frames_sent"] == frames, f"{summary['frames_sent']} of {frames} fuzz frames sent"),
        (lg.error is None and gg.error is None and not any(s.error for s in steps),
         f"a sender failed: {[w.error for w in workers if w.error]}"),
        # a frame whose message Thespian lost between two actors gets no reply (its producer would
        # resend on silence, as the contract says); each such loss is detected and counted by the
        # receiving actor: more unanswered frames than counted losses is a failure
        (unanswered <= gaps, f"{unanswered} fuzz frames got no reply ({gaps} messages lost between actors)"),
        (not must_fail_bad, f"{len(must_fail_bad)} must-fail frames answered without an error"),
        (gateway_garbage_ok, f"gateway garbage: {gg.sent} frames, {gg.replies} replies, {invalid} counted invalid"),
        (gg.errors == gg.replies, f"gateway garbage: {gg.replies - gg.errors} replies that are not errors"),
        (legacy_counted == lg.sent, f"legacy: {lg.sent} sent, {legacy_counted} outcomes counted"),
        (restarts1 == restarts0 and running, f"actor restarts {restarts0} -> {restarts1}, all running {running}"),
        (in_flight == 0, f"gateway still counts {in_flight} bytes in flight after the traffic stopped"),
        (rss1 <= 1.10 * rss0, f"daemon RSS {rss0:.1f} -> {rss1:.1f} MiB (over +10%)"),
        (len(traffic.stored) >= 1, "real producers stored nothing"),
        (not res["lost"] and not res["duplicate_rows"] and not res["wrong_row_counts"]
         and not res["partial_visible"], "real producers' results not stored exactly"),
    ] if not ok]
    summary["ok"] = not summary["failures"]
    return summary


def render(s: dict) -> str:
    lines = [f"fuzz: {s['frames_sent']:,} hostile frames ({s['frame_bytes'] / 2**20:.1f} MiB) and "
             f"{(s['gateway_garbage_bytes'] + s['legacy_bytes']) / 2**30:.2f} GiB of garbage in {s['fuzz_seconds']} s",
             f"  frames unanswered {s['frames_unanswered']}, must-fail answered without error {s['must_fail_not_error']}, "
             f"aborts sent {s['aborts_sent']}, messages lost between actors {s.get('messages_lost_between_actors')}",
             f"  gateway garbage: {s['gateway_garbage_frames']:,} frames, {s['gateway_garbage_bytes'] / 2**20:,.0f} MiB, "
             f"{s['gateway_garbage_replies']:,} replies ({s['gateway_garbage_errors']:,} errors); "
             f"invalid counted {s['invalid_counted']:,.0f}",
             f"  legacy: {s['legacy_frames']:,} messages, {s['legacy_bytes'] / 2**20:,.0f} MiB, "
             f"{s['legacy_outcomes_counted']:,.0f} outcomes counted {s['legacy_outcomes']}",
             f"  restarts {s['restarts_before']} -> {s['restarts_after']}; daemon RSS {s['rss_before_mib']} -> "
             f"{s['rss_after_mib']} MiB; spool files after {s['spool_files_after']}; gateway bytes in flight after "
             f"{s.get('gateway_bytes_in_flight_after')}",
             f"  real producers: {s['real_stored']} stored of {s['real_sent']} sent, lost {s['lost']}, "
             f"duplicates {s['duplicates']}, wrong rows {s['wrong_row_counts']}, partial {s['partial_visible']}",
             "  " + render_health(s.get("health", {})),
             "  replies by mutation:"]
    for how, codes in sorted(s["replies_by_mutation"].items()):
        lines.append(f"    {how:<12} " + ", ".join(f"{c} {n}" for c, n in sorted(codes.items())))
    lines.append(f"verdict: {'PASS' if s['ok'] else 'FAIL: ' + '; '.join(s['failures'])}")
    return "\n".join(lines)


def parse_size(text: str) -> int:
    """'2G', '512M', '100k' or a plain byte count."""
    t = text.strip().upper().rstrip("B").rstrip("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="run.py chaos --fuzz", description="Hostile input at volume through a daemon of its own: mutated "
        "protocol frames (answered one by one) and garbage at the gateway and the legacy socket, while real "
        "producers keep storing.",
        epilog="example:\n  python run.py chaos --fuzz --frames 10000 --garbage-bytes 2G --json\n"
               "exit code 0 when every frame is answered or counted, no actor restarted, RSS is back within 10%, "
               "and the real results are stored exactly",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=10_000)
    ap.add_argument("--garbage-bytes", type=parse_size, default=parse_size("256M"),
                    help="bytes of garbage, half at the gateway, half at the legacy socket (e.g. 2G; default 256M)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    add_keep_argument(ap)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.config:
        ap.error("--fuzz starts a daemon of its own; it takes no --config")
    tmp = Path(tempfile.mkdtemp(prefix="pairlane-fuzz-"))
    d = Daemon(tmp / "daemon", {"gateway": {"assembly_timeout_s": 30.0}})
    print(f"fuzz: starting a daemon in {tmp}", file=sys.stderr)
    summary = None
    try:
        d.start()
        summary = run_fuzz(d, ns.frames, ns.garbage_bytes, seed=ns.seed)
    finally:
        d.close_and_remove(tmp, keep=ns.keep or summary is None or not summary["ok"])
    print(json.dumps(summary, indent=2) if ns.json else render(summary))
    return 0 if summary["ok"] else 1
