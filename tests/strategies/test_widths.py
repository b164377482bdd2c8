"""One naming rule for every registered strategy's hyperparameters.

* a width with one-sided overrides comes as a triple ``X``, ``X_low``, ``X_high``;
* a one-sided value left at None inherits the symmetric one (it is exactly as if set to it);
* inf means no bound: every widening width at inf gives the strategy's limit weight;
* no strategy hyperparameter reuses a name that the sampler or a penalty gives another meaning.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch

from trustregion.penalties import EntropyBonus, ReferenceKL
from trustregion.rollout import SamplingSettings
from trustregion.strategies import (
    CISPO,
    GSPO,
    SPO,
    DivergenceMask,
    RatioClip,
    TrustRegionStrategy,
    available_strategies,
    get_strategy,
    strategy_class,
)
from trustregion.testing import autograd_weight, probe_batch

F64 = torch.float64
STRATEGIES = available_strategies()


def parameters(cls: type[TrustRegionStrategy]) -> dict[str, inspect.Parameter]:
    return {name: p for name, p in inspect.signature(cls.__init__).parameters.items()
            if name != "self"}


def sided(cls: type[TrustRegionStrategy]) -> list[str]:
    """The symmetric names X that come with X_low and X_high."""
    names = parameters(cls)
    return [name for name in names if f"{name}_low" in names and f"{name}_high" in names]


def probe() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ν, π and Â on a grid that moves tokens up and down, with both signs of Â."""
    nu = torch.tensor([0.05, 0.3, 0.5, 0.7], dtype=F64)
    factors = torch.tensor([0.3, 0.6, 0.9, 0.99, 1.0, 1.01, 1.1, 1.3, 1.6], dtype=F64)
    grid_nu, grid_f, adv = torch.meshgrid(nu, factors, torch.tensor([1.0, -1.0], dtype=F64),
                                          indexing="ij")
    pi = (grid_nu * grid_f).clamp(max=0.999)
    return grid_nu.reshape(-1), pi.reshape(-1), adv.reshape(-1)


def weights(strategy: TrustRegionStrategy) -> torch.Tensor:
    nu, pi, adv = probe()
    auto, declared = autograd_weight(strategy, probe_batch(nu, pi, adv))
    torch.testing.assert_close(auto, declared, atol=1e-9, rtol=1e-9)
    return declared


@pytest.mark.parametrize("name", STRATEGIES)
def test_one_sided_names_come_with_their_symmetric_value(name: str) -> None:
    names = parameters(strategy_class(name))
    for param in names:
        for suffix in ("_low", "_high"):
            if param.endswith(suffix):
                base = param.removesuffix(suffix)
                other = "_high" if suffix == "_low" else "_low"
                assert base in names and base + other in names, (
                    f"{name}: {param} needs {base} and {base + other} (the symmetric value and "
                    "the other side)")


@pytest.mark.parametrize("name", [n for n in STRATEGIES if sided(strategy_class(n))])
def test_none_on_one_side_inherits_the_symmetric_value(name: str) -> None:
    cls = strategy_class(name)
    for base in sided(cls):
        value = 0.13
        inheriting = cls(**{base: value, f"{base}_low": None, f"{base}_high": None})
        explicit = cls(**{base: value, f"{base}_low": value, f"{base}_high": value})
        torch.testing.assert_close(weights(inheriting), weights(explicit), atol=0, rtol=0)
        # one side set, the other still follows the symmetric value
        for side, other in (("_low", "_high"), ("_high", "_low")):
            one = cls(**{base: value, base + side: 0.31, base + other: None})
            both = cls(**{base: value, base + side: 0.31, base + other: value})
            torch.testing.assert_close(weights(one), weights(both), atol=0, rtol=0)


def widening(cls: type[TrustRegionStrategy]) -> list[str]:
    """Widths that widen the region as they grow (dro's penalty_strength widens towards 0)."""
    return [width for width, direction in cls.widths.items() if direction > 0]


@pytest.mark.parametrize("name", [n for n in STRATEGIES if widening(strategy_class(n))])
def test_inf_means_no_bound(name: str) -> None:
    strategy = get_strategy(name)
    no_bound = dict.fromkeys(widening(type(strategy)), math.inf)
    unbounded = type(strategy)(**{**strategy.hparams(), **no_bound})
    nu, pi, adv = probe()
    batch = probe_batch(nu, pi, adv)
    limit = unbounded.limit_weight(unbounded.prepare(batch))
    torch.testing.assert_close(weights(unbounded), limit, atol=1e-12, rtol=1e-12)
    assert not bool(unbounded(batch).outside.any())


def test_defaults_keep_each_strategys_region() -> None:
    assert RatioClip().bounds == (0.8, 1.2)
    assert RatioClip().dual_clip_cap == math.inf
    assert CISPO().bounds == (-math.inf, 1.28)
    assert GSPO().bounds == (1 - 3e-4, 1 + 4e-4)
    assert SPO().epsilons == (0.2, 0.2)
    assert DivergenceMask().deltas == (0.15, 0.15)
    assert DivergenceMask(divergence="binary_kl").deltas == (0.05, 0.05)
    assert DivergenceMask().importance_weight_cap == 10.0
    assert DivergenceMask().divergence_top_k == 8


def test_no_strategy_name_means_something_else_elsewhere() -> None:
    taken = {f.name: "SamplingSettings" for f in dataclasses.fields(SamplingSettings)}
    for penalty in (ReferenceKL, EntropyBonus):
        taken.update(dict.fromkeys(
            (n for n in inspect.signature(penalty.__init__).parameters if n != "self"),
            penalty.__name__))
    for name in STRATEGIES:
        clash = set(parameters(strategy_class(name))) & set(taken)
        assert not clash, f"{name} reuses {sorted(clash)} of {[taken[c] for c in sorted(clash)]}"


def test_scale_width_leaves_inherited_and_unbounded_widths_alone() -> None:
    strategy = RatioClip(epsilon=0.2, epsilon_high=0.28)
    strategy.scale_width(2.0)
    assert (strategy.epsilon, strategy.epsilon_low, strategy.epsilon_high) == \
        pytest.approx((0.4, None, 0.56))
    assert strategy.dual_clip_cap == math.inf
    cispo = CISPO()
    cispo.scale_width(0.5)
    assert cispo.bounds == pytest.approx((-math.inf, 1.14))
