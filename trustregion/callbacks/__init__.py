"""Lightning callbacks that watch an RL run."""

from trustregion.callbacks.reward_summary import RewardSummary

__all__ = ["RewardSummary"]
