"""Completions of a prompt file by a trained policy (``trustregion predict``).

The prompts come from a JSONL file (:func:`~trustregion.tasks.jsonl.load_jsonl_prompts`) and
go to the policy in batches of ``batch_size``; each prompt gets one greedy completion, or
``samples`` sampled ones. Every completion becomes one :class:`Completion`, written as one JSON
line by :class:`~trustregion.callbacks.CompletionWriter`::

    {"prompt": "12+7=", "completion": "19", "sample": 0, "line": 1}

``line`` is the prompt's line number in the prompt file, ``sample`` the completion's number
among that prompt's ``samples``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trustregion.data import BatchList, IndexedBatch, in_batches
from trustregion.tasks.jsonl import PromptLine
from trustregion.validation import boolean, integer_at_least, non_empty_string, number_in, require

__all__ = [
    "Completion",
    "PredictionBatch",
    "PredictionBatches",
    "PredictionRefused",
    "PredictionSettings",
    "prediction_batches",
]


class PredictionRefused(ValueError):
    """The prompt file or the prediction settings cannot be used; the message says why."""


@dataclass(frozen=True)
class PredictionSettings:
    """What ``trustregion predict`` reads, writes and how it decodes.

    Args:
        prompts: the JSONL prompt file (one object with a ``prompt_key`` field per line).
        output: the JSONL file the completions are written to (replaced if it exists).
        prompt_key: the field of each line holding the prompt.
        greedy: one greedy completion per prompt; false samples ``samples`` completions.
        samples: sampled completions per prompt (≥ 1); only with ``greedy: false``.
        temperature: sampling temperature (> 0); only with ``greedy: false``.
        top_p: nucleus mass in (0, 1], 1 turns it off; only with ``greedy: false``.
        max_new_tokens: completion length limit; None uses the module's
            ``sampling.max_new_tokens``.
        batch_size: prompts generated together (≥ 1).
    """

    prompts: str
    output: str
    prompt_key: str = "prompt"
    greedy: bool = True
    samples: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int | None = None
    batch_size: int = 32

    def __post_init__(self) -> None:
        non_empty_string("prompts", self.prompts)
        non_empty_string("output", self.output)
        non_empty_string("prompt_key", self.prompt_key)
        boolean("greedy", self.greedy)
        integer_at_least("samples", self.samples, 1, note="completions per prompt")
        number_in("temperature", self.temperature, 0.0)
        number_in("top_p", self.top_p, 0.0, 1.0, note="1 turns it off")
        if self.greedy:
            given = [f"{name}={getattr(self, name)!r}" for name, default in
                     (("samples", 1), ("temperature", 1.0), ("top_p", 1.0))
                     if getattr(self, name) != default]
            require(not given, f"{', '.join(given)} only apply to sampled decoding; set "
                               "greedy: false to sample, or leave them out")
        if self.max_new_tokens is not None:
            integer_at_least("max_new_tokens", self.max_new_tokens, 1)
        integer_at_least("batch_size", self.batch_size, 1, note="prompts generated together")

    @property
    def completions_per_prompt(self) -> int:
        """1 when greedy, else ``samples``."""
        return 1 if self.greedy else self.samples


@dataclass  # not frozen: Lightning moves predict_step's outputs between devices field by field
class Completion:
    """One completion of one prompt of the prompt file."""

    line: int
    prompt: str
    sample: int
    completion: str

    def record(self) -> dict[str, Any]:
        """The JSON object written for it."""
        return {"prompt": self.prompt, "completion": self.completion, "sample": self.sample,
                "line": self.line}


class PredictionBatch(IndexedBatch[PromptLine]):
    """The ``index``-th batch of a prompt file's prompts."""

    @property
    def prompts(self) -> list[PromptLine]:
        return self.items


class PredictionBatches(BatchList[PredictionBatch]):
    """A prompt file's prompts in batches: one data loader for Lightning."""


def prediction_batches(prompts: Sequence[PromptLine], batch_size: int) -> PredictionBatches:
    """``prompts`` in batches of ``batch_size`` (the last may be smaller)."""
    return PredictionBatches([PredictionBatch(i, batch)
                              for i, batch in enumerate(in_batches(prompts, batch_size))])
