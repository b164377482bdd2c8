"""Print how the mean reward moved over a run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from trustregion.interface import StepOutput
from trustregion.validation import integer_at_least

__all__ = ["RewardComparison", "RewardSummary"]


@dataclass(frozen=True)
class RewardComparison:
    """The mean reward of the first and the last ``window`` rollout batches of a run of
    ``batches`` rollout batches. ``window`` is smaller than the one asked for
    (``requested``) when the run had fewer than twice that many batches: then it is half the
    run, rounded down, so the two windows never share a batch (0 for a run of one batch, which
    has nothing to compare; ``first`` and ``last`` are then that batch's reward)."""

    first: float
    last: float
    window: int
    batches: int
    requested: int

    @property
    def shortened(self) -> bool:
        """Whether the run was too short for two windows of the requested size."""
        return self.window < self.requested

    def message(self) -> str:
        """The line, or two, that :class:`RewardSummary` prints."""
        short = f"{_batches(self.batches)}: too few for two windows of {self.requested}"
        if self.window == 0:
            return f"mean reward: {self.first:.3f} over the only rollout batch\n({short})"
        compared = (f"mean reward: {self.first:.3f} over the first {_batches(self.window)} "
                    f"→ {self.last:.3f} over the last {self.window}")
        if self.shortened:
            return f"{compared}\n({short}, so the halves are compared)"
        return f"{compared} ({self.batches} batches)"


def _batches(count: int) -> str:
    return f"{count} rollout batch" if count == 1 else f"{count} rollout batches"


class RewardSummary(L.Callback):
    """At the end of training, report the mean reward of the first and the last ``window``
    rollout batches (the global ``reward/mean`` of each step's
    :class:`~trustregion.interface.StepOutput`). A run shorter than ``2 × window`` batches is
    said to be so, and its halves are compared instead (:class:`RewardComparison`), so that a
    window is never compared with itself.

    Args:
        window: rollout batches averaged at each end.
    """

    def __init__(self, window: int = 20) -> None:
        self.window = integer_at_least("window", window, 1, note="rollout batches")
        self.rewards: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = StepOutput.of(outputs)
        if step is not None and "reward/mean" in step.metrics:
            self.rewards.append(float(step.metrics["reward/mean"]))

    def summary(self) -> RewardComparison | None:
        """The first and last windows' mean rewards, or None before any rollout."""
        batches = len(self.rewards)
        if batches == 0:
            return None
        window = min(self.window, batches // 2)
        if window == 0:
            return RewardComparison(self.rewards[0], self.rewards[0], 0, 1, self.window)
        first = sum(self.rewards[:window]) / window
        last = sum(self.rewards[-window:]) / window
        return RewardComparison(first, last, window, batches, self.window)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        result = self.summary()
        if result is not None:
            rank_zero_info(result.message())

    def state_dict(self) -> dict[str, Any]:
        return {"rewards": list(self.rewards)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rewards = list(state_dict["rewards"])
