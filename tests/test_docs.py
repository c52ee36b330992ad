"""The doorway and the docs: README.md stays short, and every relative link in it and in docs/ resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a markdown page."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", page.read_text(), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    links = LINK.findall(page.read_text())
    for link in links:
        if re.match(r"^[a-z]+:", link):
            continue  # http(s), mailto: outside the repo by intent
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name} links to {link}, which does not exist"
        assert ROOT in target.parents or target == ROOT, f"{page.name} links outside the repository: {link}"
        if anchor and target.suffix == ".md":
            assert anchor in anchors(target), f"{page.name} links to #{anchor}, not a heading of {target.name}"


def test_the_readme_is_a_doorway() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert max(len(line) for line in text.splitlines()) <= 200  # no lab-notebook table cells
    assert (ROOT / "docs" / "architecture.md").is_file()


def test_nothing_points_at_the_old_design_file() -> None:
    """The design of record is docs/architecture.md; a clone has no shared folder beside it."""
    old = ("../" + "shared", '"shared"' + ' / "data"', "DESIGN" + " §", "DESIGN" + ".md")  # split: this file must not match itself
    hits = []
    for path in ROOT.rglob("*"):
        if ".git" in path.parts or not path.is_file() or path.suffix not in {".py", ".md", ".toml", ".sh", ".yaml"}:
            continue
        text = path.read_text(errors="ignore")
        hits += [f"{path.relative_to(ROOT)}: {s}" for s in old if s in text]
    assert hits == []
