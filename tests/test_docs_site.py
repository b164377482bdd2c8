"""The documentation site builds as CI builds it (``mkdocs build --strict``), and what the
build makes is there:

* an API reference page for every public name of the strategies, the token batch, the module,
  the callbacks, the testing harnesses, the functional core and the precision settings;
* a page for every example notebook, showing every chart stored in it, listed under
  "Notebooks" in the navigation;
* every built-in strategy's page showing its gradient-weight curves, drawn at build time, and
  the strategy overview showing them all on one figure;
* no asset loaded from another host (the site works offline).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import trustregion.callbacks
import trustregion.functional
import trustregion.precision
import trustregion.testing
from trustregion.plots import builtin_strategies

ROOT = Path(__file__).parents[1]
NOTEBOOKS = sorted((ROOT / "examples" / "notebooks").glob("*.ipynb"))
PNG = b"\x89PNG\r\n\x1a\n"
# An asset another host would serve: a script, stylesheet, icon, image or frame from http(s),
# a CSS url() or @import of one, or a web font service.
EXTERNAL_ASSET = re.compile(
    r"<(?:script|img|iframe|source)\b[^>]*\bsrc=[\"']?(?:https?:)?//"
    r"|<link\b[^>]*\bhref=[\"']?(?:https?:)?//"
    r"|url\(\s*[\"']?(?:https?:)?//"
    r"|@import\s+[\"'](?:https?:)?//"
    r"|fonts\.(?:googleapis|gstatic)\.com", re.I)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once for this module into a temporary folder."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-6000:]}"
    return out


def page(site: Path, path: str) -> str:
    built = site / path / "index.html"
    assert built.is_file(), f"the site has no page {path}/"
    return built.read_text(encoding="utf-8")


def anchors(html: str) -> set[str]:
    return set(re.findall(r'\bid="([^"]+)"', html))


@pytest.mark.parametrize("path, module", [
    ("api/testing", trustregion.testing),
    ("api/functional", trustregion.functional),
    ("api/callbacks", trustregion.callbacks),
    ("api/precision", trustregion.precision),
])
def test_api_page_documents_every_exported_name(site: Path, path: str, module) -> None:
    found = anchors(page(site, path))
    missing = [name for name in module.__all__ if f"{module.__name__}.{name}" not in found]
    assert not missing, f"{path}: no entry for {missing}"


def test_api_pages_document_the_strategy_contract_batch_and_module(site: Path) -> None:
    expected = {
        "api/strategies": ["trustregion.strategies.base.TrustRegionStrategy",
                           "trustregion.strategies.base.TrustRegionStrategy.terms",
                           "trustregion.strategies.base.StrategyOutput",
                           "trustregion.strategies.registry.register_strategy",
                           "trustregion.strategies.registry.get_strategy"],
        "api/batch": ["trustregion.strategies.batch.TokenBatch"],
        "api/module": ["trustregion.module.TrustRegionModule"],
        "api/plots": ["trustregion.plots.weight_curves.weight_curves_figure"],
        "api/builtin_strategies": [f"trustregion.strategies.{type(s).__name__}"
                                   for s in builtin_strategies().values()],
    }
    for path, names in expected.items():
        found = anchors(page(site, path))
        missing = [name for name in names if name not in found]
        assert not missing, f"{path}: no entry for {missing}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_page_shows_its_stored_charts(site: Path, notebook: Path) -> None:
    stored = sum("image/png" in output.get("data", {})
                 for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]
                 for output in cell.get("outputs", []))
    html = page(site, f"notebooks/{notebook.stem}")
    shown = len(re.findall(r'<img\b[^>]*\bsrc="data:image/png;base64,', html))
    assert shown == stored > 0, f"{notebook.name}: {stored} stored charts, {shown} shown"
    home = page(site, ".")
    assert f'href="notebooks/{notebook.stem}/"' in home, f"{notebook.name} is not in the nav"


def test_the_notebooks_form_one_nav_section(site: Path) -> None:
    home = page(site, ".")
    if NOTEBOOKS:
        assert re.search(r">\s*Notebooks\s*<", home), "no Notebooks section in the nav"
    listed = re.findall(r'href="notebooks/([^/"]+)/"', home)
    assert sorted(set(listed)) == [p.stem for p in NOTEBOOKS]


@pytest.mark.parametrize("name", sorted(builtin_strategies()))
def test_strategy_page_shows_its_weight_curves(site: Path, name: str) -> None:
    html = page(site, f"strategies/{name}")
    assert re.search(rf'<img\b[^>]*src="\.\./weights/{name}\.png"', html), \
        f"strategies/{name}: no weight-curve figure"
    assert (site / "strategies" / "weights" / f"{name}.png").read_bytes()[:8] == PNG


def test_strategy_overview_shows_every_curve_on_one_figure(site: Path) -> None:
    html = page(site, "strategies")
    assert re.search(r'<img\b[^>]*src="weights/all\.png"', html)
    assert (site / "strategies" / "weights" / "all.png").read_bytes()[:8] == PNG


def test_no_asset_comes_from_another_host(site: Path) -> None:
    offending = {}
    for path in site.rglob("*"):
        if path.suffix in {".html", ".css"}:
            hits = EXTERNAL_ASSET.findall(path.read_text(encoding="utf-8", errors="replace"))
            if hits:
                offending[str(path.relative_to(site))] = hits[:3]
    assert not offending, f"assets loaded from other hosts: {offending}"


def test_external_asset_pattern_catches_what_it_should() -> None:
    # the pattern above is what keeps the site offline: check it on the usual culprits
    caught = ['<script src="https://cdn.example/x.js">', "<link rel=stylesheet "
              "href='//fonts.example/f.css'>", "body{background:url(https://x/y.png)}",
              '@import "https://x/y.css";', "fonts.googleapis.com"]
    allowed = ['<a href="https://lightning.ai/docs">', '<script src="../assets/x.js">',
               "<img src=\"data:image/png;base64,AAAA\">"]
    assert all(EXTERNAL_ASSET.search(text) for text in caught)
    assert not any(EXTERNAL_ASSET.search(text) for text in allowed)
