"""DRPO: divergence-regularised policy optimisation (smooth quadratic trust region)."""

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

__all__ = ["DRPO", "DRPOReference"]


@register_strategy("drpo")
class DRPO(TrustRegionStrategy):
    """Advantage-weighted quadratic penalty on the probability shift Δ = π − ν (DRPO).

    .. math::
        J_t = r Â − \\frac{|Â|}{2δ} ν (r − 1)^2 = r Â − \\frac{|Â| Δ^2}{2 δ ν}

    r is neither detached nor truncated. Gradient weight (by autograd):

        w = 1 − sign(Â) · (π − ν) / δ

    so w falls from 1 as the token moves away from ν in the harmful direction, is exactly 0 at
    DPPO's boundary |π − ν| = δ and negative beyond it (a corrective pull back); moving toward ν,
    w > 1. w ∈ [1 − 1/δ, 1 + 1/δ] for every ν, unlike SPO. In expectation over y ~ ν the penalty
    is the squared ℓ2 distance Σ_y (π − ν)².

    δ is the trust-region half-width in probability units, the same meaning as DPPO's δ, so
    ``drpo`` and ``dppo`` (binary TV) share their boundary. The asymmetric form uses δ_high when
    π ≥ ν and δ_low when π < ν (penalty and slope are 0 at π = ν, so w stays continuous).

    Args:
        delta: δ > 0, the half-width of each side not set on its own (default 0.15).
        delta_low: δ_low, used when π < ν; None (default) inherits ``delta``.
        delta_high: δ_high, used when π ≥ ν; None (default) inherits ``delta``.
        anchor: "behavior" (the reference recipe, frozen for all mini-batch updates of a rollout
            batch) or "old".

    Example:
        >>> strategy = DRPO(delta=0.15)

    Reference: Yao, Zhou, Qi, Lee, Bo, Pang, "Rethinking the Divergence Regularization in LLM RL",
    arXiv:2606.09821. The reference recipe uses group mean-centred advantages without std
    division, ``seq-mean-token-sum-norm`` aggregation, no reference KL and no entropy bonus.
    """

    widths: ClassVar[Mapping[str, int]] = {"delta": 1, "delta_low": 1, "delta_high": 1}

    def __init__(
        self,
        delta: float = 0.15,
        delta_low: float | None = None,
        delta_high: float | None = None,
        anchor: Anchor = "behavior",
    ) -> None:
        super().__init__(anchor=anchor)
        meaning = ("the trust-region half-width in probability units, where the gradient "
                   "weight reaches 0")
        check_width("delta", delta, positive=True, meaning=meaning)
        check_width("delta_low", delta_low, positive=True, inherits="delta",
                    meaning=meaning + ", used when π < ν")
        check_width("delta_high", delta_high, positive=True, inherits="delta",
                    meaning=meaning + ", used when π ≥ ν")
        self.delta = delta
        self.delta_low = delta_low
        self.delta_high = delta_high

    @property
    def deltas(self) -> tuple[float, float]:
        """(δ_low, δ_high), each inheriting δ unless set."""
        return resolve_side(self.delta, self.delta_low), resolve_side(self.delta, self.delta_high)

    def terms(self, tokens: AnchoredTokens) -> StrategyTerms:
        low, high = self.deltas
        adv, anchor = tokens.advantages, tokens.anchor_prob
        shift = tokens.prob_shift()
        width = torch.where(shift.detach() >= 0, torch.full_like(anchor, high),
                            torch.full_like(anchor, low))
        penalty = adv.abs() * anchor * torch.expm1(tokens.log_ratio).square() / (2 * width)
        signed_shift = adv.sign() * shift.detach()
        return StrategyTerms(
            objective=tokens.ratio * adv - penalty,
            weight=1 - signed_shift / width,
            outside=signed_shift > width,
            extras={"penalty_mean": masked_mean(penalty.detach(), tokens.mask)},
        )

    def boundary_logp(self, anchor_logp: Tensor, advantages: Tensor) -> Tensor | None:
        low, high = self.deltas
        anchor = anchor_logp.exp()
        edge = torch.where(advantages > 0, anchor + high, anchor - low)
        return torch.where((edge > 0) & (edge < 1), edge.log(), torch.full_like(edge, math.nan))


@register_strategy("drpo_reference")
class DRPOReference(DRPO):
    """DRPO with the published reference setting δ = 12.5, for comparison.

    The authors' open implementation uses a "regularization threshold" of 12.5 in the place of δ.
    Read as a half-width in probability units this gives w ∈ [0.92, 1.08]: the boundary can never
    be reached and the penalty acts as a gentle, always-on pull toward ν. Use ``drpo`` (δ = 0.15)
    for a trust region that shares DPPO's boundary.
    """

    def __init__(
        self,
        delta: float = 12.5,
        delta_low: float | None = None,
        delta_high: float | None = None,
        anchor: Anchor = "behavior",
    ) -> None:
        super().__init__(delta=delta, delta_low=delta_low, delta_high=delta_high, anchor=anchor)
