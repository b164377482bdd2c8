"""Small configurations of several transformer families, for the character tokenizer.

Each family differs from Llama where RL code tends to go wrong: how positions are encoded
(rotary, partial rotary or learned absolute), tied embeddings, a sliding attention window, and
mixture-of-experts routing. :func:`tiny_config` builds any of them at a size that trains and
samples on a laptop CPU; the special-token ids follow :mod:`trustregion.models.char_tokenizer`.

>>> config = tiny_config("gpt2", vocab_size=47)
>>> config.model_type, config.n_positions, config.tie_word_embeddings
('gpt2', 64, True)
>>> tiny_config("mistral", vocab_size=47).sliding_window
8
"""

from __future__ import annotations

from typing import Any

import transformers
from transformers import PretrainedConfig

from trustregion.models.char_tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    char_vocab,
)
from trustregion.validation import require

__all__ = ["ARCHITECTURES", "MOE_ARCHITECTURES", "tiny_config"]

ARCHITECTURES: dict[str, str] = {
    "llama": "rotary positions (the shipped tiny-char-llama)",
    "qwen2": "rotary positions, biased q/k/v projections",
    "qwen3": "rotary positions, RMS-normalised queries and keys",
    "mistral": "rotary positions, sliding attention window",
    "gpt2": "learned absolute positions, LayerNorm, GELU",
    "gpt_neox": "partial rotary positions, parallel attention and MLP",
    "phi": "partial rotary positions, parallel attention and MLP, biased projections",
    "qwen3_moe": "mixture of experts (top-2 of 8 experts per token)",
    "mixtral": "mixture of experts (top-2 of 4 experts per token)",
    "olmoe": "mixture of experts (top-2 of 8 experts per token)",
}
"""The families :func:`tiny_config` builds, with what sets each apart."""

MOE_ARCHITECTURES: frozenset[str] = frozenset({"qwen3_moe", "mixtral", "olmoe"})
"""The mixture-of-experts families among :data:`ARCHITECTURES`."""


def tiny_config(
    architecture: str,
    vocab_size: int,
    *,
    hidden_size: int = 128,
    num_hidden_layers: int = 3,
    num_attention_heads: int = 4,
    intermediate_size: int = 256,
    max_position_embeddings: int = 64,
    **overrides: Any,
) -> PretrainedConfig:
    """A small configuration of ``architecture`` (a key of :data:`ARCHITECTURES`).

    Embeddings are tied. Mistral's sliding window is 8 tokens, shorter than a rollout's
    sequences, so the window really is in effect. The mixture-of-experts families route each
    token to 2 experts whose hidden width is ``intermediate_size // 4``, so that the two active
    experts cost half the dense MLP. ``overrides`` are set on the configuration last.
    """
    require(architecture in ARCHITECTURES,
            f"unknown architecture {architecture!r}; allowed: {', '.join(ARCHITECTURES)}")
    require(vocab_size >= len(SPECIAL_TOKENS),
            f"vocab_size must hold at least the {len(SPECIAL_TOKENS)} special tokens; "
            f"got {vocab_size}")
    require(hidden_size % num_attention_heads == 0,
            f"hidden_size ({hidden_size}) must be divisible by num_attention_heads "
            f"({num_attention_heads})")
    ids = char_vocab()
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "tie_word_embeddings": True,
        "pad_token_id": ids[PAD_TOKEN],
        "bos_token_id": ids[BOS_TOKEN],
        "eos_token_id": ids[EOS_TOKEN],
    }
    decoder: dict[str, Any] = {
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
    }
    head_dim = hidden_size // num_attention_heads
    expert_size = max(1, intermediate_size // 4)
    config_class: type[PretrainedConfig]
    kwargs: dict[str, Any]
    if architecture == "llama":
        config_class, kwargs = transformers.LlamaConfig, {
            **decoder, "num_key_value_heads": num_attention_heads}
    elif architecture == "qwen2":
        config_class, kwargs = transformers.Qwen2Config, {
            **decoder, "num_key_value_heads": num_attention_heads}
    elif architecture == "qwen3":
        config_class, kwargs = transformers.Qwen3Config, {
            **decoder, "num_key_value_heads": num_attention_heads, "head_dim": head_dim}
    elif architecture == "mistral":
        config_class, kwargs = transformers.MistralConfig, {
            **decoder, "num_key_value_heads": num_attention_heads, "sliding_window": 8}
    elif architecture == "gpt2":
        config_class, kwargs = transformers.GPT2Config, {
            "n_embd": hidden_size, "n_layer": num_hidden_layers, "n_head": num_attention_heads,
            "n_inner": intermediate_size, "n_positions": max_position_embeddings}
    elif architecture == "gpt_neox":
        config_class, kwargs = transformers.GPTNeoXConfig, {**decoder, "rotary_pct": 0.5}
    elif architecture == "phi":
        config_class, kwargs = transformers.PhiConfig, {**decoder, "partial_rotary_factor": 0.5}
    elif architecture == "qwen3_moe":
        config_class, kwargs = transformers.Qwen3MoeConfig, {
            **decoder, "num_key_value_heads": num_attention_heads, "head_dim": head_dim,
            "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": expert_size,
            "norm_topk_prob": True}
    elif architecture == "mixtral":
        config_class, kwargs = transformers.MixtralConfig, {
            **decoder, "num_key_value_heads": num_attention_heads, "num_local_experts": 4,
            "num_experts_per_tok": 2, "intermediate_size": expert_size}
    else:  # olmoe
        config_class, kwargs = transformers.OlmoeConfig, {
            **decoder, "num_key_value_heads": num_attention_heads, "num_experts": 8,
            "num_experts_per_tok": 2, "intermediate_size": expert_size}
    config = config_class(**common, **kwargs)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config
