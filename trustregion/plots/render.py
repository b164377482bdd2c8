"""Draw every chart of a finished run from its files (what ``trustregion plot RUN_DIR`` runs)."""

from __future__ import annotations

from pathlib import Path

from trustregion.plots.charts import (
    plot_drift_panel,
    plot_reward,
    plot_weight_vs_shift,
    weight_chart_title,
)
from trustregion.plots.runs import (
    find_metrics_csv,
    load_metrics,
    load_run_strategy,
    load_token_samples,
)

__all__ = ["render_run"]


def render_run(run_dir: str | Path) -> list[Path]:
    """Draw every chart the run's data allows into ``<version dir>/plots/``: ``reward.png`` and
    ``drift.png`` from its ``metrics.csv`` (see :func:`~trustregion.plots.find_metrics_csv`)
    and ``weight_vs_shift.png`` from ``plots/token_samples.csv`` when DriftPlots wrote one,
    titled with the strategy of the run's ``hparams.yaml`` or ``config.yaml``.
    Returns the paths written (possibly none, when no column holds data)."""
    run_dir = Path(run_dir)
    try:
        csv_path: Path | None = find_metrics_csv(run_dir)
    except FileNotFoundError:
        if not (run_dir / "plots" / "token_samples.csv").is_file():
            raise
        csv_path = None  # a run without a CSV logger: token samples only
    version_dir = csv_path.parent if csv_path is not None else run_dir
    out = version_dir / "plots"
    written: list[Path | None] = []
    if csv_path is not None:
        metrics = load_metrics(csv_path)
        written += [plot_reward(metrics, out / "reward.png"),
                    plot_drift_panel(metrics, out / "drift.png")]
    samples = out / "token_samples.csv"
    if samples.is_file():
        title = weight_chart_title(load_run_strategy(version_dir))
        written.append(plot_weight_vs_shift(load_token_samples(samples),
                                            out / "weight_vs_shift.png", title=title))
    return [path for path in written if path is not None]
