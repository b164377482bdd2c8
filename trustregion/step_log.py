"""One row of scalar values per rollout batch, owned by the module, written through public APIs.

``LightningModule.log`` costs about 1 ms per key on a 2-core CPU (every call updates a
torchmetrics-backed result entry), and a monitored step has about a hundred keys. The values here
are plain per-step scalars that need none of that machinery: each is already global (reduced
across ranks by whoever adds it) and is logged once. So the module keeps one :class:`StepLog`;
during a rollout batch the module and every callback :meth:`~StepLog.add` to its row, and when
the batch ends the module :meth:`~StepLog.finish`-es it:

* every added value is in ``trainer.callback_metrics`` as soon as it is added (where
  ``ModelCheckpoint`` and ``EarlyStopping`` can monitor it);
* the row is copied to the host in one transfer and written with the public
  ``Logger.log_metrics(metrics, step)`` of each of ``trainer.loggers``, at the rollout batch's
  index (which the module keeps in its checkpoint, so a resumed run continues the steps);
* progress-bar values (:meth:`~StepLog.show`) are read by
  :class:`~trustregion.callbacks.RolloutProgressBar`, or handed to ``LightningModule.log`` for
  any other progress bar.

A row is written when some value was added with ``write=True``: the module does so every
``log_every_n_steps`` rollout batches and on the last one (:meth:`StepLog.logging_batch`), a
windowed monitor at the end of each of its windows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import lightning as L
import torch
from torch import Tensor

__all__ = ["StepLog", "is_final_batch", "log_every_n_steps"]


def log_every_n_steps(trainer: L.Trainer) -> int:
    """The trainer's ``log_every_n_steps`` (0: nothing is logged)."""
    # Trainer(log_every_n_steps=...) is stored as a public attribute the class does not declare.
    return int(trainer.log_every_n_steps)  # type: ignore[attr-defined]


def is_final_batch(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether training stops, or the epoch ends, after batch ``batch_idx``; valid once the
    batch's optimiser steps are counted (at the end of ``training_step`` and after)."""
    return (trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step
            or batch_idx + 1 == trainer.num_training_batches)


def _scalar(value: Tensor | float) -> Tensor | float:
    if isinstance(value, Tensor):
        return value.detach().float().reshape(())
    return float(value)


def _to_floats(values: Mapping[str, Tensor | float]) -> dict[str, float]:
    """Python floats, with one host transfer for all the tensors of one device."""
    tensors = {k: v for k, v in values.items() if isinstance(v, Tensor)}
    floats = {k: float(v) for k, v in values.items() if not isinstance(v, Tensor)}
    if tensors:
        device = next(iter(tensors.values())).device
        stacked = torch.stack([v.to(device) for v in tensors.values()]).cpu().tolist()
        floats.update(zip(tensors, stacked, strict=True))
    return {key: floats[key] for key in values}


class StepLog:
    """The values of the current rollout batch: a logger row and progress-bar values.

    Lifecycle per rollout batch: the module calls :meth:`start` at the beginning of
    ``training_step``, the module and the callbacks :meth:`add` and :meth:`show` values, and the
    module calls :meth:`finish` in its ``on_train_batch_end``, which Lightning runs after every
    callback's ``on_train_batch_end`` (the documented hook order). A row still open when the
    next one starts, or when training ends, is written then.

    Attributes:
        step: the current rollout batch's index: the logger step its row is written at.
    """

    def __init__(self) -> None:
        self.step = 0
        self._trainer: L.Trainer | None = None
        self._row: dict[str, Tensor | float] = {}
        self._progress: dict[str, Tensor | float] = {}
        self._shown: dict[str, float] = {}
        self._listeners: list[Callable[[dict[str, float]], None]] = []
        self._open = False

    # ------------------------------------------------------------------------- the row
    def start(self, trainer: L.Trainer, step: int) -> None:
        """Open the row of the rollout batch with index ``step``."""
        if self._open:
            self.finish()
        self._trainer = trainer
        self.step = int(step)
        self._row = {}
        self._progress = {}
        self._open = True

    def logging_batch(self, batch_idx: int) -> bool:
        """Whether this rollout batch is one whose values the module writes: every
        ``log_every_n_steps``-th, counted by :attr:`step`, and the last one."""
        trainer = self._require_trainer()
        every = log_every_n_steps(trainer)
        return every > 0 and ((self.step + 1) % every == 0
                              or is_final_batch(trainer, batch_idx))

    def add(self, values: Mapping[str, Tensor | float], *, write: bool = True) -> None:
        """Add global scalar values (already reduced across ranks). They reach
        ``trainer.callback_metrics`` at once; with ``write`` they also go to the loggers in
        this rollout batch's row (a later value of the same key replaces an earlier one)."""
        if not values:
            return
        trainer = self._require_trainer()
        scalars = {key: _scalar(value) for key, value in values.items()}
        trainer.callback_metrics.update(
            {k: v if isinstance(v, Tensor) else torch.tensor(v) for k, v in scalars.items()})
        if write and log_every_n_steps(trainer) > 0:
            self._row.update(scalars)

    def show(self, values: Mapping[str, Tensor | float]) -> None:
        """Show values in the progress bar for this rollout batch (and in
        ``callback_metrics``); they are not written to the loggers."""
        self.add(values, write=False)
        self._progress.update({key: _scalar(value) for key, value in values.items()})

    @property
    def row(self) -> dict[str, Tensor | float]:
        """The values that this rollout batch's row will write so far."""
        return dict(self._row)

    @property
    def progress_bar_metrics(self) -> dict[str, float]:
        """The progress-bar values of the last finished rollout batch."""
        return dict(self._shown)

    def on_finish(self, listener: Callable[[dict[str, float]], None]) -> None:
        """Call ``listener(progress_bar_metrics)`` whenever a rollout batch finishes (a
        progress bar refreshes its values there, after every callback has added its own)."""
        if listener not in self._listeners:
            self._listeners.append(listener)

    def finish(self, pl_module: L.LightningModule | None = None) -> None:
        """Write the row to every logger and publish the progress-bar values. With
        ``pl_module`` and a progress bar other than ``RolloutProgressBar``, the progress-bar
        values also go through ``pl_module.log(..., prog_bar=True, logger=False)``."""
        if not self._open:
            return
        self._open = False
        trainer = self._require_trainer()
        if self._progress:
            self._shown = _to_floats(self._progress)
            if pl_module is not None and not getattr(trainer.progress_bar_callback,
                                                     "reads_step_log", False):
                for name, value in self._shown.items():
                    pl_module.log(name, value, prog_bar=True, logger=False, on_step=True,
                                  on_epoch=False, batch_size=1)
        for listener in self._listeners:
            listener(dict(self._shown))
        if not self._row:
            return
        row = _to_floats(self._row)
        row["epoch"] = float(trainer.current_epoch)
        for logger in trainer.loggers:
            logger.log_metrics(row, step=self.step)
            logger.save()
        self._row = {}

    def write(self, trainer: L.Trainer, values: Mapping[str, Tensor | float], step: int
              ) -> None:
        """Write global scalar ``values`` at once, as a row of their own at logger step
        ``step`` (an evaluation's values, outside any rollout batch's row), and put them in
        ``trainer.callback_metrics``. Like Lightning's own validation logging, this does not
        depend on ``log_every_n_steps``."""
        if not values:
            return
        scalars = {key: _scalar(value) for key, value in values.items()}
        trainer.callback_metrics.update(
            {k: v if isinstance(v, Tensor) else torch.tensor(v) for k, v in scalars.items()})
        row = _to_floats(scalars)
        row["epoch"] = float(trainer.current_epoch)
        for logger in trainer.loggers:
            logger.log_metrics(row, step=int(step))
            logger.save()

    def _require_trainer(self) -> L.Trainer:
        if self._trainer is None:
            raise RuntimeError("StepLog.start(trainer, step) must open a row before values are "
                               "added; TrustRegionModule does so at the start of training_step")
        return self._trainer
