"""Tensor maths shared by strategies, the training module, the metrics and the callbacks:
one pure function per statistic."""

from trustregion.functional.aggregation import (
    AGGREGATION_MODES,
    AggregationMode,
    StepCounts,
    aggregate,
    step_counts,
)
from trustregion.functional.correlation import pearson_from_sums
from trustregion.functional.divergences import (
    KL_ESTIMATORS,
    binary_kl,
    binary_tv,
    kl_estimate,
    topk_kl,
    topk_tv,
)
from trustregion.functional.drift import (
    LOG_RATIO_CLAMP,
    chi2,
    chi2_from_excess,
    ess_fraction,
    ess_fraction_from_excess,
    importance_ratio,
    kl_k1,
    kl_k2,
    kl_k3,
    log_ratio,
    prob_shift,
    ratio,
    ratio_excess,
    tv,
)
from trustregion.functional.logprobs import gather_logprobs, token_entropy, token_logprobs
from trustregion.functional.masked import (
    count_fraction,
    masked_count,
    masked_max,
    masked_mean,
    masked_min,
    masked_sum,
)

__all__ = [
    "AGGREGATION_MODES",
    "KL_ESTIMATORS",
    "LOG_RATIO_CLAMP",
    "AggregationMode",
    "StepCounts",
    "aggregate",
    "binary_kl",
    "binary_tv",
    "chi2",
    "chi2_from_excess",
    "count_fraction",
    "ess_fraction",
    "ess_fraction_from_excess",
    "gather_logprobs",
    "importance_ratio",
    "kl_estimate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "log_ratio",
    "masked_count",
    "masked_max",
    "masked_mean",
    "masked_min",
    "masked_sum",
    "pearson_from_sums",
    "prob_shift",
    "ratio",
    "ratio_excess",
    "step_counts",
    "token_entropy",
    "token_logprobs",
    "topk_kl",
    "topk_tv",
    "tv",
]
