"""In-order delivery between actors, which Thespian's multiprocTCPBase does not promise.

Thespian sends each message on its own transmit intent. An intent that has to
wait for the connection to a busy peer can be overtaken by a later one that
finds the connection idle, so two messages from one actor to another can
arrive swapped (its maintainer: "sends to the same target Actor will follow
one another and can be re-ordered", kquick/Thespian#19). pairlane relies on
order: a `credit` must not reach a producer after its `stored`, and a status
change must reach the writer before a lookup that depends on it.

Owns: numbering messages per (sender incarnation, destination) on the sending
side (`Numberer`) and putting them back in order on the receiving side
(`Resequencer`). A message that is missing for `gap_timeout_s` is given up on:
everything held behind it is released in order, and it is delivered on its
own if it ever arrives. Memory is bounded: at most `max_held` messages held
per stream, at most `max_streams` streams remembered. Never blocks, never
drops a message.
"""
from __future__ import annotations

import collections
import os
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sequenced:
    """An envelope: message number `n` of the stream `origin` (one sender incarnation to one
    destination address). Senders use `Worker.send_ordered`; receivers never see the envelope."""

    origin: str
    n: int
    msg: Any


class Numberer:
    """The sending side: a counter per destination address, under one origin per incarnation."""

    def __init__(self, max_destinations: int = 1024):
        self.origin = f"{os.getpid()}-{time.time_ns():x}"
        self.next: collections.OrderedDict = collections.OrderedDict()
        self.max_destinations = max_destinations

    def wrap(self, addr, msg) -> Sequenced:
        key = str(addr)
        n = self.next.pop(key, 0)
        self.next[key] = n + 1          # most recently used last
        if len(self.next) > self.max_destinations:
            self.next.popitem(last=False)  # a long-gone incarnation's address
        return Sequenced(self.origin, n, msg)


@dataclass
class _Stream:
    expect: int = 0
    held: dict = field(default_factory=dict)   # n -> item, every n > expect
    gap_since: float | None = None             # when the oldest unfilled gap opened


class Resequencer:
    """The receiving side: `accept` returns the items now deliverable, in order."""

    def __init__(self, gap_timeout_s: float = 5.0, max_held: int = 10_000, max_streams: int = 256):
        self.gap_timeout_s = gap_timeout_s
        self.max_held = max_held
        self.max_streams = max_streams
        self.streams: collections.OrderedDict[str, _Stream] = collections.OrderedDict()
        self.stats = collections.Counter()

    def held(self) -> int:
        return sum(len(s.held) for s in self.streams.values())

    def accept(self, origin: str, n: int, item, now: float | None = None) -> list:
        now = time.monotonic() if now is None else now
        stream = self.streams.get(origin)
        if stream is None:
            stream = self.streams[origin] = _Stream()
            self._forget_idle_streams()
        self.streams.move_to_end(origin)
        if n < stream.expect:
            self.stats["late"] += 1            # its gap was given up on: deliver it now, alone
            return [item]
        if n > stream.expect:
            self.stats["reordered"] += 1
            stream.held[n] = item
            if stream.gap_since is None:
                stream.gap_since = now
            if len(stream.held) > self.max_held:
                self.stats["overflows"] += 1
                return self._skip(stream)
            return []
        out = [item]
        stream.expect += 1
        while stream.expect in stream.held:
            out.append(stream.held.pop(stream.expect))
            stream.expect += 1
        stream.gap_since = now if stream.held else None  # a next gap, if any, opens now
        return out

    def expire(self, now: float | None = None) -> list:
        """Give up on gaps older than gap_timeout_s: the items held behind them, in order."""
        now = time.monotonic() if now is None else now
        out = []
        for stream in self.streams.values():
            if stream.held and now - stream.gap_since >= self.gap_timeout_s:
                out.extend(self._skip(stream))
        return out

    def waiting(self) -> bool:
        return any(s.held for s in self.streams.values())

    def anomalies(self) -> int:
        """Gaps given up on plus messages that came after theirs was given up on."""
        return self.stats["gaps_skipped"] + self.stats["late"]

    def _skip(self, stream: _Stream) -> list:
        self.stats["gaps_skipped"] += 1
        out = [stream.held[n] for n in sorted(stream.held)]
        stream.expect = max(stream.held) + 1
        stream.held.clear()
        stream.gap_since = None
        return out

    def _forget_idle_streams(self) -> None:
        """Streams of incarnations that no longer send: forget the oldest ones holding nothing."""
        if len(self.streams) <= self.max_streams:
            return
        for origin in [o for o, s in self.streams.items() if not s.held][:len(self.streams) - self.max_streams]:
            del self.streams[origin]
