"""Progress of training in rollout batches: a rich bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Iterable
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from trustregion.step_log import is_final_batch
from trustregion.validation import boolean, integer_at_least

__all__ = ["PLAIN_KEYS", "RolloutProgressBar", "drop_disabled_progress_bars", "format_value",
           "pack_lines", "parameter_summary"]

PLAIN_KEYS = ("reward", "kl", "outside")
"""The progress-bar values a plain progress line shows, in this order, when present."""

_BAR_WIDTH = 24  # description, bar, "1600/1600" and two clocks stay within 80 columns


def format_value(name: str, value: Any) -> str:
    """A progress-bar value as shown: 3 significant digits; ``outside`` (a fraction of tokens)
    as a percentage.

    >>> format_value("reward", 0.41234), format_value("outside", 0.003)
    ('0.412', '0.3%')
    """
    if isinstance(value, float | int) and not isinstance(value, bool):
        if name == "outside":
            return f"{100 * value:.3g}%"
        return f"{value:.3g}" if isinstance(value, float) else str(value)
    return str(value)


def pack_lines(items: Iterable[str], width: int) -> list[str]:
    """``items`` joined by two spaces into lines at most ``width`` characters wide, never
    splitting an item unless it alone is wider than ``width``.

    >>> pack_lines(["reward 0.41", "kl 0.001", "outside 0.3%"], 24)
    ['reward 0.41  kl 0.001', 'outside 0.3%']
    """
    width = integer_at_least("width", width, 1)
    lines: list[str] = []
    for item in items:
        while len(item) > width:
            lines.append(item[:width])
            item = item[width:]
        if lines and len(lines[-1]) + 2 + len(item) <= width:
            lines[-1] += "  " + item
        elif item:
            lines.append(item)
    return lines


def parameter_summary(pl_module: L.LightningModule) -> str:
    """One line of parameter counts per child model, trainable or frozen, e.g.
    ``parameters: policy 498 K trainable · behavior 498 K frozen``. A parameter shared by two
    children is counted with the first."""
    seen: set[int] = set()
    parts = []
    for name, child in pl_module.named_children():
        trainable = frozen = 0
        for parameter in child.parameters():
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            if parameter.requires_grad:
                trainable += parameter.numel()
            else:
                frozen += parameter.numel()
        counts = [f"{get_human_readable_count(n).strip()} {kind}"
                  for n, kind in ((trainable, "trainable"), (frozen, "frozen")) if n]
        if counts:
            parts.append(f"{name} {' + '.join(counts)}")
    return "parameters: " + (" · ".join(parts) if parts else "none")


class _ProgressWithValues(Progress):
    """A rich ``Progress`` that draws each task's ``values`` field on the lines below it."""

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        for task in self.tasks:
            values = task.fields.get("values")
            if values:
                yield Text(values, no_wrap=True, overflow="crop")


class RolloutProgressBar(ProgressBar):
    """The progress of training counted in rollout batches: a rich bar on a terminal, one plain
    line every ``log_every`` rollout batches when the output is not a terminal (a CI log, a
    redirect, ``nohup``).

    ``Trainer(max_steps=...)`` counts optimiser steps, and a rollout batch makes several
    (``TrustRegionModule.optimizer_steps_per_rollout``), while the prompt stream has no end. So
    for such a module the count is the run's rollout batches: on a run resumed at optimiser step
    g of ``max_steps`` M with p steps per rollout batch it starts at ⌊g / p⌋ and ends at
    ⌊g / p⌋ + ⌈(M − g) / p⌉ (``801/1600`` after a resume at batch 800 of 1600). The epoch is
    shown without a maximum when there is none (``max_epochs=-1``). For any other module the
    bar counts Lightning's batches of the epoch.

    On a terminal the bar fits 80 columns: the bar with its count and clocks on one line, below
    it the :class:`~trustregion.step_log.StepLog`'s progress-bar values (reward, loss, and the
    drift monitor's kl and outside) and whatever ``LightningModule.log(prog_bar=True)`` put
    there, wrapped to the console's width. It is drawn for the last time when the last batch
    ends, before Lightning reports why training stopped. Elsewhere a line looks like
    ``batch 120/800  reward 0.41  kl 0.0012  outside 0.3%  1.8 s/batch`` (kl and outside when
    the drift monitor shows them); one is printed every ``log_every`` rollout batches and after
    the last one.

    When the trainer prints no model summary (``trustregion fit`` turns Lightning's off), the bar
    prints one line of parameter counts per model (:func:`parameter_summary`) when training
    starts. Only training is shown.

    Args:
        refresh_per_second: screen refreshes per second of the terminal bar.
        leave: keep the finished bar on screen.
        console: the rich console to draw on (default: one on stdout); whether it is a terminal
            (or a notebook) picks the bar or the plain lines.
        log_every: rollout batches between two plain lines.
    """

    reads_step_log = True
    """Tells the module's StepLog that this bar reads its progress-bar values directly."""

    def __init__(self, refresh_per_second: int = 4, leave: bool = True,
                 console: Console | None = None, log_every: int = 10) -> None:
        super().__init__()
        self.refresh_per_second = integer_at_least("refresh_per_second", refresh_per_second, 1)
        self.leave = boolean("leave", leave)
        self.log_every = integer_at_least("log_every", log_every, 1,
                                          note="rollout batches between two plain lines")
        self._console = console
        self._enabled = True
        self._progress: _ProgressWithValues | None = None
        self._task: TaskID | None = None
        self._listening = False
        self._counting = False
        self._counting_run = False
        self._pending = False
        self._final = False
        self._done = 0
        self._total: int | None = None
        self._mark = (0, 0.0)  # (batches done, time) at the last plain line

    # ------------------------------------------------------------------ what is shown
    @property
    def console(self) -> Console:
        """The rich console drawn on."""
        if self._console is None:
            self._console = Console()
        return self._console

    @property
    def plain(self) -> bool:
        """Whether progress is printed as plain lines: the console is neither a terminal nor a
        notebook that can draw a live bar (rich draws one there only with ``ipywidgets``)."""
        if self.console.is_terminal:
            return False
        return not (self.console.is_jupyter and importlib.util.find_spec("ipywidgets"))

    @property
    def total_train_batches(self) -> int | float:
        """Batches this ``fit`` will run in the current epoch: for a module with
        ``optimizer_steps_per_rollout``, the rollout batches left, ⌈(max_steps − global_step) /
        optimiser steps per rollout batch⌉ (at most the epoch's batches)."""
        total = super().total_train_batches
        rollouts = self._rollout_batches_left()
        return total if rollouts is None else min(self.trainer.num_training_batches, rollouts[0])

    def counts(self) -> tuple[int, int | None]:
        """``(done, total)``: the batches the bar counts as done now and at the end (None: no
        end). Rollout batches of the whole run when ``max_steps`` bounds it, otherwise
        Lightning's batches of the current epoch."""
        return self._done, self._total

    def description(self, epoch: int) -> str:
        """``Epoch E/M``, or ``Epoch E`` when training has no epoch limit."""
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs < 0:
            return f"Epoch {epoch}"
        return f"Epoch {epoch}/{max_epochs - 1}"

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule
                    ) -> dict[str, int | str | float | dict[str, float]]:
        """Lightning's progress-bar values without the logger's ``v_num``, and the StepLog's."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        step_log = getattr(pl_module, "step_log", None)
        if step_log is not None:
            metrics.update(step_log.progress_bar_metrics)
        return metrics

    def plain_line(self, metrics: dict[str, Any], seconds_per_batch: float | None) -> str:
        """The plain progress line for the current count and these values."""
        done, total = self.counts()
        items = [f"batch {done}" if total is None else f"batch {done}/{total}"]
        items += [f"{key} {format_value(key, metrics[key])}" for key in PLAIN_KEYS
                  if key in metrics]
        if seconds_per_batch is not None:
            items.append(f"{seconds_per_batch:.3g} s/batch")
        return "  ".join(items)

    def _rollout_batches_left(self) -> tuple[int, int] | None:
        """``(⌈(max_steps − global_step) / p⌉, p)`` with p the module's optimiser steps per
        rollout batch; None when it makes no rollout batches or ``max_steps`` is unset."""
        trainer = self.trainer
        per_rollout = getattr(trainer.lightning_module, "optimizer_steps_per_rollout", None)
        if not per_rollout or trainer.max_steps is None or trainer.max_steps < 0:
            return None
        left = math.ceil(max(trainer.max_steps - trainer.global_step, 0) / per_rollout)
        return left, int(per_rollout)

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
        self._listening = step_log is not None
        if step_log is not None:
            step_log.on_finish(self._on_step_finished)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        callbacks = trainer.callbacks  # type: ignore[attr-defined]  # public, undeclared
        if self.is_enabled and not any(isinstance(c, ModelSummary) for c in callbacks):
            self.print(parameter_summary(pl_module), markup=False, highlight=False)
        self._begin(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._counting:
            self._begin(trainer)

    def _begin(self, trainer: L.Trainer) -> None:
        """Start counting (and drawing) an epoch. Lightning calls ``on_train_epoch_start`` for
        a fresh epoch but not for one resumed in its middle, so ``on_train_start`` begins too."""
        self._counting = True
        rollouts = self._rollout_batches_left()
        if rollouts is not None and rollouts[0] <= trainer.num_training_batches:
            left, per_rollout = rollouts  # the count is the run's rollout batches
            self._done = trainer.global_step // per_rollout
            self._total = self._done + left
        else:
            total = super().total_train_batches
            self._done = 0  # set from Lightning's batch index, which a resume continues
            self._total = None if total == math.inf else int(total)
        self._counting_run = rollouts is not None and rollouts[0] <= trainer.num_training_batches
        self._final = self._pending = False
        self._mark = (self._done, time.monotonic())
        if not self.is_enabled or self.plain:
            return
        if self._progress is None:
            self._progress = _ProgressWithValues(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(bar_width=_BAR_WIDTH), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), console=self.console,
                refresh_per_second=self.refresh_per_second, transient=not self.leave)
            self._progress.start()
        self._task = self._progress.add_task(
            self.description(trainer.current_epoch), total=self._total,
            completed=self._done, values="")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self._done = self._done + 1 if self._counting_run else batch_idx + 1
        self._final = is_final_batch(trainer, batch_idx)
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=self._done)
        self._pending = True
        if not self._listening:  # no StepLog will call back with this batch's values
            self._publish(trainer, pl_module)

    def _on_step_finished(self, values: dict[str, float]) -> None:
        if self._pending:
            self._publish(self.trainer, self.trainer.lightning_module)

    def _publish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Show the finished batch's values: refresh the bar, or print the plain line when one
        is due; after the last batch, draw the bar a final time and stop it."""
        self._pending = False
        if not self.is_enabled:
            return
        # a callback after this one may have stopped the run on this batch (a collapse guard)
        final = self._final or trainer.should_stop
        metrics = self.get_metrics(trainer, pl_module)
        if self._progress is not None and self._task is not None:
            items = [f"{key} {format_value(key, value)}" for key, value in metrics.items()]
            self._progress.update(self._task,
                                  values="\n".join(pack_lines(items, self.console.width)))
            if final:
                self._stop()
        elif self.plain and (self._done % self.log_every == 0 or final):
            done, since = self._mark
            now = time.monotonic()
            per_batch = (now - since) / (self._done - done) if self._done > done else None
            self._mark = (self._done, now)
            self.console.print(self.plain_line(metrics, per_batch), markup=False,
                               highlight=False, soft_wrap=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._counting = False
        self._task = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._counting = False
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
        console = self._progress.console if self._progress is not None else self.console
        console.print(*args, sep=sep, **kwargs)


def drop_disabled_progress_bars(trainer_config: Any) -> list[str]:
    """When a parsed ``trainer`` config sets ``enable_progress_bar`` false, remove its
    progress-bar callbacks (which Lightning refuses alongside that flag) and return their class
    paths; otherwise change nothing and return ``[]``.

    ``trainer_config`` is the ``trainer`` section of a Lightning CLI config (a namespace whose
    ``callbacks`` entries have a ``class_path``, or are callbacks already built)."""
    callbacks = trainer_config.get("callbacks")
    if trainer_config.get("enable_progress_bar") is not False or not callbacks:
        return []
    entries = callbacks if isinstance(callbacks, list) else [callbacks]
    kept, dropped = [], []
    for entry in entries:
        class_path = entry.get("class_path") if hasattr(entry, "get") else None
        cls = _import_class(class_path) if class_path else type(entry)
        if isinstance(cls, type) and issubclass(cls, ProgressBar):
            dropped.append(class_path or f"{cls.__module__}.{cls.__qualname__}")
        else:
            kept.append(entry)
    if dropped:
        trainer_config["callbacks"] = kept
    return dropped


def _import_class(class_path: str) -> Any:
    module_name, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), name, None)
