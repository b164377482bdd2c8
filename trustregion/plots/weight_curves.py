"""Gradient-weight curves: the weight w a strategy gives a token, against the policy's
probability π of that token, for a few behaviour probabilities μ and both signs of Â.

The curves are measured, not drawn from a formula: each point is the autograd gradient of the
strategy's own loss on a one-token probe batch (:func:`trustregion.testing.probe_batch`),
``w = −∂loss/∂log π ÷ (Â·r)`` with ``r = π/μ``, exactly as
:func:`trustregion.testing.autograd_weight` computes it. That is the gradient training applies,
so a picture can never disagree with the code, even for a strategy whose declared
``StrategyOutput.weight`` is wrong (for a strategy that passes
:func:`~trustregion.testing.check_strategy` the two are equal).

Example::

    from trustregion.plots import save_weight_curves
    from trustregion.strategies import DRPO, RatioClip
    save_weight_curves({"ratio_clip": RatioClip(), "drpo": DRPO()}, "weights.png")
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from matplotlib.figure import Figure

from trustregion.plots.drawing import (
    COLORS,
    LINE_STYLES,
    fit_title,
    new_figure,
    save_figure,
    styled,
)
from trustregion.validation import integer_at_least, number_in, require

if TYPE_CHECKING:
    from trustregion.strategies import TrustRegionStrategy

__all__ = [
    "ADVANTAGE_ROWS",
    "builtin_strategies",
    "probe_probabilities",
    "save_weight_curves",
    "weight_curve",
    "weight_curves_figure",
]

ADVANTAGE_ROWS: tuple[tuple[float, str], ...] = (
    (1.0, "Â > 0: raise the token's probability"),
    (-1.0, "Â < 0: lower the token's probability"),
)
"""The advantage of each row of :func:`weight_curves_figure` and the row's title."""

CURVE_COLORS = (COLORS["blue"], COLORS["orange"], COLORS["red"], COLORS["green"],
                COLORS["purple"], COLORS["brown"], COLORS["teal"], "#c9a227", "#d66ba0", "#222222")
"""Line colours, in order; grey is kept for the reference lines."""
W_AXIS_BOUNDS = (-3.0, 4.0)
"""The widest w axis drawn: the axis spans the curves' values plus a margin (and always 0 and
1), but never beyond these bounds, so that one steep curve cannot flatten the others; a curve
that leaves them is named in a note under the figure."""


def probe_probabilities(points: int) -> np.ndarray:
    """``points`` values of π spread evenly over the open interval (0, 1), ends excluded.

    >>> probe_probabilities(3).tolist()
    [0.25, 0.5, 0.75]
    """
    points = integer_at_least("points", points, 2)
    return np.linspace(0.0, 1.0, points + 2)[1:-1]


def weight_curve(strategy: TrustRegionStrategy, behavior_prob: float, advantage: float,
                 probs: Sequence[float] | np.ndarray) -> np.ndarray:
    """The autograd gradient weight of ``strategy`` at each π in ``probs``, for a sampled
    token with behaviour probability μ = ``behavior_prob`` and advantage ``advantage``.

    The strategy is called on a copy, so the caller's instance is left as it was. A strategy
    anchored on the old policy sees π_old = μ.

    Example:
        >>> from trustregion.strategies import RatioClip
        >>> weight_curve(RatioClip(epsilon=0.2), 0.5, 1.0, [0.55, 0.65]).tolist()
        [1.0, 0.0]
    """
    from trustregion.testing import autograd_weight, probe_batch

    behavior_prob = number_in("behavior_prob", behavior_prob, 0.0, 1.0, high_inclusive=False)
    advantage = float(advantage)
    require(advantage != 0.0, "advantage must be non-zero (a token with Â = 0 has no "
                              "gradient, so its weight is undefined); got 0")
    pi = torch.as_tensor(np.asarray(probs, dtype=np.float64))
    require(pi.ndim == 1 and len(pi) > 0 and bool(((pi > 0) & (pi < 1)).all()),
            f"probs must be a non-empty 1-D sequence of probabilities in (0, 1); got "
            f"{np.asarray(probs).tolist()[:5]}")
    n = len(pi)
    batch = probe_batch(torch.full((n,), behavior_prob, dtype=torch.float64), pi,
                        torch.full((n,), advantage, dtype=torch.float64))
    auto, _ = autograd_weight(copy.deepcopy(strategy), batch)
    return auto[:, 0].numpy() + 0.0  # −0.0 (a zero gradient over Â > 0) reads as 0.0


def builtin_strategies() -> dict[str, TrustRegionStrategy]:
    """Every strategy that ships with trustregion, by registered name, at its default widths
    (strategies registered by plug-ins or user code are left out)."""
    from trustregion.strategies import available_strategies, strategy_class

    found = {}
    for name in available_strategies():
        cls = strategy_class(name)
        if cls.__module__.startswith("trustregion."):
            found[name] = cls()
    return found


def _check_strategies(strategies: Mapping[str, TrustRegionStrategy]) -> None:
    from trustregion.strategies import TrustRegionStrategy

    require(isinstance(strategies, Mapping) and len(strategies) > 0,
            f"strategies must be a non-empty mapping of label → strategy; got {strategies!r}")
    wrong = {label: type(s).__name__ for label, s in strategies.items()
             if not isinstance(s, TrustRegionStrategy)}
    require(not wrong, f"strategies must map labels to TrustRegionStrategy instances; "
                       f"these are not: {wrong}")


def _w_axis(curves: Mapping[tuple[float, float, str], np.ndarray]
            ) -> tuple[tuple[float, float], list[str]]:
    """The w axis limits for ``curves`` and the labels of the curves that leave them."""
    values = np.concatenate([w[np.isfinite(w)] for w in curves.values()] + [np.array([0., 1.])])
    low, high = max(float(values.min()), W_AXIS_BOUNDS[0]), min(float(values.max()),
                                                                 W_AXIS_BOUNDS[1])
    pad = 0.08 * (high - low)
    limits = (low - pad, high + pad)
    cut = sorted({label for (_, _, label), w in curves.items()
                  if np.nanmin(w) < limits[0] or np.nanmax(w) > limits[1]})
    return limits, cut


def weight_curves_figure(strategies: Mapping[str, TrustRegionStrategy],
                         behavior_probs: Sequence[float] = (0.2, 0.5, 0.8),
                         points: int = 400) -> Figure:
    """Gradient weight w against π, one column per μ in ``behavior_probs`` and one row per sign
    of Â (:data:`ADVANTAGE_ROWS`), one line per strategy, labelled by its key in
    ``strategies``. Each point is measured with :func:`weight_curve` at ``points`` values of π
    (:func:`probe_probabilities`).

    Reference lines: w = 1 (plain importance sampling), w = 0 (no gradient) and π = μ (on
    policy, where every conforming strategy has w = 1).
    """
    _check_strategies(strategies)
    mus = [number_in("behavior_probs", mu, 0.0, 1.0, high_inclusive=False)
           for mu in behavior_probs]
    require(len(mus) > 0, "behavior_probs must hold at least one value of μ in (0, 1)")
    probs = probe_probabilities(points)
    curves = {(advantage, mu, label): weight_curve(strategy, mu, advantage, probs)
              for advantage, _ in ADVANTAGE_ROWS for mu in mus
              for label, strategy in strategies.items()}
    y_limits, cut = _w_axis(curves)
    with styled():
        fig = new_figure(3.6 * len(mus) + 0.6, 6.0)
        axes = fig.subplots(len(ADVANTAGE_ROWS), len(mus), sharex=True, sharey=True,
                            squeeze=False)
        for row, (advantage, row_title) in enumerate(ADVANTAGE_ROWS):
            for column, mu in enumerate(mus):
                ax = axes[row, column]
                ax.axhline(1.0, color=COLORS["grey"], linestyle="--", linewidth=0.8)
                ax.axhline(0.0, color=COLORS["grey"], linewidth=0.8)
                ax.axvline(mu, color=COLORS["grey"], linestyle=":", linewidth=0.9)
                for index, label in enumerate(strategies):
                    weights = curves[advantage, mu, label]
                    dashes, width = LINE_STYLES[index % len(LINE_STYLES)]
                    if len(strategies) == 1:
                        dashes, width = "-", 1.8
                    color = CURVE_COLORS[index % len(CURVE_COLORS)]
                    ax.plot(probs, weights, color=color, linestyle=dashes, linewidth=width,
                            label=label)
                ax.set_xlim(0.0, 1.0)
                ax.set_ylim(*y_limits)
                ax.set_title(f"μ = {mu:g}, Â {'>' if advantage > 0 else '<'} 0")
                if row == len(ADVANTAGE_ROWS) - 1:
                    ax.set_xlabel("π (policy probability of the sampled token)")
            axes[row, 0].set_ylabel(f"gradient weight w\n{row_title.split(': ')[1]}")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        note = "dashed: w = 1 (plain importance sampling) · dotted: π = μ"
        if cut:
            note += f" · cut off at the edge of the w axis: {', '.join(cut)}"
        legend = fig.legend(handles, labels, loc="outside lower center",
                            ncols=min(len(labels), 5), title=note, title_fontsize=8)
        legend.get_title().set_color(COLORS["grey"])
        fit_title(fig, "Gradient weight w against the policy probability π",
                  fontsize=12, fontweight="bold")
    return fig


def save_weight_curves(strategies: Mapping[str, TrustRegionStrategy], path: str | Path,
                       behavior_probs: Sequence[float] = (0.2, 0.5, 0.8),
                       points: int = 400) -> Path:
    """Draw :func:`weight_curves_figure` and write it as a PNG at ``path`` (creating the
    folder); returns the path."""
    return save_figure(weight_curves_figure(strategies, behavior_probs, points), path)
