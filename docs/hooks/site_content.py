"""The parts of the documentation site made at build time (an mkdocs hook, named in mkdocs.yml).

* The example notebooks in ``examples/notebooks/`` become pages under ``notebooks/``, rendered
  with their stored outputs by mkdocs-jupyter, and a "Notebooks" section listing every one of
  them is added to the navigation.
* Each built-in strategy's gradient-weight curves are drawn from the strategy's own code
  (:func:`trustregion.plots.weight_curves_figure`) into ``strategies/weights/<name>.png``, and
  all of them on one figure into ``strategies/weights/all.png``. No image is committed, so a
  picture can never disagree with the code. A strategy page that does not show its figure, or
  a built-in without a page, is reported as a warning (an error under ``--strict``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

from trustregion.plots import builtin_strategies, figure_png, weight_curves_figure

log = logging.getLogger(f"mkdocs.plugins.{__name__}")

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = REPO / "examples" / "notebooks"
NOTEBOOK_SECTION = "Notebooks"
WEIGHTS_DIR = "strategies/weights"
OVERVIEW_FIGURE = f"{WEIGHTS_DIR}/all.png"


def notebooks() -> list[Path]:
    """The example notebooks, in file-name order (their names start with their number)."""
    return sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def weights_figure(name: str) -> str:
    """Where the site holds the weight curves of the built-in strategy ``name``."""
    return f"{WEIGHTS_DIR}/{name}.png"


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    """Add (or refresh) the "Notebooks" navigation section, after "Write your own strategy"
    when there is one, else at the end."""
    nav: list[Any] = [item for item in (config.nav or [])
                      if not (isinstance(item, dict) and NOTEBOOK_SECTION in item)]
    found = notebooks()
    if found:
        entries = [f"notebooks/{path.name}" for path in found]
        position = next((index + 1 for index, item in enumerate(nav)
                         if isinstance(item, dict) and "Write your own strategy" in item),
                        len(nav))
        nav.insert(position, {NOTEBOOK_SECTION: entries})
    config.nav = nav
    return config


@event_priority(50)  # before mkdocs-jupyter turns .ipynb files into pages
def on_files(files: Files, config: MkDocsConfig) -> Files:
    for path in notebooks():
        # a File read from its folder, not File.generated: mkdocs-jupyter wraps the file and
        # finds the notebook from its src_dir
        files.append(File(f"{NOTEBOOK_DIR.name}/{path.name}", src_dir=str(NOTEBOOK_DIR.parent),
                          dest_dir=config.site_dir, use_directory_urls=config.use_directory_urls))
    strategies = builtin_strategies()
    for name, strategy in strategies.items():
        files.append(File.generated(config, weights_figure(name),
                                    content=figure_png(weight_curves_figure({name: strategy}))))
    files.append(File.generated(config, OVERVIEW_FIGURE,
                                content=figure_png(weight_curves_figure(strategies))))
    for name in strategies:
        if files.get_file_from_path(f"strategies/{name}.md") is None:
            log.warning(f"the built-in strategy {name!r} has no page: add docs/strategies/"
                        f"{name}.md showing its weight curves (weights/{name}.png)")
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Warn when a built-in strategy's page, or the strategy overview, leaves its figure out."""
    uri = page.file.src_uri
    if uri.startswith("strategies/") and uri.endswith(".md"):
        stem = uri.removeprefix("strategies/").removesuffix(".md")
        figure = "all" if stem == "index" else stem
        if files.get_file_from_path(weights_figure(figure)) is not None \
                and f"weights/{figure}.png" not in markdown:
            log.warning(f"{uri} does not show its gradient-weight curves: add "
                        f"![…](weights/{figure}.png)")
    return markdown
