"""Ratio clipping: PPO, GRPO, DAPO clip-higher and dual clip."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor

from trustregion.functional.masked import masked_mean
from trustregion.strategies.base import (
    Anchor,
    AnchoredTokens,
    StrategyTerms,
    TrustRegionStrategy,
    require,
)
from trustregion.strategies.registry import register_strategy

__all__ = ["RatioClip"]


def check_epsilons(*, optional: tuple[str, ...] = (), **epsilons: float | None) -> None:
    """Each ε must be a number ≥ 0; only the names in ``optional`` may be None."""
    for name, value in epsilons.items():
        if value is None and name in optional:
            continue
        require(isinstance(value, (int, float)) and value >= 0 and not math.isnan(value),
                f"{name} must be a number ≥ 0 (the clip half-width around ratio 1); got {value}")


@register_strategy("ratio_clip")
class RatioClip(TrustRegionStrategy):
    """Clip the importance ratio r = π/ν to [1 − ε_low, 1 + ε_high] (PPO, GRPO, DAPO).

    .. math::
        J_t = \\min(r Â,\\ \\mathrm{clip}(r, 1 − ε_{low}, 1 + ε_{high}) Â)

    With dual clip c (for Â < 0 only): J_t = max(J_t, c·Â).

    Gradient weight: w = 0 when (Â > 0 and r > 1 + ε_high) or (Â < 0 and r < 1 − ε_low), and with
    dual clip when Â < 0 and r > c; otherwise w = 1. At the boundary itself w = 1.

    Args:
        epsilon: clip half-width used for both sides unless overridden (PPO/GRPO: 0.2).
        epsilon_low: lower half-width, overrides ``epsilon``.
        epsilon_high: upper half-width, overrides ``epsilon`` (DAPO clip-higher: 0.28).
        dual_clip: c > 1 bounding the loss of negative-advantage tokens with huge ratios
            (3.0 in Ye et al.); None (default) turns it off.
        anchor: "behavior" (ν = μ) or "old" (ν = π_old).

    Example:
        >>> strategy = RatioClip(epsilon_high=0.28)   # DAPO clip-higher

    References: Schulman et al. 2017, arXiv:1707.06347; DeepSeekMath, arXiv:2402.03300;
    DAPO, arXiv:2503.14476; dual clip, Ye et al., arXiv:1912.09729.
    """

    widths: ClassVar[Mapping[str, int]] = {
        "epsilon": 1, "epsilon_low": 1, "epsilon_high": 1, "dual_clip": 1,
    }
    width_origins: ClassVar[Mapping[str, float]] = {"dual_clip": 1.0}  # c − 1 scales, c stays > 1

    def __init__(
        self,
        epsilon: float = 0.2,
        epsilon_low: float | None = None,
        epsilon_high: float | None = None,
        dual_clip: float | None = None,
        anchor: Anchor = "behavior",
    ) -> None:
        super().__init__(anchor=anchor)
        check_epsilons(epsilon=epsilon, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                       optional=("epsilon_low", "epsilon_high"))
        require(dual_clip is None or dual_clip > 1,
                f"dual_clip must be > 1 (or None to turn it off); got {dual_clip}")
        self.epsilon = epsilon
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high
        self.dual_clip = dual_clip

    @property
    def bounds(self) -> tuple[float, float]:
        """(1 − ε_low, 1 + ε_high)."""
        low = self.epsilon if self.epsilon_low is None else self.epsilon_low
        high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        return 1.0 - low, 1.0 + high

    def terms(self, tokens: AnchoredTokens) -> StrategyTerms:
        low, high = self.bounds
        adv, ratio = tokens.advantages, tokens.ratio
        outside = ((adv > 0) & (ratio > high)) | ((adv < 0) & (ratio < low))
        dual = torch.zeros_like(outside)
        if self.dual_clip is not None:
            dual = (adv < 0) & (ratio > self.dual_clip)
        frozen = outside | dual
        constant = torch.where(dual, torch.full_like(ratio, self.dual_clip or 0.0),
                               ratio.detach().clamp(min=low, max=high))
        objective = torch.where(frozen, constant, ratio) * adv
        return StrategyTerms(
            objective=objective,
            weight=(~frozen).to(ratio.dtype),
            outside=outside,
            extras={"dual_clip_frac": masked_mean(dual, tokens.mask)},
        )

    def boundary_logp(self, anchor_logp: Tensor, advantages: Tensor) -> Tensor | None:
        low, high = self.bounds
        bound = torch.where(advantages > 0, torch.full_like(anchor_logp, high),
                            torch.full_like(anchor_logp, low))
        return anchor_logp + bound.log()
