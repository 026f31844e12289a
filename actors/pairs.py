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
"""
from __future__ import annotations

import time

from pairlane import pairs as pairlogic
from pairlane.stores import open_reader, reader_errors
from pairlane.vocab import AlertName, AlertState
from supervision.requests import Requests

from .admin import serve_admin
from .base import PairlaneActor
from .messages import AdminCommand, ReplaceSlots, SlotsWritten

SLOTS_TIMEOUT_S = 10.0   # pairs.evaluate answers without waiting longer for the writer


class PairsActor(PairlaneActor):
    def on_start(self) -> None:
        self.cfg = pairlogic.PairsConfig.from_mapping(self.config["pairs"])
        self.interval = float(self.config["pairs"]["interval_s"])
        self.conn = None   # sqlite3 read-only connection or pairlane.pgstore.PgReader
        self.last: dict | None = None
        self.evaluations = 0
        self.errors = 0
        self.requests = Requests(self)   # pairs.evaluate awaiting the writer's SlotsWritten
        self.metrics_addr = self.peer("metrics")
        # the periodic evaluation is due at this monotonic time; an "evaluate" timer firing earlier
        # was scheduled under an interval a reload since replaced, and is ignored
        self.due = time.monotonic() + min(5.0, self.interval)
        self.after(min(5.0, self.interval), "evaluate")

    def on_directory(self) -> None:
        addr = self.peer("metrics")
        if addr is not None and addr != self.metrics_addr:
            # a restarted metrics actor starts from zero: give it our gauges and alert again now,
            # not at the next evaluation (a safe stop would otherwise look resolved until then)
            self.metrics_addr = addr
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

    def inspect(self) -> dict:
        last = self.last or {}
        return {"evaluations": self.evaluations, "errors": self.errors, "interval_s": self.interval,
                "last_evaluated_at": last.get("evaluated_at"), "slots": len(last.get("slots", [])),
                "safe_stop": last.get("safe_stop"), "excluded": last.get("excluded"),
                "last_evaluation_s": last.get("evaluation_s")}

    def _connection(self):
        """The reader, opened on first use; None while a SQLite database does not exist yet."""
        if self.conn is None:
            self.conn = open_reader(self.config, busy_timeout_ms=1000)
        return self.conn

    def on_timer(self, payload) -> None:
        if self.requests.on_timer(payload):
            return
        if payload == "evaluate":
            if time.monotonic() < self.due - 0.05:
                return  # a timer of an interval a reload replaced
            result = self.evaluate()
            if result.get("ok", True):
                self.write_slots(result)
            if not self._stopping:
                self.due = time.monotonic() + self.interval
                self.after(self.interval, "evaluate")

    def evaluate(self) -> dict:
        t0 = time.perf_counter()
        now = time.time()
        try:
            conn = self._connection()
            cands = pairlogic.load_candidates(conn, window_trades=self.cfg.window_trades) if conn is not None else []
            newest = None
            if conn is not None:
                row = conn.execute("SELECT max(completed_at) FROM backtest_results WHERE status = 'complete'").fetchone()
                newest = row[0] if row else None
            ev = pairlogic.evaluate(cands, self.cfg)
        except reader_errors() as exc:
            self.errors += 1
            self.metrics.inc("pairlane_pair_evaluations_total", outcome="error")
            self.log("ERROR", "pair_evaluation_failed", error=exc)
            if self.conn is not None:
                try:
                    self.conn.close()
                except reader_errors():
                    pass
                self.conn = None
            return {"ok": False, "error": f"pair evaluation failed: {exc}"}
        elapsed = time.perf_counter() - t0
        self.evaluations += 1
        total = len(cands)
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
    def admin_pairs(self, args: dict, respond) -> dict:
        if self.last is None:
            result = self.evaluate()
            if result.get("ok") is False:
                return result
            self.write_slots(result)
        return self._admin_view(self.last)

    def admin_pairs_evaluate(self, args: dict, respond) -> dict | None:
        result = self.evaluate()
        if not result.get("ok", True):
            return result
        self.write_slots(result, respond)
        return None

    @staticmethod
    def _admin_view(result: dict) -> dict:
        return {"ok": True, "slots": result["slots"], "candidates": result["candidates"],
                "excluded": result["excluded"], "safe_stop": result["safe_stop"],
                "newest_result_age_s": result["newest_result_age_s"], "evaluated_at": result["evaluated_at"],
                "evaluation_s": result["evaluation_s"], "strategies": result["strategies"]}
