"""The tiny character-level Llama the project ships, for quick starts and tests on a CPU.

The artefact in :data:`TINY_MODEL_DIR` is a small causal LM briefly fine-tuned (supervised) on
the built-in tasks so that it starts with partial accuracy and leaves room for RL to improve it.
``scripts/make_tiny_model.py`` rebuilds it. It loads with the usual Hugging Face classes::

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)

or as the model source ``"tiny-char-llama"`` (:func:`trustregion.models.loading.load_model`),
which never touches the network.
"""

from __future__ import annotations

from pathlib import Path

from transformers import LlamaConfig

from trustregion.models.char_tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    char_vocab,
)
from trustregion.validation import require

__all__ = ["TINY_MODEL_DIR", "tiny_llama_config"]

TINY_MODEL_DIR: Path = Path(__file__).resolve().parent.parent / "assets" / "tiny-char-llama"
"""Directory of the shipped model and tokenizer (``save_pretrained`` layout, safetensors)."""


def tiny_llama_config(
    vocab_size: int,
    *,
    hidden_size: int = 128,
    num_hidden_layers: int = 3,
    num_attention_heads: int = 4,
    intermediate_size: int = 256,
    max_position_embeddings: int = 64,
) -> LlamaConfig:
    """A Llama configuration small enough to train and sample from on a laptop CPU.

    Token ids of ``<pad>``, ``<bos>`` and ``<eos>`` follow :mod:`trustregion.models.char_tokenizer`;
    input and output embeddings are tied.
    """
    require(vocab_size >= len(SPECIAL_TOKENS),
            f"vocab_size must hold at least the {len(SPECIAL_TOKENS)} special tokens; "
            f"got {vocab_size}")
    require(hidden_size % num_attention_heads == 0,
            f"hidden_size ({hidden_size}) must be divisible by num_attention_heads "
            f"({num_attention_heads})")
    ids = char_vocab()
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=ids[PAD_TOKEN],
        bos_token_id=ids[BOS_TOKEN],
        eos_token_id=ids[EOS_TOKEN],
    )
