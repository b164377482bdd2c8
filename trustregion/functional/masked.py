"""Masked reductions that never synchronise with the host and never divide by zero.

An empty selection gives 0 for every reduction, so an all-zero mask yields finite metrics.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["masked_count", "masked_max", "masked_mean", "masked_min", "masked_sum"]


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
