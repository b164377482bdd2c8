"""A callback for tests that keeps the ``StepOutput`` of every rollout batch."""

from __future__ import annotations

import lightning as L

from trustregion.interface import StepOutput


class KeepSteps(L.Callback):
    """Keeps the StepOutput of every rollout batch in ``steps``."""

    def __init__(self) -> None:
        self.steps: list[StepOutput] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = StepOutput.of(outputs)
        assert step is not None
        self.steps.append(step)
