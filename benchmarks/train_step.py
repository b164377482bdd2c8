"""Throughput of the two phases of an RL step, and peak memory, on a training config.

Usage: python benchmarks/train_step.py [--config examples/configs/quickstart.yaml] [--steps 6]

Rollout tokens/s counts generated (completion) tokens; update tokens/s counts every token the
policy processes in its forward and backward passes (prompt + completion, all PPO epochs).
The first rollout and update are warm-up and not counted. Peak memory is the process's peak
resident set size.
"""

from __future__ import annotations

import argparse
import resource
import time
from typing import Any

import lightning as L

from trustregion.cli import TrustRegionCLI


class PhaseTimer(L.Callback):
    """Times ``rollout`` and ``update`` of the module by wrapping them."""

    def __init__(self) -> None:
        self.rollout: list[tuple[float, int]] = []
        self.update: list[tuple[float, int]] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        rollout, update = pl_module.rollout, pl_module.update

        def timed_rollout(batch: Any) -> Any:
            start = time.perf_counter()
            result = rollout(batch)  # (rollout, stats)
            self.rollout.append((time.perf_counter() - start, int(result[0].lengths.sum())))
            return result

        def timed_update(result: Any, index: int) -> Any:
            start = time.perf_counter()
            out = update(result, index)
            tokens = int(result.prompt_mask.sum() + result.completion_mask.sum())
            self.update.append((time.perf_counter() - start,
                                tokens * pl_module.batching.ppo_epochs))
            return out

        pl_module.rollout, pl_module.update = timed_rollout, timed_update


def _rate(samples: list[tuple[float, int]]) -> tuple[float, float]:
    seconds = sum(s for s, _ in samples[1:])
    tokens = sum(t for _, t in samples[1:])
    return tokens / seconds, seconds / max(len(samples) - 1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="examples/configs/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=6, help="rollout batches to time (+1)")
    args = parser.parse_args()
    cli = TrustRegionCLI(args=["--config", args.config, "--trainer.logger=false",
                               "--trainer.enable_checkpointing=false",
                               "--trainer.enable_progress_bar=false",
                               "--trainer.callbacks=null"], run=False)
    module = cli.model
    batching, sampling = module.batching, module.sampling
    steps_per_rollout = module.optimizer_steps_per_rollout
    timer = PhaseTimer()
    trainer = L.Trainer(max_steps=(args.steps + 1) * steps_per_rollout, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer])
    trainer.fit(module)
    rollout_rate, rollout_s = _rate(timer.rollout)
    update_rate, update_s = _rate(timer.update)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"config {args.config}: {batching.prompts_per_step} prompts × {batching.group_size} "
          f"completions, max_new_tokens {sampling.max_new_tokens}, ppo_epochs "
          f"{batching.ppo_epochs}, {args.steps} timed steps")
    print(f"rollout: {rollout_rate:10.0f} generated tokens/s  ({rollout_s:.3f} s per step)")
    print(f"update:  {update_rate:10.0f} tokens/s              ({update_s:.3f} s per step)")
    print(f"peak resident memory: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
