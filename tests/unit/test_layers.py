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


def layer_of(module: str) -> str:
    """The layer a dotted module name belongs to. The layers are installed inside the `pairlane`
    package (`pairlane.actors.writer`), so the layer is the second part there; `pairlane.config`
    is the pure core, layer `pairlane`."""
    parts = module.split(".")
    if parts[0] == "pairlane" and len(parts) > 1 and parts[1] in FORBIDDEN:
        return parts[1]
    return parts[0]


def imported_tops(source: str, package: str) -> list[tuple[int, str]]:
    """(line, layer) for every import in `source`, a module of `package`; relative imports
    resolve to `package` itself (no module here goes above its own package)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, layer_of(a.name)) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, package if node.level else layer_of(node.module or "")))
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
        for path in sorted((ROOT / package).rglob("*.py")):   # rglob does not follow the symlinks
            yield package, path                              # pairlane/actors -> ../actors etc.


def test_every_layer_has_modules():
    seen = {package for package, _ in sources()}
    assert seen == set(FORBIDDEN), f"layers without modules: {set(FORBIDDEN) - seen}"


@pytest.mark.parametrize("package,path", list(sources()), ids=lambda v: str(v).rsplit("/", 2)[-1]
                         if isinstance(v, Path) else v)
def test_import_arrows_go_one_way(package, path):
    assert violations(path.read_text(), package) == []


def test_run_py_only_dispatches_to_the_entry_layer():
    tops = {top for _, top in imported_tops((ROOT / "run.py").read_text(), "run")}
    assert "entry" in tops and not tops & {"actors", "supervision", "pairlane"}, tops


@pytest.mark.parametrize("package,source,expected", [
    ("pairlane", "from actors.tree import build_tree\n", "pairlane imports actors"),
    ("pairlane", "import thespian.actors\n", "pairlane imports thespian"),
    ("pairlane", "def f():\n    from supervision import procs\n", "pairlane imports supervision"),
    ("supervision", "from pairlane import config\n", "supervision imports pairlane"),
    ("supervision", "import os\nlevel = os.environ['PAIRLANE_LOG_LEVEL']\n", "PAIRLANE_LOG_LEVEL"),
    ("supervision", "x = cfg['daemon']['log_level']\n", "daemon's config table"),
    ("actors", "from entry.harness import Daemon\n", "actors imports entry"),
    ("pairlane", "from pairlane.actors.tree import build_tree\n", "pairlane imports actors"),
    ("pairlane", "import pairlane.supervision.procs\n", "pairlane imports supervision"),
    ("supervision", "from pairlane.config import load\n", "supervision imports pairlane"),
    ("actors", "from pairlane.entry.harness import Daemon\n", "actors imports entry"),
])
def test_the_checker_catches_a_forbidden_arrow(package, source, expected):
    found = violations(source, package)
    assert any(expected in v for v in found), found


def test_the_checker_lets_allowed_arrows_pass():
    assert violations("from supervision.worker import Worker\nfrom pairlane import codec\n", "actors") == []
    assert violations("from pairlane.supervision.worker import Worker\nfrom pairlane.codec import pack\n",
                      "actors") == []


def test_every_layer_is_installed_inside_the_pairlane_package():
    """No generic top-level module names in site-packages: the source tree's pairlane/<layer> is a
    symlink to the repository's <layer>/, and every import names the layer through `pairlane.`."""
    for layer in ("actors", "supervision", "entry", "bench"):
        link = ROOT / "pairlane" / layer
        assert link.is_symlink() and link.resolve() == (ROOT / layer).resolve(), link
    bare = [f"{path.relative_to(ROOT)}:{line}" for package, path in sources()
            for line, top in _bare_layer_imports(path.read_text())]
    assert bare == [], bare


def _bare_layer_imports(source: str) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(source)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else []
        out += [(node.lineno, n) for n in names if n.split(".")[0] in ("actors", "supervision", "entry", "bench")]
    return out
    assert violations("from . import procs\n", "supervision") == []
