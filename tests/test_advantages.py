from __future__ import annotations

import math

import pytest
import torch

from trustregion.advantages import compute_advantages

# Two groups of G = 3: (1, 0, 0) and (1, 1, 1).
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])


def test_grpo_by_hand() -> None:
    # group 1: mean 1/3, unbiased std sqrt(((2/3)² + 2(1/3)²)/2) = sqrt(1/3) = 0.57735
    adv = compute_advantages("grpo", REWARDS, 3).values
    std = math.sqrt(1 / 3)
    expected = [(2 / 3) / (std + 1e-6), (-1 / 3) / (std + 1e-6), (-1 / 3) / (std + 1e-6), 0, 0, 0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)


def test_dr_grpo_by_hand() -> None:
    adv = compute_advantages("dr_grpo", REWARDS, 3).values
    assert adv.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0, 0, 0])


def test_rloo_by_hand() -> None:
    # R_0 − mean(R_1, R_2) = 1 − 0 = 1; R_1 − mean(1, 0) = −0.5
    adv = compute_advantages("rloo", REWARDS, 3).values
    assert adv.tolist() == pytest.approx([1.0, -0.5, -0.5, 0, 0, 0])


def test_zero_std_fraction() -> None:
    assert compute_advantages("grpo", REWARDS, 3).frac_reward_zero_std.item() == 0.5


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="group_size ≥ 2"):
        compute_advantages("grpo", REWARDS, 1)
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        compute_advantages("grpo", REWARDS, 4)
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        compute_advantages("ppo", REWARDS, 3)  # type: ignore[arg-type]
