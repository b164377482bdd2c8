"""Architecture conformance: does the product handle this model correctly?

Architectures differ in how they encode positions (rotary or learned absolute), tie embeddings,
slide an attention window, route tokens to experts and wrap prompts in chat templates. Each is a
place where the log-probs the behaviour model records while it generates can silently disagree
with the log-probs the policy recomputes for the update. That error looks exactly like policy
drift and corrupts every trust region, so :func:`check_model` measures it, through the same code
the trainer runs (:class:`~trustregion.module.TrustRegionModule`, a Lightning ``Trainer`` on the
CPU, fp32, ``sync_every=1``)::

    from trustregion.testing import check_model
    report = check_model("config:path/to/dir")   # raises AssertionError naming the failed check
    report.max_abs_diff["behavior_logprobs"]    # worst per-token |Δ log p|

The checks, in the order they run (:data:`MODEL_CHECKS`):

* ``eos_and_padding`` — each completion counts its tokens up to and including the first EOS and
  none after it (the mask, the lengths, the behaviour log-probs and the decoded text agree).
* ``behavior_logprobs`` — the behaviour log-prob recorded for every sampled token equals the
  policy's recomputed log-prob to ``tolerance``. The rollout must hold left-padded prompts of
  different lengths and completions that stop at EOS at different lengths; the check refuses a
  rollout without them, since it would prove nothing about padding.
* ``padding_invariance`` — every row's log-probs equal the same row recomputed alone, with no
  left padding (this is where ignored position ids show up).
* ``update_step`` — one optimiser step over micro-batches of rows selected from the shuffled
  rollout: the log-probs the update itself computes (the trainer's forward at the sampling
  temperature, with its precision and routing settings) equal the behaviour log-probs to
  ``tolerance``, since at ``sync_every=1`` the first update is on-policy; every trainable
  parameter gets a finite, non-zero gradient; the weights change; exactly the completion
  tokens count.
* ``checkpoint_round_trip`` — a checkpoint written and loaded back gives bitwise the same
  log-probs on the same rollout.
"""

from __future__ import annotations

import contextlib
import logging
import random
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import torch
from torch import Tensor
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from trustregion.batching import BatchSettings
from trustregion.data import PromptBatch
from trustregion.functional.logprobs import token_logprobs
from trustregion.interface import StepOutput
from trustregion.models.char_tokenizer import char_vocab
from trustregion.module import TrustRegionModule
from trustregion.rollout import (
    Rollout,
    RolloutStats,
    SamplingSettings,
    completion_logits,
    encode_prompts,
    eos_token_ids,
    seeded,
)
from trustregion.strategies import TokenBatch, TrustRegionStrategy
from trustregion.tasks import Arithmetic, DigitSort, Example, Reverse, Task
from trustregion.validation import boolean, integer_at_least, non_empty_string, number_in, require

__all__ = ["MODEL_CHECKS", "ModelCheckReport", "check_model"]

MODEL_CHECKS: tuple[str, ...] = ("eos_and_padding", "behavior_logprobs", "padding_invariance",
                                 "update_step", "checkpoint_round_trip")
"""The checks :func:`check_model` runs, in order."""

DEFAULT_TASKS: tuple[Task, ...] = (Arithmetic(), DigitSort(), Reverse())
"""For the character tokenizer, the default rollout has one prompt of each of these tasks."""

ENGLISH_PROMPTS: tuple[str, ...] = (
    "Hi.",
    "Name a colour.",
    "List three fruits, separated by commas, and say which of them you like best and why.",
)
"""Default prompts of clearly different lengths, for tokenizers other than the character one
(as many as :data:`DEFAULT_TASKS`)."""

CPU = torch.device("cpu")


@dataclass
class ModelCheckReport:
    """What :func:`check_model` measured on a model that passed every check.

    Attributes:
        source: the model source checked.
        architecture: the model's ``config.model_type``.
        passed: the checks that passed, in order.
        max_abs_diff: per comparing check (``behavior_logprobs``, ``padding_invariance``,
            ``update_step``, ``checkpoint_round_trip``), the largest per-token |Δ log p| seen
            (0.0 for ``checkpoint_round_trip``, which demands bitwise equality).
        prompt_lengths: tokens of each rollout row's prompt, before left padding.
        completion_lengths: counted tokens of each rollout row's completion.
        seconds: wall-clock time of the whole check.
    """

    source: str
    architecture: str
    passed: list[str] = field(default_factory=list)
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    prompt_lengths: list[int] = field(default_factory=list)
    completion_lengths: list[int] = field(default_factory=list)
    seconds: float = 0.0


def check_model(
    source: str,
    *,
    prompts: Sequence[str] | None = None,
    group_size: int = 4,
    max_new_tokens: int = 12,
    chat_template: bool = False,
    pad_token: str | None = None,
    tolerance: float = 1e-5,
    seed: int = 0,
    trust_region: TrustRegionStrategy | None = None,
) -> ModelCheckReport:
    """Run :data:`MODEL_CHECKS` on the causal LM from ``source`` (see the module docstring).

    Args:
        source: a model source, as :func:`trustregion.models.loading.load_model` takes it (a
            shipped name, ``config:PATH`` or a ``save_pretrained`` directory).
        prompts: the rollout's prompts, of different token lengths; default: prompts of the
            built-in tasks for the character tokenizer, otherwise a few plain-English prompts.
        group_size: completions sampled per prompt (≥ 2).
        max_new_tokens: completion length limit; some completions must stop at EOS before it.
        chat_template: wrap prompts in the tokenizer's chat template, as training would.
        pad_token: the pad token to set when the tokenizer has none.
        tolerance: largest allowed per-token |Δ log p|, in (0, 1]; the checks run in fp32.
        seed: seeds the model's random initialisation (``config:`` sources), the default
            prompts and the sampling.
        trust_region: the strategy of the update step; default ``DRPO()``.

    Returns:
        a :class:`ModelCheckReport` when every check passes.

    Raises:
        ValueError: ``source`` is not a causal LM, the training module refuses it (for example
            its tokenizer has no pad token and no ``pad_token`` was given), or an argument is
            out of range.
        AssertionError: a check failed; the message names the check, the architecture and the
            worst token.
    """
    started = time.perf_counter()
    non_empty_string("source", source)
    integer_at_least("group_size", group_size, 2)
    integer_at_least("max_new_tokens", max_new_tokens, 2, note="completions must be able to "
                     "stop at EOS before the limit")
    boolean("chat_template", chat_template)
    number_in("tolerance", tolerance, 0.0, 1.0, note="largest per-token |Δ log p|")
    integer_at_least("seed", seed, 0)
    if pad_token is not None:
        non_empty_string("pad_token", pad_token)
    if prompts is not None:
        require(not isinstance(prompts, str) and len(prompts) >= 2
                and all(isinstance(p, str) and p for p in prompts),
                f"prompts must be a list of at least 2 non-empty strings of different lengths; "
                f"got {prompts!r}")
    _check_causal_lm_config(source)
    prompt_count = len(prompts) if prompts is not None else len(DEFAULT_TASKS)
    rows = group_size * prompt_count
    settings: dict[str, Any] = dict(
        trust_region=trust_region, policy=source,
        sampling=SamplingSettings(max_new_tokens=max_new_tokens),
        # one optimiser step over the whole rollout, in micro-batches of group_size rows that
        # the update selects from the shuffled rollout
        batching=BatchSettings(group_size=group_size, prompts_per_step=prompt_count,
                               mini_batch_size=rows, micro_batch_size=group_size),
        sync_every=1, chat_template=chat_template, pad_token=pad_token, seed=seed)
    module = _build(source, seed, settings)
    architecture = str(module.policy.config.model_type)
    _check_attends_only_backwards(module.policy, source, architecture)
    examples = _examples(prompts, module.tokenizer, seed)
    _check_context(module.tokenizer, [ex.prompt for ex in examples], max_new_tokens,
                   context=getattr(module.policy.config, "max_position_embeddings", None),
                   chat_template=chat_template)
    with seeded(seed, CPU):
        rollout = module.sample(examples)

    report = ModelCheckReport(source=source, architecture=architecture)
    check = _Checker(module, rollout, architecture, source, tolerance, report)
    check.eos_and_padding()
    check.rollout_preconditions(max_new_tokens)
    recomputed = check.behavior_logprobs()
    check.padding_invariance(recomputed)
    with tempfile.TemporaryDirectory(prefix="trustregion-check-model-") as directory, \
            _quiet_lightning():
        trainer = check.update_step(Path(directory))
        check.checkpoint_round_trip(trainer, Path(directory), settings, seed)
    report.seconds = time.perf_counter() - started
    return report


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's start-up messages (devices, restored checkpoint) are noise in a check:
    only its warnings and errors are shown inside."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# ----------------------------------------------------------------------------- bad input
def _config_directory(source: str) -> Path | None:
    """The directory whose ``config.json`` defines ``source``; None for a shipped name."""
    if source.startswith("config:"):
        path = Path(source.removeprefix("config:")).expanduser()
        return path if path.is_dir() else path.parent
    path = Path(source).expanduser()
    return path if (path / "config.json").is_file() else None


def _check_causal_lm_config(source: str) -> None:
    """Refuse, before anything loads, a source whose config names a model that is not a
    decoder-only causal LM."""
    directory = _config_directory(source)
    if directory is not None and (directory / "config.json").is_file():
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        require(not getattr(config, "is_encoder_decoder", False)
                and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                f"model source {source!r} is a {config.model_type!r} model, not a causal "
                "language model (a decoder that predicts the next token from the ones before "
                "it): check_model and training need one, for example a llama, qwen3, mistral, "
                "gpt2 or phi model; encoders (BERT) and encoder-decoders (T5) cannot be "
                "trained here")


def _build(source: str, seed: int, settings: dict[str, Any]) -> _CheckedModule:
    """The module the checks run on, seeded so that a ``config:`` source's random weights
    follow ``seed``; what the module refuses (a tokenizer without a pad token, a missing chat
    template) is refused here too, naming check_model."""
    try:
        with seeded(seed, CPU):
            return _CheckedModule(**settings)
    except ValueError as err:
        raise ValueError(f"check_model could not build the training module for {source!r}: "
                         f"{err}") from err


def _check_attends_only_backwards(model: PreTrainedModel, source: str, architecture: str
                                  ) -> None:
    """Refuse a model whose logits at a position change when a later token changes (an
    encoder, such as BERT without ``is_decoder``, built as a language-model head)."""
    vocab = int(model.config.vocab_size)
    with seeded(0, CPU):
        ids = torch.randint(0, vocab, (1, 8))
    changed = ids.clone()
    changed[0, 4:] = (ids[0, 4:] + 1) % vocab
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            first = model(input_ids=ids).logits[0, :4]
            second = model(input_ids=changed).logits[0, :4]
    finally:
        model.train(was_training)
    require(torch.allclose(first, second, atol=1e-5),
            f"model source {source!r} ({architecture}) is not a causal language model: its "
            "prediction at a position depends on the tokens after it (bidirectional "
            "attention). check_model and training need a decoder-only model; for a BERT-style "
            "config that can act as a decoder, set is_decoder: true in its config.json")


def _examples(prompts: Sequence[str] | None, tokenizer: PreTrainedTokenizerBase, seed: int
              ) -> list[Example]:
    if prompts is not None:
        return [Example(prompt=p, answer="") for p in prompts]
    if tokenizer.get_vocab() == char_vocab():
        rng = random.Random(seed)
        return [task.sample(rng) for task in DEFAULT_TASKS]
    return [Example(prompt=p, answer="") for p in ENGLISH_PROMPTS]


def _check_context(tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int,
                   *, context: int | None, chat_template: bool) -> None:
    _, mask = encode_prompts(tokenizer, prompts, chat_template=chat_template)
    longest = int(mask.sum(-1).max())
    require(context is None or longest + max_new_tokens <= context,
            f"the longest prompt takes {longest} tokens; with max_new_tokens={max_new_tokens} "
            f"it exceeds the model's context of {context} tokens: pass shorter prompts or a "
            "smaller max_new_tokens")


# ----------------------------------------------------------------------------- the module
class _CheckedModule(TrustRegionModule):
    """The product's module, updating on one prepared rollout with fixed advantages (+1 and
    −1 alternating by row), so that the gradient cannot vanish by chance of the rewards."""

    prepared: Rollout | None = None

    def rollout(self, batch: PromptBatch) -> tuple[Rollout, RolloutStats]:
        assert self.prepared is not None
        rollout, stats = self.score(self.prepared)
        signs = torch.tensor([1.0, -1.0], device=self.device).repeat(len(rollout))
        rollout.advantages = signs[:len(rollout)]
        return rollout, stats


class _UpdateProbe(L.Callback):
    """Records, after the backward pass, each trainable policy parameter's gradient problem
    (none, zero, non-finite), and the per-token batches of the update's micro-batches."""

    def __init__(self) -> None:
        self.problems: dict[str, str] = {}
        self.batches: list[TokenBatch] = []

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(pl_module, TrustRegionModule)
        self.problems = {}
        # named_parameters lists a tied (shared) parameter once
        for name, param in pl_module.policy.named_parameters():
            if not param.requires_grad:
                continue
            if param.grad is None:
                self.problems[name] = "no gradient"
            elif not bool(param.grad.isfinite().all()):
                self.problems[name] = "non-finite gradient"
            elif not bool(param.grad.any()):
                self.problems[name] = "zero gradient"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = StepOutput.of(outputs)
        assert step is not None
        self.batches = [update.batch for update in step.updates]


# ----------------------------------------------------------------------------- the checks
class _Checker:
    """The checks on one module and one rollout; each records itself in ``report``."""

    def __init__(self, module: _CheckedModule, rollout: Rollout, architecture: str,
                 source: str, tolerance: float, report: ModelCheckReport) -> None:
        self.module = module
        self.rollout = rollout
        self.architecture = architecture
        self.source = source
        self.tolerance = tolerance
        self.report = report
        self.eos_ids = eos_token_ids(module.policy, module.tokenizer)
        report.prompt_lengths = rollout.prompt_mask.sum(-1).tolist()
        report.completion_lengths = rollout.lengths.tolist()

    def fail(self, check: str, message: str) -> NoReturn:
        raise AssertionError(f"check_model: {check} failed for {self.architecture} "
                             f"({self.source}): {message}")

    def passed(self, check: str, diff: float | None = None) -> None:
        self.report.passed.append(check)
        if diff is not None:
            self.report.max_abs_diff[check] = diff

    def logp(self, model: PreTrainedModel, rollout: Rollout) -> Tensor:
        """The log-probs the update computes: ``model`` in its own mode, at the sampling
        temperature."""
        with torch.no_grad():
            logits = completion_logits(model, rollout) / self.module.sampling.temperature
            return token_logprobs(logits, rollout.completion_ids)

    def compare(self, check: str, what: str, expected: Tensor, actual: Tensor,
                names: tuple[str, str], tolerance: float) -> float:
        """Largest |expected − actual| over counted tokens; fails naming the worst token when
        it exceeds ``tolerance`` (a NaN counts as infinitely far)."""
        mask = self.rollout.completion_mask
        diff = (expected - actual).abs().nan_to_num(nan=float("inf")).masked_fill(~mask, 0.0)
        worst = float(diff.max()) if diff.numel() else 0.0
        if worst > tolerance:
            row, position = divmod(int(diff.argmax()), diff.shape[1])
            token = self.module.tokenizer.convert_ids_to_tokens(
                int(self.rollout.completion_ids[row, position]))
            self.fail(check, f"{what} differ by up to {worst:.3g} > tolerance {tolerance:g}; worst "
                             f"token: row {row}, position {position} ({token!r}), "
                             f"{names[0]} {float(expected[row, position]):.8f}, "
                             f"{names[1]} {float(actual[row, position]):.8f}")
        return worst

    def rollout_preconditions(self, max_new_tokens: int) -> None:
        """The rollout must exercise left padding and EOS, or the checks prove nothing."""
        prompt_lengths = set(self.report.prompt_lengths)
        lengths = self.rollout.lengths
        width = self.rollout.completion_ids.shape[1]
        stopped = int((lengths < width).sum())
        if len(prompt_lengths) < 2:
            self.fail("behavior_logprobs", f"every prompt takes {prompt_lengths.pop()} tokens, "
                      "so no row is left-padded; pass prompts of clearly different lengths")
        if stopped == 0 or len(set(lengths.tolist())) < 2:
            self.fail("behavior_logprobs",
                      f"no completion stopped at EOS before the others (lengths "
                      f"{lengths.tolist()}, max_new_tokens={max_new_tokens}), so the rollout "
                      "holds no padding after EOS; raise max_new_tokens or group_size, pass "
                      "prompts the model answers briefly, or try another seed")

    def eos_and_padding(self) -> None:
        check, r = "eos_and_padding", self.rollout
        ids, mask = r.completion_ids, r.completion_mask
        is_eos = torch.zeros_like(ids, dtype=torch.bool)
        for eos in self.eos_ids:
            is_eos |= ids == eos
        width = ids.shape[1]
        first_eos = torch.where(is_eos.any(-1), is_eos.float().argmax(-1), width)
        expected = torch.arange(width) <= first_eos[:, None]
        wrong = (mask != expected).nonzero()
        if len(wrong):
            row, position = wrong[0].tolist()
            self.fail(check, f"row {row}, position {position}: the completion mask is "
                      f"{bool(mask[row, position])}, but the first EOS is at position "
                      f"{int(first_eos[row])}; exactly the tokens up to and including the first "
                      "EOS must count")
        lengths = torch.clamp(first_eos + 1, max=width)
        if r.lengths.tolist() != lengths.tolist():
            self.fail(check, f"the completion lengths {r.lengths.tolist()} are not the tokens "
                      f"up to the first EOS {lengths.tolist()}")
        if bool(r.behavior_logp.masked_fill(mask, 0.0).any()):
            self.fail(check, "a behaviour log-prob after EOS is not zero, so it would count")
        for row, text in enumerate(r.completions):
            kept = ids[row, :int(lengths[row])].tolist()
            decoded = self.module.tokenizer.decode(kept, skip_special_tokens=True)
            if text != decoded:
                self.fail(check, f"row {row}: the decoded completion {text!r} is not the text "
                          f"up to its first EOS {decoded!r}")
        self.passed(check)

    def behavior_logprobs(self) -> Tensor:
        check = "behavior_logprobs"
        recomputed = self.logp(self.module.policy, self.rollout)
        worst = self.compare(check, "the behaviour log-probs recorded by the rollout and the "
                             "policy's recomputed log-probs", self.rollout.behavior_logp,
                             recomputed,
                             ("behaviour", "policy"), self.tolerance)
        self.passed(check, worst)
        return recomputed

    def padding_invariance(self, recomputed: Tensor) -> None:
        check, r = "padding_invariance", self.rollout
        alone = torch.zeros_like(recomputed)
        for row in range(len(r)):
            kept = r.prompt_mask[row]
            single = replace(r.select(torch.tensor([row])),
                             prompt_ids=r.prompt_ids[row, kept][None],
                             prompt_mask=r.prompt_mask[row, kept][None])
            alone[row] = self.logp(self.module.policy, single)[0]
        worst = self.compare(check, "the log-probs of the left-padded batch and those of each "
                             "row alone, without padding,", recomputed, alone,
                             ("batched", "alone"), self.tolerance)
        self.passed(check, worst)

    def update_step(self, directory: Path) -> L.Trainer:
        check, module = "update_step", self.module
        module.prepared = self.rollout
        before = {name: p.detach().clone() for name, p in module.policy.named_parameters()}
        probe = _UpdateProbe()
        trainer = _trainer(directory, [probe])
        trainer.fit(module)
        if probe.problems:
            listed = ", ".join(f"{n} ({why})" for n, why in sorted(probe.problems.items()))
            self.fail(check, f"{len(probe.problems)} trainable parameter(s) got no usable "
                      f"gradient: {listed}")
        changed = [name for name, p in module.policy.named_parameters()
                   if not torch.equal(p.detach(), before[name])]
        if not changed:
            self.fail(check, "the optimiser step left every weight unchanged")
        counted = sum(int(batch.mask.sum()) for batch in probe.batches)
        expected = int(self.rollout.lengths.sum())
        if counted != expected:
            self.fail(check, f"the update counted {counted} tokens, but the rollout's "
                      f"completions hold {expected} up to their EOS")
        self.passed(check, self.on_policy_update(check, probe.batches))
        return trainer

    def on_policy_update(self, check: str, batches: list[TokenBatch]) -> float:
        """Largest |Δ log p| between the log-probs the update computed, micro-batch by
        micro-batch, and the behaviour's: every micro-batch comes before the one optimiser
        step, so the policy is still the behaviour (``sync_every=1``)."""
        if len(batches) < 2:
            self.fail(check, f"the update ran {len(batches)} micro-batch(es); at least 2 "
                      "are needed to exercise the selection of rows")
        worst = 0.0
        for index, batch in enumerate(batches):
            diff = (batch.logp - batch.behavior_logp).abs().nan_to_num(nan=float("inf"))
            diff = diff.masked_fill(~batch.bool_mask(), 0.0)
            biggest = float(diff.max()) if diff.numel() else 0.0
            if biggest > self.tolerance:
                row, position = divmod(int(diff.argmax()), diff.shape[1])
                self.fail(check, f"the log-probs the update computed and the behaviour "
                          f"log-probs differ by up to {biggest:.3g} > tolerance "
                          f"{self.tolerance:g} on the first (on-policy) update; worst token: "
                          f"micro-batch {index}, row {row}, position {position}, behaviour "
                          f"{float(batch.behavior_logp[row, position]):.8f}, update "
                          f"{float(batch.logp[row, position]):.8f}")
            worst = max(worst, biggest)
        return worst

    def checkpoint_round_trip(self, trainer: L.Trainer, directory: Path,
                              settings: dict[str, Any], seed: int) -> None:
        """Save the updated module, then resume a module built afresh (differently
        initialised) from the checkpoint, as ``trustregion fit --ckpt_path`` does."""
        check, path = "checkpoint_round_trip", directory / "check.ckpt"
        trainer.save_checkpoint(path)
        with seeded(seed + 1, CPU):
            restored = _CheckedModule(**settings)
        resumed = _trainer(directory)
        resumed.fit(restored, ckpt_path=path)
        saved = self.logp(self.module.policy, self.rollout)
        loaded = self.logp(restored.policy, self.rollout)
        self.compare(check, "the log-probs before saving the checkpoint and after resuming "
                     "from it", saved, loaded, ("saved", "loaded"), 0.0)
        self.passed(check, 0.0)


def _trainer(directory: Path, callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    """A Trainer of one optimiser step on the CPU in fp32, writing nothing but what it is told
    to."""
    return L.Trainer(max_steps=1, accelerator="cpu", devices=1, precision="32-true",
                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=directory, callbacks=list(callbacks))
