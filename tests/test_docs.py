"""The documentation site stays in step with the code.

* every registered strategy has a page ``docs/strategies/<name>.md`` that names every metric key
  the strategy actually returns, and shows how to select it by name;
* every page under ``docs/`` is in the ``mkdocs.yml`` nav, and every nav entry exists;
* every relative link between pages points to an existing file (and heading, for ``#anchors``);
* the concepts page names every shared ``trust_region/*`` key and every key the module logs.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from trustregion.strategies import (
    METRIC_PREFIX,
    SHARED_METRICS,
    available_strategies,
    get_strategy,
    strategy_class,
)
from trustregion.testing import probe_batch

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
STRATEGIES = available_strategies()

FENCED_CODE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
MODULE_KEY = re.compile(r"[\"']((?:reward|response|train|penalty)/[a-z0-9_]+)[\"']")


def _page(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _prose(text: str) -> str:
    """The page without code blocks and inline code, where links are not links."""
    return INLINE_CODE.sub("", FENCED_CODE.sub("", text))


def _slug(heading: str) -> str:
    """The anchor Python-Markdown's ``toc`` extension gives a heading (its default slugify)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").replace("*", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(path: Path) -> set[str]:
    return {_slug(h) for h in HEADING.findall(FENCED_CODE.sub("", _page(path)))}


def _nav_files(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [f for value in node.values() for f in _nav_files(value)]
    if isinstance(node, list):
        return [f for item in node for f in _nav_files(item)]
    return []


def _nav() -> list[str]:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    return [f for f in _nav_files(config["nav"]) if not re.match(r"^[a-z]+://", f)]


def _metric_keys(name: str) -> set[str]:
    """The metric keys strategy ``name`` (default settings) returns on a small batch."""
    batch = probe_batch(
        torch.tensor([0.05, 0.3, 0.5, 0.7, 0.5, 0.9], dtype=torch.float64),
        torch.tensor([0.2, 0.25, 0.8, 0.75, 0.3, 0.6], dtype=torch.float64),
        torch.tensor([1.0, -1.0, 1.0, -0.5, 2.0, -1.0], dtype=torch.float64),
    )
    return set(get_strategy(name)(batch).metrics)


def _builtin(name: str) -> None:
    module = strategy_class(name).__module__
    if not module.startswith("trustregion."):
        pytest.skip(f"{name!r} comes from another package ({module}), which documents it")


def test_docs_exist() -> None:
    assert (ROOT / "mkdocs.yml").is_file()
    assert (DOCS / "index.md").is_file()
    assert "drpo" in STRATEGIES  # the registry is populated before parametrizing


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_has_a_page(name: str) -> None:
    _builtin(name)
    page = DOCS / "strategies" / f"{name}.md"
    assert page.is_file(), f"registered strategy {name!r} has no page {page.relative_to(ROOT)}"
    text = _page(page)
    assert text.startswith(f"# `{name}`"), f"{page.name} must open with the strategy's name"
    assert f"name: {name}" in text, f"{page.name} shows no config selecting {name!r} by name"


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_metric_key_is_documented(name: str) -> None:
    _builtin(name)
    page = DOCS / "strategies" / f"{name}.md"
    keys = _metric_keys(name)
    assert {METRIC_PREFIX + k for k in SHARED_METRICS} <= keys
    text = _page(page)
    missing = sorted(key for key in keys if f"`{key}`" not in text)
    assert not missing, f"{page.name} does not list metric key(s) {missing}"


def test_every_page_is_in_the_nav() -> None:
    nav = _nav()
    listed = {DOCS / f for f in nav}
    unlisted = [str(p.relative_to(DOCS)) for p in PAGES if p not in listed]
    assert not unlisted, f"pages missing from the mkdocs.yml nav: {unlisted}"
    dangling = [f for f in nav if not (DOCS / f).is_file()]
    assert not dangling, f"mkdocs.yml nav entries with no page: {dangling}"
    assert len(nav) == len(set(nav)), "a page is listed twice in the nav"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in LINK.findall(_prose(_page(page))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.is_file() or DOCS.resolve() not in dest.parents:
            broken.append(f"{target} (no such page in docs/)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading with anchor #{anchor})")
    assert not broken, f"{page.relative_to(DOCS)}: broken link(s) {broken}"


def test_concepts_names_every_logged_key() -> None:
    text = _page(DOCS / "concepts.md")
    shared = [METRIC_PREFIX + key for key in SHARED_METRICS]
    logged = set()
    for source in ("module.py", "penalties.py"):
        logged |= set(MODULE_KEY.findall(_page(ROOT / "trustregion" / source)))
    assert {"reward/mean", "train/loss", "penalty/ref_kl"} <= logged  # the scan finds keys
    missing = sorted(key for key in [*shared, *logged] if f"`{key}`" not in text)
    assert not missing, f"concepts.md does not describe logged key(s) {missing}"
