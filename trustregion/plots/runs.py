"""A run's files: the metrics a ``CSVLogger`` wrote, the token sample ``DriftPlots`` wrote and
the strategy the run trained with.

* :func:`find_metrics_csv` / :func:`load_metrics` read one ``metrics.csv``;
  :func:`run_metrics_csvs` / :func:`load_run_metrics` read a whole run, whose resumed parts
  are the logger's successive ``version_<N>`` directories (joined by :func:`join_versions`);
* :func:`write_token_samples` / :func:`load_token_samples` write and read
  ``plots/token_samples.csv`` (columns :data:`TOKEN_SAMPLE_COLUMNS`);
* :func:`load_run_strategy` rebuilds the strategy from ``hparams.yaml`` (or the CLI's
  ``config.yaml``) with :func:`trustregion.specs.strategy_from_spec`.
"""

from __future__ import annotations

import csv
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from trustregion.strategies import TrustRegionStrategy

__all__ = [
    "RUN_CONFIG_FILES",
    "TOKEN_SAMPLE_COLUMNS",
    "Metrics",
    "Series",
    "find_metrics_csv",
    "join_versions",
    "load_metrics",
    "load_run_metrics",
    "load_run_strategy",
    "load_token_samples",
    "run_metrics_csvs",
    "run_strategy_spec",
    "version_history",
    "write_token_samples",
]

Series = list[tuple[int, float]]
"""One logged key over time: ``[(step, value), ...]`` in file order."""
Metrics = Mapping[str, Series]

TOKEN_SAMPLE_COLUMNS = ("step", "delta", "weight", "adv_sign", "mu")
"""Columns of ``token_samples.csv``: RL iteration, Δ = π − μ, gradient weight w, sign of Â
(−1, 0 or 1) and μ, the behaviour probability of the sampled token."""

RUN_CONFIG_FILES = ("hparams.yaml", "config.yaml")
"""Where a version directory names its strategy, in the order they are read: the module's
``hparams.yaml`` (written by the logger, ``trust_region`` at the top level) and the
``config.yaml`` the CLI saves (``model.trust_region``)."""


# --------------------------------------------------------------------------- metrics.csv
def load_metrics(path: str | Path) -> dict[str, Series]:
    """Read a Lightning ``metrics.csv`` into ``{key: [(step, value), ...]}``.

    Rows without a ``step`` and empty (or non-numeric) cells are skipped; values are kept as
    written (NaN too), in file order. ``step`` and ``epoch`` are not metrics and are left out.
    """
    path = Path(path)
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "step" not in reader.fieldnames:
            raise ValueError(f"{path} has no 'step' column; is it a Lightning metrics.csv?")
        metrics: dict[str, Series] = {
            key: [] for key in reader.fieldnames if key not in ("step", "epoch")}
        for row in reader:
            step_text = (row.get("step") or "").strip()
            if not step_text:
                continue
            step = int(float(step_text))
            for key in metrics:
                try:
                    metrics[key].append((step, float((row.get(key) or "").strip())))
                except ValueError:  # an empty (or non-numeric) cell
                    continue
    return {key: series for key, series in metrics.items() if series}


def _version_number(path: Path) -> int:
    match = re.fullmatch(r"version_(\d+)", path.parent.name)
    return int(match.group(1)) if match else -1


def find_metrics_csv(run_dir: str | Path) -> Path:
    """The ``metrics.csv`` of a run: ``run_dir`` itself if it is the file, else
    ``run_dir/metrics.csv`` (a version directory), else the one of the latest
    ``version_<N>`` found below ``run_dir`` (e.g. ``runs/quickstart/csv/version_3``).

    Raises ``FileNotFoundError`` when the path does not exist or holds no metrics.csv.
    """
    path = Path(run_dir)
    if not path.exists():
        raise FileNotFoundError(f"no such run directory: {path}")
    if path.is_file():
        return path
    if (path / "metrics.csv").is_file():
        return path / "metrics.csv"
    found = [p for p in path.rglob("metrics.csv") if p.is_file()]
    if not found:
        raise FileNotFoundError(
            f"no metrics.csv under {path}; a run logs one with lightning's CSVLogger, e.g. "
            f"{path}/csv/version_0/metrics.csv")
    return max(found, key=lambda p: (_version_number(p), p.stat().st_mtime_ns))


def version_history(metrics_csv: str | Path) -> list[Path]:
    """``metrics_csv`` of a ``version_<N>`` directory and the ``metrics.csv`` of every earlier
    ``version_<M>`` (M < N) beside it, oldest first: the parts of a run that was resumed, since
    each resume logs to a new version. A file outside a ``version_<N>`` directory is alone."""
    metrics_csv = Path(metrics_csv)
    number = _version_number(metrics_csv)
    if number < 0:
        return [metrics_csv]
    earlier = [path for path in metrics_csv.parent.parent.glob("version_*/metrics.csv")
               if 0 <= _version_number(path) < number]
    return [*sorted(earlier, key=_version_number), metrics_csv]


def run_metrics_csvs(run_dir: str | Path) -> list[Path]:
    """The ``metrics.csv`` files of a whole run, oldest first.

    ``run_dir`` a run directory (e.g. ``runs/quickstart``): the latest ``version_<N>`` found
    below it (see :func:`find_metrics_csv`) and its :func:`version_history`. A version
    directory or a ``metrics.csv`` file: that one alone.
    """
    latest = find_metrics_csv(run_dir)
    given = Path(run_dir)
    if given.is_file() or given == latest.parent:
        return [latest]
    return version_history(latest)


def join_versions(parts: Sequence[Metrics]) -> dict[str, Series]:
    """One run's metrics from the metrics of its versions, oldest first.

    Each version supersedes what earlier versions logged from its first step on: a run resumed
    from an earlier checkpoint logs those steps again, and its values are the ones the final
    model comes from (the earlier ones belong to a branch that was abandoned), and a fresh run
    in the same directory starts at step 0 and so replaces everything. A version that logged
    nothing changes nothing.

    Example (a run resumed from its step-2 checkpoint after logging steps 0–3)::

        join_versions([{"a": [(0, 1.0), (1, 1.0), (2, 1.0), (3, 1.0)]},
                       {"a": [(2, 5.0), (3, 5.0), (4, 5.0)]}])
        # {"a": [(0, 1.0), (1, 1.0), (2, 5.0), (3, 5.0), (4, 5.0)]}
    """
    joined: dict[str, Series] = {}
    for part in parts:
        steps = [step for series in part.values() for step, _ in series]
        if not steps:
            continue
        first = min(steps)
        joined = {key: [(s, v) for s, v in series if s < first] for key, series in joined.items()}
        for key, series in part.items():
            joined.setdefault(key, []).extend(series)
    return {key: series for key, series in joined.items() if series}


def load_run_metrics(run_dir: str | Path) -> dict[str, Series]:
    """The metrics of a whole run (:func:`run_metrics_csvs`, joined by :func:`join_versions`)."""
    return join_versions([load_metrics(path) for path in run_metrics_csvs(run_dir)])


# --------------------------------------------------------------------- token_samples.csv
def write_token_samples(samples: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """Write sampled tokens (equal-length columns :data:`TOKEN_SAMPLE_COLUMNS`) as CSV, rows
    ordered by step (stable, so tokens of one step keep their order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = np.stack([np.asarray(samples[key], dtype=np.float64)
                        for key in TOKEN_SAMPLE_COLUMNS], axis=1)
    columns = columns[np.argsort(columns[:, 0], kind="stable")]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(TOKEN_SAMPLE_COLUMNS)
        for step, delta, weight, sign, mu in columns:
            writer.writerow([int(step), f"{delta:.8g}", f"{weight:.8g}", int(sign),
                             f"{mu:.8g}"])
    return path


def load_token_samples(path: str | Path) -> dict[str, np.ndarray]:
    """Read a ``token_samples.csv`` (see :func:`write_token_samples`) into float64 columns."""
    with Path(path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = rows[0].keys() if rows else TOKEN_SAMPLE_COLUMNS
    return {key: np.array([float(row[key]) for row in rows], dtype=np.float64)
            for key in columns}


# ------------------------------------------------------------------------------ strategy
def run_strategy_spec(version_dir: str | Path) -> tuple[Path, Any] | None:
    """``(file, spec)``: the strategy spec of the first of :data:`RUN_CONFIG_FILES` in
    ``version_dir`` that names one, in any form :mod:`trustregion.specs` reads; None when no
    file does. A file that is not valid YAML raises ``ValueError``."""
    import yaml

    for name in RUN_CONFIG_FILES:
        path = Path(version_dir) / name
        if not path.is_file():
            continue
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {err}") from err
        if name == "config.yaml" and isinstance(data, dict):
            data = data.get("model")
        if isinstance(data, dict) and data.get("trust_region") is not None:
            return path, data["trust_region"]
    return None


def load_run_strategy(version_dir: str | Path) -> TrustRegionStrategy | None:
    """The strategy a run trained with, rebuilt from its files (see :func:`run_strategy_spec`)
    by :func:`trustregion.specs.strategy_from_spec`, so it has the hyperparameters the run had.

    None when no file names a strategy. When the spec cannot be rebuilt here (its class does
    not import in this environment, or its settings are refused), a warning says why and the
    result is None.
    """
    found = run_strategy_spec(version_dir)
    if found is None:
        return None
    path, spec = found
    from trustregion.specs import strategy_from_spec

    try:
        return strategy_from_spec(spec)
    except (ValueError, TypeError) as err:
        warnings.warn(f"cannot rebuild the strategy named in {path} ({err}); its charts are "
                      f"drawn without the strategy's name", stacklevel=2)
        return None
