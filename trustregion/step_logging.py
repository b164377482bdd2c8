"""Write a training step's many scalar values to the loggers in one call.

``LightningModule.log`` costs about 1 ms per key on a 2-core CPU (every call updates a
torchmetrics-backed result entry and copies its metadata), so the module's twenty-odd step
metrics and the monitors' fifty-odd drift keys would spend a third of a quickstart step in
bookkeeping. These values are plain per-step scalars that need none of that machinery (no
epoch aggregation; anything that must be reduced across ranks is reduced before it gets here),
so :func:`log_step_values` puts them in ``trainer.callback_metrics`` at once (where
``ModelCheckpoint`` and ``EarlyStopping`` can monitor them) and gathers them into one row per
rollout batch, which :func:`flush_step_values` copies to the host at once and hands to the
trainer's logger connector — the call Lightning itself makes for step metrics, at the same step,
so every logger (CSV, TensorBoard, ...) gets one row per rollout batch holding the module's and
every monitor's values, and, with a logger, ``trainer.logged_metrics`` shows them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from weakref import WeakKeyDictionary

import lightning as L
import torch
from torch import Tensor

__all__ = [
    "flush_step_values",
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


@dataclass
class _Row:
    """Values waiting to be written as one logger row."""

    step: int
    values: dict[str, Tensor] = field(default_factory=dict)


_PENDING: WeakKeyDictionary[L.Trainer, _Row] = WeakKeyDictionary()


def _scalar(value: Tensor | float, device: torch.device | None) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().float().reshape(())
    return torch.tensor(float(value), device=device)


def log_step_values(trainer: L.Trainer, values: Mapping[str, Tensor | float],
                    to_loggers: bool = True) -> None:
    """Put scalars in ``trainer.callback_metrics`` at once and, if ``to_loggers``, add them to
    the row written at :func:`logging_step` by :func:`flush_step_values`, so the module's and
    every monitor's values for one rollout batch share one row (one host copy per row)."""
    if not values:
        return
    device = next((v.device for v in values.values() if isinstance(v, Tensor)), None)
    scalars = {key: _scalar(value, device) for key, value in values.items()}
    trainer.callback_metrics.update(scalars)
    if not to_loggers:
        return
    step = logging_step(trainer)
    row = _PENDING.get(trainer)
    if row is not None and row.step != step:
        flush_step_values(trainer)
        row = None
    if row is None:
        row = _PENDING[trainer] = _Row(step)
    row.values.update(scalars)


def flush_step_values(trainer: L.Trainer) -> None:
    """Write the pending row of ``trainer`` to every logger. ``TrustRegionModule`` calls it in
    its ``on_train_batch_end``, which Lightning runs after every callback's; a row left pending
    is also written before the next step's values and at the end of training."""
    row = _PENDING.pop(trainer, None)
    if row is None or not row.values:
        return
    keys = list(row.values)
    # Callbacks may log Python numbers (host scalars) beside the module's device tensors.
    device = row.values[keys[0]].device
    floats = torch.stack([row.values[key].to(device) for key in keys]).cpu().tolist()
    scalars = dict(zip(keys, floats, strict=True))
    if row.step == logging_step(trainer):
        # Without a step the connector files the row at logging_step() and adds the epoch,
        # exactly as for Lightning's own rows.
        trainer._logger_connector.log_metrics(scalars)
    else:
        trainer._logger_connector.log_metrics(scalars, step=row.step)
