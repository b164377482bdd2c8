"""Time of an RL iteration, split into generation, update and overhead, on two workloads.

    python benchmarks/train_step.py [--workload quickstart|long|both] [--threads 1] [--steps 6]
                                    [--completion-tokens 32] [--json PATH]
    python benchmarks/train_step.py --compare OLD.json NEW.json

Workloads (both: 16 prompts × 8 completions, 2 optimiser steps of 64 sequences, ratio clipping
with ε = 0.2, token-mean loss, AdamW at lr 2e-4, gradient clip 1.0, no KL, fp32; loggers,
callbacks, checkpointing and evaluation off):

* ``quickstart`` — the shipped ``tiny-char-llama`` on the arithmetic task, at most 4 new tokens
  (the model settings of ``examples/configs/quickstart.yaml``, with the trust region of the
  comparison above). Dominated by overhead.
* ``long`` — compute-bound: a seeded random-init Llama of about 5 M parameters with the
  character tokenizer, digit sorting of 32 digits with partial credit (a reward with variance
  over long answers), exactly ``--completion-tokens`` new tokens per completion (EOS does not
  end a completion: ``SamplingSettings(ignore_eos=True)``; on a version of the library without
  that setting, the rollout's end-of-sequence id is replaced by one the model never samples).

Each workload runs in a fresh process at ``--threads`` intra-op threads, one warm-up RL
iteration, then ``--steps`` timed ones. Figures per RL iteration:

* **iteration** — from the start of the first timed iteration (Lightning's
  ``on_train_batch_start``) to the end of the run (``on_train_epoch_end``), divided by
  ``--steps``, so it includes the module's end-of-batch work and Lightning's loop between
  iterations;
  **generation** — ``module.sample``; **update** — ``module.update`` (forward, backward and
  optimiser steps); **overhead** — the rest (tokenisation outside the sampler, scoring,
  advantages, step logging, Lightning's loop).
* **generation tokens/s** — counted completion tokens per second of generation.
* **update tokens/s** — real (non-padding) prompt + completion positions of every sequence the
  update trains on, × ``ppo_epochs``, per second of update. The definition does not depend on
  how the update computes (prefix sharing processes each prompt once per group, but its tokens
  still count once per sequence), so versions compare.
* **padding** — the share of the positions the update's forward passes processed that are
  padding: read from the module's position counter where it has one, else computed for the
  straightforward path (every micro-batch is ``[n, P + T]`` at the rollout's widths).
* **update MFU** — model-FLOPs utilisation of the update: the FLOPs of every ``nn.Linear`` the
  policy runs in the update's forward passes, counted exactly with forward hooks
  (2 · in · out · rows), × 3 for forward + backward, per second of update, against the
  throughput ``torch.matmul`` reaches in the same process at the same thread count, for a
  square 1024 matmul and for the workload's largest Linear shape. Attention's own matmuls and
  the element-wise work are not counted, so this slightly understates the work done.
* **peak memory** — the worker process's peak resident set size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

WORKLOADS = ("quickstart", "long")
GROUP_SIZE = 8
LONG_DIGITS = 32
SEED = 0

ROWS: tuple[tuple[str, str, str], ...] = (
    # (key, label, format)
    ("iteration_s", "iteration, s", ".3f"),
    ("generation_s", "generation, s", ".3f"),
    ("update_s", "update, s", ".3f"),
    ("overhead_s", "overhead, s", ".3f"),
    ("generation_tokens_per_s", "generation tokens/s", ".0f"),
    ("update_tokens_per_s", "update tokens/s", ".0f"),
    ("padding_fraction", "update padding fraction", ".3f"),
    ("update_gflop", "update Linear GFLOP (fwd+bwd)", ".3f"),
    ("update_mfu_square", "update MFU vs 1024² matmul", ".3f"),
    ("update_mfu_shape", "update MFU vs own Linear shape", ".3f"),
    ("matmul_square_gflops", "matmul 1024² GFLOP/s", ".1f"),
    ("matmul_shape_gflops", "matmul own shape GFLOP/s", ".1f"),
    ("peak_rss_mib", "peak RSS, MiB", ".0f"),
)
"""The figures of the comparison table, in order."""


# ---------------------------------------------------------------------------- pure parts
class LinearFlops:
    """Exact FLOPs of the ``nn.Linear`` layers of a model, counted with forward hooks.

    A Linear with ``in`` inputs and ``out`` outputs applied to ``rows`` rows costs
    ``2 · in · out · rows`` FLOPs (one multiply and one add per weight and row; a bias is not
    counted). Counting happens only while :attr:`active` is true. :attr:`largest` is the
    ``(rows, in, out)`` of the costliest single call seen.
    """

    def __init__(self, model: nn.Module) -> None:
        self.active = False
        self.flops = 0
        self.largest: tuple[int, int, int] = (0, 0, 0)
        self._handles = [m.register_forward_hook(self._count) for m in model.modules()
                         if isinstance(m, nn.Linear)]

    def _count(self, layer: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if not self.active:
            return
        assert isinstance(layer, nn.Linear)
        rows = inputs[0].numel() // layer.in_features
        flops = 2 * layer.in_features * layer.out_features * rows
        self.flops += flops
        if flops > 2 * self.largest[0] * self.largest[1] * self.largest[2]:
            self.largest = (rows, layer.in_features, layer.out_features)

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()


def padding_counts(prompt_mask: Tensor, completion_mask: Tensor) -> tuple[int, int]:
    """``(positions, padding)`` of one full-width forward pass over these rows: every row is
    ``P + T`` positions long; the padding is every position neither mask marks as real.

    >>> padding_counts(torch.tensor([[False, True]]), torch.tensor([[True, False]]))
    (4, 2)
    """
    rows = prompt_mask.shape[0]
    positions = rows * (prompt_mask.shape[1] + completion_mask.shape[1])
    real = int(prompt_mask.sum()) + int(completion_mask.sum())
    return positions, positions - real


def matmul_throughput(rows: int, inner: int, cols: int, *, min_seconds: float = 0.3) -> float:
    """FLOP/s of ``torch.matmul`` of a ``[rows, inner]`` by an ``[inner, cols]`` fp32 matrix
    (the second a transposed ``[cols, inner]`` weight, as ``nn.Linear`` multiplies), timed over
    repeats for at least ``min_seconds`` after one warm-up call."""
    gen = torch.Generator().manual_seed(SEED)
    a = torch.randn(rows, inner, generator=gen)
    b = torch.randn(cols, inner, generator=gen).t()
    torch.matmul(a, b)
    repeats, start = 0, time.perf_counter()
    while True:
        torch.matmul(a, b)
        repeats += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return 2 * rows * inner * cols * repeats / elapsed


def _ratio(new: Any, old: Any) -> str:
    if not isinstance(new, int | float) or not isinstance(old, int | float) or old == 0:
        return "–"
    return f"{new / old:.2f}"


def _cell(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, int | float) else "–"


def compare_table(old: Mapping[str, Mapping[str, Any]], new: Mapping[str, Mapping[str, Any]]
                  ) -> str:
    """A Markdown table of the figures of two runs (``--json`` files: workload → figures),
    with new/old per row, for the workloads both runs hold. A figure one run lacks shows as
    ``–``.

    >>> print(compare_table({"long": {"update_s": 2.0}}, {"long": {"update_s": 1.5}})
    ...       .splitlines()[2])
    | long | update, s | 2.000 | 1.500 | 0.75 |
    """
    lines = ["| workload | figure | old | new | new/old |", "|---|---|---:|---:|---:|"]
    for workload in (w for w in old if w in new):
        before, after = old[workload], new[workload]
        for key, label, fmt in ROWS:
            if key not in before and key not in after:
                continue
            a, b = before.get(key), after.get(key)
            lines.append(f"| {workload} | {label} | {_cell(a, fmt)} | {_cell(b, fmt)} | "
                         f"{_ratio(b, a)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the workloads
def _has_field(cls: type, name: str) -> bool:
    return name in {f.name for f in dataclasses.fields(cls)}


def _module_accepts(name: str) -> bool:
    import inspect

    from trustregion.module import TrustRegionModule

    return name in inspect.signature(TrustRegionModule.__init__).parameters


@contextmanager
def _eos_never_sampled(vocab_size: int) -> Iterator[None]:
    """On a library without ``SamplingSettings.ignore_eos``: make the rollout's end-of-sequence
    id ``vocab_size`` — an id the model cannot sample — so every completion runs to
    ``max_new_tokens``. The benchmark checks that each one does."""
    import trustregion.rollout as rollout_module

    original = rollout_module.eos_token_ids
    rollout_module.eos_token_ids = lambda model, tokenizer: [vocab_size]
    try:
        yield
    finally:
        rollout_module.eos_token_ids = original


def _long_policy(directory: Path, args: argparse.Namespace, prompt_tokens: int) -> int:
    """Save a seeded random-init Llama and the character tokenizer to ``directory``; returns
    its number of parameters."""
    from transformers import AutoModelForCausalLM

    from trustregion.models.architectures import tiny_config
    from trustregion.models.char_tokenizer import build_char_tokenizer

    context = prompt_tokens + args.completion_tokens
    tokenizer = build_char_tokenizer(model_max_length=context)
    config = tiny_config("llama", len(tokenizer), hidden_size=args.hidden_size,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         intermediate_size=args.intermediate_size,
                         max_position_embeddings=context)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def build_module(workload: str, args: argparse.Namespace, directory: Path
                 ) -> tuple[Any, dict[str, Any]]:
    """The module of ``workload`` and a description of it (settings, what the library
    offers and which of its paths run)."""
    from trustregion.batching import BatchSettings
    from trustregion.module import TrustRegionModule
    from trustregion.optim import AdamW
    from trustregion.rollout import SamplingSettings
    from trustregion.strategies import RatioClip
    from trustregion.tasks import Arithmetic, DigitSort

    sequences = args.prompts * GROUP_SIZE
    batching = BatchSettings(group_size=GROUP_SIZE, prompts_per_step=args.prompts,
                             mini_batch_size=max(1, sequences // 2))
    info: dict[str, Any] = {}
    sampling_args: dict[str, Any] = {}
    if workload == "quickstart":
        task: Any = Arithmetic()
        policy, max_new_tokens = "tiny-char-llama", 4
    else:
        task = DigitSort(min_len=LONG_DIGITS, max_len=LONG_DIGITS, partial_credit=True)
        prompt_tokens = 1 + len(f"sort:{'0' * LONG_DIGITS}=")  # <bos> + the prompt's characters
        info["parameters"] = _long_policy(directory, args, prompt_tokens)
        policy, max_new_tokens = str(directory), args.completion_tokens
        if _has_field(SamplingSettings, "ignore_eos"):
            sampling_args["ignore_eos"] = True
            info["eos"] = "ignore_eos setting"
        else:
            info["eos"] = "end-of-sequence id replaced by one never sampled"
    if _has_field(SamplingSettings, "sampler"):
        sampling_args["sampler"] = args.sampler
    info["sampler"] = sampling_args.get("sampler", "generate (only path)")
    module_args: dict[str, Any] = {}
    if _module_accepts("prefix_sharing"):
        module_args["prefix_sharing"] = args.prefix_sharing == "on"
        info["prefix_sharing"] = args.prefix_sharing
    else:
        info["prefix_sharing"] = "absent"
    module = TrustRegionModule(
        trust_region=RatioClip(epsilon=0.2), task=task, policy=policy,
        sampling=SamplingSettings(max_new_tokens=max_new_tokens, **sampling_args),
        batching=batching, aggregation="token-mean", optimizer=partial(AdamW, lr=2e-4),
        max_grad_norm=1.0, sync_every=batching.optimizer_steps_per_rollout, seed=SEED,
        **module_args)
    info.setdefault("parameters", sum(p.numel() for p in module.policy.parameters()))
    info.update(prompts=args.prompts, group_size=GROUP_SIZE, max_new_tokens=max_new_tokens,
                mini_batch_size=batching.mini_batch_size, ppo_epochs=batching.ppo_epochs)
    return module, info


PADDING_COUNTER = "update_positions"
"""The module's public counter of the update's forward positions, where the library has one:
an object with ``positions`` and ``padding`` (integers, summed over the run)."""


def _module_padding(module: Any) -> tuple[int, int] | None:
    counter = getattr(module, PADDING_COUNTER, None)
    if counter is None:
        return None
    return int(counter.positions), int(counter.padding)


class IterationTimer:
    """Wraps ``module.sample`` and ``module.update`` and marks where each RL iteration starts
    and where the run ends (through the Lightning callback :func:`timer_callback` builds).

    An iteration runs from one ``on_train_batch_start`` to the next (the last one to
    ``on_train_epoch_end``), so it holds the module's own end-of-batch work (the step log) and
    Lightning's loop between batches. Each mark also records the Linear FLOPs and the module's
    position counter so far.
    """

    def __init__(self, module: Any, flops: LinearFlops, exact_length: int | None) -> None:
        self.flops = flops
        self.exact_length = exact_length
        self.marks: list[tuple[float, int, tuple[int, int] | None]] = []
        self.run_end: tuple[float, int, tuple[int, int] | None] | None = None
        self.generation: list[tuple[float, int]] = []
        self.update: list[tuple[float, int]] = []
        self.padding: list[tuple[int, int]] = []
        self.epochs = module.batching.ppo_epochs
        self.module = module
        sample, update = module.sample, module.update

        def timed_sample(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            rollout = sample(*args, **kwargs)
            self.generation.append((time.perf_counter() - start, int(rollout.lengths.sum())))
            if exact_length is not None:
                self._check_length(rollout)
            return rollout

        def timed_update(rollout: Any, *args: Any, **kwargs: Any) -> Any:
            self.flops.active = True
            start = time.perf_counter()
            try:
                out = update(rollout, *args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self.flops.active = False
            real = int(rollout.prompt_mask.sum()) + int(rollout.completion_mask.sum())
            self.update.append((elapsed, real * self.epochs))
            positions, padding = padding_counts(rollout.prompt_mask, rollout.completion_mask)
            self.padding.append((positions * self.epochs, padding * self.epochs))
            return out

        module.sample, module.update = timed_sample, timed_update

    def _check_length(self, rollout: Any) -> None:
        mask = rollout.completion_mask
        if mask.shape[1] != self.exact_length or not bool(mask.all()):
            raise RuntimeError(
                f"every completion must be exactly {self.exact_length} tokens long; got widths "
                f"{mask.shape[1]} and lengths {sorted(set(mask.sum(-1).tolist()))}")

    def _mark(self) -> tuple[float, int, tuple[int, int] | None]:
        return time.perf_counter(), self.flops.flops, _module_padding(self.module)

    def batch_start(self) -> None:
        self.marks.append(self._mark())

    def epoch_end(self) -> None:
        self.run_end = self._mark()


def timer_callback(timer: IterationTimer) -> Any:
    """A Lightning callback that marks each iteration's start, and the run's end, on
    ``timer``."""
    import lightning as L

    class MarkIterations(L.Callback):
        def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
            timer.batch_start()

        def on_train_epoch_end(self, *args: Any, **kwargs: Any) -> None:
            timer.epoch_end()

    return MarkIterations()


def _padding(timer: IterationTimer) -> tuple[float, str]:
    assert timer.run_end is not None
    first, last = timer.marks[1][2], timer.run_end[2]
    if first is not None and last is not None:
        positions, padding = last[0] - first[0], last[1] - first[1]
        source = f"module counter {PADDING_COUNTER}"
    else:
        positions = sum(p for p, _ in timer.padding[1:])
        padding = sum(p for _, p in timer.padding[1:])
        source = "computed for the straightforward path"
    return padding / max(positions, 1), source


def run_workload(workload: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build, warm up and time ``workload`` in this process; returns its figures."""
    import lightning as L

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="trustregion-bench-") as tmp:
        module, info = build_module(workload, args, Path(tmp))
        exact = args.completion_tokens if workload == "long" else None
        patch_eos = workload == "long" and info["eos"] != "ignore_eos setting"
        flops = LinearFlops(module.policy)
        timer = IterationTimer(module, flops, exact)
        trainer = L.Trainer(
            max_steps=(args.steps + 1) * module.optimizer_steps_per_rollout,
            accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
            callbacks=[timer_callback(timer)])
        vocab = module.policy.config.vocab_size
        with _eos_never_sampled(vocab) if patch_eos else nullcontext():
            trainer.fit(module)
    flops.remove()
    ran = len(timer.marks)
    if ran != args.steps + 1 or timer.run_end is None:
        raise RuntimeError(f"{ran} RL iterations ran; expected {args.steps + 1}")
    if len(timer.generation) != ran or len(timer.update) != ran:
        raise RuntimeError(
            f"{ran} RL iterations ran, but module.sample ran {len(timer.generation)} times and "
            f"module.update {len(timer.update)} times; the benchmark times generation and "
            "update through these two methods")
    steps = args.steps
    iteration = (timer.run_end[0] - timer.marks[1][0]) / steps
    generation = sum(s for s, _ in timer.generation[1:]) / steps
    update = sum(s for s, _ in timer.update[1:]) / steps
    fwd_flops = (timer.run_end[1] - timer.marks[1][1]) / steps
    padding, padding_source = _padding(timer)
    square = matmul_throughput(1024, 1024, 1024)
    rows, inner, cols = flops.largest
    shape = matmul_throughput(rows, inner, cols)
    train_flops = 3 * fwd_flops  # forward + backward (twice the forward)
    return {
        **info,
        "workload": workload,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "steps": steps,
        "iteration_s": iteration,
        "generation_s": generation,
        "update_s": update,
        "overhead_s": iteration - generation - update,
        "generation_tokens_per_s": sum(t for _, t in timer.generation[1:]) / (generation * steps),
        "update_tokens_per_s": sum(t for _, t in timer.update[1:]) / (update * steps),
        "padding_fraction": padding,
        "padding_source": padding_source,
        "update_gflop": train_flops / 1e9,
        "update_mfu_square": train_flops / update / square,
        "update_mfu_shape": train_flops / update / shape,
        "matmul_square_gflops": square / 1e9,
        "matmul_shape_gflops": shape / 1e9,
        "matmul_shape": [rows, inner, cols],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def describe(figures: Mapping[str, Any]) -> str:
    """The figures of one workload as text."""
    f = figures
    lines = [
        f"workload {f['workload']}: {f['prompts']} prompts × {f['group_size']}, max_new_tokens "
        f"{f['max_new_tokens']}, {f['parameters'] / 1e6:.2f} M parameters, sampler "
        f"{f['sampler']}, prefix sharing {f['prefix_sharing']}"
        + (f", EOS: {f['eos']}" if "eos" in f else ""),
        f"  threads {f['threads']}, torch {f['torch']}, {f['steps']} timed RL iterations after "
        "1 warm-up",
        f"  iteration {f['iteration_s']:.3f} s = generation {f['generation_s']:.3f} s + update "
        f"{f['update_s']:.3f} s + overhead {f['overhead_s']:.3f} s",
        f"  generation {f['generation_tokens_per_s']:.0f} tokens/s; update "
        f"{f['update_tokens_per_s']:.0f} tokens/s",
        f"  update padding {100 * f['padding_fraction']:.1f} % of forward positions "
        f"({f['padding_source']})",
        f"  update MFU {f['update_mfu_square']:.3f} of a 1024² matmul "
        f"({f['matmul_square_gflops']:.1f} GFLOP/s), {f['update_mfu_shape']:.3f} of its largest "
        f"Linear {tuple(f['matmul_shape'])} ({f['matmul_shape_gflops']:.1f} GFLOP/s); "
        f"{f['update_gflop']:.3f} GFLOP per iteration",
        f"  peak resident memory {f['peak_rss_mib']:.0f} MiB",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- entry point
def _worker_argv(args: argparse.Namespace, workload: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", workload,
            f"--threads={args.threads}", f"--steps={args.steps}", f"--prompts={args.prompts}",
            f"--completion-tokens={args.completion_tokens}", f"--hidden-size={args.hidden_size}",
            f"--layers={args.layers}", f"--heads={args.heads}",
            f"--intermediate-size={args.intermediate_size}", f"--sampler={args.sampler}",
            f"--prefix-sharing={args.prefix_sharing}"]


def _spawn(args: argparse.Namespace, workload: str) -> dict[str, Any]:
    proc = subprocess.run(_worker_argv(args, workload), capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"workload {workload!r} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum or (maximum is not None and value > maximum):
            allowed = f"≥ {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            raise argparse.ArgumentTypeError(f"must be an integer {allowed}; got {value}")
        return value
    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/train_step.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=[*WORKLOADS, "both"], default="both")
    parser.add_argument("--threads", type=_at_least(1), default=1,
                        help="torch intra-op threads (default 1)")
    parser.add_argument("--steps", type=_at_least(1), default=6,
                        help="timed RL iterations after 1 warm-up (default 6)")
    parser.add_argument("--prompts", type=_at_least(1), default=16,
                        help=f"prompts per RL iteration, × {GROUP_SIZE} completions (default 16)")
    parser.add_argument("--completion-tokens", type=_at_least(32, 128), default=32,
                        help="long workload: exact completion length, 32 to 128 (default 32)")
    parser.add_argument("--hidden-size", type=_at_least(8), default=256,
                        help="long workload's model width (default 256)")
    parser.add_argument("--layers", type=_at_least(1), default=6,
                        help="long workload's model depth (default 6)")
    parser.add_argument("--heads", type=_at_least(1), default=4,
                        help="long workload's attention heads (default 4)")
    parser.add_argument("--intermediate-size", type=_at_least(1), default=768,
                        help="long workload's MLP width (default 768)")
    parser.add_argument("--sampler", choices=["lean", "generate"], default="lean",
                        help="sampler where the library offers a choice (default lean)")
    parser.add_argument("--prefix-sharing", choices=["on", "off"], default="on",
                        help="prefix-shared update where the library offers it (default on)")
    parser.add_argument("--json", type=Path, help="write the figures of every workload here")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"),
                        help="print the Markdown table of two --json files and exit")
    parser.add_argument("--worker", choices=WORKLOADS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.compare:
        old, new = (json.loads(path.read_text()) for path in args.compare)
        print(compare_table(old, new))
        return
    if args.worker:
        print(json.dumps(run_workload(args.worker, args)))
        return
    workloads = WORKLOADS if args.workload == "both" else (args.workload,)
    results = {}
    for workload in workloads:
        results[workload] = _spawn(args, workload)
        print(describe(results[workload]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
