"""Strategy-independent terms added to any strategy's per-token loss.

* :class:`ReferenceKL` — β · KL(π‖π_ref), estimated per token (k1, k2 or k3).
* :class:`EntropyBonus` — −c · H(π(·|s_t)).

Each is a small object like a strategy: hyperparameters validated in ``__init__``, a
:class:`~trustregion.strategies.TokenBatch` in ``__call__``, a :class:`PenaltyOutput` out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from trustregion.functional.divergences import KL_ESTIMATORS, kl_estimate
from trustregion.functional.masked import masked_mean
from trustregion.strategies.base import require
from trustregion.strategies.batch import TokenBatch

__all__ = ["EntropyBonus", "PenaltyOutput", "ReferenceKL"]


@dataclass
class PenaltyOutput:
    """Per-token loss to add (float32, zero where masked) and named scalar metrics."""

    token_loss: Tensor
    metrics: dict[str, Tensor]


class ReferenceKL:
    """Penalise divergence from a frozen reference model: loss_t = β · k(x), x = log π_ref − log π.

    k1 = −x, k2 = x²/2, k3 = eˣ − x − 1 (GRPO: β = 0.04 with k3). DAPO, Dr. GRPO, DPPO and DRPO
    use none.

    Args:
        beta: the coefficient β ≥ 0 (``TrustRegionModule``'s ``kl_coef``).
        estimator: "k1", "k2" or "k3".
    """

    def __init__(self, beta: float = 0.04, estimator: Literal["k1", "k2", "k3"] = "k3") -> None:
        require(beta >= 0 and math.isfinite(beta),
                f"ReferenceKL beta must be a finite number ≥ 0; got {beta}")
        require(estimator in KL_ESTIMATORS,
                f"unknown KL estimator {estimator!r}; allowed: {KL_ESTIMATORS}")
        self.beta = beta
        self.estimator = estimator

    def __call__(self, batch: TokenBatch) -> PenaltyOutput:
        if batch.ref_logp is None:
            raise ValueError("ReferenceKL needs TokenBatch.ref_logp (log-probs of the frozen "
                             "reference model); configure a reference model or drop the penalty")
        mask = batch.bool_mask()
        zero = torch.zeros((), device=mask.device)
        logp = torch.where(mask, batch.logp.float(), zero)
        ref = torch.where(mask, batch.ref_logp.detach().float(), zero)
        kl = kl_estimate(logp, ref, self.estimator)
        return PenaltyOutput(
            token_loss=torch.where(mask, self.beta * kl, zero),
            metrics={"penalty/ref_kl": masked_mean(kl.detach(), mask)},
        )

    def __repr__(self) -> str:
        return f"ReferenceKL(beta={self.beta!r}, estimator={self.estimator!r})"


class EntropyBonus:
    """Reward policy entropy: loss_t = −c · H(π(·|s_t)).

    Args:
        coef: c ≥ 0.
    """

    def __init__(self, coef: float = 0.001) -> None:
        require(coef >= 0 and math.isfinite(coef),
                f"EntropyBonus coef must be a finite number ≥ 0; got {coef}")
        self.coef = coef

    def __call__(self, batch: TokenBatch) -> PenaltyOutput:
        if batch.entropy is None:
            raise ValueError("EntropyBonus needs TokenBatch.entropy (the policy's entropy at each "
                             "response position)")
        mask = batch.bool_mask()
        zero = torch.zeros((), device=mask.device)
        entropy = torch.where(mask, batch.entropy.float(), zero)
        return PenaltyOutput(
            token_loss=torch.where(mask, -self.coef * entropy, zero),
            metrics={"penalty/entropy": masked_mean(entropy.detach(), mask)},
        )

    def __repr__(self) -> str:
        return f"EntropyBonus(coef={self.coef!r})"
