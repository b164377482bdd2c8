"""Masked reductions that never synchronise with the host and never divide by zero.

An empty selection gives 0 for every reduction, so an all-zero mask yields finite metrics.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "count_fraction",
    "masked_count",
    "masked_max",
    "masked_mean",
    "masked_min",
    "masked_sum",
]


def masked_count(mask: Tensor) -> Tensor:
    """Number of selected elements, as float32."""
    return mask.sum(dtype=torch.float32)


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Σ values over the selected elements (unselected values may be NaN)."""
    values = values.float() if not values.is_floating_point() else values
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    return torch.where(mask, values, zero).sum()


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over the selected elements; 0 when nothing is selected."""
    return masked_sum(values, mask) / masked_count(mask).clamp(min=1)


def masked_min(values: Tensor, mask: Tensor) -> Tensor:
    """Minimum over the selected elements; 0 when nothing is selected."""
    values = values.float() if not values.is_floating_point() else values
    inf = torch.full((), float("inf"), dtype=values.dtype, device=values.device)
    smallest = torch.where(mask, values, inf).amin()
    return torch.where(mask.any(), smallest, torch.zeros_like(smallest))


def masked_max(values: Tensor, mask: Tensor) -> Tensor:
    """Maximum over the selected elements; 0 when nothing is selected."""
    return -masked_min(-values.float() if not values.is_floating_point() else -values, mask)


def count_fraction(hits: Tensor, total: Tensor) -> Tensor:
    """hits / total from counts (elementwise), 0 where ``total`` is 0: :func:`masked_mean` of a
    flag from its sums, for counts that several micro-batches or ranks combine by adding.

    Example (outside-the-region counts 1 of 4 and 0 of 0):
        >>> count_fraction(torch.tensor([1.0, 0.0]), torch.tensor([4.0, 0.0])).tolist()
        [0.25, 0.0]
    """
    return hits / total.clamp(min=1)
