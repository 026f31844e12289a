"""The pairs actor: periodic pair evaluation and the safe-stop alert (PROTOCOL.md section 5).

Owns: evaluating every `pairs.interval_s` and on `pairs.evaluate`, reading
the store (SQLite, or PostgreSQL in REPEATABLE READ) through its own read-only connection (only `complete` results are
visible), handing the slots to the writer (pair_slots replaced whole, history
appended, in one transaction), the exclusion counts, the safe-stop state
(ERROR log with reasons, gauge, alert raised and cleared), the data age
(`newest_result_age_s`; evaluation goes on with stored data when ingest
stalls; an empty store is a safe stop waiting for data: WARNING with reason
`no_data`, never ERROR), the pair metrics (re-sent to a restarted metrics
actor), and the admin commands `pairs` and `pairs.evaluate` (their
handlers below; the commands themselves are declared in pairlane.admin_commands). Never writes
the database itself, and never serves `result` or `verify` (the admin actor reads those).

An evaluation (loading the candidates and `pairlane.pairs.evaluate`) runs in a worker thread,
one at a time, so the actor keeps heartbeating however long it takes (10,000 strategies are
50M pairs); the actor polls for its end and does everything else (metrics, logs, alert, the
ReplaceSlots to the writer, admin replies) itself. A request arriving while one runs waits for
the next evaluation, which starts as soon as the running one ends (its snapshot is then no older
than the request). An evaluation still running after EVALUATION_DEADLINE_S is given up: its
waiters get an error, it is logged and counted, and its result is dropped if it ever comes.

Several daemons on one PostgreSQL store (PROTOCOL.md section 7): only the daemon whose pairs actor
holds the pair-leader advisory lock (`pgstore.PgLeases`, its own session, so it dies with the daemon)
evaluates and writes slots. The lock is tried before every evaluation and every LEADER_CHECK_S, so a
follower takes over within LEADER_CHECK_S of the leader's death. A follower answers `pairs` from the
stored slots and refuses `pairs.evaluate` with an error naming the leading daemon (never forwards).
`leader` (inspect, `admin status` pairs_leader, gauge pairlane_pairs_leader) says which this is.
With SQLite there is one daemon: it always leads.
"""
from __future__ import annotations

import threading
import time

from pairlane import pairs as pairlogic
from pairlane.store import SLOT_COLUMNS, StoreError
from pairlane.stores import backend, open_reader, reader_errors
from pairlane.vocab import AlertName, AlertState
from pairlane.supervision.requests import Requests

from .admin import serve_admin
from .base import PairlaneActor
from .messages import AdminCommand, ReplaceSlots, SlotsWritten

SLOTS_TIMEOUT_S = 10.0   # pairs.evaluate answers without waiting longer for the writer
EVAL_POLL_S = 0.02       # how often the actor checks whether the evaluation thread is done
EVALUATION_DEADLINE_S = 300.0   # an evaluation running longer is given up (reported, never restarted for)
LEADER_CHECK_S = 2.0     # a follower tries the pair-leader lock this often (takeover bound)


class PairsActor(PairlaneActor):
    def on_start(self) -> None:
        self.cfg = pairlogic.PairsConfig.from_mapping(self.config["pairs"])
        self.interval = float(self.config["pairs"]["interval_s"])
        self.conn = None   # sqlite3 read-only connection or pairlane.pgstore.PgReader
        self.last: dict | None = None
        self.evaluations = 0
        self.errors = 0
        self.requests = Requests(self)   # pairs.evaluate awaiting the writer's SlotsWritten
        self.metrics_restarted()           # the metrics actor of now has nothing to be re-sent
        self.running: dict | None = None   # the evaluation in the worker thread, if one runs
        self.waiting: list = []            # admin callbacks served by the next evaluation to start
        self.abandoned = 0
        # the periodic evaluation is due at this monotonic time; an "evaluate" timer firing earlier
        # was scheduled under an interval a reload since replaced, and is ignored
        self.due = time.monotonic() + min(5.0, self.interval)
        self.after(min(5.0, self.interval), "evaluate")
        self.lock = None   # PostgreSQL: the pair-leader lock's session
        self.leader = True
        if backend(self.config) == "postgresql":
            from pairlane.pgstore import PgLeases
            self.lock = PgLeases(self.config["store"]["url"], "pairlane-pairs " + self.config["daemon"]["name"])
            self.leader = False
            self._check_leader()
            self.after(LEADER_CHECK_S, "leader_check")
        self.metrics.set("pairlane_pairs_leader", 1.0 if self.leader else 0.0)
        self.flush_metrics()

    def _check_leader(self) -> bool:
        """Try (or confirm) the pair-leader lock; report a change. True while this daemon leads."""
        if self.lock is None:
            return True
        try:
            leader = self.lock.try_pairs_leader()
        except StoreError as exc:
            if self.leader:
                self.log("WARNING", "pairs_leader_check_failed", error=exc)
            leader = False
        if leader != self.leader:
            self.leader = leader
            self.log("INFO", "pairs_leader_changed", leader=leader)
            self.metrics.set("pairlane_pairs_leader", 1.0 if leader else 0.0)
            self.flush_metrics()
        return leader

    def _leader_name(self) -> str:
        try:
            name = self.lock.leader_name() if self.lock is not None else None
        except StoreError:
            name = None
        return name.removeprefix("pairlane-pairs ") if name else "unknown (no daemon holds the lock)"

    def on_directory(self) -> None:
        if self.metrics_restarted():
            # a restarted metrics actor starts from zero: give it our gauges and alert again now,
            # not at the next evaluation (a safe stop would otherwise look resolved until then)
            self.metrics.set("pairlane_pairs_leader", 1.0 if self.leader else 0.0)
            if self.last is not None:
                self._report(self.last)
            self.flush_metrics()

    def on_reload(self, old_config: dict, new_config: dict) -> None:
        """SIGHUP: new pair parameters apply from the next evaluation; a new interval at once."""
        self.cfg = pairlogic.PairsConfig.from_mapping(new_config["pairs"])
        interval = float(new_config["pairs"]["interval_s"])
        if interval != self.interval:
            self.log("INFO", "pairs_interval_changed", old_s=self.interval, new_s=interval)
            self.interval = interval
            self.due = time.monotonic() + interval
            self.after(interval, "evaluate")

    def on_stop(self) -> None:
        if self.conn is not None:
            self.conn.close()
        if self.lock is not None:
            self.lock.close()   # leadership passes at once

    def inspect(self) -> dict:
        last = self.last or {}
        return {"evaluations": self.evaluations, "errors": self.errors, "interval_s": self.interval,
                "last_evaluated_at": last.get("evaluated_at"), "slots": len(last.get("slots", [])),
                "safe_stop": last.get("safe_stop"), "excluded": last.get("excluded"),
                "last_evaluation_s": last.get("evaluation_s"), "running": self.running is not None,
                "abandoned": self.abandoned, "leader": self.leader}

    def _connection(self):
        """The reader, opened on first use; None while a SQLite database does not exist yet."""
        if self.conn is None:
            self.conn = open_reader(self.config, busy_timeout_ms=1000)
        return self.conn

    def on_timer(self, payload) -> None:
        if self.requests.on_timer(payload):
            return
        if payload == "eval_poll":
            self._poll()
        elif payload == "leader_check":
            was = self.leader
            if self._check_leader() and not was and self.running is None:
                self.start_evaluation()   # a new leader evaluates at once, not an interval later
            if not self._stopping:
                self.after(LEADER_CHECK_S, "leader_check")
        elif payload == "evaluate":
            if time.monotonic() < self.due - 0.05:
                return  # a timer of an interval a reload replaced
            if self.running is None and self._check_leader():
                self.start_evaluation()
            if not self._stopping:
                self.due = time.monotonic() + self.interval
                self.after(self.interval, "evaluate")

    def start_evaluation(self, waiters: list | None = None) -> None:
        """Start an evaluation in the worker thread; waiters are admin (respond, confirm) pairs
        answered in the actor once it ends (confirm: after the writer stored the slots).
        Periodic evaluations have none."""
        run = {"done": threading.Event(), "out": None, "started": time.monotonic(),
               "now": time.time(), "waiters": list(waiters or []), "cfg": self.cfg,
               "config": self.config, "conn": None}
        self.running = run

        def work() -> None:
            try:
                run["out"] = self._compute(run)
            except BaseException as exc:  # reported by the actor; never lost in the thread
                run["out"] = exc
            finally:
                run["done"].set()
        threading.Thread(target=work, name="pairs-evaluate", daemon=True).start()
        self.after(EVAL_POLL_S, "eval_poll")

    @staticmethod
    def _compute(run: dict) -> tuple:
        """Worker thread: read the candidates through a reader connection of this evaluation's
        own (opened and closed here: an evaluation given up never shares one with the next, nor
        with the actor's) and evaluate. Touches nothing of the actor."""
        cfg = run["cfg"]
        t0 = time.perf_counter()
        conn = run["conn"] = open_reader(run["config"], busy_timeout_ms=1000)
        try:
            cands = pairlogic.load_candidates(conn, window_trades=cfg.window_trades) if conn is not None else []
            newest = None
            if conn is not None:
                row = conn.execute("SELECT max(completed_at) FROM backtest_results "
                                   "WHERE status = 'complete'").fetchone()
                newest = row[0] if row else None
        finally:
            if conn is not None:
                try:
                    conn.close()
                except reader_errors():
                    pass
        ev = pairlogic.evaluate(cands, cfg)
        return len(cands), newest, ev, time.perf_counter() - t0

    def _poll(self) -> None:
        run = self.running
        if run is None:
            return
        if not run["done"].is_set():
            if time.monotonic() - run["started"] > EVALUATION_DEADLINE_S:
                self._give_up(run)
            else:
                self.after(EVAL_POLL_S, "eval_poll")
            return
        self.running = None
        out = run["out"]
        if isinstance(out, Exception):
            result = self._failed(out)
        elif isinstance(out, BaseException):
            raise out
        else:
            result = self._finished(run["now"], *out)
        if not result.get("ok", True):
            for respond, _ in run["waiters"]:
                respond(result)
        else:
            confirmed = [respond for respond, confirm in run["waiters"] if confirm]
            self.write_slots(result, self._fan_out(confirmed) if confirmed else None)
            for respond, confirm in run["waiters"]:
                if not confirm:
                    respond(self._admin_view(result))
        self._next()

    def _give_up(self, run: dict) -> None:
        """The evaluation outlived EVALUATION_DEADLINE_S: report why, drop its result, go on."""
        self.running = None
        conn = run.get("conn")
        if conn is not None:   # stop its query, if it is in one (its thread closes the connection)
            try:
                conn.interrupt()
            except Exception:  # noqa: BLE001 - best effort; the thread may have closed it
                pass
        self.abandoned += 1
        self.errors += 1
        self.metrics.inc("pairlane_pair_evaluations_total", outcome="error")
        took = time.monotonic() - run["started"]
        self.log("ERROR", "pair_evaluation_abandoned", running_s=round(took, 1),
                 deadline_s=EVALUATION_DEADLINE_S)
        self.flush_metrics()
        reply = {"ok": False, "error": f"pair evaluation abandoned after {took:.0f} s "
                                       f"(deadline {EVALUATION_DEADLINE_S:.0f} s)"}
        for respond, _ in run["waiters"]:
            respond(reply)
        self._next()

    def _next(self) -> None:
        if self.waiting and self.running is None and not self._stopping:
            waiters, self.waiting = self.waiting, []
            self.start_evaluation(waiters)

    @staticmethod
    def _fan_out(responds: list):
        def respond(reply: dict) -> None:
            for r in responds:
                r(reply)
        return respond

    def _failed(self, exc: Exception) -> dict:
        if not isinstance(exc, reader_errors()):
            raise exc  # a bug: let supervision see it, as before
        self.errors += 1
        self.metrics.inc("pairlane_pair_evaluations_total", outcome="error")
        self.log("ERROR", "pair_evaluation_failed", error=exc)
        if self.conn is not None:
            try:
                self.conn.close()
            except reader_errors():
                pass
            self.conn = None
        self.flush_metrics()
        return {"ok": False, "error": f"pair evaluation failed: {exc}"}

    def _finished(self, now: float, total: int, newest, ev, elapsed: float) -> dict:
        self.evaluations += 1
        result = ev.as_dict()
        result.update(evaluated_at=now, evaluation_s=round(elapsed, 6), strategies=total,
                      newest_result_age_s=round(now - newest, 3) if newest else None)
        self.last = result
        self.metrics.inc("pairlane_pair_evaluations_total", outcome="safe_stop" if ev.safe_stop else "ok")
        self.metrics.observe("pairlane_pair_evaluation_seconds", elapsed)
        if ev.safe_stop and total == 0:
            # an empty store is not an error: nothing to pair yet, waiting for the first result
            self.log("WARNING", "pair_safe_stop", reason="no_data", strategies=0, candidates=0)
        elif ev.safe_stop:   # data present, yet no slot filled (or the slots emptied): an operator is needed
            self.log("ERROR", "pair_safe_stop", strategies=total, candidates=ev.candidates,
                     **{f"excluded_{k}": v for k, v in ev.excluded.items()})
        self._report(result)
        self.flush_metrics()
        return result

    def _report(self, result: dict) -> None:
        """The gauges and the safe-stop alert of an evaluation (again for a restarted metrics actor)."""
        total = result["strategies"]
        missing = result["excluded"].get("missing", 0)
        self.metrics.set("pairlane_pair_missing_ratio", missing / total if total else 0.0)
        self.metrics.set("pairlane_pair_slots_filled", float(len(result["slots"])))
        self.metrics.set("pairlane_pair_safe_stop", 1.0 if result["safe_stop"] else 0.0)
        if result["safe_stop"]:
            reasons = {k: v for k, v in result["excluded"].items() if v}
            if not total:
                reasons["no_data"] = 1   # waiting for the first result (logged as a WARNING, not an ERROR)
            self.alert(AlertName.PAIR_SAFE_STOP, AlertState.RAISED, dict(reasons, strategies=total))
        else:
            self.alert(AlertName.PAIR_SAFE_STOP, AlertState.CLEARED)

    def write_slots(self, result: dict, respond=None) -> None:
        """Hand the slots to the writer. With respond (admin pairs.evaluate): answer once the
        writer confirms, with a warning if it failed, is not running or takes too long."""
        writer = self.peer("writer")
        if respond is None:
            if writer is not None:
                self.send_ordered(writer, ReplaceSlots(tuple(result["slots"]), result["evaluated_at"],
                                                       self.myAddress, 0))
            return
        reply = self._admin_view(result)
        if writer is None:
            return respond(dict(reply, warning="writer not running"))

        def written(msg: SlotsWritten) -> None:
            respond(reply if msg.ok else dict(reply, warning=f"pair_slots not written: {msg.error}"))
        self.requests.ask(writer, lambda cid: ReplaceSlots(tuple(result["slots"]), result["evaluated_at"],
                                                            self.myAddress, cid),
                          "writer", SLOTS_TIMEOUT_S, written,
                          lambda: respond(dict(reply, warning="pair_slots not yet written (writer busy)")),
                          ordered=True)

    def on_message(self, msg, sender) -> None:
        if isinstance(msg, AdminCommand):
            serve_admin(self, msg, sender)
        elif isinstance(msg, SlotsWritten):
            if not msg.ok:
                self.log("ERROR", "pair_slots_write_failed", error=msg.error)
            if msg.token:  # 0: a periodic write nobody waits for
                self.requests.answer(msg.token, msg)

    # ----- admin commands (declared in pairlane.admin_commands) -----------------------------------
    def admin_pairs(self, args: dict, respond) -> dict | None:
        if not self._check_leader():
            return self._stored_view()
        if self.last is not None:
            return self._admin_view(self.last)
        self._wait_for_next(respond, confirm=False)   # nothing evaluated yet: the first evaluation
        return None

    def admin_pairs_evaluate(self, args: dict, respond) -> dict | None:
        if not self._check_leader():
            return {"ok": False, "error": f"this daemon does not evaluate pairs: daemon {self._leader_name()} "
                                          "leads pair evaluation; send pairs.evaluate there"}
        self._wait_for_next(respond, confirm=True)    # answered once the writer confirms the slots
        return None

    def _wait_for_next(self, respond, confirm: bool) -> None:
        if not confirm and self.running is not None:
            self.running["waiters"].append((respond, confirm))   # `pairs`: the running one will do
            return
        self.waiting.append((respond, confirm))
        self._next()

    def _stored_view(self) -> dict:
        """A follower's `pairs`: the slots the leader stored (candidates and exclusions are the leader's)."""
        try:
            conn = self._connection()
            rows = conn.execute(f"SELECT {', '.join(SLOT_COLUMNS)} FROM pair_slots ORDER BY score DESC, "
                                "pair_id").fetchall()
        except reader_errors() as exc:
            self.conn = None
            return {"ok": False, "error": f"cannot read the stored pair slots: {exc}"}
        slots = [dict(zip(SLOT_COLUMNS, r)) for r in rows]
        return {"ok": True, "slots": slots, "candidates": None, "excluded": {}, "safe_stop": not slots,
                "newest_result_age_s": None, "evaluated_at": slots[0]["evaluated_at"] if slots else None,
                "leader": False, "leader_daemon": self._leader_name()}

    @staticmethod
    def _admin_view(result: dict) -> dict:
        return {"ok": True, "slots": result["slots"], "candidates": result["candidates"],
                "excluded": result["excluded"], "safe_stop": result["safe_stop"],
                "newest_result_age_s": result["newest_result_age_s"], "evaluated_at": result["evaluated_at"],
                "evaluation_s": result["evaluation_s"], "strategies": result["strategies"]}
