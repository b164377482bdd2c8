"""The public interface between :class:`~trustregion.module.TrustRegionModule` and callbacks.

A callback reads what a rollout batch did from the :class:`StepOutput` that ``training_step``
returns, and acts on the module only through the methods of :class:`TrainingModule`::

    class MyCallback(L.Callback):
        def setup(self, trainer, pl_module, stage):
            self.module = training_module(pl_module, "MyCallback")  # a clear error otherwise

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = StepOutput.of(outputs)
            for record in step.updates:        # one per micro-batch update, detached
                ...record.batch.logp, record.output.weight...
            self.module.step_log.add({"my/value": ...})   # global values, one logger row

A callback never sets a module attribute by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from torch import Tensor

from trustregion.strategies import StrategyOutput, TokenBatch, TrustRegionStrategy

if TYPE_CHECKING:
    from trustregion.rollout import Rollout, RolloutStats
    from trustregion.step_log import StepLog

__all__ = ["StepOutput", "TrainingModule", "UpdateRecord", "training_module"]

STEP_OUTPUT_KEY = "step"
"""The key of the :class:`StepOutput` in the dict ``training_step`` returns (Lightning's manual
optimisation passes a dict through to the callbacks' ``outputs``)."""


@dataclass(frozen=True)
class UpdateRecord:
    """What one micro-batch update saw, detached: the per-token inputs and the strategy's
    per-token output."""

    batch: TokenBatch
    output: StrategyOutput


@dataclass(frozen=True)
class StepOutput:
    """What one RL iteration (rollout batch) did, on this process.

    Attributes:
        rollout: the sampled, scored batch of this process's prompts, with rewards and
            advantages.
        stats: the rollout's statistics on this process (rewards, reward penalty, groups).
        updates: one :class:`UpdateRecord` per micro-batch update, in update order (a token
            updated in several PPO epochs appears once per epoch).
        metrics: the module's values of this rollout batch, reduced across ranks (the same
            values its logger row holds).
    """

    rollout: Rollout
    stats: RolloutStats
    updates: tuple[UpdateRecord, ...]
    metrics: Mapping[str, Tensor]

    @staticmethod
    def of(outputs: Any) -> StepOutput | None:
        """The :class:`StepOutput` in a callback's ``outputs`` argument (``None`` when the
        module returned none, as in a Lightning hook of another module)."""
        if isinstance(outputs, StepOutput):
            return outputs
        if isinstance(outputs, Mapping):
            value = outputs.get(STEP_OUTPUT_KEY)
            if isinstance(value, StepOutput):
                return value
        return None

    def as_training_step_output(self) -> dict[str, Any]:
        """The dict ``training_step`` returns (manual optimisation asks for a mapping)."""
        return {STEP_OUTPUT_KEY: self}


@runtime_checkable
class TrainingModule(Protocol):
    """What callbacks may use of the training module. ``TrustRegionModule`` implements it."""

    @property
    def step_log(self) -> StepLog:
        """The current rollout batch's logger row and progress-bar values."""

    @property
    def strategy(self) -> TrustRegionStrategy:
        """The trust-region strategy being trained with."""

    @property
    def optimizer_steps_per_rollout(self) -> int:
        """Optimiser steps (``trainer.global_step`` counts) one rollout batch makes."""

    def training_state(self) -> dict[str, Any]:
        """Everything an undo must restore: weights, optimiser and scheduler states,
        counters. Tensors are the live ones, not copies."""

    def load_training_state(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`training_state` (copied values are copied in place)."""

    def request_behavior_topk(self, k: int) -> None:
        """Record at least ``k`` top-K behaviour log-probs per token from now on."""


def training_module(pl_module: Any, user: str) -> TrainingModule:
    """``pl_module`` as a :class:`TrainingModule`, or a ``TypeError`` that says ``user`` needs
    one (a ``TrustRegionModule``)."""
    if not isinstance(pl_module, TrainingModule):
        missing = [name for name in ("step_log", "strategy", "optimizer_steps_per_rollout",
                                     "training_state", "load_training_state",
                                     "request_behavior_topk") if not hasattr(pl_module, name)]
        raise TypeError(f"{user} needs a TrustRegionModule (or a LightningModule implementing "
                        f"trustregion.interface.TrainingModule); {type(pl_module).__name__} "
                        f"lacks {', '.join(missing)}")
    return pl_module
