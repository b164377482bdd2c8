"""The glossary page lists every hyperparameter of every built-in strategy, with its default.

``docs/glossary.md`` has one table whose header starts ``| strategy | name | symbol | default |``.
Each row names the strategies it applies to (backticked names, or ``all``), one hyperparameter,
its symbol, and its default as written in a config (read back with YAML: ``null``, ``.inf``,
``0.2``). For every registered built-in strategy and every ``__init__`` parameter there must be a
row, and its default must be the parameter's default. A row naming a parameter the strategy does
not have fails too, so the page cannot go stale in either direction.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import yaml

from trustregion.strategies import available_strategies, strategy_class

GLOSSARY = Path(__file__).parents[1] / "docs" / "glossary.md"
HEADER = re.compile(r"^\|\s*strategy\s*\|\s*name\s*\|\s*symbol\s*\|\s*default\s*\|")
BACKTICKED = re.compile(r"`([^`]+)`")
BUILT_INS = [name for name in available_strategies()
             if strategy_class(name).__module__.startswith("trustregion.")]
Row = tuple[set[str], str, str]  # strategies ("all" for every one), name, default cell


def _rows() -> list[Row]:
    lines = GLOSSARY.read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines) if HEADER.match(line)), None)
    assert start is not None, "docs/glossary.md has no table headed | strategy | name | symbol |" \
                              " default | meaning |"
    rows: list[Row] = []
    for line in lines[start + 2:]:  # past the header and its |---| line
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        strategies = {"all"} if cells[0] == "all" else set(BACKTICKED.findall(cells[0]))
        names, defaults = BACKTICKED.findall(cells[1]), BACKTICKED.findall(cells[3])
        assert strategies and len(names) == 1 and len(defaults) == 1, f"malformed row: {line}"
        rows.append((strategies, names[0], defaults[0]))
    return rows


def _parameters(name: str) -> dict[str, object]:
    signature = inspect.signature(strategy_class(name).__init__)
    return {param: p.default for param, p in signature.parameters.items()
            if param != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _same(documented: object, actual: object) -> bool:
    """Equal and of the same type (``8`` is not ``8.0``; ``.inf`` reads back as ``math.inf``)."""
    return documented == actual and type(documented) is type(actual)


def test_the_glossary_is_in_the_nav() -> None:
    nav = (GLOSSARY.parents[1] / "mkdocs.yml").read_text(encoding="utf-8")
    assert "glossary.md" in nav


@pytest.mark.parametrize("name", BUILT_INS)
def test_every_hyperparameter_is_in_the_glossary_with_its_default(name: str) -> None:
    rows = _rows()
    for param, default in _parameters(name).items():
        matching = [cell for strategies, row_name, cell in rows
                    if row_name == param and (name in strategies or "all" in strategies)]
        assert matching, f"docs/glossary.md has no row for {name}'s hyperparameter {param!r}"
        assert len(matching) == 1, f"docs/glossary.md lists {name}'s {param!r} twice"
        documented = yaml.safe_load(matching[0])
        assert _same(documented, default), (
            f"docs/glossary.md gives {name}'s {param!r} the default {matching[0]!r}; "
            f"the code's default is {default!r}")


def test_every_glossary_row_names_a_real_hyperparameter() -> None:
    known = {name: set(_parameters(name)) for name in BUILT_INS}
    for strategies, param, _ in _rows():
        targets = BUILT_INS if "all" in strategies else sorted(strategies)
        for name in targets:
            assert name in known, f"docs/glossary.md names unknown strategy {name!r}"
            assert param in known[name], f"docs/glossary.md lists {param!r} for {name}, " \
                                         f"which has no such hyperparameter"
