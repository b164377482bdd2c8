"""The collapse guard's signals, from one RL iteration's update records.

Over all masked tokens of all micro-batch updates, with r = π/μ the policy-to-behaviour ratio:

- ``kl``: the mismatch KL, k3 estimate, the mean of 1/r − 1 + log r (the same per-token drift
  measure as ``DriftMonitor``'s ``drift/behavior/kl_k3``);
- ``ess``: the effective-sample-size fraction (Σr)² / (N Σr²) ∈ (0, 1];
- ``entropy``: the mean policy entropy at the sampled positions.

They are computed from sums (:func:`signal_sums`) so that micro-batches and ranks combine by
adding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from trustregion.functional.drift import ess_fraction, kl_k3, ratio
from trustregion.functional.masked import masked_count, masked_sum
from trustregion.interface import UpdateRecord

__all__ = ["collapse_signals", "signal_sums", "signals_from_sums"]


def signal_sums(records: Sequence[UpdateRecord], device: torch.device | None = None) -> Tensor:
    """Sums over the masked tokens of ``records``, float32 ``[6]``:
    ``[N, Σ k3, Σ r, Σ r², N_entropy, Σ entropy]`` with r = π/μ and k3 = 1/r − 1 + log r.

    Sums (not means) so that ranks and micro-batches combine by adding.
    """
    total = torch.zeros(6, dtype=torch.float32, device=device)
    for record in records:
        batch = record.batch
        mask = batch.bool_mask()
        r = ratio(batch.logp, batch.behavior_logp)
        k3 = kl_k3(batch.logp, batch.behavior_logp)
        count = masked_count(mask)
        parts = [count, masked_sum(k3, mask), masked_sum(r, mask), masked_sum(r * r, mask)]
        if batch.entropy is not None:
            parts += [count, masked_sum(batch.entropy, mask)]
        else:
            parts += [count.new_zeros(()), count.new_zeros(())]
        total = total + torch.stack([p.float() for p in parts]).to(total.device)
    return total


def signals_from_sums(sums: Tensor) -> dict[str, float]:
    """``kl``, ``ess`` and ``entropy`` from :func:`signal_sums`; a signal without tokens is left
    out."""
    n, kl_sum, r_sum, r2_sum, n_entropy, entropy_sum = (float(v) for v in sums.tolist())
    signals: dict[str, float] = {}
    if n > 0:
        signals["kl"] = kl_sum / n
        signals["ess"] = float(ess_fraction(r_sum, r2_sum, n, empty=math.nan))
    if n_entropy > 0:
        signals["entropy"] = entropy_sum / n_entropy
    return signals


def collapse_signals(records: Sequence[UpdateRecord]) -> dict[str, float]:
    """The guard's signals for one iteration's update records (one process)."""
    return signals_from_sums(signal_sums(records))
