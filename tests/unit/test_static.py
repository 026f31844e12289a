"""Static checks of the whole source tree: an undefined name or a dead import in an actor only shows when
that code path runs inside a daemon (a NameError there crash-loops the actor), so pyflakes reads every
module here, where the failure is cheap and names the line."""
from __future__ import annotations

from pathlib import Path

import pytest
from pyflakes import api as pyflakes_api          # the [test] extra installs it
from pyflakes import reporter as pyflakes_reporter

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("entry", "actors", "supervision", "pairlane", "bench")


class _Collect(pyflakes_reporter.Reporter):
    def __init__(self):
        self.problems: list[str] = []

    def unexpectedError(self, filename, msg):
        self.problems.append(f"{filename}: {msg}")

    def syntaxError(self, filename, msg, lineno, offset, text):
        self.problems.append(f"{filename}:{lineno}: {msg}")

    def flake(self, message):
        self.problems.append(str(message))


def sources():
    yield ROOT / "run.py"
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", list(sources()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_undefined_names_or_unused_imports(path):
    rep = _Collect()
    pyflakes_api.check(path.read_text(), str(path.relative_to(ROOT)), rep)
    assert rep.problems == []


def test_the_check_catches_an_undefined_name():
    rep = _Collect()
    pyflakes_api.check("def f(it):\n    return totals(it)\n", "planted.py", rep)
    assert any("undefined name 'totals'" in p for p in rep.problems), rep.problems
