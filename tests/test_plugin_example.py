"""The plug-in example ``examples/plugin/`` works as a user would use it: installed with pip
(into a temporary folder, leaving this environment alone), its strategy is found through the
``trustregion.strategies`` entry point by the ``trustregion`` command, trains by name, and
passes the conformance harness.

Everything that imports the plug-in runs in a subprocess, so this process's registry keeps
only the built-ins.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
PLUGIN = ROOT / "examples" / "plugin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the example is pip-installed into (from a copy: building writes files)."""
    work = tmp_path_factory.mktemp("plugin")
    source = work / "source"
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = work / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return target


def run(installed: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join(filter(None, [str(installed), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_the_entry_point_is_installed(installed: Path) -> None:
    (entry_points,) = installed.glob("trustregion_log_clip-*.dist-info/entry_points.txt")
    assert entry_points.read_text().split() == [
        "[trustregion.strategies]", "log_clip", "=", "trustregion_log_clip:LogRatioClip"]


def test_trustregion_strategies_lists_it(installed: Path, tmp_path: Path) -> None:
    out = run(installed, ["-m", "trustregion.cli", "strategies"], tmp_path).stdout
    (line,) = [line for line in out.splitlines() if line.startswith("log_clip ")]
    assert "trustregion_log_clip.log_clip.LogRatioClip" in line
    assert "drpo " in out  # the built-ins are still there


def test_it_passes_the_conformance_harness(installed: Path, tmp_path: Path) -> None:
    code = ("from trustregion.testing import check_strategy\n"
            "from trustregion_log_clip import LogRatioClip\n"
            "report = check_strategy(LogRatioClip())\n"
            "print(sorted(report.passed), report.skipped)\n")
    out = run(installed, ["-c", code], tmp_path).stdout
    # every check applies (it declares its boundary, so `regions` runs too) and passes
    assert out.strip() == ("['bf16', 'empty_mask', 'gradient_weight', 'hparams', 'limit', "
                           "'masking', 'metrics', 'micro_batch', 'no_host_sync', 'on_policy', "
                           "'regions'] {}")


def test_trustregion_fit_trains_with_it_by_name(installed: Path, tmp_path: Path) -> None:
    # 2 prompts × 8 completions = 16 sequences, mini-batches of 8: 2 optimiser steps per rollout
    # batch, so max_steps=4 is 2 rollout batches
    run(installed, ["-m", "trustregion.cli", "fit",
                    "--config", str(ROOT / "examples" / "configs" / "quickstart.yaml"),
                    "--trainer.max_steps=4", "--model.batching.prompts_per_step=2",
                    "--model.batching.mini_batch_size=8", "--model.trust_region=log_clip"],
        tmp_path)
    log_dir = tmp_path / "runs" / "quickstart" / "csv" / "version_0"
    hparams = yaml.safe_load((log_dir / "hparams.yaml").read_text())
    assert hparams["trust_region"] == {"class_path": "trustregion_log_clip.log_clip.LogRatioClip",
                                       "init_args": {"anchor": "behavior", "epsilon": 0.2}}
    with (log_dir / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [row["step"] for row in rows] == ["0", "1"]  # one row per rollout batch
    # the plug-in's own metric, logged through the module like any built-in's
    values = [float(row["trust_region/log_ratio_abs_mean"]) for row in rows]
    assert all(math.isfinite(v) and v >= 0 for v in values), values
