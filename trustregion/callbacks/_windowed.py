"""The shared machinery of the per-token monitors: accumulate the update records of a window of
rollout batches, then add the window's values to the module's logger row
(:class:`~trustregion.step_log.StepLog`; the values are already reduced across ranks by their
own torchmetrics statistics)."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import Tensor

from trustregion.interface import StepOutput, TrainingModule, training_module
from trustregion.step_log import is_final_batch, log_every_n_steps

__all__ = ["WindowedMonitor"]


def _window_size(every_n_steps: int | None) -> int | None:
    if every_n_steps is not None and (isinstance(every_n_steps, bool)
                                      or not isinstance(every_n_steps, int)
                                      or every_n_steps < 1):
        raise ValueError(f"every_n_steps must be None (the trainer's log_every_n_steps) or an "
                         f"integer ≥ 1 (rollout batches per logged value); got {every_n_steps!r}")
    return every_n_steps


class WindowedMonitor(L.Callback):
    """Feeds every update record of a training step to :meth:`update`; at the last rollout
    batch of each window adds :meth:`compute` to the module's logger row and calls
    :meth:`reset`.

    Windows are aligned on the rollout batch's index (``StepLog.step``), so they stay aligned
    across a resume, and with ``every_n_steps=None`` they are exactly the trainer's
    ``log_every_n_steps`` rows: a logged value covers every token since the previous row, none
    is skipped. The last batch of an epoch or of training closes a window early, so no tokens
    are left out at the end. Subclasses implement :meth:`update`, :meth:`compute` and
    :meth:`reset`.

    Args:
        every_n_steps: rollout batches per logged value (None: the trainer's
            ``log_every_n_steps``).
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        self.every_n_steps = _window_size(every_n_steps)

    def update(self, batch: Any, output: Any) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def window(self, trainer: L.Trainer) -> int:
        """Rollout batches per logged value under ``trainer``."""
        return self.every_n_steps or max(log_every_n_steps(trainer), 1)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        training_module(pl_module, type(self).__name__)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        module = training_module(pl_module, type(self).__name__)
        step = StepOutput.of(outputs)
        for record in step.updates if step is not None else ():
            self.update(record.batch, record.output)
        self._close_window(trainer, module, batch_idx)

    def _close_window(self, trainer: L.Trainer, module: TrainingModule, batch_idx: int) -> None:
        if (module.step_log.step + 1) % self.window(trainer) \
                and not is_final_batch(trainer, batch_idx):
            return
        values = self.compute()
        self.reset()
        module.step_log.add(values)
