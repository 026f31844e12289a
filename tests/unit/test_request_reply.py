"""supervision.requests: correlation ids, deadlines and late replies (pure logic, injected clock,
and a stand-in actor that records what it is asked to send and which wakeups it arms)."""
from __future__ import annotations

import pytest

from pairlane.supervision.requests import DEADLINE_TIMER, Correlator, Requests


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class FakeActor:
    """What Requests needs of a Worker: send, send_ordered, after."""

    def __init__(self) -> None:
        self.sent: list = []
        self.timers: list = []

    def send(self, addr, msg) -> None:
        self.sent.append(("send", addr, msg))

    def send_ordered(self, addr, msg) -> None:
        self.sent.append(("ordered", addr, msg))

    def after(self, delay_s, payload) -> None:
        self.timers.append((delay_s, payload))


def recorder():
    got: list = []
    return got, got.append, lambda: got.append("TIMEOUT")


def test_each_request_gets_its_own_id_and_its_reply_goes_to_its_own_callback():
    c = Correlator(Clock())
    got_a, reply_a, timeout_a = recorder()
    got_b, reply_b, timeout_b = recorder()
    a = c.open("a", 5, reply_a, timeout_a)
    b = c.open("b", 5, reply_b, timeout_b)
    assert a != b and 0 not in (a, b) and len(c) == 2
    assert c.waiting_on() == ["a", "b"]
    assert c.answer(b, "for b") is True
    assert c.answer(a, "for a") is True
    assert (got_a, got_b) == (["for a"], ["for b"])
    assert len(c) == 0 and c.stats() == {"pending": 0, "answered": 2, "expired": 0, "late": 0}


def test_a_second_reply_and_an_unknown_id_are_dropped_and_counted_late():
    c = Correlator(Clock())
    got, on_reply, on_timeout = recorder()
    cid = c.open("x", 5, on_reply, on_timeout)
    assert c.answer(cid, 1) is True
    assert c.answer(cid, 2) is False
    assert c.answer(cid + 1000, 3) is False
    assert c.answer("not an id", 4) is False
    assert got == [1] and c.late == 3


def test_a_request_past_its_deadline_times_out_once_and_its_late_reply_is_dropped():
    clock = Clock()
    c = Correlator(clock)
    got, on_reply, on_timeout = recorder()
    cid = c.open("slow", 2.0, on_reply, on_timeout)
    clock.t += 1.999
    assert c.expire() == 0 and cid in c
    clock.t += 0.002
    assert c.expire() == 1 and cid not in c
    assert c.expire() == 0
    assert c.answer(cid, "too late") is False
    assert got == ["TIMEOUT"] and c.stats()["expired"] == 1 and c.late == 1


def test_expire_times_out_only_the_requests_that_are_due():
    clock = Clock()
    c = Correlator(clock)
    got, on_reply, on_timeout = recorder()
    short = c.open("short", 1, on_reply, on_timeout)
    long = c.open("long", 10, on_reply, on_timeout)
    assert c.expire(now=clock.t + 5) == 1
    assert short not in c and long in c
    assert c.answer(long, "ok") and got == ["TIMEOUT", "ok"]


def test_cancel_forgets_without_calling_anything():
    c = Correlator(Clock())
    got, on_reply, on_timeout = recorder()
    cid = c.open("x", 1, on_reply, on_timeout)
    assert c.cancel(cid) is True and c.cancel(cid) is False
    assert c.time_out(cid) is False and c.answer(cid, "r") is False
    assert got == []


def test_ask_sends_the_request_built_with_its_id_and_arms_a_deadline_wakeup():
    actor = FakeActor()
    r = Requests(actor, Clock())
    got, on_reply, on_timeout = recorder()
    cid = r.ask("addr", lambda i: ("Req", i), "peer", 3.0, on_reply, on_timeout)
    assert actor.sent == [("send", "addr", ("Req", cid))]
    assert actor.timers == [(3.0, (DEADLINE_TIMER, cid))]
    cid2 = r.ask("addr2", lambda i: ("Req", i), "peer2", 1.0, on_reply, on_timeout, ordered=True)
    assert actor.sent[-1] == ("ordered", "addr2", ("Req", cid2))
    assert r.answer(cid, "reply") and got == ["reply"]


@pytest.mark.parametrize("answered_first", [False, True])
def test_the_deadline_wakeup_times_out_only_an_unanswered_request(answered_first):
    actor = FakeActor()
    r = Requests(actor, Clock())
    got, on_reply, on_timeout = recorder()
    cid = r.expect("reader", 2.0, on_reply, on_timeout)
    if answered_first:
        r.answer(cid, "done")
    (_, payload), = actor.timers
    assert r.on_timer(payload) is True
    assert got == (["done"] if answered_first else ["TIMEOUT"])
    assert r.on_timer("someone else's timer") is False
    assert r.on_timer(("other", cid)) is False
