"""In-memory copies of everything an undo must restore, through the module's public
``training_state()`` / ``load_training_state()`` (so a new counter can never be left out)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from trustregion.interface import TrainingModule
from trustregion.sharding import nonfinite_counts

__all__ = ["TrainingSnapshot", "nonfinite_weights"]


def _copied(value: Any, device: torch.device | str | None) -> Any:
    """A deep copy of a (nested) state; tensors cloned, optionally onto ``device``."""
    if isinstance(value, Tensor):
        value = value.detach()
        return value.clone() if device is None else value.to(device, copy=True)
    if isinstance(value, Mapping):
        return {k: _copied(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_copied(v, device) for v in value)
    return value


def nonfinite_weights(module: TrainingModule) -> list[str]:
    """Names (``model.tensor``) of the module's trained and behaviour tensors that hold NaN or
    inf, with one host synchronisation."""
    names, weights = [], []
    for model, tensors in module.training_state()["models"].items():
        for name, tensor in tensors.items():
            if tensor.is_floating_point():
                names.append(f"{model}.{name}")
                weights.append(tensor)
    if not weights:
        return []
    # whole tensors when the policy is sharded, so every process reaches the same verdict
    counts = nonfinite_counts(weights).tolist()
    return [name for name, count in zip(names, counts, strict=True) if count]


@dataclass
class TrainingSnapshot:
    """A copy of a module's :meth:`~trustregion.interface.TrainingModule.training_state`."""

    state: dict[str, Any]

    @classmethod
    def capture(cls, module: TrainingModule, device: torch.device | str | None = None
                ) -> TrainingSnapshot:
        """Copy the state now (onto ``device``, or beside the weights)."""
        return cls(_copied(module.training_state(), device))

    def restore(self, module: TrainingModule, keep: bool) -> None:
        """Copy the snapshot back; ``keep`` leaves it intact for a later restore (the optimiser
        would otherwise adopt its tensors and update them in place)."""
        module.load_training_state(_copied(self.state, None) if keep else self.state)
