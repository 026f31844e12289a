"""Producer side (pairlane.client, entry.send) against an in-test fake gateway.

The fake gateway is a ZMQ ROUTER on 127.0.0.1 (random port) in a thread that
speaks PROTOCOL.md section 1 (credit windows, durable re-acks, end/incomplete)
and can misbehave on purpose: drop an ack, answer busy once, forget a
request, lose a chunk before `end`, never answer. It records every chunk it
stores so the tests can assert each seq is stored exactly once, and the
largest number of chunks a producer had unacknowledged.
"""
from __future__ import annotations

import collections
import json
import re
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pairlane.entry import send as cli_send
from pairlane.client import (Producer, SendError, encode_chunk, load_file, plan_chunks, prepare_columns,
                             synthetic_columns)
from pairlane.codec import FLOAT_COLS, INT_COLS, STR_COLS

_KIND = {**{c: "<i8" for c in INT_COLS}, **{c: "<f8" for c in FLOAT_COLS}}


def decode_trades(trades: dict) -> dict:
    """Wire columns -> Python lists (bin decoded with numpy.frombuffer)."""
    out = {}
    for col, values in trades.items():
        if isinstance(values, bytes):
            out[col] = np.frombuffer(values, dtype=_KIND[col]).tolist()
        else:
            out[col] = list(values)
    return out


# ----------------------------------------------------------------------------
# the fake gateway

class FakeGateway:
    def __init__(self, credit: int = 3, *, max_message_bytes: int = 1 << 20,
                 drop_first_ack: bool = False, busy_once: str | None = None,
                 forget_after_first_ack: bool = False, lose_before_end: int | None = None,
                 mute: bool = False, noise: bool = False, preexisting: dict | None = None,
                 stored: dict | None = None) -> None:
        self.credit = credit
        self.max_message_bytes = max_message_bytes
        self.drop_first_ack = drop_first_ack
        self.busy_once = busy_once
        self.forget_after_first_ack = forget_after_first_ack
        self.lose_before_end = lose_before_end
        self.mute = mute
        self.noise = noise
        self.requests: dict[str, dict] = dict(preexisting or {})
        self.stored: dict[str, dict] = dict(stored or {})
        self.store: collections.Counter = collections.Counter()  # (rid, seq) -> times stored
        self.rows: dict[tuple[str, int], dict] = {}
        self.outstanding: dict[str, list] = collections.defaultdict(list)  # rid -> [[ident, seq, dropped]]
        self.max_outstanding = 0
        self.received: list[tuple[str, object]] = []
        self.max_frame = 0
        self.problems: list[str] = []
        self._fired: set[str] = set()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        port = self._sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-gateway", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close(0)
        self._ctx.term()

    def _once(self, name: str) -> bool:
        if name in self._fired:
            return False
        self._fired.add(name)
        return True

    def _reply(self, ident: bytes, msg: dict) -> None:
        self._sock.send_multipart([ident, msgpack.packb(msg, use_bin_type=True)])

    def _error(self, ident: bytes, rid, code: str, **extra) -> None:
        self._reply(ident, {"type": "error", "request_id": rid, "code": code,
                            "message": f"fake {code}", **extra})

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        last_msg = time.monotonic()
        while not self._stop.is_set():
            if poller.poll(5):
                frames = self._sock.recv_multipart()
                last_msg = time.monotonic()
                try:
                    self._handle(frames[0], frames[1:])
                except Exception as e:  # surfaced by the tests, never kills the thread
                    self.problems.append(repr(e))
            elif time.monotonic() - last_msg > 0.01:
                # acks only once the producer has gone quiet, so one that overruns
                # its window is caught with more than `credit` chunks outstanding
                self._flush()

    def _flush(self) -> None:
        for rid, pending in list(self.outstanding.items()):
            keep = []
            for entry in pending:
                ident, seq, dropped = entry
                if dropped:
                    keep.append(entry)
                    continue
                self._reply(ident, {"type": "credit", "request_id": rid, "credit": 1, "seq": seq})
                if self.forget_after_first_ack and self._once("forget"):
                    self.requests.pop(rid, None)
                    for key in [k for k in self.store if k[0] == rid]:
                        del self.store[key]
                    keep = []
                    break
            self.outstanding[rid] = keep

    def _handle(self, ident: bytes, frames: list[bytes]) -> None:
        if len(frames) != 1:
            return self._error(ident, None, "malformed")
        frame = frames[0]
        self.max_frame = max(self.max_frame, len(frame))
        if len(frame) > self.max_message_bytes:
            self.problems.append(f"frame of {len(frame)} bytes over {self.max_message_bytes}")
            return self._error(ident, None, "too_large")
        try:
            msg = msgpack.unpackb(frame, raw=False)
            assert isinstance(msg, dict)
        except Exception:
            return self._error(ident, None, "malformed")
        kind, rid = msg.get("type"), msg.get("request_id")
        self.received.append((kind, msg.get("seq")))
        if self.mute:
            return
        if kind == "live_trades":
            n = len(decode_trades(msg["trades"])["pnl"])
            return self._reply(ident, {"type": "stored", "request_id": msg["batch_id"], "trades": n,
                                       "trades_ref": msg["batch_id"], "location": "db"})
        if kind == "begin":
            return self._begin(ident, rid, msg)
        req = self.requests.get(rid)
        if req is None or req.get("status") == "stored":
            return self._error(ident, rid, "unknown_request")
        if kind == "chunk":
            return self._chunk(ident, rid, req, msg)
        if kind == "end":
            return self._end(ident, rid, req)
        return self._error(ident, rid, "malformed")

    def _begin(self, ident: bytes, rid: str, msg: dict) -> None:
        if self.noise:
            self._reply(ident, {"type": "credit", "request_id": "someone-else", "credit": 1, "seq": 0})
            self._error(ident, "someone-else", "conflict")
            self._reply(ident, {"type": "stored", "request_id": "someone-else", "trades": 1})
        if self.busy_once == "begin" and self._once("busy"):
            return self._error(ident, rid, "busy", retry_after_s=0.05)
        key = (msg["strategy_name"], msg["total_trades"], msg["total_chunks"])
        if rid in self.stored:
            if self.stored[rid]["key"] != key:
                return self._error(ident, rid, "conflict")
            return self._reply(ident, self.stored[rid]["reply"])
        req = self.requests.get(rid)
        if req is not None and req["key"] != key:
            return self._error(ident, rid, "conflict")
        if req is None:
            req = self.requests[rid] = {"key": key, "total_trades": msg["total_trades"],
                                        "total_chunks": msg["total_chunks"], "durable": {},
                                        "begin": msg}
        self.outstanding[rid] = []  # credits granted before are void
        self._reply(ident, {"type": "credit", "request_id": rid,
                            "credit": min(self.credit, req["total_chunks"])})

    def _chunk(self, ident: bytes, rid: str, req: dict, msg: dict) -> None:
        seq = msg["seq"]
        if not 0 <= seq < req["total_chunks"]:
            return self._error(ident, rid, "bad_chunk")
        cols = decode_trades(msg["trades"])
        lengths = {len(v) for v in cols.values()}
        if len(lengths) != 1 or "timestamp" not in cols or "pnl" not in cols:
            return self._error(ident, rid, "bad_chunk")
        if self.busy_once == "chunk" and seq == 1 and self._once("busy"):
            return self._error(ident, rid, "busy", retry_after_s=0.05)
        if seq in req["durable"]:
            return self._reply(ident, {"type": "credit", "request_id": rid, "credit": 1, "seq": seq})
        req["durable"][seq] = lengths.pop()
        self.store[(rid, seq)] += 1
        self.rows[(rid, seq)] = cols
        pending = self.outstanding[rid]
        pending.append([ident, seq, self.drop_first_ack and self._once("drop")])
        self.max_outstanding = max(self.max_outstanding, len(pending))
        if len(pending) > self.credit:
            self.problems.append(f"{len(pending)} chunks unacknowledged, credit {self.credit}")

    def _end(self, ident: bytes, rid: str, req: dict) -> None:
        missing = [s for s in range(req["total_chunks"]) if s not in req["durable"]]
        if not missing and self.lose_before_end is not None and self._once("lose"):
            seq = self.lose_before_end
            del req["durable"][seq]
            self.store[(rid, seq)] -= 1
            missing = [seq]
        if missing:
            return self._error(ident, rid, "incomplete", missing=missing[:1000])
        if sum(req["durable"].values()) != req["total_trades"]:
            return self._error(ident, rid, "incomplete")
        reply = {"type": "stored", "request_id": rid, "trades": req["total_trades"],
                 "trades_ref": rid, "location": "db"}
        self.stored[rid] = {"key": req["key"], "reply": reply}
        req["status"] = "stored"
        self._reply(ident, reply)


@pytest.fixture(autouse=True)
def no_leaked_threads():
    before = set(threading.enumerate())
    yield
    leaked = [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not leaked, f"threads left running: {leaked}"


@pytest.fixture
def gateway():
    made: list[FakeGateway] = []

    def make(**kw) -> FakeGateway:
        gw = FakeGateway(**kw)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.close()


def assert_stored_once(gw: FakeGateway, rid: str, cols: dict) -> None:
    req = gw.requests[rid]
    total = req["total_chunks"]
    assert {s: gw.store[(rid, s)] for s in range(total)} == {s: 1 for s in range(total)}
    assert not [k for k, v in gw.store.items() if k[0] == rid and k[1] >= total and v]
    got = [gw.rows[(rid, s)] for s in range(total)]
    assert sum(len(c["pnl"]) for c in got) == len(cols["pnl"])
    assert [t for c in got for t in c["timestamp"]] == list(np.asarray(cols["timestamp"]))
    assert [p for c in got for p in c["pnl"]] == list(np.asarray(cols["pnl"]))


# ----------------------------------------------------------------------------
# encoding

def test_encode_chunk_roundtrip_bin_and_lists():
    cols = {
        "timestamp": np.array([1, 2, 3, 4], dtype=np.int64),
        "pnl": [0.5, -1.25, 2.0, 3],          # a list without None -> bin, int accepted as float
        "hold_time": [60, None, 120, 30],     # None -> list
        "sl": np.array([1.0, np.nan, 2.0, 3.0]),  # NaN in an optional column means missing
        "symbol": ["USDJPY", None, "EURUSD", "ü"],
    }
    frame = encode_chunk("req-1", 7, cols, 1, 4)
    msg = msgpack.unpackb(frame, raw=False)
    assert msg["type"] == "chunk" and msg["request_id"] == "req-1" and msg["seq"] == 7
    t = msg["trades"]
    assert isinstance(t["timestamp"], bytes) and isinstance(t["pnl"], bytes)
    assert np.frombuffer(t["timestamp"], dtype="<i8").tolist() == [2, 3, 4]
    assert np.frombuffer(t["pnl"], dtype="<f8").tolist() == [-1.25, 2.0, 3.0]
    assert t["hold_time"] == [None, 120, 30]
    assert t["sl"] == [None, 2.0, 3.0]
    assert t["symbol"] == [None, "EURUSD", "ü"]
    # rows without None in this slice go as bin again
    t2 = msgpack.unpackb(encode_chunk("req-1", 0, cols, 2, 4), raw=False)["trades"]
    assert np.frombuffer(t2["hold_time"], dtype="<i8").tolist() == [120, 30]


@pytest.mark.parametrize("cols, needle", [
    ({"timestamp": [1], "pnl": [float("nan")]}, "NaN"),
    ({"timestamp": [1], "pnl": [float("inf")]}, "infinity"),
    ({"timestamp": [1], "pnl": [True]}, "expected a number"),
    ({"timestamp": [1.5], "pnl": [1.0]}, "whole number"),
    ({"timestamp": [1, 2], "pnl": [1.0]}, "differ in length"),
    ({"timestamp": [1], "pnl": [1.0], "colour": ["red"]}, "unknown column"),
    ({"timestamp": [1]}, "missing required column"),
    ({"timestamp": [1], "pnl": [None]}, "row 0: missing value"),
    ({"timestamp": [1], "pnl": [1.0], "symbol": [3]}, "expected a string"),
    ({"timestamp": [1], "pnl": [1.0], "regime": ["x" * 257]}, "0-256 characters"),
    ({"timestamp": [1, 2], "pnl": [1.0, 2.0], "symbol": ["X", "Y\x00"]}, "row 1: .*NUL"),
])
def test_bad_columns_are_refused_before_sending(cols, needle):
    with pytest.raises(ValueError, match=needle):
        prepare_columns(cols)


short_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=80)


@st.composite
def column_sets(draw):
    n = draw(st.integers(0, 300))
    cols = {"timestamp": np.arange(n, dtype=np.int64) * 60,
            "pnl": np.array(draw(st.lists(st.floats(-1e6, 1e6), min_size=n, max_size=n)))}
    for name in draw(st.sets(st.sampled_from(("hold_time", "volume", "sl")))):
        if draw(st.booleans()):
            cols[name] = draw(st.lists(st.one_of(st.none(), st.integers(0, 10**6)),
                                       min_size=n, max_size=n))
        else:
            cols[name] = np.ones(n)
    for name in draw(st.sets(st.sampled_from(STR_COLS[:3]))):
        cols[name] = draw(st.lists(st.one_of(st.none(), short_text), min_size=n, max_size=n))
    return cols


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cols=column_sets(), limit=st.integers(2048, 20000))
def test_plan_chunks_fits_every_frame_and_covers_each_row_once(cols, limit):
    ranges = plan_chunks(cols, limit)
    n = len(cols["pnl"])
    if n == 0:
        assert ranges == [(0, 0)]
    else:
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a < b for a, b in ranges)
        assert all(prev[1] == nxt[0] for prev, nxt in zip(ranges, ranges[1:]))
    for seq, (a, b) in enumerate(ranges):
        frame = encode_chunk("r" * 128, 2**40 + seq, cols, a, b)
        assert len(frame) <= limit


def test_plan_chunks_uses_most_of_the_budget_and_refuses_a_row_that_cannot_fit():
    cols = synthetic_columns(20_000, seed=1)
    ranges = plan_chunks(cols, 64 * 1024)
    sizes = [len(encode_chunk("req", s, cols, a, b)) for s, (a, b) in enumerate(ranges)]
    assert max(sizes) <= 64 * 1024 and min(sizes[:-1]) > 0.6 * 64 * 1024
    with pytest.raises(ValueError, match="row 1 needs about"):
        plan_chunks({"timestamp": [1, 2], "pnl": [1.0, 2.0], "regime": ["x", "y" * 250],
                     "symbol": ["x", "ü" * 250], "category": ["x", "€" * 250]}, 1536)


def test_synthetic_is_reproducible_by_seed_and_plausible():
    a, b = synthetic_columns(500, seed=3), synthetic_columns(500, seed=3)
    c = synthetic_columns(500, seed=4)
    for col in a:
        assert np.array_equal(np.asarray(a[col]), np.asarray(b[col])), col
    assert not np.array_equal(a["pnl"], c["pnl"])
    assert not np.array_equal(a["pnl"], synthetic_columns(500, seed=3, strategy="T")["pnl"])
    prepared, n = prepare_columns(a)
    assert n == 500 and set(a) <= set(INT_COLS + FLOAT_COLS + STR_COLS)
    gaps = np.diff(a["timestamp"])
    assert gaps.min() >= 300 and gaps.max() <= 4 * 3600
    assert np.all(a["hold_time"][:-1] < gaps)
    assert a["pnl"].std() > 0 and set(a["direction"]) == {"BUY", "SELL"}
    assert a["timestamp"][0] == 1_700_000_000


# ----------------------------------------------------------------------------
# files

def test_load_json_rows_with_meta(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({
        "strategy_name": "S-1", "metrics": {"sharpe": 1.5, "trades": 2}, "rank": "A",
        "timeframe": 60, "trades": [
            {"timestamp": 1700000000, "pnl": 1.5, "symbol": "USDJPY"},
            {"timestamp": 1700000060, "pnl": -2, "hold_time": 30}]}))
    cols, meta = load_file(str(path))
    assert meta == {"strategy_name": "S-1", "metrics": {"sharpe": 1.5, "trades": 2},
                    "rank": "A", "timeframe": 60}
    assert cols["timestamp"].tolist() == [1700000000, 1700000060]
    assert cols["pnl"].tolist() == [1.5, -2.0]
    assert cols["symbol"] == ["USDJPY", None] and cols["hold_time"] == [None, 30]


def test_load_json_plain_list_and_columnar(tmp_path):
    p1 = tmp_path / "a.json"
    p1.write_text(json.dumps([{"timestamp": 1, "pnl": 0.5}]))
    cols, meta = load_file(str(p1))
    assert cols["pnl"].tolist() == [0.5] and meta == {}
    p2 = tmp_path / "b.json"
    p2.write_text(json.dumps({"trades": {"timestamp": [1, 2], "pnl": [0.5, 0.25]}}))
    cols, _ = load_file(str(p2))
    assert cols["timestamp"].tolist() == [1, 2]


def test_load_msgpack_with_bin_columns(tmp_path):
    path = tmp_path / "r.msgpack"
    path.write_bytes(msgpack.packb({
        "strategy_name": "S-2", "oos_kind": "wfo",
        "trades": {"timestamp": np.array([5, 6], dtype="<i8").tobytes(),
                   "pnl": [1.0, 2.0], "direction": ["BUY", "SELL"]}}, use_bin_type=True))
    cols, meta = load_file(str(path))
    assert meta == {"strategy_name": "S-2", "oos_kind": "wfo"}
    assert cols["timestamp"].tolist() == [5, 6] and cols["direction"] == ["BUY", "SELL"]


def test_load_csv_with_optional_columns(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("timestamp,pnl,symbol,hold_time,volume\n"
                    "1700000000,1.5,USDJPY,60,0.1\n"
                    "\n"
                    "1700000060,-0.5,,,0.2\n")
    cols, meta = load_file(str(path))
    assert meta == {}
    assert cols["timestamp"].tolist() == [1700000000, 1700000060]
    assert cols["pnl"].tolist() == [1.5, -0.5]
    assert cols["symbol"] == ["USDJPY", None] and cols["hold_time"] == [60, None]
    assert cols["volume"].tolist() == [0.1, 0.2]


def test_load_csv_errors_name_the_file_and_the_problem(tmp_path):
    path = tmp_path / "nopnl.csv"
    path.write_text("timestamp,symbol\n1,USDJPY\n")
    with pytest.raises(ValueError, match=r"nopnl\.csv: missing column\(s\) 'pnl'"):
        load_file(str(path))
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp,pnl\n1,0.5\n2,abc\n")
    with pytest.raises(ValueError, match=r"bad\.csv: line 3: column 'pnl': bad number 'abc'"):
        load_file(str(bad))
    iso = tmp_path / "iso.csv"
    iso.write_text("timestamp,pnl\n2024-01-01T00:00:00,1\n")
    with pytest.raises(ValueError, match="Unix seconds"):
        load_file(str(iso))
    js = tmp_path / "nan.json"
    js.write_text('[{"timestamp": 1, "pnl": 1}, {"timestamp": 2, "pnl": "x"}]')
    with pytest.raises(ValueError, match=r"nan\.json: column 'pnl' row 1: expected a number"):
        load_file(str(js))


# ----------------------------------------------------------------------------
# the protocol

COLS = synthetic_columns(2000, seed=11)


def _send(gw: FakeGateway, rid: str = "req-1", *, timeout_s: float = 2.0, retries: int = 3,
          cols: dict = COLS, **kw) -> tuple[dict, Producer, list]:
    seen: list[tuple[int, int]] = []
    with Producer(gw.endpoint, timeout_s=timeout_s, retries=retries, max_message_bytes=8192) as p:
        reply = p.send_result(rid, "S-11", cols, progress=lambda a, t: seen.append((a, t)), **kw)
    return reply, p, seen


@pytest.mark.parametrize("noise", [False, True])
def test_stores_every_chunk_once_within_the_credit_window(gateway, noise):
    gw = gateway(credit=3, max_message_bytes=8192, noise=noise)
    reply, p, seen = _send(gw, metrics={"sharpe": 1.0}, meta={"symbol": "USDJPY", "rank": "A"})
    assert reply == {"type": "stored", "request_id": "req-1", "trades": 2000,
                     "trades_ref": "req-1", "location": "db"}
    assert_stored_once(gw, "req-1", COLS)
    assert gw.requests["req-1"]["total_chunks"] > 10   # several windows' worth
    assert gw.max_outstanding <= 3 and p.last_stats["max_unacked"] == 3
    assert gw.max_frame <= 8192 and not gw.problems
    begin = gw.requests["req-1"]["begin"]
    assert begin["metrics"] == {"sharpe": 1.0} and begin["symbol"] == "USDJPY" and begin["rank"] == "A"
    assert seen[-1] == (2000, 2000) and [a for a, _ in seen] == sorted(a for a, _ in seen)
    assert [k for k, _ in gw.received].count("begin") == 1


def test_a_lost_ack_times_out_and_resumes_without_duplicates(gateway):
    gw = gateway(credit=3, max_message_bytes=8192, drop_first_ack=True)
    reply, p, _ = _send(gw, timeout_s=0.3)
    assert reply["type"] == "stored"
    assert_stored_once(gw, "req-1", COLS)
    assert p.last_stats["timeouts"] == 1 and p.last_stats["begins"] == 2
    assert gw.max_outstanding <= 3 and p.last_stats["max_unacked"] <= 3 and not gw.problems
    # the unacked seq went out again and was re-acknowledged as durable
    assert [s for k, s in gw.received if k == "chunk"].count(0) == 2


@pytest.mark.parametrize("where", ["begin", "chunk"])
def test_busy_waits_retry_after_and_resumes(gateway, where):
    gw = gateway(credit=3, max_message_bytes=8192, busy_once=where)
    t0 = time.monotonic()
    reply, p, _ = _send(gw)
    assert reply["type"] == "stored" and time.monotonic() - t0 >= 0.05
    assert_stored_once(gw, "req-1", COLS)
    assert p.last_stats["busy_waits"] == 1 and p.last_stats["begins"] == 2
    assert gw.max_outstanding <= 3 and p.last_stats["max_unacked"] <= 3 and not gw.problems


def test_conflict_is_final(gateway):
    gw = gateway(preexisting={"req-1": {"key": ("other", 1, 1), "total_trades": 1,
                                        "total_chunks": 1, "durable": {}}})
    with pytest.raises(SendError) as ei:
        _send(gw)
    err = ei.value
    assert err.code == "conflict" and err.request_id == "req-1" and err.reply["code"] == "conflict"
    assert "req-1" in str(err) and "fake conflict" in str(err) and "new request_id" in str(err)
    assert [k for k, _ in gw.received] == ["begin"]


def test_already_stored_returns_the_stored_reply_without_chunks(gateway):
    prepared, n = prepare_columns(COLS)
    stored = {"type": "stored", "request_id": "req-1", "trades": n, "trades_ref": "req-1",
              "location": "dlq"}
    gw = gateway(max_message_bytes=8192)
    # learn the chunk count the client will declare
    with Producer(gw.endpoint, max_message_bytes=8192) as p:
        p.send_result("probe", "S-11", COLS)
    total_chunks = gw.requests["probe"]["total_chunks"]
    gw.stored["req-1"] = {"key": ("S-11", n, total_chunks), "reply": stored}
    before = len(gw.received)
    reply, _, seen = _send(gw)
    assert reply == stored and seen == []
    assert [k for k, _ in gw.received[before:]] == ["begin"]


def test_incomplete_missing_resends_those_seqs(gateway):
    gw = gateway(credit=4, max_message_bytes=8192, lose_before_end=2)
    reply, p, _ = _send(gw)
    assert reply["type"] == "stored"
    assert_stored_once(gw, "req-1", COLS)
    assert [k for k, _ in gw.received].count("end") == 2
    assert [s for k, s in gw.received if k == "chunk"].count(2) == 2


def test_unknown_request_starts_over(gateway):
    gw = gateway(credit=3, max_message_bytes=8192, forget_after_first_ack=True)
    reply, p, _ = _send(gw)
    assert reply["type"] == "stored"
    assert_stored_once(gw, "req-1", COLS)
    assert p.last_stats["begins"] >= 2 and not gw.problems


def test_no_answer_gives_up_after_retries(gateway):
    gw = gateway(mute=True)
    with pytest.raises(SendError) as ei:
        _send(gw, timeout_s=0.1, retries=2)
    assert ei.value.code == "timeout" and ei.value.reply is None
    assert "no reply" in str(ei.value)
    assert [k for k, _ in gw.received] == ["begin"] * 3


def test_zero_trades_is_one_empty_chunk(gateway):
    gw = gateway()
    empty = {"timestamp": [], "pnl": []}
    reply, _, seen = _send(gw, cols=empty)
    assert reply["trades"] == 0 and gw.requests["req-1"]["total_chunks"] == 1
    assert gw.store[("req-1", 0)] == 1 and seen == [(0, 0)]


def test_live_trades_and_low_level_calls(gateway):
    gw = gateway()
    with Producer(gw.endpoint, timeout_s=2) as p:
        reply = p.send_live_trades("batch-1", {"timestamp": [1, 2], "pnl": [0.5, -0.5],
                                               "strategy_name": ["S", "S"], "pair_id": ["ab", None]})
        assert reply["request_id"] == "batch-1" and reply["trades"] == 2
        with pytest.raises(ValueError, match="strategy_name"):
            p.send_live_trades("batch-2", {"timestamp": [1], "pnl": [0.5]})
        p.send_raw(b"\xc1 not msgpack")
        assert p.recv(2.0)["code"] == "malformed"
        p.send_raw([b"a", b"b"])
        assert p.recv(2.0)["code"] == "malformed"
        assert p.recv(0.05) is None


def test_frames_pass_the_gateway_codec():
    """Whatever the client encodes, the daemon's own decoder accepts as is."""
    codec = pytest.importorskip("pairlane.codec")
    limits = codec.Limits(max_message_bytes=8192)
    cols = dict(COLS, hold_time=[None] + list(COLS["hold_time"][1:]),
                regime=["trend", None] * 1000)
    ranges = plan_chunks(cols, 8192)
    for seq, (a, b) in enumerate(ranges):
        msg = codec.decode_frame([encode_chunk("req-1", seq, cols, a, b)], limits)
        assert codec.check_columns(msg["trades"], "req-1") == b - a


def test_invalid_arguments_raise_before_sending(gateway):
    gw = gateway()
    with Producer(gw.endpoint) as p:
        with pytest.raises(ValueError, match="request_id"):
            p.send_result("bad id!", "S", COLS)
        with pytest.raises(ValueError, match="strategy_name"):
            p.send_result("ok", "", COLS)
        with pytest.raises(ValueError, match="timeframe"):
            p.send_result("ok", "S", COLS, meta={"timeframe": "60"})
        # one DEALER connection delivers in order: once this marker is answered, anything
        # the refused calls had sent would have reached the gateway before it
        assert p.send_live_trades("marker", {"timestamp": [1], "pnl": [0.5], "strategy_name": ["S"]}
                                  )["request_id"] == "marker"
    assert gw.received == [("live_trades", None)]


# ----------------------------------------------------------------------------
# the command line

def test_cli_synthetic_stores_and_prints_a_summary(gateway, capsys):
    gw = gateway(credit=2)
    code = cli_send.main(["--endpoint", gw.endpoint, "--synthetic", "300", "--seed", "5",
                          "--request-id", "cli-1", "--timeout", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert re.fullmatch(r"stored request_id=cli-1 trades=300 location=db in \d+\.\d\ds "
                        r"\([\d,]+ trades/s\)\n", out)
    assert_stored_once(gw, "cli-1", synthetic_columns(300, seed=5, strategy="synthetic-5"))
    begin = gw.requests["cli-1"]["begin"]
    assert begin["strategy_name"] == "synthetic-5" and begin["metrics"]["trades"] == 300


def test_cli_json_and_config_file(gateway, capsys, tmp_path):
    gw = gateway(max_message_bytes=4096)
    cfg = tmp_path / "pairlane.toml"
    cfg.write_text(f'[gateway]\nendpoint = "{gw.endpoint}"\nmax_message_bytes = 4096\n')
    code = cli_send.main(["--config", str(cfg), "--synthetic", "400", "--json", "--rank", "S"])
    out, err = capsys.readouterr()
    assert code == 0, err
    reply = json.loads(out)
    assert reply["type"] == "stored" and reply["trades"] == 400
    assert reply["request_id"].startswith("send-")
    assert gw.max_frame <= 4096 and gw.requests[reply["request_id"]]["total_chunks"] > 1
    assert gw.requests[reply["request_id"]]["begin"]["rank"] == "S"


def test_cli_file_send(gateway, capsys, tmp_path):
    gw = gateway()
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"strategy_name": "F-1", "request_id": "file-1",
                                "trades": [{"timestamp": 1, "pnl": 2.5}]}))
    assert cli_send.main(["--endpoint", gw.endpoint, "--file", str(path), "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert gw.requests["file-1"]["begin"]["strategy_name"] == "F-1"


def test_cli_bad_input_exits_2(capsys, tmp_path):
    missing = tmp_path / "nope.json"
    assert cli_send.main(["--file", str(missing)]) == 2
    assert "cannot read" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp,profit\n1,2\n")
    assert cli_send.main(["--file", str(bad), "--strategy", "S"]) == 2
    err = capsys.readouterr().err
    assert "bad.csv" in err and "'profit'" in err
    nostrat = tmp_path / "ok.csv"
    nostrat.write_text("timestamp,pnl\n1,2\n")
    assert cli_send.main(["--file", str(nostrat)]) == 2
    assert "--strategy" in capsys.readouterr().err
    assert cli_send.main(["--synthetic", "5", "--request-id", "no spaces"]) == 2
    assert cli_send.main([]) == 2                      # neither --synthetic nor --file
    assert cli_send.main(["--synthetic", "x"]) == 2
    capsys.readouterr()


def test_cli_refusal_exits_1_and_help_exits_0(gateway, capsys):
    gw = gateway(preexisting={"dup": {"key": ("other", 1, 1), "total_trades": 1,
                                      "total_chunks": 1, "durable": {}}})
    assert cli_send.main(["--endpoint", gw.endpoint, "--synthetic", "10",
                          "--request-id", "dup", "--timeout", "2"]) == 1
    assert "conflict" in capsys.readouterr().err
    assert cli_send.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--synthetic" in out and "exit codes" in out


def test_cli_no_answer_warns_then_exits_1(gateway, capsys):
    gw = gateway(mute=True)
    assert cli_send.main(["--endpoint", gw.endpoint, "--synthetic", "10", "--request-id", "m-1",
                          "--timeout", "0.1", "--retries", "1"]) == 1
    err = capsys.readouterr().err
    assert "event=send_resume request_id=m-1 reason=timeout attempt=1/1" in err
    assert "failed: request m-1: timeout" in err and "same request_id" in err


def test_progress_bar_shows_rows_percent_and_rate():
    import io
    out = io.StringIO()
    bar = cli_send._Progress(out)
    bar(0, 2000)
    bar(2000, 2000)
    bar.finish()
    text = out.getvalue()
    assert "0/2,000   0.0%" in text and "2,000/2,000 100.0%" in text and "rows/s" in text
    assert text.endswith("\n") and "[" + "#" * cli_send._Progress.WIDTH + "]" in text
