"""Lightning callbacks that watch an RL run."""

from trustregion.callbacks._windowed import WindowedMonitor
from trustregion.callbacks.checkpoint import RolloutCheckpoint
from trustregion.callbacks.collapse_guard import CollapseGuard, TrainingCollapsed
from trustregion.callbacks.completion_writer import CompletionWriter
from trustregion.callbacks.controller import TrustRegionController
from trustregion.callbacks.drift_monitor import DriftMonitor
from trustregion.callbacks.drift_plots import DriftPlots
from trustregion.callbacks.progress import RolloutProgressBar
from trustregion.callbacks.reward_summary import RewardSummary
from trustregion.callbacks.shadow import ShadowStrategies

__all__ = [
    "CollapseGuard",
    "CompletionWriter",
    "DriftMonitor",
    "DriftPlots",
    "RewardSummary",
    "RolloutCheckpoint",
    "RolloutProgressBar",
    "ShadowStrategies",
    "TrainingCollapsed",
    "TrustRegionController",
    "WindowedMonitor",
]
