"""supervision/lanes.py in one process: order, who sent it, where answers go, what is closed.

The multi-process behaviour (workers on lanes, a restarted worker's new lane, the killed one's
socket file removed) is tested on a real actor system in test_supervision.py.
"""
from __future__ import annotations

import os
import tempfile

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
    """Everything up to n messages, waiting for the ipc socket as long as it takes (at most 5 s)."""
    import zmq
    got = []
    poller = zmq.Poller()
    poller.register(lane.sock, zmq.POLLIN)
    while len(got) < n and poller.poll(5000):
        items, _ = lane.receive(limit)
        got += items
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
    a.set_directory({"b": "B"}, {"b": b.endpoint, "c": "ipc:///nowhere"})   # a name not in entries
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
        assert ep == f"ipc://{short}/lanes/writer-123-abcd"
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
        assert lane.endpoint.startswith(f"ipc://{d}/writer-with-a-long-name-{os.getpid()}-")
        lane.send(lane.endpoint, "to myself")
        assert lane.sock.poll(5000) and lane.receive()[0] == [("to myself", "A")]
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
        assert lane.endpoint is None and lane.sock is None and lane.fd is None
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
    lanes.remove_socket_file(f"ipc://{path}")
    assert not path.exists()
    lanes.remove_socket_file(f"ipc://{path}")            # already gone: nothing to do
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
