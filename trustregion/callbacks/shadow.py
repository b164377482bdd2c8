"""Evaluate other trust-region strategies on the tokens the active one trains on, without
training with them, and log where they disagree.

For every micro-batch update of a rollout batch, :class:`ShadowStrategies` calls each shadow
strategy on the same detached ``TokenBatch`` under ``torch.no_grad()`` (a forward through the
strategy's tensor maths only: no model call, no backward) and compares its per-token
``StrategyOutput.weight`` and ``outside`` with the active strategy's, which the update record
holds. Statistics are torchmetrics metrics (:mod:`trustregion.metrics.agreement`), so values
are over all tokens of all micro-batches and ranks. Keys, per shadow ``<label>``:

| key | value |
|---|---|
| ``shadow/<label>/outside_frac`` | fraction of tokens beyond the shadow's region |
| ``shadow/<label>/zero_weight_frac`` | fraction with shadow gradient weight exactly 0 |
| ``shadow/<label>/only_shadow_outside_frac`` | beyond the shadow's region, inside the active one |
| ``shadow/<label>/only_active_outside_frac`` | beyond the active region, inside the shadow's |
| ``shadow/<label>/weight_corr`` | Pearson correlation of shadow and active gradient weights |

``weight_corr`` is 0 when either strategy's weights are constant over the tokens (e.g. ratio
clipping that clipped nothing: every weight is 1), where a correlation is undefined.

A label is the shadow's registered name (its lower-cased class name if unregistered); repeats
get ``_2``, ``_3``, … in order.

Shadows see only what the training loop records: old log-probs exist only when the active
strategy anchors on ``old``, so a shadow anchored on ``old`` requires that; top-K log-probs are
recorded for the largest ``behavior_topk`` of the active strategy and the shadows (the callback
asks the module for them in ``setup``, through ``request_behavior_topk``); each top-K strategy
reads only its own K of them (``TokenBatch.topk_slots``), so adding a shadow never changes what
the active one trains on.

Example:
    >>> trainer = L.Trainer(callbacks=[ShadowStrategies(["ratio_clip", "dppo"])])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import lightning as L
import torch
from torch import Tensor

from trustregion.callbacks._windowed import WindowedMonitor
from trustregion.interface import training_module
from trustregion.metrics.agreement import AGREEMENT_STATISTICS, StrategyAgreement
from trustregion.strategies import TrustRegionStrategy, get_strategy

if TYPE_CHECKING:
    from trustregion.strategies import StrategyOutput, TokenBatch

__all__ = ["ShadowStrategies"]


def _label(strategy: TrustRegionStrategy) -> str:
    return type(strategy).registered_name or type(strategy).__name__.lower()


class ShadowStrategies(WindowedMonitor):
    """Log how other trust-region strategies would have treated the tokens being trained on.

    Args:
        strategies: shadow strategies: instances, or registered names (built with their
            default hyperparameters).
        every_n_steps: rollout batches accumulated per logged value (None: the trainer's
            ``log_every_n_steps``).
    """

    def __init__(self, strategies: Sequence[TrustRegionStrategy | str],
                 every_n_steps: int | None = None) -> None:
        super().__init__(every_n_steps)
        if isinstance(strategies, (str, TrustRegionStrategy)):
            raise ValueError("strategies must be a list of strategies or registered names; got "
                             f"a single {type(strategies).__name__} — wrap it in a list")
        if not strategies:
            raise ValueError("strategies must name at least one shadow strategy; got none")
        self.strategies: dict[str, TrustRegionStrategy] = {}
        for item in strategies:
            strategy = get_strategy(item) if isinstance(item, str) else item
            if not isinstance(strategy, TrustRegionStrategy):
                raise ValueError(f"a shadow must be a TrustRegionStrategy or a registered name; "
                                 f"got {type(item).__name__}")
            label, count = _label(strategy), 1
            while label in self.strategies:
                count += 1
                label = f"{_label(strategy)}_{count}"
            self.strategies[label] = strategy
        self.agreement = {label: StrategyAgreement() for label in self.strategies}

    def metric_names(self) -> list[str]:
        """Every key this callback logs."""
        return [f"shadow/{label}/{stat}" for label in self.strategies
                for stat in AGREEMENT_STATISTICS]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        module = training_module(pl_module, "ShadowStrategies")
        active = module.strategy
        for label, strategy in self.strategies.items():
            if strategy.anchor == "old" and active.anchor != "old":
                raise ValueError(
                    f"shadow strategy {label!r} anchors on 'old', but the active strategy "
                    f"{type(active).__name__} anchors on {active.anchor!r}: old log-probs are "
                    "only recomputed for an active strategy anchored on 'old'. Give the shadow "
                    "anchor='behavior', or anchor the active strategy on 'old'")
        module.request_behavior_topk(max(s.behavior_topk for s in self.strategies.values()))

    def update(self, batch: TokenBatch, active: StrategyOutput) -> None:
        """Evaluate every shadow on one micro-batch update (detached ``batch``) and compare it
        with the active strategy's output for it."""
        mask = batch.bool_mask()
        with torch.no_grad():
            for label, strategy in self.strategies.items():
                metric = self.agreement[label]
                if metric.device != mask.device:
                    metric.to(mask.device)
                shadow = strategy(batch)
                metric.update(shadow.weight, shadow.outside, active.weight.detach(),
                              active.outside, mask)

    def compute(self) -> dict[str, Tensor]:
        """The logged values since the last :meth:`reset` (synchronised across ranks: call it on
        every rank)."""
        values: dict[str, Tensor] = {}
        for label, metric in self.agreement.items():
            if metric.update_called:
                values.update({f"shadow/{label}/{k}": v for k, v in metric.compute().items()})
        return values

    def reset(self) -> None:
        for metric in self.agreement.values():
            metric.reset()
