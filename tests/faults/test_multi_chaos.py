"""A chaos run over two daemons on one PostgreSQL store (issue 14): producers fail over between the
daemons while actors of either daemon are SIGKILLed, whole daemons are SIGKILLed (and restarted a
few seconds later) and the server crashes (`pg_ctl stop -m immediate`) and comes back. Then every
`stored` reply is checked against the store: 0 lost, 0 duplicate rows, nothing partial visible.
The server is the test's own (it is crashed), not the session's.
"""
from __future__ import annotations

import time

import pytest

from pairlane.entry.chaos_multi import check_pg, clean, run_multi_chaos
from tests.e2e.util import inspect, wait_until

from .conftest import FAST

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_chaos_over_two_daemons_with_daemon_kills_and_server_restarts(make_daemon, own_server):
    url = own_server.database()
    daemons = [make_daemon(dict(FAST, store={"url": url}, daemon={"name": f"chaos-{i}"}), name=f"d{i}")
               for i in range(2)]

    def pg_restart(down_s: float) -> None:
        own_server.stop("immediate")          # a crash: no checkpoint, every session cut
        try:
            time.sleep(down_s)                # the outage itself, not a synchronisation
        finally:
            own_server.start_again()

    summary = run_multi_chaos(daemons, duration=50.0, seed=14, pg_restart=pg_restart)
    print(summary)
    assert summary["faults"].get("kill_daemon", 0) >= 1 and summary["faults"].get("pg_restart", 0) >= 1 \
        and summary["faults"].get("kill_actor", 0) >= 1, summary
    assert summary["stored"] >= 10, summary
    assert summary["still_running"] == 0, summary
    assert clean(summary), summary
    for d in daemons:                          # every spooled chunk landed; the store is consistent
        wait_until(lambda: inspect(d, "dlq")["depth"] == 0, 90, 0.2, "the DLQ drained")
        assert d.admin("verify", timeout=60)["problems"] == []
    # a second look, after the DLQs drained: still exact
    assert check_pg(url, {}, wait_s=0)["duplicate_rows"] == 0
