"""Drift of the policy π from an anchor policy ν: one pure function per statistic.

Per token, from the log-probabilities of the sampled token under π (``logp``) and ν
(``anchor_logp``), with the log-ratio clamped to ±20 (:data:`LOG_RATIO_CLAMP`)::

    log r = clamp(log π − log ν, −20, 20)        r = π / ν          x = −log r = log ν − log π
    k1 = log r            k2 = x² / 2            k3 = eˣ − x − 1 = 1/r − 1 + log r  (≥ 0)
    Δ  = π − ν = ν · expm1(log r)                tv = |Δ|

Over N tokens, from sums (so micro-batches and ranks combine by adding their sums)::

    ESS fraction = (Σr)² / (N Σr²)  ∈ (0, 1]        χ² = E[(r − 1)²] = Σ(r − 1)² / N  (≥ 0)

χ²(π‖ν) = E_ν[(r − 1)²] = E_ν[r²] − 1 when E_ν[r] = 1. Both forms are unbiased on tokens sampled
from ν, but Σr² / N − 1 carries the noise of 2(mean r − 1), which exceeds the divergence itself
when π ≈ ν and makes the estimate negative; Σ(r − 1)² / N is never negative.

Per-token functions compute in float32, or wider when an input is wider (float64 stays
float64), so bfloat16 and float16 log-probs are upcast before any arithmetic. Reductions from
sums compute in the sums' dtype, at least float32. :class:`trustregion.metrics.PairDrift` keeps
float64 sums of r − 1 (:func:`ratio_excess`) instead of r, so that χ² and the ESS stay accurate
when π and ν are close (r ≈ 1); :func:`chi2_from_excess` and :func:`ess_fraction_from_excess`
take those sums.

Example:
    >>> logp = torch.log(torch.tensor([0.5])); nu = torch.log(torch.tensor([0.25]))
    >>> round(float(kl_k1(logp, nu)), 6), round(float(kl_k3(logp, nu)), 6)  # ln 2, ln 2 − ½
    (0.693147, 0.193147)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "LOG_RATIO_CLAMP",
    "chi2",
    "chi2_from_excess",
    "ess_fraction",
    "ess_fraction_from_excess",
    "importance_ratio",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "log_ratio",
    "prob_shift",
    "ratio",
    "ratio_excess",
    "tv",
]

LOG_RATIO_CLAMP = 20.0
"""log π − log ν is clamped to ±20 before exponentiating (r ∈ [2e-9, 4.9e8])."""


def _wide(*tensors: Tensor) -> torch.dtype:
    """float32, or the widest floating dtype among ``tensors`` if wider."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


# ------------------------------------------------------------------------------- per token
def log_ratio(logp: Tensor, anchor_logp: Tensor) -> Tensor:
    """log r = clamp(log π − log ν, −20, 20), computed in float32 or wider.

    Example:
        >>> float(log_ratio(torch.tensor([0.0]), torch.tensor([-100.0])))
        20.0
    """
    dtype = _wide(logp, anchor_logp)
    return (logp.to(dtype) - anchor_logp.to(dtype)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def ratio(logp: Tensor, anchor_logp: Tensor) -> Tensor:
    """Importance ratio r = π / ν = exp(clamp(log π − log ν, −20, 20)).

    Example:
        >>> float(ratio(torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))))
        2.0
    """
    return log_ratio(logp, anchor_logp).exp()


importance_ratio = ratio
"""Alias of :func:`ratio` (the name the strategies use)."""


def ratio_excess(logp: Tensor, anchor_logp: Tensor) -> Tensor:
    """r − 1 = expm1(clamp(log π − log ν, −20, 20)): exact near r = 1, where ``ratio(...) − 1``
    keeps only the digits of r that lie above 1."""
    return torch.expm1(log_ratio(logp, anchor_logp))


def prob_shift(logp: Tensor, anchor_logp: Tensor) -> Tensor:
    """Δ = π − ν, as ν · expm1(log π − log ν) (log-ratio clamped to ±20): exact for small shifts,
    where exp(log π) − exp(log ν) loses the digits the two probabilities share.

    Example (π = 0.5, ν = 0.25: Δ = 0.25 · (2 − 1)):
        >>> float(prob_shift(torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))))
        0.25
    """
    excess = ratio_excess(logp, anchor_logp)
    return anchor_logp.to(excess.dtype).exp() * excess


def tv(logp: Tensor, anchor_logp: Tensor) -> Tensor:
    """|π − ν| = |Δ|, the total variation between the binary distributions {sampled token,
    everything else} under π and ν (see :func:`prob_shift`)."""
    return prob_shift(logp, anchor_logp).abs()


def kl_k1(logp: Tensor, anchor_logp: Tensor) -> Tensor:
    """k1 = log π − log ν = log r (clamped to ±20): unbiased for KL(π‖ν) on tokens sampled from
    π, high variance, can be negative.

    Example (π = 0.5, ν = 0.25: k1 = ln 2):
        >>> round(float(kl_k1(torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25])))), 6)
        0.693147
    """
    return log_ratio(logp, anchor_logp)


def kl_k2(logp: Tensor, anchor_logp: Tensor) -> Tensor:
    """k2 = x² / 2 with x = log ν − log π (clamped to ±20): biased, low variance, ≥ 0."""
    x = log_ratio(logp, anchor_logp)
    return 0.5 * x * x


def kl_k3(logp: Tensor, anchor_logp: Tensor) -> Tensor:
    """k3 = eˣ − x − 1 = 1/r − 1 + log r with x = log ν − log π clamped to ±20: unbiased for
    KL(π‖ν) on tokens sampled from π and ≥ 0 (Schulman's estimator), computed as expm1(x) − x.

    Example (π = 0.5, ν = 0.25: x = −ln 2, k3 = 0.5 + ln 2 − 1 = ln 2 − 0.5):
        >>> round(float(kl_k3(torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25])))), 6)
        0.193147
    """
    x = -log_ratio(logp, anchor_logp)
    return torch.expm1(x) - x


# ------------------------------------------------------------------------------ from sums
def _as_sums(*values: Tensor | float) -> list[Tensor]:
    tensors = [torch.as_tensor(value) for value in values]
    dtype = _wide(*tensors)
    device = next((t.device for t in tensors if t.device.type != "cpu"), tensors[0].device)
    return [t.to(device=device, dtype=dtype) for t in tensors]


def ess_fraction(ratio_sum: Tensor | float, ratio_sq_sum: Tensor | float,
                 count: Tensor | float, *, empty: float = 0.0) -> Tensor:
    """Effective sample size of the ratios as a fraction of their number:
    ESS / N = (Σr)² / (N Σr²), in (0, 1] (1 when every r is equal).

    Args:
        ratio_sum: Σr over the tokens.
        ratio_sq_sum: Σr² over the same tokens.
        count: N, the number of tokens.
        empty: the value where there is nothing to measure, i.e. ``count == 0`` or
            ``Σr² == 0`` (0 by default; pass ``float("nan")`` to mark "no signal"). Never a NaN
            from 0/0.

    Sums from several micro-batches or ranks combine by adding them first. Computed in the
    sums' dtype, at least float32.

    Example (r = 1, 3: (1 + 3)² / (2 · (1 + 9)) = 16 / 20):
        >>> round(float(ess_fraction(torch.tensor(4.0), torch.tensor(10.0), torch.tensor(2.0))), 6)
        0.8
    """
    s1, s2, n = _as_sums(ratio_sum, ratio_sq_sum, count)
    seen = (n > 0) & (s2 > 0)
    tiny = torch.finfo(s2.dtype).tiny
    value = s1.square() / (n.clamp(min=1) * s2.clamp(min=tiny))
    return torch.where(seen, value, torch.full_like(value, empty))


def ess_fraction_from_excess(excess_sum: Tensor | float, excess_sq_sum: Tensor | float,
                             count: Tensor | float, *, empty: float = 0.0) -> Tensor:
    """:func:`ess_fraction` from the sums of r − 1 (see :func:`ratio_excess`):
    Σr = N + Σ(r − 1), Σr² = N + 2 Σ(r − 1) + Σ(r − 1)². ``empty`` as there."""
    s1, s2, n = _as_sums(excess_sum, excess_sq_sum, count)
    return ess_fraction(n + s1, n + 2 * s1 + s2, n, empty=empty)


def chi2(ratio_sum: Tensor | float, ratio_sq_sum: Tensor | float,
         count: Tensor | float) -> Tensor:
    """χ² divergence estimate E[(r − 1)²] = (Σr² − 2 Σr + N) / N (≥ 0; 0 for r ≡ 1); 0 when
    N = 0. Rounding below 0 is clamped.

    Example (r = 1, 3: ((1 − 1)² + (3 − 1)²) / 2 = (10 − 8 + 2) / 2):
        >>> float(chi2(torch.tensor(4.0), torch.tensor(10.0), torch.tensor(2.0)))
        2.0
    """
    s1, s2, n = _as_sums(ratio_sum, ratio_sq_sum, count)
    return torch.where(n > 0, ((s2 - 2 * s1 + n) / n.clamp(min=1)).clamp(min=0),
                       torch.zeros_like(s2))


def chi2_from_excess(excess_sq_sum: Tensor | float, count: Tensor | float) -> Tensor:
    """:func:`chi2` from the sum of (r − 1)² (see :func:`ratio_excess`): Σ(r − 1)² / N, without
    the cancellation of Σr² − 2 Σr + N when r ≈ 1; 0 when N = 0.

    Example (r = 1, 3: r − 1 = 0, 2; (0 + 4) / 2):
        >>> float(chi2_from_excess(torch.tensor(4.0), torch.tensor(2.0)))
        2.0
    """
    s2, n = _as_sums(excess_sq_sum, count)
    return s2 / n.clamp(min=1)
