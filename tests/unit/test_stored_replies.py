"""The gateway's memory of just-stored results (pairlane.stored_replies), on a fake clock."""
from __future__ import annotations

from pairlane.stored_replies import StoredReplies


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_stored_replies_answer_end_only_while_fresh_and_stay_bounded():
    clock = Clock()
    sr = StoredReplies(keep_s=60.0, cap=3, clock=clock)
    reply = {"type": "stored", "request_id": "A", "trades": 1, "trades_ref": "A", "location": "db"}
    sr.add("A", reply)
    assert sr.reply_for_end("A") == reply and sr.reply_for_end("B") is None
    clock.t += 61
    assert sr.reply_for_end("A") is None                           # too old: the assembler answers
    for i in range(10):
        sr.add(f"r{i}", reply)
    assert list(sr.items) == ["r7", "r8", "r9"] and sr.answered == 1
    sr.forget("r9")                                                # another message of r9 went on
    assert sr.reply_for_end("r9") is None and sr.reply_for_end("r8") == reply
