"""The typed module ↔ callback interface: StepOutput, TrainingModule, the training state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import DigitRichArithmetic

from trustregion.batching import BatchSettings
from trustregion.callbacks import (
    CollapseGuard,
    DriftMonitor,
    DriftPlots,
    ShadowStrategies,
    TrustRegionController,
)
from trustregion.interface import StepOutput, TrainingModule, UpdateRecord, training_module
from trustregion.module import TrustRegionModule
from trustregion.rollout import SamplingSettings
from trustregion.strategies import DivergenceMask

SMALL: dict[str, Any] = {
    "batching": BatchSettings(group_size=2, prompts_per_step=2, mini_batch_size=2),
    "sampling": SamplingSettings(max_new_tokens=3),
}


def _module(random_model_dir: Path, **overrides: Any) -> TrustRegionModule:
    torch.manual_seed(0)
    return TrustRegionModule(policy=f"config:{random_model_dir}", task=DigitRichArithmetic(),
                             **{**SMALL, **overrides})


class _Capture(L.Callback):
    def __init__(self) -> None:
        self.steps: list[StepOutput] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = StepOutput.of(outputs)
        assert step is not None
        self.steps.append(step)


def _fit(module: L.LightningModule, max_steps: int, callbacks: list[L.Callback]) -> L.Trainer:
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks)
    trainer.fit(module)
    return trainer


def test_step_output_holds_the_rollout_its_stats_records_and_global_metrics(
        random_model_dir: Path) -> None:
    module = _module(random_model_dir)
    assert isinstance(module, TrainingModule)
    capture = _Capture()
    trainer = _fit(module, 2, [capture])  # 4 sequences, mini-batches of 2: 2 steps per batch
    (step,) = capture.steps
    assert len(step.rollout) == 4 and step.rollout.advantages is not None
    assert torch.equal(step.stats.rewards, step.rollout.rewards)
    assert step.stats.groups == 2
    assert len(step.updates) == 2 and all(isinstance(r, UpdateRecord) for r in step.updates)
    assert not step.updates[0].batch.logp.requires_grad  # detached
    # The step's metrics are the module's row: the same values reach callback_metrics.
    for key in ("reward/mean", "train/loss", "trust_region/outside_frac"):
        assert float(step.metrics[key]) == float(trainer.callback_metrics[key])
    assert float(step.metrics["reward/mean"]) == pytest.approx(
        float(step.rollout.rewards.mean()), abs=1e-6)
    with pytest.raises(AttributeError):
        step.updates = ()  # type: ignore[misc]  # frozen


def test_step_output_of_anything_else_is_none() -> None:
    assert StepOutput.of(None) is None
    assert StepOutput.of({"loss": torch.tensor(1.0)}) is None
    assert StepOutput.of(torch.tensor(1.0)) is None


@pytest.mark.parametrize("callback", [
    DriftMonitor(), ShadowStrategies(["ratio_clip"]), CollapseGuard(max_kl=1.0),
    TrustRegionController("kl", target_value=0.1), DriftPlots()])
def test_callbacks_refuse_a_module_without_the_interface(callback: L.Callback) -> None:
    class Plain(L.LightningModule):
        pass

    with pytest.raises(TypeError, match=r"needs a TrustRegionModule .* Plain lacks step_log"):
        callback.setup(L.Trainer(logger=False), Plain(), "fit")


def test_training_module_names_what_is_missing() -> None:
    with pytest.raises(TypeError, match="MyCallback needs a TrustRegionModule"):
        training_module(object(), "MyCallback")


def test_training_state_round_trip_restores_weights_optimiser_and_counters(
        random_model_dir: Path) -> None:
    module = _module(random_model_dir, sync_every=3)
    _fit(module, 2, [])
    state = module.training_state()
    # Every parameter and buffer of the policy is in it, and the behaviour's whole state dict
    # (which also holds the scales of a quantised behaviour).
    assert set(state["models"]["policy"]) == {n for n, _ in module.policy.named_parameters()} | {
        n for n, _ in module.policy.named_buffers()}
    assert set(state["models"]["behavior"]) == set(module.behavior.state_dict())
    copied = {
        "models": {m: {k: v.clone() for k, v in t.items()} for m, t in state["models"].items()},
        "optimizers": [{"state": {i: {k: v.clone() for k, v in s.items()}
                                  for i, s in o["state"].items()},
                        "param_groups": o["param_groups"]} for o in state["optimizers"]],
        "schedulers": [dict(s) for s in state["schedulers"]],
        "counters": dict(state["counters"]),
    }
    assert copied["counters"] == {"steps_since_sync": 2}
    _fit(module, 4, [])  # a new fit: four optimiser steps move weights, moments, counter
    assert module.steps_since_sync == 0  # 2 + 4 steps with a sync every 3: synced at 3 and 6
    optimizer = module.optimizers(use_pl_optimizer=False)
    assert float(next(iter(optimizer.state.values()))["step"]) == 4.0
    assert module.lr_schedulers().last_epoch == 4
    module.load_training_state(copied)
    assert module.steps_since_sync == 2
    for name, tensors in copied["models"].items():
        live = dict(getattr(module, name).named_parameters())
        for key, value in tensors.items():
            if key in live:
                assert torch.equal(live[key], value)
    assert float(next(iter(optimizer.state.values()))["step"]) == 2.0
    assert module.lr_schedulers().last_epoch == 2


def test_request_behavior_topk_only_raises_the_recorded_k(random_model_dir: Path) -> None:
    module = _module(random_model_dir, trust_region=DivergenceMask(divergence="topk_tv"))
    needed = module.strategy.behavior_topk
    assert module.behavior_topk == needed
    module.request_behavior_topk(needed + 3)
    module.request_behavior_topk(1)
    assert module.behavior_topk == needed + 3
    with pytest.raises(ValueError, match="k must be an integer ≥ 0"):
        module.request_behavior_topk(-1)


def test_the_documented_callback_runs_and_logs_its_global_value(random_model_dir: Path) -> None:
    page = (Path(__file__).parent.parent / "docs" / "callback_interface.md").read_text()
    code = page.split("## A minimal monitor")[1].split("```python")[1].split("```")[0]
    namespace: dict[str, Any] = {}
    exec(compile(code, "callback_interface.md", "exec"), namespace)
    capture = _Capture()
    trainer = _fit(_module(random_model_dir), 2, [namespace["NegativeAdvantageWeight"](),
                                                   capture])
    (step,) = capture.steps
    weights = torch.cat([r.output.weight[r.batch.bool_mask() & (r.batch.token_advantages() < 0)]
                         for r in step.updates])
    assert float(trainer.callback_metrics["my/neg_adv_weight"]) == pytest.approx(
        float(weights.mean()) if weights.numel() else 0.0, abs=1e-6)
