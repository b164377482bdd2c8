"""trustregion: RL post-training of language models with a pluggable trust region."""

from trustregion.penalties import EntropyBonus, ReferenceKL
from trustregion.strategies import (
    StrategyOutput,
    TokenBatch,
    TrustRegionStrategy,
    available_strategies,
    get_strategy,
    register_strategy,
)

__version__ = "0.1.0"

__all__ = [
    "EntropyBonus",
    "ReferenceKL",
    "StrategyOutput",
    "TokenBatch",
    "TrustRegionStrategy",
    "__version__",
    "available_strategies",
    "get_strategy",
    "register_strategy",
]
