"""The charts of a run: pure drawing functions over plain data.

:func:`plot_reward`, :func:`plot_drift_panel` and :func:`plot_weight_vs_shift` draw one PNG each
and return its path, or None when the data holds nothing to draw; :func:`reward_figure`,
:func:`drift_figure` and :func:`weight_vs_shift_figure` return the figure instead. Every chart
works with whatever subset of metric columns exists: a missing key, an empty cell or a series
with no finite value only removes the line or panel that needed it.

Each line of the drift panel reads exactly one logged key (:data:`DRIFT_PANELS`), so two runs
always draw the same statistic: the out-of-region, zero-weight and negative-weight fractions and
their split by the sign of Â are the strategy's own ``trust_region/*`` metrics, which every run
logs for every rollout batch; only the split by μ, which no strategy logs, comes from
``DriftMonitor``'s ``region/*_nu_*`` keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from trustregion.plots.drawing import (
    COLORS,
    STEP_LABEL,
    Line,
    Panel,
    draw_series,
    finite_series,
    fit_title,
    new_figure,
    panel_figure,
    rolling_mean,
    save_figure,
    smoothing_note,
    styled,
    window_for,
)
from trustregion.plots.runs import Metrics
from trustregion.validation import require

if TYPE_CHECKING:
    from trustregion.strategies import TrustRegionStrategy

__all__ = [
    "DRIFT_PANELS",
    "drift_figure",
    "drift_panel_keys",
    "inferred_reward_range",
    "logged_widths",
    "plot_drift_panel",
    "plot_reward",
    "plot_weight_vs_shift",
    "reward_figure",
    "rolling_mean",
    "strategy_label",
    "weight_chart_title",
    "weight_vs_shift_figure",
]

POS_COLOR, NEG_COLOR = COLORS["teal"], COLORS["red"]


# ---------------------------------------------------------------------------------- titles
def strategy_label(name: str, hparams: Mapping[str, Any]) -> str:
    """``DRPO(delta=0.15, anchor=behavior)``: the settings that are not None (inherited) and
    not inf (no bound)."""
    settings = ", ".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                         for key, value in hparams.items()
                         if value is not None and value != math.inf)
    return f"{name}({settings})"


def logged_widths(strategy: TrustRegionStrategy, metrics: Metrics) -> dict[str, float]:
    """The last finite value the width controller logged (``controller/<name>``) of each of
    ``strategy``'s width hyperparameters; widths it never logged are left out."""
    found = {}
    for name in strategy.widths:
        values = finite_series(metrics.get(f"controller/{name}"))[1]
        if len(values):
            found[name] = float(values[-1])
    return found


def weight_chart_title(strategy: TrustRegionStrategy | None,
                       widths: Mapping[str, float] | None = None) -> str:
    """Title of the weight chart naming ``strategy`` and its settings ("" without one).

    ``widths`` are the current values of width hyperparameters (e.g. :func:`logged_widths`),
    shown in place of the strategy's own, which are the values it started with; a second line
    names each width that moved, from its start to its current value.

    Example:
        >>> from trustregion.strategies import DRPO
        >>> print(weight_chart_title(DRPO(delta=0.15), {"delta": 0.2}))
        DRPO(delta=0.2, anchor=behavior): gradient weight against probability shift
        widths set by the width controller: delta 0.15 at the start → 0.2 at the end
    """
    if strategy is None:
        return ""
    hparams = strategy.hparams()
    widths = dict(widths or {})
    unknown = sorted(set(widths) - set(hparams))
    require(not unknown, f"widths {unknown} are not hyperparameters of "
                         f"{type(strategy).__name__}; it has {sorted(hparams)}")
    moved = {name: (hparams[name], float(f"{value:.4g}")) for name, value in widths.items()
             if hparams[name] is None or not math.isclose(value, hparams[name], rel_tol=1e-6)}
    current = {**hparams, **{name: new for name, (_, new) in moved.items()}}
    title = (f"{strategy_label(type(strategy).__name__, current)}: gradient weight against "
             f"probability shift")
    if moved:
        changes = ", ".join(f"{name} {'unset' if old is None else f'{old:g}'} at the start → "
                            f"{new:g} at the end" for name, (old, new) in moved.items())
        title += f"\nwidths set by the width controller: {changes}"
    return title


# ------------------------------------------------------------------------------ reward.png
def inferred_reward_range(metrics: Metrics) -> tuple[float, float] | None:
    """``(0, 1)`` when every logged mean reward lies in [0, 1], as the built-in tasks' rewards
    (exact match: 0 or 1; partial credit: a fraction) do; None otherwise (no range assumed)."""
    means = finite_series(metrics.get("reward/mean"))[1]
    if len(means) and means.min() >= 0.0 and means.max() <= 1.0:
        return (0.0, 1.0)
    return None


def reward_figure(metrics: Metrics, reward_range: tuple[float, float] | None = None
                  ) -> Figure | None:
    """The figure of :func:`plot_reward`; None when ``reward/mean`` has no finite value."""
    steps, mean = finite_series(metrics.get("reward/mean"))
    if len(mean) == 0:
        return None
    if reward_range is None:
        reward_range = inferred_reward_range(metrics)
    else:
        bounds = tuple(reward_range)
        require(len(bounds) == 2 and all(isinstance(v, int | float) and not isinstance(v, bool)
                                         and math.isfinite(v) for v in bounds)
                and bounds[0] < bounds[1],
                f"reward_range must be (low, high) with finite low < high; got {reward_range!r}")
        reward_range = (float(bounds[0]), float(bounds[1]))
    zero_steps, zero_std = finite_series(metrics.get("reward/frac_zero_std"))
    with styled():
        fig = new_figure(8.5, 6.0 if len(zero_std) else 4.2)
        if len(zero_std):
            ax, ax_zero = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.3])
        else:
            ax, ax_zero = fig.subplots(1, 1), None
        window = window_for(len(mean))
        smooth = rolling_mean(mean, window)
        std_by_step = dict(zip(*finite_series(metrics.get("reward/std")), strict=True))
        std = np.array([std_by_step.get(s, np.nan) for s in steps])
        if np.isfinite(std).sum() >= 2:
            have = np.isfinite(std)
            band = rolling_mean(std[have], window)
            low_edge, high_edge = smooth[have] - band, smooth[have] + band
            label = "± 1 std of the rewards"
            if reward_range is not None:  # no reward lies outside its range
                low_edge, high_edge = (np.clip(edge, *reward_range)
                                       for edge in (low_edge, high_edge))
                label += f", within [{reward_range[0]:g}, {reward_range[1]:g}]"
            ax.fill_between(steps[have], low_edge, high_edge, color=COLORS["blue"],
                            alpha=0.12, linewidth=0, label=label)
        draw_series(ax, steps, mean, COLORS["blue"], "mean reward")
        ax.set_ylabel("reward")
        ax.set_title("Reward")
        start, end = smooth[0], smooth[-1]
        ax.text(0.01, 0.97, f"start {start:.3g} → end {end:.3g}", transform=ax.transAxes,
                va="top", ha="left", fontsize=9,
                bbox={"boxstyle": "round,pad=0.3", "facecolor": "white", "alpha": 0.8,
                      "edgecolor": "#cccccc"})
        ax.legend(loc="lower right")
        if ax_zero is not None:
            draw_series(ax_zero, zero_steps, zero_std, COLORS["grey"],
                        "groups with equal rewards")
            ax_zero.set_ylim(-0.03, 1.03)
            ax_zero.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
            ax_zero.set_ylabel("of groups")
            ax_zero.set_title("Prompt groups with no learning signal (all rewards equal)")
        (ax_zero or ax).set_xlabel(STEP_LABEL)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        note = smoothing_note(metrics, "reward/mean")
        if note:
            fig.supxlabel(note, fontsize=7, color=COLORS["grey"])
    return fig


def plot_reward(metrics: Metrics, path: str | Path,
                reward_range: tuple[float, float] | None = None) -> Path | None:
    """Mean reward per iteration with its rolling mean and a ±1 std band of the rewards, and
    (when logged) the fraction of prompt groups with zero reward variance below it.

    The band is clipped to ``reward_range``, the values a reward can take (default:
    :func:`inferred_reward_range`, [0, 1] when every mean reward lies in it), so a band of 0/1
    rewards never reaches below 0 or above 1. Returns the PNG's path, or None when
    ``reward/mean`` has no finite value."""
    fig = reward_figure(metrics, reward_range)
    return None if fig is None else save_figure(fig, path)


# ------------------------------------------------------------------------------- drift.png
_B = "drift/behavior/"  # DriftMonitor, π vs μ, over its logging window
_TR = "trust_region/"   # the strategy's own metrics, every rollout batch of every run
_NU = "region/outside_frac_nu_"  # DriftMonitor's split of the outside fraction by μ
DRIFT_PANELS: tuple[Panel, ...] = (
    Panel("KL estimates: policy π vs behaviour μ", "nats / token", (
        Line(_B + "kl_k1", "k1", COLORS["blue"]),
        Line(_B + "kl_k3", "k3", COLORS["orange"]))),
    Panel("Total variation per token", "TV", (
        Line(_B + "tv_mean", "mean", COLORS["blue"]),
        Line(_B + "tv_p99", "p99", COLORS["orange"]),
        Line(_B + "tv_max", "max", COLORS["red"])), log=True),
    # χ² ≥ 0 and its logged estimate E[(r − 1)²] is too; logs from older versions estimated
    # E[r²] − 1, which the noise of E[r] − 1 makes negative when π ≈ μ: drawn at 0, with a note.
    Panel("χ² divergence", "χ²", (Line(_B + "chi2", "χ²", COLORS["purple"]),), log=True,
          nonnegative=True),
    Panel("Effective sample size of π / μ", "of tokens", (
        Line(_B + "ess", "ESS", COLORS["green"]),), unit=True),
    Panel("Importance ratio π / μ", "ratio", (
        Line(_B + "ratio_min", "min", COLORS["green"]),
        Line(_B + "ratio_mean", "mean", COLORS["blue"]),
        Line(_B + "ratio_max", "max", COLORS["red"])), reference=1.0, log=True),
    Panel("Log-perplexity gap", "log PPL(π) − log PPL(μ)", (
        Line(_B + "log_ppl_diff", "gap", COLORS["brown"]),), reference=0.0),
    Panel("Trust region: tokens affected", "of tokens", (
        Line(_TR + "outside_frac", "outside the region", COLORS["red"]),
        Line(_TR + "zero_weight_frac", "zero weight", COLORS["grey"]),
        Line(_TR + "negative_weight_frac", "negative weight", COLORS["purple"])),
        fraction=True),
    Panel("Outside the region, by sign of Â", "of tokens", (
        Line(_TR + "outside_frac_pos_adv", "Â > 0", POS_COLOR),
        Line(_TR + "outside_frac_neg_adv", "Â < 0", NEG_COLOR)), fraction=True),
    Panel("Outside the region, by μ", "of tokens", (
        Line(_NU + "0_0.01", "μ < 0.01", COLORS["purple"]),
        Line(_NU + "0.01_0.1", "0.01 ≤ μ < 0.1", COLORS["red"]),
        Line(_NU + "0.1_0.5", "0.1 ≤ μ < 0.5", COLORS["orange"]),
        Line(_NU + "0.5_1", "μ ≥ 0.5", COLORS["green"])), fraction=True),
    Panel("Gradient weight w", "w", (
        Line(_TR + "weight_min", "min", COLORS["green"]),
        Line(_TR + "weight_mean", "mean", COLORS["blue"]),
        Line(_TR + "weight_max", "max", COLORS["red"])), reference=1.0),
    Panel("Policy entropy", "nats", (
        Line("drift/entropy", "entropy", COLORS["teal"]),
        Line("penalty/entropy", "entropy bonus term", COLORS["purple"]))),
    Panel("Drift from the reference policy", "nats / token", (
        Line("drift/ref/kl_k1", "k1", COLORS["blue"]),
        Line("drift/ref/kl_k3", "k3", COLORS["orange"]),
        Line("penalty/ref_kl", "KL penalty term", COLORS["purple"]))),
    Panel("Gradient norm (before clipping)", "‖g‖", (
        Line("train/grad_norm", "grad norm", COLORS["brown"]),)),
    Panel("Response length", "tokens", (
        Line("response/length_mean", "mean", COLORS["grey"]),)),
)
"""The panels of ``drift.png``, in order; each line draws exactly one logged key."""


def drift_panel_keys() -> list[str]:
    """Every key :func:`plot_drift_panel` reads, one per line, in panel order."""
    return [line.key for panel in DRIFT_PANELS for line in panel.lines]


def drift_figure(metrics: Metrics, columns: int = 3) -> Figure | None:
    """The figure of :func:`plot_drift_panel`; None when no panel has data."""
    note = smoothing_note(metrics, "train/loss") or smoothing_note(metrics, "reward/mean")
    return panel_figure(DRIFT_PANELS, metrics, "Policy drift and trust-region activity", note,
                        columns)


def plot_drift_panel(metrics: Metrics, path: str | Path, columns: int = 3) -> Path | None:
    """A grid of small charts over time (:data:`DRIFT_PANELS`): KL, TV, χ², ESS, importance
    ratios, log-perplexity gap, the trust region's out-of-region / zero-weight /
    negative-weight fractions (the strategy's ``trust_region/*``) and the outside fraction by μ
    (``DriftMonitor``'s ``region/*_nu_*``), weights, entropy, drift from the reference, gradient
    norm and response length. Lines and panels without data are left out; returns None when
    no panel has any."""
    fig = drift_figure(metrics, columns)
    return None if fig is None else save_figure(fig, path)


# --------------------------------------------------------------------- weight_vs_shift.png
SCATTER_MAX_TOKENS = 1500


def _axis_limits(delta: np.ndarray, weight: np.ndarray
                 ) -> tuple[tuple[float, float], tuple[float, float]]:
    """Symmetric Δ range covering 99.9 % of tokens; w range covering 99.9 % plus 0 and 1."""
    span = float(np.quantile(np.abs(delta), 0.999)) * 1.15 if len(delta) else 1.0
    span = min(1.0, max(span, 1e-3))
    lo, hi = (np.quantile(weight, [0.0005, 0.9995]) if len(weight) else (0.0, 1.0))
    lo, hi = min(float(lo), 0.0), max(float(hi), 1.0)
    pad = 0.08 * (hi - lo)
    return (-span, span), (lo - pad, hi + pad)


def weight_vs_shift_figure(samples: Mapping[str, Sequence[float] | np.ndarray],
                           title: str = "") -> Figure | None:
    """The figure of :func:`plot_weight_vs_shift`; None when no token has Â ≠ 0."""
    delta = np.asarray(samples.get("delta", ()), dtype=np.float64)
    weight = np.asarray(samples.get("weight", ()), dtype=np.float64)
    sign = np.asarray(samples.get("adv_sign", ()), dtype=np.float64)
    if not len(delta) == len(weight) == len(sign):
        raise ValueError(f"delta, weight and adv_sign differ in length: "
                         f"{len(delta)}, {len(weight)}, {len(sign)}")
    keep = np.isfinite(delta) & np.isfinite(weight) & (sign != 0)
    if not keep.any():
        return None
    delta, weight, sign = delta[keep], weight[keep], sign[keep]
    (x_lo, x_hi), (y_lo, y_hi) = _axis_limits(delta, weight)
    dense = len(delta) > SCATTER_MAX_TOKENS
    halves = [(sign > 0, "Â > 0: raise the token's probability", POS_COLOR, 1),
              (sign < 0, "Â < 0: lower the token's probability", NEG_COLOR, -1)]
    with styled():
        fig = new_figure(11.0, 5.0)
        axes = fig.subplots(1, 2, sharey=True)
        counts = []
        if dense:
            x_edges = np.linspace(x_lo, x_hi, 91)
            y_edges = np.linspace(y_lo, y_hi, 71)
            counts = [np.histogram2d(delta[m], weight[m], bins=(x_edges, y_edges))[0]
                      for m, *_ in halves]
            norm = LogNorm(vmin=1, vmax=max(2.0, max(float(c.max()) for c in counts)))
        mesh = None
        for index, (ax, (mask, name, color, harmful)) in enumerate(zip(axes, halves,
                                                                       strict=True)):
            # shade the side the policy gradient pushes the token to: where a region bites
            ax.axvspan(0, harmful * x_hi, color=color, alpha=0.07, linewidth=0, zorder=0)
            if not mask.any():
                ax.text(0.5, 0.5, "no tokens", transform=ax.transAxes, ha="center",
                        color=COLORS["grey"])
            elif dense:
                shown = np.ma.masked_equal(counts[index].T, 0)
                mesh = ax.pcolormesh(x_edges, y_edges, shown, norm=norm, cmap="viridis",
                                     rasterized=True, zorder=3)
            else:
                ax.scatter(delta[mask], weight[mask], s=16, alpha=0.7, color=color,
                           edgecolors="none", zorder=3)
            ax.axhline(1.0, color="black", linestyle="--", linewidth=0.9, zorder=2,
                       label="w = 1: plain importance sampling")
            ax.axhline(0.0, color=COLORS["grey"], linestyle="-", linewidth=0.9, zorder=2,
                       label="w = 0: no gradient")
            ax.axvline(0.0, color=COLORS["grey"], linestyle=":", linewidth=0.8, zorder=2)
            ax.set_xlim(x_lo, x_hi)
            ax.set_ylim(y_lo, y_hi)
            side = "Δ > 0" if harmful > 0 else "Δ < 0"
            ax.set_title(f"{name}  (n = {int(mask.sum()):,})\n", fontsize=10)
            ax.text(0.5, 1.02, f"harmful direction (shaded): {side}", transform=ax.transAxes,
                    ha="center", va="bottom", fontsize=8, color=color)
            ax.set_xlabel("Δ = π − μ  (probability shift of the sampled token)")
        axes[0].set_ylabel("gradient weight w")
        if mesh is not None:
            fig.colorbar(mesh, ax=list(axes), label="tokens per bin (log scale)", pad=0.01)
        dropped = int((~keep).sum())
        outside = int(((delta < x_lo) | (delta > x_hi) | (weight < y_lo)
                       | (weight > y_hi)).sum())
        notes = [f"{len(keep):,} sampled tokens"]
        if dropped:
            notes.append(f"{dropped:,} with Â = 0 left out")
        if outside:
            notes.append(f"{outside:,} beyond the axes not shown")
        handles, labels = axes[0].get_legend_handles_labels()
        legend = fig.legend(handles, labels, loc="outside lower center", ncols=2,
                            title=" · ".join(notes), title_fontsize=8)
        legend.get_title().set_color(COLORS["grey"])
        fit_title(fig, title or "Gradient weight against probability shift", fontsize=12,
                  fontweight="bold")
    return fig


def plot_weight_vs_shift(samples: Mapping[str, Sequence[float] | np.ndarray],
                         path: str | Path, title: str = "") -> Path | None:
    """The strategy's gradient weight w against the probability shift Δ = π − μ of sampled
    tokens, one panel for Â > 0 and one for Â < 0 (tokens with Â = 0 carry no gradient and are
    left out). A 2-D histogram with a log colour scale when there are many tokens, a scatter
    when there are few. ``samples`` maps ``delta``, ``weight`` and ``adv_sign`` to equal-length
    sequences (see :data:`TOKEN_SAMPLE_COLUMNS`); ``title`` (e.g. :func:`weight_chart_title`) is
    wrapped to the figure's width. Returns None when no token has Â ≠ 0."""
    fig = weight_vs_shift_figure(samples, title)
    return None if fig is None else save_figure(fig, path)
