"""A few rollout batches of :class:`TrustRegionModule` on two CPU processes (gloo), under FSDP
(Lightning's ``ModelParallelStrategy``) or DDP, saving what each rank saw for a test to compare.

    PYTHONPATH=tests:tests/distributed python tests/distributed/parallel_run.py \
        MODEL_DIR OUT SCENARIO STRATEGY

Lightning starts the second process by running this script again. Each rank writes to ``OUT``:
``rows{rank}.pt`` (every logged row), ``rollout{rank}_{batch}.pt`` (its sampled rollouts),
``initial{rank}.pt`` (the policy before training), ``final{rank}.pt`` (the whole policy and
behaviour weights after it) and ``exchanges{rank}.pt`` (the number of gradient exchanges: FSDP's
reduce-scatters, one per sharded unit, or DDP's all-reduces, one per gradient bucket).
Scenarios: ``train`` (monitors and a controller; the guard only warns) and ``skip`` (a guard
that fires at every batch and undoes it). Strategies: ``fsdp`` and ``ddp``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from conftest import DigitRichArithmetic
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, Strategy
from row_logger import RowLogger
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from trustregion.batching import BatchSettings
from trustregion.callbacks import (
    CollapseGuard,
    DriftMonitor,
    ShadowStrategies,
    TrustRegionController,
)
from trustregion.interface import StepOutput
from trustregion.module import TrustRegionModule
from trustregion.penalties import EntropyBonus, ReferenceKL
from trustregion.rollout import SamplingSettings
from trustregion.sharding import differing_models, full_state_dict

ROLLOUT_BATCHES = 2
SETTINGS: dict[str, Any] = {
    # 4 prompts × 2 completions per rollout batch, one optimiser step of all 8 sequences: on
    # each of two ranks 4 sequences in 2 micro-batches of 2 (one process: 4 micro-batches).
    "batching": BatchSettings(group_size=2, prompts_per_step=4, mini_batch_size=8,
                              micro_batch_size=2),
    "sampling": SamplingSettings(max_new_tokens=4),
    "penalties": [ReferenceKL(beta=0.1), EntropyBonus(coef=0.01)],
}


def callbacks(scenario: str) -> list[L.Callback]:
    """The callbacks of a scenario (the same in the FSDP run and its single-process replay)."""
    if scenario == "train":
        return [DriftMonitor(), CollapseGuard(max_kl=100.0, action="warn"),
                TrustRegionController("outside_frac", target_value=0.1),
                ShadowStrategies(["ratio_clip", "dppo"])]
    if scenario == "skip":
        # A random model's entropy is far above 0.001 nats: the guard undoes every batch.
        return [DriftMonitor(), CollapseGuard(max_entropy=1e-3, action="skip")]
    raise ValueError(f"unknown scenario {scenario!r}; use 'train' or 'skip'")


def build(model_dir: Path, module_class: type[TrustRegionModule] = TrustRegionModule
          ) -> TrustRegionModule:
    """The module of every run: seeded random initial weights, the settings above."""
    torch.manual_seed(0)
    return module_class(policy=f"config:{model_dir}", task=DigitRichArithmetic(), **SETTINGS)


class SaveRun(L.Callback):
    """Saves each rank's rollouts and, at the end, the whole policy and behaviour weights."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = StepOutput.of(outputs)
        assert step is not None
        torch.save(step.rollout, self.directory / f"rollout{trainer.global_rank}_{batch.index}.pt")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(pl_module, TrustRegionModule)
        final = {"policy": full_state_dict(pl_module.policy),
                 "behavior": full_state_dict(pl_module.behavior)}
        torch.save(final, self.directory / f"final{trainer.global_rank}.pt")


EXCHANGES = 0
"""Gradient exchanges of this process so far."""


def _counted_allreduce(state, bucket):
    # DDP checks the annotations themselves, which the module's postponed annotations would
    # turn into strings: none are given.
    global EXCHANGES
    EXCHANGES += 1
    return default_hooks.allreduce_hook(state, bucket)


class CountAllReduces(L.Callback):
    """Counts DDP's gradient all-reduces (Lightning registers communication hooks on CUDA only,
    so the hook goes on the wrapped model here, before its first backward)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = trainer.strategy.model
        assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
        model.register_comm_hook(state=None, hook=_counted_allreduce)


def _strategy(name: str) -> Strategy:
    if name == "ddp":
        return DDPStrategy()
    if name != "fsdp":
        raise ValueError(f"unknown strategy {name!r}; use 'fsdp' or 'ddp'")
    reduce_scatter = dist.reduce_scatter_single

    def counted(*args: Any, **kwargs: Any) -> Any:
        global EXCHANGES
        EXCHANGES += 1
        return reduce_scatter(*args, **kwargs)

    dist.reduce_scatter_single = counted  # FSDP2 reduce-scatters gradients through it
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)


def main(model_dir: Path, out: Path, scenario: str, strategy: str) -> None:
    module = build(model_dir)
    rank = os.environ.get("LOCAL_RANK", "0")  # set by Lightning for the process it starts
    torch.save(module.policy.state_dict(), out / f"initial{rank}.pt")
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=_strategy(strategy),
        max_steps=ROLLOUT_BATCHES, log_every_n_steps=1, logger=RowLogger(out),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[*callbacks(scenario), SaveRun(out),
                   *([CountAllReduces()] if strategy == "ddp" else [])])
    trainer.fit(module)
    torch.save(EXCHANGES, out / f"exchanges{trainer.global_rank}.pt")


def run_on_two_processes(model_dir: Path, out: Path, scenario: str,
                         strategy: str) -> list[list[tuple[int, dict[str, float]]]]:
    """Run this script (for a test); return each rank's logged rows."""
    here = Path(__file__).resolve().parent
    path = os.pathsep.join([str(here.parent), str(here), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, str(here / "parallel_run.py"), str(model_dir), str(out), scenario,
         strategy],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path})
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / f"rows{rank}.pt") for rank in (0, 1)]


def report_differing_models(rank: int, store: Path, out: Path) -> None:
    """On process ``rank`` of two (``torch.multiprocessing.spawn``): save which of a policy
    seeded by the rank, a behaviour seeded alike on both and no reference differ."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)
        policy = torch.nn.Linear(3, 2)
        torch.manual_seed(0)
        behavior = torch.nn.Linear(3, 2)
        differing = differing_models({"policy": policy, "behavior": behavior, "reference": None})
        torch.save(differing, out / f"differing{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4])
