"""Two processes (``ddp_spawn``, gloo) log exactly what one process logs on the concatenated data.

Each rank samples its half of the prompts (whole groups). The test then replays the two ranks'
samples, concatenated, through a single-process module with the same initial weights, and
requires every logged value — reward, loss, ``trust_region/*``, ``train/*``, penalties, and the
monitors' ``drift/*``, ``region/*``, ``guard/*``, ``controller/*`` — and the updated weights to be
the same. Gradients are averaged by DDP and the loss normalised by counts summed over ranks, so
one optimiser step on two ranks is one step on the whole batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import DigitRichArithmetic
from parallel_run import SETTINGS, SaveRun
from rank_replay import ReplayModule, concatenated
from row_logger import RowLogger

from trustregion.callbacks import CollapseGuard, DriftMonitor, TrustRegionController
from trustregion.module import TrustRegionModule


def _callbacks(directory: Path) -> list[L.Callback]:
    return [DriftMonitor(), CollapseGuard(max_kl=100.0, action="warn"),
            TrustRegionController("outside_frac", target_value=0.1), SaveRun(directory)]


def _trainer(directory: Path, **kwargs: Any) -> L.Trainer:
    return L.Trainer(max_steps=1, log_every_n_steps=1, logger=RowLogger(directory),
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=_callbacks(directory), **kwargs)


def test_two_ranks_log_the_values_of_one_process_on_the_concatenated_batch(
        random_model_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = TrustRegionModule(policy=f"config:{random_model_dir}", task=DigitRichArithmetic(),
                               **SETTINGS)
    initial = {k: v.clone() for k, v in module.policy.state_dict().items()}
    _trainer(tmp_path, accelerator="cpu", strategy="ddp_spawn", devices=2).fit(module)

    rows = [torch.load(tmp_path / f"rows{rank}.pt") for rank in (0, 1)]
    parts = [torch.load(tmp_path / f"rollout{rank}_0.pt", weights_only=False)
             for rank in (0, 1)]
    assert [len(p) for p in parts] == [4, 4]  # two whole groups of two per rank
    assert rows[0] == rows[1]  # every rank holds the global row
    ((step, distributed),) = rows[0]
    assert step == 0

    single_dir = tmp_path / "single"
    single_dir.mkdir()
    torch.manual_seed(0)
    replay = ReplayModule(policy=f"config:{random_model_dir}", task=DigitRichArithmetic(),
                     **SETTINGS)
    replay.policy.load_state_dict(initial)
    replay.behavior.load_state_dict(initial)
    assert replay.reference is not None
    replay.reference.load_state_dict(initial)
    replay.replays = [concatenated(parts)]
    _trainer(single_dir).fit(replay)
    ((_, single),) = torch.load(single_dir / "rows0.pt")

    assert set(distributed) == set(single)
    for prefix in ("reward/", "response/", "train/", "trust_region/", "penalty/", "drift/",
                   "region/", "guard/", "controller/"):
        assert any(key.startswith(prefix) for key in single), prefix
    assert distributed == pytest.approx(single, rel=1e-5, abs=1e-6)
    updated = torch.load(tmp_path / "final0.pt")["policy"]
    for name, value in replay.policy.state_dict().items():
        torch.testing.assert_close(updated[name], value, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(updated[n], initial[n]) for n in initial)  # it did train
