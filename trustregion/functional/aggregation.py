"""Reduce per-token losses to the scalar an optimiser step minimises.

Every mode divides by counts taken over the **whole optimiser step** (all micro-batches and all
ranks). Pass those counts in (see :func:`step_counts`) and the sum of the micro-batch losses
equals the loss of the full batch, so splitting a step changes nothing. Without them the counts
of the given batch are used (correct when the batch is the whole step).

| mode | value |
|---|---|
| ``token-mean`` | Σ L·m / N_tokens |
| ``seq-mean-token-mean`` | Σ_seq (Σ_t L·m / Σ_t m) / N_seqs |
| ``seq-mean-token-sum`` | Σ_seq Σ_t L·m / N_seqs |
| ``seq-mean-token-sum-norm`` | Σ_seq Σ_t L·m / (N_seqs · H), H a fixed horizon (Dr. GRPO) |

N_seqs counts sequences with at least one unmasked token. Empty counts are clamped to 1, so an
all-zero mask gives a loss of exactly 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

__all__ = ["AGGREGATION_MODES", "AggregationMode", "StepCounts", "aggregate", "step_counts"]

AggregationMode = Literal[
    "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
]
AGGREGATION_MODES: tuple[AggregationMode, ...] = get_args(AggregationMode)


@dataclass(frozen=True)
class StepCounts:
    """Token and sequence counts of a whole optimiser step."""

    tokens: Tensor | float
    sequences: Tensor | float


def step_counts(masks: list[Tensor] | Tensor, *,
                reduce: Callable[[Tensor, str], Tensor] | None = None) -> StepCounts:
    """Counts over all micro-batch masks of one step.

    With data parallelism pass ``reduce``, a cross-rank reduction called as
    ``reduce(tensor, "sum")`` (for example ``lambda t, op: trainer.strategy.reduce(t,
    reduce_op=op)``): the counts are then those of the whole step over every rank, and each
    rank's loss is its share of the global loss, never a mean of rank means.
    """
    if isinstance(masks, Tensor):
        masks = [masks]
    tokens = sum((m.sum(dtype=torch.float32) for m in masks), torch.tensor(0.0))
    seqs = sum(((m != 0).any(dim=-1).sum(dtype=torch.float32) for m in masks), torch.tensor(0.0))
    if reduce is None:
        return StepCounts(tokens=tokens, sequences=seqs)
    device = masks[0].device if masks else None
    summed = reduce(torch.stack([torch.as_tensor(tokens), torch.as_tensor(seqs)]).to(device),
                    "sum")
    return StepCounts(tokens=summed[0], sequences=summed[1])


def check_aggregation(mode: str, horizon: int | None) -> None:
    """Validate an aggregation setting (raises ``ValueError``)."""
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; allowed: {AGGREGATION_MODES}")
    if mode == "seq-mean-token-sum-norm" and (horizon is None or horizon <= 0):
        raise ValueError(
            "aggregation 'seq-mean-token-sum-norm' needs a fixed positive horizon (the maximum "
            f"response length, never a micro-batch's padded length); got horizon={horizon}"
        )


def aggregate(
    token_loss: Tensor,
    mask: Tensor,
    mode: AggregationMode = "token-mean",
    *,
    counts: StepCounts | None = None,
    horizon: int | None = None,
) -> Tensor:
    """Reduce ``token_loss`` ``[batch, time]`` to a scalar (see the module docstring)."""
    check_aggregation(mode, horizon)
    m = mask.to(token_loss.dtype)
    counts = counts or step_counts(mask)
    masked = torch.where(m != 0, token_loss, torch.zeros_like(token_loss))
    if mode == "token-mean":
        return masked.sum() / _at_least_one(counts.tokens, token_loss)
    n_seqs = _at_least_one(counts.sequences, token_loss)
    per_seq = masked.sum(dim=-1)
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / m.sum(dim=-1).clamp(min=1)
    total = per_seq.sum() / n_seqs
    if mode == "seq-mean-token-sum-norm":
        assert horizon is not None
        total = total / horizon
    return total


def _at_least_one(count: Tensor | float, like: Tensor) -> Tensor:
    return torch.as_tensor(count, dtype=like.dtype, device=like.device).clamp(min=1)
