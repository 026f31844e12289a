"""systemd's readiness protocol through the real daemon: a datagram socket of the test's own
stands in for $NOTIFY_SOCKET and must receive READY=1 only once `admin status` says ready, and
STOPPING=1 when a stop begins (SIGTERM or `admin stop`). Never uses systemd itself."""
from __future__ import annotations

import socket
import time

import pytest

from pairlane.entry.daemon import sd_notify


def notify_socket(path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    return sock


def receive(sock: socket.socket, timeout: float) -> str | None:
    sock.settimeout(timeout)
    try:
        return sock.recv(4096).decode()
    except socket.timeout:
        return None


def test_sd_notify_path_and_abstract(tmp_path):
    with notify_socket(tmp_path / "n.sock") as sock:
        assert sd_notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "n.sock")})
        assert receive(sock, 2) == "READY=1"
    name = f"pairlane-test-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert sd_notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert receive(sock, 2) == "STOPPING=1"
    assert not sd_notify("READY=1", {})


@pytest.mark.parametrize("how", ["sigterm", "admin_stop"])
def test_ready_then_stopping(make_daemon, tmp_path, how):
    path = tmp_path / "notify.sock"
    with notify_socket(path) as sock:
        d = make_daemon(start=False)
        d.start(wait=False, env={"NOTIFY_SOCKET": str(path)})
        # READY=1 arrives, and by then `admin status` already says ready
        first = receive(sock, 60)
        assert first == "READY=1", (first, d.log()[-3000:])
        st = d.admin("status", timeout=5)
        assert st and st["ok"] and st["ready"], st
        assert receive(sock, 0.5) is None  # once only
        if how == "sigterm":
            d.proc.send_signal(15)
        else:
            assert d.admin("stop")["ok"]
        assert receive(sock, 20) == "STOPPING=1"
        assert d.proc.wait(30) == 0
        assert receive(sock, 0.2) is None  # STOPPING=1 once only, nothing else
    log = d.log()
    assert "event=daemon_ready" in log
    # the stop was announced when it began, not when the tree was already down
    reason = "SIGTERM" if how == "sigterm" else '"admin stop"'
    stopping = log.index(f"event=daemon_stopping reason={reason}")
    assert stopping < log.index("event=daemon_tree_stopped"), log[-3000:]


def test_shipped_systemd_unit():
    """deploy/systemd/pairlane.service: Type=notify, reload by SIGHUP, restart on failure (not on a
    configuration error), a dedicated user, PAIRLANE_CONFIG, and SIGTERM to the main process only."""
    import configparser
    import shutil
    import subprocess
    from pathlib import Path

    unit = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "pairlane.service"
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str
    parser.read_string(unit.read_text())
    svc = parser["Service"]
    assert svc["Type"] == "notify"
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert svc["Restart"] == "on-failure"
    assert svc["RestartPreventExitStatus"] == "2"
    assert svc["User"] not in ("", "root") and svc["Group"] == svc["User"]
    assert svc["Environment"] == "PAIRLANE_CONFIG=/etc/pairlane/pairlane.toml"
    assert svc["KillMode"] == "mixed"
    assert svc["ExecStart"].split()[0].endswith("/pairlane")
    assert parser["Install"]["WantedBy"] == "multi-user.target"
    if shutil.which("systemd-analyze"):
        out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
        # the only complaint allowed on a machine where pairlane is not installed at /opt/pairlane
        problems = [line for line in (out.stdout + out.stderr).splitlines()
                    if line.strip() and "is not executable" not in line]
        assert not problems, problems
