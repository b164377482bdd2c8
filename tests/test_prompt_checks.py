"""Prompts are checked before they are completed: empty ones are refused with their position,
and text the tokenizer cannot represent is reported once, with a count."""

from __future__ import annotations

import random
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import pytest
import torch

from trustregion.batching import BatchSettings
from trustregion.module import TrustRegionModule
from trustregion.prompt_checks import UnknownTokens, check_prompt_text, unknown_tokens
from trustregion.rollout import SamplingSettings
from trustregion.tasks import Example, Task

# 2 prompts × 2 completions, one mini-batch: 1 optimiser step per rollout batch
SMALL = {"batching": BatchSettings(group_size=2, prompts_per_step=2, mini_batch_size=4),
         "sampling": SamplingSettings(max_new_tokens=2)}


class Prompts(Task):
    """A dataset of fixed prompts, drawn uniformly."""

    name = "fixed"

    def __init__(self, prompts: Sequence[str] = ("1+1=",)) -> None:
        self.prompts = list(prompts)

    def sample(self, rng: random.Random) -> Example:
        return Example(prompt=rng.choice(self.prompts), answer="2")

    def all_examples(self) -> list[Example]:
        return [Example(prompt=p, answer="2") for p in self.prompts]


class Generated(Task):
    """A generator (no ``all_examples``) whose every prompt is ``prompt``."""

    name = "generated"

    def __init__(self, prompt: str) -> None:
        self.prompt = prompt

    def sample(self, rng: random.Random) -> Example:
        return Example(prompt=self.prompt, answer="2")


def _fit(random_model_dir: Path, task: Task, rollout_batches: int) -> None:
    torch.manual_seed(0)
    module = TrustRegionModule(policy=f"config:{random_model_dir}", task=task, **SMALL)
    L.Trainer(max_steps=rollout_batches, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(module)


# ------------------------------------------------------------------------------ pure functions

def test_check_prompt_text_names_the_first_empty_prompt_and_counts_them() -> None:
    with pytest.raises(ValueError, match=re.escape(
            "prompt 2 of 4 in prompt batch 7 is empty (' '); 2 empty prompt(s) in all. Every "
            "prompt needs text to complete")):
        check_prompt_text(["12+7=", " ", "3*4=", ""], source="prompt batch 7")
    check_prompt_text(["12+7=", " x"], source="prompt batch 7")  # text after spaces is text


def test_unknown_tokens_counts_prompts_and_names_the_characters(char_tokenizer) -> None:
    # the character tokenizer knows digits, a-z, "+-*=:", space and newline: 'W', '?' and 'é'
    # are unknown; prompts 2 and 4 hold some, prompt 1 and 3 none
    found = unknown_tokens(char_tokenizer, ["12+7=", "What is 2+3? W?", "ok", "café"])
    assert found == UnknownTokens(count=2, total=4, first=2, prompt="What is 2+3? W?",
                                  characters=("W", "?"))
    assert found.message("task 'qa'", "<unk>") == (
        "2 of 4 prompts in task 'qa' hold text the tokenizer encodes as its unknown token "
        "'<unk>'; the first is prompt 2, 'What is 2+3? W?' ('W', '?'). The model cannot tell "
        "such characters apart: use a tokenizer that covers them, or rewrite the prompts")
    assert unknown_tokens(char_tokenizer, ["12+7=", "ab: 3"]) is None


# ---------------------------------------------------------------------------------- in training

def test_an_empty_dataset_prompt_is_refused_before_the_first_rollout(random_model_dir) -> None:
    with pytest.raises(ValueError, match=re.escape(
            "prompt 2 of 3 in the examples of task 'fixed' is empty ('  ')")):
        _fit(random_model_dir, Prompts(["1+1=", "  ", "2+2="]), rollout_batches=1)


def test_an_empty_generated_prompt_names_its_batch(random_model_dir) -> None:
    with pytest.raises(ValueError, match=re.escape(
            "prompt 1 of 2 in prompt batch 0 is empty (''); 2 empty prompt(s) in all")):
        _fit(random_model_dir, Generated(""), rollout_batches=1)


def test_unknown_characters_are_reported_once_per_run(random_model_dir) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(random_model_dir, Generated("What is 1+1?"), rollout_batches=2)
    reports = [str(w.message) for w in caught if "unknown token" in str(w.message)]
    # two rollout batches hold the same prompts; only the first is reported
    assert reports == [
        "2 of 2 prompts in prompt batch 0 hold text the tokenizer encodes as its unknown token "
        "'<unk>'; the first is prompt 1, 'What is 1+1?' ('W', '?'). The model cannot tell such "
        "characters apart: use a tokenizer that covers them, or rewrite the prompts"]


def test_a_dataset_is_reported_whole_at_the_start(random_model_dir) -> None:
    with pytest.warns(UserWarning, match=re.escape(
            "1 of 3 prompts in the examples of task 'fixed' hold text the tokenizer encodes as "
            "its unknown token '<unk>'; the first is prompt 3, '7*6=?' ('?')")):
        _fit(random_model_dir, Prompts(["1+1=", "2+2=", "7*6=?"]), rollout_batches=1)
