"""A character-level tokenizer for the tiny model, as a Hugging Face fast tokenizer.

Every character of :data:`ALPHABET` is one token; there is no merging, so the model sees the same
units the built-in tasks are written in. The tokenizer prepends ``<bos>``, pads on the left (for
batched generation) and decodes by concatenating characters, without inserting spaces::

    >>> tok = build_char_tokenizer()
    >>> ids = tok("12+7=")["input_ids"]          # [bos, '1', '2', '+', '7', '=']
    >>> tok.decode(ids, skip_special_tokens=True)
    '12+7='

Characters outside the alphabet encode as ``<unk>``, so the model cannot tell them apart;
training warns, once, of prompts that hold any (:mod:`trustregion.prompt_checks`).
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

__all__ = [
    "ALPHABET",
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "UNK_TOKEN",
    "build_char_tokenizer",
    "char_vocab",
]

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
"""Special tokens, holding ids 0, 1, 2, 3 in this order."""

ALPHABET: str = string.digits + string.ascii_lowercase + "+-*=:" + " " + "\n"
"""The characters the tokenizer knows, one token each, after the special tokens."""


def char_vocab() -> dict[str, int]:
    """Token → id: the special tokens first, then :data:`ALPHABET` in order."""
    tokens = [*SPECIAL_TOKENS, *ALPHABET]
    return {token: index for index, token in enumerate(tokens)}


def build_char_tokenizer(model_max_length: int = 64) -> PreTrainedTokenizerFast:
    """Build the character tokenizer (no files, no downloads).

    Args:
        model_max_length: recorded as the tokenizer's maximum length; match the model's
            ``max_position_embeddings``.
    """
    vocab = char_vocab()
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # One pre-token per character, newlines included; special tokens are matched before this.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Fuse joins the decoded tokens with nothing in between (the default would use spaces).
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
    )
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
