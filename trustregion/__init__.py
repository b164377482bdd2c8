"""trustregion: RL post-training of language models with a pluggable trust region."""

from trustregion.known_noise import drop_torchao_import_noise
from trustregion.penalties import EntropyBonus, ReferenceKL
from trustregion.strategies import (
    StrategyOutput,
    TokenBatch,
    TrustRegionStrategy,
    available_strategies,
    get_strategy,
    register_strategy,
)

drop_torchao_import_noise()  # before transformers imports torchao with the first model class

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
