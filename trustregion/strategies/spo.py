"""SPO: simple policy optimisation (quadratic penalty on the ratio)."""

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

__all__ = ["SPO"]


@register_strategy("spo")
class SPO(TrustRegionStrategy):
    """Quadratic penalty on the ratio's distance from 1 (SPO).

    .. math::
        J_t = r Â − \\frac{|Â|}{2ε} (r − 1)^2, \\qquad w = 1 − \\mathrm{sign}(Â) (r − 1) / ε

    w reaches 0 at r = 1 ± ε and turns negative beyond. In expectation over y ~ ν the penalty is
    the χ² divergence, which is hypersensitive to rare tokens: w is unbounded as ν → 0. DRPO is
    SPO with ε replaced by δ/ν.

    Args:
        epsilon: ratio half-width ε > 0 (default 0.2).
        anchor: "behavior" or "old".

    Example:
        >>> strategy = SPO(epsilon=0.2)

    Reference: Xie et al., "Simple Policy Optimization", ICML 2025, arXiv:2401.16025.
    """

    widths: ClassVar[Mapping[str, int]] = {"epsilon": 1}

    def __init__(self, epsilon: float = 0.2, anchor: Anchor = "behavior") -> None:
        super().__init__(anchor=anchor)
        require(epsilon > 0 and not math.isnan(epsilon),
                f"epsilon must be > 0 (the ratio half-width where the weight reaches 0); "
                f"got {epsilon}")
        self.epsilon = epsilon

    def terms(self, tokens: AnchoredTokens) -> StrategyTerms:
        adv, ratio = tokens.advantages, tokens.ratio
        excess = torch.expm1(tokens.log_ratio)
        penalty = adv.abs() * excess.square() / (2 * self.epsilon)
        signed = adv.sign() * excess.detach()
        return StrategyTerms(
            objective=ratio * adv - penalty,
            weight=1 - signed / self.epsilon,
            outside=signed > self.epsilon,
            extras={"penalty_mean": masked_mean(penalty.detach(), tokens.mask)},
        )

    def boundary_logp(self, anchor_logp: Tensor, advantages: Tensor) -> Tensor | None:
        edge = torch.where(advantages > 0, torch.full_like(anchor_logp, 1 + self.epsilon),
                           torch.full_like(anchor_logp, 1 - self.epsilon))
        bound = anchor_logp + edge.log()
        return torch.where((edge > 0) & (bound < 0), bound, torch.full_like(bound, math.nan))
