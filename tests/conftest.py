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
