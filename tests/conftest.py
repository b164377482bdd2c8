"""Shared fixtures: the character tokenizer, a randomly initialised tiny character-level Llama
saved to disk, and a task that rewards even a random model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from trustregion.models.char_tokenizer import build_char_tokenizer
from trustregion.models.tiny import tiny_llama_config
from trustregion.tasks import Arithmetic, Example, RewardFn

# Lightning's CLI calls jsonargparse APIs that jsonargparse deprecates (not ours to fix). The
# pyproject filter drops them by module, but a ``pytest.warns`` block re-emits what it did not
# match without that module, so they are switched off at their source for the test session.
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")


@pytest.fixture(autouse=True)
def command_line_of_the_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests hand the CLI its arguments; pytest's own must not look like a second command
    line (LightningCLI warns when it sees both)."""
    monkeypatch.setattr("sys.argv", ["trustregion"])


@pytest.fixture(autouse=True)
def no_global_seed_from_earlier_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    """``seed_everything`` records its seed in ``PL_GLOBAL_SEED``, and a module built without
    an explicit seed follows it: a seed set by one test must not leak into the next."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)


DISTRIBUTED_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK",
                         "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE")
"""What Lightning writes into ``os.environ`` when a test trains on several processes in-process
(``ddp_spawn``)."""


@pytest.fixture(autouse=True)
def no_distributed_variables_from_earlier_tests() -> Iterator[None]:
    """A test that trains with ``ddp_spawn`` leaves Lightning's ``MASTER_PORT``, ``WORLD_SIZE``
    and the like in ``os.environ``; a later test's ``trustregion`` processes would inherit them
    and join a stale rendezvous. Each test starts, and leaves, without them."""
    for name in DISTRIBUTED_VARIABLES:
        os.environ.pop(name, None)
    yield
    for name in DISTRIBUTED_VARIABLES:
        os.environ.pop(name, None)


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
