"""torchmetrics statistics of policy drift and of trust-region activity, over masked tokens.

Each metric keeps sufficient statistics — sums, extremes and, for a quantile, the per-token
values — as torchmetrics states with the matching ``dist_reduce_fx`` (``sum``, ``min``, ``max``,
``cat``). ``compute()`` therefore gives the value over every token seen by every update on every
rank, exactly as if all of them had been one batch: a mean is a global token mean, never a mean
of micro-batch or rank means.

Per token, with anchor ν and x = log ν − log π clamped to ±20 (r = e⁻ˣ = π / ν):

| statistic | value |
|---|---|
| ``tv_mean``, ``tv_p99``, ``tv_max`` | mean, 99th percentile (linear), max of abs(π − ν) |
| ``kl_k1`` | mean of k1 = −x = log π − log ν |
| ``kl_k3`` | mean of k3 = eˣ − x − 1 |
| ``chi2`` | E[(r − 1)²] (= E[r²] − 1 in expectation, never negative) |
| ``ess`` | (Σr)² / (N Σr²), effective sample size of r as a fraction of N, in (0, 1] |
| ``ratio_min``, ``ratio_mean``, ``ratio_max`` | min, mean, max of r |
| ``log_ppl_diff`` | mean over sequences of mean_t x: log-perplexity under π minus under ν |

The per-token values and the reductions from sums are the functions of
:mod:`trustregion.functional.drift` (``kl_k1``, ``kl_k3``, ``tv``, ``ratio_excess``,
``chi2_from_excess``, ``ess_fraction_from_excess``); the classes here only keep their sums.
Sums are kept in float64, and r enters them as r − 1 = expm1(log r), so that χ², ESS and the
ratio mean stay accurate when π and ν are close (r ≈ 1). With no token seen every statistic is 0.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from trustregion.functional.drift import (
    chi2_from_excess,
    ess_fraction_from_excess,
    kl_k1,
    kl_k3,
    ratio_excess,
    tv,
)
from trustregion.functional.masked import count_fraction, masked_sum

__all__ = [
    "NU_BUCKETS",
    "PAIR_STATISTICS",
    "REGION_STATISTICS",
    "PairDrift",
    "RegionActivity",
    "TokenMean",
    "linear_quantile",
]

PAIR_STATISTICS: dict[str, str] = {
    "tv_mean": "mean abs(π − ν) of the sampled token (binary total variation)",
    "tv_p99": "99th percentile of abs(π − ν) (linear interpolation)",
    "tv_max": "largest abs(π − ν)",
    "kl_k1": "mean k1 = log π − log ν",
    "kl_k3": "mean k3 = eˣ − x − 1 with x = log ν − log π",
    "chi2": "χ² = E[(r − 1)²] with r = π / ν",
    "ess": "effective sample size of r as a fraction of the token count, (Σr)² / (N Σr²)",
    "ratio_min": "smallest r",
    "ratio_mean": "mean r",
    "ratio_max": "largest r",
    "log_ppl_diff": "mean over sequences of mean_t (log ν − log π): log-perplexity under π "
                    "minus log-perplexity under ν",
}
"""Statistic names of :class:`PairDrift`, with their meaning."""

NU_BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("0_0.01", 0.0, 0.01),
    ("0.01_0.1", 0.01, 0.1),
    ("0.1_0.5", 0.1, 0.5),
    ("0.5_1", 0.5, 1.0),
)
"""Behaviour-probability buckets [low, high) of :class:`RegionActivity` (the last includes 1)."""

_EVENTS = ("outside_frac", "zero_weight_frac", "negative_weight_frac")
_GROUPS = ("", "_pos_adv", "_neg_adv", *(f"_nu_{name}" for name, _, _ in NU_BUCKETS))
REGION_STATISTICS: tuple[str, ...] = tuple(e + g for e in _EVENTS for g in _GROUPS)
"""Statistic names of :class:`RegionActivity`: each event fraction, over all tokens, by sign of
Â and by behaviour-probability bucket."""

_QUANTILE = 0.99


def linear_quantile(values: Tensor, q: float) -> Tensor:
    """The q-quantile of a 1-D tensor with linear interpolation (``torch.quantile``'s default),
    by sorting, so without ``torch.quantile``'s limit of 2**24 elements. 0 for an empty tensor."""
    n = values.numel()
    if n == 0:
        return torch.zeros((), dtype=values.dtype, device=values.device)
    ordered = values.flatten().sort().values
    position = q * (n - 1)
    low = int(position)
    high = min(low + 1, n - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def _concatenated(state: list[Tensor] | Tensor) -> Tensor:
    """A ``cat`` state as one tensor: a list before synchronisation, a tensor after."""
    if isinstance(state, Tensor):
        return state
    return dim_zero_cat(state) if state else torch.zeros(0)


class _TokenMetric(Metric):
    """Common settings: states are independent sums/extremes, so no full-state update."""

    full_state_update: ClassVar[bool] = False  # type: ignore[misc]
    is_differentiable: ClassVar[bool] = False  # type: ignore[misc]

    def _sum_state(self, name: str, shape: tuple[int, ...] = ()) -> None:
        self.add_state(name, default=torch.zeros(shape, dtype=torch.float64),
                       dist_reduce_fx="sum")


class PairDrift(_TokenMetric):
    """Drift of the policy π from one other policy ν over masked tokens (see the module table).

    ``update(logp, anchor_logp, mask)`` takes ``[batch, time]`` log-probs of the sampled tokens
    under π and ν and the response mask; ``compute()`` returns ``{name: scalar}`` for every name
    in :data:`PAIR_STATISTICS`.

    Example:
        >>> metric = PairDrift()
        >>> metric.update(torch.log(torch.tensor([[0.5, 0.5]])),
        ...               torch.log(torch.tensor([[0.25, 0.5]])), torch.tensor([[1, 1]]))
        >>> round(float(metric.compute()["tv_mean"]), 3)   # (0.25 + 0) / 2
        0.125
    """

    tokens: Tensor
    shift_sum: Tensor
    shift_max: Tensor
    shifts: list[Tensor]
    k1_sum: Tensor
    k3_sum: Tensor
    excess_sum: Tensor
    excess_sq_sum: Tensor
    ratio_lowest: Tensor
    ratio_highest: Tensor
    seq_sum: Tensor
    seqs: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("tokens", "shift_sum", "k1_sum", "k3_sum", "excess_sum", "excess_sq_sum",
                     "seq_sum", "seqs"):
            self._sum_state(name)
        self.add_state("shift_max", default=torch.zeros((), dtype=torch.float64),
                       dist_reduce_fx="max")
        self.add_state("ratio_lowest", default=torch.tensor(float("inf"), dtype=torch.float64),
                       dist_reduce_fx="min")
        self.add_state("ratio_highest", default=torch.zeros((), dtype=torch.float64),
                       dist_reduce_fx="max")
        self.add_state("shifts", default=[], dist_reduce_fx="cat")

    def update(self, logp: Tensor, anchor_logp: Tensor, mask: Tensor) -> None:
        valid = mask.bool()
        logp, anchor_logp = logp.double(), anchor_logp.double()
        zero = torch.zeros((), dtype=torch.float64, device=logp.device)
        # Per token from the functional forms; masked positions (possibly NaN) become 0.
        log_r = torch.where(valid, kl_k1(logp, anchor_logp), zero)      # log r = k1
        excess = torch.where(valid, ratio_excess(logp, anchor_logp), zero)  # r − 1
        shift = torch.where(valid, tv(logp, anchor_logp), zero)         # abs(π − ν)
        k3 = torch.where(valid, kl_k3(logp, anchor_logp), zero)
        ratio = excess + 1
        self.tokens += valid.sum()
        self.shift_sum += masked_sum(shift, valid)
        self.shift_max = torch.maximum(self.shift_max, shift.amax() if shift.numel() else zero)
        self.shifts.append(shift[valid].float())
        self.k1_sum += masked_sum(log_r, valid)
        self.k3_sum += masked_sum(k3, valid)
        self.excess_sum += masked_sum(excess, valid)
        self.excess_sq_sum += masked_sum(excess.square(), valid)
        inf = torch.full((), float("inf"), dtype=torch.float64, device=logp.device)
        self.ratio_lowest = torch.minimum(self.ratio_lowest, torch.where(valid, ratio, inf).amin()
                                          if ratio.numel() else inf)
        self.ratio_highest = torch.maximum(self.ratio_highest, torch.where(valid, ratio, zero)
                                           .amax() if ratio.numel() else zero)
        per_seq = valid.sum(-1)
        self.seq_sum += (-log_r.sum(-1) / per_seq.clamp(min=1)).sum()  # x = −log r
        self.seqs += (per_seq > 0).sum()

    def compute(self) -> dict[str, Tensor]:
        n = self.tokens
        safe = n.clamp(min=1)
        s1, s2 = self.excess_sum, self.excess_sq_sum      # Σ(r − 1), Σ(r − 1)²
        seen = n > 0
        zero = torch.zeros_like(n)
        values = {
            "tv_mean": self.shift_sum / safe,
            "tv_p99": linear_quantile(_concatenated(self.shifts).double(), _QUANTILE),
            "tv_max": self.shift_max,
            "kl_k1": self.k1_sum / safe,
            "kl_k3": self.k3_sum / safe,
            "chi2": chi2_from_excess(s2, n),
            "ess": ess_fraction_from_excess(s1, s2, n),
            "ratio_min": torch.where(seen, self.ratio_lowest, zero),
            "ratio_mean": torch.where(seen, 1 + s1 / safe, zero),
            "ratio_max": self.ratio_highest,
            "log_ppl_diff": self.seq_sum / self.seqs.clamp(min=1),
        }
        return {name: value.float() for name, value in values.items()}


class TokenMean(_TokenMetric):
    """Mean of a per-token value over masked tokens (0 with none): ``update(values, mask)``."""

    total: Tensor
    tokens: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._sum_state("total")
        self._sum_state("tokens")

    def update(self, values: Tensor, mask: Tensor) -> None:
        valid = mask.bool()
        self.total += masked_sum(values.double(), valid)
        self.tokens += valid.sum()

    def compute(self) -> Tensor:
        return (self.total / self.tokens.clamp(min=1)).float()


class RegionActivity(_TokenMetric):
    """How often a strategy's trust region acts, on one scale for every strategy.

    ``update(weight, outside, mask, advantages, behavior_logp)`` takes the strategy's per-token
    gradient weight and outside flag (``StrategyOutput.weight``/``outside``), the mask, per-token
    advantages and behaviour log-probs. ``compute()`` returns every name in
    :data:`REGION_STATISTICS`: the fraction of tokens outside the region, with weight exactly 0
    and with weight < 0, among all tokens (no suffix), among tokens with Â > 0 / Â < 0
    (``_pos_adv`` / ``_neg_adv``) and among tokens whose behaviour probability μ = exp(log μ)
    lies in each bucket of :data:`NU_BUCKETS` (``_nu_<low>_<high>``). An empty group gives 0.
    """

    counts: Tensor
    hits: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._sum_state("counts", (len(_GROUPS),))
        self._sum_state("hits", (len(_EVENTS), len(_GROUPS)))

    def update(self, weight: Tensor, outside: Tensor, mask: Tensor, advantages: Tensor,
               behavior_logp: Tensor) -> None:
        valid = mask.bool()
        edges = torch.tensor([high for _, _, high in NU_BUCKETS[:-1]],
                             dtype=torch.float32, device=valid.device)
        bucket = torch.bucketize(behavior_logp.float().exp(), edges, right=True)
        groups = torch.stack([
            valid, valid & (advantages > 0), valid & (advantages < 0),
            *(valid & (bucket == i) for i in range(len(NU_BUCKETS))),
        ]).flatten(1)                                                   # [groups, tokens]
        events = torch.stack([outside.bool(), weight == 0, weight < 0]).flatten(1)
        self.counts += groups.sum(-1)
        self.hits += (events[:, None] & groups[None]).sum(-1)

    def compute(self) -> dict[str, Tensor]:
        fractions = count_fraction(self.hits, self.counts).float()    # [events, groups]
        return dict(zip(REGION_STATISTICS, fractions.flatten(), strict=True))
