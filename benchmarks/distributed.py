"""Training throughput on one process and on two CPU processes, and the scaling efficiency.

Usage: python benchmarks/distributed.py [--config examples/configs/quickstart.yaml] [--steps 4]
                                        [--warmup 1] [--strategy ddp|fsdp]

Runs the config's training twice with the same global batch: on one process, then on two
processes on this machine (``ddp``: DDP over gloo; ``fsdp``: FSDP2 through Lightning's
``ModelParallelStrategy``), each process with one thread (``OMP_NUM_THREADS=1``). Each rank
samples and trains on half of every rollout batch. The first ``--warmup`` rollout batches are
not counted; the throughput is the timed rollout batches over the time from the end of the last
warm-up batch to the end of the last one, on rank 0. The efficiency is
(throughput on 2 processes ÷ throughput on 1) ÷ 2: 1 is perfect scaling.

Held-out evaluation, loggers, checkpoints and the config's callbacks are switched off. The
figures mean something only on a machine with at least two free cores: the load average is
printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import lightning as L
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, Strategy

from trustregion.cli import TrustRegionCLI

RESULT = "RESULT "
"""The prefix of the line on which a worker reports its figures to the launching process."""


class BatchClock(L.Callback):
    """The time at the start of training and at the end of every rollout batch (one
    ``training_step``)."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.marks.append(time.perf_counter())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.marks.append(time.perf_counter())


def _strategy(name: str, processes: int) -> Strategy | str:
    if processes == 1:
        return "auto"
    if name == "fsdp":
        return ModelParallelStrategy(data_parallel_size=processes, tensor_parallel_size=1)
    return DDPStrategy(process_group_backend="gloo")


def worker(args: argparse.Namespace) -> None:
    """Train ``warmup + steps`` rollout batches on ``args.processes`` processes; rank 0 prints
    its figures as one JSON line. Lightning starts the other ranks by running this command
    again."""
    root = tempfile.mkdtemp(prefix="trustregion-distributed-")
    cli = TrustRegionCLI(args=["--config", args.config, "--trainer.logger=false",
                               "--trainer.enable_checkpointing=false",
                               "--trainer.enable_progress_bar=false",
                               "--trainer.callbacks=null", f"--trainer.default_root_dir={root}",
                               "--model.evaluation=null"], run=False)
    module = cli.model
    clock = BatchClock()
    batches = args.warmup + args.steps
    trainer = L.Trainer(accelerator="cpu", devices=args.processes,
                        strategy=_strategy(args.strategy, args.processes),
                        max_steps=batches * module.optimizer_steps_per_rollout, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=root, callbacks=[clock])
    trainer.fit(module)
    if trainer.global_rank != 0:
        return
    timed = clock.marks[args.warmup:]  # from the end of the last warm-up batch
    seconds, counted = timed[-1] - timed[0], len(timed) - 1
    rate = counted / seconds
    print(RESULT + json.dumps({
        "processes": args.processes, "batches": counted, "seconds": seconds,
        "batches_per_s": rate, "sequences_per_s": rate * module.batching.sequences,
        "sequences_per_batch": module.batching.sequences}), flush=True)


def _run(args: argparse.Namespace, processes: int) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--processes",
               str(processes), "--config", args.config, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--strategy", args.strategy]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    results = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not results:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"the run on {processes} process(es) failed "
                         f"(exit status {done.returncode})")
    return dict(json.loads(results[-1][len(RESULT):]))


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="examples/configs/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=4, help="timed rollout batches")
    parser.add_argument("--warmup", type=int, default=1, help="rollout batches not timed")
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp",
                        help="how the two processes train: DDP, or FSDP2 "
                             "(ModelParallelStrategy)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be ≥ 1 and --warmup ≥ 0; got {args.steps} and "
                     f"{args.warmup}")
    if args.worker:
        worker(args)
        return
    print(f"load average before (1, 5, 15 min): {_load()}")
    one, two = _run(args, 1), _run(args, 2)
    print(f"load average after  (1, 5, 15 min): {_load()}")
    print(f"config {args.config}: {one['sequences_per_batch']} sequences per rollout batch, "
          f"{args.warmup} warm-up + {args.steps} timed rollout batches, "
          f"2 processes: {args.strategy}")
    for result in (one, two):
        print(f"{result['processes']} process{'es' if result['processes'] > 1 else '  '}: "
              f"{result['batches_per_s']:8.3f} rollout batches/s "
              f"{result['sequences_per_s']:9.1f} sequences/s "
              f"({result['seconds'] / result['batches']:.3f} s per rollout batch)")
    efficiency = two["batches_per_s"] / one["batches_per_s"] / 2
    print(f"scaling efficiency (throughput_2 / throughput_1) / 2: {efficiency:.3f}")


if __name__ == "__main__":
    main()
