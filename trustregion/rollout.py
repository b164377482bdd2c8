"""Rollouts: sample G completions per prompt from the behaviour model and record what it saw.

Two samplers give the same rollouts (``SamplingSettings.sampler``):

* ``lean`` (the default, :mod:`trustregion.sampler`): each distinct prompt is prefilled once and
  its key/value cache repeated to the G completions of its group; the behaviour log-probs (and
  top-K slots) are recorded step by step, so memory does not grow with completion length ×
  vocabulary. A model it cannot drive is sampled with ``generate``, and the log says so once.
* ``generate``: Hugging Face ``generate`` over the prompts repeated G times, asking for every
  step's processed scores (``output_scores``, an ``[N, T, V]`` tensor) and reading the log-probs
  from them.

The behaviour log-prob of each sampled token is taken from the distribution the token was
**actually sampled from**: the logits after temperature and after top-k / top-p truncation
(Hugging Face's processed generation scores), renormalised. With truncation this is larger than
the policy's tempered log-prob of the same token — the kept tokens share the truncated mass — so
a truncating sampler shows up as policy/behaviour mismatch (r < 1 on average), exactly as it does
with a real inference engine. The policy side always uses the same temperature and no truncation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch
from torch import Tensor
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from trustregion.functional.logprobs import token_logprobs
from trustregion.routing import RoutingRecorder, recording_routing
from trustregion.sampler import (
    behavior_topk_slots,
    lean_sample,
    lean_sampler_support,
    note_fallback,
)
from trustregion.tasks.base import Example
from trustregion.validation import boolean, integer_at_least, number_in, one_of, require

__all__ = [
    "Rollout",
    "RolloutStats",
    "SamplingSettings",
    "completion_logits",
    "completion_mask_from",
    "decode_completions",
    "encode_prompts",
    "eos_token_ids",
    "generate_in_eval_mode",
    "generate_rollout",
    "prompt_lengths",
    "seeded",
]


@dataclass(frozen=True)
class SamplingSettings:
    """How the behaviour model samples.

    Args:
        temperature: > 0; the policy's log-probs use the same temperature.
        top_p: nucleus mass in (0, 1]; 1 turns it off.
        top_k: keep the k most likely tokens; 0 turns it off.
        max_new_tokens: completion length limit, also the fixed horizon of
            ``seq-mean-token-sum-norm`` aggregation.
        sampler: ``"lean"`` prefills each prompt once per group and records the behaviour
            log-probs step by step (:mod:`trustregion.sampler`); ``"generate"`` uses Hugging
            Face ``generate`` with ``output_scores``. Both give the same rollouts; ``lean`` is
            faster and its memory does not grow with completion length × vocabulary.
        ignore_eos: sample exactly ``max_new_tokens`` tokens per completion, the
            end-of-sequence token counting as an ordinary one (every completion token is
            counted), as inference engines' ``ignore_eos`` does; for benchmarks.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16
    sampler: Literal["lean", "generate"] = "lean"
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        number_in("temperature", self.temperature, 0.0)
        number_in("top_p", self.top_p, 0.0, 1.0, note="1 turns it off")
        integer_at_least("top_k", self.top_k, 0, note="0 turns it off")
        integer_at_least("max_new_tokens", self.max_new_tokens, 1)
        one_of("sampler", self.sampler, ("lean", "generate"))
        boolean("ignore_eos", self.ignore_eos)


@dataclass
class Rollout:
    """N = prompts × G sampled completions and everything the update phase needs.

    Per-token tensors are ``[N, T]`` with T the longest completion of this rollout; prompts are
    left-padded to ``[N, P]``. Top-K tensors are ``[N, T, K + 1]``: the behaviour policy's top-K
    ids in descending probability, with the sampled id blanked to −1 where it is among them, then
    the sampled id in the last slot (the layout ``TokenBatch.topk_slots`` reads).

    ``routing`` is a mixture-of-experts behaviour's expert choices, ``[N, layers, P + T − 1,
    top_k]`` (recorded with ``record_routing``; see :mod:`trustregion.routing`).
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    behavior_logp: Tensor
    examples: list[Example]
    completions: list[str]
    topk_ids: Tensor | None = None
    topk_behavior_logp: Tensor | None = None
    rewards: Tensor | None = None
    advantages: Tensor | None = None
    old_logp: Tensor | None = None
    ref_logp: Tensor | None = None
    routing: Tensor | None = None

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def lengths(self) -> Tensor:
        """Number of counted completion tokens of each sequence."""
        return self.completion_mask.sum(-1)

    def select(self, index: Tensor) -> Rollout:
        """The rows in ``index`` (a 1-D long tensor), as a new rollout."""
        rows = index.tolist()
        values = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, Tensor):
                value = value[index]
            elif isinstance(value, list):
                value = [value[i] for i in rows]
            values[field.name] = value
        return replace(self, **values)


@dataclass(frozen=True)
class RolloutStats:
    """Statistics of one scored rollout on one process, kept so that ranks combine exactly
    (sums and counts; see ``TrustRegionModule.step_metrics``).

    Attributes:
        rewards: ``[N]`` the task's rewards, before any in-reward penalty.
        lengths: ``[N]`` counted completion tokens of each sequence.
        zero_std_groups: how many prompt groups have rewards that are all equal.
        groups: how many prompt groups the rollout holds.
        reward_penalty: ``[N]`` the amount in-reward penalties subtracted from each reward
            before the advantages (None without such a penalty).
    """

    rewards: Tensor
    lengths: Tensor
    zero_std_groups: Tensor | float
    groups: int
    reward_penalty: Tensor | None = None


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *,
                   chat_template: bool = False) -> tuple[Tensor, Tensor]:
    """Left-padded ``(input_ids, attention_mask)`` for ``prompts``.

    With ``chat_template`` each prompt becomes one user turn of the tokenizer's chat template,
    followed by the assistant generation prompt.
    """
    if chat_template:
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True)
            for p in prompts
        ]
        enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tokenizer(list(prompts), padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"].bool()


def prompt_lengths(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *,
                   chat_template: bool = False, chunk: int = 256) -> list[int]:
    """Tokens each prompt takes in a rollout, encoded as :func:`encode_prompts` does (chat
    template included), in chunks of ``chunk`` prompts."""
    lengths: list[int] = []
    for start in range(0, len(prompts), chunk):
        _, mask = encode_prompts(tokenizer, prompts[start:start + chunk],
                                 chat_template=chat_template)
        lengths.extend(mask.sum(-1).tolist())
    return lengths


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Draw random numbers from ``torch.manual_seed(seed)`` inside, leaving the global
    generators (the CPU's, and ``device``'s when it is a GPU) as they were outside."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token ids that end a completion: the model's generation config's, else the
    tokenizer's end-of-sequence token."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = eos if isinstance(eos, list) else [eos]
    return [int(i) for i in ids if i is not None]


def generate_in_eval_mode(model: PreTrainedModel, ids: Tensor, mask: Tensor,
                          config: GenerationConfig, *, synced_gpus: bool | None = None) -> Any:
    """``model.generate`` from prompt ``ids`` and ``mask`` with ``config``, in eval mode (no
    dropout); the model's train/eval mode is restored afterwards. ``synced_gpus`` is passed to
    ``generate``: True keeps every process running forward passes until all are done (a model
    sharded across them); None lets Hugging Face decide."""
    was_training = model.training
    model.eval()
    try:
        return model.generate(  # type: ignore[operator]
            input_ids=ids, attention_mask=mask.long(), generation_config=config,
            synced_gpus=synced_gpus)
    finally:
        model.train(was_training)


def decode_completions(tokenizer: PreTrainedTokenizerBase, ids: Tensor, mask: Tensor
                       ) -> list[str]:
    """The text of each row of completion ``ids`` where ``mask`` is set, special tokens
    skipped; the ids are copied to the host once, not row by row.

    >>> from trustregion.models.char_tokenizer import build_char_tokenizer
    >>> tok = build_char_tokenizer()
    >>> ids = torch.tensor([tok.encode(t, add_special_tokens=False) for t in ("12", "7x")])
    >>> decode_completions(tok, ids, torch.tensor([[True, True], [True, False]]))
    ['12', '7']
    """
    ids, mask = ids.cpu(), mask.cpu()
    return tokenizer.batch_decode([row[kept].tolist() for row, kept in zip(ids, mask, strict=True)],
                                  skip_special_tokens=True)


def completion_mask_from(ids: Tensor, eos_ids: Sequence[int]) -> Tensor:
    """True on every token up to and including the first end-of-sequence token."""
    is_eos = torch.zeros_like(ids, dtype=torch.bool)
    for eos in eos_ids:
        is_eos |= ids == eos
    ended_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return ~ended_before


@torch.no_grad()
def generate_rollout(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    group_size: int,
    sampling: SamplingSettings,
    topk: int = 0,
    chat_template: bool = False,
    record_routing: bool = False,
    encoded: tuple[Tensor, Tensor] | None = None,
) -> Rollout:
    """Sample ``group_size`` completions per example with the sampler ``sampling.sampler``
    names (see the module's description); the rows of a group are adjacent.

    Args:
        topk: also record the behaviour policy's top-``topk`` log-probs per position (for top-K
            divergences); 0 records none.
        record_routing: also record a mixture-of-experts model's expert choices at every
            position it processed (``Rollout.routing``, for routing replay); ``ValueError`` for a
            model without a supported router.
        encoded: the examples' prompts already encoded, ``(ids, mask)`` with one left-padded row
            per example (as :func:`encode_prompts` returns them); None encodes them here.
    """
    if encoded is None:
        encoded = encode_prompts(tokenizer, [ex.prompt for ex in examples],
                                 chat_template=chat_template)
    ids, mask = encoded
    require(ids.dim() == 2 and tuple(mask.shape) == tuple(ids.shape)
            and ids.shape[0] == len(examples),
            f"encoded must be (ids, mask) of shape [examples, prompt length] with one row per "
            f"example ({len(examples)}); got shapes {tuple(ids.shape)} and {tuple(mask.shape)}")
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device).bool()
    eos_ids = eos_token_ids(model, tokenizer)
    config = GenerationConfig(
        do_sample=True,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        max_new_tokens=sampling.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[] if sampling.ignore_eos else eos_ids,
        return_dict_in_generate=True,
        output_scores=True,
    )
    lean = sampling.sampler == "lean"
    if lean:
        reason = lean_sampler_support(model, config)
        if reason is not None:
            note_fallback(reason)
            lean = False
    prompt_ids = ids.repeat_interleave(group_size, dim=0)
    prompt_mask = mask.repeat_interleave(group_size, dim=0)
    # the lean sampler's prefill runs each prompt once; the recorder then expands its rows
    recording = recording_routing(model, len(ids) if lean else len(prompt_ids)) \
        if record_routing else nullcontext()
    with recording as recorder:
        if lean:
            completion_ids, behavior_logp, topk_ids, topk_logp = _lean_rollout(
                model, ids, mask, group_size, sampling, eos_ids, _pad_id(tokenizer, eos_ids),
                topk, recorder)
        else:
            completion_ids, behavior_logp, topk_ids, topk_logp = _generate_rollout(
                model, prompt_ids, prompt_mask, config, topk)
    routing = None
    if recorder is not None:
        routing = recorder.routing()
        # the last sampled token is never fed back: prompt + all but one completion position
        expected = prompt_ids.shape[1] + completion_ids.shape[1] - 1
        require(routing.shape[2] == expected,
                f"the routing record covers {routing.shape[2]} positions; expected {expected} "
                "(one prefill over the prompts, then one position per decode step)")
    if sampling.ignore_eos:
        completion_mask = torch.ones_like(completion_ids, dtype=torch.bool)
    else:
        completion_mask = completion_mask_from(completion_ids, eos_ids)
    behavior_logp = torch.where(completion_mask, behavior_logp, torch.zeros_like(behavior_logp))
    texts = decode_completions(tokenizer, completion_ids, completion_mask)
    return Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
        completion_mask=completion_mask, behavior_logp=behavior_logp,
        examples=[ex for ex in examples for _ in range(group_size)], completions=texts,
        topk_ids=topk_ids, topk_behavior_logp=topk_logp, routing=routing,
    )


_Sampled = tuple[Tensor, Tensor, Tensor | None, Tensor | None]


def _pad_id(tokenizer: PreTrainedTokenizerBase, eos_ids: list[int]) -> int:
    # generate's choice too: the pad token, else the first end-of-sequence token
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    require(bool(eos_ids), "the tokenizer has neither a pad nor an end-of-sequence token; set "
            "one (pad_token) so that ended completions can be padded")
    return eos_ids[0]


def _lean_rollout(model: PreTrainedModel, ids: Tensor, mask: Tensor, group_size: int,
                  sampling: SamplingSettings, eos_ids: list[int], pad_token_id: int, topk: int,
                  recorder: RoutingRecorder | None) -> _Sampled:
    out = lean_sample(
        model, ids, mask, group_size=group_size, max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
        eos_ids=eos_ids, pad_token_id=pad_token_id, ignore_eos=sampling.ignore_eos, topk=topk,
        after_prefill=recorder.expand if recorder is not None else None)
    return out.completion_ids, out.behavior_logp, out.topk_ids, out.topk_logp


def _generate_rollout(model: PreTrainedModel, prompt_ids: Tensor, prompt_mask: Tensor,
                      config: GenerationConfig, topk: int) -> _Sampled:
    out = generate_in_eval_mode(model, prompt_ids, prompt_mask, config)
    completion_ids = out.sequences[:, prompt_ids.shape[1]:]
    behavior_logp = torch.stack(
        [token_logprobs(scores, completion_ids[:, t]) for t, scores in enumerate(out.scores)],
        dim=1,
    )
    topk_ids = topk_logp = None
    if topk > 0:
        topk_ids, topk_logp = _behavior_topk(out.scores, completion_ids, topk)
    return completion_ids, behavior_logp, topk_ids, topk_logp


def _behavior_topk(scores: Sequence[Tensor], sampled: Tensor, k: int) -> tuple[Tensor, Tensor]:
    slots = [behavior_topk_slots(step, sampled[:, t], k) for t, step in enumerate(scores)]
    return torch.stack([ids for ids, _ in slots], dim=1), torch.stack([lp for _, lp in slots], 1)


def completion_logits(model: PreTrainedModel, rollout: Rollout) -> Tensor:
    """Logits ``[N, T, V]`` of ``model`` at the positions that predict each completion token,
    with the same left-padding position ids ``generate`` used."""
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
    attention = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1).long()
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    length = rollout.completion_ids.shape[1]
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                logits_to_keep=length + 1, use_cache=False)
    return out.logits[:, :-1]
