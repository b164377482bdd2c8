"""The shared machinery of the per-token monitors: accumulate the update records of a window of
rollout batches, then write the window's values to the loggers in one call
(:func:`trustregion.step_logging.log_step_values`; the values are already reduced across ranks
by their own torchmetrics statistics)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
from torch import Tensor

from trustregion.step_logging import (
    flush_step_values,
    is_final_batch,
    log_every_n_steps,
    log_step_values,
    logging_step,
)

__all__ = ["WindowedMonitor", "update_records"]


def update_records(outputs: Any) -> list[Any]:
    """The ``UpdateRecord`` list of a ``training_step`` output (empty if there is none)."""
    updates = outputs.get("updates") if isinstance(outputs, Mapping) else None
    return list(updates) if updates else []


def _window_size(every_n_steps: int | None) -> int | None:
    if every_n_steps is not None and (isinstance(every_n_steps, bool)
                                      or not isinstance(every_n_steps, int)
                                      or every_n_steps < 1):
        raise ValueError(f"every_n_steps must be None (the trainer's log_every_n_steps) or an "
                         f"integer ≥ 1 (rollout batches per logged value); got {every_n_steps!r}")
    return every_n_steps


class WindowedMonitor(L.Callback):
    """Feeds every update record of a training step to :meth:`update`; at the last rollout
    batch of each window writes :meth:`compute` to the loggers and calls :meth:`reset`.

    Windows are aligned on :func:`logging_step`, so they stay aligned across a resume, and
    with ``every_n_steps=None`` they are exactly the trainer's ``log_every_n_steps`` rows:
    a logged value covers every token since the previous row, none is skipped. The last
    batch of an epoch or of training closes a window early, so no tokens are left out at the
    end. Subclasses implement :meth:`update`, :meth:`compute` and :meth:`reset`.

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

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        for record in update_records(outputs):
            self.update(record.batch, record.output)
        if (logging_step(trainer) + 1) % self.window(trainer) \
                and not is_final_batch(trainer, batch_idx):
            return
        values = self.compute()
        self.reset()
        if values:
            log_step_values(trainer, values, to_loggers=log_every_n_steps(trainer) > 0)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        flush_step_values(trainer)  # the last row, when the module does not write it itself
