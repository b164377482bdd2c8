"""Whether a run will ever stop on its own.

The prompt stream is endless (:class:`~trustregion.data.PromptStream` has no length), so a
Lightning epoch never ends and ``trainer.max_epochs`` never stops a run by itself. A run ends
only through ``trainer.max_steps`` (optimiser steps), ``trainer.max_time``, or an integer
``trainer.limit_train_batches`` (rollout batches per epoch) together with ``trainer.max_epochs``.
A config saved with ``trustregion fit --print_config`` has ``max_steps: -1`` and would train
until stopped by hand: :func:`unbounded_run_warning` says so at the start of fitting.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Timer

__all__ = ["unbounded_run_warning"]


def unbounded_run_warning(trainer: L.Trainer, steps_per_rollout: int) -> str | None:
    """A warning when nothing in ``trainer``'s settings bounds the run's length, else None.

    ``steps_per_rollout`` is the number of optimiser steps per rollout batch, to say what a
    ``max_steps`` value means.
    """
    if trainer.max_steps >= 0:
        return None
    callbacks = trainer.callbacks  # type: ignore[attr-defined]  # public, undeclared
    if any(isinstance(callback, Timer) for callback in callbacks):  # set by max_time
        return None
    epochs = trainer.max_epochs
    if isinstance(trainer.limit_train_batches, int) and epochs is not None and epochs >= 0:
        return None
    return (
        "this run has no stopping condition and will train until it is interrupted: "
        "trainer.max_steps is -1, trainer.max_time is not set, and the prompt stream is "
        "endless, so an epoch never ends and trainer.max_epochs cannot stop it. Set "
        f"trainer.max_steps (optimiser steps; {steps_per_rollout} per rollout batch here) or "
        "trainer.max_time (e.g. '00:12:00:00')"
    )
