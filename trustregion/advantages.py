"""Group-relative advantage estimators.

Rewards are laid out group by group: ``rewards[g * G + i]`` is the reward of completion i of
prompt g, with G completions per prompt.

| name | Â_i |
|---|---|
| ``grpo`` | (R_i − mean_group R) / (std_group R + eps) (unbiased std, DeepSeekMath) |
| ``dr_grpo`` | R_i − mean_group R (no std division; Dr. GRPO, DRPO's recipe) |
| ``rloo`` | R_i − mean of the other G − 1 rewards (Ahmadian et al., arXiv:2402.14740) |

A group whose rewards are all equal gets Â = 0: it carries no learning signal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

from torch import Tensor

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AdvantageEstimator",
    "Advantages",
    "compute_advantages",
    "dr_grpo_advantages",
    "grpo_advantages",
    "rloo_advantages",
]

AdvantageEstimator = Literal["grpo", "dr_grpo", "rloo"]


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be one-dimensional [num_prompts * group_size]; "
                         f"got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group-relative advantages need group_size ≥ 2 completions per prompt; "
                         f"got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.float().view(-1, group_size)


def grpo_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """(R − mean) / (std + eps) within each group."""
    groups = _grouped(rewards, group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    return (centred / (groups.std(-1, keepdim=True) + eps)).reshape(-1)


def dr_grpo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """R − mean within each group."""
    groups = _grouped(rewards, group_size)
    return (groups - groups.mean(-1, keepdim=True)).reshape(-1)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """R_i − mean of the other G − 1 rewards of the group = G/(G − 1) · (R_i − mean)."""
    groups = _grouped(rewards, group_size)
    others = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


ADVANTAGE_ESTIMATORS: dict[str, Callable[[Tensor, int], Tensor]] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
}


@dataclass
class Advantages:
    """Per-completion advantages and the fraction of groups that carry no signal."""

    values: Tensor
    frac_reward_zero_std: Tensor


def compute_advantages(estimator: AdvantageEstimator, rewards: Tensor,
                       group_size: int) -> Advantages:
    """Advantages by the named estimator, plus ``frac_reward_zero_std``."""
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; "
                         f"allowed: {get_args(AdvantageEstimator)}")
    values = ADVANTAGE_ESTIMATORS[estimator](rewards, group_size)
    groups = _grouped(rewards, group_size)
    zero_std = (groups == groups[:, :1]).all(-1).float().mean()
    return Advantages(values=values, frac_reward_zero_std=zero_std)
