"""`trustregion fit` signalled mid-run saves a verified checkpoint, exits with 128 + the signal
number and resumes from the saved prompt batch."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_configs import tiny_cli_config

from trustregion.checkpointing import read_checkpoint, verify_checkpoint
from trustregion.cli import main


def _config(tmp_path: Path, random_model_dir: Path) -> Path:
    run = str(tmp_path / "run")
    return tiny_cli_config(tmp_path, random_model_dir, seed_everything=0,
                           checkpoint={"every_n_rollouts": 2}, trainer={
                               "max_steps": 10_000, "default_root_dir": run,
                               "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                          "init_args": {"save_dir": run, "name": "csv"}}})


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signalled_fit_saves_exits_and_resumes(tmp_path, random_model_dir, signum) -> None:
    config = _config(tmp_path, random_model_dir)
    first = tmp_path / "run" / "csv" / "version_0" / "checkpoints"
    process = subprocess.Popen(
        [sys.executable, "-m", "trustregion.cli", "fit", "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (first / "rollout=000002.ckpt").exists():  # two rollout batches done
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "no checkpoint after two rollout batches"
            time.sleep(0.05)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signum, stderr  # 130 for SIGINT, 143 for SIGTERM

    match = re.search(r"checkpoint saved to (\S+); resume with: trustregion fit --config "
                      rf"{re.escape(str(config))} --ckpt_path (\S+)", stderr)
    assert match is not None, stderr
    saved = Path(match.group(1))
    assert match.group(2) == str(saved) and saved.parent == first
    rollouts = int(re.fullmatch(r"rollout=(\d+)\.ckpt", saved.name).group(1))
    assert rollouts >= 3  # the signal came after rollout 2 was saved
    assert verify_checkpoint(saved)
    assert (first / "last.ckpt").read_bytes() == saved.read_bytes()
    state = read_checkpoint(saved)
    # one optimiser step per rollout batch (4 sequences ≤ mini_batch_size 64)
    assert state["global_step"] == rollouts
    assert state["trustregion"]["next_prompt_batch"] == rollouts

    # resume for two more rollout batches: prompts continue from the saved position
    main(["fit", "--config", str(config), "--trainer.max_steps", str(rollouts + 2),
          "--checkpoint.every_n_rollouts=100", "--ckpt_path", str(saved)])
    resumed = tmp_path / "run" / "csv" / "version_1" / "checkpoints"
    assert sorted(p.name for p in resumed.iterdir()) == ["last.ckpt",
                                                         f"rollout={rollouts + 2:06d}.ckpt"]
    final = read_checkpoint(resumed / "last.ckpt")
    assert final["global_step"] == rollouts + 2
    assert final["trustregion"]["next_prompt_batch"] == rollouts + 2
