"""Strategy-independent terms added to any strategy's per-token loss (or to the rewards).

* :class:`ReferenceKL` — β · KL(π‖π_ref), estimated per token (k1, k2 or k3), in the loss; or,
  with ``in_reward=True``, β · Σ_t (log μ − log π_ref) subtracted from each sequence's reward.
* :class:`EntropyBonus` — −c · H(π(·|s_t)).

Each is a small :class:`Penalty` like a strategy: hyperparameters validated in ``__init__``, a
:class:`~trustregion.strategies.TokenBatch` in ``__call__``, a :class:`PenaltyOutput` out. A
penalty declares what the training loop must provide for it (:attr:`Penalty.needs_reference`,
:attr:`Penalty.needs_entropy_grad`), so the module never asks which penalty it holds. In a
config::

    model:
      penalties:
        - class_path: trustregion.penalties.ReferenceKL
          init_args: {beta: 0.04, estimator: k3}
        - class_path: trustregion.penalties.EntropyBonus
          init_args: {coef: 0.001}
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from trustregion.functional.divergences import KL_ESTIMATORS, kl_estimate
from trustregion.functional.masked import masked_mean
from trustregion.strategies.base import require
from trustregion.strategies.batch import TokenBatch

__all__ = ["EntropyBonus", "Penalty", "PenaltyOutput", "ReferenceKL"]


@dataclass
class PenaltyOutput:
    """Per-token loss to add (float32, zero where masked) and named scalar metrics."""

    token_loss: Tensor
    metrics: dict[str, Tensor]


class Penalty(abc.ABC):
    """A term added to every strategy's per-token loss, or subtracted from the rewards.

    Subclasses set the class attributes that say what the training loop must provide and
    implement :meth:`__call__` (and :meth:`reward_penalty` for a penalty ``in_reward``).
    """

    needs_reference: bool = False
    """The loop must compute the frozen reference model's log-probs (``TokenBatch.ref_logp``)."""
    needs_entropy_grad: bool = False
    """``TokenBatch.entropy`` must carry the policy's gradient."""
    in_reward: bool = False
    """Applied to the rewards before advantages (:meth:`reward_penalty`) instead of the loss."""

    @abc.abstractmethod
    def __call__(self, batch: TokenBatch) -> PenaltyOutput:
        """The per-token loss term and its metrics for ``batch``."""

    def reward_penalty(self, behavior_logp: Tensor, ref_logp: Tensor | None,
                       mask: Tensor) -> Tensor:
        """``[N]`` amounts subtracted from the sequences' rewards (only when ``in_reward``);
        ``ref_logp`` is given when :attr:`needs_reference`."""
        raise NotImplementedError(f"{type(self).__name__} is not applied to rewards")


class ReferenceKL(Penalty):
    """Penalise divergence from a frozen reference model: loss_t = β · k(x), x = log π_ref − log π.

    k1 = −x, k2 = x²/2, k3 = eˣ − x − 1 (GRPO: β = 0.04 with k3). DAPO, Dr. GRPO, DPPO and DRPO
    use none.

    With ``in_reward=True`` it is the InstructGPT form instead: each sequence's reward loses
    β · Σ_t (log μ − log π_ref) over its tokens (μ the behaviour policy that sampled them) before
    the advantages are computed, and nothing is added to the loss (``estimator`` is unused).

    Args:
        beta: the coefficient β ≥ 0.
        estimator: "k1", "k2" or "k3".
        in_reward: apply it to the rewards instead of the loss.
    """

    needs_reference = True

    def __init__(self, beta: float = 0.04, estimator: Literal["k1", "k2", "k3"] = "k3",
                 in_reward: bool = False) -> None:
        require(beta >= 0 and math.isfinite(beta),
                f"ReferenceKL beta must be a finite number ≥ 0; got {beta}")
        require(estimator in KL_ESTIMATORS,
                f"unknown KL estimator {estimator!r}; allowed: {KL_ESTIMATORS}")
        require(isinstance(in_reward, bool), f"in_reward must be true or false; got {in_reward!r}")
        self.beta = beta
        self.estimator = estimator
        self.in_reward = in_reward

    def reward_penalty(self, behavior_logp: Tensor, ref_logp: Tensor | None,
                       mask: Tensor) -> Tensor:
        if ref_logp is None:
            raise ValueError("ReferenceKL(in_reward=True) needs the reference log-probs")
        log_ratio = torch.where(mask, behavior_logp - ref_logp, 0.0)
        return self.beta * log_ratio.sum(-1)

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
        in_reward = ", in_reward=True" if self.in_reward else ""
        return f"ReferenceKL(beta={self.beta!r}, estimator={self.estimator!r}{in_reward})"


class EntropyBonus(Penalty):
    """Reward policy entropy: loss_t = −c · H(π(·|s_t)).

    Args:
        coef: c ≥ 0.
    """

    needs_entropy_grad = True

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
