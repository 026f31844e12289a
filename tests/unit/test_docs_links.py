"""Every relative link in README.md, docs/*.md and deploy/README.md points at a file or folder that
exists in this repository (and none leads outside it, as the old ../shared/ links did). Checks
Markdown inline links `[text](target)` and reference definitions `[label]: target`; web links
(scheme://, mailto:) and in-page anchors are left alone. Never reads the network."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", REPO / "deploy" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
INLINE = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.M)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def links(text: str) -> list[str]:
    text = FENCE.sub("", text)  # code blocks hold examples, not links
    return INLINE.findall(text) + REFERENCE.findall(text)


def relative(target: str) -> bool:
    return not (re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"))


def test_the_documents_exist():
    assert (REPO / "docs" / "protocol.md").is_file() and (REPO / "docs" / "operations.md").is_file()


def test_link_extraction():
    text = ("see [a](docs/a.md) and [b](../b.md#x \"t\") and [w](https://x.org) and [top](#top)\n"
            "[ref]: deploy/README.md\n```\n[not](inside/a/fence.md)\n```\n")
    assert [t for t in links(text) if relative(t)] == ["docs/a.md", "../b.md#x", "deploy/README.md"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_at_files_in_the_repository(doc):
    text = doc.read_text()
    found = [t for t in links(text) if relative(t)]
    if doc.parent != REPO / "deploy":  # (deploy/README.md links nothing, it names files)
        assert found, f"{doc} links nothing: the extraction is broken or the document lost its links"
    assert "../shared/" not in text, f"{doc.relative_to(REPO)} still points outside the repository"
    broken = []
    for target in found:
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        if REPO not in path.parents and path != REPO:
            broken.append(f"{target} (outside the repository)")
        elif not path.exists():
            broken.append(f"{target} (no such file)")
    assert not broken, f"{doc.relative_to(REPO)}: {broken}"
