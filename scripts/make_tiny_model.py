"""Build the tiny character-level models shipped in ``trustregion/assets/tiny-char-<name>/``.

Each model is briefly fine-tuned (supervised, plain PyTorch) on a mixture of the built-in tasks so
that it starts RL with partial accuracy: it has seen the format and mostly knows the answers, but
sampling at temperature 1.0 is often wrong, which leaves RL room to improve. Training stops after
a fixed number of steps, chosen per architecture so that exact match on ``arithmetic`` at
temperature 1.0 lands between roughly 20 % and 50 %:

=============  ===================  =====  ==============================================
``--arch``     shipped as           steps  exact match on ``arithmetic``, T=1.0
=============  ===================  =====  ==============================================
``llama``      ``tiny-char-llama``  400    30.5 %
``qwen3``      ``tiny-char-qwen3``  400    26.0 %
``gpt2``       ``tiny-char-gpt2``   800    21.0 % (11.5 % after 400 steps, 17.0 % after 600)
``qwen3_moe``  ``tiny-char-moe``    400    29.5 %
=============  ===================  =====  ==============================================

Any other key of :data:`trustregion.models.architectures.ARCHITECTURES` builds as
``tiny-char-<arch>`` with 400 steps; ``--config PATH`` builds from a transformers ``config.json``
whose vocabulary is the character tokenizer's. Every family trains without dropout (GPT-2's
default of 0.1 is turned off, see :data:`NO_DROPOUT`).

Each training sequence is ``<bos> prompt answer <eos>``; the loss covers only the answer and
``<eos>``. Accuracy is measured on 200 prompts per task drawn with a seed of their own, as RL
would draw them, greedy and sampled at temperature 1.0; it is also reported on the subset of those
prompts that never appeared in training (``arithmetic`` has too few distinct prompts to leave any
out). The model card (``README.md`` next to the weights) records the architecture, parameter
count, file size and these accuracies.

Usage::

    python scripts/make_tiny_model.py --arch qwen3 --threads 1   # rebuild tiny-char-qwen3
    python scripts/make_tiny_model.py --arch gpt2 --out /tmp/tiny --steps 300 --eval-every 100
    python scripts/make_tiny_model.py --config my/config.json --out /tmp/mine

The run is seeded. CPU results depend on the number of torch threads, so each model card gives
the exact command: ``tiny-char-llama`` was built with 2 threads, the others with 1. A build takes
a few minutes on an idle 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

# Run from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trustregion.models.architectures import ARCHITECTURES, tiny_config
from trustregion.models.char_tokenizer import build_char_tokenizer
from trustregion.models.tiny import ASSETS_DIR
from trustregion.tasks import Arithmetic, DigitSort, Example, Reverse, Task

TASKS: dict[str, Task] = {
    "arithmetic": Arithmetic(),
    "digit_sort": DigitSort(),
    "reverse": Reverse(),
}
EVAL_SEED = 1234
MAX_NEW_TOKENS = 8
DEFAULT_STEPS = 400

SHIPPED: dict[str, tuple[str, int]] = {
    "llama": ("tiny-char-llama", 400),
    "qwen3": ("tiny-char-qwen3", 400),
    "gpt2": ("tiny-char-gpt2", 800),
    "qwen3_moe": ("tiny-char-moe", 400),
}
"""Architecture -> (shipped name, optimizer steps); see the table in the module docstring."""

NO_DROPOUT: dict[str, dict[str, Any]] = {
    "gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
}
"""Settings that turn off a family's default dropout, so every family trains without it, as
Llama does (with GPT-2's 0.1 dropout the arithmetic facts are learned far more slowly)."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--arch", choices=sorted(ARCHITECTURES), default=None,
                        help="architecture family (default: llama)")
    source.add_argument("--config", type=Path, default=None,
                        help="a transformers config.json for the character tokenizer's vocabulary")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: trustregion/assets/tiny-char-<name>)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps (default: per architecture, see the docstring)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-size", type=int, default=200, help="held-out prompts per task")
    parser.add_argument(
        "--eval-every", type=int, default=0, help="also evaluate every N steps (0: only at the end)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--no-save", action="store_true", help="train and evaluate only")
    args = parser.parse_args()
    for name in ("steps", "batch_size", "warmup", "eval_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1; got {value}")
    if args.eval_every < 0:
        parser.error(f"--eval-every must be 0 (off) or positive; got {args.eval_every}")
    return args


def model_config(args: argparse.Namespace, vocab_size: int) -> tuple[PretrainedConfig, str, int]:
    """The configuration to build, the model's name and its default number of steps."""
    if args.config is not None:
        if not args.config.is_file():
            sys.exit(f"--config {args.config}: no such file; pass a transformers config.json")
        config = AutoConfig.from_pretrained(args.config, local_files_only=True)
        if getattr(config, "vocab_size", None) != vocab_size:
            sys.exit(f"--config {args.config}: vocab_size must be {vocab_size}, the character "
                     f"tokenizer's vocabulary; got {getattr(config, 'vocab_size', None)}")
        return config, f"tiny-char-{config.model_type}", DEFAULT_STEPS
    arch = args.arch or "llama"
    name, steps = SHIPPED.get(arch, (f"tiny-char-{arch}", DEFAULT_STEPS))
    return tiny_config(arch, vocab_size, **NO_DROPOUT.get(arch, {})), name, steps


def training_batch(
    rng: random.Random, size: int, tokenizer: PreTrainedTokenizerBase, seen: set[str]
) -> dict[str, torch.Tensor]:
    """``size`` sequences from tasks drawn uniformly, right-padded; labels mask the prompt.

    Adds every prompt used to ``seen``.
    """
    names = list(TASKS)
    rows: list[tuple[list[int], list[int]]] = []
    for _ in range(size):
        example = TASKS[rng.choice(names)].sample(rng)
        seen.add(example.prompt)
        prompt_ids = tokenizer(example.prompt)["input_ids"]
        answer_ids = tokenizer(example.answer, add_special_tokens=False)["input_ids"]
        ids = prompt_ids + answer_ids + [tokenizer.eos_token_id]
        labels = [-100] * len(prompt_ids) + answer_ids + [tokenizer.eos_token_id]
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


@torch.no_grad()
def rewards(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    examples: list[Example],
    *,
    sample: bool,
    seed: int = 0,
) -> list[float]:
    """Exact-match reward of one generation per example (greedy, or sampled at T=1.0)."""
    model.eval()
    torch.manual_seed(seed)
    inputs = tokenizer([ex.prompt for ex in examples], return_tensors="pt", padding=True)
    if sample:
        options: dict[str, object] = {"do_sample": True, "temperature": 1.0, "top_k": 0}
    else:
        options = {"do_sample": False}
    out = model.generate(  # type: ignore[operator]
        **inputs,
        max_new_tokens=MAX_NEW_TOKENS,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **options,
    )
    completions = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :])
    model.train()
    return task.reward(completions, examples).tolist()


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    eval_sets: dict[str, list[Example]],
    seen: set[str],
) -> dict[str, dict[str, float]]:
    """Per task: exact match greedy and at T=1.0, on all prompts and on those never trained on."""
    results = {}
    for name, examples in eval_sets.items():
        unseen = [ex.prompt not in seen for ex in examples]
        row: dict[str, float] = {"unseen": sum(unseen) / len(examples)}
        for mode in ("greedy", "t1.0"):
            got = rewards(model, tokenizer, TASKS[name], examples, sample=mode == "t1.0")
            row[mode] = sum(got) / len(got)
            new = [r for r, is_new in zip(got, unseen, strict=True) if is_new]
            row[f"{mode}_unseen"] = sum(new) / len(new) if new else float("nan")
        results[name] = row
    return results


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1%}"


def format_results(results: dict[str, dict[str, float]]) -> str:
    lines = [f"{'task':<12} {'greedy':>7} {'T=1.0':>7}   | unseen: {'share':>6} {'greedy':>7} "
             f"{'T=1.0':>7}"]
    for name, r in results.items():
        lines.append(
            f"{name:<12} {r['greedy']:>7.1%} {r['t1.0']:>7.1%}   |         {r['unseen']:>6.1%} "
            f"{_pct(r['greedy_unseen']):>7} {_pct(r['t1.0_unseen']):>7}"
        )
    return "\n".join(lines)


def write_model_card(
    out: Path,
    name: str,
    config: PretrainedConfig,
    args: argparse.Namespace,
    steps: int,
    results: dict[str, dict[str, float]],
    n_params: int,
) -> None:
    """Write ``README.md``: architecture, size, how it was trained and what it scores."""
    rows = "\n".join(
        f"| `{task}` | {r['greedy']:.1%} | {r['t1.0']:.1%} | {r['unseen']:.0%} | "
        f"{_pct(r['greedy_unseen'])} | {_pct(r['t1.0_unseen'])} |"
        for task, r in results.items()
    )
    weights = (out / "model.safetensors").stat().st_size
    rebuild = (f"--config {args.config}" if args.config is not None
               else f"--arch {config.model_type}")
    # CPU results depend on the thread count, so an exact rebuild names it.
    rebuild += f" --threads {args.threads}"
    if args.steps is not None:
        rebuild += f" --steps {args.steps}"
    architecture = ARCHITECTURES.get(config.model_type, "from a config file")
    (out / "README.md").write_text(
        f"""# {name}

A {n_params / 1e6:.2f} M-parameter `{config.model_type}` model ({architecture}) with a
character-level tokenizer; weights in float32, `model.safetensors` is {weights / 2**20:.2f} MiB
({weights:,} bytes). It was fine-tuned (supervised) for {steps} steps on the built-in tasks
`arithmetic`, `digit_sort` and `reverse` with their default settings, so that RL starts from
partial accuracy. Rebuild with `python scripts/make_tiny_model.py {rebuild}` (seed {args.seed}).

Exact match on {args.eval_size} prompts per task drawn with a seed of their own, as RL would draw
them; the last three columns restrict to the prompts that never appeared in training:

| task | greedy | sampled, T=1.0 | unseen share | greedy, unseen | T=1.0, unseen |
|---|---|---|---|---|---|
{rows}

Prompts are written as in `trustregion.tasks` (`12+7=`, `sort:312=`, `rev:abc=`); the model
answers and then emits `<eos>`. Load it with `trustregion.models.loading.load_model("{name}")`
or as `model.policy: {name}` in a training config.
""",
        encoding="utf-8",
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    tokenizer = build_char_tokenizer()
    config, name, default_steps = model_config(args, len(tokenizer))
    steps = args.steps or default_steps
    out = args.out or ASSETS_DIR / name
    model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{name} ({config.model_type}): {n_params:,} parameters, vocabulary {len(tokenizer)}")

    eval_sets = {
        task_name: task.examples(args.eval_size, seed=EVAL_SEED)
        for task_name, task in TASKS.items()
    }
    seen: set[str] = set()

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)

    def lr_factor(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    rng = random.Random(args.seed)
    model.train()
    for step in range(1, steps + 1):
        batch = training_batch(rng, args.batch_size, tokenizer, seen)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 50 == 0 or step == steps:
            elapsed = time.perf_counter() - started
            print(f"step {step:5d}  loss {loss.item():.4f}  ({elapsed:.0f} s)", flush=True)
        if args.eval_every and step % args.eval_every == 0 and step != steps:
            print(format_results(evaluate(model, tokenizer, eval_sets, seen)), flush=True)

    model.eval()
    results = evaluate(model, tokenizer, eval_sets, seen)
    print(f"exact match on {args.eval_size} evaluation prompts per task after {steps} steps:")
    print(format_results(results))

    if not args.no_save:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        # The generic class name keeps the files loadable by older transformers releases too.
        config_path = out / "tokenizer_config.json"
        tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
        tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
        write_model_card(out, name, config, args, steps, results, n_params)
        for file in out.iterdir():
            file.chmod(0o644)
        total = sum(file.stat().st_size for file in out.iterdir())
        print(f"saved to {out} ({total / 2**20:.2f} MiB in all)")
    print(f"total time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
