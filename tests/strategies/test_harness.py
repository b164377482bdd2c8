"""The harness must catch broken strategies, not just pass good ones."""

from __future__ import annotations

import pytest
import torch

from trustregion.strategies import (
    DRPO,
    AnchoredTokens,
    RatioClip,
    StrategyTerms,
    TrustRegionStrategy,
)
from trustregion.testing import check_strategy, run_check


class WrongDeclaredWeight(RatioClip):
    """Clips correctly but declares w = 1 everywhere."""

    def terms(self, tokens: AnchoredTokens) -> StrategyTerms:
        terms = super().terms(tokens)
        terms.weight = torch.ones_like(terms.weight)
        return terms


class LeaksPadding(TrustRegionStrategy):
    """Ignores the prepared view and reads raw logp, so NaN padding reaches the gradient."""

    def terms(self, tokens: AnchoredTokens) -> StrategyTerms:
        raw = tokens.batch.logp.to(tokens.ratio.dtype)
        return StrategyTerms(objective=raw.exp() * tokens.advantages,
                             weight=tokens.ratio.detach() * 0 + 1,
                             outside=torch.zeros_like(tokens.mask))


class OutsideNeverFlagged(DRPO):
    def terms(self, tokens: AnchoredTokens) -> StrategyTerms:
        terms = super().terms(tokens)
        terms.outside = torch.zeros_like(terms.outside)
        return terms


class CountsOwnPadding(RatioClip):
    """Normalises by its own batch's token count: breaks micro-batch invariance."""

    def terms(self, tokens: AnchoredTokens) -> StrategyTerms:
        terms = super().terms(tokens)
        terms.objective = terms.objective / tokens.mask.sum()
        terms.weight = terms.weight / tokens.mask.sum()
        return terms


class SyncsToHost(DRPO):
    """Reads a value back to Python on every call."""

    def terms(self, tokens: AnchoredTokens) -> StrategyTerms:
        terms = super().terms(tokens)
        if float(tokens.ratio.max()) > 1e6:
            terms.weight = terms.weight * 0
        return terms


@pytest.mark.parametrize(
    ("strategy", "check", "message"),
    [
        (WrongDeclaredWeight(), "gradient_weight", "autograd weight vs declared"),
        (LeaksPadding(), "masking", "masked"),
        (OutsideNeverFlagged(), "regions", "beyond the boundary not counted"),
        (CountsOwnPadding(), "micro_batch", "micro-batch"),
        (SyncsToHost(), "no_host_sync", "synchronises with the host"),
    ],
)
def test_harness_catches(strategy: TrustRegionStrategy, check: str, message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        run_check(check, strategy)


def test_check_strategy_names_the_failing_check() -> None:
    with pytest.raises(AssertionError, match="WrongDeclaredWeight fails check 'gradient_weight'"):
        check_strategy(WrongDeclaredWeight())


def test_check_strategy_reports_passes_and_skips() -> None:
    report = check_strategy(DRPO())
    assert report.skipped == {}
    assert "micro_batch" in report.passed and "regions" in report.passed


def test_unknown_check_name() -> None:
    with pytest.raises(ValueError, match="unknown check 'nope'"):
        run_check("nope", DRPO())
