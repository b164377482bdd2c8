"""Model helpers: the character tokenizer and the tiny models shipped for CPU quick starts."""

from trustregion.models.char_tokenizer import (
    ALPHABET,
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    UNK_TOKEN,
    build_char_tokenizer,
    char_vocab,
)
from trustregion.models.tiny import (
    TINY_ARCHITECTURES,
    TINY_MODEL_DIR,
    TINY_MODELS,
    tiny_llama_config,
)

__all__ = [
    "ALPHABET",
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "TINY_ARCHITECTURES",
    "TINY_MODELS",
    "TINY_MODEL_DIR",
    "UNK_TOKEN",
    "build_char_tokenizer",
    "char_vocab",
    "tiny_llama_config",
]
