"""The import arrows of ARCHITECTURE.md, read from the source (ast), not from a running import.

entry -> actors -> pairlane, actors -> supervision. Never pairlane -> actors/supervision/thespian/entry,
never supervision -> pairlane/actors/entry, never actors -> entry. Supervision also knows nothing of
pairlane's configuration: no `config["daemon"]` reads and no PAIRLANE_* environment variables.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# layer -> top-level modules it must never import
FORBIDDEN = {
    "pairlane": {"actors", "supervision", "thespian", "entry", "bench", "run", "tests"},
    "supervision": {"pairlane", "actors", "entry", "bench", "run", "tests"},
    "actors": {"entry", "bench", "run", "tests"},
    "entry": {"tests"},
    "bench": {"tests"},
}


def imported_tops(source: str, package: str) -> list[tuple[int, str]]:
    """(line, top-level module) for every import in `source`, a module of `package`; relative imports
    resolve to `package` itself (no module here goes above its own package)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, package if node.level else (node.module or "").split(".")[0]))
    return out


def violations(source: str, package: str) -> list[str]:
    bad = [f"line {line}: {package} imports {top}" for line, top in imported_tops(source, package)
           if top in FORBIDDEN.get(package, ())]
    if package == "supervision":
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value.startswith("PAIRLANE"):
                    bad.append(f"line {node.lineno}: supervision names {node.value!r}")
                if node.value == "daemon":
                    bad.append(f"line {node.lineno}: supervision reads the daemon's config table")
    return bad


def sources():
    for package in FORBIDDEN:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield package, path


def test_every_layer_has_modules():
    seen = {package for package, _ in sources()}
    assert seen == set(FORBIDDEN), f"layers without modules: {set(FORBIDDEN) - seen}"


@pytest.mark.parametrize("package,path", list(sources()), ids=lambda v: str(v).rsplit("/", 2)[-1]
                         if isinstance(v, Path) else v)
def test_import_arrows_go_one_way(package, path):
    assert violations(path.read_text(), package) == []


def test_run_py_only_dispatches_to_the_entry_layer():
    tops = {top for _, top in imported_tops((ROOT / "run.py").read_text(), "run")}
    assert not tops & {"actors", "supervision", "pairlane"}, tops


@pytest.mark.parametrize("package,source,expected", [
    ("pairlane", "from actors.tree import build_tree\n", "pairlane imports actors"),
    ("pairlane", "import thespian.actors\n", "pairlane imports thespian"),
    ("pairlane", "def f():\n    from supervision import procs\n", "pairlane imports supervision"),
    ("supervision", "from pairlane import config\n", "supervision imports pairlane"),
    ("supervision", "import os\nlevel = os.environ['PAIRLANE_LOG_LEVEL']\n", "PAIRLANE_LOG_LEVEL"),
    ("supervision", "x = cfg['daemon']['log_level']\n", "daemon's config table"),
    ("actors", "from entry.harness import Daemon\n", "actors imports entry"),
])
def test_the_checker_catches_a_forbidden_arrow(package, source, expected):
    found = violations(source, package)
    assert any(expected in v for v in found), found


def test_the_checker_lets_allowed_arrows_pass():
    assert violations("from supervision.worker import Worker\nfrom pairlane import codec\n", "actors") == []
    assert violations("from . import procs\n", "supervision") == []
