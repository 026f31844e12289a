"""The direct path (pairlane.lifecycle.Forwarded): while the assembler is quiet, the gateway hands new
small one-message results straight to the writer, which writes them only while armed with the
gateway's latest mark. Its promise is that of the usual way: whatever order the gateway, the
assembler and the writer take their mail in, no two results are stored under one request_id, every
`stored` answer is what the store holds, and every producer message is answered.

A model of the three actors drives the real Lifecycle: their queues are the lanes (each ordered, no
order between them), the writer commits to the fake store of test_lifecycle with the store's rules,
the assembler answers local lookups at once from that store (the read the fence must keep from
missing a direct write), and hypothesis chooses who takes the next message.
"""
from __future__ import annotations

import collections

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pairlane import lifecycle as lc
from pairlane.vocab import ResultStatus

from .test_lifecycle import World, meta

TOKEN = "g1"


class Sim:
    def __init__(self, units):
        self.w = World(credit=4, max_requests=8, checked=True)   # the lifecycle (a Probe) and the store
        self.life = self.w.lc
        self.g2a = collections.deque()   # gateway -> assembler: (mark, event)
        self.g2w = collections.deque()   # gateway -> writer: (event, mark)
        self.a2w = collections.deque()   # assembler -> writer: effects, in order
        self.w2a = collections.deque()   # writer -> assembler: events
        self.a2g = collections.deque()   # assembler -> gateway: DirectOpen marks
        self.forwards = 0
        self.direct_mark = None          # the gateway's hint
        self.armed = None                # the writer's fence
        self.direct_writes = 0
        self.refused = 0
        self.replies = []                # (producer, reply), in the order they were sent
        self.units = [Unit(i, *u) for i, u in enumerate(units)]
        self.by_identity = {u.identity: u for u in self.units}

    # ----- the gateway
    def gateway_send(self, unit: "Unit") -> None:
        ev = unit.next_message()
        mark = (TOKEN, self.forwards)
        if isinstance(ev, lc.Result) and self.direct_mark == mark:
            self.g2w.append((ev, mark))
        else:
            self.forwards += 1
            self.g2a.append(((TOKEN, self.forwards), ev))

    def gateway_hint(self) -> None:
        self.direct_mark = self.a2g.popleft()

    # ----- the assembler (the actor's _feed and _flush)
    def feed(self, ev) -> None:
        for eff in self.life.handle(ev):
            if isinstance(eff, lc.Reply):
                self.reply(eff.identity, eff.reply)
            elif isinstance(eff, lc.Lookup) and eff.local_ok:
                self.feed(lc.LookupAnswer(eff.request_id, self.w.row(eff.request_id)))
            elif isinstance(eff, (lc.Write, lc.Record, lc.SetStatus, lc.Lookup, lc.Arm, lc.Sweep)):
                self.a2w.append(eff)
            elif isinstance(eff, lc.DirectOpen):
                self.a2g.append(eff.mark)

    def assembler_from_gateway(self) -> None:
        mark, ev = self.g2a.popleft()
        self.feed(lc.Forwarded(mark))
        self.feed(ev)
        self.feed(lc.Flush())

    def assembler_from_writer(self) -> None:
        self.feed(self.w2a.popleft())
        self.feed(lc.Flush())

    # ----- the writer
    def writer_from_assembler(self) -> None:
        eff = self.a2w.popleft()
        if isinstance(eff, lc.Write):
            self._write(eff)
        elif isinstance(eff, lc.Record):
            self.w.record(eff.meta)
        elif isinstance(eff, lc.SetStatus):
            r = self.w.db.get(eff.request_id)
            if r is not None and eff.status.final_without_rows and not r["status"].stored:
                r["status"], r["chunks"] = eff.status, {}
        elif isinstance(eff, lc.Lookup):
            self.w2a.append(lc.LookupAnswer(eff.request_id, self.w.row(eff.request_id)))
        elif isinstance(eff, lc.Sweep):
            self.w2a.append(lc.SweepDone())
        elif isinstance(eff, lc.Arm):
            self.armed = eff.mark
            self.w2a.append(lc.ArmAck(eff.epoch))

    def _write(self, w: lc.Write) -> None:
        """Writer._write_chunk: a checked write is done only if the store does not hold the request;
        a one-message result's answer goes to its producer once the commit completes it."""
        rid = w.meta["request_id"]
        r = self.w.db.get(rid)
        if w.new_only and r is not None and not r["status"].final_without_rows:
            return self.w2a.append(lc.Skipped(rid, self.w.row(rid)))
        outcome = self.w.commit(w)
        answered = None
        if w.answer is not None and outcome == lc.WriteOutcome.COMPLETE:
            answered, reply = w.answer
            self.reply(answered, reply)
        self.w2a.append(lc.Durable(rid, w.seq, "db", outcome, w.nrows, answered))

    def writer_direct(self) -> None:
        ev, mark = self.g2w.popleft()
        rid = ev.request_id
        r = self.w.db.get(rid)
        if mark != self.armed or (r is not None and not r["status"].final_without_rows):
            self.refused += 1
            return self._refused(ev)
        m = dict(ev.meta)
        self.w.commit(lc.Write(m, 0, ev.raw, ev.nrows, record=True))
        assert self.w.db[rid]["status"] == ResultStatus.COMPLETE
        self.direct_writes += 1
        self.reply(ev.identity, lc.stored_reply(rid, m["total_trades"], "db"))
        self.w2a.append(lc.DirectStored(rid, m, ev.nrows, ev.identity, 0.0))

    def _refused(self, ev) -> None:
        self.w2a.append(ev)   # the assembler takes it as if from the gateway

    # ----- producers
    def reply(self, identity: bytes, reply: dict) -> None:
        self.replies.append((identity, reply))
        self.by_identity[identity].answered(reply)

    def actions(self) -> list:
        acts = []
        if self.g2a:
            acts.append(("a<g", None))
        if self.w2a:
            acts.append(("a<w", None))
        if self.a2w:
            acts.append(("w<a", None))
        if self.g2w:
            acts.append(("w<g", None))
        if self.a2g:
            acts.append(("g<a", None))
        # producers start one after the other (each may still be sending when the next starts)
        started = [u for u in self.units if u.started]
        fresh = [u for u in self.units if not u.started][:1]
        return acts + [("send", u) for u in started + fresh if u.ready()]

    def step(self, act) -> None:
        kind, unit = act
        {"send": lambda: self.gateway_send(unit), "a<g": self.assembler_from_gateway,
         "a<w": self.assembler_from_writer, "w<a": self.writer_from_assembler, "w<g": self.writer_direct,
         "g<a": self.gateway_hint}[kind]()


class Unit:
    """One producer: a one-message result (sent `times` times), or a chunked result (begin, and once
    given credit its two chunks and end)."""

    def __init__(self, i: int, kind: str, rid: str, trades: int, times: int = 1):
        self.identity = f"p{i}".encode()
        self.kind, self.rid, self.trades, self.times = kind, rid, trades, times
        self.queue: list = []
        self.waiting = 0          # replies still expected
        self.started = False
        self.final: list = []     # the replies that ended each exchange
        if kind == "result":
            self.queue = [lc.Result(rid, self.identity, meta(rid, 1, trades), None, "zmq", b"raw", trades)] * times
        elif kind == "abort":
            self.queue = [lc.Abort(rid, self.identity)]
        else:
            self.queue = [lc.Begin(rid, self.identity, meta(rid, 2, trades))]

    def ready(self) -> bool:
        return bool(self.queue)

    def next_message(self):
        self.started = True
        self.waiting += 1
        return self.queue.pop(0)

    def answered(self, reply: dict) -> None:
        self.waiting -= 1
        if self.kind != "chunked":
            self.final.append(reply)
            return
        if reply["type"] == "credit" and "seq" not in reply and not self.final:
            half = self.trades // 2
            self.queue = [lc.Chunk(self.rid, self.identity, 0, b"raw", half),
                          lc.Chunk(self.rid, self.identity, 1, b"raw", self.trades - half),
                          lc.End(self.rid, self.identity)]
            self.final.append(reply)
        elif reply["type"] != "credit":   # the answer to the begin (stored, conflict) or to the end
            self.final.append(reply)

    def finished(self) -> bool:
        if self.queue:
            return False
        if self.kind != "chunked":
            return len(self.final) == self.times
        last = self.final[-1] if self.final else None
        return last is not None and last["type"] != "credit"


# producers of one-message results (sent once or twice), of chunked results and of aborts, over two ids; at
# most one chunked producer per id (two at once would be one producer's protocol error). Each run starts
# with a result of its own id, which opens the direct path if nothing else starts meanwhile.
units_st = st.lists(
    st.tuples(st.sampled_from(["result", "result", "chunked", "abort"]), st.sampled_from(["A", "A", "B"]),
              st.sampled_from([10, 20]), st.sampled_from([1, 1, 2])).map(
        lambda t: (t[0], t[1], t[2], t[3] if t[0] == "result" else 1)),
    min_size=1, max_size=6).filter(
        lambda us: len({u[1] for u in us if u[0] == "chunked"}) == sum(u[0] == "chunked" for u in us))


def run(units, choose, patience: int = 0) -> Sim:
    """Step the model until nothing is left; choose(n) picks one of n actions. With patience p, a
    producer sends only one time in p + 1 while mail waits between the actors."""
    sim = Sim(units)
    for _ in range(2000):
        acts = sim.actions()
        if not acts:
            break
        mail = [a for a in acts if a[0] != "send"]
        if mail and patience and choose(patience + 1):
            acts = mail
        sim.step(acts[choose(len(acts))])
    assert not sim.actions(), "the model did not settle"
    return sim


def check(sim: Sim) -> None:
    stored: dict = {}
    for identity, reply in sim.replies:
        if reply["type"] == "stored":
            stored.setdefault(reply["request_id"], set()).add(reply["trades"])
    for rid, trades in stored.items():
        assert len(trades) == 1, f"{rid} answered stored with two results: {trades}"
        row = sim.w.db.get(rid)
        assert row is not None and row["status"] == ResultStatus.COMPLETE, (rid, row)
        assert row["meta"]["total_trades"] == trades.pop(), (rid, row)
    for u in sim.units:
        assert u.finished(), (u.kind, u.rid, u.final, u.queue, u.waiting)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(units=units_st, data=st.data())
def test_any_interleaving_stores_one_result_per_id_and_answers_everyone(units, data):
    patience = data.draw(st.sampled_from([0, 2, 8]))
    sim = run([("result", "W", 10, 1)] + units, lambda n: data.draw(st.integers(0, n - 1)), patience)
    check(sim)
    event(f"direct writes taken: {min(sim.direct_writes, 2)}+, refused: {min(sim.refused, 2)}+")


def test_a_stream_of_new_results_goes_straight_once_the_assembler_is_quiet():
    """The first result goes the usual way; its checked write leaves the assembler quiet, so it arms
    the writer behind it; the results after that skip the assembler."""
    units = [("result", f"R{i}", 10, 1) for i in range(6)]
    sim = Sim(units)
    for u in sim.units:   # one producer after the other, each waiting for its answer
        sim.gateway_send(u)
        while sim.actions() and not u.finished():
            # the writer first, then the assembler, then the hint: the lanes' usual pace
            acts = sim.actions()
            order = ["w<a", "w<g", "a<g", "a<w", "g<a"]
            sim.step(min((a for a in acts if a[0] != "send"), key=lambda a: order.index(a[0])))
        while [a for a in sim.actions() if a[0] != "send"]:
            sim.step([a for a in sim.actions() if a[0] != "send"][0])
    check(sim)
    assert sim.direct_writes == 5 and sim.life.stats["checked_writes"] == 1
    assert sim.life.stats["direct_writes"] == 5 and sim.life.stats["completed"] == 6
    assert sim.life.direct[0] == "open"


def test_a_begin_disarms_before_its_lookup_so_the_lookup_finds_a_direct_write_taken_before():
    """The race the fence is for: the writer takes a direct result R while a `begin` of R with other
    totals is at the assembler. The begin's lookup must go through the writer, after the Disarm,
    and find R stored: conflict, not credit."""
    sim = Sim([("result", "W", 10, 1), ("result", "R", 10, 1), ("chunked", "R", 20, 1)])
    warm, res, chunked = sim.units
    sim.gateway_send(warm)
    while [a for a in sim.actions() if a[0] != "send"]:
        sim.step([a for a in sim.actions() if a[0] != "send"][0])
    assert sim.life.direct[0] == "open" and sim.direct_mark == (TOKEN, sim.forwards)
    sim.gateway_send(res)          # straight to the writer...
    sim.gateway_send(chunked)      # ...and the begin to the assembler, before the writer takes R
    assert len(sim.g2w) == 1 and len(sim.g2a) == 1
    sim.assembler_from_gateway()   # the begin: Disarm first, then its lookup, through the writer
    assert [type(e).__name__ for e in sim.a2w][:2] == ["Arm", "Lookup"] and sim.a2w[0].mark is None
    assert sim.life.stats["lookups_local"] == 0
    sim.writer_direct()            # the writer takes R (still armed: the Disarm waits behind it)
    while [a for a in sim.actions() if a[0] != "send"]:
        sim.step([a for a in sim.actions() if a[0] != "send"][0])
    check(sim)
    assert res.final[0]["type"] == "stored" and chunked.final[0]["code"] == "conflict"


def test_the_writer_refuses_a_direct_write_after_the_disarm_and_the_usual_way_answers():
    sim = Sim([("result", "W", 10, 1), ("result", "R", 20, 1), ("chunked", "R", 20, 1)])
    warm, res, chunked = sim.units
    sim.gateway_send(warm)
    while [a for a in sim.actions() if a[0] != "send"]:
        sim.step([a for a in sim.actions() if a[0] != "send"][0])
    sim.gateway_send(res)
    sim.gateway_send(chunked)
    sim.assembler_from_gateway()   # the begin: Disarm, Lookup
    sim.writer_from_assembler()    # the Disarm reaches the writer first this time
    assert sim.armed is None
    sim.writer_direct()            # refused: handed to the assembler
    assert sim.direct_writes == 0 and sim.refused == 1
    while [a for a in sim.actions() if a[0] != "send"]:
        sim.step([a for a in sim.actions() if a[0] != "send"][0])
    while sim.actions():
        sim.step(sim.actions()[0])
    check(sim)
    # the begin came first at the assembler: the result (same totals) is in progress as a chunked
    # request there, so it is a conflict; the chunked request completes
    assert res.final[0]["code"] == "conflict" and chunked.final[-1]["type"] == "stored"


def drain(sim: Sim) -> None:
    """Deliver every message between the actors; producers already started send the rest of their
    messages only when nothing else is left; none starts."""
    while True:
        acts = [a for a in sim.actions() if a[0] != "send" or a[1].started]
        if not acts:
            return
        mail = [a for a in acts if a[0] != "send"]
        sim.step(mail[0] if mail else acts[0])


def test_only_flowing_results_open_the_path_so_begins_after_chunked_requests_read_locally():
    """Arming is worth it only while one-message results flow: after a chunked request the next
    message is likely another begin, which would disarm at once and could not read its lookup
    locally meanwhile (that cost a begin/chunk/end round trip 30%). A result opens the path; the
    first begin after it closes it, and the begins after that read locally again."""
    sim = Sim([("chunked", "X", 20, 1), ("chunked", "Y", 20, 1), ("result", "R", 10, 1),
               ("chunked", "Z", 20, 1), ("chunked", "V", 20, 1)])
    x, y, r, z, v = sim.units
    for u in (x, y):
        sim.gateway_send(u)
        drain(sim)
    assert x.finished() and y.finished()
    assert sim.life.direct is None and sim.life.direct_epoch == 0 and sim.life.stats["lookups_local"] == 2
    sim.gateway_send(r)
    drain(sim)
    assert sim.life.direct[0] == "open"
    for u in (z, v):
        sim.gateway_send(u)
        drain(sim)
    assert all(u.finished() for u in sim.units) and sim.life.direct is None
    # Z's lookup went through the writer (the path was open); V's was read locally again
    assert sim.life.stats["lookups_local"] == 3 and sim.life.stats["lookups_via_writer"] == 1
    check(sim)


def test_a_spool_closes_the_path_until_the_dlq_says_it_is_empty_again():
    """The dlq says nothing when a spooled chunk lands: while we believe it holds any, the inventory
    is asked for again every INVENTORY_REFRESH_S (it used to be only at each stale sweep, every
    assembly_timeout_s / 2, and the direct path stayed closed that long after any spool)."""
    w = World(checked=True, dlq_up=True)
    w.send(lc.Forwarded((TOKEN, 1)))
    w.send(result("R"))
    w.durable(location="dlq")            # a checked write the store could not take: looked up...
    w.durable(location="dlq")            # ...and spooled
    assert w.lc.inventory == {"R": {0: (10, lc.totals(meta("R", 1, 10)))}}
    asks = lambda: sum(isinstance(e, lc.AskInventory) for e in w.effects)   # noqa: E731
    w.send(lc.Forwarded((TOKEN, 2)))
    w.send(result("S"))
    w.durable()
    w.send(lc.Flush())
    assert not any(isinstance(e, lc.Arm) for e in w.effects)   # the dlq holds R's chunk
    w.tick(0.5)
    before = asks()
    w.tick(lc.INVENTORY_REFRESH_S)
    assert asks() == before + 1
    w.tick(0.5)
    assert asks() == before + 1          # not again before INVENTORY_REFRESH_S
    w.send(lc.Inventory(()))             # it landed
    assert not w.lc.inventory
    w.send(lc.Flush())
    assert [e for e in w.effects if isinstance(e, lc.Arm)] == [lc.Arm((TOKEN, 2), 1)]
    w.tick(lc.INVENTORY_REFRESH_S * 3)
    assert asks() == before + 1          # nothing believed held: nothing asked


def result(rid, trades=10):
    return lc.Result(rid, b"p", meta(rid, 1, trades), None, "zmq", b"raw", trades)
