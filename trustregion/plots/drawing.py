"""What every chart of a run is drawn with: the style, series over time and grids of panels.

A :class:`Panel` is one small chart over time whose every :class:`Line` draws exactly one logged
key; :func:`panel_figure` lays out the panels that have data as a grid. Figures are built with
matplotlib's object API and an Agg canvas of their own (no pyplot, no global backend change),
so drawing is safe from a training process.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import matplotlib as mpl
import numpy as np
import PIL.Image
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.ticker import MaxNLocator, PercentFormatter

from trustregion.plots.runs import Metrics, Series
from trustregion.validation import integer_at_least, number_in, require

__all__ = [
    "COLORS",
    "DPI",
    "LINE_STYLES",
    "STEP_LABEL",
    "Line",
    "Panel",
    "draw_panel",
    "draw_series",
    "figure_png",
    "finite_series",
    "fit_title",
    "new_figure",
    "panel_figure",
    "rolling_mean",
    "save_figure",
    "smoothing_note",
    "styled",
    "window_for",
]

DPI = 120
STEP_LABEL = "RL iteration (logged step)"
COLORS = {
    "blue": "#3366aa", "orange": "#e08a1e", "red": "#c8433a", "green": "#3a9a5b",
    "purple": "#8256a8", "grey": "#6b6b6b", "teal": "#2a9d9f", "brown": "#8c5a3c",
}
STYLE: dict[str, Any] = {
    "font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold", "axes.labelsize": 9,
    "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.6, "axes.spines.top": False,
    "axes.spines.right": False, "legend.fontsize": 8, "legend.frameon": False,
    "figure.facecolor": "white", "savefig.facecolor": "white",
}
LINE_STYLES: tuple[tuple[str, float], ...] = (("-", 3.0), ("--", 2.0), ("-.", 1.4), (":", 1.4))
"""``(dashes, width)`` of the 1st, 2nd, … line of a panel: each later line is drawn narrower and
dashed on top of the earlier ones, so lines with equal values stay visible side by side."""


# ------------------------------------------------------------------------------- series
def finite_series(series: Series | None) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of the finite values of a logged series."""
    if not series:
        return np.empty(0), np.empty(0)
    data = np.asarray(series, dtype=np.float64).reshape(-1, 2)
    keep = np.isfinite(data[:, 1])
    return data[keep, 0], data[keep, 1]


def window_for(n: int) -> int:
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


def draw_series(ax: Axes, steps: np.ndarray, values: np.ndarray, color: str, label: str,
                linestyle: str = "-", linewidth: float = 1.8,
                floor: float | None = None) -> None:
    """The raw series, faint, under its rolling mean; or one plain line when short. With
    ``floor``, values below it (raw and mean) are drawn at it."""
    window = window_for(len(values))
    smooth = rolling_mean(values, window)
    if floor is not None:
        values, smooth = np.maximum(values, floor), np.maximum(smooth, floor)
    if window > 1:
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth, color=color, linewidth=linewidth, label=label,
                linestyle=linestyle)
    else:
        ax.plot(steps, values, color=color, linewidth=linewidth, label=label,
                linestyle=linestyle, marker="o" if len(values) <= 30 else None, markersize=3)


def smoothing_note(metrics: Metrics, key: str) -> str:
    """How the series of ``key`` is smoothed ("" when it is drawn as is)."""
    window = window_for(len(finite_series(metrics.get(key))[1]))
    if window <= 1:
        return ""
    return f"faint: per-iteration values · bold: rolling mean over {window} iterations"


# ------------------------------------------------------------------------------ figures
def styled() -> AbstractContextManager[Any]:
    """The matplotlib settings every chart here is drawn with."""
    return mpl.rc_context(cast(Any, STYLE))


def new_figure(width: float, height: float) -> Figure:
    """A figure with constrained layout and its own Agg canvas (so text can be measured)."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (creating the folder); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with styled():
        fig.savefig(path, dpi=DPI)
    return path


def figure_png(fig: Figure, dpi: float = DPI, colors: int | None = None) -> bytes:
    """``fig`` drawn in the charts' style as PNG bytes, at ``dpi`` dots per inch.

    ``colors`` (2 to 256) stores the picture with a palette of at most that many colours
    instead of full RGB, which makes a chart of a few flat colours several times smaller; the
    default keeps every colour. For a notebook, show it with
    ``IPython.display.Image(figure_png(fig, dpi=80))``.

    >>> fig = new_figure(2, 1)
    >>> png = figure_png(fig, dpi=50)
    >>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
    """
    dpi = number_in("dpi", dpi, 0.0, note="dots per inch")
    if colors is not None:
        colors = integer_at_least("colors", colors, 2, note="a PNG palette holds 2 to 256")
        require(colors <= 256, f"colors must be 2 to 256 (a PNG palette) or None; got {colors}")
    buffer = io.BytesIO()
    with styled():
        fig.savefig(buffer, format="png", dpi=dpi)
    if colors is None:
        return buffer.getvalue()
    buffer.seek(0)
    with PIL.Image.open(buffer) as image:
        palette = image.convert("RGB").quantize(colors=colors, method=PIL.Image.Quantize.MEDIANCUT,
                                                dither=PIL.Image.Dither.NONE)
    out = io.BytesIO()
    palette.save(out, format="PNG", optimize=True)
    return out.getvalue()


def fit_title(fig: Figure, text: str, fraction: float = 0.96, **kwargs: Any) -> Text:
    """``fig.suptitle(text)``, each line wrapped at spaces (as few times as needed) so that the
    title spans at most ``fraction`` of the figure's width. Returns the title."""
    canvas = fig.canvas
    assert isinstance(canvas, FigureCanvasAgg), "draw the figure with new_figure()"
    renderer = canvas.get_renderer()
    limit = fraction * fig.bbox.width
    title = fig.suptitle(text, **kwargs)
    width = max(len(line) for line in text.splitlines()) if text else 0
    while title.get_window_extent(renderer).width > limit and width > 10:
        width = int(width * 0.9)
        title.set_text("\n".join(textwrap.fill(line, width, break_long_words=False)
                                 for line in text.splitlines()))
    return title


# ------------------------------------------------------------------------------- panels
@dataclass(frozen=True)
class Line:
    """One line of a :class:`Panel`: the one logged ``key`` it draws."""

    key: str
    label: str
    color: str


@dataclass(frozen=True)
class Panel:
    """One small chart over time.

    Attributes:
        reference: a dotted horizontal line (e.g. ratio = 1).
        fraction: percentage axis from 0.
        unit: percentage axis up to 100 % (a value in (0, 1]).
        log: log scale when every value is positive and they span > 2 decades.
        nonnegative: a quantity that cannot be negative: values below 0 (estimates) are drawn
            at 0 with a note saying how many, and the axis starts at 0.
        limits: fixed y-axis limits (e.g. (−1, 1) for a correlation).
        markers: the key of a 0/1 series whose steps with value 1 are marked with vertical lines.
    """

    title: str
    ylabel: str
    lines: tuple[Line, ...]
    reference: float | None = None
    fraction: bool = False
    unit: bool = False
    log: bool = False
    nonnegative: bool = False
    limits: tuple[float, float] | None = None
    markers: str | None = None


PanelData = list[tuple[Line, np.ndarray, np.ndarray]]


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
    _corner_note(ax, "off-scale: " + "; ".join(notes))


def _corner_note(ax: Axes, text: str, y: float = 0.98) -> None:
    ax.text(0.99, y, text, transform=ax.transAxes, ha="right", va="top", fontsize=7,
            color=COLORS["grey"], zorder=5,
            bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.8,
                  "edgecolor": "none"})


def draw_panel(ax: Axes, panel: Panel, data: PanelData, metrics: Metrics | None = None) -> None:
    """Draw ``panel``'s lines that have data (``(line, steps, values)``) on ``ax``."""
    floor = 0.0 if panel.nonnegative else None
    for index, (line, steps, values) in enumerate(data):
        dashes, width = LINE_STYLES[index % len(LINE_STYLES)] if len(data) > 1 else ("-", 1.8)
        draw_series(ax, steps, values, line.color, line.label, linestyle=dashes,
                    linewidth=width, floor=floor)
    everything = np.concatenate([values for _, _, values in data])
    shown = np.maximum(everything, 0.0) if panel.nonnegative else everything
    if panel.limits is not None:
        ax.set_ylim(*panel.limits)
    elif panel.log and (shown > 0).all() and shown.max() > 100 * shown.min():
        ax.set_yscale("log")
    elif not (panel.fraction or panel.unit):
        _clip_outliers(ax, shown)
    if panel.nonnegative:
        if ax.get_yscale() != "log":  # a log axis shows only positive values anyway
            ax.set_ylim(bottom=0.0)
        negative = everything[everything < 0]
        if len(negative):
            _corner_note(ax, f"{len(negative)} of {len(everything)} estimates below 0 "
                             f"(lowest {negative.min():.2g}) drawn at 0", y=0.88)
    if panel.reference is not None:
        ax.axhline(panel.reference, color="black", linewidth=0.8, linestyle=":", alpha=0.7)
    if panel.fraction:
        ax.set_ylim(bottom=0, top=max(0.05, 1.1 * float(everything.max())))
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    if panel.unit:
        ax.set_ylim(top=min(1.02, max(ax.get_ylim()[1], 1.0)))
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=1))
    if panel.markers is not None and metrics is not None:
        steps, flags = finite_series(metrics.get(panel.markers))
        for index, step in enumerate(steps[flags > 0.5]):
            ax.axvline(step, color=COLORS["red"], linewidth=0.9, alpha=0.6, zorder=1,
                       label="guard fired" if index == 0 else None)
    ax.set_title(panel.title)
    ax.set_ylabel(panel.ylabel)
    if len(ax.get_legend_handles_labels()[0]) > 1 or len(panel.lines) > 1:
        ax.legend(loc="best")  # a panel of one line and no marker is named by its title


def panel_data(panels: Sequence[Panel], metrics: Metrics) -> list[tuple[Panel, PanelData]]:
    """The panels with data, each with its lines that have a finite value."""
    found = []
    for panel in panels:
        data = [(line, *finite_series(metrics.get(line.key))) for line in panel.lines]
        data = [item for item in data if len(item[2])]
        if data:
            found.append((panel, data))
    return found


def panel_figure(panels: Sequence[Panel], metrics: Metrics, title: str, note: str = "",
                 columns: int = 3) -> Figure | None:
    """A grid of ``panels`` over time, leaving out lines and panels without data (None when
    none has any); ``note`` is written under the grid."""
    found = panel_data(panels, metrics)
    if not found:
        return None
    columns = min(columns, len(found))
    rows = -(-len(found) // columns)
    with styled():
        fig = new_figure(4.0 * columns, 2.7 * rows + 0.6)
        axes = np.atleast_1d(fig.subplots(rows, columns, sharex=True, squeeze=False)).ravel()
        for ax, (panel, data) in zip(axes, found, strict=False):
            draw_panel(ax, panel, data, metrics)
        for ax in axes[len(found):]:
            ax.set_visible(False)
        for index, ax in enumerate(axes[:len(found)]):
            if index + columns >= len(found):  # lowest visible panel of its column
                ax.set_xlabel(STEP_LABEL)
                ax.xaxis.set_tick_params(labelbottom=True)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fit_title(fig, title, fontsize=12, fontweight="bold")
        if note:
            fig.supxlabel(note, fontsize=7, color=COLORS["grey"])
    return fig
