"""Replaying several processes' rollouts on one process.

Tests of multi-process training save the rollout each rank sampled, concatenate them in rank
order (:func:`concatenated`) and feed them to a :class:`ReplayModule` with the same initial
weights on one process: its logged values and updated weights must equal the ranks'.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from trustregion.module import TrustRegionModule
from trustregion.rollout import Rollout


def _pad(tensor: torch.Tensor, width: int, left: bool, value: float = 0) -> torch.Tensor:
    missing = width - tensor.shape[1]
    pad = tensor.new_full((tensor.shape[0], missing, *tensor.shape[2:]), value)
    return torch.cat([pad, tensor] if left else [tensor, pad], dim=1)


def concatenated(parts: Sequence[Rollout]) -> Rollout:
    """One sampled rollout from the ranks' rollouts: prompts re-padded on the left, completions
    on the right (padding is masked out, and positions count only unmasked tokens)."""
    prompt = max(p.prompt_ids.shape[1] for p in parts)
    completion = max(p.completion_ids.shape[1] for p in parts)
    return Rollout(
        prompt_ids=torch.cat([_pad(p.prompt_ids, prompt, left=True) for p in parts]),
        prompt_mask=torch.cat([_pad(p.prompt_mask, prompt, left=True) for p in parts]),
        completion_ids=torch.cat([_pad(p.completion_ids, completion, left=False)
                                  for p in parts]),
        completion_mask=torch.cat([_pad(p.completion_mask, completion, left=False)
                                   for p in parts]),
        behavior_logp=torch.cat([_pad(p.behavior_logp, completion, left=False)
                                 for p in parts]),
        examples=[e for p in parts for e in p.examples],
        completions=[c for p in parts for c in p.completions])


class ReplayModule(TrustRegionModule):
    """Samples nothing: each rollout batch returns the next of ``replays``, as though the
    behaviour model had sampled it; the prompts must be the batch's."""

    replays: list[Rollout]

    def sample(self, examples: Sequence[Any], encoded: Any = None) -> Rollout:
        replay = self.replays.pop(0)
        group = self.batching.group_size
        assert [e.prompt for e in examples] == [e.prompt for e in replay.examples[::group]]
        return replay
