"""Importance-sampled policy gradient with no trust region: the baseline."""

from __future__ import annotations

import torch

from trustregion.strategies.base import AnchoredTokens, StrategyTerms, TrustRegionStrategy
from trustregion.strategies.registry import register_strategy

__all__ = ["ImportanceSampledPG"]


@register_strategy("pg_is")
class ImportanceSampledPG(TrustRegionStrategy):
    """Plain importance-sampled policy gradient: J_t = r Â, w = 1 everywhere.

    No trust region at all — the baseline that drifts and collapses under training/inference
    mismatch, and the limit every other strategy reaches as its width grows.

    Args:
        anchor: "behavior" or "old".

    Example:
        >>> strategy = ImportanceSampledPG()
    """

    def terms(self, tokens: AnchoredTokens) -> StrategyTerms:
        return StrategyTerms(
            objective=tokens.ratio * tokens.advantages,
            weight=torch.ones_like(tokens.ratio),
            outside=torch.zeros_like(tokens.mask),
        )
