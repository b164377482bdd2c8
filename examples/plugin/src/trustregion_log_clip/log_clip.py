"""Clip the log-ratio log(π/ν) to [−ε, ε]: the same trust region for raising and lowering."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar, Literal

import torch
from torch import Tensor

from trustregion.functional import masked_mean
from trustregion.strategies import (
    AnchoredTokens,
    StrategyTerms,
    TrustRegionStrategy,
    register_strategy,
)
from trustregion.validation import number_in

__all__ = ["LogRatioClip"]


@register_strategy("log_clip")
class LogRatioClip(TrustRegionStrategy):
    """Ratio clipping with a band symmetric in log space: |log(π/ν)| ≤ ε.

    .. math::
        J_t = \\min(r Â,\\ e^{\\mathrm{clip}(\\log r,\\ −ε,\\ ε)} Â)

    Gradient weight: w = 0 when (Â > 0 and log r > ε) or (Â < 0 and log r < −ε), otherwise
    w = 1 (at the boundary itself w = 1).

    PPO's band r ∈ [0.8, 1.2] is lopsided in log space (log 1.2 = 0.18, log 0.8 = −0.22): a
    token may lose more probability than it may gain. Here a token may grow or shrink by the
    same factor e^ε before its gradient stops (ε = 0.2: r ∈ [0.819, 1.221]).

    Args:
        epsilon: ε > 0, the half-width of the band on log r (default 0.2).
        anchor: "behavior" (ν = μ) or "old" (ν = π_old).

    Example:
        >>> strategy = LogRatioClip(epsilon=0.2)

    Logs ``trust_region/log_ratio_abs_mean``, the mean |log r| over the batch's tokens.
    """

    widths: ClassVar[Mapping[str, int]] = {"epsilon": 1}

    def __init__(self, epsilon: float = 0.2,
                 anchor: Literal["behavior", "old"] = "behavior") -> None:
        super().__init__(anchor=anchor)
        self.epsilon = number_in("epsilon", epsilon, 0.0,
                                 note="the half-width of the band on log(π/ν)")

    def terms(self, tokens: AnchoredTokens) -> StrategyTerms:
        adv, log_ratio = tokens.advantages, tokens.log_ratio
        outside = ((adv > 0) & (log_ratio > self.epsilon)) | \
            ((adv < 0) & (log_ratio < -self.epsilon))
        # beyond the band the objective is the clipped ratio, a constant: no gradient
        clipped = log_ratio.detach().clamp(-self.epsilon, self.epsilon).exp()
        objective = torch.where(outside, clipped, tokens.ratio) * adv
        return StrategyTerms(
            objective=objective,
            weight=(~outside).to(log_ratio.dtype),
            outside=outside,
            extras={"log_ratio_abs_mean": masked_mean(log_ratio.detach().abs(), tokens.mask)},
        )

    def boundary_logp(self, anchor_logp: Tensor, advantages: Tensor) -> Tensor | None:
        bound = anchor_logp + torch.sign(advantages) * self.epsilon
        # a boundary at π ≥ 1 cannot be reached
        return torch.where(bound < 0, bound, torch.full_like(bound, math.nan))
