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
from trustregion.strategies.widths import check_cap, check_width, resolve_side
from trustregion.validation import integer_at_least

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
        delta: δ, the half-width of each side not set on its own; None (default) inherits the
            divergence's default, 0.15 for TV and 0.05 for KL. A total variation is at most 1,
            so the TV divergences take δ in (0, 1) (inf: no bound); the KL ones any δ > 0.
        delta_low: δ_low, the half-width for Â < 0 tokens; None (default) inherits ``delta``.
        delta_high: δ_high, the half-width for Â > 0 tokens; None (default) inherits ``delta``.
        importance_weight_cap: C > 0, the cap on the importance weight min(r, C) that scales
            every kept token (truncated importance sampling). Default 10; inf: no cap.
        divergence_top_k: K, how many of the behaviour policy's most likely tokens the top-K
            divergences track per position (the sampled token is always added). Default 8.
            Not the sampler's ``top_k``, which truncates sampling.
        anchor: "behavior" (recommended: "anchoring on the rollout policy is crucial") or "old".

    Every half-width accepts inf (that side never drops a token).

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
        importance_weight_cap: float = 10.0,
        divergence_top_k: int = 8,
        anchor: Anchor = "behavior",
    ) -> None:
        super().__init__(anchor=anchor)
        require(divergence in DIVERGENCES,
                f"unknown divergence {divergence!r}; allowed: {DIVERGENCES}")
        meaning = f"the trust-region half-width of the {divergence} divergence"
        # a total variation never exceeds 1: a finite δ ≥ 1 would never drop a token
        below = 1.0 if divergence.endswith("_tv") else None
        if below is not None:
            meaning += ", which never exceeds 1"
        check_width("delta", delta, positive=True, meaning=meaning, below=below,
                    inherits=f"the divergence's default ({DEFAULT_DELTA[divergence]})")
        check_width("delta_low", delta_low, positive=True, inherits="delta", below=below,
                    meaning=meaning + ", for Â < 0 tokens")
        check_width("delta_high", delta_high, positive=True, inherits="delta", below=below,
                    meaning=meaning + ", for Â > 0 tokens")
        check_cap("importance_weight_cap", importance_weight_cap, minimum=0.0,
                  off="for no truncation", meaning="C in the importance weight min(r, C)")
        integer_at_least("divergence_top_k", divergence_top_k, 1,
                         note="tokens of the behaviour policy's top-K tracked per position")
        require(not (divergence.startswith("topk") and anchor != "behavior"),
                "top-K divergences are measured against the behaviour policy's top-K "
                "log-probs; use anchor='behavior'")
        self.divergence = divergence
        self.delta = DEFAULT_DELTA[divergence] if delta is None else delta
        self.delta_low = delta_low
        self.delta_high = delta_high
        self.importance_weight_cap = importance_weight_cap
        self.divergence_top_k = divergence_top_k

    @property
    def behavior_topk(self) -> int:
        return self.divergence_top_k if self.divergence.startswith("topk") else 0

    @property
    def deltas(self) -> tuple[float, float]:
        """(δ_low, δ_high), each inheriting δ unless set."""
        return resolve_side(self.delta, self.delta_low), resolve_side(self.delta, self.delta_high)

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
            return fn(*batch.topk_slots(self.divergence_top_k)).to(tokens.ratio.dtype)

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
        weight_ratio = ratio.clamp(max=self.importance_weight_cap)  # inf: no truncation
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
