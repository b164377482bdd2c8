"""Importance ratios and probability shifts between the policy and an anchor policy."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LOG_RATIO_CLAMP", "importance_ratio", "log_ratio", "prob_shift"]

LOG_RATIO_CLAMP = 20.0
"""log π − log ν is clamped to ±20 before exponentiating (r ∈ [2e-9, 4.9e8])."""


def log_ratio(logp: Tensor, anchor_logp: Tensor) -> Tensor:
    """clamp(log π − log ν, −20, 20), computed in float32 or wider."""
    dtype = torch.promote_types(torch.promote_types(logp.dtype, anchor_logp.dtype), torch.float32)
    return (logp.to(dtype) - anchor_logp.to(dtype)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def importance_ratio(logp: Tensor, anchor_logp: Tensor) -> Tensor:
    """r = π / ν = exp(clamp(log π − log ν, −20, 20))."""
    return log_ratio(logp, anchor_logp).exp()


def prob_shift(logp: Tensor, anchor_logp: Tensor) -> Tensor:
    """Δ = π − ν, as ν·expm1(log π − log ν): exact for small shifts where exp(a) − exp(b) is not."""
    lr = log_ratio(logp, anchor_logp)
    return anchor_logp.to(lr.dtype).exp() * torch.expm1(lr)
