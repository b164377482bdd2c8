"""``monitors.png``: what the monitoring callbacks logged, over time.

* :class:`~trustregion.callbacks.ShadowStrategies` (``shadow/<label>/*``): where each shadow
  strategy's region and gradient weights differ from the active strategy's;
* :class:`~trustregion.callbacks.CollapseGuard` (``guard/*``): the signals it watches, with a
  vertical line at every iteration where it fired;
* :class:`~trustregion.callbacks.TrustRegionController` (``controller/*``): the quantity it
  holds, the widths it set and their cumulative scale.

The panels are built from the keys a run logged (:func:`monitor_panels`): the shadows' labels
and the controller's width names come from the metrics, so any set of shadows and any strategy
is drawn. Without any of these keys there is no chart.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from trustregion.plots.drawing import (
    COLORS,
    Line,
    Panel,
    panel_figure,
    save_figure,
    smoothing_note,
)
from trustregion.plots.runs import Metrics

__all__ = ["MONITOR_PREFIXES", "monitor_panels", "monitors_figure", "plot_monitors"]

MONITOR_PREFIXES = ("shadow/", "guard/", "controller/")
"""The key prefixes ``monitors.png`` draws."""

_PALETTE = ("blue", "orange", "green", "purple", "brown", "teal", "grey")
_ACTIVE = Line("trust_region/outside_frac", "active strategy", "#000000")
_SHADOW_PANELS = (  # (statistic, title, ylabel, kind)
    ("outside_frac", "Shadow strategies: tokens outside each region", "of tokens", "fraction"),
    ("only_shadow_outside_frac", "Outside the shadow's region only", "of tokens", "fraction"),
    ("only_active_outside_frac", "Outside the active region only", "of tokens", "fraction"),
    ("zero_weight_frac", "Shadow strategies: zero gradient weight", "of tokens", "fraction"),
    ("weight_corr", "Weight correlation, shadow vs active", "Pearson r", "correlation"),
)
_CONTROLLER_FIXED = ("scale", "observed")


def _shadow_labels(metrics: Metrics) -> list[str]:
    """Shadow labels in the order their keys first appear."""
    labels: list[str] = []
    for key in metrics:
        if key.startswith("shadow/") and key.count("/") == 2:
            label = key.split("/")[1]
            if label not in labels:
                labels.append(label)
    return labels


def _shadow_panels(metrics: Metrics) -> list[Panel]:
    labels = _shadow_labels(metrics)
    if not labels:
        return []
    colors = {label: COLORS[_PALETTE[i % len(_PALETTE)]] for i, label in enumerate(labels)}
    panels = []
    for stat, title, ylabel, kind in _SHADOW_PANELS:
        lines = tuple(Line(f"shadow/{label}/{stat}", label, colors[label]) for label in labels)
        if stat == "outside_frac":
            lines = (_ACTIVE, *lines)
        if kind == "fraction":
            panels.append(Panel(title, ylabel, lines, fraction=True))
        else:
            panels.append(Panel(title, ylabel, lines, reference=0.0, limits=(-1.05, 1.05)))
    return panels


def _guard_panels() -> list[Panel]:
    fired = "guard/fired"
    return [
        Panel("Collapse guard: mismatch KL (k3)", "nats / token",
              (Line("guard/kl", "KL", COLORS["orange"]),), nonnegative=True, markers=fired),
        Panel("Collapse guard: effective sample size", "of tokens",
              (Line("guard/ess", "ESS", COLORS["green"]),), unit=True, markers=fired),
        Panel("Collapse guard: policy entropy", "nats",
              (Line("guard/entropy", "entropy", COLORS["teal"]),), nonnegative=True,
              markers=fired),
    ]


def _controller_panels(metrics: Metrics) -> list[Panel]:
    widths = [key for key in metrics if key.startswith("controller/")
              and key.split("/", 1)[1] not in _CONTROLLER_FIXED]
    return [
        Panel("Width controller: observed value", "observed",
              (Line("controller/observed", "observed", COLORS["blue"]),)),
        Panel("Width controller: trust-region widths",
              ", ".join(key.split("/", 1)[1] for key in widths) or "width",
              tuple(Line(key, key.split("/", 1)[1], COLORS[_PALETTE[i % len(_PALETTE)]])
                    for i, key in enumerate(widths))),
        Panel("Width controller: cumulative scale", "× starting widths",
              (Line("controller/scale", "scale", COLORS["purple"]),), reference=1.0),
    ]


def monitor_panels(metrics: Metrics) -> list[Panel]:
    """The panels of ``monitors.png`` for the keys in ``metrics`` (panels may lack data)."""
    return [*_shadow_panels(metrics), *_guard_panels(), *_controller_panels(metrics)]


def monitors_figure(metrics: Metrics, columns: int = 3) -> Figure | None:
    """The figure of :func:`plot_monitors`; None when no ``shadow/``, ``guard/`` or
    ``controller/`` key has data."""
    keys = [key for key in metrics if key.startswith(MONITOR_PREFIXES)]
    if not keys:
        return None
    note = smoothing_note(metrics, max(keys, key=lambda key: len(metrics[key])))
    return panel_figure(monitor_panels(metrics), metrics, "Monitors: shadow strategies, "
                        "collapse guard and width controller", note, columns)


def plot_monitors(metrics: Metrics, path: str | Path, columns: int = 3) -> Path | None:
    """Draw ``monitors.png`` (see the module docstring); returns its path, or None when the
    run logged no ``shadow/``, ``guard/`` or ``controller/`` key."""
    fig = monitors_figure(metrics, columns)
    return None if fig is None else save_figure(fig, path)
