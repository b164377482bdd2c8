"""Charts of a run: reward, policy drift, the monitors and the trust region's gradient weights.

One job per module:

* :mod:`trustregion.plots.runs` reads a run's files: :func:`find_metrics_csv` /
  :func:`load_metrics` (what Lightning's ``CSVLogger`` wrote), :func:`run_metrics_csvs` /
  :func:`load_run_metrics` (every ``version_<N>`` of a resumed run, :func:`version_history`,
  joined by :func:`join_versions`), :func:`load_token_samples` / :func:`write_token_samples`
  (``token_samples.csv``, written by :class:`~trustregion.callbacks.DriftPlots`) and
  :func:`load_run_strategy` (the strategy named in ``hparams.yaml`` or ``config.yaml``, rebuilt
  with :mod:`trustregion.specs`);
* :mod:`trustregion.plots.weight_curves` draws strategies' gradient weight against π, measured
  from their own loss by autograd (:func:`weight_curves_figure`, :func:`save_weight_curves`);
* :mod:`trustregion.plots.drawing` holds the style and the grid of panels over time the charts
  share, and :func:`figure_png` (a figure as PNG bytes, for a notebook or a web page);
* :mod:`trustregion.plots.charts` and :mod:`trustregion.plots.monitors` draw, as pure functions
  over plain data: :func:`plot_reward`, :func:`plot_drift_panel`, :func:`plot_monitors` and
  :func:`plot_weight_vs_shift` each write one PNG and return its path, or None when the data
  holds nothing to draw (the ``*_figure`` functions return the figure instead);
* :mod:`trustregion.plots.render` joins them: :func:`render_run` draws every chart the data
  allows into ``<latest version dir>/plots/``; ``trustregion plot RUN_DIR``
  (:mod:`trustregion.cli`) runs it.

Example::

    from trustregion.plots import render_run
    render_run("runs/quickstart")  # → [.../csv/version_0/plots/reward.png, ...]
"""

from trustregion.plots.charts import (
    DRIFT_PANELS,
    drift_figure,
    drift_panel_keys,
    inferred_reward_range,
    logged_widths,
    plot_drift_panel,
    plot_reward,
    plot_weight_vs_shift,
    reward_figure,
    strategy_label,
    weight_chart_title,
    weight_vs_shift_figure,
)
from trustregion.plots.drawing import figure_png
from trustregion.plots.monitors import monitor_panels, monitors_figure, plot_monitors
from trustregion.plots.render import render_run
from trustregion.plots.runs import (
    TOKEN_SAMPLE_COLUMNS,
    find_metrics_csv,
    join_versions,
    load_metrics,
    load_run_metrics,
    load_run_strategy,
    load_token_samples,
    run_metrics_csvs,
    version_history,
    write_token_samples,
)
from trustregion.plots.weight_curves import (
    builtin_strategies,
    save_weight_curves,
    weight_curve,
    weight_curves_figure,
)

__all__ = [
    "DRIFT_PANELS",
    "TOKEN_SAMPLE_COLUMNS",
    "builtin_strategies",
    "drift_figure",
    "drift_panel_keys",
    "figure_png",
    "find_metrics_csv",
    "inferred_reward_range",
    "join_versions",
    "load_metrics",
    "load_run_metrics",
    "load_run_strategy",
    "load_token_samples",
    "logged_widths",
    "monitor_panels",
    "monitors_figure",
    "plot_drift_panel",
    "plot_monitors",
    "plot_reward",
    "plot_weight_vs_shift",
    "render_run",
    "reward_figure",
    "run_metrics_csvs",
    "save_weight_curves",
    "strategy_label",
    "version_history",
    "weight_chart_title",
    "weight_curve",
    "weight_curves_figure",
    "weight_vs_shift_figure",
    "write_token_samples",
]
