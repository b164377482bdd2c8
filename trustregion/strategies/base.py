"""The strategy contract: a prepared float32 view of the batch, the result types, the base class.

A strategy turns a :class:`TokenBatch` into per-token losses. Subclasses implement one method,
:meth:`TrustRegionStrategy.terms`, which returns the per-token objective ``J_t`` (to maximise),
the analytic gradient weight ``w_t`` and which tokens lie outside the trust region. The base
class masks, negates, and derives the metrics every strategy shares, so that runs with different
strategies log the same keys (see :data:`SHARED_METRICS`).
"""

from __future__ import annotations

import abc
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from trustregion.functional.drift import LOG_RATIO_CLAMP
from trustregion.functional.masked import masked_max, masked_mean, masked_min
from trustregion.strategies.batch import TokenBatch
from trustregion.validation import require

__all__ = [
    "METRIC_PREFIX",
    "SHARED_METRICS",
    "AnchoredTokens",
    "StrategyOutput",
    "StrategyTerms",
    "TrustRegionStrategy",
    "require",
]

Anchor = Literal["behavior", "old"]
ANCHORS: tuple[str, ...] = ("behavior", "old")

METRIC_PREFIX = "trust_region/"
SHARED_METRICS: dict[str, str] = {
    "outside_frac": "fraction of tokens beyond the trust region in the harmful direction",
    "outside_frac_pos_adv": "same, among tokens with positive advantage",
    "outside_frac_neg_adv": "same, among tokens with negative advantage",
    "zero_weight_frac": "fraction of tokens whose gradient weight is exactly zero",
    "negative_weight_frac": "fraction of tokens whose gradient weight is negative (corrective)",
    "weight_min": "smallest gradient weight",
    "weight_mean": "mean gradient weight",
    "weight_max": "largest gradient weight",
}
"""Metric keys (without :data:`METRIC_PREFIX`) that every strategy logs, with their meaning."""


@dataclass
class AnchoredTokens:
    """A :class:`TokenBatch` measured against the strategy's anchor ν, in float32 or wider.

    Masked positions are replaced by safe values (log π = log ν = 0, Â = 0) so that padding
    holding NaN can never leak into a gradient.
    """

    batch: TokenBatch
    logp: Tensor
    anchor_logp: Tensor
    log_ratio: Tensor
    ratio: Tensor
    advantages: Tensor
    mask: Tensor

    @property
    def prob(self) -> Tensor:
        """π of the sampled token (carries the gradient)."""
        return self.logp.exp()

    @property
    def anchor_prob(self) -> Tensor:
        """ν of the sampled token."""
        return self.anchor_logp.exp()

    def prob_shift(self) -> Tensor:
        """Δ = π − ν computed as ν·expm1(log π − log ν) (carries the gradient)."""
        return self.anchor_prob * torch.expm1(self.log_ratio)


@dataclass
class StrategyTerms:
    """What a strategy computes per token, before masking.

    Attributes:
        objective: J_t, to be maximised; carries the gradient.
        weight: the analytic gradient weight w_t (∂J_t/∂log π divided by Â·r), detached.
        outside: bool, token beyond the trust region in the harmful direction for its advantage.
        extras: strategy-specific scalar metrics, logged under :data:`METRIC_PREFIX`.
    """

    objective: Tensor
    weight: Tensor
    outside: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class StrategyOutput:
    """The result of calling a strategy.

    Attributes:
        token_loss: per-token loss −J_t, float32 ``[batch, time]``, exactly zero where masked.
        metrics: named scalar tensors, keys prefixed with :data:`METRIC_PREFIX`.
        weight: per-token gradient weight (detached, zero where masked).
        outside: per-token bool, beyond the trust region (False where masked).
    """

    token_loss: Tensor
    metrics: dict[str, Tensor]
    weight: Tensor
    outside: Tensor


class TrustRegionStrategy(abc.ABC):
    """Base class of every trust-region strategy.

    Hyperparameters are typed ``__init__`` arguments stored under the same attribute names and
    validated there, so the Lightning CLI can build any strategy from ``class_path``/``init_args``.

    Hyperparameter names follow one rule (``trustregion.strategies.widths``, and the glossary
    page): a symmetric width with one-sided overrides (``epsilon``/``epsilon_low``/
    ``epsilon_high``, ``delta``/``delta_low``/``delta_high``); None means "inherit", inf means
    "no bound".

    Class attributes a subclass may set:
        widths: hyperparameter name → +1 if a larger value widens the trust region, −1 if a
            smaller one does. Used to loosen or adapt the region (:meth:`scale_width`).
        width_origins: for a width whose valid values start elsewhere than 0, the value it is
            measured from (e.g. 1.0 for a ratio bound c > 1): :meth:`scale_width` scales the
            distance ``value − origin``, so a valid value stays valid.
    """

    registered_name: ClassVar[str | None] = None
    widths: ClassVar[Mapping[str, int]] = {}
    width_origins: ClassVar[Mapping[str, float]] = {}

    def __init__(self, anchor: Anchor = "behavior") -> None:
        require(
            anchor in ANCHORS,
            f"anchor must be one of {ANCHORS} (the policy the trust region is measured against); "
            f"got {anchor!r}",
        )
        self.anchor = anchor
        self._inputs_checked = False

    @abc.abstractmethod
    def terms(self, tokens: AnchoredTokens) -> StrategyTerms:
        """Per-token objective, gradient weight and trust-region membership."""

    def __call__(self, batch: TokenBatch) -> StrategyOutput:
        tokens = self.prepare(batch)
        terms = self.terms(tokens)
        mask = tokens.mask
        zero = torch.zeros((), dtype=terms.objective.dtype, device=mask.device)
        token_loss = torch.where(mask, -terms.objective, zero)
        weight = torch.where(mask, terms.weight.detach(), zero)
        outside = terms.outside & mask
        metrics = self._shared_metrics(tokens, weight, outside)
        metrics.update({METRIC_PREFIX + k: v.detach() for k, v in terms.extras.items()})
        return StrategyOutput(token_loss=token_loss, metrics=metrics, weight=weight,
                              outside=outside)

    def prepare(self, batch: TokenBatch) -> AnchoredTokens:
        """Validate ``batch`` and build its float32 view against the anchor."""
        batch.validate()
        if self.anchor == "old" and batch.old_logp is None:
            raise ValueError(
                f"{type(self).__name__}(anchor='old') needs TokenBatch.old_logp (the policy's "
                "log-probs recomputed before this round of updates); pass it, or use "
                "anchor='behavior'"
            )
        if not self._inputs_checked:
            batch.check_values()
            self._inputs_checked = True
        mask = batch.bool_mask()
        dtype = torch.promote_types(batch.logp.dtype, torch.float32)
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        anchor = batch.old_logp if self.anchor == "old" else batch.behavior_logp
        assert anchor is not None
        logp = torch.where(mask, batch.logp.to(dtype), zero)
        anchor_logp = torch.where(mask, anchor.detach().to(dtype), zero)
        advantages = torch.where(mask, batch.token_advantages().to(dtype), zero)
        log_ratio = (logp - anchor_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return AnchoredTokens(batch=batch, logp=logp, anchor_logp=anchor_logp,
                              log_ratio=log_ratio, ratio=log_ratio.exp(),
                              advantages=advantages, mask=mask)

    @property
    def behavior_topk(self) -> int:
        """How many of the behaviour policy's top log-probs per position this strategy needs
        (``TokenBatch.topk_*``); 0 for none. The training loop records that many per token."""
        return 0

    def gradient_weight(self, batch: TokenBatch) -> Tensor:
        """Per-token analytic gradient weight, without building a graph (zero where masked)."""
        with torch.no_grad():
            tokens = self.prepare(batch)
            weight = self.terms(tokens).weight
            return torch.where(tokens.mask, weight, torch.zeros_like(weight))

    def limit_weight(self, tokens: AnchoredTokens) -> Tensor:
        """The gradient weight this strategy tends to as its widths grow without bound.

        Plain importance-sampled policy gradient (w = 1) unless a strategy says otherwise.
        """
        return torch.ones_like(tokens.ratio)

    def boundary_logp(self, anchor_logp: Tensor, advantages: Tensor) -> Tensor | None:
        """log π at which a token with this anchor and advantage reaches the trust-region boundary
        in the harmful direction, or None if the strategy has no closed-form boundary. Used by the
        conformance harness to probe just inside, at and just beyond the boundary."""
        return None

    def hparams(self) -> dict[str, Any]:
        """The ``__init__`` arguments as currently set (widths may have been adapted)."""
        names = [
            name for name, p in inspect.signature(type(self).__init__).parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        return {name: getattr(self, name) for name in names}

    def scale_width(self, factor: float) -> None:
        """Widen (factor > 1) or narrow (factor < 1) the trust region by scaling its widths:
        each width that is set and finite becomes ``origin + (value − origin) · factor **
        direction`` (``origin`` from :attr:`width_origins`, else 0). A width left at None keeps
        inheriting (and so follows the width it inherits); one at inf (no bound) stays inf."""
        require(factor > 0 and math.isfinite(factor),
                f"scale_width factor must be a finite positive number; got {factor}")
        for name, direction in self.widths.items():
            value = getattr(self, name)
            if value is not None and math.isfinite(value):
                origin = self.width_origins.get(name, 0.0)
                setattr(self, name, origin + (value - origin) * factor**direction)

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters, for checkpoints (an adapted width survives a resume)."""
        return self.hparams()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unknown = set(state) - set(self.hparams())
        require(not unknown, f"{type(self).__name__} has no hyperparameter(s) {sorted(unknown)}; "
                             f"known: {sorted(self.hparams())}")
        for name, value in state.items():
            setattr(self, name, value)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"

    @staticmethod
    def _shared_metrics(tokens: AnchoredTokens, weight: Tensor, outside: Tensor
                        ) -> dict[str, Tensor]:
        mask = tokens.mask
        pos = mask & (tokens.advantages > 0)
        neg = mask & (tokens.advantages < 0)
        values = {
            "outside_frac": masked_mean(outside, mask),
            "outside_frac_pos_adv": masked_mean(outside, pos),
            "outside_frac_neg_adv": masked_mean(outside, neg),
            "zero_weight_frac": masked_mean(weight == 0, mask),
            "negative_weight_frac": masked_mean(weight < 0, mask),
            "weight_min": masked_min(weight, mask),
            "weight_mean": masked_mean(weight, mask),
            "weight_max": masked_max(weight, mask),
        }
        return {METRIC_PREFIX + k: v for k, v in values.items()}
