"""In-order delivery between actors (supervision/ordering.py and Worker.send_ordered).

Thespian's multiprocTCPBase can swap two messages from one actor to another;
tests/e2e/test_ingest.py::test_replies_keep_their_order_under_load shows it
through the daemon. These tests pin the mechanism down exactly: any arrival
order comes out in send order, a lost message holds the rest back for at most
the gap timeout, and memory stays bounded.
"""
from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st
from thespian.actors import WakeupMessage

from pairlane.supervision import worker as worker_mod
from pairlane.supervision.ordering import Numberer, Resequencer, Sequenced
from pairlane.supervision.worker import Worker


def deliver_all(rs: Resequencer, arrivals: list[tuple[str, int]]) -> list:
    out = []
    for origin, n in arrivals:
        out.extend(rs.accept(origin, n, (origin, n), now=0.0))
    return out


@given(st.permutations(range(40)))
def test_any_arrival_order_comes_out_in_send_order(order):
    rs = Resequencer(gap_timeout_s=5.0)
    assert deliver_all(rs, [("a", n) for n in order]) == [("a", n) for n in range(40)]
    assert rs.held() == 0 and not rs.waiting() and rs.anomalies() == 0
    assert rs.stats["reordered"] == sum(1 for i, n in enumerate(order) if n > min(order[i:]))


@given(st.lists(st.sampled_from("abc"), min_size=1, max_size=60), st.randoms(use_true_random=False))
def test_streams_are_independent(origins, rnd):
    """Each origin is ordered on its own; one stream's gap never holds another back."""
    sent = {o: list(range(origins.count(o))) for o in set(origins)}
    arrivals = [(o, n) for o, ns in sent.items() for n in ns]
    rnd.shuffle(arrivals)
    rs = Resequencer()
    out = deliver_all(rs, arrivals)
    for o, ns in sent.items():
        assert [n for oo, n in out if oo == o] == ns
    assert rs.held() == 0


def test_a_lost_message_holds_the_rest_back_until_the_gap_timeout():
    rs = Resequencer(gap_timeout_s=5.0)
    assert rs.accept("a", 1, "m1", now=10.0) == []
    assert rs.accept("a", 2, "m2", now=11.0) == []
    assert rs.waiting() and rs.held() == 2
    assert rs.expire(now=14.9) == []                     # not yet: 4.9 s since the gap opened
    assert rs.expire(now=15.0) == ["m1", "m2"]           # given up on m0: the rest, in order
    assert not rs.waiting() and rs.stats["gaps_skipped"] == 1
    assert rs.accept("a", 3, "m3", now=16.0) == ["m3"]   # the stream goes on from there
    assert rs.accept("a", 0, "m0", now=17.0) == ["m0"]   # the lost one, if it comes: delivered, alone
    assert rs.stats["late"] == 1 and rs.anomalies() == 2


def test_a_second_gap_is_timed_from_when_it_opens():
    rs = Resequencer(gap_timeout_s=5.0)
    assert rs.accept("a", 1, "m1", now=0.0) == []
    assert rs.accept("a", 3, "m3", now=1.0) == []
    assert rs.accept("a", 0, "m0", now=4.0) == ["m0", "m1"]  # first gap filled; m2 now missing
    assert rs.expire(now=8.9) == []
    assert rs.expire(now=9.0) == ["m3"]


def test_held_messages_are_bounded_per_stream():
    rs = Resequencer(gap_timeout_s=60.0, max_held=3)
    assert [rs.accept("a", n, n, now=0.0) for n in (1, 2, 3)] == [[], [], []]
    assert rs.accept("a", 4, 4, now=0.0) == [1, 2, 3, 4]  # a fourth would exceed max_held: released
    assert rs.held() == 0 and rs.stats["overflows"] == 1


def test_streams_are_bounded_and_only_idle_ones_are_forgotten():
    rs = Resequencer(max_streams=3)
    assert rs.accept("busy", 1, "x", now=0.0) == []         # holds a message: must be kept
    for i in range(10):
        assert rs.accept(f"idle{i}", 0, i, now=0.0) == [i]
    assert len(rs.streams) == 3 and "busy" in rs.streams
    assert rs.accept("busy", 0, "w", now=0.0) == ["w", "x"]


def test_numberer_counts_per_destination_under_one_origin():
    a, b = Numberer(), Numberer()
    assert a.origin != b.origin
    sent = [a.wrap("X", "m0"), a.wrap("Y", "n0"), a.wrap("X", "m1")]
    assert [(s.n, s.msg) for s in sent] == [(0, "m0"), (0, "n0"), (1, "m1")]
    assert {s.origin for s in sent} == {a.origin}


class Recorder(Worker):
    """A Worker outside any actor system: sends and timers are captured, not transmitted."""

    def __init__(self):
        super().__init__()
        self.got: list = []
        self.sent: list = []
        self.timers: list = []

    def on_message(self, msg, sender) -> None:
        self.got.append((msg, sender))

    def send(self, addr, msg):
        self.sent.append((addr, msg))

    def wakeupAfter(self, delay, payload=None):
        self.timers.append((delay, payload))


def test_worker_hands_on_message_what_send_ordered_sent_in_order_whatever_the_arrival_order():
    sender, receiver = Recorder(), Recorder()
    sender.directory = {"peer": "ADDR"}
    for i in range(50):
        if i % 2:
            sender.send_ordered("ADDR", ("msg", i))
        else:
            assert sender.tell("peer", ("msg", i))
    assert not sender.tell("nobody", "x")
    wire = [m for _, m in sender.sent]
    assert all(isinstance(m, Sequenced) for m in wire)
    random.Random(7).shuffle(wire)
    for m in wire:
        receiver.receiveMessage(m, "SENDER")
    assert receiver.got == [(("msg", i), "SENDER") for i in range(50)]
    assert receiver._reseq.held() == 0


def test_worker_releases_held_messages_when_the_gap_timer_fires():
    receiver = Recorder()
    receiver._reseq.gap_timeout_s = 0.0      # the gap is over as soon as the timer fires
    origin = "o"
    receiver.receiveMessage(Sequenced(origin, 1, "second"), "S")
    receiver.receiveMessage(Sequenced(origin, 2, "third"), "S")
    assert receiver.got == []
    assert len(receiver.timers) == 1          # one timer, however many messages wait
    delay, payload = receiver.timers[0]
    assert 0 < delay <= worker_mod.REORDER_GAP_S
    receiver.receiveMessage(WakeupMessage(delay, payload), None)
    assert [m for m, _ in receiver.got] == ["second", "third"]
    receiver.receiveMessage(Sequenced(origin, 0, "first"), "S")   # late: delivered, never dropped
    assert [m for m, _ in receiver.got] == ["second", "third", "first"]
