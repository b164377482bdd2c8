"""Under DDP, gradients accumulated over the micro-batches of an optimiser step are exchanged
once, by the step's last backward, and the result is unchanged (``tests/test_distributed.py``
checks the values against one process)."""

from __future__ import annotations

from pathlib import Path

import torch
from parallel_run import ROLLOUT_BATCHES, run_on_two_processes


def test_ddp_exchanges_gradients_once_per_optimiser_step(random_model_dir: Path,
                                                        tmp_path: Path) -> None:
    rows = run_on_two_processes(random_model_dir, tmp_path, "train", "ddp")
    assert rows[0] == rows[1]
    assert [step for step, _ in rows[0]] == list(range(ROLLOUT_BATCHES))
    # The tiny model's gradients fit DDP's first 1 MB bucket: one all-reduce per optimiser
    # step, 2 rollout batches × 1 step = 2 (4 if each of the 2 micro-batches per step
    # exchanged its gradients).
    assert [torch.load(tmp_path / f"exchanges{rank}.pt") for rank in (0, 1)] == [2, 2]
