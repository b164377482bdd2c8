"""A rich progress bar that counts RL iterations (rollout batches)."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["RolloutProgressBar"]


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


class RolloutProgressBar(ProgressBar):
    """A rich progress bar of the training loop whose total is in rollout batches.

    ``Trainer(max_steps=...)`` counts optimiser steps, and a rollout batch makes several
    (``TrustRegionModule.optimizer_steps_per_rollout``), while the prompt stream has no end; so a
    bar counting Lightning's batches would end an 800-iteration run of 1600 optimiser steps at
    "800/1600" under "Epoch 0/-2". This bar's total is the rollout batches left,
    ⌈(max_steps − global_step) / optimiser steps per rollout batch⌉, and the epoch is shown
    without a maximum when there is none (``max_epochs=-1``). Beside it: the progress-bar values
    of the module's :class:`~trustregion.step_log.StepLog` (reward, loss, and the drift monitor's
    kl and outside) and whatever ``LightningModule.log(prog_bar=True)`` put there. For any other
    module it counts Lightning's batches. Only training is shown.

    Args:
        refresh_per_second: screen refreshes per second.
        leave: keep the finished bar on screen.
        console: the rich console to draw on (default: a new one on stdout).
    """

    reads_step_log = True
    """Tells the module's StepLog that this bar reads its progress-bar values directly."""

    def __init__(self, refresh_per_second: int = 4, leave: bool = True,
                 console: Console | None = None) -> None:
        super().__init__()
        if isinstance(refresh_per_second, bool) or not isinstance(refresh_per_second, int) \
                or refresh_per_second < 1:
            raise ValueError(f"refresh_per_second must be an integer ≥ 1; "
                             f"got {refresh_per_second!r}")
        self.refresh_per_second = refresh_per_second
        self.leave = leave
        self._console = console
        self._enabled = True
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    # ------------------------------------------------------------------ what is shown
    @property
    def total_train_batches(self) -> int | float:
        total = super().total_train_batches
        trainer = self.trainer
        per_rollout = getattr(trainer.lightning_module, "optimizer_steps_per_rollout", None)
        if not per_rollout or trainer.max_steps is None or trainer.max_steps < 0:
            return total
        left = max(trainer.max_steps - trainer.global_step, 0)
        return min(trainer.num_training_batches, math.ceil(left / per_rollout))

    def description(self, epoch: int) -> str:
        """``Epoch E/M``, or ``Epoch E`` when training has no epoch limit."""
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs < 0:
            return f"Epoch {epoch}"
        return f"Epoch {epoch}/{max_epochs - 1}"

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule
                    ) -> dict[str, int | str | float | dict[str, float]]:
        metrics = super().get_metrics(trainer, pl_module)
        step_log = getattr(pl_module, "step_log", None)
        if step_log is not None:
            metrics.update(step_log.progress_bar_metrics)
        return metrics

    # ----------------------------------------------------------------- enable/disable
    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    # -------------------------------------------------------------------------- hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        step_log = getattr(pl_module, "step_log", None)
        if step_log is not None:
            step_log.on_finish(self._on_step_finished)

    def _on_step_finished(self, values: dict[str, float]) -> None:
        self._refresh(self.trainer, self.trainer.lightning_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.is_enabled:
            return
        total = self.total_train_batches
        if self._progress is None:
            self._progress = Progress(
                TextColumn("[progress.description]{task.description}"), BarColumn(),
                MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[metrics]}"),
                console=self._console, refresh_per_second=self.refresh_per_second,
                transient=not self.leave)
            self._progress.start()
        self._task = self._progress.add_task(
            self.description(trainer.current_epoch),
            total=None if total == math.inf else total, metrics="")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=1)
            self._refresh(trainer, pl_module)

    def _refresh(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._progress is None or self._task is None:
            return
        metrics = self.get_metrics(trainer, pl_module)
        text = " ".join(f"{k}: {_format(v)}" for k, v in metrics.items())
        self._progress.update(self._task, metrics=text)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._task = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._progress = None
        self._task = None

    def print(self, *args: Any, sep: str = " ", **kwargs: Any) -> None:
        console = self._progress.console if self._progress is not None else Console()
        console.print(*args, sep=sep, **kwargs)
