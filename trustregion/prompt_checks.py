"""Checks on prompt text before the behaviour model completes it.

* An empty prompt (nothing but whitespace) is refused: there is nothing to complete, and the
  reward would only measure what the model says unprompted.
* A prompt holding text the tokenizer maps to its unknown token is reported: the model sees one
  ``<unk>`` in place of each such character, so prompts that differ there look the same to it.
  The shipped character tokenizer knows digits, lower-case letters, ``+-*=:``, space and newline,
  so ``"What is 2+3?"`` loses its ``W`` and ``?``. Byte-level BPE tokenizers encode every string
  and never report. This is a warning, not an error, because a model may still learn a task whose
  prompts lose a few characters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

__all__ = ["UnknownTokens", "check_prompt_text", "unknown_tokens"]


def check_prompt_text(prompts: Sequence[str], *, source: str) -> None:
    """Raise ``ValueError`` if a prompt is empty or only whitespace, naming the first one by
    its 1-based position in ``prompts`` (``source`` says what they are) and counting the rest:
    ``check_prompt_text(["12+7=", " "], source="prompt batch 0")`` raises "prompt 2 of 2 in
    prompt batch 0 is empty (' '); 1 empty prompt(s) in all. ..."
    """
    empty = [index for index, prompt in enumerate(prompts) if not prompt.strip()]
    if empty:
        first = empty[0]
        raise ValueError(
            f"prompt {first + 1} of {len(prompts)} in {source} is empty ({prompts[first]!r}); "
            f"{len(empty)} empty prompt(s) in all. Every prompt needs text to complete")


@dataclass(frozen=True)
class UnknownTokens:
    """Prompts that encode to the tokenizer's unknown token.

    Attributes:
        count: how many prompts hold at least one unknown token.
        total: how many prompts were checked.
        first: 1-based position of the first such prompt.
        prompt: that prompt.
        characters: the distinct pieces of that prompt's text that became unknown tokens, in
            order (empty when the tokenizer cannot map tokens back to text).
    """

    count: int
    total: int
    first: int
    prompt: str
    characters: tuple[str, ...]

    def message(self, source: str, unk_token: str) -> str:
        """The warning shown to the user."""
        shown = f" ({', '.join(map(repr, self.characters))})" if self.characters else ""
        return (f"{self.count} of {self.total} prompts in {source} hold text the tokenizer "
                f"encodes as its unknown token {unk_token!r}; the first is prompt {self.first}, "
                f"{self.prompt[:60]!r}{shown}. The model cannot tell such characters apart: use "
                "a tokenizer that covers them, or rewrite the prompts")


def unknown_tokens(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]
                   ) -> UnknownTokens | None:
    """Which of ``prompts`` encode (without special tokens or chat template) to the tokenizer's
    unknown token; None when none do, or when the tokenizer has no unknown token of its own (none
    at all, or one that doubles as its bos, eos or pad token)."""
    unk = tokenizer.unk_token_id
    others = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    if unk is None or unk in others or not prompts:
        return None
    offsets = bool(tokenizer.is_fast)
    encoded = tokenizer(list(prompts), add_special_tokens=False,
                        return_offsets_mapping=offsets)
    hits = [index for index, ids in enumerate(encoded["input_ids"]) if unk in ids]
    if not hits:
        return None
    first = hits[0]
    characters: list[str] = []
    if offsets:
        ids, spans = encoded["input_ids"][first], encoded["offset_mapping"][first]
        for token, (start, end) in zip(ids, spans, strict=True):
            text = prompts[first][start:end]
            if token == unk and text not in characters:
                characters.append(text)
    return UnknownTokens(count=len(hits), total=len(prompts), first=first + 1,
                         prompt=prompts[first], characters=tuple(characters))
