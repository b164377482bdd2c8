"""Build the tiny character-level Llama shipped in ``trustregion/assets/tiny-char-llama/``.

The model is briefly fine-tuned (supervised, plain PyTorch) on a mixture of the built-in tasks so
that it starts RL with partial accuracy: it has seen the format and mostly knows the answers, but
sampling at temperature 1.0 is often wrong, which leaves RL room to improve. Training stops after
a fixed number of steps, chosen so that exact match on ``arithmetic`` at temperature 1.0 lands
between roughly 20 % and 50 %.

Each training sequence is ``<bos> prompt answer <eos>``; the loss covers only the answer and
``<eos>``. Accuracy is measured on 200 prompts per task drawn with a seed of their own, as RL
would draw them, greedy and sampled at temperature 1.0; it is also reported on the subset of those
prompts that never appeared in training (``arithmetic`` has too few distinct prompts to leave any
out).

Usage::

    python scripts/make_tiny_model.py                 # rebuild the shipped artefact
    python scripts/make_tiny_model.py --out /tmp/tiny --steps 300 --eval-every 100

The run is seeded and takes well under a minute on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

# Run from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trustregion.models.char_tokenizer import build_char_tokenizer
from trustregion.models.tiny import TINY_MODEL_DIR, tiny_llama_config
from trustregion.tasks import Arithmetic, DigitSort, Example, Reverse, Task

TASKS: dict[str, Task] = {
    "arithmetic": Arithmetic(),
    "digit_sort": DigitSort(),
    "reverse": Reverse(),
}
EVAL_SEED = 1234
MAX_NEW_TOKENS = 8


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=TINY_MODEL_DIR, help="output directory")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps")
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
    return parser.parse_args()


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
    out: Path, args: argparse.Namespace, results: dict[str, dict[str, float]], n_params: int
) -> None:
    rows = "\n".join(
        f"| `{name}` | {r['greedy']:.1%} | {r['t1.0']:.1%} | {r['unseen']:.0%} | "
        f"{_pct(r['greedy_unseen'])} | {_pct(r['t1.0_unseen'])} |"
        for name, r in results.items()
    )
    (out / "README.md").write_text(
        f"""# tiny-char-llama

A {n_params / 1e6:.2f} M-parameter Llama with a character-level tokenizer, fine-tuned (supervised)
for {args.steps} steps on the built-in tasks `arithmetic`, `digit_sort` and `reverse` with their
default settings, so that RL starts from partial accuracy. Rebuild with
`python scripts/make_tiny_model.py` (seed {args.seed}).

Exact match on {args.eval_size} prompts per task drawn with a seed of their own, as RL would draw
them; the last three columns restrict to the prompts that never appeared in training:

| task | greedy | sampled, T=1.0 | unseen share | greedy, unseen | T=1.0, unseen |
|---|---|---|---|---|---|
{rows}

Prompts are written as in `trustregion.tasks` (`12+7=`, `sort:312=`, `rev:abc=`); the model
answers and then emits `<eos>`.
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
    config = tiny_llama_config(len(tokenizer))
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters, vocabulary {len(tokenizer)}")

    eval_sets = {
        name: task.examples(args.eval_size, seed=EVAL_SEED) for name, task in TASKS.items()
    }
    seen: set[str] = set()

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)

    def lr_factor(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    rng = random.Random(args.seed)
    model.train()
    for step in range(1, args.steps + 1):
        batch = training_batch(rng, args.batch_size, tokenizer, seen)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 50 == 0 or step == args.steps:
            elapsed = time.perf_counter() - started
            print(f"step {step:5d}  loss {loss.item():.4f}  ({elapsed:.0f} s)")
        if args.eval_every and step % args.eval_every == 0 and step != args.steps:
            print(format_results(evaluate(model, tokenizer, eval_sets, seen)))

    model.eval()
    results = evaluate(model, tokenizer, eval_sets, seen)
    print(f"exact match on {args.eval_size} evaluation prompts per task after {args.steps} steps:")
    print(format_results(results))

    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(args.out)
        tokenizer.save_pretrained(args.out)
        # The generic class name keeps the files loadable by older transformers releases too.
        config_path = args.out / "tokenizer_config.json"
        tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
        tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
        write_model_card(args.out, args, results, n_params)
        for file in args.out.iterdir():
            file.chmod(0o644)
        print(f"saved to {args.out}")
    print(f"total time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
