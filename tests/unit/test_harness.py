"""The test harness: its port picking (a daemon's ports must not be taken before it binds them) and its
count of Thespian's own warnings."""
from __future__ import annotations

import socket
from pathlib import Path

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


def test_tx_timed_out_counts_thespian_expired_transmits_only(tmp_path, monkeypatch):
    """tx_timed_out counts Thespian's own two lines for a send that expired undelivered (written here
    by Thespian's thesplog with a real TransmitIntent, as its transports do), never another warning
    that merely says "timed out"."""
    import logging

    from thespian.system import utilis
    from thespian.system.transport import TransmitIntent
    from thespian.system.transport.TCPTransport import TCPv4ActorAddress
    from thespian.system.utilis import thesplog

    from pairlane.entry.daemon import run_dir_for, thespian_log_path
    d = harness.Daemon(tmp_path)
    path = Path(thespian_log_path(str(tmp_path / run_dir_for(d.cfg))))
    path.parent.mkdir(parents=True)
    monkeypatch.setattr(utilis, "_thesplog_file", str(path))   # both restored after the test
    monkeypatch.setattr(utilis, "_thesplog_control_settings", (logging.WARNING, False, 1 << 20))
    a, b = TCPv4ActorAddress("127.0.0.1", 40001), TCPv4ActorAddress("127.0.0.1", 40002)
    intent = TransmitIntent(b, "Chunk(request_id='r1', seq=3)")
    # asyncTransportBase._complete_expired_intents and TCPTransport._nextTransmitStep, verbatim
    thesplog('TX intent %s timed out', intent, level=logging.WARNING)
    thesplog('Transmit attempt from %s to %s timed out'
             ', returning PoisonPacket', a, b, level=logging.WARNING)
    assert d.thespian_warnings()["tx_timed_out"] == 2, path.read_text()
    # lines that mention a timeout but are no expired send of Thespian's
    thesplog('Actor %s handling %s: request r2 timed out after 30 s', a, "Abort", level=logging.WARNING)
    thesplog('Dropping TX: overloaded', level=logging.WARNING)
    thesplog('TX intent %s failed: peer timed out during handshake', intent, level=logging.WARNING)
    with open(path, "a") as fh:
        fh.write("ts=1.0 level=WARNING actor=gateway event=assembly_timed_out message=\"timed out\"\n")
    assert d.thespian_warnings() == {"tx_dropped": 1, "tx_only_mode": 0, "tx_timed_out": 2}, path.read_text()


def test_soak_and_fuzz_share_the_health_line_and_keep():
    """The `health:` line of a soak or fuzz report (counts in health_events' order) and their --keep."""
    import argparse
    health = dict.fromkeys(harness.STALL_EVENTS, 0) | {"tx_dropped": 3, "tx_only_mode": 0, "tx_timed_out": 1}
    assert harness.render_health(health) == ("health: loop_stalled 0, heartbeat_late 0, watchdog_kill 0, "
                                             "tx_dropped 3, tx_only_mode 0, tx_timed_out 1")
    assert harness.render_health({}) == "health: "
    ap = argparse.ArgumentParser()
    harness.add_keep_argument(ap)
    assert ap.parse_args([]).keep is False and ap.parse_args(["--keep"]).keep is True
