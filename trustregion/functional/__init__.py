"""Tensor maths shared by strategies, the training module and the metrics."""

from trustregion.functional.aggregation import (
    AGGREGATION_MODES,
    AggregationMode,
    StepCounts,
    aggregate,
    step_counts,
)
from trustregion.functional.divergences import (
    KL_ESTIMATORS,
    binary_kl,
    binary_tv,
    kl_estimate,
    topk_kl,
    topk_tv,
)
from trustregion.functional.logprobs import gather_logprobs, token_entropy, token_logprobs
from trustregion.functional.masked import (
    masked_count,
    masked_max,
    masked_mean,
    masked_min,
    masked_sum,
)
from trustregion.functional.ratios import (
    LOG_RATIO_CLAMP,
    importance_ratio,
    log_ratio,
    prob_shift,
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
    "gather_logprobs",
    "importance_ratio",
    "kl_estimate",
    "log_ratio",
    "masked_count",
    "masked_max",
    "masked_mean",
    "masked_min",
    "masked_sum",
    "prob_shift",
    "step_counts",
    "token_entropy",
    "token_logprobs",
    "topk_kl",
    "topk_tv",
]
