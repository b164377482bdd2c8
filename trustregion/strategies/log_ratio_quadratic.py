"""Log-ratio quadratic regulariser (DRO / Kimi-style, verl's ``dro`` loss mode)."""

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
from trustregion.strategies.widths import is_number

__all__ = ["LogRatioQuadratic"]


@register_strategy("dro")
class LogRatioQuadratic(TrustRegionStrategy):
    """Policy gradient with a quadratic penalty on the log-ratio.

    .. math::
        J_t = Â \\log π − \\frac{τ}{2} (\\log π − \\log ν)^2

    ∂J/∂log π = Â − τ log r, so the gradient weight relative to Â·r is
    w = (1 − τ log r / Â) / r: 0 where τ log r = Â and negative (a pull back toward ν) beyond.
    A token is outside the region when sign(Â) · log r > |Â| / τ. For Â = 0 only the pull
    remains, which the weight cannot express; w is reported as 1/r there. As τ → 0 this is plain
    on-policy REINFORCE (w = 1/r), not importance sampling.

    Args:
        penalty_strength: τ > 0, finite, the strength of the log-ratio penalty (default 1.0);
            smaller is a wider region. Called ``beta`` in some implementations of this loss;
            here ``beta`` is only the reference-KL coefficient
            (:class:`~trustregion.penalties.ReferenceKL`).
        anchor: "behavior" or "old".

    Example:
        >>> strategy = LogRatioQuadratic(penalty_strength=0.5)

    References: Kimi k1.5, arXiv:2501.12599 (§2.3 policy mirror descent, where τ is the
    regularisation strength); verl loss mode ``dro``.
    """

    widths: ClassVar[Mapping[str, int]] = {"penalty_strength": -1}

    def __init__(self, penalty_strength: float = 1.0, anchor: Anchor = "behavior") -> None:
        super().__init__(anchor=anchor)
        require(is_number(penalty_strength) and 0 < penalty_strength < math.inf,
                f"penalty_strength must be a finite number > 0 (τ, the strength of the "
                f"log-ratio penalty; smaller is a wider region); got {penalty_strength!r}")
        self.penalty_strength = penalty_strength

    def terms(self, tokens: AnchoredTokens) -> StrategyTerms:
        adv, log_ratio = tokens.advantages, tokens.log_ratio
        penalty = 0.5 * self.penalty_strength * log_ratio.square()
        lr = log_ratio.detach()
        ratio = tokens.ratio.detach()
        nonzero = adv != 0
        safe_adv = torch.where(nonzero, adv, torch.ones_like(adv))
        pull = torch.where(nonzero, self.penalty_strength * lr / safe_adv, torch.zeros_like(lr))
        return StrategyTerms(
            objective=adv * tokens.logp - penalty,
            weight=(1 - pull) / ratio,
            outside=nonzero & (adv.sign() * lr > adv.abs() / self.penalty_strength),
            extras={"penalty_mean": masked_mean(penalty.detach(), tokens.mask)},
        )

    def limit_weight(self, tokens: AnchoredTokens) -> Tensor:
        return 1 / tokens.ratio.detach()

    def boundary_logp(self, anchor_logp: Tensor, advantages: Tensor) -> Tensor | None:
        bound = anchor_logp + advantages / self.penalty_strength
        return torch.where(bound < 0, bound, torch.full_like(bound, math.nan))
