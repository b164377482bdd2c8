"""Adapt the trust region's width to hold a target, like adaptive KL control.

Each RL iteration the controller measures one quantity over the masked tokens of all the
iteration's update records (the ``updates`` of its :class:`~trustregion.interface.StepOutput`),
on every rank:

- ``outside_frac``: the fraction of tokens beyond the trust region in the harmful direction
  (``StrategyOutput.outside``);
- ``kl``: the mismatch KL between policy π and behaviour μ, k3 estimate: the mean of
  eˣ − x − 1 = 1/r − 1 + log r with x = log μ − log π and r = π/μ, the same value as
  ``DriftMonitor``'s ``drift/behavior/kl_k3``.

A proportional controller (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences", arXiv:1909.08593, §2.2) then moves the width::

    e      = clip(observed / target_value − 1, −0.2, 0.2)
    factor = 1 + gain · e     for outside_frac   (too many tokens outside → widen)
    factor = 1 − gain · e     for kl             (KL too high → narrow)

The cumulative scale (product of the factors, relative to the widths at the start of training)
is clamped to ``[min_scale, max_scale]``, and only the clamped part is applied through
``TrustRegionStrategy.scale_width``, which moves every width hyperparameter of the strategy in
the direction that widens or narrows its region (``TrustRegionStrategy.widths``).

The adapted widths are part of the module checkpoint (the strategy's ``state_dict``); the
controller's checkpoint state is the cumulative scale.

Example:
    >>> controller = TrustRegionController(target="outside_frac", target_value=0.05)
    >>> # L.Trainer(callbacks=[controller])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, get_args

import lightning as L
import torch
from torch import Tensor

from trustregion.functional.drift import kl_k3
from trustregion.functional.masked import masked_count, masked_sum
from trustregion.interface import StepOutput, UpdateRecord, training_module
from trustregion.strategies.base import TrustRegionStrategy
from trustregion.validation import number_in, require

__all__ = ["ERROR_CLIP", "TARGETS", "ControllerTarget", "TrustRegionController"]

ControllerTarget = Literal["outside_frac", "kl"]
TARGETS: tuple[str, ...] = get_args(ControllerTarget)
ERROR_CLIP = 0.2
"""The relative error is clipped to ±0.2 (as in Ziegler et al.), so one iteration moves the
widths by at most a factor 1 ± 0.2·gain."""


def current_widths(strategy: TrustRegionStrategy) -> dict[str, float]:
    """The strategy's width hyperparameters that are set and finite (None ones inherit another
    width and inf ones are no bound: both are left out, and :meth:`scale_width` leaves them)."""
    return {name: getattr(strategy, name) for name in strategy.widths
            if getattr(strategy, name) is not None and math.isfinite(getattr(strategy, name))}


class TrustRegionController(L.Callback):
    """Scale the active strategy's widths each iteration to hold ``target`` at ``target_value``.

    Args:
        target: ``"outside_frac"`` (fraction of tokens beyond the trust region) or ``"kl"``
            (mismatch KL between π and μ, k3 estimate).
        target_value: the value to hold; for ``outside_frac`` in (0, 1).
        gain: controller gain in (0, 5): one iteration changes the widths by at most a factor
            1 ± 0.2·gain.
        min_scale: lower bound (≤ 1) on the cumulative scale relative to the initial widths.
        max_scale: upper bound (≥ 1) on the cumulative scale.

    Attributes:
        scale: cumulative factor applied to the widths so far.

    Logs ``controller/scale``, ``controller/observed`` and the current value of every width
    hyperparameter as ``controller/<name>``. Iterations without tokens, or with a non-finite
    observation, leave the widths unchanged.
    """

    def __init__(self, target: ControllerTarget, target_value: float, gain: float = 0.1,
                 min_scale: float = 0.1, max_scale: float = 10.0) -> None:
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; allowed: {TARGETS}")
        high = 1.0 if target == "outside_frac" else math.inf
        number_in(f"target_value for {target!r}", target_value, 0, high, high_inclusive=False)
        number_in("gain", gain, 0, round(1 / ERROR_CLIP), high_inclusive=False,
                  note="so that every factor stays positive")
        number_in("min_scale", min_scale, 0, 1)
        require(_is_number(max_scale) and max_scale >= 1,
                f"max_scale must be a finite number ≥ 1; got {max_scale!r}")
        self.target: ControllerTarget = target
        self.target_value = float(target_value)
        self.gain = float(gain)
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale)
        self.scale = 1.0

    @property
    def state_key(self) -> str:
        """Keyed by the target only, so ``target_value`` can be changed on resume."""
        return f"{type(self).__qualname__}{{'target': {self.target!r}}}"

    # ------------------------------------------------------------------------- the maths
    def observation_sums(self, records: Sequence[UpdateRecord],
                         device: torch.device | None = None) -> Tensor:
        """``[Σ value, N]`` over the masked tokens of ``records`` (value: outside indicator or
        k3 KL), float32; sums so that ranks combine by adding."""
        total = torch.zeros(2, dtype=torch.float32, device=device)
        for record in records:
            mask = record.batch.bool_mask()
            if self.target == "outside_frac":
                value = record.output.outside.float()
            else:
                value = kl_k3(record.batch.logp, record.batch.behavior_logp)
            part = torch.stack([masked_sum(value, mask).float(), masked_count(mask)])
            total = total + part.to(total.device)
        return total

    def observe(self, records: Sequence[UpdateRecord]) -> float | None:
        """The observed value for ``records`` on this process; None without tokens."""
        return _mean(self.observation_sums(records))

    def factor(self, observed: float) -> float:
        """The unclamped multiplicative step for one observation."""
        error = min(max(observed / self.target_value - 1.0, -ERROR_CLIP), ERROR_CLIP)
        sign = 1.0 if self.target == "outside_frac" else -1.0
        return 1.0 + sign * self.gain * error

    def step(self, strategy: TrustRegionStrategy, observed: float) -> float:
        """Move ``strategy``'s widths for one observation; returns the factor applied (1.0 when
        the bound is reached or the observation is not finite)."""
        if not math.isfinite(observed):
            return 1.0
        scale = min(max(self.scale * self.factor(observed), self.min_scale), self.max_scale)
        applied = scale / self.scale
        if applied != 1.0:
            strategy.scale_width(applied)
        self.scale = scale
        return applied

    # ----------------------------------------------------------------------------- hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        strategy = training_module(pl_module, "TrustRegionController").strategy
        if not current_widths(strategy):
            name = strategy.registered_name or type(strategy).__name__
            raise ValueError(
                f"TrustRegionController cannot adapt strategy {name!r} "
                f"({type(strategy).__name__}): it has no width hyperparameter to scale "
                f"(widths: {dict(strategy.widths) or 'none'}). Use a strategy with a trust "
                "region, such as 'drpo', 'dppo' or 'ratio_clip'.")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        module = training_module(pl_module, "TrustRegionController")
        strategy = module.strategy
        step = StepOutput.of(outputs)
        updates = step.updates if step is not None else ()
        sums = self.observation_sums(updates, pl_module.device)
        observed = _mean(trainer.strategy.reduce(sums, reduce_op="sum"))
        if observed is not None:
            self.step(strategy, observed)
        logged = {"controller/scale": self.scale,
                  **({"controller/observed": observed} if observed is not None else {}),
                  **{f"controller/{k}": float(v) for k, v in current_widths(strategy).items()}}
        module.step_log.add(logged, write=module.step_log.logging_batch(batch_idx))

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scale = float(state_dict["scale"])


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _mean(sums: Tensor) -> float | None:
    total, count = (float(v) for v in sums.tolist())
    return total / count if count > 0 else None
