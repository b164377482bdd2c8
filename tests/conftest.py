"""Shared fixtures: the character tokenizer, a randomly initialised tiny character-level Llama
saved to disk, and a task that rewards even a random model."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from trustregion.models.char_tokenizer import build_char_tokenizer
from trustregion.models.tiny import tiny_llama_config
from trustregion.tasks import Arithmetic, Example, RewardFn


@pytest.fixture(scope="session")
def char_tokenizer() -> PreTrainedTokenizerFast:
    """The character tokenizer (shared by every test: do not modify it)."""
    return build_char_tokenizer()


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory: pytest.TempPathFactory,
                     char_tokenizer: PreTrainedTokenizerFast) -> Path:
    """A ``save_pretrained``-style directory holding a config and the char tokenizer; load it
    with the ``config:DIR`` model source (random weights, seeded by the caller)."""
    path = tmp_path_factory.mktemp("random-tiny-llama")
    char_tokenizer.save_pretrained(path)
    tiny_llama_config(len(char_tokenizer), hidden_size=32, num_hidden_layers=1,
                      intermediate_size=64).save_pretrained(path)
    return path


def digit_fraction(completions: list[str], examples: list[Example]) -> list[float]:
    """Fraction of a completion's characters that are digits (0 for an empty one)."""
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in completions]


class DigitRichArithmetic(Arithmetic):
    """Arithmetic prompts rewarded by :func:`digit_fraction`, so that even a randomly
    initialised model gets a learning signal (non-zero advantages) in a short test."""

    @property
    def reward_function(self) -> RewardFn:
        return digit_fraction


@pytest.fixture
def signal_task() -> DigitRichArithmetic:
    return DigitRichArithmetic()
