"""Divergence masks (DPPO): a trust region on the sampled token's probability."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar, Literal, get_args

import torch
from torch import Tensor

from trustregion.functional.divergences import binary_kl, binary_tv, topk_kl, topk_tv
from trustregion.functional.masked import masked_max, masked_mean
from trustregion.strategies.base import (
    Anchor,
    AnchoredTokens,
    StrategyTerms,
    TrustRegionStrategy,
    require,
)
from trustregion.strategies.registry import register_strategy

__all__ = ["DivergenceMask"]

Divergence = Literal["binary_tv", "binary_kl", "topk_tv", "topk_kl"]
DIVERGENCES: tuple[str, ...] = get_args(Divergence)
DEFAULT_DELTA = {"binary_tv": 0.15, "binary_kl": 0.05, "topk_tv": 0.15, "topk_kl": 0.05}


@register_strategy("dppo")
class DivergenceMask(TrustRegionStrategy):
    """Drop tokens whose divergence from ν left the trust region in the harmful direction (DPPO).

    Loss (REINFORCE form): loss_t = −Â · sg(min(r, C)) · M_t · log π, with M_t ∈ {0, 1}:

    | divergence | drop when Â > 0 | drop when Â < 0 |
    |---|---|---|
    | binary_tv: D = π − ν | D > δ_high | D < −δ_low |
    | binary_kl: KL of {token, rest} | D > δ_high and π > ν | D > δ_low and π < ν |
    | topk_tv / topk_kl over ν's top-K + rest | D > δ_high and π > ν | D > δ_low and π < ν |

    Gradient weight: w = M_t · min(r, C) / r — 1 inside the region or moving back toward ν,
    0 once the token has left it in the harmful direction.

    Args:
        divergence: one of ``binary_tv``, ``binary_kl``, ``topk_tv``, ``topk_kl``. Top-K needs
            ``TokenBatch.topk_logp`` and ``topk_behavior_logp``.
        delta: half-width δ for both directions; default 0.15 for TV, 0.05 for KL.
        delta_low, delta_high: per-direction overrides of ``delta``.
        tis_cap: truncation cap C of the importance weight (None: no cap). Default 10.
        top_k: K, how many of the behaviour policy's most likely tokens the top-K divergences
            track per position (the sampled token is always added). Default 8.
        anchor: "behavior" (recommended: "anchoring on the rollout policy is crucial") or "old".

    Example:
        >>> strategy = DivergenceMask(divergence="binary_kl")   # δ = 0.05

    Reference: Qi et al., "Rethinking the Trust Region in LLM Reinforcement Learning",
    arXiv:2602.04879.
    """

    widths: ClassVar[Mapping[str, int]] = {"delta": 1, "delta_low": 1, "delta_high": 1}

    def __init__(
        self,
        divergence: Divergence = "binary_tv",
        delta: float | None = None,
        delta_low: float | None = None,
        delta_high: float | None = None,
        tis_cap: float | None = 10.0,
        top_k: int = 8,
        anchor: Anchor = "behavior",
    ) -> None:
        super().__init__(anchor=anchor)
        require(divergence in DIVERGENCES,
                f"unknown divergence {divergence!r}; allowed: {DIVERGENCES}")
        delta = DEFAULT_DELTA[divergence] if delta is None else delta
        for name, value in (("delta", delta), ("delta_low", delta_low),
                            ("delta_high", delta_high)):
            require(value is None or value > 0,
                    f"{name} must be > 0 (the trust-region half-width); got {value}")
        require(tis_cap is None or (tis_cap > 0 and not math.isnan(tis_cap)),
                f"tis_cap must be > 0 or None (no truncation); got {tis_cap}")
        require(isinstance(top_k, int) and top_k >= 1,
                f"top_k must be an integer ≥ 1 (tokens tracked per position); got {top_k}")
        require(not (divergence.startswith("topk") and anchor != "behavior"),
                "top-K divergences are measured against the behaviour policy's top-K "
                "log-probs; use anchor='behavior'")
        self.divergence = divergence
        self.delta = delta
        self.delta_low = delta_low
        self.delta_high = delta_high
        self.tis_cap = tis_cap
        self.top_k = top_k

    @property
    def behavior_topk(self) -> int:
        return self.top_k if self.divergence.startswith("topk") else 0

    @property
    def deltas(self) -> tuple[float, float]:
        """(δ_low, δ_high)."""
        low = self.delta if self.delta_low is None else self.delta_low
        high = self.delta if self.delta_high is None else self.delta_high
        return low, high

    def divergence_of(self, tokens: AnchoredTokens) -> Tensor:
        """D per token (signed π − ν for binary TV), without gradient."""
        with torch.no_grad():
            if self.divergence == "binary_tv":
                return binary_tv(tokens.prob, tokens.anchor_prob)
            if self.divergence == "binary_kl":
                return binary_kl(tokens.prob, tokens.anchor_prob)
            batch = tokens.batch
            if batch.topk_logp is None or batch.topk_behavior_logp is None:
                raise ValueError(
                    f"divergence={self.divergence!r} needs TokenBatch.topk_logp and "
                    "TokenBatch.topk_behavior_logp (log-probs of the behaviour policy's top-K "
                    "token ids plus the sampled id); pass them, or use a binary divergence"
                )
            fn = topk_tv if self.divergence == "topk_tv" else topk_kl
            return fn(*batch.topk_slots(self.top_k)).to(tokens.ratio.dtype)

    def terms(self, tokens: AnchoredTokens) -> StrategyTerms:
        low, high = self.deltas
        adv = tokens.advantages
        div = self.divergence_of(tokens)
        if self.divergence == "binary_tv":
            outside = ((adv > 0) & (div > high)) | ((adv < 0) & (div < -low))
        else:
            up = tokens.log_ratio > 0
            outside = ((adv > 0) & (div > high) & up) | ((adv < 0) & (div > low) & ~up)
        ratio = tokens.ratio.detach()
        weight_ratio = ratio if self.tis_cap is None else ratio.clamp(max=self.tis_cap)
        keep = (~outside).to(ratio.dtype)
        objective = adv * weight_ratio * keep * tokens.logp
        size = div.abs()
        return StrategyTerms(
            objective=objective,
            weight=keep * weight_ratio / ratio,
            outside=outside,
            extras={
                "divergence_mean": masked_mean(size, tokens.mask),
                "divergence_max": masked_max(size, tokens.mask),
            },
        )

    def boundary_logp(self, anchor_logp: Tensor, advantages: Tensor) -> Tensor | None:
        low, high = self.deltas
        anchor = anchor_logp.exp()
        nan = torch.full_like(anchor, math.nan)
        if self.divergence == "binary_tv":
            edge = torch.where(advantages > 0, anchor + high, anchor - low)
            return torch.where((edge > 0) & (edge < 1), edge.log(), nan)
        if self.divergence == "binary_kl":
            return _binary_kl_boundary(anchor, advantages, low, high).log()
        return None  # top-K divergences depend on the rest of the distribution


def _binary_kl_boundary(anchor: Tensor, advantages: Tensor, low: float, high: float) -> Tensor:
    """π where the binary KL from ν reaches δ, above ν for Â > 0 and below for Â < 0 (bisection;
    NaN where it is never reached inside (0, 1))."""
    up = advantages > 0
    delta = torch.where(up, torch.full_like(anchor, high), torch.full_like(anchor, low))
    inner = anchor.clone()
    outer = torch.where(up, torch.full_like(anchor, 1 - 1e-9), torch.full_like(anchor, 1e-9))
    reachable = binary_kl(outer, anchor) > delta
    for _ in range(80):
        middle = 0.5 * (inner + outer)
        beyond = binary_kl(middle, anchor) > delta
        outer = torch.where(beyond, middle, outer)
        inner = torch.where(beyond, inner, middle)
    return torch.where(reachable, 0.5 * (inner + outer), torch.full_like(anchor, math.nan))
