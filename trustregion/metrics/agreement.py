"""How far a second ("shadow") strategy's trust region agrees with the active one, per token.

Both strategies are evaluated on the same masked tokens; the metric keeps token counts and the
sums a Pearson correlation needs (n, Σx, Σy, Σx², Σy², Σxy) as ``sum`` states, so the result over
several micro-batches and ranks equals the result over all their tokens at once. The statistics
are :func:`~trustregion.functional.count_fraction` and
:func:`~trustregion.functional.correlation.pearson_from_sums` of those sums.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric

from trustregion.functional.correlation import pearson_from_sums
from trustregion.functional.masked import count_fraction

__all__ = ["AGREEMENT_STATISTICS", "StrategyAgreement", "pearson_from_sums"]

AGREEMENT_STATISTICS: dict[str, str] = {
    "outside_frac": "fraction of tokens the shadow puts outside its trust region",
    "zero_weight_frac": "fraction of tokens whose shadow gradient weight is exactly 0",
    "only_shadow_outside_frac": "fraction outside the shadow's region but inside the active one",
    "only_active_outside_frac": "fraction outside the active region but inside the shadow's",
    "weight_corr": "Pearson correlation of the per-token gradient weights of shadow and active "
                   "strategy (0 when either is constant)",
}
"""Statistic names of :class:`StrategyAgreement`, with their meaning."""

_SHIFT = 1.0
"""Weights are accumulated as w − 1 (1 is plain importance-sampled policy gradient, the value
most weights sit near), which keeps the float64 sums free of cancellation."""

class StrategyAgreement(Metric):
    """Agreement of a shadow strategy with the active one over masked tokens.

    ``update(shadow_weight, shadow_outside, active_weight, active_outside, mask)`` takes the
    ``[batch, time]`` gradient weights and outside flags of both (``StrategyOutput.weight`` and
    ``outside``); ``compute()`` returns every name in :data:`AGREEMENT_STATISTICS`.
    """

    full_state_update: ClassVar[bool] = False  # type: ignore[misc]
    is_differentiable: ClassVar[bool] = False  # type: ignore[misc]

    tokens: Tensor
    counts: Tensor
    sums: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("tokens", default=torch.zeros((), dtype=torch.float64),
                       dist_reduce_fx="sum")
        # shadow outside, shadow zero weight, only shadow outside, only active outside
        self.add_state("counts", default=torch.zeros(4, dtype=torch.float64),
                       dist_reduce_fx="sum")
        # Σx, Σy, Σx², Σy², Σxy of the shifted weights x (shadow) and y (active)
        self.add_state("sums", default=torch.zeros(5, dtype=torch.float64),
                       dist_reduce_fx="sum")

    def update(self, shadow_weight: Tensor, shadow_outside: Tensor, active_weight: Tensor,
               active_outside: Tensor, mask: Tensor) -> None:
        valid = mask.bool()
        shadow_out = shadow_outside.bool() & valid
        active_out = active_outside.bool() & valid
        events = torch.stack([shadow_out, (shadow_weight == 0) & valid,
                              shadow_out & ~active_out, active_out & ~shadow_out])
        self.counts += events.flatten(1).sum(-1)
        self.tokens += valid.sum()
        x = torch.where(valid, shadow_weight.double() - _SHIFT, 0.0)
        y = torch.where(valid, active_weight.double() - _SHIFT, 0.0)
        self.sums += torch.stack([x.sum(), y.sum(), (x * x).sum(), (y * y).sum(),
                                  (x * y).sum()])

    def compute(self) -> dict[str, Tensor]:
        fractions = count_fraction(self.counts, self.tokens)
        corr = pearson_from_sums(self.tokens, *self.sums.unbind())
        values = {
            "outside_frac": fractions[0],
            "zero_weight_frac": fractions[1],
            "only_shadow_outside_frac": fractions[2],
            "only_active_outside_frac": fractions[3],
            "weight_corr": corr,
        }
        return {name: value.float() for name, value in values.items()}
