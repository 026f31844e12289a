"""The test harness's port picking: a daemon's ports must not be taken before it binds them."""
from __future__ import annotations

import socket

from pairlane.entry import harness


def test_free_ports_are_unique_bindable_and_outside_the_ephemeral_range():
    lo, hi = harness._ephemeral_range()
    ports = [harness.free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert not [p for p in ports if lo <= p <= hi], "the kernel may hand these to any bind(0) or connect()"
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))


def test_a_port_in_use_is_never_handed_out(monkeypatch):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        monkeypatch.setattr(harness, "_ephemeral_range", lambda: (busy + 1, 65000))
        picks = iter([busy, busy, 20001])

        class Scripted:
            def choice(self, _):
                return next(picks)
        monkeypatch.setattr(harness, "_pick", Scripted())
        monkeypatch.setattr(harness, "_handed_out", set())
        assert harness.free_port() == 20001
