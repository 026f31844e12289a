"""The I/O-free producer conversation (pairlane.conversation), row by row from PROTOCOL.md section 1.

No sockets and no clock: each test tells a Conversation what the server said
(and what time it is) and checks which frames it wants sent next.
"""
from __future__ import annotations

import pytest

from pairlane.conversation import Conversation, Send

BEGIN = Send("begin")
END = Send("end")


def chunks(*seqs: int) -> list[Send]:
    return [Send("chunk", s) for s in seqs]


def credit(k: int, rid: str = "r") -> dict:
    return {"type": "credit", "request_id": rid, "credit": k}


def ack(seq: int, rid: str = "r") -> dict:
    return {"type": "credit", "request_id": rid, "credit": 1, "seq": seq}


def error(code: str, rid: str = "r", **extra) -> dict:
    return {"type": "error", "request_id": rid, "code": code, "message": f"m-{code}", **extra}


STORED = {"type": "stored", "request_id": "r", "trades": 50, "trades_ref": "r", "location": "db"}


def conv(n_chunks: int = 5, rows: int = 10, **kw) -> Conversation:
    kw.setdefault("timeout_s", 10.0)
    kw.setdefault("retries", 3)
    return Conversation("r", [(i * rows, (i + 1) * rows) for i in range(n_chunks)], **kw)


def test_happy_path_respects_the_window_then_ends_and_stores():
    progress: list[tuple[int, int]] = []
    c = conv(5, progress=lambda a, t: progress.append((a, t)))
    assert c.start(0.0) == [BEGIN]
    assert c.on_reply(credit(2), 0.1) == chunks(0, 1)           # a window of 2: two chunks, no more
    assert c.on_reply(ack(0), 0.2) == chunks(2)                  # one slot freed, one chunk
    assert c.on_reply(ack(1), 0.3) == chunks(3)
    assert c.on_reply(ack(2), 0.4) == chunks(4)
    assert c.on_reply(ack(3), 0.5) == []
    assert c.on_reply(ack(4), 0.6) == [END]                      # all durable: end
    assert c.on_reply(STORED, 0.7) == []
    assert c.finished and c.stored == STORED and c.failure is None and c.wake_at is None
    assert progress == [(10, 50), (20, 50), (30, 50), (40, 50), (50, 50)]
    assert c.stats["max_unacked"] == 2 and c.stats["begins"] == 1 and c.stats["chunks_sent"] == 5


@pytest.mark.parametrize("window, max_window, expect", [(8, None, 5), (8, 3, 3), (0, None, 1), ("x", None, 1)])
def test_window_size_is_the_servers_capped_and_at_least_one(window, max_window, expect):
    c = conv(5, max_window=max_window)
    c.start(0.0)
    assert c.on_reply(credit(window), 0.1) == chunks(*range(expect))


def test_a_duplicate_credit_is_ignored():
    c = conv(3)
    c.start(0.0)
    assert c.on_reply(credit(1), 0.1) == chunks(0)
    assert c.on_reply(ack(0), 0.2) == chunks(1)
    assert c.on_reply(ack(0), 0.3) == []                         # seq 0 again: no new slot, no progress
    assert c.acked == {0} and c.in_flight == {1} and c.acked_rows == 10
    assert c.on_reply(ack(7), 0.4) == [] and c.on_reply(ack(True), 0.4) == []  # out of range, not an int


def test_silence_resends_only_what_is_not_durable():
    c = conv(4, timeout_s=5.0)
    c.start(0.0)
    assert c.on_reply(credit(4), 1.0) == chunks(0, 1, 2, 3)
    c.on_reply(ack(1), 2.0)
    c.on_reply(ack(3), 3.0)
    assert c.wake_at == 8.0                                      # 5 s after the last reply
    assert c.tick(7.9) == []
    assert c.tick(8.0) == [BEGIN]                                # silence: begin again
    assert c.on_reply(credit(4), 8.5) == chunks(0, 2)            # only the seqs not acknowledged
    assert c.stats["timeouts"] == 1 and c.stats["begins"] == 2


def test_credits_granted_before_a_resume_are_void():
    c = conv(3, timeout_s=1.0)
    c.start(0.0)
    assert c.on_reply(credit(2), 0.1) == chunks(0, 1)
    assert c.tick(1.1) == [BEGIN]
    assert c.on_reply(ack(0), 1.2) == []                         # no window yet: nothing goes out
    assert c.on_reply(credit(2), 1.3) == chunks(1, 2)            # a fresh window for what is left


def test_a_later_window_grant_voids_the_one_before():
    c = conv(4, timeout_s=1.0)
    c.start(0.0)
    assert c.tick(1.0) == [BEGIN]                                # two begins out, two grants to come
    assert c.on_reply(credit(2), 1.1) == chunks(0, 1)
    assert c.on_reply(credit(2), 1.2) == chunks(2, 3)            # the second grant is a fresh window
    assert c.stats["window"] == 2 and c.in_flight == {2, 3}


def test_incomplete_resends_the_missing_seqs_then_ends_again():
    c = conv(3)
    c.start(0.0)
    c.on_reply(credit(3), 0.1)
    for s in range(3):
        out = c.on_reply(ack(s), 0.2)
    assert out == [END]
    assert c.on_reply(error("incomplete", missing=[1, 9, "x"]), 0.3) == chunks(1)  # bad seqs skipped
    assert c.acked_rows == 20
    assert c.on_reply(ack(1), 0.4) == [END]
    assert c.on_reply(STORED, 0.5) == [] and c.stored == STORED and c.ends == 2


def test_incomplete_without_missing_or_before_end_is_final():
    c = conv(1)
    c.start(0.0)
    c.on_reply(credit(1), 0.1)
    c.on_reply(ack(0), 0.2)
    assert c.on_reply(error("incomplete"), 0.3) == []            # rows did not add up: failed
    assert c.failure.code == "incomplete" and not c.failure.exhausted and c.finished
    early = conv(2)
    early.start(0.0)
    early.on_reply(credit(1), 0.1)
    early.on_reply(error("incomplete", missing=[1]), 0.2)        # no end was sent: not ours to resend
    assert early.failure.code == "incomplete"


def test_incomplete_rounds_are_bounded():
    c = conv(1, retries=2)
    c.start(0.0)
    c.on_reply(credit(1), 0.1)
    c.on_reply(ack(0), 0.2)
    for round_ in range(2):
        assert c.on_reply(error("incomplete", missing=[0]), 1.0) == chunks(0)
        assert c.on_reply(ack(0), 1.1) == [END]
    assert c.on_reply(error("incomplete", missing=[0]), 2.0) == []
    assert c.failure.code == "incomplete" and "after 2 resends" in c.failure.message


@pytest.mark.parametrize("code", ["busy", "unavailable"])
def test_busy_waits_retry_after_then_resumes(code):
    c = conv(3, timeout_s=10.0)
    c.start(0.0)
    c.on_reply(credit(3), 0.1)
    assert c.on_reply(error(code, retry_after_s=2.0), 1.0) == []
    assert c.backing_off and c.wake_at == 3.0
    assert c.on_reply(ack(0), 1.5) == []                         # acks queued meanwhile still count
    assert c.on_reply(error(code, retry_after_s=2.0), 1.6) == [] and c.stats["busy_waits"] == 1  # stale
    assert c.tick(2.9) == []
    assert c.tick(3.0) == [BEGIN]
    assert c.on_reply(credit(3), 3.1) == chunks(1, 2)
    assert c.stats["busy_waits"] == 1 and c.stats["begins"] == 2


@pytest.mark.parametrize("reply, expect", [({}, 0.01), ({"retry_after_s": 0.5}, 0.5),
                                           ({"retry_after_s": 999}, 30.0), ({"retry_after_s": "x"}, 0.01)])
def test_retry_after_is_bounded(reply, expect):
    assert conv().retry_after(reply) == expect
    assert conv(default_retry_after_s=1.0).retry_after({}) == 1.0


def test_unknown_request_starts_over_but_a_stale_one_is_ignored():
    c = conv(2)
    c.start(0.0)
    assert c.on_reply(error("unknown_request"), 0.1) == []       # before the window: stale
    assert c.on_reply(credit(2), 0.2) == chunks(0, 1)
    c.on_reply(ack(0), 0.3)
    assert c.on_reply(error("unknown_request"), 0.4) == [BEGIN]  # the server lost it
    assert c.acked == set() and c.acked_rows == 0
    assert c.on_reply(credit(2), 0.5) == chunks(0, 1)            # everything goes again


@pytest.mark.parametrize("code", ["conflict", "bad_chunk", "malformed", "too_large"])
def test_final_errors_finish_with_their_code(code):
    c = conv(2)
    c.start(0.0)
    c.on_reply(credit(2), 0.1)
    reply = error(code)
    assert c.on_reply(reply, 0.2) == []
    assert c.finished and c.failure.code == code and c.failure.reply == reply
    assert c.failure.message == f"m-{code}" and not c.failure.exhausted
    assert c.on_reply(ack(0), 0.3) == [] and c.tick(99.0) == []  # finished: deaf


def test_a_final_error_during_backoff_ends_it():
    c = conv(2)
    c.start(0.0)
    c.on_reply(error("busy", retry_after_s=1.0), 0.1)
    c.on_reply(error("conflict"), 0.2)
    assert c.failure.code == "conflict" and c.tick(5.0) == []


def test_stored_at_begin_finishes_without_chunks():
    c = conv(3)
    c.start(0.0)
    assert c.on_reply(STORED, 0.1) == [] and c.stored == STORED and c.stats["chunks_sent"] == 0


def test_retries_count_resumes_without_progress_and_progress_resets_them():
    resumes: list[str] = []
    c = conv(2, timeout_s=1.0, retries=2, on_resume=lambda code, reply: resumes.append(code))
    c.start(0.0)
    assert c.tick(1.0) == [BEGIN] and c.tick(2.0) == [BEGIN]
    c.on_reply(credit(2), 2.1)
    c.on_reply(ack(0), 2.2)                                      # progress: strikes start again
    assert c.strikes == 0
    assert c.tick(3.2) == [BEGIN] and c.tick(4.2) == [BEGIN]
    assert c.tick(5.2) == [] and c.failure is not None
    f = c.failure
    assert (f.code, f.exhausted, f.reply, f.attempts) == ("timeout", True, None, 3)
    assert resumes == ["timeout"] * 4


def test_exhausted_busy_keeps_the_servers_reply():
    c = conv(1, retries=0)
    c.start(0.0)
    reply = error("busy", retry_after_s=0.1)
    c.on_reply(reply, 0.1)
    assert c.failure.code == "busy" and c.failure.exhausted and c.failure.reply == reply


def test_blocked_counts_as_silence_and_waits_when_asked():
    c = conv(2, retries=1)
    c.start(0.0)
    assert c.blocked(0.5) == [BEGIN]                             # resume at once
    assert c.stats["timeouts"] == 1
    c2 = conv(2, retries=5)
    c2.start(0.0)
    assert c2.blocked(0.5, wait_s=1.0) == [] and c2.wake_at == 1.5
    assert c2.tick(1.5) == [BEGIN]
    assert c.blocked(1.0) == [] and c.failure.code == "timeout" and c.failure.exhausted


def test_zero_rows_is_one_empty_chunk():
    progress: list[tuple[int, int]] = []
    c = Conversation("r", [(0, 0)], timeout_s=1.0, retries=1, progress=lambda a, t: progress.append((a, t)))
    c.start(0.0)
    assert c.on_reply(credit(8), 0.1) == chunks(0)
    assert c.on_reply(ack(0), 0.2) == [END] and progress == [(0, 0)]
    with pytest.raises(ValueError):
        Conversation("r", [], timeout_s=1.0, retries=1)
