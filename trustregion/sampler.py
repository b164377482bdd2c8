"""The lean sampler: a KV-cached sampling loop that prefills each prompt once per group.

A rollout samples ``group_size`` completions of every prompt. Hugging Face ``generate`` is given
the prompts repeated, so it runs each prompt's prefill ``group_size`` times, and with
``output_scores`` it keeps the processed scores of every step, an ``[N, T, V]`` tensor. The lean
loop instead

1. runs the U distinct prompts once (left-padded, ``position_ids = cumsum(mask) − 1``, only the
   last position's logits), then repeats the key/value cache and those logits to the
   N = U × ``group_size`` rows (``Cache.batch_repeat_interleave``);
2. at each step processes the float32 logits exactly as ``generate``'s warpers do (temperature,
   then top-k, then top-p), draws the token with ``torch.multinomial`` of their softmax, and
   records the token's log-prob under that processed distribution (and, when asked, the top-K
   slots) straight away, so only one step's ``[N, V]`` scores exist at a time;
3. gives rows that have ended the pad token (as ``generate`` does), stops each row at its first
   end-of-sequence token unless ``ignore_eos``, and stops when every row has ended or after
   ``max_new_tokens`` tokens; the last token is never fed back.

Where the logits agree bitwise, a fixed seed draws the same tokens as ``generate``. A model the
loop cannot drive (see :func:`lean_sampler_support`) is sampled with ``generate`` instead, and the
log says so once per process.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from transformers import DynamicCache, GenerationConfig, PreTrainedModel

from trustregion.functional.logprobs import gather_logprobs, token_logprobs

__all__ = [
    "FALLBACK_NOTES",
    "SampledTokens",
    "behavior_topk_slots",
    "lean_sample",
    "lean_sampler_support",
    "note_fallback",
    "process_scores",
]

FALLBACK_NOTES: set[str] = set()
"""Reasons to fall back to ``generate`` already reported in this process (each is logged once)."""

_NEUTRAL: tuple[Any, ...] = (None, False, 0, 1.0, (), [], {})
# generation-config fields that make ``generate`` add a logits processor or stopping rule the
# lean loop does not apply; each is harmless at a neutral value
_EXTRA_PROCESSING = (
    "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "sequence_bias", "min_length",
    "min_new_tokens", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
    "forced_eos_token_id", "exponential_decay_length_penalty", "guidance_scale", "top_h",
    "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "watermarking_config",
    "renormalize_logits", "stop_strings", "max_time", "remove_invalid_values",
)


@dataclass(frozen=True)
class SampledTokens:
    """What the lean loop sampled for N rows over T steps (T ≤ ``max_new_tokens``).

    Attributes:
        completion_ids: ``[N, T]`` sampled ids; the pad token after a row has ended.
        behavior_logp: ``[N, T]`` log-prob of each id under the processed distribution it was
            drawn from (not yet masked).
        topk_ids: ``[N, T, K + 1]`` top-K slots (see :func:`behavior_topk_slots`), or None.
        topk_logp: ``[N, T, K + 1]`` their log-probs, or None.
    """

    completion_ids: Tensor
    behavior_logp: Tensor
    topk_ids: Tensor | None = None
    topk_logp: Tensor | None = None


def process_scores(logits: Tensor, *, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Float32 ``logits`` ``[N, V]`` after temperature, top-k and top-p, in that order, with the
    same arithmetic as Hugging Face's warpers: top-k keeps the scores ≥ the k-th largest; top-p
    removes the tokens whose ascending-sorted cumulative probability is ≤ 1 − ``top_p``, always
    keeping the most likely one. Removed tokens get −inf.

    >>> probs = torch.tensor([[0.4, 0.3, 0.2, 0.07, 0.03]])
    >>> kept = process_scores(probs.log(), temperature=1.0, top_k=0, top_p=0.75).isfinite()
    >>> kept.tolist()
    [[True, True, True, False, False]]
    """
    scores = logits / temperature if temperature != 1.0 else logits
    if top_k > 0:
        k = min(top_k, scores.shape[-1])
        kth = torch.topk(scores, k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if top_p < 1.0:
        ascending, order = torch.sort(scores, descending=False)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    return scores


def behavior_topk_slots(scores: Tensor, sampled: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top-``k`` slots of one step: ``[N, K + 1]`` ids (the ``k`` most likely under
    ``scores`` in descending order, the sampled id blanked to −1 where it is among them, then
    ``sampled`` last) and their log-probs under ``scores`` (−inf in a blanked slot)."""
    top = scores.topk(min(k, scores.shape[-1]), dim=-1).indices
    token = sampled[:, None]
    # The sampled id always takes the last slot; a tracked slot holding it is blanked, so any
    # prefix of the tracked slots plus the last one is a smaller top-K record.
    ids = torch.cat([torch.where(top == token, -1, top), token], dim=-1)
    return ids, gather_logprobs(scores, ids)


def _cache_keyword(model: PreTrainedModel) -> str | None:
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def lean_sampler_support(model: PreTrainedModel, config: GenerationConfig) -> str | None:
    """None when the lean loop samples ``model`` exactly as ``generate`` would with ``config``;
    otherwise why it cannot (the reason the fallback to ``generate`` reports).

    The loop needs a decoder-only model whose ``forward`` accepts a key/value cache,
    ``position_ids``, ``attention_mask`` and ``logits_to_keep``, a cache that can be repeated
    along the batch, and no generation setting (from ``config`` or the model's own generation
    config) that makes ``generate`` process the scores beyond temperature, top-k and top-p.
    """
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder model"
    params = inspect.signature(model.forward).parameters
    missing = [p for p in ("attention_mask", "position_ids", "logits_to_keep") if p not in params]
    if _cache_keyword(model) is None:
        missing.insert(0, "cache (past_key_values)")
    if missing:
        return f"{name}.forward does not accept {', '.join(missing)}"
    if not callable(getattr(DynamicCache, "batch_repeat_interleave", None)):
        return "this transformers' DynamicCache has no batch_repeat_interleave"
    merged = GenerationConfig(**config.to_dict())
    own = getattr(model, "generation_config", None)
    if own is not None:
        merged.update(**own.to_dict(), defaults_only=True)
    extra = [field for field in _EXTRA_PROCESSING
             if getattr(merged, field, None) not in _NEUTRAL]
    if extra:
        return (f"the generation config of {name} sets {', '.join(extra)}, which generate "
                "applies and the lean sampler does not")
    return None


def note_fallback(reason: str) -> None:
    """Log, once per process for each ``reason``, that rollouts are sampled with ``generate``."""
    if reason in FALLBACK_NOTES:
        return
    FALLBACK_NOTES.add(reason)
    rank_zero_warn(f"the lean sampler cannot run this model ({reason}); rollouts are sampled "
                   "with Hugging Face generate instead (sampler: generate), which gives the "
                   "same results more slowly")


@torch.no_grad()
def lean_sample(model: PreTrainedModel, ids: Tensor, mask: Tensor, *, group_size: int,
                max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                eos_ids: Sequence[int], pad_token_id: int, ignore_eos: bool = False,
                topk: int = 0, after_prefill: Callable[[int], None] | None = None
                ) -> SampledTokens:
    """Sample ``group_size`` completions of each of the U left-padded prompts ``ids``/``mask``
    (``[U, P]``); rows come out grouped, ``[U × group_size, T]``.

    Args:
        eos_ids: ids that end a row (ignored with ``ignore_eos``: then every row takes exactly
            ``max_new_tokens`` tokens).
        pad_token_id: the id given to rows that have ended.
        topk: also record the top-``topk`` slots per step; 0 records none.
        after_prefill: called with ``group_size`` once the prompts are prefilled and before the
            cache is repeated (a routing recorder expands its record there).

    The model runs in eval mode and is put back in its previous mode afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        return _sample_loop(model, ids, mask.long(), group_size=group_size,
                            max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, eos_ids=eos_ids,
                            pad_token_id=pad_token_id, ignore_eos=ignore_eos, topk=topk,
                            after_prefill=after_prefill)
    finally:
        model.train(was_training)


def _sample_loop(model: PreTrainedModel, ids: Tensor, attention: Tensor, *, group_size: int,
                 max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                 eos_ids: Sequence[int], pad_token_id: int, ignore_eos: bool, topk: int,
                 after_prefill: Callable[[int], None] | None) -> SampledTokens:
    cache_keyword = _cache_keyword(model)
    assert cache_keyword is not None  # lean_sampler_support checked the forward
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attention, position_ids=positions,
                use_cache=True, logits_to_keep=1, **{cache_keyword: cache})
    logits = out.logits[:, -1].float().repeat_interleave(group_size, dim=0)
    del out
    if after_prefill is not None:
        after_prefill(group_size)
    cache.batch_repeat_interleave(group_size)
    attention = attention.repeat_interleave(group_size, dim=0)
    position = positions[:, -1:].repeat_interleave(group_size, dim=0)
    rows = attention.shape[0]
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=ids.device)
    unfinished = torch.ones(rows, dtype=torch.bool, device=ids.device)
    tokens: list[Tensor] = []
    logps: list[Tensor] = []
    slot_ids: list[Tensor] = []
    slot_logps: list[Tensor] = []
    for step in range(max_new_tokens):
        scores = process_scores(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)[:, 0]
        if not ignore_eos:
            token = torch.where(unfinished, token, pad_token_id)
        tokens.append(token)
        logps.append(token_logprobs(scores, token))
        if topk > 0:
            step_ids, step_logp = behavior_topk_slots(scores, token, topk)
            slot_ids.append(step_ids)
            slot_logps.append(step_logp)
        if not ignore_eos:
            unfinished &= ~torch.isin(token, eos)
            if not bool(unfinished.any()):
                break
        if step == max_new_tokens - 1:
            break
        attention = torch.cat([attention, attention.new_ones(rows, 1)], dim=1)
        position = position + 1
        out = model(input_ids=token[:, None], attention_mask=attention, position_ids=position,
                    use_cache=True, logits_to_keep=1, **{cache_keyword: cache})
        logits = out.logits[:, -1].float()
        del out
    return SampledTokens(
        completion_ids=torch.stack(tokens, dim=1), behavior_logp=torch.stack(logps, dim=1),
        topk_ids=torch.stack(slot_ids, dim=1) if topk > 0 else None,
        topk_logp=torch.stack(slot_logps, dim=1) if topk > 0 else None)
