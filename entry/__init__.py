"""The entry layer: the daemon's main process, the command-line commands (admin, send, bench, chaos)
and the harness that starts a real daemon for tests and benchmarks.

Arrows go one way: entry -> actors -> pairlane, actors -> supervision (tests/unit/test_layers.py).
Nothing below this package imports it.
"""
