"""The task contract: examples with a known answer, and a verifiable reward for completions.

Every task can keep a **held-out split** for evaluation. The split is decided by the prompt's
text, not by a seed: :func:`held_out_score` maps a prompt to a fixed number in [0, 1), and a
prompt whose number is below the task's ``validation_fraction`` belongs to the validation split,
every other prompt to the training split. So a prompt is held out on every machine and in every
run, whatever seed drew it, and training never sees a held-out prompt even when the task's
prompts are few and repeat often. Drawing for a split rejects the other split's examples.
"""

from __future__ import annotations

import abc
import hashlib
import inspect
import random
from collections.abc import Sequence
from pathlib import PurePath
from typing import Any, Literal, get_args

from torch import Tensor

from trustregion.tasks.example import Example
from trustregion.tasks.rewards import RewardFn, exact_match, score
from trustregion.validation import integer_at_least, number_in, one_of

__all__ = ["MAX_DRAWS", "SPLITS", "VALIDATION_SEED", "Example", "Split", "Task",
           "held_out_score", "validation_share"]

Split = Literal["train", "validation"]
SPLITS: tuple[Split, ...] = get_args(Split)
MAX_DRAWS = 10_000
"""Draws :meth:`Task.draw` makes before it concludes that a split holds no example."""
VALIDATION_SEED = 20_250_101
"""Seed of the generator that draws :meth:`Task.validation_examples`."""


def held_out_score(prompt: str) -> float:
    """A number in [0, 1) fixed by the prompt's text (BLAKE2b of its UTF-8 bytes), the same on
    every machine, process and run; prompts scoring below a task's ``validation_fraction`` are
    held out.

    >>> held_out_score("12+7=") == held_out_score("12+7=")
    True
    """
    digest = hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def validation_share(value: object) -> float:
    """A ``validation_fraction``: a number in [0, 1); 0 holds nothing out, 1 would leave nothing
    to train on."""
    return number_in("validation_fraction", value, 0.0, 1.0, low_inclusive=True,
                     high_inclusive=False, note="0 holds no prompts out")


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    if isinstance(value, PurePath):
        return str(value)
    return value


class Task(abc.ABC):
    """A source of prompts with verifiable answers.

    Subclasses implement :meth:`sample`; they take their hyperparameters as typed ``__init__``
    arguments (so that a Lightning CLI config can build them with ``class_path`` /
    ``init_args``), validate them there and keep each one in an attribute of the same name.
    The reward is exact match of the extracted answer unless :attr:`reward_function` says
    otherwise.
    """

    name: str = "task"
    """Short name used in logs and metric keys."""

    validation_fraction: float = 0.0
    """Share of the prompt space held out for evaluation (see :func:`held_out_score`); 0 holds
    nothing out. The built-in tasks take it as an ``__init__`` argument (default 1/8)."""

    @abc.abstractmethod
    def sample(self, rng: random.Random) -> Example:
        """Draw one example of either split using only ``rng`` for randomness."""

    def split_key(self, example: Example) -> str:
        """The text whose :func:`held_out_score` decides ``example``'s split: its prompt. A task
        that writes one problem in several styles returns one text per problem, so that every
        style holds out the same problems."""
        return example.prompt

    def split_of(self, example: Example) -> Split:
        """The split ``example`` belongs to: ``"validation"`` when the
        :func:`held_out_score` of its :meth:`split_key` is below :attr:`validation_fraction`,
        else ``"train"``."""
        held_out = held_out_score(self.split_key(example)) < self.validation_fraction
        return "validation" if held_out else "train"

    def draw(self, rng: random.Random, split: Split = "train") -> Example:
        """One example of ``split``: :meth:`sample` until an example belongs to it.

        Raises:
            ValueError: ``split`` is unknown, the task holds nothing out and a validation
                example is asked for, or :data:`MAX_DRAWS` draws found no example of ``split``
                (the task's prompts are too few for its ``validation_fraction``).
        """
        one_of("split", split, SPLITS)
        if split == "validation" and self.validation_fraction <= 0:
            raise ValueError(f"{type(self).__name__} holds no prompts out for validation "
                             f"(validation_fraction={self.validation_fraction}); set "
                             "validation_fraction > 0")
        for _ in range(MAX_DRAWS):
            example = self.sample(rng)
            if self.validation_fraction <= 0 or self.split_of(example) == split:
                return example
        raise ValueError(
            f"{type(self).__name__} drew no {split} example in {MAX_DRAWS} draws: its prompts "
            f"are too few for validation_fraction={self.validation_fraction}; allow more "
            "prompts (wider value or length ranges) or change validation_fraction")

    def examples(self, n: int, seed: int = 0, split: Split = "train") -> list[Example]:
        """``n`` examples of ``split`` drawn with ``random.Random(seed)``: the same list for the
        same seed. Training batches are drawn from the ``"train"`` split."""
        integer_at_least("n", n, 0)
        rng = random.Random(seed)
        return [self.draw(rng, split) for _ in range(n)]

    def validation_examples(self, n: int) -> list[Example]:
        """``n`` held-out examples with distinct prompts, the same list on every call: the
        prompts an evaluation scores.

        Raises:
            ValueError: the validation split holds fewer than ``n`` distinct prompts.
        """
        integer_at_least("n", n, 1)
        rng = random.Random(VALIDATION_SEED)
        chosen: dict[str, Example] = {}
        repeats = 0
        while len(chosen) < n:
            example = self.draw(rng, "validation")
            if example.prompt in chosen:
                repeats += 1
                if repeats >= MAX_DRAWS:
                    raise ValueError(
                        f"{type(self).__name__}'s validation split holds only {len(chosen)} "
                        f"distinct prompts, fewer than the {n} asked for; evaluate fewer "
                        "prompts or raise validation_fraction")
                continue
            repeats = 0
            chosen[example.prompt] = example
        return list(chosen.values())

    def all_examples(self) -> Sequence[Example] | None:
        """Every training example the task can draw, when there are finitely many (a dataset);
        None for a generator. Lets training check every prompt before it starts."""
        return None

    @property
    def reward_function(self) -> RewardFn:
        """The function :meth:`reward` applies (default: :func:`~.rewards.exact_match`)."""
        return exact_match

    def reward(self, completions: Sequence[str], examples: Sequence[Example]) -> Tensor:
        """Float32 rewards ``[len(completions)]``, validated by :func:`~.rewards.score`."""
        return score(self.reward_function, completions, examples)

    def hparams(self) -> dict[str, Any]:
        """The ``__init__`` arguments this task was built with, as plain config values (tuples
        become lists, paths strings) so that they serialise to YAML/JSON."""
        params = inspect.signature(type(self).__init__).parameters
        return {
            key: _plain(getattr(self, key))
            for key, param in params.items()
            if key != "self"
            and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)
            and hasattr(self, key)
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.hparams().items())
        return f"{type(self).__name__}({args})"
