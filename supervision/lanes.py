"""Lanes: ordered messages between a daemon's own actors on ZeroMQ ipc sockets, beside Thespian.

Thespian's TCP transport sends one message per sender/receiver pair at a time and waits for the
receiver's ACK before the next, and may reorder two sends (supervision/ordering.py). The data path
(gateway -> assembler -> writer, and every answer back) pays that on each hop. A lane is one PULL
socket per worker incarnation, bound at `<lane_dir>/<name>-<pid>-<random>` (`lane_dir`): senders
PUSH to it, ZeroMQ keeps each sender's messages in order and never waits for an answer.

Owns: the endpoint of this incarnation (`Lane.endpoint`, announced in `Started` and spread in the
`Directory`), the PUSH sockets to other incarnations, and the envelope. Thespian keeps everything
else: lifecycle, supervision, heartbeats, admin messages, and any message to an actor without a
lane (supervisors; any worker when the lane directory is not this user's).

Promises, the same as Thespian's with `send_ordered`: a sender's messages to one incarnation
arrive in the order sent; a message to an incarnation that died is lost with it (its endpoint is
its own, so a restarted actor never gets its predecessor's mail). Never blocks: the queues are
bounded by what the senders keep in flight (credit windows, in-flight caps), as with Thespian.
Trust: the socket files are in a directory of this user's own, made 0700, and only the daemon's
own processes connect; envelopes are pickled as Thespian's own messages are. No network input is read
here.
"""
from __future__ import annotations

import collections
import hashlib
import os
import pickle
import secrets
import stat
import tempfile

import zmq

MAX_IPC_PATH = 100        # sun_path is 108 bytes; libzmq refuses longer
ENDPOINT_ROOM = 48        # "/<name>-<pid>-<token>" after the directory
MAX_PEERS = 64            # PUSH sockets kept open to incarnations learned from envelopes
DRAIN_MAX = 256           # lane messages taken off the socket by one `receive`


def lane_dir(run_dir: str) -> str:
    """Where a daemon's lane sockets live: `<run_dir>/lanes`, or, when that path leaves no room for
    an ipc socket's name, `<tmp>/pairlane-<uid>/<hash of run_dir>` (a directory of this user's own)."""
    run_dir = os.path.abspath(run_dir)
    d = os.path.join(run_dir, "lanes")
    if len(d.encode()) + ENDPOINT_ROOM <= MAX_IPC_PATH:
        return d
    digest = hashlib.sha256(run_dir.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"pairlane-{os.getuid()}", digest)


def _own_dirs(run_dir: str) -> list[str]:
    """The directories the lanes of run_dir's daemon own, outermost first: the lane directory, and in
    tmp also its parent (`pairlane-<uid>`, shared by this user's daemons)."""
    d = lane_dir(run_dir)
    return [d] if os.path.dirname(d) == os.path.abspath(run_dir) else [os.path.dirname(d), d]


def make_lane_dir(run_dir: str) -> str | None:
    """lane_dir(run_dir), made private (0700, ours); None if it cannot be (someone else owns it,
    or the path is still too long)."""
    d = lane_dir(run_dir)
    if len(d.encode()) + ENDPOINT_ROOM > MAX_IPC_PATH:
        return None
    for path in _own_dirs(run_dir):
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            return None   # not ours (a shared tmp): no lane rather than a socket others may reach
        os.chmod(path, 0o700)   # only this user's processes may connect
    return d


def endpoint_for(run_dir: str, name: str, pid: int, token: str) -> str | None:
    """This incarnation's endpoint, or None when it can have none."""
    d = make_lane_dir(run_dir)
    return f"ipc://{os.path.join(d, f'{name}-{pid}-{token}')}" if d is not None else None


def remove_socket_file(endpoint: str) -> None:
    """Unlink a dead incarnation's socket file (a killed process cannot unlink its own)."""
    if endpoint.startswith("ipc://"):
        try:
            os.unlink(endpoint[len("ipc://"):])
        except OSError:
            pass


def remove_all_socket_files(run_dir: str) -> None:
    """At a daemon's start: every socket file a tree that was killed left behind."""
    d = lane_dir(run_dir)
    for name in os.listdir(d) if os.path.isdir(d) and not os.path.islink(d) else ():
        remove_socket_file(f"ipc://{os.path.join(d, name)}")


def remove_lane_dir(run_dir: str) -> None:
    """At a daemon's stop (its tree is gone): what is left of its lane directory."""
    remove_all_socket_files(run_dir)
    for path in reversed(_own_dirs(run_dir)):   # the shared parent only when empty
        try:
            os.rmdir(path)
        except OSError:
            pass


class Lane:
    """One worker incarnation's lane: its bound PULL socket and its PUSH sockets to others."""

    def __init__(self, run_dir: str, name: str, my_address):
        self.endpoint = endpoint_for(run_dir, name, os.getpid(), secrets.token_hex(4))
        self.sock = None
        self.ctx = zmq.Context.instance()
        self._me = pickle.dumps(my_address, protocol=pickle.HIGHEST_PROTOCOL)
        self.peers: dict[str, str] = {}                        # str(address) -> endpoint (directory)
        self.learned: collections.OrderedDict = collections.OrderedDict()  # the same, from envelopes
        self.pushes: dict[str, zmq.Socket] = {}                # endpoint -> PUSH socket
        self.senders: dict[bytes, tuple] = {}                  # pickled address -> (address, endpoint)
        self.stats = collections.Counter(sent=0, received=0)
        if self.endpoint is None:
            return
        self.sock = self.ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.bind(self.endpoint)

    @property
    def fd(self):
        return self.sock.FD if self.sock is not None else None

    # ----- who has a lane ------------------------------------------------------------------------
    def set_directory(self, entries: dict, lanes: dict) -> None:
        """The directory's name -> address and name -> endpoint: senders to those addresses use
        their lanes; PUSH sockets to endpoints no longer there are closed (their messages were
        for an incarnation that is gone)."""
        self.peers = {str(addr): lanes[name] for name, addr in entries.items()
                      if addr is not None and lanes.get(name)}
        self._close_unused()

    def endpoint_of(self, addr) -> str | None:
        if self.sock is None:
            return None
        key = str(addr)
        return self.peers.get(key) or self.learned.get(key)

    def _learn(self, addr, endpoint: str) -> None:
        key = str(addr)
        if self.peers.get(key) == endpoint:
            return
        self.learned.pop(key, None)
        self.learned[key] = endpoint
        if len(self.learned) > MAX_PEERS:
            self.learned.popitem(last=False)
            self.senders.clear()   # so a sender evicted here is learned again from its next envelope
            self._close_unused()

    def _close_unused(self) -> None:
        live = set(self.peers.values()) | set(self.learned.values())
        for endpoint in [e for e in self.pushes if e not in live]:
            self.pushes.pop(endpoint).close(0)

    # ----- sending and receiving -----------------------------------------------------------------
    def send(self, endpoint: str, msg) -> None:
        sock = self.pushes.get(endpoint)
        if sock is None:
            sock = self.pushes[endpoint] = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.connect(endpoint)
        # NOBLOCK with no high-water mark cannot wait; zmq.Again would mean a broken invariant: crash
        sock.send(pickle.dumps((self.endpoint, self._me, msg), protocol=pickle.HIGHEST_PROTOCOL),
                  zmq.NOBLOCK, copy=False)
        self.stats["sent"] += 1

    def receive(self, limit: int = DRAIN_MAX) -> tuple[list, bool]:
        """Up to `limit` (message, sender address) pairs waiting, and whether more may be waiting."""
        out = []
        if self.sock is None:
            return out, False
        while len(out) < limit:
            try:
                frame = self.sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return out, False
            endpoint, who, msg = pickle.loads(frame.buffer)
            known = self.senders.get(who)
            if known is None or known[1] != endpoint:
                if len(self.senders) > MAX_PEERS:
                    self.senders.clear()
                known = self.senders[who] = (pickle.loads(who), endpoint)
                self._learn(known[0], endpoint)   # answers to it go back on its lane
            out.append((msg, known[0]))
            self.stats["received"] += 1
        return out, True

    def waiting(self) -> bool:
        """Whether a message waits on the socket (reading this takes the FD's edge: drain after)."""
        return self.sock is not None and bool(self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN)

    def inspect(self) -> dict:
        return dict(self.stats, endpoint=self.endpoint, peers=len(self.peers) + len(self.learned),
                    sockets=len(self.pushes))

    def close(self) -> None:
        for sock in self.pushes.values():
            sock.close(0)
        self.pushes.clear()
        if self.sock is not None:
            self.sock.close(0)   # libzmq unlinks the socket file
            self.sock = None
