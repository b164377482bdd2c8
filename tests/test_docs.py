"""The documentation site stays in step with the code.

* every registered strategy has a page ``docs/strategies/<name>.md`` that names every metric key
  the strategy actually returns, and shows how to select it by name;
* the strategies index table lists exactly the registered built-ins, each with its class;
* every page under ``docs/`` is in the ``mkdocs.yml`` nav, and every nav entry exists;
* every relative link between pages points to an existing file (and heading, for ``#anchors``);
* the concepts page names every shared ``trust_region/*`` key and every key the module logs;
* the README's Python example runs, and every ``trustregion fit`` / ``validate`` / ``predict``
  command shown in the README and the docs names an existing config and parses.
"""

from __future__ import annotations

import re
import shlex
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
TABLE_HEADER = re.compile(r"^\|\s*name\s*\|\s*class\s*\|")
INDEX_ROW = re.compile(r"^\|\s*\[`([a-z0-9_]+)`\]\(([^)\s]+)\)\s*\|\s*`(\w+)`\s*\|")
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


def _table_rows(text: str) -> list[str]:
    """The body rows of the first table whose header starts ``| name | class |``."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if TABLE_HEADER.match(line)), None)
    assert start is not None, "no table with a header starting | name | class |"
    rows = []
    for line in lines[start + 2:]:  # past the header and its |---| line
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def test_the_strategies_index_lists_exactly_the_registered_built_ins() -> None:
    rows = _table_rows(_page(DOCS / "strategies" / "index.md"))
    listed: dict[str, str] = {}
    for row in rows:
        match = INDEX_ROW.match(row)
        assert match, f"strategies/index.md: a row not of the form | [`name`](name.md) | " \
                      f"`Class` | ...: {row}"
        name, link, cls = match.groups()
        assert name not in listed, f"strategies/index.md lists {name!r} twice"
        assert link == f"{name}.md", f"strategies/index.md: {name!r} links to {link}"
        listed[name] = cls
    built_ins = {name: strategy_class(name).__name__ for name in STRATEGIES
                 if strategy_class(name).__module__.startswith("trustregion.")}
    missing = sorted(set(built_ins) - set(listed))
    assert not missing, f"strategies/index.md does not list registered strategies {missing}"
    unknown = sorted(set(listed) - set(built_ins))
    assert not unknown, f"strategies/index.md lists unregistered strategies {unknown}"
    wrong = {name: (cls, built_ins[name]) for name, cls in listed.items() if cls != built_ins[name]}
    assert not wrong, f"strategies/index.md names the wrong class (listed, registered): {wrong}"


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


# ------------------------------------------------------------------- the command-line page
YAML_BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.M | re.S)
PRINT_CONFIG = re.compile(r"<!-- print-config: (\S+) -->\n```yaml\n(.*?)^```", re.M | re.S)


def _section(path: Path, heading: str) -> str:
    """The text of the section under ``## heading``, up to the next ``##`` heading."""
    text = _page(path)
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def test_cli_settings_table_names_every_module_setting() -> None:
    import inspect

    from trustregion.batching import BatchSettings
    from trustregion.module import TrustRegionModule
    from trustregion.precision import PrecisionSettings
    from trustregion.rollout import SamplingSettings

    table = _section(DOCS / "cli.md", "Module settings")
    names = [p for p in inspect.signature(TrustRegionModule.__init__).parameters if p != "self"]
    names += [f"sampling.{f}" for f in SamplingSettings.__dataclass_fields__]
    names += [f"precision.{f}" for f in PrecisionSettings.__dataclass_fields__]
    names += [f"batching.{f}" for f in BatchSettings.__dataclass_fields__]
    names = [n for n in names if n not in ("sampling", "precision", "batching")]  # by field
    missing = [name for name in names if f"`{name}`" not in table]
    assert not missing, f"cli.md's module settings table does not list {missing}"


def test_cli_print_config_excerpt_is_the_real_output(capsys, tmp_path, monkeypatch) -> None:
    from trustregion.cli import main

    ((config, excerpt),) = PRINT_CONFIG.findall(_page(DOCS / "cli.md"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert yaml.safe_load(excerpt) == {"model": printed["model"]}, \
        f"re-run `trustregion fit --config {config} --print_config` and paste its model: section"


def _part_examples() -> list[str]:
    sections = [_section(DOCS / "cli.md", "Choosing the optimiser, schedule, sampling, batching "
                                          "and penalties"),
                _section(DOCS / "concepts.md", "Penalties: reference KL and entropy bonus")]
    return [block for text in sections for block in YAML_BLOCK.findall(text)]


def _contains(built: Any, given: Any) -> bool:
    """Every value ``given`` sets is in ``built`` (which also holds the defaults)."""
    if isinstance(given, dict):
        return isinstance(built, dict) and all(_contains(built.get(k), v)
                                               for k, v in given.items())
    if isinstance(given, list):
        return isinstance(built, list) and len(built) == len(given) and all(
            _contains(b, g) for b, g in zip(built, given, strict=True))
    if isinstance(given, float):
        return built == pytest.approx(given)
    return bool(built == given)


@pytest.mark.parametrize("block", _part_examples())
def test_the_parts_examples_build_a_module(block: str, tmp_path, monkeypatch) -> None:
    from trustregion.cli import TrustRegionCLI

    given = yaml.safe_load(block)["model"]
    path = tmp_path / "part.yaml"
    path.write_text(block)
    monkeypatch.chdir(tmp_path)
    quickstart = ROOT / "examples" / "configs" / "quickstart.yaml"
    module = TrustRegionCLI(args=["--config", str(quickstart), "--config", str(path)],
                            run=False).model
    for key, value in given.items():
        assert _contains(module.hparams[key], value), (key, module.hparams[key])


# ------------------------------------------------------------- runnable Python in the README
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def _run_python_blocks(path: Path) -> dict[str, Any]:
    """Execute the ```python blocks of ``path`` in order, in one namespace (as a reader would
    paste them one after the other); returns the namespace."""
    blocks = PYTHON_BLOCK.findall(_page(path))
    assert blocks, f"{path.name} has no ```python block"
    namespace: dict[str, Any] = {"__name__": f"{path.stem}_example"}
    for index, block in enumerate(blocks):
        exec(compile(block, f"{path.name} python block {index + 1}", "exec"), namespace)
    return namespace


def test_the_readme_python_example_runs(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # whatever an example writes stays out of the repository
    namespace = _run_python_blocks(ROOT / "README.md")
    out, logp = namespace["out"], namespace["logp"]
    # 5 tokens count (the second response's last is padding). One is beyond δ = 0.15 on its
    # harmful side: the first response's second token, π − μ = 0.45 − 0.2 = 0.25 with Â = 1.
    assert out.token_loss.shape == (2, 3)
    assert out.token_loss[1, 2].item() == 0.0
    assert out.metrics["trust_region/outside_frac"].item() == pytest.approx(1 / 5)
    assert out.metrics["trust_region/outside_frac_pos_adv"].item() == pytest.approx(1 / 3)
    assert logp.grad is not None and logp.grad[1, 2].item() == 0.0  # no gradient to padding


SHELL_BLOCK = re.compile(r"^```(?:bash|sh|console)\n(.*?)^```", re.M | re.S)


def _documented_commands() -> list[tuple[str, list[str]]]:
    """Every ``trustregion fit`` / ``validate`` / ``predict`` command in the README's and the
    docs' shell blocks, as (where, argv after ``trustregion``), continuation lines joined and
    trailing comments dropped."""
    commands = []
    for path in [ROOT / "README.md", *PAGES]:
        for block in SHELL_BLOCK.findall(path.read_text(encoding="utf-8")):
            for line in block.replace("\\\n", " ").splitlines():
                starts = [line.find(f"trustregion {command}")
                          for command in ("fit", "validate", "predict")]
                start = max(starts)  # a line shows at most one command
                if start < 0:
                    continue
                argv = shlex.split(line[start:], comments=True)[1:]
                commands.append((f"{path.relative_to(ROOT)}: {' '.join(argv)}", argv))
    return commands


DOCUMENTED_COMMANDS = _documented_commands()


def test_the_docs_show_fit_validate_and_predict_commands() -> None:
    subcommands = {argv[0] for _, argv in DOCUMENTED_COMMANDS}
    assert subcommands == {"fit", "validate", "predict"}
    assert any("--ckpt_path" in argv for _, argv in DOCUMENTED_COMMANDS)  # a resume example


@pytest.mark.parametrize("argv", [argv for _, argv in DOCUMENTED_COMMANDS],
                         ids=[where for where, _ in DOCUMENTED_COMMANDS])
def test_documented_commands_name_real_configs_and_parse(argv, monkeypatch, capsys) -> None:
    # Run from the repository root, as the docs do; a checkpoint path names a file the
    # documented run writes, so it is left out: the rest must parse as given.
    from trustregion.cli import main

    monkeypatch.chdir(ROOT)
    configs = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--config"]
    assert configs, "every documented command names its config"
    for config in configs:
        assert (ROOT / config).is_file(), f"{config} does not exist"
    args = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith(("--ckpt_path=", "--print_config")):
            args.append(arg)
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["trust_region"]  # the resolved config, strategy included
