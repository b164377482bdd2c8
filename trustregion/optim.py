"""The default optimiser and learning-rate schedule, both replaceable from a config.

``TrustRegionModule(optimizer=..., lr_scheduler=...)`` takes callables in the Lightning CLI way
(``OptimizerCallable``: parameters → optimiser; ``LRSchedulerCallable``: optimiser → scheduler),
so a YAML config picks any ``torch.optim`` class by ``class_path``::

    model:
      optimizer:
        class_path: torch.optim.SGD
        init_args: {lr: 0.01, momentum: 0.9}
      lr_scheduler:
        class_path: torch.optim.lr_scheduler.CosineAnnealingLR
        init_args: {T_max: 1000}

The scheduler steps once per optimiser step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from trustregion.validation import integer_at_least

__all__ = ["AdamW", "LinearWarmup"]


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` with the defaults of LLM RL fine-tuning: lr 1e-4, no weight decay.

    Args:
        params: the parameters to optimise.
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW``.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


class LinearWarmup(torch.optim.lr_scheduler.LRScheduler):
    """Linear warm-up to the optimiser's learning rate, then constant:
    lr_s = lr · min(1, (s + 1) / warmup_steps) at optimiser step s (constant for 0).

    Args:
        optimizer: the optimiser.
        warmup_steps: optimiser steps of warm-up (≥ 0).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 0) -> None:
        integer_at_least("warmup_steps", warmup_steps, 0, note="0: no warm-up")
        self.warmup_steps = warmup_steps
        super().__init__(optimizer)

    def factor(self, step: int) -> float:
        """The multiplier of the base learning rate at optimiser step ``step``."""
        return min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0

    def get_lr(self) -> list[float]:  # type: ignore[override]
        factor = self.factor(self.last_epoch)
        return [float(base) * factor for base in self.base_lrs]
