"""Unit tests of the dead-letter spool (pairlane.spool): durability, recovery, caps."""

from __future__ import annotations

import errno
import os
import pickle
import random

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from pairlane import spool as spool_mod
from pairlane.spool import MAGIC, Spool, SpoolFull, SpoolItem, backoff


def _put(sp: Spool, **kw) -> SpoolItem:
    args = dict(request_id="req-1", seq=0, stage="chunk", reason="locked",
                error="database is locked", payload=b"\x81\xa1k\x01", now=1000.0)
    args.update(kw)
    return sp.put(**args)


def _files(path) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.endswith(".dlq"))


def test_put_then_get_returns_every_field_and_payload(tmp_path):
    sp = Spool(str(tmp_path / "dlq"))
    payload = msgpack.packb({"type": "chunk", "seq": 3, "trades": {"pnl": [1.0]}})
    put = sp.put(request_id="r1", seq=3, stage="chunk", reason="full", error="disk full",
                 payload=payload, meta={"strategy_name": "S", "total_chunks": 4},
                 now=50.0, next_retry_at=51.5)
    got = sp.get(put.id)
    assert got.payload == payload
    assert (got.request_id, got.seq, got.stage, got.reason, got.error) == ("r1", 3, "chunk", "full", "disk full")
    assert (got.attempts, got.first_failed_at, got.last_failed_at, got.next_retry_at) == (1, 50.0, 50.0, 51.5)
    assert got.parked is False
    assert got.meta == {"strategy_name": "S", "total_chunks": 4}
    assert got.bytes == os.path.getsize(tmp_path / "dlq" / f"{put.id}.dlq") == put.bytes
    assert put.payload == b""  # header-only copy
    assert len(sp) == 1 and sp.total_bytes == got.bytes


def test_file_starts_with_magic_and_ends_with_crc(tmp_path):
    sp = Spool(str(tmp_path))
    it = _put(sp)
    raw = (tmp_path / f"{it.id}.dlq").read_bytes()
    assert raw.startswith(MAGIC)
    import zlib
    assert int.from_bytes(raw[-4:], "big") == zlib.crc32(raw[:-4])


def test_ids_are_unique_sortable_and_filename_safe(tmp_path):
    sp = Spool(str(tmp_path))
    ids = [_put(sp, seq=i).id for i in range(50)]
    assert ids == sorted(ids) and len(set(ids)) == 50
    assert all(all(c.isalnum() or c == "-" for c in i) for i in ids)


def test_items_survive_reopening_and_new_ids_sort_after_old(tmp_path):
    path = str(tmp_path / "dlq")
    sp = Spool(path)
    a = _put(sp, seq=0, payload=b"A" * 100)
    b = _put(sp, seq=1, payload=b"B")
    sp.record_failure(b.id, "still locked", "locked", now=2000.0, next_retry_at=2010.0, parked=True)
    sp2 = Spool(path)
    assert [i.id for i in sp2.items()] == [a.id, b.id]
    assert sp2.get(a.id).payload == b"A" * 100
    b2 = sp2.get(b.id)
    assert (b2.attempts, b2.parked, b2.error, b2.next_retry_at) == (2, True, "still locked", 2010.0)
    assert sp2.total_bytes == sp.total_bytes and len(sp2) == 2 and sp2.parked_count == 1
    c = _put(sp2, seq=2)
    assert c.id > b.id
    assert sp2.quarantined == []


def test_leftover_tmp_file_is_removed_at_open_and_not_an_item(tmp_path):
    sp = Spool(str(tmp_path))
    it = _put(sp)
    (tmp_path / ".00000000000000000001-000000-1.tmp").write_bytes(MAGIC + b"\x00\x00")
    (tmp_path / "other.tmp").write_bytes(b"half-written")
    sp2 = Spool(str(tmp_path))
    assert [i.id for i in sp2.items()] == [it.id]
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert sorted(sp2.removed_tmp) == [".00000000000000000001-000000-1.tmp", "other.tmp"]


def test_no_tmp_file_remains_after_put(tmp_path):
    sp = Spool(str(tmp_path))
    _put(sp)
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []


@pytest.mark.parametrize("damage", ["flip_payload", "flip_header", "truncate", "bad_magic",
                                    "empty", "extra_byte", "not_msgpack_header"])
def test_corrupt_file_is_quarantined_at_open_and_others_remain(tmp_path, damage):
    sp = Spool(str(tmp_path))
    good1 = _put(sp, seq=0, payload=b"x" * 64)
    bad = _put(sp, seq=1, payload=b"y" * 64)
    good2 = _put(sp, seq=2, payload=b"z" * 64)
    f = tmp_path / f"{bad.id}.dlq"
    raw = bytearray(f.read_bytes())
    if damage == "flip_payload":
        raw[-10] ^= 0xFF
    elif damage == "flip_header":
        raw[len(MAGIC) + 6] ^= 0x01
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "bad_magic":
        raw[0:6] = b"XXXXXX"
    elif damage == "empty":
        raw = bytearray()
    elif damage == "extra_byte":
        raw += b"\x00"
    elif damage == "not_msgpack_header":
        import zlib
        head = b"\xc1" * 8  # 0xc1 is never valid msgpack
        body = MAGIC + len(head).to_bytes(4, "big") + head
        raw = bytearray(body + zlib.crc32(body).to_bytes(4, "big"))
    f.write_bytes(bytes(raw))

    sp2 = Spool(str(tmp_path))
    assert [i.id for i in sp2.items()] == [good1.id, good2.id]
    assert [name for name, _ in sp2.quarantined] == [f"{bad.id}.dlq"]
    assert sp2.quarantined[0][1]  # a reason is given
    assert (tmp_path / "quarantine" / f"{bad.id}.dlq").exists()
    assert not f.exists()
    assert sp2.total_bytes == good1.bytes + good2.bytes
    assert sp2.get(good2.id).payload == b"z" * 64


def test_file_with_foreign_name_is_quarantined(tmp_path):
    (tmp_path / "junk.dlq").write_bytes(b"hello")
    sp = Spool(str(tmp_path))
    assert len(sp) == 0
    assert sp.quarantined[0][0] == "junk.dlq"


def test_file_renamed_to_another_id_is_quarantined(tmp_path):
    sp = Spool(str(tmp_path))
    it = _put(sp)
    os.rename(tmp_path / f"{it.id}.dlq", tmp_path / "00000000000000000005-000000-1.dlq")
    sp2 = Spool(str(tmp_path))
    assert len(sp2) == 0 and "differs from file name" in sp2.quarantined[0][1]


def test_get_of_file_corrupted_after_open_quarantines_then_keyerror(tmp_path):
    sp = Spool(str(tmp_path))
    it = _put(sp, payload=b"p" * 32)
    other = _put(sp, seq=1)
    f = tmp_path / f"{it.id}.dlq"
    raw = bytearray(f.read_bytes())
    raw[-6] ^= 0x55
    f.write_bytes(bytes(raw))
    with pytest.raises(KeyError):
        sp.get(it.id)
    assert [n for n, _ in sp.quarantined] == [f"{it.id}.dlq"]
    assert [i.id for i in sp.items()] == [other.id]
    assert sp.total_bytes == other.bytes
    with pytest.raises(KeyError):
        sp.get(it.id)


def test_get_unknown_or_hostile_id_raises_keyerror(tmp_path):
    sp = Spool(str(tmp_path))
    for bad in ["nope", "../etc/passwd", "", 5, None]:
        with pytest.raises(KeyError):
            sp.get(bad)


def test_cap_raises_spoolfull_naming_path_and_cap_and_leaves_nothing(tmp_path):
    sp = Spool(str(tmp_path), max_bytes=1000)
    first = _put(sp, payload=b"a" * 200)  # ~440 bytes with header
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SpoolFull) as ei:
        _put(sp, payload=b"b" * 600)
    err = ei.value
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert str(tmp_path) in str(err) and "1000" in str(err)
    assert (err.max_bytes, err.used_bytes) == (1000, first.bytes)
    assert sorted(os.listdir(tmp_path)) == before
    assert len(sp) == 1 and sp.total_bytes == first.bytes
    assert _put(sp, payload=b"c" * 10).bytes > 0  # still room for a small one
    e2 = pickle.loads(pickle.dumps(err))
    assert isinstance(e2, SpoolFull) and e2.path == err.path and str(e2) == str(err)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_raises_spoolfull_and_removes_tmp(tmp_path, monkeypatch, code):
    sp = Spool(str(tmp_path))
    keep = _put(sp)

    def full(fd, data):
        os.write(fd, bytes(data[:3]))
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(spool_mod, "_write_all", full)
    with pytest.raises(SpoolFull) as ei:
        _put(sp, seq=9)
    assert ei.value.errno == code
    assert _files(tmp_path) == [f"{keep.id}.dlq"]
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert len(sp) == 1
    monkeypatch.undo()
    assert len(Spool(str(tmp_path))) == 1


def test_other_io_error_propagates_unchanged(tmp_path, monkeypatch):
    sp = Spool(str(tmp_path))

    def eio(fd, data):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(spool_mod, "_write_all", eio)
    with pytest.raises(OSError) as ei:
        _put(sp)
    assert not isinstance(ei.value, SpoolFull) and ei.value.errno == errno.EIO
    assert os.listdir(tmp_path) == ["quarantine"]


def test_record_failure_counts_attempts_and_parks_durably(tmp_path):
    sp = Spool(str(tmp_path))
    it = _put(sp, now=10.0, next_retry_at=11.0)
    r = sp.record_failure(it.id, "database or disk is full", "full", now=20.0, next_retry_at=25.0, parked=False)
    assert (r.attempts, r.first_failed_at, r.last_failed_at, r.next_retry_at) == (2, 10.0, 20.0, 25.0)
    assert (r.reason, r.error, r.parked) == ("full", "database or disk is full", False)
    r = sp.record_failure(it.id, "x" * 10000, "io", now=30.0, next_retry_at=35.0, parked=True)
    assert r.attempts == 3 and r.parked and len(r.error) <= spool_mod.MAX_ERROR_CHARS
    assert sp.parked_count == 1
    assert sp.total_bytes == os.path.getsize(tmp_path / f"{it.id}.dlq") == r.bytes
    reopened = Spool(str(tmp_path)).get(it.id)
    assert reopened.attempts == 3 and reopened.parked and reopened.payload == b"\x81\xa1k\x01"
    with pytest.raises(KeyError):
        sp.record_failure("missing", "e", "io", 1.0, 2.0, False)


def test_set_parked_and_unpark_for_replay(tmp_path):
    sp = Spool(str(tmp_path))
    it = _put(sp, now=0.0, next_retry_at=5.0)
    sp.record_failure(it.id, "e", "io", now=1.0, next_retry_at=2.0, parked=False)
    p = sp.set_parked(it.id, True, next_retry_at=1e18)
    assert p.parked and sp.due(1e19) == [] and sp.parked_count == 1
    u = sp.set_parked(it.id, False, next_retry_at=100.0, reset_attempts=True)
    assert not u.parked and u.attempts == 0 and u.next_retry_at == 100.0
    assert [i.id for i in sp.due(100.0)] == [it.id]
    assert Spool(str(tmp_path)).get(it.id).parked is False


def test_remove_deletes_file_and_updates_totals(tmp_path):
    sp = Spool(str(tmp_path))
    a, b = _put(sp, seq=0), _put(sp, seq=1)
    sp.remove(a.id)
    assert _files(tmp_path) == [f"{b.id}.dlq"]
    assert len(sp) == 1 and sp.total_bytes == b.bytes
    with pytest.raises(KeyError):
        sp.remove(a.id)
    with pytest.raises(KeyError):
        sp.get(a.id)
    assert len(Spool(str(tmp_path))) == 1


def test_due_excludes_parked_and_future_and_orders_by_id(tmp_path):
    sp = Spool(str(tmp_path))
    a = _put(sp, seq=0, next_retry_at=30.0)
    b = _put(sp, seq=1, next_retry_at=10.0)
    c = _put(sp, seq=2, next_retry_at=20.0)
    d = _put(sp, seq=3, next_retry_at=0.0, parked=True)
    assert [i.id for i in sp.due(5.0)] == []
    assert [i.id for i in sp.due(20.0)] == [b.id, c.id]
    assert [i.id for i in sp.due(30.0)] == [a.id, b.id, c.id]
    assert d.id not in [i.id for i in sp.due(1e12)]
    assert all(i.payload == b"" for i in sp.due(30.0))


def test_stats_oldest_and_counts(tmp_path):
    sp = Spool(str(tmp_path))
    assert sp.oldest_first_failed_at is None and len(sp) == 0 and sp.total_bytes == 0
    _put(sp, now=500.0)
    _put(sp, now=300.0, parked=True)
    assert sp.oldest_first_failed_at == 300.0
    assert sp.parked_count == 1 and len(sp) == 2


def test_seqs_for_returns_chunk_seqs_of_one_request(tmp_path):
    sp = Spool(str(tmp_path))
    _put(sp, request_id="r1", seq=0)
    _put(sp, request_id="r1", seq=4, parked=True)
    _put(sp, request_id="r2", seq=1)
    _put(sp, request_id="r1", seq=None, stage="result_meta")
    _put(sp, request_id="r1", seq=7, stage="live_trades")
    assert sp.seqs_for("r1") == {0, 4}
    assert Spool(str(tmp_path)).seqs_for("r1") == {0, 4}
    assert sp.seqs_for("none") == set()


def test_returned_items_are_copies(tmp_path):
    sp = Spool(str(tmp_path))
    it = _put(sp, meta={"k": 1})
    it.meta["k"] = 2
    it.parked = True
    listed = sp.items()[0]
    assert listed.meta == {"k": 1} and listed.parked is False


def test_unpackable_meta_raises_typeerror_and_writes_nothing(tmp_path):
    sp = Spool(str(tmp_path))
    with pytest.raises(TypeError):
        _put(sp, meta={"x": object()})
    assert os.listdir(tmp_path) == ["quarantine"] and len(sp) == 0


def test_backoff_grows_then_caps():
    class Top:
        def random(self):
            return 1.0
    assert backoff(0, 1, 300, Top()) == 1
    assert backoff(1, 1, 300, Top()) == 2
    assert backoff(5, 1, 300, Top()) == 32
    assert backoff(20, 1, 300, Top()) == 300
    assert backoff(10**9, 1, 300, Top()) == 300


@settings(max_examples=300, deadline=None)
@given(attempts=st.integers(min_value=-5, max_value=10**6),
       lo=st.floats(min_value=0, max_value=1e4, allow_nan=False),
       span=st.floats(min_value=0, max_value=1e6, allow_nan=False),
       seed=st.integers(0, 2**32 - 1))
def test_backoff_always_within_bounds(attempts, lo, span, seed):
    hi = lo + span
    d = backoff(attempts, lo, hi, random.Random(seed))
    assert lo <= d <= hi


def test_failed_directory_fsync_after_rename_leaves_no_item_behind(tmp_path, monkeypatch):
    sp = Spool(str(tmp_path))

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_mod, "_fsync_dir", full)
    with pytest.raises(SpoolFull):
        _put(sp)
    monkeypatch.undo()
    assert _files(tmp_path) == [] and len(sp) == 0
    assert len(Spool(str(tmp_path))) == 0
