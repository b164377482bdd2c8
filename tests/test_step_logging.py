"""The module's and every callback's step values share one logger row per rollout batch."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import DigitRichArithmetic
from lightning.pytorch.loggers import CSVLogger

from trustregion.callbacks import CollapseGuard, DriftMonitor, TrustRegionController
from trustregion.module import TrustRegionModule


def test_one_row_per_logged_rollout_batch_with_every_callbacks_keys(random_model_dir: Path,
                                                                     tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = TrustRegionModule(policy=f"config:{random_model_dir}", task=DigitRichArithmetic(),
                               group_size=2, prompts_per_step=2, mini_batch_size=4,
                               max_new_tokens=3)
    callbacks = [DriftMonitor(), CollapseGuard(max_kl=100.0, action="warn"),
                 TrustRegionController("outside_frac", target_value=0.1)]
    trainer = L.Trainer(max_steps=3, log_every_n_steps=2, logger=CSVLogger(tmp_path),
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module)  # 3 rollout batches of 1 optimiser step each
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    # log_every_n_steps=2: a row after batches 0-1 (step 1), and one for the last batch (step 2)
    assert [row["step"] for row in rows] == ["1", "2"]
    for row in rows:
        keys = {key for key, value in row.items() if value}
        assert {"reward/mean", "train/loss", "drift/behavior/kl_k3", "region/outside_frac",
                "guard/fired", "guard/kl", "controller/scale", "controller/delta",
                "epoch"} <= keys
    # The guard's KL is the k3 mean of its own rollout batch; the drift KL covers the logging
    # window: batches 0 and 1 at step 1, the last batch alone at step 2, where the two agree.
    assert float(rows[1]["drift/behavior/kl_k3"]) == pytest.approx(float(rows[1]["guard/kl"]),
                                                                   rel=1e-5, abs=1e-9)
    assert float(rows[0]["guard/fired"]) == 0.0
