"""supervision/lanes.py in one process: order, who sent it, where answers go, what is closed.

The multi-process behaviour (workers on lanes, a restarted worker's new lane, the killed one's
socket file removed) is tested on a real actor system in test_supervision.py.
"""
from __future__ import annotations

import os
import pickle
import select
import socket
import tempfile
import threading
import time

import pytest

from pairlane.supervision import lanes
from pairlane.supervision.lanes import Lane


@pytest.fixture
def pair(tmp_path):
    made = []

    def make(name: str, address) -> Lane:
        lane = Lane(str(tmp_path), name, address)
        made.append(lane)
        return lane

    yield make
    for lane in made:
        lane.close()
    lanes.remove_lane_dir(str(tmp_path))


def take(lane: Lane, n: int, limit: int = lanes.DRAIN_MAX) -> list:
    """Everything up to n messages, waiting for the lane's sockets as long as it takes (at most 5 s)."""
    got = []
    deadline = time.monotonic() + 5
    while len(got) < n and time.monotonic() < deadline:
        items, _ = lane.receive(limit)
        got += items
        if len(got) < n and not items:
            select.select(lane.fds, [], [], 0.05)
    return got


def test_a_senders_messages_arrive_in_order_with_its_address_and_answers_go_back_on_its_lane(pair):
    a, b = pair("a", ("addr", "a")), pair("b", ("addr", "b"))
    b_addr = ("addr", "b")
    a.set_directory({"b": b_addr}, {"b": b.endpoint})
    assert a.endpoint_of(b_addr) == b.endpoint
    assert b.endpoint_of(("addr", "a")) is None          # b has no directory entry for a
    sizes = [0, 10, 70_000, 1_100_000, 5]
    for i in range(500):
        a.send(a.endpoint_of(b_addr), (i, b"x" * sizes[i % len(sizes)]))
    got = take(b, 500)
    assert [m[0] for m, _ in got] == list(range(500))
    assert [len(m[1]) for m, _ in got] == [sizes[i % len(sizes)] for i in range(500)]
    assert {s for _, s in got} == {("addr", "a")}
    assert b.endpoint_of(("addr", "a")) == a.endpoint    # learned from the envelope
    b.send(b.endpoint_of(("addr", "a")), "answer")
    assert take(a, 1) == [("answer", b_addr)]
    assert a.stats["sent"] == 500 and b.stats["received"] == 500


def test_receive_takes_at_most_its_limit_and_says_more_may_wait(pair):
    a, b = pair("a", "A"), pair("b", "B")
    for i in range(10):
        a.send(b.endpoint, i)
    got = take(b, 4, limit=4)
    assert [m for m, _ in got] == [0, 1, 2, 3]
    items, more = b.receive(4)
    assert more and [m for m, _ in items] == [4, 5, 6, 7]
    items, more = b.receive(4)
    assert not more and [m for m, _ in items] == [8, 9]


def test_each_incarnation_has_its_own_endpoint(pair):
    first, second = pair("w", "A1"), pair("w", "A2")
    assert first.endpoint != second.endpoint
    first.send(second.endpoint, "to the second")
    assert take(second, 1) == [("to the second", "A1")]
    assert first.receive() == ([], False)


def test_a_directory_without_an_incarnation_closes_the_socket_to_it(pair):
    a, b = pair("a", "A"), pair("b", "B")
    a.set_directory({"b": "B"}, {"b": b.endpoint})
    a.send(b.endpoint, "x")
    assert list(a.pushes) == [b.endpoint]
    a.set_directory({"b": "B2"}, {})                     # b restarted, its new one has no lane yet
    assert a.endpoint_of("B") is None and a.endpoint_of("B2") is None
    assert a.pushes == {}
    a.set_directory({"b": "B"}, {"b": b.endpoint, "c": "unix:///nowhere"})   # a name not in entries
    assert a.peers == {"B": b.endpoint}


def test_incarnations_learned_from_envelopes_are_bounded(pair, monkeypatch):
    monkeypatch.setattr(lanes, "MAX_PEERS", 3)
    hub = pair("hub", "H")
    senders = [pair(f"s{i}", f"S{i}") for i in range(6)]
    for s in senders:
        s.send(hub.endpoint, "hello")
    assert len(take(hub, 6)) == 6
    assert [hub.endpoint_of(f"S{i}") for i in range(6)] == [None] * 3 + [s.endpoint for s in senders[3:]]
    for i in range(3, 6):
        hub.send(hub.endpoint_of(f"S{i}"), "back")
    assert sorted(hub.pushes) == sorted(s.endpoint for s in senders[3:])
    late = pair("s6", "S6")
    late.send(hub.endpoint, "hello")
    assert len(take(hub, 1)) == 1
    assert hub.endpoint_of("S3") is None and senders[3].endpoint not in hub.pushes   # evicted, closed
    assert hub.endpoint_of("S6") == late.endpoint


def test_lanes_live_in_the_run_dir_when_it_is_short_else_in_a_private_tmp_directory(tmp_path):
    short = "/tmp/pl-" + os.urandom(3).hex()
    try:
        assert lanes.lane_dir(short) == short + "/lanes"
        ep = lanes.endpoint_for(short, "writer", 123, "abcd")
        assert ep == f"unix://{short}/lanes/writer-123-abcd"
        assert os.stat(short + "/lanes").st_mode & 0o777 == 0o700
    finally:
        lanes.remove_lane_dir(short)
        os.rmdir(short)
    deep = str(tmp_path / ("d" * 120))
    d = lanes.lane_dir(deep)
    assert d.startswith(os.path.join(tempfile.gettempdir(), f"pairlane-{os.getuid()}") + os.sep)
    assert d != lanes.lane_dir(deep + "x") and len(d) + lanes.ENDPOINT_ROOM <= lanes.MAX_IPC_PATH
    lane = Lane(deep, "writer-with-a-long-name", "A")
    try:
        assert lane.endpoint.startswith(f"unix://{d}/writer-with-a-long-name-{os.getpid()}-")
        lane.send(lane.endpoint, "to myself")
        assert take(lane, 1) == [("to myself", "A")]
        assert os.stat(d).st_mode & 0o777 == 0o700 and not os.path.exists(deep)
    finally:
        lane.close()
        lanes.remove_lane_dir(deep)
    assert not os.path.exists(d)


def test_a_lane_directory_someone_else_owns_gives_no_lane(tmp_path, monkeypatch):
    run_dir, uid = str(tmp_path / ("e" * 120)), os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: uid + 4242)   # as if another user had made the directory
    d = lanes.lane_dir(run_dir)
    try:
        lane = Lane(run_dir, "writer", "A")
        assert lane.endpoint is None and lane.sock is None and lane.fds == []
        assert lane.endpoint_of("anyone") is None and lane.receive() == ([], False)
        lane.close()
    finally:
        monkeypatch.undo()
        for path in (d, os.path.dirname(d)):
            if os.path.isdir(path):
                os.rmdir(path)


def test_remove_socket_file_removes_a_dead_incarnations_file(tmp_path):
    path = tmp_path / "gone"
    path.write_bytes(b"")
    lanes.remove_socket_file(f"unix://{path}")
    assert not path.exists()
    lanes.remove_socket_file(f"unix://{path}")            # already gone: nothing to do
    lanes.remove_socket_file("")                         # never had a lane


def test_remove_all_socket_files_empties_the_lane_directory_and_remove_lane_dir_removes_it(tmp_path):
    d = lanes.make_lane_dir(str(tmp_path))
    for name in ("writer-1-ab", "gateway-2-cd"):
        with open(os.path.join(d, name), "wb"):
            pass
    lanes.remove_all_socket_files(str(tmp_path))
    assert os.listdir(d) == []
    lanes.remove_lane_dir(str(tmp_path))
    assert not os.path.exists(d)
    lanes.remove_all_socket_files(str(tmp_path / "never-made"))
    lanes.remove_lane_dir(str(tmp_path / "never-made"))


def test_the_lane_directory_is_private(pair, tmp_path):
    pair("a", "A")
    assert os.stat(lanes.lane_dir(str(tmp_path))).st_mode & 0o077 == 0


def test_a_message_bigger_than_the_socket_buffer_goes_in_order_without_blocking_the_sender(pair):
    a, b = pair("a", "A"), pair("b", "B")
    big = os.urandom(24 << 20)                          # three times SEND_BUFFER: the kernel takes part
    t = time.monotonic()
    a.send(b.endpoint, ("big", big))
    for i in range(100):
        a.send(b.endpoint, ("small", i))
    assert time.monotonic() - t < 2.0                    # the rest waits in a's queue, a goes on
    assert a.inspect()["queued_bytes"] > 0 and a.stats["queued"] >= 1
    got = take(b, 101)
    assert got[0] == (("big", big), "A") and [m[1] for m, _ in got[1:]] == list(range(100))
    deadline = time.monotonic() + 5
    while a.inspect()["queued_bytes"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert a.inspect()["queued_bytes"] == 0


def test_mail_for_an_incarnation_that_is_gone_is_lost_and_counted_never_raised(pair):
    a, b = pair("a", "A"), pair("b", "B")
    a.send(b.endpoint, "first")
    assert take(b, 1) == [("first", "A")]
    b.close()                                             # b's process ended: its socket file is gone
    for i in range(3):
        a.send(b.endpoint, f"lost {i}")                   # the broken connection, then no listener
    assert a.stats["lost"] == 3 and a.stats["sent"] == 1 and b.endpoint not in a.pushes
    a.send("unix:///nowhere/at-all", "lost too")
    assert a.stats["lost"] == 4


def raw_sender(lane: Lane, who) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(lane.endpoint[len(lanes.SCHEME):])
    hello = pickle.dumps(("unix:///x", who))
    s.sendall(lanes.HEADER.pack(len(hello)) + hello)
    return s


def frame(msg) -> bytes:
    data = pickle.dumps(msg)
    return lanes.HEADER.pack(len(data)) + data


def test_a_sender_that_dies_mid_frame_or_sends_an_oversized_one_loses_only_its_own_connection(pair):
    b, good = pair("b", "B"), pair("g", "G")
    dying = raw_sender(b, "D")
    whole = frame("whole")
    dying.sendall(whole + frame(b"x" * 200_000)[:1000])   # one whole frame, then half of a big one
    dying.close()
    liar = raw_sender(b, "L")
    liar.sendall(lanes.HEADER.pack(lanes.MAX_FRAME + 1) + b"junk")
    good.send(b.endpoint, "still here")
    got = take(b, 2)
    assert sorted(got) == [("still here", "G"), ("whole", "D")]
    deadline = time.monotonic() + 5
    while len(b.conns) > 1 and time.monotonic() < deadline:
        b.receive()
    assert len(b.conns) == 1                              # the dead and the oversized ones are closed
    good.send(b.endpoint, "again")
    assert take(b, 1) == [("again", "G")]
    liar.close()


def test_order_holds_while_some_messages_wait_for_the_flusher_and_later_ones_queue_behind_them(pair):
    """The flusher thread and the sender's own thread share a connection: order holds across both."""
    a, b = pair("a", "A"), pair("b", "B")
    stop = threading.Event()
    got: list = []

    def reader():
        while not stop.is_set():
            items, _ = b.receive()
            got.extend(items)
            if not items:
                select.select(b.fds, [], [], 0.01)
    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(300):
            a.send(b.endpoint, (i, b"y" * (1 << 18 if i % 7 == 0 else 10)))   # some must wait for the flusher
        deadline = time.monotonic() + 10
        while len(got) < 300 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        t.join()
    assert [m[0] for m, _ in got] == list(range(300))


def test_actor_addresses_in_messages_arrive_equal_and_are_unpickled_once_per_process(pair, monkeypatch):
    """An address (a WriteChunk's reply_to) goes as its pickle, made once per process, and comes out
    as one object per process: equal to what was sent, whatever else the message holds."""
    from thespian.actors import ActorAddress
    from thespian.system.transport.TCPTransport import TCPv4ActorAddress
    monkeypatch.setattr(lanes, "_address_bytes", {})
    monkeypatch.setattr(lanes, "_addresses", {})
    a, b = pair("a", ("addr", "a")), pair("b", ("addr", "b"))
    x = ActorAddress(TCPv4ActorAddress("127.0.0.1", 40001, external=True))
    y = ActorAddress(TCPv4ActorAddress("127.0.0.1", 40002, external=True))
    for i in range(6):
        a.send(b.endpoint, {"i": i, "reply_to": (x, y)[i % 2], "both": [x, y]})
    got = [m for m, _ in take(b, 6)]
    assert [m["i"] for m in got] == list(range(6))
    assert all(m["reply_to"] == (x, y)[m["i"] % 2] and str(m["reply_to"]) == str((x, y)[m["i"] % 2]) for m in got)
    assert got[0]["reply_to"] is got[2]["reply_to"] is got[5]["both"][0]
    assert got[1]["reply_to"] is got[3]["both"][1] and got[0]["reply_to"] != got[1]["reply_to"]
    assert len(lanes._address_bytes) == 2 and len(lanes._addresses) == 2


def test_the_address_caches_are_bounded(monkeypatch):
    from thespian.actors import ActorAddress
    from thespian.system.transport.TCPTransport import TCPv4ActorAddress
    monkeypatch.setattr(lanes, "ADDRESSES", 4)
    monkeypatch.setattr(lanes, "_address_bytes", {})
    monkeypatch.setattr(lanes, "_addresses", {})
    addrs = [ActorAddress(TCPv4ActorAddress("127.0.0.1", 41000 + i, external=True)) for i in range(10)]
    for addr in addrs:
        assert pickle.loads(lanes.dumps(addr)) == addr
        assert len(lanes._address_bytes) <= 4 and len(lanes._addresses) <= 4
