import os

import pytest

from tests.harness import Daemon


@pytest.fixture
def make_daemon(tmp_path):
    """Factory: make_daemon(overrides=None, start=True) -> a running Daemon; always torn down."""
    made = []

    def factory(overrides=None, start=True, name=None):
        d = Daemon(tmp_path / (name or f"d{len(made)}"), overrides)
        made.append(d)
        if start:
            d.start()
        return d

    yield factory
    leftovers = []
    for d in made:
        if d.proc is not None:
            if d.proc.poll() is None:
                d.stop(20)
            leftovers += d.cleanup()
    assert not leftovers, f"processes left behind: {leftovers}"


@pytest.fixture
def daemon(make_daemon):
    return make_daemon()


# ----- PostgreSQL: one throwaway server per session, one fresh database per test -------------------
@pytest.fixture(scope="session")
def pg_server():
    """A PostgreSQL server of our own (tests/pg.py), stopped and removed at the end of the session.
    Skipped when the server binaries or psycopg are missing, unless PAIRLANE_REQUIRE_PG=1 (CI)."""
    from tests.pg import PgServer, find_bin
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing = "psycopg (pip install -e '.[test]')"
    else:
        missing = None if find_bin("initdb") else "initdb (apt-get install postgresql)"
    if missing:
        if os.environ.get("PAIRLANE_REQUIRE_PG") == "1":
            pytest.fail(f"PostgreSQL tests need {missing}")
        pytest.skip(f"PostgreSQL tests need {missing}")
    server = PgServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_url(pg_server):
    """The URL of a fresh, empty database on the session's server; dropped after the test."""
    url = pg_server.database()
    yield url
    pg_server.drop(url)


@pytest.fixture
def backend_store(request):
    """Config overrides selecting the store backend named by the (indirect) parameter: {} for
    "sqlite", a fresh PostgreSQL database for "postgresql". Request it before make_daemon so the
    database outlives the daemon."""
    from tests.e2e.util import store_overrides
    with store_overrides(request, getattr(request, "param", "sqlite")) as overrides:
        yield overrides
