"""The supervised daemon foundation, through a real `python run.py` daemon:
admin status (wire and CLI), restarts after SIGKILL, the hang watchdog,
escalation to a non-zero exit, stop/SIGTERM/SIGKILL leaving no process,
loopback-only listening sockets, and the start-up refusals of PROTOCOL.md
section 0 (exit code 2, message naming the key).

Only `root` and `admin` are assumed to exist: the rest of the tree grows.
The `make_daemon` fixture (tests/conftest.py) tears every daemon down and
fails the test if any of its processes is left.
"""
from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import time

import pytest

from tests.e2e.util import refused
from tests.harness import alive, free_port

ROW_KEYS = {"name", "supervisor", "state", "pid", "restarts", "uptime_s", "last_exit"}


def poll(d, pred, timeout: float, what: str, interval: float = 0.02) -> dict:
    """Poll `status` with a short per-request timeout (a hung or restarting admin must not stall
    the poll) until pred(rows by name) holds."""
    deadline = time.monotonic() + timeout
    rows = None
    while time.monotonic() < deadline:
        st = d.admin("status", timeout=0.3)
        if st and st.get("ok"):
            d._learn_pids(st)
            rows = {a["name"]: a for a in st["actors"]}
            if pred(rows):
                return rows
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last rows {rows}\n{d.log()[-3000:]}")


def wait_exit(d, timeout: float) -> int:
    return d.proc.wait(timeout)


def wait_no_process(d, pids, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in pids if alive(p)]
    return left


# ----- admin status -------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_status_lists_every_actor_and_supervisor_of_the_tree(daemon):
    st = daemon.status()
    assert st["ok"] is True and st["ready"] is True
    rows = {a["name"]: a for a in st["actors"]}
    assert st["actors"][0]["name"] == "root" and {"root", "admin"} <= set(rows)
    for a in st["actors"]:
        assert ROW_KEYS <= set(a), a
        assert a["state"] == "RUNNING" and a["restarts"] == 0 and a["last_exit"] is None
        assert isinstance(a["pid"], int) and alive(a["pid"])
        assert a["uptime_s"] >= 0
    assert rows["admin"]["supervisor"] == "root" and rows["root"]["supervisor"] == "-"
    names = {a["name"] for a in st["actors"]}
    assert all(a["supervisor"] in names | {"-"} for a in st["actors"])  # every supervisor is listed too


@pytest.mark.timeout(60)
def test_cli_status_prints_a_table_and_json_and_exit_codes(make_daemon):
    d = make_daemon()
    r = d.admin_cli("status")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = next(ln for ln in lines if ln.startswith("NAME"))
    cols = ["NAME", "STATE", "PID", "UPTIME", "RESTARTS", "LAST EXIT"]
    assert [header.index(c) for c in cols] == sorted(header.index(c) for c in cols), header
    body = lines[lines.index(header) + 1:]
    assert any(ln.split()[0] == "root" and "RUNNING" in ln for ln in body)
    admin_line = next(ln for ln in body if ln.split()[0] == "admin")
    assert "RUNNING" in admin_line and str(d.actor("admin")["pid"]) in admin_line

    for argv in (("status", "--json"), ("--json", "status")):
        r = d.admin_cli(*argv)
        assert r.returncode == 0, r.stderr
        reply = json.loads(r.stdout)
        assert reply["ok"] is True and reply["ready"] is True
        assert {"root", "admin"} <= {a["name"] for a in reply["actors"]}
        assert all(ROW_KEYS <= set(a) for a in reply["actors"])

    r = d.admin_cli("inspect", "no-such-actor")  # an error reply: exit 1
    assert r.returncode == 1 and "no-such-actor" in r.stderr

    nobody = make_daemon(start=False)  # a config whose daemon is not running
    t0 = time.monotonic()
    r = nobody.admin_cli("--timeout", "1", "status")
    assert r.returncode == 4 and "no answer" in r.stderr, (r.returncode, r.stderr)
    assert time.monotonic() - t0 < 10


# ----- restarts ------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_sigkilled_actor_is_running_again_with_one_restart_within_2s(daemon):
    old = daemon.actor("admin")["pid"]
    t0 = time.monotonic()
    os.kill(old, signal.SIGKILL)
    rows = poll(daemon, lambda r: r["admin"]["state"] == "RUNNING" and r["admin"]["pid"] not in (None, old),
                2.0, "admin restarted")
    assert time.monotonic() - t0 < 2.0
    assert rows["admin"]["restarts"] == 1 and rows["admin"]["last_exit"] == "crashed"
    assert not alive(old)


@pytest.mark.timeout(60)
def test_hung_actor_is_killed_by_the_watchdog_and_restarted_within_5s(daemon):
    old = daemon.actor("admin")["pid"]
    reply = daemon.admin("inject", {"actor": "admin", "fault": "hang"})
    assert reply == {"ok": True, "injected": "hang", "actor": "admin"}
    t0 = time.monotonic()
    rows = poll(daemon, lambda r: r["admin"]["state"] == "RUNNING" and r["admin"]["pid"] not in (None, old),
                5.0, "admin restarted by the watchdog")
    assert time.monotonic() - t0 < 5.0
    assert rows["admin"]["restarts"] == 1 and rows["admin"]["last_exit"] == "hung (watchdog kill)"
    assert not alive(old)
    # the kill says where the actor was stuck: the stack it dumped on the supervisor's SIGUSR2
    kills = [ln for ln in daemon.log_path.read_text().splitlines() if "event=watchdog_kill " in ln]
    assert len(kills) == 1 and "child=admin " in kills[0], kills
    assert "worker.py:" in kills[0] and " _inject" in kills[0], kills[0]
    assert daemon.health_events()["watchdog_kill"] == 1


@pytest.mark.timeout(60)
def test_inject_is_refused_unless_fault_injection_is_enabled(make_daemon):
    d = make_daemon({"admin": {"allow_fault_injection": False}})
    reply = d.admin("inject", {"actor": "admin", "fault": "crash"})
    assert reply["ok"] is False and "allow_fault_injection" in reply["error"]
    assert d.actor("admin")["restarts"] == 0


@pytest.mark.timeout(90)
def test_restart_storm_past_intensity_escalates_and_the_daemon_exits_non_zero(make_daemon):
    d = make_daemon({"supervision": {"max_restarts": 2, "window_s": 30}})
    pids = d.all_pids()
    for i in range(1, 3):
        assert d.admin("inject", {"actor": "admin", "fault": "crash"})["ok"]
        poll(d, lambda r: r["admin"]["state"] == "RUNNING" and r["admin"]["restarts"] >= i, 5.0,
             f"admin restart {i}")
    assert d.admin("inject", {"actor": "admin", "fault": "crash"})["ok"]  # 3 crashes > 2
    code = wait_exit(d, 20)
    assert code == 1, d.log()
    log = d.log()
    assert "restart_intensity_exceeded" in log and "daemon_exit_escalated" in log
    assert wait_no_process(d, pids, 5.0) == []


# ----- stopping ----------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_admin_stop_exits_0_and_leaves_no_process(daemon):
    pids = daemon.all_pids()
    assert len(pids) >= 4  # main, Thespian admin and logger, root, admin ...
    assert daemon.admin("stop") == {"ok": True, "stopping": True}
    assert wait_exit(daemon, 30) == 0
    assert wait_no_process(daemon, pids, 5.0) == []
    assert "tree_stopped" in daemon.log()


@pytest.mark.timeout(60)
def test_sigterm_exits_0_and_leaves_no_process(daemon):
    pids = daemon.all_pids()
    daemon.proc.send_signal(signal.SIGTERM)
    assert wait_exit(daemon, 30) == 0
    assert wait_no_process(daemon, pids, 5.0) == []


@pytest.mark.timeout(60)
def test_sigkill_of_the_main_process_leaves_no_process_within_10s(make_daemon):
    d = make_daemon()
    pids = d.all_pids()
    d.proc.kill()
    d.proc.wait(5)
    t0 = time.monotonic()
    assert wait_no_process(d, pids, 10.0) == []
    assert d.pgid and d.all_pids() == []
    assert time.monotonic() - t0 < 10
    # and the single-instance locks died with it: a new daemon on the same store starts
    again = make_daemon({"store": {"path": d.db_path}, "dlq": {"path": d.cfg["dlq"]["path"]}})
    assert again.status()["ready"]


@pytest.mark.timeout(60)
def test_sigkill_of_the_root_supervisor_restarts_the_tree_without_two_admins(daemon):
    before = {a["name"]: a["pid"] for a in daemon.status()["actors"]}
    os.kill(before["root"], signal.SIGKILL)
    rows = poll(daemon, lambda r: r["root"]["pid"] != before["root"] and
                all(a["state"] == "RUNNING" for a in r.values()) and r["admin"]["pid"] != before["admin"],
                10.0, "a new root with a new admin")
    assert set(rows) == set(before)
    for name, pid in before.items():  # every old instance is gone: no two of any actor
        assert not alive(pid), f"old {name} ({pid}) still alive"
        assert rows[name]["pid"] != pid
    assert daemon.proc.poll() is None


# ----- loopback only -----------------------------------------------------------------------------------
def _decode(hexaddr: str) -> tuple[str, int]:
    host, port = hexaddr.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip = ipaddress.IPv4Address(raw[::-1])
    else:
        ip = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    return str(ip), int(port, 16)


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(ip, port) of every TCP socket in LISTEN state that process `pid` holds open."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[len("socket:["):-1])
        out = []
        for table in ("tcp", "tcp6"):
            with open(f"/proc/{pid}/net/{table}") as fh:
                next(fh)
                for line in fh:
                    f = line.split()
                    if f[3] == "0A" and f[9] in inodes:
                        out.append(_decode(f[1]))
        return out
    except FileNotFoundError:  # the process is gone
        return []


@pytest.mark.timeout(60)
def test_every_listening_socket_of_the_daemon_is_on_127_0_0_1(daemon):
    found: dict[int, list] = {}
    for pid in daemon.all_pids():
        found[pid] = listening_sockets(pid)
    everything = [s for socks in found.values() for s in socks]
    assert everything, "no listening socket found at all"
    wrong = {pid: [s for s in socks if s[0] != "127.0.0.1"] for pid, socks in found.items()}
    assert not any(wrong.values()), f"listening beyond 127.0.0.1: {wrong}"
    ports = {p for _, p in everything}
    admin_port = int(daemon.admin_endpoint.rsplit(":", 1)[1])
    assert daemon.cfg["daemon"]["actor_port"] in ports and admin_port in ports, (ports, found)
    # every actor process listens (Thespian gives each one a TCP port): all were checked
    actor_pids = {a["pid"] for a in daemon.status()["actors"]}
    assert all(found.get(p) for p in actor_pids), found


# ----- refusals at start (exit 2) ------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("overrides,key", [
    ({"daemon": {"bogus": 1}}, "daemon.bogus"),
    ({"gateway": {"credit": "eight"}}, "gateway.credit"),
    ({"gateway": {"endpoint": "tcp://0.0.0.0:5590"}}, "gateway.endpoint"),
    ({"admin": {"endpoint": "tcp://10.0.0.1:5591"}}, "admin.endpoint"),
    ({"metrics": {"listen": "0.0.0.0:9591"}}, "metrics.listen"),
], ids=["unknown-key", "wrong-type", "any-address", "remote-address", "metrics-any-address"])
def test_bad_config_exits_2_naming_the_key(make_daemon, overrides, key):
    out = refused(make_daemon(overrides, start=False))
    assert f"'{key}'" in out, out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("key", ["daemon.actor_port", "admin.endpoint", "gateway.endpoint"])
def test_busy_port_exits_2_naming_the_key(make_daemon, key):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        sect, k = key.split(".")
        value = port if key == "daemon.actor_port" else f"tcp://127.0.0.1:{port}"
        out = refused(make_daemon({sect: {k: value}}, start=False))
    assert f"'{key}'" in out and str(port) in out and "busy" in out, out


@pytest.mark.timeout(60)
def test_a_second_daemon_on_the_same_store_or_spool_exits_2(make_daemon):
    first = make_daemon()
    same_store = make_daemon({"store": {"path": first.db_path}}, start=False, name="same_store")
    out = refused(same_store)
    assert "'store.path'" in out and "in use by another pairlane daemon" in out and first.db_path in out
    same_spool = make_daemon({"dlq": {"path": first.cfg["dlq"]["path"]}}, start=False, name="same_spool")
    out = refused(same_spool)
    assert "'dlq.path'" in out and "in use by another pairlane daemon" in out
    assert first.status()["ready"]  # the first daemon is unharmed


# ----- lanes: the data path beside Thespian (supervision/lanes.py) -----------------------------------
def lane_dir(d) -> str:
    from pairlane.entry.daemon import run_dir_for
    from pairlane.supervision.lanes import lane_dir
    return lane_dir(str(d.tmp / run_dir_for(d.cfg)))


def lane_files(d) -> set[str]:
    path = lane_dir(d)
    return set(os.listdir(path)) if os.path.isdir(path) else set()


@pytest.mark.timeout(120)
def test_the_data_path_goes_on_lanes_and_each_incarnation_has_its_own(make_daemon):
    from pairlane.client import Producer, synthetic_columns
    from tests.e2e.util import inspect, rows_for

    d = make_daemon()
    with Producer(d.gateway_endpoint, timeout_s=10, max_chunk_rows=1000) as p:
        assert p.send_result("lane-1", "L", synthetic_columns(5000, seed=1))["type"] == "stored"
    lanes = {name: inspect(d, name)["lane"] for name in ("gateway", "assembler", "writer")}
    for name, lane in lanes.items():   # every hop of the result went on a lane, not through Thespian
        assert lane["received"] > 0 and lane["sent"] > 0 and lane["lost"] == 0, (name, lane)
    assert lanes["assembler"]["received"] >= 6     # begin, five chunks (end may be answered at the gateway)
    # answers due within milliseconds were waited for in the actors' own select, not Thespian's loop
    assert sum(lane["lingered"] for lane in lanes.values()) > 0, lanes
    files = lane_files(d)
    assert {os.path.basename(l["endpoint"]) for l in lanes.values()} <= files
    assert all(f.split("-")[0] in {a["name"] for a in d.status()["actors"]} for f in files)
    assert os.stat(lane_dir(d)).st_mode & 0o077 == 0

    writer = d.actor("writer")
    os.kill(writer["pid"], signal.SIGKILL)
    d.wait_running("writer", restarts=1, timeout=15)
    state = inspect(d, "writer")
    new = state["lane"]
    # its own lane, at a new endpoint; nothing of the old one's mail reached it (all it got yet is
    # the assembler arming the direct path, pairlane.lifecycle.Forwarded: no write)
    assert new["endpoint"] != lanes["writer"]["endpoint"] and state["rows_written"] == 0 and state["commits"] == 0
    assert os.path.basename(lanes["writer"]["endpoint"]) not in lane_files(d)   # the killed one's is removed
    with Producer(d.gateway_endpoint, timeout_s=10, retries=10, max_chunk_rows=1000) as p:
        assert p.send_result("lane-2", "L", synthetic_columns(3000, seed=2))["type"] == "stored"
    assert rows_for(d, "lane-1") == 5000 and rows_for(d, "lane-2") == 3000
    assert inspect(d, "writer")["lane"]["received"] > 0

    # a tree killed outright leaves its socket files; the next daemon on the store clears them
    d.proc.kill()
    d.proc.wait(5)
    assert wait_no_process(d, d.all_pids(), 10.0) == []
    stale = lane_files(d)
    assert stale
    again = make_daemon({"store": {"path": d.db_path}, "dlq": {"path": d.cfg["dlq"]["path"]}})
    assert again.status()["ready"]
    assert not stale & lane_files(again)
    again.stop(20)
    assert not os.path.exists(lane_dir(again))   # a graceful stop closes every lane, and removes the rest
