"""Draw every chart of a finished run from its files (what ``trustregion plot RUN_DIR`` runs)."""

from __future__ import annotations

from pathlib import Path

from trustregion.plots.charts import (
    logged_widths,
    plot_drift_panel,
    plot_reward,
    plot_weight_vs_shift,
    weight_chart_title,
)
from trustregion.plots.monitors import plot_monitors
from trustregion.plots.runs import (
    join_versions,
    load_metrics,
    load_run_strategy,
    load_token_samples,
    run_metrics_csvs,
)

__all__ = ["render_run"]


def render_run(run_dir: str | Path) -> list[Path]:
    """Draw every chart the run's data allows into ``<latest version dir>/plots/``.

    From the metrics of the whole run (every ``version_<N>`` of a resumed run, see
    :func:`~trustregion.plots.run_metrics_csvs` and :func:`~trustregion.plots.join_versions`;
    only the given one for a version directory or a ``metrics.csv``): ``reward.png``,
    ``drift.png`` and, when the run logged ``shadow/``, ``guard/`` or ``controller/`` keys,
    ``monitors.png``. From the newest ``plots/token_samples.csv`` DriftPlots wrote (its sample
    is checkpointed, so a resumed run's file covers the run before the resume too):
    ``weight_vs_shift.png``, titled with the strategy of the run's ``hparams.yaml`` or
    ``config.yaml`` and the widths the controller last logged. Returns the paths written
    (possibly none, when no column holds data)."""
    run_dir = Path(run_dir)
    try:
        csv_paths = run_metrics_csvs(run_dir)
    except FileNotFoundError:
        if not (run_dir / "plots" / "token_samples.csv").is_file():
            raise
        csv_paths = []  # a run without a CSV logger: token samples only
    versions = [path.parent for path in csv_paths] or [run_dir]
    out = versions[-1] / "plots"
    metrics = join_versions([load_metrics(path) for path in csv_paths])
    written: list[Path | None] = []
    if csv_paths:
        written += [plot_reward(metrics, out / "reward.png"),
                    plot_drift_panel(metrics, out / "drift.png"),
                    plot_monitors(metrics, out / "monitors.png")]
    samples = [v / "plots" / "token_samples.csv" for v in reversed(versions)
               if (v / "plots" / "token_samples.csv").is_file()]
    if samples:
        strategy = load_run_strategy(versions[-1])
        widths = logged_widths(strategy, metrics) if strategy is not None else {}
        written.append(plot_weight_vs_shift(load_token_samples(samples[0]),
                                            out / "weight_vs_shift.png",
                                            title=weight_chart_title(strategy, widths)))
    return [path for path in written if path is not None]
