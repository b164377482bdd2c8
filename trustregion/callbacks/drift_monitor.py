"""Log how far the policy has drifted from the behaviour, old and reference policies, and how
often the active trust region acts — under one naming scheme for every strategy.

:class:`DriftMonitor` reads the ``"updates"`` that ``TrustRegionModule.training_step`` returns
(one detached ``UpdateRecord`` per micro-batch update: the ``TokenBatch`` and the strategy's
``StrategyOutput``), feeds every record's masked response tokens to torchmetrics statistics
(:mod:`trustregion.metrics.drift`), and at the end of each logging window (the trainer's
``log_every_n_steps`` rollout batches, or ``every_n_steps``) writes them to the loggers and
starts afresh. A token updated in several PPO epochs counts once per update. The statistics
synchronise across ranks themselves, so a value is the one over all tokens of all ranks.

Keys, with P one of ``behavior`` (π vs μ, always), ``old`` (π vs π_old, when the batch has
``old_logp``) and ``ref`` (π vs π_ref, when it has ``ref_logp``); ν is P's policy,
x = log ν − log π clamped to ±20 and r = e⁻ˣ = π / ν:

| key | value |
|---|---|
| ``drift/P/tv_mean`` | mean over tokens of abs(π − ν), the binary total variation |
| ``drift/P/tv_p99`` | its 99th percentile (linear interpolation) |
| ``drift/P/tv_max`` | its maximum |
| ``drift/P/kl_k1`` | mean of k1 = −x = log π − log ν |
| ``drift/P/kl_k3`` | mean of k3 = eˣ − x − 1 (≥ 0) |
| ``drift/P/chi2`` | E[(r − 1)²] |
| ``drift/P/ess`` | (Σr)² / (N Σr²): effective sample size fraction of r, in (0, 1] |
| ``drift/P/ratio_min``, ``_mean``, ``_max`` | min, mean, max of r |
| ``drift/P/log_ppl_diff`` | mean over sequences of mean_t x (log-perplexity under π minus ν) |
| ``drift/entropy`` | mean policy entropy over tokens (when the batch has ``entropy``) |
| ``region/outside_frac`` | fraction of the window's tokens beyond the region (harmful direction) |
| ``region/zero_weight_frac`` | fraction with gradient weight exactly 0 (clipped/masked) |
| ``region/negative_weight_frac`` | fraction with gradient weight < 0 (corrective pull) |
| ``region/<fraction>_pos_adv``, ``_neg_adv`` | each fraction among tokens with Â > 0 / Â < 0 |
| ``region/<fraction>_nu_0_0.01`` | each fraction among tokens with μ ∈ [0, 0.01) |
| ``region/<fraction>_nu_0.01_0.1`` | … with μ ∈ [0.01, 0.1) |
| ``region/<fraction>_nu_0.1_0.5`` | … with μ ∈ [0.1, 0.5) |
| ``region/<fraction>_nu_0.5_1`` | … with μ ∈ [0.5, 1] |

μ is the behaviour probability of the sampled token, exp(``behavior_logp``) — the anchor ν of
every strategy that anchors on the behaviour policy (the default). The ``region/`` fractions come
from each record's ``StrategyOutput.weight`` and ``outside``, which every strategy fills in the
same way, so two runs with different strategies plot on the same chart.

``region/*`` and the strategy's ``trust_region/*`` name different statistics of the same
per-token flags: ``trust_region/<fraction>`` is the active strategy's own metric, computed by
the module for every rollout batch (whatever callbacks are attached) over that batch's tokens;
``region/<fraction>`` is this monitor's, over every token of its logging window, on the same
tokens as its ``drift/*`` keys, and split further by μ. With a window of one rollout batch the
shared fractions are equal. Charts draw ``trust_region/*`` (see :mod:`trustregion.plots.charts`).

The tokens were sampled from μ, not π: k1 and k3 are the usual per-token drift estimators on
those tokens (as inference/training mismatch monitors log them), not unbiased estimates of
KL(π‖ν).

For the progress bar (not sent to loggers) it also logs, after every rollout batch whatever the
logging window, that batch's ``kl`` (``drift/behavior/kl_k3``) and ``outside``
(``trust_region/outside_frac``), on this process's tokens.

Example:
    >>> trainer = L.Trainer(callbacks=[DriftMonitor()])   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import Tensor
from torchmetrics import Metric

from trustregion.callbacks._windowed import WindowedMonitor
from trustregion.functional.drift import kl_k3
from trustregion.interface import StepOutput, training_module
from trustregion.metrics.drift import (
    PAIR_STATISTICS,
    REGION_STATISTICS,
    PairDrift,
    RegionActivity,
    TokenMean,
)

if TYPE_CHECKING:
    from trustregion.strategies import StrategyOutput, TokenBatch

__all__ = ["PAIRS", "PROGRESS_BAR", "DriftMonitor", "progress_bar_values"]

PAIRS: dict[str, str] = {"behavior": "behavior_logp", "old": "old_logp", "ref": "ref_logp"}
"""Drift pair name → the ``TokenBatch`` field holding the other policy's log-probs."""

PROGRESS_BAR: dict[str, str] = {"kl": "drift/behavior/kl_k3",
                                "outside": "trust_region/outside_frac"}
"""Progress-bar name → the logged statistic it shows for the latest rollout batch alone (on
this process's tokens)."""


def progress_bar_values(records: Sequence[Any]) -> dict[str, Tensor]:
    """``kl`` (mean k3 of π vs μ) and ``outside`` (fraction beyond the region) over the masked
    tokens of one rollout batch's update records; empty without tokens."""
    if not records:
        return {}
    kl = outside = count = None
    for record in records:
        batch, mask = record.batch, record.batch.bool_mask()
        k3 = torch.where(mask, kl_k3(batch.logp.detach(), batch.behavior_logp.detach()),
                         0.0).sum()
        beyond = (record.output.outside & mask).sum()
        kl = k3 if kl is None else kl + k3
        outside = beyond if outside is None else outside + beyond
        count = mask.sum() if count is None else count + mask.sum()
    assert kl is not None and outside is not None and count is not None
    tokens = count.clamp(min=1).float()
    return {"kl": kl / tokens, "outside": outside.float() / tokens}


class DriftMonitor(WindowedMonitor):
    """Log drift of the policy from μ, π_old and π_ref, and the active trust region's activity.

    Args:
        every_n_steps: rollout batches accumulated per logged value (None: the trainer's
            ``log_every_n_steps``, so each logged row covers every token since the last one).
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        super().__init__(every_n_steps)
        self.pairs = {pair: PairDrift() for pair in PAIRS}
        self.entropy = TokenMean()
        self.region = RegionActivity()

    @staticmethod
    def metric_names(pairs: Iterable[str] = ("behavior",), entropy: bool = True) -> list[str]:
        """Every key this callback sends to the loggers when the batches hold the given pairs
        (``behavior`` is always there) and, if ``entropy``, per-token entropies."""
        pairs = list(pairs)
        unknown = set(pairs) - set(PAIRS)
        if unknown:
            raise ValueError(f"unknown drift pair(s) {sorted(unknown)}; known: {list(PAIRS)}")
        names = [f"drift/{pair}/{stat}" for pair in PAIRS if pair in pairs
                 for stat in PAIR_STATISTICS]
        if entropy:
            names.append("drift/entropy")
        names.extend(f"region/{stat}" for stat in REGION_STATISTICS)
        return names

    def _metrics(self) -> Sequence[Metric]:
        return [*self.pairs.values(), self.entropy, self.region]

    def update(self, batch: TokenBatch, output: StrategyOutput) -> None:
        """Add one micro-batch update: its detached inputs and the active strategy's output."""
        device = batch.logp.device
        for metric in self._metrics():
            if metric.device != device:
                metric.to(device)
        mask = batch.bool_mask()
        for pair, field in PAIRS.items():
            other = getattr(batch, field)
            if other is not None:
                self.pairs[pair].update(batch.logp.detach(), other.detach(), mask)
        if batch.entropy is not None:
            self.entropy.update(batch.entropy.detach(), mask)
        self.region.update(output.weight.detach(), output.outside, mask,
                           batch.token_advantages(), batch.behavior_logp.detach())

    def compute(self) -> dict[str, Tensor]:
        """The logged values of everything updated since the last :meth:`reset`, keyed as in
        the module table (synchronised across ranks: call it on every rank)."""
        values: dict[str, Tensor] = {}
        for pair, metric in self.pairs.items():
            if metric.update_called:
                values.update({f"drift/{pair}/{k}": v for k, v in metric.compute().items()})
        if self.entropy.update_called:
            values["drift/entropy"] = self.entropy.compute()
        if self.region.update_called:
            values.update({f"region/{k}": v for k, v in self.region.compute().items()})
        return values

    def reset(self) -> None:
        for metric in self._metrics():
            metric.reset()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = StepOutput.of(outputs)
        if step is not None:
            module = training_module(pl_module, type(self).__name__)
            module.step_log.show(progress_bar_values(step.updates))
