"""Stand-ins for callback tests: a recording logger, a trainer, and a LightningModule that
implements the callback interface (``trustregion.interface.TrainingModule``) and returns
hand-built update records instead of training."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from trustregion.interface import StepOutput, UpdateRecord
from trustregion.step_log import StepLog
from trustregion.strategies import DRPO, TrustRegionStrategy


def step_output(records: Sequence[UpdateRecord]) -> dict[str, Any]:
    """What ``training_step`` returns for a step whose updates are ``records``."""
    return StepOutput(rollout=None, stats=None, updates=tuple(records),  # type: ignore[arg-type]
                      metrics={}).as_training_step_output()


class InterfaceMixin:
    """The callback interface with a StepLog and a strategy, and no weights to restore."""

    def _init_interface(self, strategy: TrustRegionStrategy | None = None) -> None:
        self._step_log = StepLog()
        self._strategy = strategy or DRPO(delta=0.15)
        self.requested_topk = 0

    @property
    def step_log(self) -> StepLog:
        return self._step_log

    @property
    def strategy(self) -> TrustRegionStrategy:
        return self._strategy

    optimizer_steps_per_rollout = 1

    def training_state(self) -> dict[str, Any]:
        return {"models": {}, "optimizers": [], "schedulers": [], "counters": {}}

    def load_training_state(self, state: Mapping[str, Any]) -> None:
        pass

    def request_behavior_topk(self, k: int) -> None:
        self.requested_topk = max(self.requested_topk, k)


class RecordingModule(InterfaceMixin):
    """Stands in for the LightningModule: records what goes through ``log``."""

    def __init__(self, strategy: TrustRegionStrategy | None = None) -> None:
        self._init_interface(strategy)
        self.logged: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def log(self, name: str, value: Any, **kwargs: Any) -> None:
        self.logged.append(({name: value}, kwargs))


class RecordingLogger:
    """Records every ``log_metrics`` call."""

    def __init__(self) -> None:
        self.written: list[tuple[dict[str, float], int]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.written.append(({k: v for k, v in metrics.items() if k != "epoch"}, step))

    def save(self) -> None:
        pass


class StandInTrainer:
    """Stands in for the Trainer: what the StepLog and the callbacks read, and a batch loop
    that runs one callback's hook between the module's ``start`` and ``finish``."""

    def __init__(self, log_every_n_steps: int = 1, num_training_batches: int = 100) -> None:
        self.log_every_n_steps = log_every_n_steps
        self.num_training_batches = num_training_batches
        self.max_steps, self.global_step, self.should_stop = -1, 0, False
        self.current_epoch = 0
        self.progress_bar_callback = None
        self.callback_metrics: dict[str, torch.Tensor] = {}
        self.loggers = [RecordingLogger()]
        self.batches = 0

    @property
    def written(self) -> list[tuple[dict[str, float], int]]:
        return self.loggers[0].written

    def end_batch(self, callback: L.Callback, module: RecordingModule, outputs: Any) -> None:
        """One rollout batch: the row opens, the callback's hook runs, the module finishes."""
        module.step_log.start(self, self.batches)  # type: ignore[arg-type]
        callback.on_train_batch_end(self, module, outputs, None,  # type: ignore[arg-type]
                                    self.batches)
        module.step_log.finish(module)  # type: ignore[arg-type]
        self.batches += 1


class HandBuiltUpdates(InterfaceMixin, L.LightningModule):
    """Returns ``records(rank, batch_idx)`` as its update records; nothing is trained."""

    def __init__(self, records: Callable[[int, int], Sequence[UpdateRecord]],
                 batches: int = 1) -> None:
        super().__init__()
        self._init_interface()
        self.records = records
        self.batches = batches
        self.automatic_optimization = False
        self.unused = torch.nn.Parameter(torch.zeros(1))  # DDP needs a parameter

    def train_dataloader(self) -> DataLoader:
        return DataLoader(list(range(self.batches)), batch_size=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        self.step_log.start(self.trainer, batch_idx)
        return step_output(self.records(self.global_rank, batch_idx))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.step_log.finish(self)
