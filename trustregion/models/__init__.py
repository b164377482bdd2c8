"""Model helpers: the character tokenizer and the tiny Llama shipped for CPU quick starts."""

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
from trustregion.models.tiny import TINY_MODEL_DIR, tiny_llama_config

__all__ = [
    "ALPHABET",
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "TINY_MODEL_DIR",
    "UNK_TOKEN",
    "build_char_tokenizer",
    "char_vocab",
    "tiny_llama_config",
]
