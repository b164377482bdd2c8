"""Every registered strategy, and the notable variants, through the one conformance harness."""

from __future__ import annotations

import math

import pytest

from trustregion.strategies import (
    CISPO,
    DRPO,
    SPO,
    DivergenceMask,
    LogRatioQuadratic,
    RatioClip,
    TrustRegionStrategy,
    available_strategies,
    get_strategy,
)
from trustregion.testing import CONFORMANCE_CHECKS, run_check

VARIANTS: dict[str, TrustRegionStrategy] = {
    **{name: get_strategy(name) for name in available_strategies()},
    "ratio_clip_dapo_dual": RatioClip(epsilon_low=0.2, epsilon_high=0.28, dual_clip_cap=3.0),
    "ratio_clip_old_anchor": RatioClip(anchor="old"),
    "ratio_clip_unbounded_below": RatioClip(epsilon_low=math.inf),
    "dppo_binary_kl": DivergenceMask(divergence="binary_kl"),
    "dppo_topk_tv": DivergenceMask(divergence="topk_tv"),
    "dppo_topk_kl": DivergenceMask(divergence="topk_kl"),
    "dppo_asymmetric_uncapped": DivergenceMask(delta_low=0.1, delta_high=0.2,
                                               importance_weight_cap=math.inf),
    "drpo_asymmetric": DRPO(delta_low=0.1, delta_high=0.2),
    "drpo_old_anchor": DRPO(anchor="old"),
    "cispo_two_sided": CISPO(epsilon_low=0.2),
    "spo_narrow": SPO(epsilon=0.1),
    "spo_asymmetric": SPO(epsilon_low=0.1, epsilon_high=0.3),
    "dro_half": LogRatioQuadratic(penalty_strength=0.5),
}

# Checks a strategy may legitimately skip, and why; anything else skipping is a failure.
EXPECTED_SKIPS = {
    ("pg_is", "regions"),  # no trust region, so no boundary
    ("pg_is", "limit"),  # no width to loosen: it *is* the limit
    ("drpo_reference", "regions"),  # δ = 12.5 puts the boundary outside (0, 1)
    ("dppo_topk_tv", "regions"),  # top-K boundaries depend on the whole distribution
    ("dppo_topk_kl", "regions"),
}


@pytest.mark.parametrize("check", list(CONFORMANCE_CHECKS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_conformance(variant: str, check: str) -> None:
    reason = run_check(check, VARIANTS[variant])
    if (variant, check) in EXPECTED_SKIPS:
        assert reason is not None, f"{variant} unexpectedly ran {check}; update EXPECTED_SKIPS"
    else:
        assert reason is None, f"{variant} skipped {check}: {reason}"


def test_every_registered_strategy_is_covered() -> None:
    assert set(available_strategies()) <= set(VARIANTS)
