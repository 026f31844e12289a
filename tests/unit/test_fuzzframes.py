"""pairlane.fuzzframes: valid frames are valid, must-fail mutations always fail the codec, and the
generator is deterministic and covers every mutation."""
from __future__ import annotations

import random

import msgpack
import pytest

from pairlane import codec, fuzzframes

LIMITS = codec.Limits(max_message_bytes=1 << 16)


def decode(frames: list[bytes]) -> dict:
    m = codec.decode_frame(frames, LIMITS)
    if m["type"] in ("chunk", "result", "live_trades"):
        codec.check_columns(m["trades"], m["request_id"], live=m["type"] == "live_trades")
    return m


@pytest.mark.parametrize("kind", fuzzframes.KINDS)
def test_valid_messages_pass_the_codec(kind):
    rng = random.Random(1)
    for i in range(200):
        m = fuzzframes.valid_message(rng, f"fz-{i}", kind)
        assert decode([msgpack.packb(m, use_bin_type=True)])["type"] == kind


@pytest.mark.parametrize("how", sorted(fuzzframes.MUST_FAIL & set(fuzzframes.MAP_MUTATIONS)))
def test_must_fail_map_mutations_always_fail(how):
    rng = random.Random(2)
    for i in range(300):
        m = fuzzframes.mutate_map(rng, fuzzframes.valid_message(rng, f"fz-{i}"), how)
        with pytest.raises(codec.ProtocolError):
            decode([fuzzframes._pack(m, 700)])


@pytest.mark.parametrize("how", sorted(fuzzframes.MUST_FAIL & set(fuzzframes.BYTE_MUTATIONS)))
def test_must_fail_byte_mutations_always_fail(how):
    rng = random.Random(3)
    for i in range(300):
        packed = fuzzframes._pack(fuzzframes.valid_message(rng, f"fz-{i}"))
        frames = fuzzframes.mutate_bytes(rng, packed, how, LIMITS.max_message_bytes)
        with pytest.raises(codec.ProtocolError) as err:
            decode(frames)
        if how == "oversize":
            assert err.value.code == "too_large"


def test_deep_nesting_is_written_by_hand_and_refused():
    m = fuzzframes.mutate_map(random.Random(4), {"type": "end", "request_id": "fz-1"}, "deep_nest")
    packed = fuzzframes._pack(m, 3000)
    assert packed.count(b"\x91") == 3000
    with pytest.raises(codec.ProtocolError):
        decode([packed])


def test_generator_is_deterministic_and_covers_every_mutation():
    a = [fuzzframes.fuzz_frame(random.Random(5), f"fz-{i}", 1 << 16, oversize_share=0.2) for i in range(3)]
    b = [fuzzframes.fuzz_frame(random.Random(5), f"fz-{i}", 1 << 16, oversize_share=0.2) for i in range(3)]
    assert a == b
    rng = random.Random(6)
    seen = {fuzzframes.fuzz_frame(rng, f"fz-{i}", 1 << 12, oversize_share=0.2)[0] for i in range(3000)}
    assert seen == set(fuzzframes.MAP_MUTATIONS) | set(fuzzframes.BYTE_MUTATIONS)


def test_legacy_mutations_are_deterministic_and_varied():
    valid = b'((type . "BACKTEST_RESULT") (result . ((strategy_name . "S") (request_id . "R") (trades . 0))))'
    rng = random.Random(7)
    kinds = {fuzzframes.legacy_mutation(rng, valid)[0] for _ in range(500)}
    assert {"truncate", "flip", "deep_parens", "not_utf8", "garbage"} <= kinds
    assert fuzzframes.legacy_mutation(random.Random(8), valid) == fuzzframes.legacy_mutation(random.Random(8), valid)
