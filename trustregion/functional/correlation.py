"""Pearson correlation from sums, so that micro-batches and ranks combine by adding them."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CONSTANT_TOLERANCE", "pearson_from_sums"]

CONSTANT_TOLERANCE = 1e-12
"""A variable counts as constant when its variance is below this fraction of its second moment:
float32 values cannot vary by less than that."""


def pearson_from_sums(n: Tensor, sx: Tensor, sy: Tensor, sxx: Tensor, syy: Tensor,
                      sxy: Tensor) -> Tensor:
    """Pearson correlation of n pairs (x, y) from n, Σx, Σy, Σx², Σy², Σxy::

        corr = (Σxy/n − x̄ȳ) / sqrt((Σx²/n − x̄²)(Σy²/n − ȳ²))

    clipped to [−1, 1]; 0 when n = 0 or either side is constant (variance below
    :data:`CONSTANT_TOLERANCE` of its second moment). Pass float64 sums of values shifted to
    near 0 to keep the differences free of cancellation.

    Example:
        >>> x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64); y = 2 * x
        >>> float(pearson_from_sums(torch.tensor(3.0), x.sum(), y.sum(), (x * x).sum(),
        ...                         (y * y).sum(), (x * y).sum()))
        1.0
    """
    safe = n.clamp(min=1)
    mx, my = sx / safe, sy / safe
    second_x, second_y = sxx / safe, syy / safe
    var_x = (second_x - mx * mx).clamp(min=0)
    var_y = (second_y - my * my).clamp(min=0)
    cov = sxy / safe - mx * my
    varies = ((var_x > CONSTANT_TOLERANCE * second_x) & (var_y > CONSTANT_TOLERANCE * second_y)
              & (n > 0))
    corr = cov / (var_x * var_y).sqrt().clamp(min=1e-300)
    return torch.where(varies, corr.clamp(-1, 1), torch.zeros_like(corr))
