"""RolloutProgressBar counts rollout batches, not optimiser steps."""

from __future__ import annotations

import io
from typing import Any

import lightning as L
import pytest
import torch
from conftest import DigitRichArithmetic
from rich.console import Console

from trustregion.batching import BatchSettings
from trustregion.callbacks import RolloutProgressBar
from trustregion.module import TrustRegionModule
from trustregion.rollout import SamplingSettings


class _Seen(L.Callback):
    """Records the bar's total and description when the epoch starts, and the optimiser steps
    after every rollout batch."""

    def __init__(self, bar: RolloutProgressBar) -> None:
        self.bar = bar
        self.total: Any = None
        self.description = ""
        self.steps: list[int] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.total = self.bar.total_train_batches
        self.description = self.bar.description(trainer.current_epoch)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.steps.append(trainer.global_step)


@pytest.mark.parametrize(("mini_batch_size", "ppo_epochs", "max_steps", "batches"), [
    (2, 1, 6, 3),   # 4 sequences in mini-batches of 2: 2 steps per rollout batch
    (3, 2, 7, 2),   # ⌈4 / 3⌉ = 2 steps per epoch × 2 epochs = 4; 7 steps → ⌈7 / 4⌉ = 2 batches
])
def test_total_is_rollout_batches(random_model_dir, mini_batch_size, ppo_epochs, max_steps,
                                  batches) -> None:
    torch.manual_seed(0)
    module = TrustRegionModule(policy=f"config:{random_model_dir}", task=DigitRichArithmetic(),
                               batching=BatchSettings(group_size=2, prompts_per_step=2,
                                                      mini_batch_size=mini_batch_size,
                                                      ppo_epochs=ppo_epochs),
                               sampling=SamplingSettings(max_new_tokens=3))
    per_rollout = ppo_epochs * -(-4 // mini_batch_size)
    assert module.optimizer_steps_per_rollout == per_rollout
    bar = RolloutProgressBar()
    seen = _Seen(bar)
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[bar, seen])
    trainer.fit(module)
    assert seen.total == batches
    assert len(seen.steps) == batches  # the bar's total is what actually ran
    assert seen.steps[0] == per_rollout  # the property matches the optimiser steps made
    assert seen.description.strip() == "Epoch 0"  # not "Epoch 0/-2" for max_epochs=-1


def test_other_modules_get_lightnings_total() -> None:
    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.layer(batch).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self) -> Any:
            return torch.utils.data.DataLoader(torch.ones(10, 1), batch_size=2)

    bar = RolloutProgressBar()
    seen = _Seen(bar)
    L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
              callbacks=[bar, seen]).fit(Plain())
    assert seen.total == 5
    assert seen.description.strip() == "Epoch 0/0"


def test_bar_shows_the_step_logs_values_and_the_description(random_model_dir) -> None:
    torch.manual_seed(0)
    module = TrustRegionModule(policy=f"config:{random_model_dir}", task=DigitRichArithmetic(),
                               batching=BatchSettings(group_size=2, prompts_per_step=2,
                                                      mini_batch_size=2),
                               sampling=SamplingSettings(max_new_tokens=3))
    screen = io.StringIO()
    bar = RolloutProgressBar(console=Console(file=screen, width=200, force_terminal=False))
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[bar])
    trainer.fit(module)  # 2 rollout batches of 2 optimiser steps
    metrics = bar.get_metrics(trainer, module)
    assert {"reward", "loss"} <= set(metrics)
    assert metrics["reward"] == pytest.approx(module.step_log.progress_bar_metrics["reward"])
    # the bar reads the StepLog itself, so nothing goes through LightningModule.log
    assert "reward" not in trainer.progress_bar_metrics
    text = screen.getvalue()
    assert "Epoch 0" in text and "2/2" in text
    assert "reward: " in text and "loss: " in text


def test_refresh_per_second_must_be_a_positive_integer() -> None:
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=r"refresh_per_second must be an integer ≥ 1"):
            RolloutProgressBar(refresh_per_second=bad)  # type: ignore[arg-type]
