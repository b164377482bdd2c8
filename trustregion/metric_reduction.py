"""Combine metrics computed on micro-batches into one value per rollout batch.

The rule follows from the metric's name, so it holds for every strategy's metrics:

* ``…_min`` / ``…_max``: the smallest / largest value;
* ``…_pos_adv`` / ``…_neg_adv``: mean weighted by each micro-batch's count of unmasked tokens
  with Â > 0 / Â < 0;
* anything else: mean weighted by each micro-batch's count of unmasked tokens.

Token-weighted means of per-micro-batch means equal the mean over all tokens, so fractions and
means come out exactly as if the whole rollout batch had been one micro-batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["MetricAccumulator"]


class MetricAccumulator:
    """Accumulates named scalar metrics of micro-batches; :meth:`compute` combines them."""

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._weights: dict[str, Tensor] = {}
        self._extremes: dict[str, Tensor] = {}

    def add(self, metrics: dict[str, Tensor], mask: Tensor, advantages: Tensor) -> None:
        """Add one micro-batch's metrics; ``mask`` and ``advantages`` are its ``[B, T]`` tensors."""
        valid = mask != 0
        counts = {
            "_pos_adv": (valid & (advantages > 0)).sum(dtype=torch.float32),
            "_neg_adv": (valid & (advantages < 0)).sum(dtype=torch.float32),
        }
        tokens = valid.sum(dtype=torch.float32)
        for key, value in metrics.items():
            value = value.detach().float()
            if key.endswith(("_min", "_max")):
                pick = torch.minimum if key.endswith("_min") else torch.maximum
                previous = self._extremes.get(key)
                self._extremes[key] = value if previous is None else pick(previous, value)
                continue
            weight = next((c for suffix, c in counts.items() if key.endswith(suffix)), tokens)
            self._sums[key] = self._sums.get(key, torch.zeros_like(value)) + value * weight
            self._weights[key] = self._weights.get(key, torch.zeros_like(value)) + weight

    def compute(self) -> dict[str, Tensor]:
        out = {key: total / self._weights[key].clamp(min=1) for key, total in self._sums.items()}
        out.update(self._extremes)
        return out
