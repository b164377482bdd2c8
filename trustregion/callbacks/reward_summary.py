"""Print how the mean reward moved over a run."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from trustregion.interface import StepOutput

__all__ = ["RewardSummary"]


class RewardSummary(L.Callback):
    """At the end of training, report the mean reward of the first and the last ``window``
    rollout batches (the global ``reward/mean`` of each step's
    :class:`~trustregion.interface.StepOutput`).

    Args:
        window: rollout batches averaged at each end.
    """

    def __init__(self, window: int = 20) -> None:
        if window < 1:
            raise ValueError(f"window must be ≥ 1 rollout batch; got {window}")
        self.window = window
        self.rewards: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = StepOutput.of(outputs)
        if step is not None and "reward/mean" in step.metrics:
            self.rewards.append(float(step.metrics["reward/mean"]))

    def summary(self) -> tuple[float, float] | None:
        """(first-window mean, last-window mean), or None before any rollout."""
        if not self.rewards:
            return None
        window = min(self.window, len(self.rewards))
        first = sum(self.rewards[:window]) / window
        last = sum(self.rewards[-window:]) / window
        return first, last

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        result = self.summary()
        if result is not None:
            window = min(self.window, len(self.rewards))
            rank_zero_info(f"mean reward: {result[0]:.3f} over the first {window} rollout "
                           f"batches → {result[1]:.3f} over the last {window} "
                           f"({len(self.rewards)} batches)")

    def state_dict(self) -> dict[str, Any]:
        return {"rewards": list(self.rewards)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rewards = list(state_dict["rewards"])
