"""Symmetric log-ratio clipping, a trust-region strategy shipped as a trustregion plug-in."""

from trustregion_log_clip.log_clip import LogRatioClip

__all__ = ["LogRatioClip"]
