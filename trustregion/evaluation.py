"""Held-out evaluation of the policy: mean reward and pass@k on prompts never trained on.

An evaluation scores the **policy** (the model being trained, not its behaviour copy) on
``prompts`` examples of the task's held-out split (:meth:`Task.validation_examples`: the same
list every time), with greedy decoding, sampled decoding or both:

* greedy: one completion per prompt; ``val/greedy_reward_mean`` is its mean reward and
  ``val/greedy_pass@1`` the fraction of prompts whose completion is correct;
* sampled: ``samples`` completions per prompt at ``temperature`` / ``top_p``;
  ``val/reward_mean`` is the mean reward of every completion and ``val/pass@k`` the mean over
  prompts of :func:`pass_at_k` for each ``k`` in ``pass_k``.

A completion is **correct** when its reward is at least ``correct_at`` (default 1.0: an exact
match under every built-in reward, whose rewards lie in [0, 1]).

Each process scores its share of the prompts and adds to an :class:`EvaluationTotals` of sums;
the sums are added across processes before the means are taken, so the values are those of the
whole prompt list.

With the policy sharded across processes (FSDP), every forward pass is a collective, so the
processes generate in lockstep (:func:`evaluate_share` with ``synced=True``): each keeps running
forward passes until the completions of every process have ended, and a process whose share of
a batch is empty generates for a stand-in prompt that it does not score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from trustregion.data import BatchList, IndexedBatch, in_batches
from trustregion.metric_reduction import Reduce, reduce_across_ranks
from trustregion.rollout import (
    completion_mask_from,
    decode_completions,
    encode_prompts,
    eos_token_ids,
    generate_in_eval_mode,
    seeded,
)
from trustregion.tasks import Example, Task
from trustregion.validation import boolean, integer_at_least, number_in, require

__all__ = [
    "EvaluationSettings",
    "EvaluationTotals",
    "ValidationBatch",
    "ValidationBatches",
    "batch_seed",
    "check_every_prompt_scored",
    "check_schedule",
    "evaluate",
    "evaluate_examples",
    "evaluate_share",
    "generate_completions",
    "pass_at_k",
    "rank_share",
    "validation_batches",
]


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct: the chance
    that ``k`` of the ``n`` samples, drawn without replacement, hold at least one correct one,
    1 − C(n − c, k) / C(n, k) (Chen et al. 2021, "Evaluating Large Language Models Trained on
    Code", eq. 1).

    >>> pass_at_k(4, 1, 2)  # 1 − C(3, 2) / C(4, 2) = 1 − 3/6
    0.5
    """
    n = integer_at_least("n", n, 1)
    c = integer_at_least("c", c, 0)
    k = integer_at_least("k", k, 1)
    require(c <= n, f"c must be ≤ n; got c={c}, n={n}")
    require(k <= n, f"k must be ≤ n (pass@k needs at least k samples); got k={k}, n={n}")
    if n - c < k:  # every choice of k samples holds a correct one
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass(frozen=True)
class EvaluationSettings:
    """What an evaluation scores, and how.

    Args:
        prompts: held-out prompts per evaluation (≥ 1); the same ones every time.
        greedy: score one greedy completion per prompt (``val/greedy_*``).
        samples: sampled completions per prompt (0: no sampled decoding; ``val/reward_mean``,
            ``val/pass@k``).
        temperature: sampling temperature (> 0); only with ``samples`` ≥ 1.
        top_p: nucleus mass in (0, 1], 1 turns it off; only with ``samples`` ≥ 1.
        pass_k: the k of each ``val/pass@k``, each in [1, ``samples``]; None: 1 and
            ``samples``. Only with ``samples`` ≥ 1.
        correct_at: a completion whose reward is ≥ this is correct (for pass@k).
        batch_size: prompts generated together (≥ 1): ``batch_size`` greedy sequences, then
            ``batch_size × samples`` sampled ones.
        max_new_tokens: completion length limit; None uses the module's
            ``sampling.max_new_tokens``.
    """

    prompts: int = 64
    greedy: bool = True
    samples: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    pass_k: tuple[int, ...] | None = None
    correct_at: float = 1.0
    batch_size: int = 64
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        integer_at_least("prompts", self.prompts, 1, note="held-out prompts per evaluation")
        boolean("greedy", self.greedy)
        integer_at_least("samples", self.samples, 0, note="0 turns sampled decoding off")
        require(self.greedy or self.samples > 0,
                "an evaluation needs greedy: true or samples ≥ 1; got greedy: false, samples: 0")
        number_in("temperature", self.temperature, 0.0)
        number_in("top_p", self.top_p, 0.0, 1.0, note="1 turns it off")
        if self.samples == 0:
            given = [f"{name}={getattr(self, name)!r}" for name, default in
                     (("temperature", 1.0), ("top_p", 1.0), ("pass_k", None))
                     if getattr(self, name) != default]
            require(not given, f"{', '.join(given)} only apply to sampled decoding; set "
                               "samples ≥ 1 or leave them out")
        if self.pass_k is not None:
            require(isinstance(self.pass_k, Sequence) and not isinstance(self.pass_k, str)
                    and len(self.pass_k) > 0,
                    f"pass_k must be a non-empty list of integers; got {self.pass_k!r}")
            ks = tuple(integer_at_least("pass_k", k, 1) for k in self.pass_k)
            too_big = [k for k in ks if k > self.samples]
            require(not too_big, f"every pass_k must be ≤ samples={self.samples} (pass@k needs "
                                 f"k samples); got {list(too_big)}")
            require(len(set(ks)) == len(ks), f"pass_k must not repeat; got {list(ks)}")
            object.__setattr__(self, "pass_k", ks)
        number_in("correct_at", self.correct_at, -math.inf)
        integer_at_least("batch_size", self.batch_size, 1, note="prompts generated together")
        if self.max_new_tokens is not None:
            integer_at_least("max_new_tokens", self.max_new_tokens, 1)

    @property
    def ks(self) -> tuple[int, ...]:
        """The k of each ``val/pass@k`` logged (none without sampled decoding)."""
        if self.samples == 0:
            return ()
        if self.pass_k is not None:
            return tuple(sorted(self.pass_k))
        return tuple(sorted({1, self.samples}))

    @property
    def keys(self) -> list[str]:
        """The metric keys an evaluation logs."""
        greedy = ["val/greedy_reward_mean", "val/greedy_pass@1"] if self.greedy else []
        sampled = (["val/reward_mean", *(f"val/pass@{k}" for k in self.ks)]
                   if self.samples else [])
        return [*greedy, *sampled]

    def config(self) -> dict[str, Any]:
        """The settings as plain config values (``pass_k`` as a list)."""
        values = asdict(self)
        if self.pass_k is not None:
            values["pass_k"] = list(self.pass_k)
        return values


@dataclass
class EvaluationTotals:
    """Sums of one process's share of an evaluation; :meth:`metrics` adds them across
    processes and takes the means."""

    settings: EvaluationSettings
    sums: dict[str, float] = field(default_factory=dict)

    def add_greedy(self, rewards: Sequence[float]) -> None:
        """Rewards of one greedy completion per prompt."""
        self._add("greedy_prompts", len(rewards))
        self._add("greedy_reward", sum(rewards))
        self._add("greedy_correct", sum(r >= self.settings.correct_at for r in rewards))

    def add_sampled(self, rewards: Sequence[Sequence[float]]) -> None:
        """Rewards of the ``samples`` completions of each prompt, one row per prompt."""
        n = self.settings.samples
        for row in rewards:
            require(len(row) == n, f"expected {n} rewards per prompt; got {len(row)}")
            correct = sum(r >= self.settings.correct_at for r in row)
            self._add("prompts", 1)
            self._add("reward", sum(row))
            for k in self.settings.ks:
                self._add(f"pass@{k}", pass_at_k(n, correct, k))

    def metrics(self, reduce: Reduce | None = None,
                device: torch.device | None = None) -> dict[str, Tensor]:
        """The ``val/*`` values over every process (with ``reduce``; call it on every process).
        """
        names = []
        if self.settings.greedy:
            names += ["greedy_prompts", "greedy_reward", "greedy_correct"]
        if self.settings.samples:
            names += ["prompts", "reward", *(f"pass@{k}" for k in self.settings.ks)]
        local = {name: torch.tensor(self.sums.get(name, 0.0), dtype=torch.float64,
                                    device=device) for name in names}
        sums, _, _ = reduce_across_ranks(reduce, local)
        out: dict[str, Tensor] = {}
        if self.settings.greedy:
            prompts = sums["greedy_prompts"].clamp(min=1)
            out["val/greedy_reward_mean"] = sums["greedy_reward"] / prompts
            out["val/greedy_pass@1"] = sums["greedy_correct"] / prompts
        if self.settings.samples:
            prompts = sums["prompts"].clamp(min=1)
            out["val/reward_mean"] = sums["reward"] / (prompts * self.settings.samples)
            for k in self.settings.ks:
                out[f"val/pass@{k}"] = sums[f"pass@{k}"] / prompts
        return {key: value.float() for key, value in out.items()}

    def _add(self, name: str, value: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(value)


class ValidationBatch(IndexedBatch[Example]):
    """The ``index``-th batch of an evaluation's prompts (every process's share)."""

    @property
    def examples(self) -> list[Example]:
        return self.items


class ValidationBatches(BatchList[ValidationBatch]):
    """An evaluation's prompts in batches: one data loader for Lightning."""


def validation_batches(examples: Sequence[Example], batch_size: int) -> ValidationBatches:
    """``examples`` in batches of ``batch_size`` (the last may be smaller)."""
    return ValidationBatches([ValidationBatch(i, batch)
                              for i, batch in enumerate(in_batches(examples, batch_size))])


def rank_share(examples: Sequence[Example], rank: int, world_size: int) -> list[Example]:
    """Process ``rank``'s share of a batch: every ``world_size``-th example from ``rank`` (the
    shares differ by at most one example)."""
    return list(examples[rank::world_size])


@torch.no_grad()
def generate_completions(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                         prompts: Sequence[str], *, samples: int = 1, greedy: bool = False,
                         temperature: float = 1.0, top_p: float = 1.0,
                         max_new_tokens: int = 16, chat_template: bool = False,
                         synced: bool = False) -> list[str]:
    """``samples`` completions of each prompt (greedy: one), prompt by prompt, decoded up to
    the first end-of-sequence token. The model is in eval mode while it generates.

    ``synced``: every process calls this together with a model sharded across them (FSDP),
    whose forward passes are collectives. Each process then keeps running forward passes until
    the completions of every process have ended (Hugging Face's ``synced_gpus``), so each needs
    at least one prompt; and the model runs outside ``torch.inference_mode``, whose tensors
    FSDP would keep as gathered weights that training could not update afterwards.
    """
    repeats = 1 if greedy else samples
    texts = [prompt for prompt in prompts for _ in range(repeats)]
    require(bool(texts) or not synced,
            "a synced generation needs at least one prompt on every process (the others wait "
            "for its forward passes); give a process with no prompt a stand-in one")
    if not texts:
        return []
    device = next(model.parameters()).device
    eos_ids = eos_token_ids(model, tokenizer)
    sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}
    config = GenerationConfig(do_sample=not greedy, max_new_tokens=max_new_tokens,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids,
                              **sampling)
    with torch.inference_mode(False) if synced else nullcontext(), torch.no_grad():
        ids, mask = encode_prompts(tokenizer, texts, chat_template=chat_template)
        ids, mask = ids.to(device), mask.to(device)
        sequences = generate_in_eval_mode(model, ids, mask, config,
                                          synced_gpus=True if synced else None)
    completions = sequences[:, ids.shape[1]:]
    kept = completion_mask_from(completions, eos_ids)
    return decode_completions(tokenizer, completions, kept)


def evaluate_examples(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task,
                      examples: Sequence[Example], settings: EvaluationSettings,
                      totals: EvaluationTotals, *, max_new_tokens: int, seed: int,
                      chat_template: bool = False, synced: bool = False) -> None:
    """Generate and score the completions of ``examples`` and add them to ``totals``; sampled
    decoding draws from a generator seeded with ``seed``. ``synced``: as in
    :func:`generate_completions` (``examples`` must not be empty)."""
    if not examples and not synced:
        return
    prompts = [ex.prompt for ex in examples]
    if settings.greedy:
        texts = generate_completions(model, tokenizer, prompts, greedy=True,
                                     max_new_tokens=max_new_tokens, chat_template=chat_template,
                                     synced=synced)
        totals.add_greedy(task.reward(texts, examples).tolist())
    if settings.samples:
        with seeded(seed, next(model.parameters()).device):
            texts = generate_completions(model, tokenizer, prompts, samples=settings.samples,
                                         temperature=settings.temperature,
                                         top_p=settings.top_p, max_new_tokens=max_new_tokens,
                                         chat_template=chat_template, synced=synced)
        repeated = [ex for ex in examples for _ in range(settings.samples)]
        rewards = task.reward(texts, repeated).tolist()
        n = settings.samples
        totals.add_sampled([rewards[i:i + n] for i in range(0, len(rewards), n)])


def evaluate_share(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task,
                   batch: ValidationBatch, settings: EvaluationSettings,
                   totals: EvaluationTotals, *, max_new_tokens: int, seed: int = 0,
                   rank: int = 0, world_size: int = 1, synced: bool = False,
                   chat_template: bool = False) -> None:
    """Score process ``rank``'s share of ``batch`` (:func:`rank_share`) into ``totals``; sampled
    decoding is seeded by :func:`batch_seed` of ``seed``, the batch's index and ``rank``.

    ``synced``: every process calls this for the same batch with a model sharded across them
    (FSDP); they generate in lockstep (see :func:`generate_completions`), and a process whose
    share is empty generates for the batch's first prompt as a stand-in, counted nowhere.
    """
    world_size = integer_at_least("world_size", world_size, 1)
    rank = integer_at_least("rank", rank, 0)
    require(rank < world_size, f"rank must be < world_size={world_size}; got {rank}")
    share = rank_share(batch.examples, rank, world_size)
    if synced and not share:
        share, totals = batch.examples[:1], EvaluationTotals(settings)  # discarded
    evaluate_examples(model, tokenizer, task, share, settings, totals,
                      max_new_tokens=max_new_tokens, seed=batch_seed(seed, batch.index, rank),
                      chat_template=chat_template, synced=synced)


def batch_seed(seed: int, batch_index: int, rank: int = 0) -> int:
    """The sampling seed of validation batch ``batch_index`` on process ``rank``: the same at
    every evaluation of a run, so evaluations differ only by the policy."""
    return (seed * 1_000_003 + batch_index * 7_919 + rank * 104_729 + 54_321) % (2**31 - 1)


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task,
             settings: EvaluationSettings, *, max_new_tokens: int, seed: int = 0,
             chat_template: bool = False) -> dict[str, float]:
    """One evaluation on one process, batch by batch as ``TrustRegionModule`` validates:
    ``{key: value}`` for every key of :attr:`EvaluationSettings.keys`."""
    totals = EvaluationTotals(settings)
    examples = task.validation_examples(settings.prompts)
    for batch in validation_batches(examples, settings.batch_size):
        evaluate_share(model, tokenizer, task, batch, settings, totals,
                       max_new_tokens=max_new_tokens, seed=seed, chat_template=chat_template)
    return {key: float(value) for key, value in totals.metrics().items()}


def check_schedule(settings: EvaluationSettings | None, *, val_check_interval: object,
                   check_val_every_n_epoch: object, limit_val_batches: object) -> None:
    """Refuse trainer settings under which ``trustregion fit`` would not evaluate as configured.

    The prompt stream is endless, so an epoch never ends: evaluation runs every
    ``val_check_interval`` rollout batches, which must be an integer, counted over the whole run
    (``check_val_every_n_epoch: null``); and every held-out prompt is scored
    (``limit_val_batches`` 1.0). A ``val_check_interval`` integer without evaluation settings is
    refused too.
    """
    interval_given = isinstance(val_check_interval, int) and not isinstance(
        val_check_interval, bool)
    if settings is None:
        require(not interval_given,
                f"trainer.val_check_interval={val_check_interval} asks for evaluation, but "
                "model.evaluation is null; set model.evaluation (for example {prompts: 64}) or "
                "remove val_check_interval")
        return
    require(interval_given and int(val_check_interval) >= 1,  # type: ignore[call-overload]
            f"model.evaluation runs every trainer.val_check_interval rollout batches: set "
            f"val_check_interval to an integer ≥ 1; got {val_check_interval!r} (the prompt "
            "stream is endless, so a fraction of an epoch never comes)")
    require(check_val_every_n_epoch is None,
            f"model.evaluation needs trainer.check_val_every_n_epoch: null, so that "
            f"val_check_interval counts rollout batches over the whole run; got "
            f"{check_val_every_n_epoch!r}")
    check_every_prompt_scored(limit_val_batches)


def check_every_prompt_scored(limit_val_batches: object) -> None:
    """Refuse a ``trainer.limit_val_batches`` other than 1.0 (all batches): an evaluation scores
    all of its ``evaluation.prompts``. (The integer 1 means one batch to Lightning.)"""
    require(type(limit_val_batches) is float and limit_val_batches == 1.0,
            f"model.evaluation scores every one of its evaluation.prompts; leave "
            f"trainer.limit_val_batches at 1.0 (the integer 1 would mean one batch) and set "
            f"evaluation.prompts instead; got {limit_val_batches!r}")
