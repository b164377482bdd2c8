"""Drift between behaviour and policy at ``sync_every=1``: a mixture-of-experts model against
dense models of the same size, with the behaviour at several precisions, with and without
routing replay.

Usage: python benchmarks/moe_drift.py [--seeds 3] [--prompts 8] [--group-size 4]
                                      [--max-new-tokens 16] [--precisions fp32 bf16 int8 fp8]
                                      [--shipped]

The policy is fp32; the behaviour holds the policy's weights at each precision
(:func:`trustregion.precision.low_precision_copy`), which is what the behaviour is right after
a sync. Per model, seed and precision one rollout of ``prompts × group_size`` arithmetic
completions is sampled from the behaviour (routing recorded for the MoE model), and the policy
recomputes the log-probs of the sampled tokens (:func:`trustregion.routing.rollout_drift`).

Models (random initialisation from :func:`trustregion.models.architectures.tiny_config`, a
different initialisation per seed, unless ``--shipped``):

* ``moe``: ``qwen3_moe``, 8 experts of width 64, top-2 per token;
* ``dense-active``: ``qwen3`` with an MLP of width 128, the same parameters *per token* as the
  two active experts;
* ``dense-total``: ``qwen3`` with an MLP of width 512, the same *total* MLP parameters as the
  eight experts (the router's 8 × 128 weights aside).

``--shipped`` compares the warm-started ``tiny-char-moe`` with ``tiny-char-qwen3`` instead
(one model each; the seeds then vary the prompts and the sampling only).

Printed per row, averaged over the seeds (tokens: summed): the mean of |π − μ| (``tv``), the
mean k3, the mean and the largest |log π − log μ|, and for the MoE model the fraction of
(token, layer) routing decisions where the policy chose another expert set than the behaviour
(``flips``), without and with routing replay (``+replay`` rows).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import transformers
from transformers import PreTrainedModel

from trustregion.models import build_char_tokenizer
from trustregion.models.architectures import tiny_config
from trustregion.models.loading import load_model
from trustregion.precision import low_precision_copy
from trustregion.rollout import SamplingSettings, generate_rollout
from trustregion.routing import RolloutDrift, moe_routers, rollout_drift
from trustregion.tasks import Arithmetic

ModelFactory = Callable[[int], PreTrainedModel]


@dataclass(frozen=True)
class Row:
    """One line of the table: a model at one behaviour precision, replayed or not."""

    model: str
    precision: str
    replay: bool
    drifts: tuple[RolloutDrift, ...]

    def line(self) -> str:
        n = len(self.drifts)
        tokens = sum(d.tokens for d in self.drifts)
        tv = sum(d.tv for d in self.drifts) / n
        k3 = sum(d.kl_k3 for d in self.drifts) / n
        mean_lr = sum(d.abs_log_ratio for d in self.drifts) / n
        max_lr = max(d.max_abs_log_ratio for d in self.drifts)
        agreements = [d.routing_agreement for d in self.drifts if d.routing_agreement is not None]
        flips = f"{1 - sum(agreements) / len(agreements):8.2%}" if agreements else f"{'-':>8}"
        name = self.model + ("+replay" if self.replay else "")
        return (f"{name:<18}{self.precision:<6}{tokens:>7}{tv:>11.2e}{k3:>11.2e}"
                f"{mean_lr:>11.2e}{max_lr:>11.2e}{flips}")


HEADER = (f"{'model':<18}{'behav':<6}{'tokens':>7}{'tv':>11}{'k3':>11}{'|log r|':>11}"
          f"{'max|log r|':>11}{'flips':>8}")


def random_models(vocab_size: int) -> dict[str, ModelFactory]:
    """The random-initialisation models of the module docstring, by name."""
    def factory(architecture: str, **size: int) -> ModelFactory:
        def build(seed: int) -> PreTrainedModel:
            torch.manual_seed(seed)
            config = tiny_config(architecture, vocab_size, **size)
            return transformers.AutoModelForCausalLM.from_config(config).eval()
        return build
    return {"moe": factory("qwen3_moe"),
            "dense-active": factory("qwen3", intermediate_size=128),
            "dense-total": factory("qwen3", intermediate_size=512)}


def shipped_models() -> dict[str, ModelFactory]:
    """The warm-started MoE and dense models that ship with the package."""
    return {"moe": lambda seed: load_model("tiny-char-moe")[0].eval(),
            "dense": lambda seed: load_model("tiny-char-qwen3")[0].eval()}


def mlp_parameters(model: PreTrainedModel) -> tuple[int, int]:
    """(total, per token) parameters of the model's MLP / expert layers and routers."""
    total = per_token = 0
    for name, param in model.named_parameters():
        if ".mlp." not in name:
            continue
        total += param.numel()
        if ".experts." in name:
            experts = param.shape[0]
            top_k = int(getattr(model.config, "num_experts_per_tok", experts))
            per_token += param.numel() // experts * top_k
        else:
            per_token += param.numel()
    return total, per_token


def measure(models: dict[str, ModelFactory], precisions: Sequence[str], seeds: int, *,
            prompts: int, group_size: int, max_new_tokens: int) -> list[Row]:
    """Every model × precision (× replay for MoE models) over ``seeds`` rollouts."""
    tokenizer = build_char_tokenizer()
    tokenizer.padding_side = "left"
    sampling = SamplingSettings(max_new_tokens=max_new_tokens)
    drifts: dict[tuple[str, str, bool], list[RolloutDrift]] = {}
    for name, build in models.items():
        for seed in range(seeds):
            policy = build(seed)
            moe = bool(moe_routers(policy))
            for precision in precisions:
                behavior = low_precision_copy(policy, precision)
                torch.manual_seed(1000 + seed)
                rollout = generate_rollout(
                    behavior, tokenizer, Arithmetic().examples(prompts, seed=seed),
                    group_size=group_size, sampling=sampling, record_routing=moe)
                for replay in (False, True) if moe else (False,):
                    drifts.setdefault((name, precision, replay), []).append(
                        rollout_drift(policy, rollout, replay=replay))
    return [Row(name, precision, replay, tuple(values))
            for (name, precision, replay), values in drifts.items()]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "int8", "fp8"])
    parser.add_argument("--shipped", action="store_true",
                        help="tiny-char-moe against tiny-char-qwen3 instead of random models")
    args = parser.parse_args(argv)
    models = shipped_models() if args.shipped else random_models(len(build_char_tokenizer()))
    for name, build in models.items():
        total, per_token = mlp_parameters(build(0))
        print(f"{name}: MLP parameters {total:,} in total, {per_token:,} per token")
    start = time.perf_counter()
    rows = measure(models, args.precisions, args.seeds, prompts=args.prompts,
                   group_size=args.group_size, max_new_tokens=args.max_new_tokens)
    print(HEADER)
    for row in sorted(rows, key=lambda r: (args.precisions.index(r.precision), r.model,
                                           r.replay)):
        print(row.line())
    print(f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
