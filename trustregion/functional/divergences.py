"""Divergences between the policy π and an anchor ν, per token.

Binary divergences compare the two-point distributions {sampled token, everything else};
top-K divergences compare the anchor's top-K tokens plus one bucket for the rest of the
vocabulary. KL estimators k1/k2/k3 estimate KL(π‖π_ref) from the sampled token only.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from trustregion.functional.drift import kl_k1, kl_k2, kl_k3

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
_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def binary_tv(prob: Tensor, anchor_prob: Tensor) -> Tensor:
    """D_TV = π − ν (signed): the total-variation distance of the binary distributions, with the
    sign of the shift."""
    return prob - anchor_prob


def binary_kl(prob: Tensor, anchor_prob: Tensor) -> Tensor:
    """D = ν log(ν/π) + (1 − ν) log((1 − ν)/(1 − π)), the KL(ν‖π) of the binary distributions."""
    p = prob.clamp(_TINY, 1 - 1e-7)
    q = anchor_prob.clamp(_TINY, 1 - 1e-7)
    return q * (q.log() - p.log()) + (1 - q) * (torch.log1p(-q) - torch.log1p(-p))


def _rest(slot_probs: Tensor) -> Tensor:
    """Probability of the bucket of untracked tokens: 1 − Σ_k p_k, at least a tiny positive."""
    return (1 - slot_probs.sum(-1)).clamp_(min=_TINY)


def topk_tv(topk_logp: Tensor, topk_anchor_logp: Tensor) -> Tensor:
    """½ (Σ_k |ν_k − π_k| + |ν_rest − π_rest|). Unused slots hold −inf (probability 0)."""
    # In place on fresh tensors: a [B, T, K] intermediate costs more than the arithmetic.
    p_k = topk_logp.float().exp()
    q_k = topk_anchor_logp.float().exp()
    rest_gap = (_rest(q_k) - _rest(p_k)).abs_()
    return (q_k.sub_(p_k).abs_().sum(-1) + rest_gap).mul_(0.5)


def topk_kl(topk_logp: Tensor, topk_anchor_logp: Tensor) -> Tensor:
    """Σ_k ν_k log(ν_k/π_k) + ν_rest log(ν_rest/π_rest). Unused slots hold −inf (ν_k = 0)."""
    q_k = topk_anchor_logp.float().exp()
    p_rest, q_rest = _rest(topk_logp.float().exp()), _rest(q_k)
    # Log-probs clamped to −1e4: an unused slot (both −inf, ν_k = 0) adds 0 · 0, and a slot π
    # gives probability 0 adds a large finite ν_k · (log ν_k + 1e4) instead of inf.
    log_ratio = topk_anchor_logp.float().clamp(min=-1e4).sub_(topk_logp.float().clamp(min=-1e4))
    return log_ratio.mul_(q_k).sum(-1) + q_rest * (q_rest.log() - p_rest.log())


def kl_estimate(logp: Tensor, ref_logp: Tensor,
                estimator: Literal["k1", "k2", "k3"] = "k3") -> Tensor:
    """Per-token estimate of KL(π‖π_ref) from samples of π, with x = log π_ref − log π.

    k1 = −x (unbiased, high variance), k2 = x²/2, k3 = eˣ − x − 1 (unbiased, ≥ 0).
    x is clamped to ±20. Dispatches to :func:`~trustregion.functional.drift.kl_k1`,
    :func:`~trustregion.functional.drift.kl_k2` or :func:`~trustregion.functional.drift.kl_k3`.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; allowed: {KL_ESTIMATORS}")
    return _ESTIMATORS[estimator](logp, ref_logp)
