"""``trustregion fit`` runs for the multi-process command tests: a config on the random tiny
model of ``conftest`` logging one CSV row per rollout batch, the ``trustregion`` command of this
environment, the environment its processes run with, a free port for them to meet on, the rows
a run wrote, a callback saving what each process sampled, and a task whose rewards differ from
prompt to prompt whatever the completions."""

from __future__ import annotations

import csv
import math
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from cli_configs import tiny_cli_config
from lightning.pytorch.callbacks import Callback

from trustregion.interface import StepOutput
from trustregion.tasks import Arithmetic, Example, RewardFn

TESTS = Path(__file__).parents[1]
TRUSTREGION = shutil.which("trustregion", path=str(Path(sys.executable).parent))
"""The console script installed with the package (what users type)."""


def fit_config(directory: Path, model_dir: Path, *, model: dict[str, Any],
               trainer: dict[str, Any] | None = None) -> Path:
    """A config training the random tiny model, seeded, with one CSV row per rollout batch
    under ``directory/csv`` and no checkpoints. The task is the digit-rewarding one of
    ``conftest`` (a random model earns rewards); ``model`` settings are added to, or replace,
    those of the model section."""
    path = tiny_cli_config(directory, model_dir, seed_everything=0, trainer={
        "log_every_n_steps": 1, "enable_checkpointing": False,
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                   "init_args": {"save_dir": str(directory), "name": "csv"}},
        **(trainer or {})})
    config = yaml.safe_load(path.read_text())
    config["model"].update({"task": {"class_path": "conftest.DigitRichArithmetic"}, **model})
    path.write_text(yaml.safe_dump(config))
    return path


def process_env() -> dict[str, str]:
    """The environment of a ``trustregion`` process: one thread, and the test helpers
    (``conftest``, this module) importable, as class paths in the configs need."""
    paths = [str(TESTS), str(Path(__file__).parent),
             *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(paths)}


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def metric_rows(directory: Path) -> dict[int, dict[str, float]]:
    """The rows of ``directory/csv/version_0/metrics.csv`` by step; each step has one row."""
    with (directory / "csv" / "version_0" / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    steps = [int(row["step"]) for row in rows]
    assert len(set(steps)) == len(steps), f"more than one row for a step: {steps}"
    return {int(row["step"]): {key: float(value) for key, value in row.items()
                               if value != "" and key not in ("step", "epoch")}
            for row in rows}


def finite(row: dict[str, float]) -> dict[str, float]:
    """``row`` without NaN values (NaN never compares equal)."""
    return {key: value for key, value in row.items() if not math.isnan(value)}


def answer_length(completions: list[str], examples: list[Example]) -> list[float]:
    """A third of the length of each example's answer, whatever the completion."""
    return [len(example.answer) / 3 for example in examples]


class AnswerLengthArithmetic(Arithmetic):
    """Arithmetic prompts rewarded by :func:`answer_length`: prompts get different rewards
    even when greedy completions carry no signal."""

    @property
    def reward_function(self) -> RewardFn:
        return answer_length


class SaveRankRollouts(Callback):
    """Saves what each process sampled in each rollout batch, as
    ``directory/rank{R}-step{S}.pt``: prompts (one per completion), rewards, advantages,
    completion lengths, and the policy's entropy summed over the update's tokens with their
    count."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = StepOutput.of(outputs)
        assert step is not None
        rollout = step.rollout
        self.directory.mkdir(parents=True, exist_ok=True)
        assert rollout.rewards is not None and rollout.advantages is not None
        entropy = torch.zeros((), dtype=torch.float64)
        for record in step.updates:
            assert record.batch.entropy is not None
            entropy += (record.batch.entropy * record.batch.mask).sum().double().cpu()
        torch.save({"prompts": [example.prompt for example in rollout.examples],
                    "rewards": rollout.rewards.cpu(), "advantages": rollout.advantages.cpu(),
                    "lengths": rollout.lengths.cpu(), "entropy_sum": entropy,
                    "tokens": sum(int(r.batch.mask.sum()) for r in step.updates)},
                   self.directory / f"rank{trainer.global_rank}-step{batch.index}.pt")
