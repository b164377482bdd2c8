"""The task contract: examples with a known answer, and a verifiable reward for completions."""

from __future__ import annotations

import abc
import inspect
import random
from collections.abc import Sequence
from pathlib import PurePath
from typing import Any

from torch import Tensor

from trustregion.tasks.example import Example
from trustregion.tasks.rewards import RewardFn, exact_match, score
from trustregion.validation import integer_at_least

__all__ = ["Example", "Task"]


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

    @abc.abstractmethod
    def sample(self, rng: random.Random) -> Example:
        """Draw one example using only ``rng`` for randomness."""

    def examples(self, n: int, seed: int = 0) -> list[Example]:
        """``n`` examples drawn with ``random.Random(seed)``: the same list for the same seed."""
        integer_at_least("n", n, 0)
        rng = random.Random(seed)
        return [self.sample(rng) for _ in range(n)]

    def all_examples(self) -> Sequence[Example] | None:
        """Every example the task can draw, when there are finitely many (a dataset); None for
        a generator. Lets training check every prompt before it starts."""
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
