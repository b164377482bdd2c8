"""Combine metrics computed on micro-batches, and on ranks, into one value per rollout batch.

The rule follows from the metric's name, so it holds for every strategy's metrics:

* ``…_min`` / ``…_max``: the smallest / largest value;
* ``…_pos_adv`` / ``…_neg_adv``: mean weighted by each micro-batch's count of unmasked tokens
  with Â > 0 / Â < 0;
* anything else: mean weighted by each micro-batch's count of unmasked tokens.

Token-weighted means of per-micro-batch means equal the mean over all tokens, so fractions and
means come out exactly as if the whole rollout batch had been one micro-batch. Across ranks the
weighted sums and weights are summed and the extremes taken (:func:`reduce_across_ranks`), so a
value is the one over every token of every rank, never a mean of rank means.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["MetricAccumulator", "Reduce", "reduce_across_ranks"]

Reduce = Callable[[Tensor, str], Tensor]
"""``reduce(tensor, op)`` with op ``"sum"`` or ``"max"``, across ranks (for example
``lambda t, op: trainer.strategy.reduce(t, reduce_op=op)``)."""


def reduce_across_ranks(reduce: Reduce | None, sums: Mapping[str, Tensor],
                        maxima: Mapping[str, Tensor] | None = None,
                        minima: Mapping[str, Tensor] | None = None,
                        ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """Sum ``sums`` and take the extremes of ``maxima`` / ``minima`` across ranks, in one
    collective for the sums and one for the extremes (minima travel negated). Scalars only;
    without ``reduce`` (one process) the values come back as they are."""
    maxima, minima = maxima or {}, minima or {}
    if reduce is None:
        return dict(sums), dict(maxima), dict(minima)
    out_sums = _reduced(reduce, sums, "sum")
    extremes = _reduced(reduce, {**{("max", k): v for k, v in maxima.items()},
                                 **{("min", k): -v for k, v in minima.items()}}, "max")
    out_max = {k: v for (kind, k), v in extremes.items() if kind == "max"}
    out_min = {k: -v for (kind, k), v in extremes.items() if kind == "min"}
    return out_sums, out_max, out_min


def _reduced(reduce: Reduce, values: Mapping[Any, Tensor], op: str) -> dict[Any, Tensor]:
    if not values:
        return {}
    keys = list(values)
    device = values[keys[0]].device
    stacked = torch.stack([values[k].detach().to(device, torch.float64).reshape(())
                           for k in keys])
    reduced = reduce(stacked, op)
    return dict(zip(keys, reduced.unbind(), strict=True))


class MetricAccumulator:
    """Accumulates named scalar metrics of micro-batches; :meth:`compute` combines them."""

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._weights: dict[str, Tensor] = {}
        self._maxima: dict[str, Tensor] = {}
        self._minima: dict[str, Tensor] = {}

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
                extremes, pick = ((self._minima, torch.minimum) if key.endswith("_min")
                                  else (self._maxima, torch.maximum))
                previous = extremes.get(key)
                extremes[key] = value if previous is None else pick(previous, value)
                continue
            weight = next((c for suffix, c in counts.items() if key.endswith(suffix)), tokens)
            self._sums[key] = self._sums.get(key, torch.zeros_like(value)) + value * weight
            self._weights[key] = self._weights.get(key, torch.zeros_like(value)) + weight

    def compute(self, reduce: Reduce | None = None) -> dict[str, Tensor]:
        """The combined values; with ``reduce``, over every rank (call it on every rank with
        the same metric names)."""
        sums = {**{f"sum:{k}": v for k, v in self._sums.items()},
                **{f"weight:{k}": v for k, v in self._weights.items()}}
        sums, maxima, minima = reduce_across_ranks(reduce, sums, self._maxima, self._minima)
        out = {key: (sums[f"sum:{key}"] / sums[f"weight:{key}"].clamp(min=1)).float()
               for key in self._sums}
        out.update({k: v.float() for k, v in maxima.items()})
        out.update({k: v.float() for k, v in minima.items()})
        return out
