"""A throwaway PostgreSQL server for the tests (no mocks of the database).

Owns: finding initdb/pg_ctl (PATH, then /usr/lib/postgresql/*/bin), initdb into a fresh temp
directory owned by the `postgres` user when the tests run as root (PostgreSQL refuses to run as
root; CI runs as root), starting the server on a free loopback port with its unix socket in
that directory and fsync on, handing out one fresh database per caller, and stopping the
server and removing the directory at the end, even on failure. Never touches any other
PostgreSQL cluster on the machine.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid

from tests.harness import free_port


def find_bin(name: str) -> str | None:
    """The newest install's `name` (PATH first)."""
    found = shutil.which(name)
    if found:
        return found
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True):
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return None


class PgServer:
    """One PostgreSQL server in a temp dir; `database()` makes a fresh database and returns its URL."""

    def __init__(self) -> None:
        self.initdb = find_bin("initdb")
        self.pg_ctl = find_bin("pg_ctl")
        if not self.initdb or not self.pg_ctl:
            raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found: "
                               "apt-get install postgresql")
        self.root = tempfile.mkdtemp(prefix="pairlane-pg-")
        self.data = os.path.join(self.root, "data")
        self.log = os.path.join(self.root, "server.log")
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.started = False

    def _run(self, *args: str, timeout: float = 120) -> None:
        out = subprocess.run(self.as_user + list(args), capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({out.returncode}): {out.stdout}{out.stderr}"
                               f"{self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            with open(self.log) as fh:
                return "\nserver log:\n" + fh.read()[-2000:]
        except OSError:
            return ""

    def start(self) -> "PgServer":
        self._run(self.initdb, "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--locale=C")
        self._pg_start()
        return self

    def _pg_start(self) -> None:
        opts = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=on "
                f"-c synchronous_commit=on -c max_connections=200")
        self._run(self.pg_ctl, "-D", self.data, "-l", self.log, "-o", opts, "-w", "-t", "60", "start")
        self.started = True

    def stop(self, mode: str = "fast") -> None:
        if self.started:
            try:
                self._run(self.pg_ctl, "-D", self.data, "-m", mode, "-w", "-t", "60", "stop")
            finally:
                self.started = False

    def start_again(self) -> None:
        """Start a stopped server again on the same port and data directory."""
        if not self.started:
            self._pg_start()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def admin(self):
        import psycopg
        return psycopg.connect(self.url(), autocommit=True)

    def database(self) -> str:
        """A fresh, empty database; its URL."""
        name = "t_" + uuid.uuid4().hex[:12]
        with self.admin() as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with self.admin() as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
