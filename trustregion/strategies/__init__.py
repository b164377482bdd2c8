"""Trust-region strategies: the contract, the registry and the built-ins.

Every built-in registers itself under a short name on import:

| name | class | trust region |
|---|---|---|
| ``ratio_clip`` | :class:`RatioClip` | PPO/GRPO ratio clipping, DAPO clip-higher, dual clip |
| ``dppo`` | :class:`DivergenceMask` | DPPO divergence mask (binary/top-K, TV/KL) |
| ``drpo`` | :class:`DRPO` | DRPO smooth quadratic penalty on π − ν |
| ``drpo_reference`` | :class:`DRPOReference` | DRPO with the published δ = 12.5 |
| ``spo`` | :class:`SPO` | SPO quadratic penalty on r − 1 |
| ``pg_is`` | :class:`ImportanceSampledPG` | none (baseline) |
| ``cispo`` | :class:`CISPO` | clipped importance-sampling weight |
| ``gspo`` | :class:`GSPO` | clipped sequence-level ratio |
| ``dro`` | :class:`LogRatioQuadratic` | quadratic penalty on log π − log ν |

A built-in is registered by importing its module here (and naming its class in ``__all__``),
not through an entry point: registration then needs no installed package metadata, happens
before any strategy is built (so ``registered_name`` is always set), and an import error fails
loudly instead of turning into a warning. The tests walk the package and fail for any strategy
class that importing this package leaves unregistered, or that this table or the documentation's
strategy index leaves out.
"""

from trustregion.strategies.base import (
    METRIC_PREFIX,
    SHARED_METRICS,
    AnchoredTokens,
    StrategyOutput,
    StrategyTerms,
    TrustRegionStrategy,
)
from trustregion.strategies.batch import TokenBatch
from trustregion.strategies.cispo import CISPO
from trustregion.strategies.dppo import DivergenceMask
from trustregion.strategies.drpo import DRPO, DRPOReference
from trustregion.strategies.gspo import GSPO
from trustregion.strategies.log_ratio_quadratic import LogRatioQuadratic
from trustregion.strategies.pg_is import ImportanceSampledPG
from trustregion.strategies.ratio_clip import RatioClip
from trustregion.strategies.registry import (
    ENTRY_POINT_GROUP,
    available_strategies,
    get_strategy,
    register_strategy,
    strategy_class,
)
from trustregion.strategies.spo import SPO

__all__ = [
    "CISPO",
    "DRPO",
    "ENTRY_POINT_GROUP",
    "GSPO",
    "METRIC_PREFIX",
    "SHARED_METRICS",
    "SPO",
    "AnchoredTokens",
    "DRPOReference",
    "DivergenceMask",
    "ImportanceSampledPG",
    "LogRatioQuadratic",
    "RatioClip",
    "StrategyOutput",
    "StrategyTerms",
    "TokenBatch",
    "TrustRegionStrategy",
    "available_strategies",
    "get_strategy",
    "register_strategy",
    "strategy_class",
]
