"""Write a training step's many scalar values to the loggers in one call.

``LightningModule.log`` costs about 1 ms per key on a 2-core CPU (every call updates a
torchmetrics-backed result entry and copies its metadata), so the module's twenty-odd step
metrics and the monitors' fifty-odd drift keys would spend a third of a quickstart step in
bookkeeping. These values are plain per-step scalars that need none of that machinery (no
epoch aggregation; anything that must be reduced across ranks is reduced before it gets here),
so :func:`log_step_values` copies them to the host at once and hands them to the trainer's
logger connector — the call Lightning itself makes for step metrics, at the same step, so every
logger (CSV, TensorBoard, ...) files them in the same rows and, with a logger,
``trainer.logged_metrics`` shows them — and puts them in ``trainer.callback_metrics``, where
``ModelCheckpoint`` and ``EarlyStopping`` can monitor them.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import torch
from torch import Tensor

__all__ = [
    "is_final_batch",
    "log_every_n_steps",
    "log_step_values",
    "logging_step",
    "writes_logs",
]


def logging_step(trainer: L.Trainer) -> int:
    """The step under which Lightning files the current training batch's logged values: rollout
    batches completed before it (restored on resume). Differs from ``trainer.global_step``,
    which counts optimiser steps — several per rollout batch here."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def log_every_n_steps(trainer: L.Trainer) -> int:
    """The trainer's ``log_every_n_steps`` (0: nothing is logged)."""
    # Lightning's logger connector sets the attribute at init; Trainer does not declare it.
    return int(trainer.log_every_n_steps)  # type: ignore[attr-defined]


def is_final_batch(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether training stops, or the epoch ends, after batch ``batch_idx``; valid once the
    batch's optimiser steps are counted (at the end of ``training_step`` and after)."""
    return (trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step
            or batch_idx + 1 == trainer.num_training_batches)


def writes_logs(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether the current batch's step values go to the loggers: every
    ``log_every_n_steps``-th rollout batch, as Lightning decides for ``self.log``, and the last
    one."""
    every = log_every_n_steps(trainer)
    return every > 0 and ((logging_step(trainer) + 1) % every == 0
                          or is_final_batch(trainer, batch_idx))


def log_step_values(trainer: L.Trainer, values: Mapping[str, Tensor],
                    to_loggers: bool = True) -> None:
    """Put scalar tensors in ``trainer.callback_metrics`` and, if ``to_loggers``, write them to
    every logger of ``trainer`` at :func:`logging_step` (with an ``epoch`` column, as Lightning
    adds to its own rows), with one device-to-host copy."""
    if not values:
        return
    keys = list(values)
    stacked = torch.stack([values[key].detach().float().reshape(()) for key in keys])
    trainer.callback_metrics.update(zip(keys, stacked.unbind(), strict=True))
    if to_loggers:
        scalars = dict(zip(keys, stacked.cpu().tolist(), strict=True))
        # Without a step the connector files the row at logging_step() and adds the epoch.
        trainer._logger_connector.log_metrics(scalars)
