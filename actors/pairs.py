"""The pairs actor: periodic pair evaluation and the safe-stop alert (PROTOCOL.md section 5).

Owns: evaluating every `pairs.interval_s` and on `pairs.evaluate`, reading
SQLite through its own read-only connection (only `complete` results are
visible), handing the slots to the writer (pair_slots replaced whole, history
appended, in one transaction), the exclusion counts, the safe-stop state
(ERROR log with reasons, gauge, alert raised and cleared), the data age
(`newest_result_age_s`; evaluation goes on with stored data when ingest
stalls) and the pair metrics. Never writes the database itself.
"""
from __future__ import annotations

import itertools
import os
import sqlite3
import time

from pairlane import pairs as pairlogic
from pairlane.store import Store, StoreError, connect

from .base import PairlaneActor
from .messages import AdminCommand, AdminReply, ReplaceSlots, SlotsWritten


class PairsActor(PairlaneActor):
    def on_start(self) -> None:
        self.cfg = pairlogic.PairsConfig.from_mapping(self.config["pairs"])
        self.interval = float(self.config["pairs"]["interval_s"])
        self.conn: sqlite3.Connection | None = None
        self.last: dict | None = None
        self.evaluations = 0
        self.errors = 0
        self.tokens = itertools.count(1)
        self.waiting: dict[int, tuple] = {}   # token -> (admin sender, admin token, reply)
        self.reader = Store(self.config["store"]["path"], busy_timeout_ms=1000)
        self.after(min(5.0, self.interval), "evaluate")

    def on_stop(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.reader.close()

    def inspect(self) -> dict:
        last = self.last or {}
        return {"evaluations": self.evaluations, "errors": self.errors, "interval_s": self.interval,
                "last_evaluated_at": last.get("evaluated_at"), "slots": len(last.get("slots", [])),
                "safe_stop": last.get("safe_stop"), "excluded": last.get("excluded"),
                "last_evaluation_s": last.get("evaluation_s")}

    def _connection(self) -> sqlite3.Connection | None:
        path = self.config["store"]["path"]
        if self.conn is None and os.path.exists(path):
            self.conn = connect(path, readonly=True, busy_timeout_ms=1000)
        return self.conn

    def on_timer(self, payload) -> None:
        if payload == "evaluate":
            result = self.evaluate()
            if result.get("ok", True):
                self.write_slots(result)
            if not self._stopping:
                self.after(self.interval, "evaluate")
        elif isinstance(payload, tuple) and payload[0] == "slots_timeout":
            pending = self.waiting.pop(payload[1], None)
            if pending:
                sender, token, reply = pending
                reply = dict(reply, warning="pair_slots not yet written (writer busy)")
                self.send(sender, AdminReply(token, reply))

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
        except (sqlite3.Error, OSError) as exc:
            self.errors += 1
            self.metrics.inc("pairlane_pair_evaluations_total", outcome="error")
            self.log("ERROR", "pair_evaluation_failed", error=exc)
            if self.conn is not None:
                self.conn.close()
                self.conn = None
            return {"ok": False, "error": f"pair evaluation failed: {exc}"}
        elapsed = time.perf_counter() - t0
        self.evaluations += 1
        total = len(cands)
        result = ev.as_dict()
        result.update(evaluated_at=now, evaluation_s=round(elapsed, 6), strategies=total,
                      newest_result_age_s=round(now - newest, 3) if newest else None)
        self.last = result
        missing = ev.excluded.get("missing", 0)
        self.metrics.inc("pairlane_pair_evaluations_total", outcome="safe_stop" if ev.safe_stop else "ok")
        self.metrics.observe("pairlane_pair_evaluation_seconds", elapsed)
        self.metrics.set("pairlane_pair_missing_ratio", missing / total if total else 0.0)
        self.metrics.set("pairlane_pair_slots_filled", float(len(ev.slots)))
        self.metrics.set("pairlane_pair_safe_stop", 1.0 if ev.safe_stop else 0.0)
        if ev.safe_stop:
            reasons = {k: v for k, v in ev.excluded.items() if v}
            self.log("ERROR", "pair_safe_stop", strategies=total, candidates=ev.candidates,
                     **{f"excluded_{k}": v for k, v in ev.excluded.items()})
            self.alert("pair_safe_stop", "raised", "critical", dict(reasons, strategies=total))
        else:
            self.alert("pair_safe_stop", "cleared", "critical")
        self.flush_metrics()
        return result

    def write_slots(self, result: dict, admin=None) -> None:
        token = next(self.tokens)
        if admin is not None:
            self.waiting[token] = admin
            self.after(10.0, ("slots_timeout", token))
        if not self.tell("writer", ReplaceSlots(tuple(result["slots"]), result["evaluated_at"], self.myAddress, token)):
            pending = self.waiting.pop(token, None)
            if pending:
                self.send(pending[0], AdminReply(pending[1], dict(pending[2], warning="writer not running")))

    def on_message(self, msg, sender) -> None:
        if isinstance(msg, AdminCommand):
            if msg.cmd == "pairs.evaluate":
                result = self.evaluate()
                if not result.get("ok", True):
                    return self.send(sender, AdminReply(msg.token, result))
                self.write_slots(result, (sender, msg.token, self._reply(result)))
            elif msg.cmd == "pairs":
                if self.last is None:
                    result = self.evaluate()
                    if result.get("ok") is False:
                        return self.send(sender, AdminReply(msg.token, result))
                    self.write_slots(result)
                self.send(sender, AdminReply(msg.token, self._reply(self.last)))
            elif msg.cmd in ("result", "verify"):
                self.send(sender, AdminReply(msg.token, self._store_view(msg.cmd, msg.args)))
            else:
                self.send(sender, AdminReply(msg.token, {"ok": False, "error": f"pairs does not serve {msg.cmd}"}))
        elif isinstance(msg, SlotsWritten):
            if not msg.ok:
                self.log("ERROR", "pair_slots_write_failed", error=msg.error)
            pending = self.waiting.pop(msg.token, None)
            if pending:
                sender, token, reply = pending
                if not msg.ok:
                    reply = dict(reply, warning=f"pair_slots not written: {msg.error}")
                self.send(sender, AdminReply(token, reply))

    def _store_view(self, cmd: str, args: dict) -> dict:
        """admin `result` and `verify`, read through a read-only connection (the writer is never stalled)."""
        if not self.reader.open_readonly():
            return {"ok": False, "error": "the database does not exist yet"}
        try:
            if cmd == "result":
                rid = args.get("request_id")
                if not isinstance(rid, str):
                    return {"ok": False, "error": "result needs args.request_id"}
                info = self.reader.result_info(rid)
                if info is None:
                    return {"ok": False, "error": f"no result with request_id {rid!r}"}
                return {"ok": True, "result": info}
            return {"ok": True, "problems": self.reader.verify(self.config["gateway"]["assembly_timeout_s"])}
        except StoreError as exc:
            self.reader.close()
            return {"ok": False, "error": f"database unavailable: {exc}"}

    @staticmethod
    def _reply(result: dict) -> dict:
        return {"ok": True, "slots": result["slots"], "candidates": result["candidates"],
                "excluded": result["excluded"], "safe_stop": result["safe_stop"],
                "newest_result_age_s": result["newest_result_age_s"], "evaluated_at": result["evaluated_at"],
                "evaluation_s": result["evaluation_s"], "strategies": result["strategies"]}
