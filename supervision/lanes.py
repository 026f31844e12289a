"""Lanes: ordered messages between a daemon's own actors on Unix stream sockets, beside Thespian.

Thespian's TCP transport sends one message per sender/receiver pair at a time and waits for the
receiver's ACK before the next, and may reorder two sends (supervision/ordering.py). The data path
(gateway -> assembler -> writer, and every answer back) pays that on each hop. A lane is one
listening Unix stream socket per worker incarnation, bound at `<lane_dir>/<name>-<pid>-<random>`
(`lane_dir`). A sender connects once and writes length-prefixed frames: the kernel keeps them in
order and the receiver's select wakes at once (ZeroMQ ipc, used first, passed each message through
an I/O thread on both sides: about 0.25 ms a hop on 2 busy cores, against tens of microseconds).

Owns: the endpoint of this incarnation (`Lane.endpoint`, announced in `Started` and spread in the
`Directory`), the connections to and from other incarnations, their frames, and a flusher thread
that finishes a send the kernel could not take at once (a message bigger than the socket buffer,
or a receiver busy with a long write) without ever blocking the actor. Thespian keeps everything
else: lifecycle, supervision, heartbeats, admin messages, and any message to an actor without a
lane (supervisors; any worker when the lane directory is not this user's).

Promises, the same as Thespian's with `send_ordered`: a sender's messages to one incarnation
arrive in the order sent; a message to an incarnation that died is lost with it (its endpoint is
its own, so a restarted actor never gets its predecessor's mail). Never blocks: what the kernel
does not take waits in the sender's queue for the flusher; the queues are bounded by what the
senders keep in flight (credit windows, in-flight caps), as with Thespian.
Trust: the socket files are in a directory of this user's own, made 0700, and only the daemon's
own processes connect; frames are pickled as Thespian's own messages are, and a frame longer than
MAX_FRAME closes its connection. No network input is read here.
"""
from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
import secrets
import select
import socket
import stat
import struct
import tempfile
import threading

from thespian.actors import ActorAddress


MAX_IPC_PATH = 100        # sun_path is 108 bytes
ENDPOINT_ROOM = 48        # "/<name>-<pid>-<token>" after the directory
MAX_PEERS = 64            # connections kept open to incarnations learned from their messages
DRAIN_MAX = 256           # lane messages taken by one `receive`
SCHEME = "unix://"
HEADER = struct.Struct("<I")
MAX_FRAME = 1 << 30       # a longer frame is corruption: its connection is closed
SEND_BUFFER = 8 << 20     # asked of the kernel for each connection (capped by net.core.wmem_max)
READ_BYTES = 256 << 10    # one recv of small frames, into the lane's one read buffer (`recv` of this many
                          # bytes would allocate, and free, a buffer that size for every read: about
                          # 15 us, on every hop of the data path)
BIG_FRAME = 64 << 10      # a frame this long is read straight into its own buffer
ADDRESSES = 256           # actor addresses whose pickled form each process keeps (both directions)


_address_bytes: dict[str, bytes] = {}      # str(address) -> its pickle (sending side)
_addresses: dict[bytes, ActorAddress] = {}  # that pickle -> the address, unpickled once (receiving side)


def _address(blob: bytes) -> ActorAddress:
    """The address pickled as blob (by `_reduce_address`), unpickled once per process: every message
    that carries an address gets the same object, as Thespian's own delivery would give equal ones."""
    addr = _addresses.get(blob)
    if addr is None:
        if len(_addresses) >= ADDRESSES:
            _addresses.clear()
        addr = _addresses[blob] = pickle.loads(blob)
    return addr


def _reduce_address(addr: ActorAddress) -> tuple:
    key = str(addr)
    blob = _address_bytes.get(key)
    if blob is None:
        if len(_address_bytes) >= ADDRESSES:
            _address_bytes.clear()
        blob = _address_bytes[key] = pickle.dumps(addr, protocol=pickle.HIGHEST_PROTOCOL)
    return _address, (blob,)


def dumps(msg) -> bytes:
    """msg pickled for a lane. An actor address (a WriteChunk's reply_to, say) is about 1 KB of
    objects (enums, tuples): pickled and unpickled anew it cost 10-40 us on each hop that carries
    one; here it goes as its pickle, made once per process, and is unpickled once per process."""
    f = io.BytesIO()
    _Pickler(f, pickle.HIGHEST_PROTOCOL).dump(msg)
    return f.getvalue()


class _Pickler(pickle.Pickler):
    dispatch_table = {ActorAddress: _reduce_address}


def lane_dir(run_dir: str) -> str:
    """Where a daemon's lane sockets live: `<run_dir>/lanes`, or, when that path leaves no room for
    a Unix socket's name, `<tmp>/pairlane-<uid>/<hash of run_dir>` (a directory of this user's own)."""
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
    return f"{SCHEME}{os.path.join(d, f'{name}-{pid}-{token}')}" if d is not None else None


def remove_socket_file(endpoint: str) -> None:
    """Unlink a dead incarnation's socket file (a killed process cannot unlink its own)."""
    if endpoint.startswith(SCHEME):
        try:
            os.unlink(endpoint[len(SCHEME):])
        except OSError:
            pass


def remove_all_socket_files(run_dir: str) -> None:
    """At a daemon's start: every socket file a tree that was killed left behind."""
    d = lane_dir(run_dir)
    for name in os.listdir(d) if os.path.isdir(d) and not os.path.islink(d) else ():
        remove_socket_file(f"{SCHEME}{os.path.join(d, name)}")


def remove_lane_dir(run_dir: str) -> None:
    """At a daemon's stop (its tree is gone): what is left of its lane directory."""
    remove_all_socket_files(run_dir)
    for path in reversed(_own_dirs(run_dir)):   # the shared parent only when empty
        try:
            os.rmdir(path)
        except OSError:
            pass


CONNECT_TIMEOUT_S = 2.0   # a listener that does not accept in this long is taken for gone
FLUSH_POLL_S = 0.5        # the flusher looks again this often (a connection closed meanwhile)


class _Out:
    """A connection to another incarnation's lane, and what the kernel has not taken yet, in order."""
    __slots__ = ("sock", "queue", "closed")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.queue: collections.deque = collections.deque()   # buffers not yet sent
        self.closed = False


class _In:
    """A connection from another incarnation: who it is (its first frame) and a frame partly read."""
    __slots__ = ("sock", "sender", "buf", "body", "got")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sender = None          # (address, endpoint, str(address)), from the first frame
        self.buf = bytearray()      # bytes read that are not whole frames yet
        self.body = None            # a big frame being read straight into its own buffer
        self.got = 0


def _unsent(parts: list, n: int) -> list:
    """What is left of parts once their first n bytes are sent."""
    rest = []
    for p in parts:
        if n >= len(p):
            n -= len(p)
        else:
            rest.append(memoryview(p)[n:])
            n = 0
    return rest


class Lane:
    """One worker incarnation's lane: its listening socket, the connections it accepted, and its
    connections to the lanes of others."""

    def __init__(self, run_dir: str, name: str, my_address):
        self.endpoint = endpoint_for(run_dir, name, os.getpid(), secrets.token_hex(4))
        self.sock = None
        self.peers: dict[str, str] = {}                        # str(address) -> endpoint (directory)
        self.learned: collections.OrderedDict = collections.OrderedDict()  # the same, from senders
        self.pushes: dict[str, _Out] = {}                      # endpoint -> connection to it
        self.conns: dict[int, _In] = {}                        # fd -> connection from a sender
        self.inbox: collections.deque = collections.deque()   # (message, sender address) read, not taken
        self._scratch = memoryview(bytearray(READ_BYTES))   # what one read of small frames takes
        # `lingered`: wakeups the worker took in its own select (Worker._linger), not Thespian's loop
        self.stats = collections.Counter(sent=0, received=0, queued=0, lost=0, lingered=0,
                                         long_yields=0)   # counted by the worker (Worker._needs_long_yield)
        self._cv = threading.Condition()   # guards pushes and their queues (the flusher thread)
        self._flusher = None
        self._closing = False
        if self.endpoint is None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.endpoint[len(SCHEME):])
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        hello = pickle.dumps((self.endpoint, my_address), protocol=pickle.HIGHEST_PROTOCOL)
        self._hello = HEADER.pack(len(hello)) + hello

    @property
    def fds(self) -> list[int]:
        """The descriptors to watch: the listening socket and every accepted connection."""
        return [self.sock.fileno(), *self.conns] if self.sock is not None else []

    # ----- who has a lane ------------------------------------------------------------------------
    def set_directory(self, entries: dict, lanes: dict) -> None:
        """The directory's name -> address and name -> endpoint: senders to those addresses use
        their lanes; connections to endpoints no longer there are closed (their messages were
        for an incarnation that is gone)."""
        self.peers = {str(addr): lanes[name] for name, addr in entries.items()
                      if addr is not None and lanes.get(name)}
        self._close_unused()

    def endpoint_of(self, addr) -> str | None:
        if self.sock is None:
            return None
        key = str(addr)
        return self.peers.get(key) or self.learned.get(key)

    def _learn(self, key: str, endpoint: str) -> None:
        self.learned.pop(key, None)
        self.learned[key] = endpoint
        if len(self.learned) > MAX_PEERS:
            self.learned.popitem(last=False)
            self._close_unused()

    def _close_unused(self) -> None:
        live = set(self.peers.values()) | set(self.learned.values())
        with self._cv:
            for endpoint in [e for e in self.pushes if e not in live]:
                self._drop(self.pushes[endpoint])

    # ----- sending -------------------------------------------------------------------------------
    def send(self, endpoint: str, msg) -> None:
        """Send msg to the lane at endpoint, in order after what we sent there before. Never waits:
        what the kernel does not take now, the flusher sends. A lane that is gone loses it."""
        payload = dumps(msg)
        if len(payload) > MAX_FRAME:
            raise ValueError(f"a lane message of {len(payload)} bytes is over MAX_FRAME")
        with self._cv:
            out = self.pushes.get(endpoint) or self._connect(endpoint)
            if out is not None and self._write(out, [HEADER.pack(len(payload)), payload]):
                self.stats["sent"] += 1
            else:
                self.stats["lost"] += 1

    def _connect(self, endpoint: str) -> _Out | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        except OSError:
            pass   # the kernel's default, and the flusher sends what does not fit
        sock.settimeout(CONNECT_TIMEOUT_S)
        try:
            sock.connect(endpoint[len(SCHEME):])
        except OSError:   # no such incarnation (any more): its mail is lost with it
            sock.close()
            return None
        sock.setblocking(False)
        out = self.pushes[endpoint] = _Out(sock)
        return out if self._write(out, [self._hello]) else None

    def _write(self, out: _Out, parts: list) -> bool:
        """parts on out's connection now, as much as the kernel takes; the rest for the flusher.
        False if the connection is broken (the receiver is gone)."""
        if out.closed:
            return False
        if not out.queue:
            try:
                n = out.sock.sendmsg(parts, [], socket.MSG_NOSIGNAL)
            except BlockingIOError:
                n = 0
            except OSError:
                self._drop(out)
                return False
            parts = _unsent(parts, n)
            if not parts:
                return True
        out.queue.extend(parts)
        self.stats["queued"] += 1
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_loop, name="lane-flusher", daemon=True)
            self._flusher.start()
        self._cv.notify()
        return True

    def _flush_loop(self) -> None:
        while True:
            with self._cv:
                waiting = [o for o in self.pushes.values() if o.queue]
                while not waiting and not self._closing:
                    self._cv.wait()
                    waiting = [o for o in self.pushes.values() if o.queue]
                if self._closing:
                    return
                socks = [o.sock for o in waiting]
            try:
                select.select([], socks, [], FLUSH_POLL_S)
            except (OSError, ValueError):
                pass   # one was closed meanwhile: look again
            with self._cv:
                for o in waiting:
                    self._flush(o)

    def _flush(self, out: _Out) -> None:
        while out.queue and not out.closed:
            try:
                n = out.sock.sendmsg(list(out.queue)[:64], [], socket.MSG_NOSIGNAL)
            except BlockingIOError:
                return
            except OSError:
                return self._drop(out)
            while n and n >= len(out.queue[0]):
                n -= len(out.queue.popleft())
            if n:
                out.queue[0] = memoryview(out.queue[0])[n:]
                return

    def _drop(self, out: _Out) -> None:
        out.closed = True
        out.queue.clear()
        out.sock.close()
        for endpoint, o in list(self.pushes.items()):
            if o is out:
                del self.pushes[endpoint]

    # ----- receiving -----------------------------------------------------------------------------
    def receive(self, limit: int = DRAIN_MAX, ready: list | None = None) -> tuple[list, bool]:
        """Up to `limit` (message, sender address) pairs waiting, and whether more may be waiting.
        ready: which of `fds` a select just found readable (else one is made here)."""
        if self.sock is None:
            return [], False
        active: list = []
        if len(self.inbox) < limit:
            if ready is None:
                ready = select.select(self.fds, [], [], 0)[0]   # one call, not a read of every connection
            active = [self.conns[fd] for fd in ready if fd in self.conns]
            if self.sock.fileno() in ready:
                active += self._accept()
        while active and len(self.inbox) < limit:
            active = [c for c in active if self._read(c)]
        out = [self.inbox.popleft() for _ in range(min(limit, len(self.inbox)))]
        self.stats["received"] += len(out)
        return out, bool(self.inbox or active)

    def _accept(self) -> list:
        new = []
        while True:
            try:
                sock, _ = self.sock.accept()
            except OSError:   # none waiting (or out of descriptors: the next call tries again)
                return new
            sock.setblocking(False)
            c = self.conns[sock.fileno()] = _In(sock)
            new.append(c)

    def _read(self, c: _In) -> bool:
        """One read of c; False once it has nothing more for now (a short read: what comes later
        makes its socket readable again), or is closed."""
        try:
            if c.body is not None:
                want = len(c.body) - c.got
                n = c.sock.recv_into(memoryview(c.body)[c.got:])
            else:
                want = READ_BYTES
                n = c.sock.recv_into(self._scratch)
                data = self._scratch[:n]
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            n = 0
        if n == 0:   # the sender is gone: a frame it left half-written is lost with it
            self.conns.pop(c.sock.fileno(), None)
            c.sock.close()
            return False
        if c.body is not None:
            c.got += n
            if c.got == len(c.body):
                body, c.body = c.body, None
                self._frame(c, body)
            return n == want
        buf, pos = c.buf, 0
        buf += data
        while len(buf) - pos >= HEADER.size:
            (size,) = HEADER.unpack_from(buf, pos)
            start, end = pos + HEADER.size, pos + HEADER.size + size
            if size > MAX_FRAME:
                self.conns.pop(c.sock.fileno(), None)
                c.sock.close()
                return False
            if end <= len(buf):
                with memoryview(buf) as view:
                    self._frame(c, view[start:end])
                pos = end
            elif size >= BIG_FRAME:   # read the rest straight into the frame's own buffer
                c.body = bytearray(size)
                c.got = len(buf) - start
                c.body[:c.got] = buf[start:]
                pos = len(buf)
                break
            else:
                break
        del buf[:pos]
        return n == want

    def _frame(self, c: _In, data) -> None:
        msg = pickle.loads(data)
        if c.sender is None:   # the first frame says who is at the other end
            endpoint, addr = msg
            c.sender = (addr, endpoint, str(addr))
            return
        addr, endpoint, key = c.sender
        if self.peers.get(key) != endpoint and self.learned.get(key) != endpoint:
            self._learn(key, endpoint)   # answers to it go back on its lane
        self.inbox.append((msg, addr))

    def waiting(self) -> bool:
        """Whether a message waits (read, or on a socket)."""
        return bool(self.inbox) or (self.sock is not None and bool(select.select(self.fds, [], [], 0)[0]))

    def inspect(self) -> dict:
        with self._cv:
            queued = sum(len(p) for o in self.pushes.values() for p in o.queue)
        return dict(self.stats, endpoint=self.endpoint, peers=len(self.peers) + len(self.learned),
                    sockets=len(self.pushes), connections=len(self.conns), queued_bytes=queued)

    def close(self) -> None:
        with self._cv:
            self._closing = True
            for out in list(self.pushes.values()):
                self._drop(out)
            self._cv.notify_all()
        for c in self.conns.values():
            c.sock.close()
        self.conns.clear()
        self.inbox.clear()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            remove_socket_file(self.endpoint)
