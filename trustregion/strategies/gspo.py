"""GSPO: a sequence-level importance ratio, clipped per sequence."""

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

__all__ = ["GSPO"]


@register_strategy("gspo")
class GSPO(TrustRegionStrategy):
    """Clip the length-normalised sequence ratio s = exp(mean_t log(π/ν)) (GSPO).

    .. math::
        J_i = \\min(s_i Â,\\ \\mathrm{clip}(s_i, 1 − ε_{low}, 1 + ε_{high}) Â)

    Implemented in the per-token form s_{i,t} = sg(s_i) · π_t / sg(π_t), whose value is s_i and
    whose gradient is s_i · ∇log π_t, so that ``seq-mean-token-mean`` aggregation (the GSPO
    recipe) gives exactly ∇J_i. Gradient weight relative to the token's own ratio:
    w_t = s_i / r_t inside the region, 0 when the whole sequence is clipped.

    Args:
        epsilon: ε, the half-width of s on each side not set on its own (default 3e-4, the
            paper's lower value).
        epsilon_low: ε_low ∈ [0, 1), lower half-width of s (s > 0, so 1 − ε_low must be > 0
            for the lower clip to act); None (default) inherits ``epsilon``.
        epsilon_high: ε_high, upper half-width of s (default 4e-4); None inherits ``epsilon``.
        anchor: "behavior" or "old".

    Example:
        >>> strategy = GSPO()                     # s clipped to [1 − 3e-4, 1 + 4e-4]

    Reference: Zheng et al., "Group Sequence Policy Optimization", arXiv:2507.18071.
    """

    widths: ClassVar[Mapping[str, int]] = {"epsilon": 1, "epsilon_low": 1, "epsilon_high": 1}

    def __init__(self, epsilon: float = 3e-4, epsilon_low: float | None = None,
                 epsilon_high: float | None = 4e-4, anchor: Anchor = "behavior") -> None:
        super().__init__(anchor=anchor)
        check_width("epsilon", epsilon, meaning="the clip half-width of the sequence ratio s")
        check_width("epsilon_low", epsilon_low, inherits="epsilon", below=1.0,
                    meaning="lower half-width: the region starts at s = 1 − ε_low, and s > 0, "
                            "so ε_low ≥ 1 would never clip")
        check_inherited_width("epsilon", epsilon, "epsilon_low", epsilon_low, below=1.0,
                              meaning="the region starts at s = 1 − ε_low, and s > 0")
        check_width("epsilon_high", epsilon_high, inherits="epsilon",
                    meaning="upper half-width: the region ends at s = 1 + ε_high")
        self.epsilon = epsilon
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high

    @property
    def bounds(self) -> tuple[float, float]:
        """(1 − ε_low, 1 + ε_high) for s, each side inheriting ε unless set."""
        return (1.0 - resolve_side(self.epsilon, self.epsilon_low),
                1.0 + resolve_side(self.epsilon, self.epsilon_high))

    @staticmethod
    def sequence_ratio(tokens: AnchoredTokens) -> Tensor:
        """s_i broadcast to ``[batch, time]``, detached."""
        mask = tokens.mask.to(tokens.log_ratio.dtype)
        mean_log_ratio = (tokens.log_ratio.detach() * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return mean_log_ratio.exp()[:, None].expand_as(tokens.ratio)

    def terms(self, tokens: AnchoredTokens) -> StrategyTerms:
        low, high = self.bounds
        adv = tokens.advantages
        seq_ratio = self.sequence_ratio(tokens)
        token_seq_ratio = seq_ratio * torch.exp(tokens.logp - tokens.logp.detach())
        outside = ((adv > 0) & (seq_ratio > high)) | ((adv < 0) & (seq_ratio < low))
        objective = torch.where(outside, seq_ratio.clamp(min=low, max=high),
                                token_seq_ratio) * adv
        inside = (~outside).to(seq_ratio.dtype)
        return StrategyTerms(
            objective=objective,
            weight=inside * seq_ratio / tokens.ratio.detach(),
            outside=outside,
            extras={"sequence_ratio_mean": masked_mean(seq_ratio, tokens.mask)},
        )

    def limit_weight(self, tokens: AnchoredTokens) -> Tensor:
        return self.sequence_ratio(tokens) / tokens.ratio.detach()

    def boundary_logp(self, anchor_logp: Tensor, advantages: Tensor) -> Tensor | None:
        """For one-token sequences, where s = r."""
        low, high = self.bounds
        edge = torch.where(advantages > 0, torch.full_like(anchor_logp, high),
                           torch.full_like(anchor_logp, low))
        bound = anchor_logp + edge.log()
        return torch.where((edge > 0) & (bound < 0), bound, torch.full_like(bound, math.nan))
