"""Charts of a run: reward, policy drift and the trust region's gradient weights.

Three modules, one job each:

* :mod:`trustregion.plots.runs` reads a run's files: :func:`find_metrics_csv` /
  :func:`load_metrics` (what Lightning's ``CSVLogger`` wrote), :func:`load_token_samples` /
  :func:`write_token_samples` (``token_samples.csv``, written by
  :class:`~trustregion.callbacks.DriftPlots`) and :func:`load_run_strategy` (the strategy named
  in ``hparams.yaml`` or ``config.yaml``, rebuilt with :mod:`trustregion.specs`);
* :mod:`trustregion.plots.charts` draws, as pure functions over plain data:
  :func:`plot_reward`, :func:`plot_drift_panel` and :func:`plot_weight_vs_shift` each write one
  PNG and return its path, or None when the data holds nothing to draw;
* :mod:`trustregion.plots.render` joins them: :func:`render_run` draws every chart the data
  allows into ``<version dir>/plots/``; ``trustregion plot RUN_DIR`` (:mod:`trustregion.cli`)
  runs it.

Example::

    from trustregion.plots import render_run
    render_run("runs/quickstart")  # → [.../csv/version_0/plots/reward.png, ...]
"""

from trustregion.plots.charts import (
    DRIFT_PANELS,
    drift_panel_keys,
    plot_drift_panel,
    plot_reward,
    plot_weight_vs_shift,
    strategy_label,
    weight_chart_title,
)
from trustregion.plots.render import render_run
from trustregion.plots.runs import (
    TOKEN_SAMPLE_COLUMNS,
    find_metrics_csv,
    load_metrics,
    load_run_strategy,
    load_token_samples,
    write_token_samples,
)

__all__ = [
    "DRIFT_PANELS",
    "TOKEN_SAMPLE_COLUMNS",
    "drift_panel_keys",
    "find_metrics_csv",
    "load_metrics",
    "load_run_strategy",
    "load_token_samples",
    "plot_drift_panel",
    "plot_reward",
    "plot_weight_vs_shift",
    "render_run",
    "strategy_label",
    "weight_chart_title",
    "write_token_samples",
]
