from __future__ import annotations

import numpy as np
import pytest
import torch

from trustregion.plots import (
    builtin_strategies,
    save_weight_curves,
    weight_curve,
    weight_curves_figure,
)
from trustregion.plots.weight_curves import probe_probabilities
from trustregion.strategies import (
    DRPO,
    AnchoredTokens,
    ImportanceSampledPG,
    RatioClip,
    StrategyTerms,
    TrustRegionStrategy,
    available_strategies,
)


class DeclaresZero(TrustRegionStrategy):
    """Objective r·Â (true weight 1) but declares w = 0: a strategy that fails the harness."""

    def terms(self, tokens: AnchoredTokens) -> StrategyTerms:
        return StrategyTerms(objective=tokens.ratio * tokens.advantages,
                             weight=torch.zeros_like(tokens.ratio),
                             outside=torch.zeros_like(tokens.mask))


def lines_by_label(ax) -> dict[str, np.ndarray]:
    return {line.get_label(): np.asarray(line.get_ydata()) for line in ax.get_lines()
            if not line.get_label().startswith("_")}


def test_ratio_clip_curve_matches_hand_values():
    # ε = 0.2, μ = 0.5: the region is r = π/μ ∈ [0.8, 1.2], i.e. π ∈ [0.4, 0.6].
    # Â > 0 is clipped only above: π = 0.55 (r 1.1) → 1, π = 0.65 (r 1.3) → 0, π = 0.3 (r 0.6) → 1.
    # Â < 0 is clipped only below: π = 0.35 (r 0.7) → 0, π = 0.45 (r 0.9) → 1, π = 0.65 → 1.
    probs = [0.3, 0.35, 0.45, 0.55, 0.65]
    strategy = RatioClip(epsilon=0.2)
    assert weight_curve(strategy, 0.5, 1.0, probs).tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert weight_curve(strategy, 0.5, -1.0, probs).tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    # μ = 0.2: π = 0.23 is r 1.15 (inside) → 1; π = 0.25 is r 1.25 > 1.2 → 0.
    assert weight_curve(strategy, 0.2, 1.0, [0.23, 0.25]).tolist() == [1.0, 0.0]


def test_pg_is_curve_is_one_everywhere():
    # J = r·Â, so ∂J/∂log π = r·Â and w = 1 at every π, μ and sign of Â.
    probs = probe_probabilities(50)
    for mu in (0.2, 0.8):
        for adv in (1.0, -2.0):
            np.testing.assert_allclose(weight_curve(ImportanceSampledPG(), mu, adv, probs), 1.0,
                                       rtol=1e-12)


def test_drpo_curve_matches_its_formula():
    # w = 1 − sign(Â)(π − μ)/δ with δ = 0.15, μ = 0.5:
    # Â > 0: π = 0.65 → 1 − 0.15/0.15 = 0; π = 0.8 → 1 − 0.3/0.15 = −1; π = 0.35 → 1 + 1 = 2.
    # Â < 0: π = 0.8 → 1 + 0.3/0.15 = 3.
    np.testing.assert_allclose(weight_curve(DRPO(delta=0.15), 0.5, 1.0, [0.65, 0.8, 0.35]),
                               [0.0, -1.0, 2.0], atol=1e-9)
    np.testing.assert_allclose(weight_curve(DRPO(delta=0.15), 0.5, -1.0, [0.8]), [3.0],
                               atol=1e-9)


def test_curve_is_the_autograd_weight_not_the_declared_one():
    # The strategy declares w = 0, but its loss −r·Â has gradient weight 1: the curve shows
    # the gradient that training applies.
    np.testing.assert_allclose(weight_curve(DeclaresZero(), 0.5, 1.0, [0.2, 0.5, 0.9]), 1.0,
                               rtol=1e-12)


def test_figure_has_a_column_per_mu_a_row_per_sign_and_a_line_per_strategy():
    strategies = {"ratio_clip": RatioClip(epsilon=0.2), "pg_is": ImportanceSampledPG()}
    fig = weight_curves_figure(strategies, behavior_probs=(0.2, 0.5), points=99)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == [
        "μ = 0.2, Â > 0", "μ = 0.5, Â > 0", "μ = 0.2, Â < 0", "μ = 0.5, Â < 0"]
    probs = probe_probabilities(99)  # 0.01, 0.02, …, 0.99
    for ax in axes:
        lines = lines_by_label(ax)
        assert list(lines) == ["ratio_clip", "pg_is"]
        for line in ax.get_lines():
            if not line.get_label().startswith("_"):
                np.testing.assert_allclose(line.get_xdata(), probs)
        np.testing.assert_allclose(lines["pg_is"], 1.0, rtol=1e-12)
    # μ = 0.5, Â > 0: ratio_clip has w = 1 up to π = 0.60 (r = 1.2) and 0 from π = 0.61
    clip = lines_by_label(axes[1])["ratio_clip"]
    assert set(clip[:60].tolist()) == {1.0} and set(np.abs(clip[60:]).tolist()) == {0.0}
    # μ = 0.5, Â < 0: 0 below π = 0.40 (r = 0.8), 1 from π = 0.40 on
    clip = lines_by_label(axes[3])["ratio_clip"]
    assert set(np.abs(clip[:39]).tolist()) == {0.0} and set(clip[39:].tolist()) == {1.0}
    assert [text.get_text() for text in fig.legends[0].get_texts()] == ["ratio_clip", "pg_is"]


def test_every_builtin_is_drawn_at_default_widths(tmp_path):
    builtins = builtin_strategies()
    assert sorted(builtins) == sorted(name for name in available_strategies()
                                      if name in builtins)
    assert {"ratio_clip", "dppo", "drpo", "pg_is"} <= set(builtins)
    assert builtins["ratio_clip"].hparams() == RatioClip().hparams()
    path = save_weight_curves(builtins, tmp_path / "all.png", points=20)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kwargs, message", [
    ({"strategies": {}}, "strategies must be a non-empty mapping"),
    ({"strategies": {"x": "ratio_clip"}}, "these are not: {'x': 'str'}"),
    ({"behavior_probs": (0.5, 1.0)}, r"behavior_probs must be a finite number in \(0.0, 1.0\)"),
    ({"behavior_probs": ()}, "behavior_probs must hold at least one"),
    ({"points": 1}, "points must be an integer ≥ 2"),
])
def test_bad_arguments_are_refused(kwargs, message):
    arguments = {"strategies": {"pg_is": ImportanceSampledPG()}, **kwargs}
    with pytest.raises(ValueError, match=message):
        weight_curves_figure(**arguments)


def test_weight_curve_refuses_zero_advantage_and_bad_probabilities():
    with pytest.raises(ValueError, match="advantage must be non-zero"):
        weight_curve(RatioClip(), 0.5, 0.0, [0.5])
    with pytest.raises(ValueError, match=r"probs must be .* in \(0, 1\)"):
        weight_curve(RatioClip(), 0.5, 1.0, [0.0, 0.5])
