"""The charts of a run: pure drawing functions over plain data.

Drawn with matplotlib's object API (no pyplot, no global backend change), so they are safe to
call from a training process. :func:`plot_reward`, :func:`plot_drift_panel` and
:func:`plot_weight_vs_shift` draw one PNG each and return its path, or None when the data holds
nothing to draw. Every chart works with whatever subset of metric columns exists: a missing key,
an empty cell or a series with no finite value only removes the line or panel that needed it.

Each line of the drift panel reads exactly one logged key (:data:`DRIFT_PANELS`), so two runs
always draw the same statistic: the out-of-region, zero-weight and negative-weight fractions and
their split by the sign of Â are the strategy's own ``trust_region/*`` metrics, which every run
logs for every rollout batch; only the split by μ, which no strategy logs, comes from
``DriftMonitor``'s ``region/*_nu_*`` keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from trustregion.plots.runs import Metrics, Series

if TYPE_CHECKING:
    from trustregion.strategies import TrustRegionStrategy

__all__ = [
    "DRIFT_PANELS",
    "drift_panel_keys",
    "plot_drift_panel",
    "plot_reward",
    "plot_weight_vs_shift",
    "rolling_mean",
    "strategy_label",
    "weight_chart_title",
]

DPI = 120
STEP_LABEL = "RL iteration (logged step)"
COLORS = {
    "blue": "#3366aa", "orange": "#e08a1e", "red": "#c8433a", "green": "#3a9a5b",
    "purple": "#8256a8", "grey": "#6b6b6b", "teal": "#2a9d9f", "brown": "#8c5a3c",
}
POS_COLOR, NEG_COLOR = COLORS["teal"], COLORS["red"]
STYLE: dict[str, Any] = {
    "font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold", "axes.labelsize": 9,
    "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.6, "axes.spines.top": False,
    "axes.spines.right": False, "legend.fontsize": 8, "legend.frameon": False,
    "figure.facecolor": "white", "savefig.facecolor": "white",
}


# ---------------------------------------------------------------------------------- titles
def strategy_label(name: str, hparams: Mapping[str, Any]) -> str:
    """``DRPO(delta=0.15, anchor=behavior)``: the settings that are not None (inherited) and
    not inf (no bound)."""
    settings = ", ".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                         for key, value in hparams.items()
                         if value is not None and value != math.inf)
    return f"{name}({settings})"


def weight_chart_title(strategy: TrustRegionStrategy | None) -> str:
    """Title of the weight chart naming ``strategy`` and its settings ("" without one)."""
    if strategy is None:
        return ""
    label = strategy_label(type(strategy).__name__, strategy.hparams())
    return f"{label}: gradient weight against probability shift"


# ---------------------------------------------------------------------------- drawing aids
def _finite(series: Series | None) -> tuple[np.ndarray, np.ndarray]:
    if not series:
        return np.empty(0), np.empty(0)
    data = np.asarray(series, dtype=np.float64).reshape(-1, 2)
    keep = np.isfinite(data[:, 1])
    return data[keep, 0], data[keep, 1]


def _window(n: int) -> int:
    """Rolling-mean window for ``n`` points: none below 12, then about n/15 (odd, ≤ 51)."""
    if n < 12:
        return 1
    return min(51, max(3, n // 15)) | 1


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average; the window shrinks at the ends instead of padding."""
    n = len(values)
    if window <= 1 or n == 0:
        return values.astype(np.float64)
    cumsum = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    index = np.arange(n)
    lo = np.clip(index - window // 2, 0, n)
    hi = np.clip(index + window // 2 + 1, 0, n)
    return (cumsum[hi] - cumsum[lo]) / (hi - lo)


def _draw(ax: Axes, steps: np.ndarray, values: np.ndarray, color: str, label: str,
          smooth: bool = True, linestyle: str = "-") -> None:
    """The raw series, faint, under its rolling mean; or one plain line when short."""
    window = _window(len(values)) if smooth else 1
    if window > 1:
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, rolling_mean(values, window), color=color, linewidth=1.8, label=label,
                linestyle=linestyle)
    else:
        ax.plot(steps, values, color=color, linewidth=1.5, label=label, linestyle=linestyle,
                marker="o" if len(values) <= 30 else None, markersize=3)


def _styled() -> AbstractContextManager[Any]:
    """The matplotlib settings every chart here is drawn with."""
    return mpl.rc_context(cast(Any, STYLE))


def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _smoothing_note(metrics: Metrics, key: str) -> str:
    window = _window(len(_finite(metrics.get(key))[1]))
    if window <= 1:
        return ""
    return f"faint: per-iteration values · bold: rolling mean over {window} iterations"


# ------------------------------------------------------------------------------ reward.png
def plot_reward(metrics: Metrics, path: str | Path) -> Path | None:
    """Mean reward per iteration with its rolling mean and a ±1 std band of the rewards, and
    (when logged) the fraction of prompt groups with zero reward variance below it.
    Returns the PNG's path, or None when ``reward/mean`` has no finite value."""
    steps, mean = _finite(metrics.get("reward/mean"))
    if len(mean) == 0:
        return None
    zero_steps, zero_std = _finite(metrics.get("reward/frac_zero_std"))
    with _styled():
        fig = _new_figure(8.5, 6.0 if len(zero_std) else 4.2)
        if len(zero_std):
            ax, ax_zero = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.3])
        else:
            ax, ax_zero = fig.subplots(1, 1), None
        window = _window(len(mean))
        smooth = rolling_mean(mean, window)
        std_by_step = dict(zip(*_finite(metrics.get("reward/std")), strict=True))
        std = np.array([std_by_step.get(s, np.nan) for s in steps])
        if np.isfinite(std).sum() >= 2:
            have = np.isfinite(std)
            band = rolling_mean(std[have], window)
            ax.fill_between(steps[have], smooth[have] - band, smooth[have] + band,
                            color=COLORS["blue"], alpha=0.12, linewidth=0,
                            label="± 1 std of the rewards")
        _draw(ax, steps, mean, COLORS["blue"], "mean reward")
        ax.set_ylabel("reward")
        ax.set_title("Reward")
        start, end = smooth[0], smooth[-1]
        ax.text(0.01, 0.97, f"start {start:.3g} → end {end:.3g}", transform=ax.transAxes,
                va="top", ha="left", fontsize=9,
                bbox={"boxstyle": "round,pad=0.3", "facecolor": "white", "alpha": 0.8,
                      "edgecolor": "#cccccc"})
        ax.legend(loc="lower right")
        if ax_zero is not None:
            _draw(ax_zero, zero_steps, zero_std, COLORS["grey"], "groups with equal rewards")
            ax_zero.set_ylim(-0.03, 1.03)
            ax_zero.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
            ax_zero.set_ylabel("of groups")
            ax_zero.set_title("Prompt groups with no learning signal (all rewards equal)")
        (ax_zero or ax).set_xlabel(STEP_LABEL)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        note = _smoothing_note(metrics, "reward/mean")
        if note:
            fig.supxlabel(note, fontsize=7, color=COLORS["grey"])
        return _save(fig, path)


# ------------------------------------------------------------------------------- drift.png
@dataclass(frozen=True)
class _Line:
    key: str  # the one logged key this line draws
    label: str
    color: str


@dataclass(frozen=True)
class _Panel:
    title: str
    ylabel: str
    lines: tuple[_Line, ...]
    reference: float | None = None  # a dotted horizontal line (e.g. ratio = 1)
    fraction: bool = False  # percentage axis from 0
    unit: bool = False  # percentage axis up to 100 % (a value in (0, 1])
    log: bool = False  # log scale when positive and spanning > 2 decades


_B = "drift/behavior/"  # DriftMonitor, π vs μ, over its logging window
_TR = "trust_region/"   # the strategy's own metrics, every rollout batch of every run
_NU = "region/outside_frac_nu_"  # DriftMonitor's split of the outside fraction by μ
DRIFT_PANELS: tuple[_Panel, ...] = (
    _Panel("KL estimates: policy π vs behaviour μ", "nats / token", (
        _Line(_B + "kl_k1", "k1", COLORS["blue"]),
        _Line(_B + "kl_k3", "k3", COLORS["orange"]))),
    _Panel("Total variation per token", "TV", (
        _Line(_B + "tv_mean", "mean", COLORS["blue"]),
        _Line(_B + "tv_p99", "p99", COLORS["orange"]),
        _Line(_B + "tv_max", "max", COLORS["red"])), log=True),
    _Panel("χ² divergence", "χ²", (_Line(_B + "chi2", "χ²", COLORS["purple"]),), log=True),
    _Panel("Effective sample size of π / μ", "of tokens", (
        _Line(_B + "ess", "ESS", COLORS["green"]),), unit=True),
    _Panel("Importance ratio π / μ", "ratio", (
        _Line(_B + "ratio_min", "min", COLORS["green"]),
        _Line(_B + "ratio_mean", "mean", COLORS["blue"]),
        _Line(_B + "ratio_max", "max", COLORS["red"])), reference=1.0, log=True),
    _Panel("Log-perplexity gap", "log PPL(π) − log PPL(μ)", (
        _Line(_B + "log_ppl_diff", "gap", COLORS["brown"]),), reference=0.0),
    _Panel("Trust region: tokens affected", "of tokens", (
        _Line(_TR + "outside_frac", "outside the region", COLORS["red"]),
        _Line(_TR + "zero_weight_frac", "zero weight", COLORS["grey"]),
        _Line(_TR + "negative_weight_frac", "negative weight", COLORS["purple"])),
        fraction=True),
    _Panel("Outside the region, by sign of Â", "of tokens", (
        _Line(_TR + "outside_frac_pos_adv", "Â > 0", POS_COLOR),
        _Line(_TR + "outside_frac_neg_adv", "Â < 0", NEG_COLOR)), fraction=True),
    _Panel("Outside the region, by μ", "of tokens", (
        _Line(_NU + "0_0.01", "μ < 0.01", COLORS["purple"]),
        _Line(_NU + "0.01_0.1", "0.01 ≤ μ < 0.1", COLORS["red"]),
        _Line(_NU + "0.1_0.5", "0.1 ≤ μ < 0.5", COLORS["orange"]),
        _Line(_NU + "0.5_1", "μ ≥ 0.5", COLORS["green"])), fraction=True),
    _Panel("Gradient weight w", "w", (
        _Line(_TR + "weight_min", "min", COLORS["green"]),
        _Line(_TR + "weight_mean", "mean", COLORS["blue"]),
        _Line(_TR + "weight_max", "max", COLORS["red"])), reference=1.0),
    _Panel("Policy entropy", "nats", (
        _Line("drift/entropy", "entropy", COLORS["teal"]),
        _Line("penalty/entropy", "entropy bonus term", COLORS["purple"]))),
    _Panel("Drift from the reference policy", "nats / token", (
        _Line("drift/ref/kl_k1", "k1", COLORS["blue"]),
        _Line("drift/ref/kl_k3", "k3", COLORS["orange"]),
        _Line("penalty/ref_kl", "KL penalty term", COLORS["purple"]))),
    _Panel("Gradient norm (before clipping)", "‖g‖", (
        _Line("train/grad_norm", "grad norm", COLORS["brown"]),)),
    _Panel("Response length", "tokens", (
        _Line("response/length_mean", "mean", COLORS["grey"]),)),
)
"""The panels of ``drift.png``, in order; each line draws exactly one logged key."""


def drift_panel_keys() -> list[str]:
    """Every key :func:`plot_drift_panel` reads, one per line, in panel order."""
    return [line.key for panel in DRIFT_PANELS for line in panel.lines]


def _clip_outliers(ax: Axes, values: np.ndarray) -> None:
    """Keep a few far-out spikes (e.g. a first iteration) from flattening the rest of a linear
    panel: when leaving out the fewest extreme values (at most 5 %) shrinks the value range
    more than 4×, limit the axis to the other values and say what was cut off."""
    ordered = np.sort(values)
    n, most = len(ordered), len(ordered) // 20
    lo_index, hi_index = 0, n  # the kept values are ordered[lo_index:hi_index]
    for k in range(1, most + 1):
        if 4 * (ordered[n - 1 - k] - ordered[0]) < ordered[-1] - ordered[0]:
            hi_index = n - k
            break
    for k in range(1, most + 1 - (n - hi_index)):
        if 4 * (ordered[hi_index - 1] - ordered[k]) < ordered[hi_index - 1] - ordered[0]:
            lo_index = k
            break
    if (lo_index, hi_index) == (0, n):
        return
    inside, above, below = (ordered[lo_index:hi_index], ordered[hi_index:],
                            ordered[:lo_index])
    lo, hi = float(inside.min()), float(inside.max())
    pad = 0.12 * (hi - lo) if hi > lo else abs(hi) * 0.1 or 1.0
    ax.set_ylim(lo - pad, hi + pad)
    notes = [f"{len(above)} above, max {above.max():.3g}"] if len(above) else []
    notes += [f"{len(below)} below, min {below.min():.3g}"] if len(below) else []
    ax.text(0.99, 0.98, "off-scale: " + "; ".join(notes), transform=ax.transAxes, ha="right",
            va="top", fontsize=7, color=COLORS["grey"], zorder=5,
            bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.8,
                  "edgecolor": "none"})


def _draw_panel(ax: Axes, panel: _Panel, data: list[tuple[_Line, np.ndarray, np.ndarray]]
                ) -> None:
    for index, (line, steps, values) in enumerate(data):
        # distinct dashes, so that lines lying on top of each other stay visible
        _draw(ax, steps, values, line.color, line.label,
              linestyle=("-", "--", "-.", ":")[index % 4])
    everything = np.concatenate([values for _, _, values in data])
    if panel.log and (everything > 0).all() and everything.max() > 100 * everything.min():
        ax.set_yscale("log")
    elif not (panel.fraction or panel.unit):
        _clip_outliers(ax, everything)
    if panel.reference is not None:
        ax.axhline(panel.reference, color="black", linewidth=0.8, linestyle=":", alpha=0.7)
    if panel.fraction:
        ax.set_ylim(bottom=0, top=max(0.05, 1.1 * float(everything.max())))
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    if panel.unit:
        ax.set_ylim(top=min(1.02, max(ax.get_ylim()[1], 1.0)))
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=1))
    ax.set_title(panel.title)
    ax.set_ylabel(panel.ylabel)
    if len(panel.lines) > 1:  # a single line is named by the panel's title
        ax.legend(loc="best")


def plot_drift_panel(metrics: Metrics, path: str | Path, columns: int = 3) -> Path | None:
    """A grid of small charts over time (:data:`DRIFT_PANELS`): KL, TV, χ², ESS, importance
    ratios, log-perplexity gap, the trust region's out-of-region / zero-weight /
    negative-weight fractions (the strategy's ``trust_region/*``) and the outside fraction by μ
    (``DriftMonitor``'s ``region/*_nu_*``), weights, entropy, drift from the reference, gradient
    norm and response length. Lines and panels without data are left out; returns None when
    no panel has any."""
    panels = []
    for panel in DRIFT_PANELS:
        data = [(line, *_finite(metrics.get(line.key))) for line in panel.lines]
        data = [item for item in data if len(item[2])]
        if data:
            panels.append((panel, data))
    if not panels:
        return None
    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    with _styled():
        fig = _new_figure(4.0 * columns, 2.7 * rows + 0.6)
        axes = np.atleast_1d(fig.subplots(rows, columns, sharex=True, squeeze=False)).ravel()
        for ax, (panel, data) in zip(axes, panels, strict=False):
            _draw_panel(ax, panel, data)
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        for index, ax in enumerate(axes[:len(panels)]):
            if index + columns >= len(panels):  # lowest visible panel of its column
                ax.set_xlabel(STEP_LABEL)
                ax.xaxis.set_tick_params(labelbottom=True)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.suptitle("Policy drift and trust-region activity", fontsize=12, fontweight="bold")
        note = _smoothing_note(metrics, "train/loss") or _smoothing_note(metrics, "reward/mean")
        if note:
            fig.supxlabel(note, fontsize=7, color=COLORS["grey"])
        return _save(fig, path)


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


def plot_weight_vs_shift(samples: Mapping[str, Sequence[float] | np.ndarray],
                         path: str | Path, title: str = "") -> Path | None:
    """The strategy's gradient weight w against the probability shift Δ = π − μ of sampled
    tokens, one panel for Â > 0 and one for Â < 0 (tokens with Â = 0 carry no gradient and are
    left out). A 2-D histogram with a log colour scale when there are many tokens, a scatter
    when there are few. ``samples`` maps ``delta``, ``weight`` and ``adv_sign`` to equal-length
    sequences (see :data:`TOKEN_SAMPLE_COLUMNS`). Returns None when no token has Â ≠ 0."""
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
    with _styled():
        fig = _new_figure(11.0, 5.0)
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
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=2)
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
        heading = title or "Gradient weight against probability shift"
        fig.suptitle(f"{heading}\n", fontsize=12, fontweight="bold")
        fig.text(0.5, 0.905, " · ".join(notes), ha="center", fontsize=8, color=COLORS["grey"])
        return _save(fig, path)
