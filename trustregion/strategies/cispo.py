"""CISPO: clipped importance-sampling weights, never zero gradients."""

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
from trustregion.strategies.widths import check_inherited_width, check_width, resolve_side

__all__ = ["CISPO"]


@register_strategy("cispo")
class CISPO(TrustRegionStrategy):
    """Clip the importance-sampling weight, not the update (CISPO, MiniMax-M1).

    .. math::
        \\mathrm{loss}_t = −\\mathrm{sg}(\\mathrm{clip}(r, 1 − ε_{low}, 1 + ε_{high})) Â \\log π,
        \\qquad w = \\mathrm{clip}(r) / r

    Every token keeps a gradient (w > 0). The only clip that restrains a token moving in the
    harmful direction is the upper one with Â > 0 (w = (1 + ε_high)/r < 1), so that is what
    counts as outside the region; the lower clip *raises* the weight of tokens whose probability
    fell (w = (1 − ε_low)/r > 1). ``clipped_frac`` counts every clipped weight.

    Args:
        epsilon: ε, the half-width of each side not set on its own; inf (default): no bound, so
            by default only the upper side is clipped, as in MiniMax-M1.
        epsilon_low: ε_low ∈ [0, 1), lower half-width (r > 0, so 1 − ε_low must be > 0 for
            the lower clip to act); None (default) inherits ``epsilon``.
        epsilon_high: ε_high, upper half-width (default 0.28); None inherits ``epsilon``.
        anchor: "behavior" or "old".

    Example:
        >>> strategy = CISPO()                    # weights clipped to (−inf, 1.28]
        >>> two_sided = CISPO(epsilon=0.2)        # [0.8, 1.28]

    Reference: MiniMax-M1, arXiv:2506.13585.
    """

    widths: ClassVar[Mapping[str, int]] = {"epsilon": 1, "epsilon_low": 1, "epsilon_high": 1}

    def __init__(self, epsilon: float = math.inf, epsilon_low: float | None = None,
                 epsilon_high: float | None = 0.28, anchor: Anchor = "behavior") -> None:
        super().__init__(anchor=anchor)
        check_width("epsilon", epsilon, meaning="the weight-clip half-width around ratio 1")
        check_width("epsilon_low", epsilon_low, inherits="epsilon", below=1.0,
                    meaning="lower half-width: weights below 1 − ε_low are raised to it, and "
                            "r > 0, so ε_low ≥ 1 would never clip")
        check_inherited_width("epsilon", epsilon, "epsilon_low", epsilon_low, below=1.0,
                              meaning="weights below 1 − ε_low are raised to it, and r > 0")
        check_width("epsilon_high", epsilon_high, inherits="epsilon",
                    meaning="upper half-width: weights above 1 + ε_high are cut to it")
        self.epsilon = epsilon
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high

    @property
    def bounds(self) -> tuple[float, float]:
        """(1 − ε_low, 1 + ε_high), each side inheriting ε unless set; −inf / inf for no bound."""
        return (1.0 - resolve_side(self.epsilon, self.epsilon_low),
                1.0 + resolve_side(self.epsilon, self.epsilon_high))

    def terms(self, tokens: AnchoredTokens) -> StrategyTerms:
        low, high = self.bounds
        ratio = tokens.ratio.detach()
        clipped = ratio.clamp(min=low, max=high)
        adv = tokens.advantages
        return StrategyTerms(
            objective=clipped * adv * tokens.logp,
            weight=clipped / ratio,
            outside=(adv > 0) & (ratio > high),
            extras={"clipped_frac": masked_mean((ratio > high) | (ratio < low), tokens.mask)},
        )

    def boundary_logp(self, anchor_logp: Tensor, advantages: Tensor) -> Tensor | None:
        bound = anchor_logp + math.log1p(resolve_side(self.epsilon, self.epsilon_high))
        nan = torch.full_like(bound, math.nan)
        return torch.where((advantages > 0) & (bound < 0), bound, nan)
