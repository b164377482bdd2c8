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
)
from trustregion.strategies.registry import register_strategy
from trustregion.strategies.widths import (
    check_cap,
    check_inherited_width,
    check_width,
    resolve_side,
)

__all__ = ["RatioClip"]


@register_strategy("ratio_clip")
class RatioClip(TrustRegionStrategy):
    """Clip the importance ratio r = π/ν to [1 − ε_low, 1 + ε_high] (PPO, GRPO, DAPO).

    .. math::
        J_t = \\min(r Â,\\ \\mathrm{clip}(r, 1 − ε_{low}, 1 + ε_{high}) Â)

    With the dual clip c (for Â < 0 only): J_t = max(J_t, c·Â).

    Gradient weight: w = 0 when (Â > 0 and r > 1 + ε_high) or (Â < 0 and r < 1 − ε_low), and with
    the dual clip when Â < 0 and r > c; otherwise w = 1. At the boundary itself w = 1.

    Args:
        epsilon: ε ≥ 0, the clip half-width of each side not set on its own (PPO/GRPO: 0.2).
        epsilon_low: ε_low ∈ [0, 1), lower half-width (r > 0, so 1 − ε_low must be > 0 for the
            lower clip to act); None (default) inherits ``epsilon`` (which must then be < 1).
        epsilon_high: ε_high, upper half-width; None (default) inherits ``epsilon``
            (DAPO clip-higher: 0.28).
        dual_clip_cap: c > 1, the cap on the ratio of negative-advantage tokens: beyond it their
            loss stops growing (3.0 in Ye et al., always on in verl). inf (default) turns the dual
            clip off.
        anchor: "behavior" (ν = μ) or "old" (ν = π_old).

    Every half-width accepts inf (no bound on that side).

    Example:
        >>> strategy = RatioClip(epsilon_high=0.28)   # DAPO clip-higher: [0.8, 1.28]

    References: Schulman et al. 2017, arXiv:1707.06347; DeepSeekMath, arXiv:2402.03300;
    DAPO, arXiv:2503.14476; dual clip, Ye et al., arXiv:1912.09729.
    """

    widths: ClassVar[Mapping[str, int]] = {
        "epsilon": 1, "epsilon_low": 1, "epsilon_high": 1, "dual_clip_cap": 1,
    }
    width_origins: ClassVar[Mapping[str, float]] = {"dual_clip_cap": 1.0}  # c − 1 scales

    def __init__(
        self,
        epsilon: float = 0.2,
        epsilon_low: float | None = None,
        epsilon_high: float | None = None,
        dual_clip_cap: float = math.inf,
        anchor: Anchor = "behavior",
    ) -> None:
        super().__init__(anchor=anchor)
        check_width("epsilon", epsilon, meaning="the clip half-width around ratio 1")
        check_width("epsilon_low", epsilon_low, inherits="epsilon", below=1.0,
                    meaning="the lower clip half-width: the region starts at r = 1 − ε_low, "
                            "and r > 0, so ε_low ≥ 1 would never clip")
        check_inherited_width("epsilon", epsilon, "epsilon_low", epsilon_low, below=1.0,
                              meaning="the region starts at r = 1 − ε_low, and r > 0")
        check_width("epsilon_high", epsilon_high, inherits="epsilon",
                    meaning="the upper clip half-width: the region ends at r = 1 + ε_high")
        check_cap("dual_clip_cap", dual_clip_cap, minimum=1.0, off="to turn the dual clip off",
                  meaning="c, the ratio above which a negative-advantage token's loss stops "
                          "growing")
        self.epsilon = epsilon
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high
        self.dual_clip_cap = dual_clip_cap

    @property
    def bounds(self) -> tuple[float, float]:
        """(1 − ε_low, 1 + ε_high), each side inheriting ε unless set."""
        return (1.0 - resolve_side(self.epsilon, self.epsilon_low),
                1.0 + resolve_side(self.epsilon, self.epsilon_high))

    def terms(self, tokens: AnchoredTokens) -> StrategyTerms:
        low, high = self.bounds
        adv, ratio = tokens.advantages, tokens.ratio
        outside = ((adv > 0) & (ratio > high)) | ((adv < 0) & (ratio < low))
        dual = (adv < 0) & (ratio > self.dual_clip_cap)  # never, with the cap at inf (off)
        frozen = outside | dual
        constant = torch.where(dual, torch.full_like(ratio, self.dual_clip_cap),
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
        edge = torch.where(advantages > 0, torch.full_like(anchor_logp, high),
                           torch.full_like(anchor_logp, low))
        bound = anchor_logp + edge.log()
        # an infinite or non-positive edge (no bound on that side) has no boundary inside (0, 1)
        return torch.where((edge > 0) & (bound < 0), bound, torch.full_like(bound, math.nan))
