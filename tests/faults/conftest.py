import pytest

from pairlane.entry.harness import Daemon

FAST = {"supervision": {"heartbeat_timeout_s": 1.5, "long_work_heartbeat_timeout_s": 3.0},
        "dlq": {"retry_min_s": 0.2, "retry_max_s": 1.0},
        "gateway": {"assembly_timeout_s": 20.0},
        "pairs": {"interval_s": 2.0}}


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory):
    """One daemon for a module of fault scenarios that each leave it RUNNING; always torn down."""
    d = Daemon(tmp_path_factory.mktemp("faults"), FAST)
    d.start()
    yield d
    d.stop(30)
    left = d.cleanup()
    assert not left, f"processes left behind: {left}"


@pytest.fixture
def own_server():
    """A PostgreSQL server of the test's own, for faults that stop or fill it (never the shared one)."""
    from tests.pg import PgServer
    s = PgServer().start()
    try:
        yield s
    finally:
        s.close()
