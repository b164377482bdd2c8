"""RewardSummary compares the first and last windows of a run, and says when a run is too short
for two windows."""

from __future__ import annotations

import pytest

from trustregion.callbacks import RewardSummary
from trustregion.callbacks.reward_summary import RewardComparison


def _summary(window: int, rewards: list[float]) -> RewardSummary:
    summary = RewardSummary(window=window)
    summary.rewards = list(rewards)
    return summary


def test_a_long_run_compares_its_first_and_last_windows() -> None:
    # first 2: (0.1 + 0.3) / 2 = 0.2; last 2: (0.5 + 0.9) / 2 = 0.7
    result = _summary(2, [0.1, 0.3, 0.4, 0.5, 0.9]).summary()
    assert result == RewardComparison(first=pytest.approx(0.2), last=pytest.approx(0.7),
                                      window=2, batches=5, requested=2)
    assert not result.shortened
    assert result.message() == ("mean reward: 0.200 over the first 2 rollout batches → 0.700 "
                                "over the last 2 (5 batches)")


def test_a_short_run_says_so_and_compares_its_halves() -> None:
    # 5 batches < 2 × 40: halves of ⌊5 / 2⌋ = 2; first (0.1 + 0.3) / 2 = 0.2,
    # last (0.5 + 0.9) / 2 = 0.7; the middle batch is in neither
    result = _summary(40, [0.1, 0.3, 0.4, 0.5, 0.9]).summary()
    assert result is not None and result.window == 2 and result.shortened
    assert (result.first, result.last) == (pytest.approx(0.2), pytest.approx(0.7))
    assert result.message() == (
        "mean reward: 0.200 over the first 2 rollout batches → 0.700 over the last 2\n"
        "(5 rollout batches: too few for two windows of 40, so the halves are compared)")


def test_a_run_of_one_batch_reports_its_reward_without_a_comparison() -> None:
    result = _summary(3, [0.25]).summary()
    assert result is not None and result.window == 0
    assert result.message() == ("mean reward: 0.250 over the only rollout batch\n"
                                "(1 rollout batch: too few for two windows of 3)")


def test_a_run_of_three_batches_compares_one_with_one() -> None:
    result = _summary(2, [0.2, 0.9, 0.4]).summary()  # ⌊3 / 2⌋ = 1 batch at each end
    assert result is not None and (result.first, result.last, result.window) == (0.2, 0.4, 1)
    assert result.message() == ("mean reward: 0.200 over the first 1 rollout batch → 0.400 over "
                                "the last 1\n(3 rollout batches: too few for two windows of 2, "
                                "so the halves are compared)")


def test_no_rollout_no_summary_and_the_window_is_checked() -> None:
    assert RewardSummary(window=4).summary() is None
    with pytest.raises(ValueError, match=r"window must be an integer ≥ 1 \(rollout batches\); "
                                         r"got 0"):
        RewardSummary(window=0)
