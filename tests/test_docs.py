"""The docs stay true to the repository: every relative link in README.md and docs/ resolves (file and heading),
every `make` target and every recipe they name exists, and the README stays a front door (15 KB at most)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.fast

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_anchor_by_hand():
    assert anchor("Advantage estimators: PPO's critic or none") == "advantage-estimators-ppos-critic-or-none"
    assert anchor("Generation (2026-12-03, commit 1e95398)") == "generation-2026-12-03-commit-1e95398"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    broken, links = [], LINK.findall(page.read_text())
    if page.name == "README.md":
        assert len(links) >= 10  # the read-next table at least: the pattern finds links
    for match in LINK.finditer(page.read_text()):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file):
            broken.append(f"{target}: no heading #{fragment} in {file.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_every_make_target_and_recipe_named_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.M))
    missing = []
    for page in PAGES:
        text = page.read_text()
        for line in re.findall(r"`make ([^`]+)`", text):
            words = [w for w in line.split() if "=" not in w and not w.startswith("-") and w != "..."]
            missing += [f"{page.name}: make {w}" for w in words if w not in targets]
        for recipe in set(re.findall(r"recipes/[\w./-]+\.yaml", text)):
            if not (ROOT / recipe).exists():
                missing.append(f"{page.name}: {recipe}")
    assert not missing, missing


def test_the_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 15 * 1024
    assert "make sft rm ppo" in text and "make test" in text and "## Read next" in text
