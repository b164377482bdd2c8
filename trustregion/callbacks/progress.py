"""A rich progress bar that counts RL iterations (rollout batches)."""

from __future__ import annotations

import math

from lightning.pytorch.callbacks import RichProgressBar

__all__ = ["RolloutProgressBar"]


class RolloutProgressBar(RichProgressBar):
    """Lightning's ``RichProgressBar`` with the total in rollout batches.

    ``Trainer(max_steps=...)`` counts optimiser steps, and a rollout batch makes several
    (``TrustRegionModule.optimizer_steps_per_rollout``), while the prompt stream has no end; so
    Lightning's bar would end an 800-iteration run of 1600 optimiser steps at "800/1600" under
    "Epoch 0/-2". This bar's total is the rollout batches left,
    ⌈(max_steps − global_step) / optimiser steps per rollout batch⌉, and the epoch is shown
    without a maximum when there is none (``max_epochs=-1``). For any other module it behaves as
    ``RichProgressBar``. Takes ``RichProgressBar``'s arguments.
    """

    @property
    def total_train_batches(self) -> int | float:
        total = super().total_train_batches
        trainer = self.trainer
        per_rollout = getattr(trainer.lightning_module, "optimizer_steps_per_rollout", None)
        if not per_rollout or trainer.max_steps is None or trainer.max_steps < 0:
            return total
        left = max(trainer.max_steps - trainer.global_step, 0)
        return min(trainer.num_training_batches, math.ceil(left / per_rollout))

    def _get_train_description(self, current_epoch: int) -> str:
        description = super()._get_train_description(current_epoch)
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs < 0:
            description = description.replace(f"/{max_epochs - 1}", "", 1)
        return description
