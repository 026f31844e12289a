"""Tests use the same launcher as `run.py bench` and `run.py chaos`."""
from pairlane.entry.harness import *  # noqa: F401,F403
from pairlane.entry.harness import Daemon, free_port  # noqa: F401
