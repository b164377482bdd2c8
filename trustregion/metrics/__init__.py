"""torchmetrics statistics that reduce correctly across micro-batches and ranks: policy drift,
trust-region activity and agreement between two strategies (used by the callbacks)."""

from trustregion.metrics.agreement import (
    AGREEMENT_STATISTICS,
    StrategyAgreement,
    pearson_from_sums,
)
from trustregion.metrics.drift import (
    NU_BUCKETS,
    PAIR_STATISTICS,
    REGION_STATISTICS,
    PairDrift,
    RegionActivity,
    TokenMean,
    linear_quantile,
)

__all__ = [
    "AGREEMENT_STATISTICS",
    "NU_BUCKETS",
    "PAIR_STATISTICS",
    "REGION_STATISTICS",
    "PairDrift",
    "RegionActivity",
    "StrategyAgreement",
    "TokenMean",
    "linear_quantile",
    "pearson_from_sums",
]
