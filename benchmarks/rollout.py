"""Peak extra memory of one rollout: Hugging Face ``generate`` against the lean sampler.

    python benchmarks/rollout.py [--vocab 49152] [--sequences 64] [--tokens 256]
                                 [--group-size 8] [--hidden-size 64] [--layers 2] [--threads 1]

A random-init Llama with a ``--vocab``-token vocabulary (SmolLM2's by default) and a small body
(``--hidden-size``, ``--layers``: the compute is small, the vocabulary is what matters) samples
``--sequences`` completions (``--sequences / --group-size`` arithmetic prompts, ``--group-size``
completions each) of exactly ``--tokens`` tokens each: EOS does not end a completion
(``SamplingSettings(ignore_eos=True)``; on a version of the library without that setting the
rollout's end-of-sequence id is replaced by one the model never samples, and the benchmark checks
every completion's length).

``generate`` keeps every step's processed scores (``output_scores``), an ``[N, T, V]`` float32
tensor in all; the lean sampler (where the library has it: ``SamplingSettings.sampler``) records
each step's log-probs as it goes. Each sampler runs in a fresh process with glibc's
``MALLOC_MMAP_THRESHOLD_`` at 64 KiB, so every tensor larger than that gets its own mapping and
is returned to the system when freed; the peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs`` right before the rollout) minus the resident set before it is then the
peak of live memory the rollout needed beyond the model (the method of
``benchmarks/strategies.py``). A warm-up rollout of 2 tokens runs first, so one-off library
initialisation is not counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

MIB = 2**20
MMAP_THRESHOLD = 64 * 1024
SAMPLERS = ("generate", "lean")
FLOAT32_BYTES = 4


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident set


def sampler_choice() -> bool:
    """Whether the installed library lets ``SamplingSettings`` choose the sampler."""
    from trustregion.rollout import SamplingSettings

    return "sampler" in {f.name for f in dataclasses.fields(SamplingSettings)}


@contextmanager
def _eos_never_sampled(vocab_size: int) -> Iterator[None]:
    """On a library without ``SamplingSettings.ignore_eos``: make the rollout's end-of-sequence
    id ``vocab_size``, an id the model cannot sample, so every completion is full length."""
    import trustregion.rollout as rollout_module

    original = rollout_module.eos_token_ids
    rollout_module.eos_token_ids = lambda model, tokenizer: [vocab_size]
    try:
        yield
    finally:
        rollout_module.eos_token_ids = original


def measure(sampler: str, args: argparse.Namespace) -> dict[str, float]:
    """One rollout with ``sampler`` in this process: peak extra MiB and seconds."""
    from transformers import AutoModelForCausalLM

    from trustregion.models.architectures import tiny_config
    from trustregion.models.char_tokenizer import build_char_tokenizer
    from trustregion.rollout import SamplingSettings, generate_rollout
    from trustregion.tasks import Arithmetic

    torch.set_num_threads(args.threads)
    fields = {f.name for f in dataclasses.fields(SamplingSettings)}
    choice: dict[str, Any] = {"sampler": sampler} if "sampler" in fields else {}
    if "ignore_eos" in fields:
        choice["ignore_eos"] = True
    examples = Arithmetic().examples(args.sequences // args.group_size, seed=0)
    tokenizer = build_char_tokenizer()
    longest_prompt = max(len(tokenizer(ex.prompt)["input_ids"]) for ex in examples)
    config = tiny_config("llama", args.vocab, hidden_size=args.hidden_size,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         intermediate_size=2 * args.hidden_size,
                         max_position_embeddings=longest_prompt + args.tokens)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    patch = nullcontext() if "ignore_eos" in fields else _eos_never_sampled(args.vocab)

    def rollout(tokens: int) -> Any:
        settings = SamplingSettings(max_new_tokens=tokens, **choice)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return generate_rollout(model, tokenizer, examples, group_size=args.group_size,
                                    sampling=settings)

    with patch:
        rollout(2)  # warm-up
        gc.collect()
        baseline = _status_mib("VmRSS")
        _reset_peak_rss()
        start = time.perf_counter()
        result = rollout(args.tokens)
        seconds = time.perf_counter() - start
        peak = max(0.0, _status_mib("VmHWM") - baseline)
    mask = result.completion_mask
    if tuple(mask.shape) != (args.sequences, args.tokens) or not bool(mask.all()):
        raise RuntimeError(f"expected {args.sequences} completions of exactly {args.tokens} "
                           f"tokens; got {tuple(mask.shape)} with lengths "
                           f"{sorted(set(mask.sum(-1).tolist()))}")
    return {"peak_mib": peak, "seconds": seconds}


def _spawn(sampler: str, args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", sampler,
           f"--vocab={args.vocab}", f"--sequences={args.sequences}", f"--tokens={args.tokens}",
           f"--group-size={args.group_size}", f"--hidden-size={args.hidden_size}",
           f"--layers={args.layers}", f"--heads={args.heads}", f"--threads={args.threads}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the {sampler!r} rollout failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer ≥ {minimum}; got {value}")
        return value
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/rollout.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=_at_least(64), default=49152, help="V (default 49152)")
    parser.add_argument("--sequences", type=_at_least(2), default=64,
                        help="N, completions per rollout (default 64)")
    parser.add_argument("--tokens", type=_at_least(1), default=256,
                        help="T, tokens per completion (default 256)")
    parser.add_argument("--group-size", type=_at_least(1), default=8,
                        help="completions per prompt; must divide N (default 8)")
    parser.add_argument("--hidden-size", type=_at_least(8), default=64)
    parser.add_argument("--layers", type=_at_least(1), default=2)
    parser.add_argument("--heads", type=_at_least(1), default=4)
    parser.add_argument("--threads", type=_at_least(1), default=1,
                        help="torch intra-op threads (default 1)")
    parser.add_argument("--worker", choices=SAMPLERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sequences % args.group_size:
        parser.error(f"--group-size ({args.group_size}) must divide --sequences "
                     f"({args.sequences})")
    if args.hidden_size % args.heads:
        parser.error(f"--hidden-size ({args.hidden_size}) must be a multiple of --heads "
                     f"({args.heads})")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker, args)))
        return
    n, t, v = args.sequences, args.tokens, args.vocab
    all_scores = n * t * v * FLOAT32_BYTES / MIB
    one_step = n * v * FLOAT32_BYTES / MIB
    samplers = SAMPLERS if sampler_choice() else ("generate",)
    print(f"N={n} T={t} V={v}, group size {args.group_size}, hidden {args.hidden_size}, "
          f"{args.layers} layers, {args.threads} threads, torch {torch.__version__}")
    print(f"[N, T, V] float32: {all_scores:.0f} MiB; one step's [N, V] logits: "
          f"{one_step:.1f} MiB")
    if len(samplers) == 1:
        print("this version of the library has one sampler (generate)")
    header = f"{'sampler':<9}{'peak extra MiB':>15}{'× [N, V]':>10}{'× [N, T, V]':>13}{'s':>8}"
    print(header)
    print("-" * len(header))
    for sampler in samplers:
        r = _spawn(sampler, args)
        print(f"{sampler:<9}{r['peak_mib']:>15.1f}{r['peak_mib'] / one_step:>10.2f}"
              f"{r['peak_mib'] / all_scores:>13.3f}{r['seconds']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
