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
)
from trustregion.strategies.registry import register_strategy
from trustregion.strategies.widths import check_width, resolve_side

__all__ = ["SPO"]


@register_strategy("spo")
class SPO(TrustRegionStrategy):
    """Quadratic penalty on the ratio's distance from 1 (SPO).

    .. math::
        J_t = r Â − \\frac{|Â|}{2ε} (r − 1)^2, \\qquad w = 1 − \\mathrm{sign}(Â) (r − 1) / ε

    w reaches 0 at r = 1 ± ε and turns negative beyond. In expectation over y ~ ν the penalty is
    the χ² divergence, which is hypersensitive to rare tokens: w is unbounded as ν → 0. DRPO is
    SPO with ε replaced by δ/ν. The asymmetric form uses ε_high when r ≥ 1 and ε_low when r < 1
    (penalty and slope are 0 at r = 1, so w stays continuous).

    Args:
        epsilon: ε > 0, the ratio half-width where w reaches 0, for each side not set on its own
            (default 0.2).
        epsilon_low: ε_low, used when r < 1; None (default) inherits ``epsilon``.
        epsilon_high: ε_high, used when r ≥ 1; None (default) inherits ``epsilon``.
        anchor: "behavior" or "old".

    A half-width of inf removes the penalty on that side.

    Example:
        >>> strategy = SPO(epsilon=0.2)

    Reference: Xie et al., "Simple Policy Optimization", ICML 2025, arXiv:2401.16025.
    """

    widths: ClassVar[Mapping[str, int]] = {"epsilon": 1, "epsilon_low": 1, "epsilon_high": 1}

    def __init__(self, epsilon: float = 0.2, epsilon_low: float | None = None,
                 epsilon_high: float | None = None, anchor: Anchor = "behavior") -> None:
        super().__init__(anchor=anchor)
        meaning = "the ratio half-width where the gradient weight reaches 0"
        check_width("epsilon", epsilon, positive=True, meaning=meaning)
        check_width("epsilon_low", epsilon_low, positive=True, inherits="epsilon",
                    meaning=meaning + ", used when r < 1")
        check_width("epsilon_high", epsilon_high, positive=True, inherits="epsilon",
                    meaning=meaning + ", used when r ≥ 1")
        self.epsilon = epsilon
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high

    @property
    def epsilons(self) -> tuple[float, float]:
        """(ε_low, ε_high), each inheriting ε unless set."""
        return (resolve_side(self.epsilon, self.epsilon_low),
                resolve_side(self.epsilon, self.epsilon_high))

    def terms(self, tokens: AnchoredTokens) -> StrategyTerms:
        low, high = self.epsilons
        adv, ratio = tokens.advantages, tokens.ratio
        excess = torch.expm1(tokens.log_ratio)
        width = torch.where(excess.detach() >= 0, torch.full_like(ratio, high),
                            torch.full_like(ratio, low))
        penalty = adv.abs() * excess.square() / (2 * width)
        signed = adv.sign() * excess.detach()
        return StrategyTerms(
            objective=ratio * adv - penalty,
            weight=1 - signed / width,
            outside=signed > width,
            extras={"penalty_mean": masked_mean(penalty.detach(), tokens.mask)},
        )

    def boundary_logp(self, anchor_logp: Tensor, advantages: Tensor) -> Tensor | None:
        low, high = self.epsilons
        edge = torch.where(advantages > 0, torch.full_like(anchor_logp, 1 + high),
                           torch.full_like(anchor_logp, 1 - low))
        bound = anchor_logp + edge.log()
        return torch.where((edge > 0) & (bound < 0), bound, torch.full_like(bound, math.nan))
