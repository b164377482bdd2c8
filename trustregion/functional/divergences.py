"""Divergences between the policy π and an anchor ν, per token.

Binary divergences compare the two-point distributions {sampled token, everything else};
top-K divergences compare the anchor's top-K tokens plus one bucket for the rest of the
vocabulary. KL estimators k1/k2/k3 estimate KL(π‖π_ref) from the sampled token only.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from trustregion.functional.ratios import LOG_RATIO_CLAMP

__all__ = [
    "KL_ESTIMATORS",
    "binary_kl",
    "binary_tv",
    "kl_estimate",
    "topk_kl",
    "topk_tv",
]

_TINY = 1e-12
KL_ESTIMATORS = ("k1", "k2", "k3")


def binary_tv(prob: Tensor, anchor_prob: Tensor) -> Tensor:
    """D_TV = π − ν (signed): the total-variation distance of the binary distributions, with the
    sign of the shift."""
    return prob - anchor_prob


def binary_kl(prob: Tensor, anchor_prob: Tensor) -> Tensor:
    """D = ν log(ν/π) + (1 − ν) log((1 − ν)/(1 − π)), the KL(ν‖π) of the binary distributions."""
    p = prob.clamp(_TINY, 1 - 1e-7)
    q = anchor_prob.clamp(_TINY, 1 - 1e-7)
    return q * (q.log() - p.log()) + (1 - q) * (torch.log1p(-q) - torch.log1p(-p))


def _topk_parts(topk_logp: Tensor, topk_anchor_logp: Tensor) -> tuple[Tensor, ...]:
    """Probabilities of the K tracked tokens and of the rest bucket, for π and ν."""
    p_k = topk_logp.float().exp()
    q_k = topk_anchor_logp.float().exp()
    p_rest = (1 - p_k.sum(-1)).clamp(min=_TINY)
    q_rest = (1 - q_k.sum(-1)).clamp(min=_TINY)
    return p_k, q_k, p_rest, q_rest


def topk_tv(topk_logp: Tensor, topk_anchor_logp: Tensor) -> Tensor:
    """½ (Σ_k |ν_k − π_k| + |ν_rest − π_rest|). Unused slots hold −inf (probability 0)."""
    p_k, q_k, p_rest, q_rest = _topk_parts(topk_logp, topk_anchor_logp)
    return 0.5 * ((q_k - p_k).abs().sum(-1) + (q_rest - p_rest).abs())


def topk_kl(topk_logp: Tensor, topk_anchor_logp: Tensor) -> Tensor:
    """Σ_k ν_k log(ν_k/π_k) + ν_rest log(ν_rest/π_rest). Unused slots hold −inf (ν_k = 0)."""
    _, q_k, p_rest, q_rest = _topk_parts(topk_logp, topk_anchor_logp)
    log_q = topk_anchor_logp.float()
    log_p = topk_logp.float().clamp(min=-1e4)
    used = q_k > 0
    terms = torch.where(used, q_k * (log_q.clamp(min=-1e4) - log_p), torch.zeros_like(q_k))
    return terms.sum(-1) + q_rest * (q_rest.log() - p_rest.log())


def kl_estimate(logp: Tensor, ref_logp: Tensor,
                estimator: Literal["k1", "k2", "k3"] = "k3") -> Tensor:
    """Per-token estimate of KL(π‖π_ref) from samples of π, with x = log π_ref − log π.

    k1 = −x (unbiased, high variance), k2 = x²/2, k3 = eˣ − x − 1 (unbiased, ≥ 0).
    x is clamped to ±20.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; allowed: {KL_ESTIMATORS}")
    dtype = torch.promote_types(logp.dtype, torch.float32)
    x = (ref_logp.to(dtype) - logp.to(dtype)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if estimator == "k1":
        return -x
    if estimator == "k2":
        return 0.5 * x * x
    return torch.expm1(x) - x
