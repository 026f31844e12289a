"""How the assembler cuts its writer outbox into WriterBatches (actors.assembler.batch_length)."""
from __future__ import annotations

from pairlane.actors.assembler import batch_length
from pairlane.actors.messages import Lookup, SetStatus, WriteChunk


def chunk(nbytes: int) -> WriteChunk:
    return WriteChunk({"request_id": "R"}, 0, b"x" * nbytes, 1)


def test_small_messages_go_together_up_to_max_items():
    box = [Lookup("A"), chunk(10), SetStatus("A", "abandoned"), chunk(10), chunk(10)]
    assert batch_length(box, 32, 1000) == 5
    assert batch_length(box, 3, 1000) == 3


def test_chunk_bytes_bound_a_batch_but_the_first_message_always_goes():
    assert batch_length([chunk(600), chunk(600), chunk(10)], 32, 1000) == 1
    assert batch_length([chunk(5000), chunk(10)], 32, 1000) == 1     # bigger than the bound: alone
    assert batch_length([chunk(400), chunk(500), chunk(200)], 32, 1000) == 2
    assert batch_length([Lookup("A"), chunk(900), Lookup("B")], 32, 1000) == 3


def test_empty_outbox_makes_no_batch():
    assert batch_length([], 32, 1000) == 0
