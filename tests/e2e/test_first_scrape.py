"""What the very first scrapes of a daemon show (PROTOCOL.md section 7: every counter exists at 0 from
the first scrape; `pairlane_pairs_leader` is 1 only while this daemon evaluates pairs).

Owns: scraping a daemon over HTTP from the moment its metrics endpoint answers, before the rest of its
tree has started. Never changes a daemon's state.
"""
from __future__ import annotations

import http.client
import shutil
import subprocess
import sys
import time

import pytest

from tests.e2e.test_pairs_metrics import scrape, val
from tests.e2e.util import wait_until
from tests.harness import REPO, free_port

pytestmark = pytest.mark.timeout(180)


def scrapes_until(d, done, timeout: float = 40.0) -> list[dict]:
    """Every scrape of `d` from the first one it answers until done() is true (a deadline, no sleeps
    as synchronisation: each scrape is taken as soon as the previous one returned)."""
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert d.proc.poll() is None, d.log()[-3000:]
        try:
            samples, _ = scrape(d)
        except (OSError, http.client.HTTPException):
            if out:
                raise
            continue                                   # not listening yet
        out.append(samples)
        if done():
            return out
    raise AssertionError(f"not done in {timeout}s after {len(out)} scrape(s)\n{d.log()[-3000:]}")


def test_follower_never_shows_pairs_leader_1_not_even_before_its_pairs_actor_starts(make_daemon, pg_url):
    a = make_daemon({"store": {"url": pg_url}, "daemon": {"name": "daemon-A"}}, name="A")
    wait_until(lambda: (a.admin("status") or {}).get("pairs_leader") is True, 20, 0.1, "A leading")
    b = make_daemon({"store": {"url": pg_url}, "daemon": {"name": "daemon-B"}}, name="B", start=False)
    b.start(wait=False)

    def b_known_follower() -> bool:
        st = b.admin("status", timeout=1.0)
        return bool(st and st.get("ok") and st.get("ready") and st.get("pairs_leader") is False)
    seen = scrapes_until(b, b_known_follower)
    b.wait_ready()
    values = [val(s, "pairlane_pairs_leader") for s in seen]
    assert values and set(values) == {0.0}, values     # 0 until known, and known to be 0
    assert val(scrape(b)[0], "pairlane_pairs_leader") == 0.0
    assert val(scrape(a)[0], "pairlane_pairs_leader") == 1.0


def test_single_daemon_leads_from_the_first_scrape(make_daemon):
    d = make_daemon(start=False)
    d.start(wait=False)
    seen = scrapes_until(d, lambda: (d.admin("status", timeout=1.0) or {}).get("ready") is True)
    d.wait_ready()
    assert {val(s, "pairlane_pairs_leader") for s in seen} == {1.0}


@pytest.fixture
def curve_keys(tmp_path):
    kdir, adir = tmp_path / "keys", tmp_path / "authorized"
    kdir.mkdir()
    adir.mkdir()
    for name in ("server", "alice"):
        out = subprocess.run([sys.executable, str(REPO / "run.py"), "keygen", name, "--dir", str(kdir)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out
    shutil.copy(kdir / "alice.key", adir / "alice.key")
    return {"secret": str(kdir / "server.key_secret"), "authorized": str(adir)}


def test_every_auth_failure_series_of_each_curve_endpoint_is_0_from_the_first_scrape(make_daemon, curve_keys):
    curve = {"curve_secret_key": curve_keys["secret"], "curve_authorized_keys": curve_keys["authorized"]}
    # the admin socket stays plain loopback here so the harness can ask it for readiness; its series
    # are preset all the same (test_curve proves the admin socket's refusals are counted in them)
    d = make_daemon({"gateway": {"endpoint": f"tcp://0.0.0.0:{free_port()}", **curve,
                                 "legacy_endpoint": f"tcp://0.0.0.0:{free_port()}", "legacy_allow": ["127.0.0.1"]}},
                    start=False)
    d.start(wait=False)
    first = scrapes_until(d, lambda: True)[0]          # the very first scrape that answered
    want = {"gateway": ("unknown_key", "wrong_mechanism", "bad_handshake", "malformed"),
            "admin": ("unknown_key", "wrong_mechanism", "bad_handshake", "malformed", "bad_token"),
            "legacy": ("address_not_allowed", "wrong_mechanism", "malformed")}
    for endpoint, reasons in want.items():
        for reason in reasons:
            assert val(first, "pairlane_auth_failures_total", endpoint=endpoint, reason=reason) == 0.0, \
                (endpoint, reason)
    d.wait_ready()
