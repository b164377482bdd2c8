"""Built-in synthetic tasks with verifiable answers, and a registry by short name.

Each task writes its prompts in one of two styles. ``prompt_style="compact"`` (the default)
suits small character-level models trained from scratch; ``"instruction"`` suits chat models
(use it with ``chat_template=True``):

==============  ===============  =========================================================  ======
task            compact          instruction                                                answer
==============  ===============  =========================================================  ======
``arithmetic``  ``12+7=``        ``What is 12 + 7? Reply with the number only.``            ``19``
``digit_sort``  ``sort:312=``    ``Sort the digits 312 in ascending order. Reply with the   ``123``
                                 sorted digits only.``
``reverse``     ``rev:abc=``     ``Reverse the string abc. Reply with the reversed string   ``cba``
                                 only.``
==============  ===============  =========================================================  ======

Compact prompts score the answer line (:func:`~trustregion.tasks.rewards.extract_answer`)
exactly. Chat models restate the question before answering (``"12 + 7 = 19"``), so instruction
prompts score the last number, digit string or alphabet string on the answer line
(:func:`~trustregion.tasks.rewards.final_answer`). ``partial_credit=True`` scores the fraction
of correct leading characters of that answer instead of 0/1.

Each holds out ``validation_fraction`` (default 1/8) of its possible prompts for evaluation:
training batches never contain them (see :mod:`trustregion.tasks.base`). Which problems are
held out depends only on the problem (its compact prompt), so both prompt styles hold out the
same ones.
"""

from __future__ import annotations

import difflib
import random
import re
from collections.abc import Sequence
from typing import Any, Literal, get_args

from trustregion.tasks.base import Task, validation_share
from trustregion.tasks.example import Example
from trustregion.tasks.jsonl import JsonlTask
from trustregion.tasks.rewards import (
    RewardFn,
    exact_match,
    final_answer,
    prefix_credit,
    prefix_match,
)
from trustregion.validation import (
    boolean,
    integer_at_least,
    non_empty_string,
    one_of,
    require,
)

__all__ = [
    "DEFAULT_VALIDATION_FRACTION",
    "PROMPT_STYLES",
    "TASKS",
    "Arithmetic",
    "DigitSort",
    "Reverse",
    "available_tasks",
    "get_task",
]

OPERATIONS: tuple[str, ...] = ("+", "-", "*")
PromptStyle = Literal["compact", "instruction"]
PROMPT_STYLES: tuple[PromptStyle, ...] = get_args(PromptStyle)
DEFAULT_VALIDATION_FRACTION = 0.125
"""Share of a built-in task's prompts held out for evaluation unless set otherwise."""



def _ordered_pair(low_name: str, low: object, high_name: str, high: object, minimum: int
                  ) -> tuple[int, int]:
    """Two integer bounds, each ``≥ minimum``, the second at least the first."""
    first = integer_at_least(low_name, low, minimum)
    second = integer_at_least(high_name, high, minimum)
    require(second >= first, f"{high_name} must be ≥ {low_name}; got {low_name}={first}, "
                             f"{high_name}={second}")
    return first, second


class _AnswerTask(Task):
    """Shared prompt styles and reward choice of the built-in tasks."""

    partial_credit: bool = False
    prompt_style: PromptStyle = "compact"

    @property
    def answer_pattern(self) -> str:
        """Regular expression of an answer, for :func:`final_answer` (instruction style)."""
        raise NotImplementedError

    @property
    def reward_function(self) -> RewardFn:
        if self.prompt_style == "instruction":
            return self.final_answer_reward
        return prefix_match if self.partial_credit else exact_match

    def final_answer_reward(self, completions: list[str], examples: list[Example]
                            ) -> list[float]:
        """Score the last match of :attr:`answer_pattern` on each completion's answer line:
        1.0 if it equals the answer (or its :func:`prefix_credit` with ``partial_credit``)."""
        answers = [final_answer(completion, self.answer_pattern) for completion in completions]
        if self.partial_credit:
            return [prefix_credit(got, ex.answer) for got, ex in zip(answers, examples,
                                                                        strict=True)]
        return [float(got == ex.answer) for got, ex in zip(answers, examples, strict=True)]


class Arithmetic(_AnswerTask):
    """Integer arithmetic on two operands: ``"12+7="`` → ``"19"``.

    Args:
        min_value: smallest operand (≥ 0).
        max_value: largest operand (≥ ``min_value``).
        operations: operators to draw from, uniformly; any of ``+``, ``-``, ``*``. Subtraction
            may give negative answers (``"3-5="`` → ``"-2"``).
        partial_credit: reward the fraction of correct leading characters instead of 0/1.
        prompt_style: ``"compact"`` (``12+7=``) or ``"instruction"`` (``What is 12 + 7? Reply
            with the number only.``, scored on the last integer of the answer line).
        validation_fraction: share of the possible prompts held out for evaluation, in [0, 1).
    """

    name = "arithmetic"
    answer_pattern = r"-?\d+"

    def __init__(
        self,
        min_value: int = 0,
        max_value: int = 20,
        operations: Sequence[str] = ("+", "-"),
        partial_credit: bool = False,
        prompt_style: PromptStyle = "compact",
        validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    ) -> None:
        self.min_value, self.max_value = _ordered_pair("min_value", min_value,
                                                       "max_value", max_value, 0)
        if isinstance(operations, str):
            operations = tuple(operations)
        ops = tuple(operations)
        require(bool(ops), f"operations must name at least one of {', '.join(OPERATIONS)}")
        unknown = [op for op in ops if op not in OPERATIONS]
        require(not unknown, f"unknown operation(s) {', '.join(map(repr, unknown))}; allowed: "
                             f"{', '.join(map(repr, OPERATIONS))}")
        require(len(set(ops)) == len(ops), f"operations must not repeat; got {ops!r}")
        self.operations = ops
        self.partial_credit = boolean("partial_credit", partial_credit)
        self.prompt_style = one_of("prompt_style", prompt_style, PROMPT_STYLES)
        self.validation_fraction = validation_share(validation_fraction)

    def sample(self, rng: random.Random) -> Example:
        a = rng.randint(self.min_value, self.max_value)
        b = rng.randint(self.min_value, self.max_value)
        op = rng.choice(self.operations)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        prompt = (f"{a}{op}{b}=" if self.prompt_style == "compact"
                  else f"What is {a} {op} {b}? Reply with the number only.")
        return Example(prompt=prompt, answer=str(value), meta={"a": a, "b": b, "op": op})

    def split_key(self, example: Example) -> str:
        """The compact prompt, whatever the style."""
        meta = example.meta
        return f"{meta['a']}{meta['op']}{meta['b']}="


class DigitSort(_AnswerTask):
    """Sort a string of digits ascending: ``"sort:312="`` → ``"123"``.

    Args:
        min_len: fewest digits (≥ 1).
        max_len: most digits (≥ ``min_len``); digits are drawn independently, so they may
            repeat.
        partial_credit: reward the fraction of correct leading characters instead of 0/1.
        prompt_style: ``"compact"`` (``sort:312=``) or ``"instruction"`` (``Sort the digits 312
            in ascending order. Reply with the sorted digits only.``, scored on the last digit
            string of the answer line).
        validation_fraction: share of the possible prompts held out for evaluation, in [0, 1).
    """

    name = "digit_sort"
    answer_pattern = r"\d+"

    def __init__(self, min_len: int = 3, max_len: int = 5, partial_credit: bool = False,
                 prompt_style: PromptStyle = "compact",
                 validation_fraction: float = DEFAULT_VALIDATION_FRACTION) -> None:
        self.min_len, self.max_len = _ordered_pair("min_len", min_len, "max_len", max_len, 1)
        self.partial_credit = boolean("partial_credit", partial_credit)
        self.prompt_style = one_of("prompt_style", prompt_style, PROMPT_STYLES)
        self.validation_fraction = validation_share(validation_fraction)

    def sample(self, rng: random.Random) -> Example:
        length = rng.randint(self.min_len, self.max_len)
        digits = "".join(rng.choice("0123456789") for _ in range(length))
        prompt = (f"sort:{digits}=" if self.prompt_style == "compact" else
                  f"Sort the digits {digits} in ascending order. Reply with the sorted digits "
                  "only.")
        return Example(prompt=prompt, answer="".join(sorted(digits)))

    def split_key(self, example: Example) -> str:
        """The compact prompt, whatever the style."""
        match = re.search(r"\d+", example.prompt)
        return f"sort:{match.group() if match else example.prompt}="


class Reverse(_AnswerTask):
    """Reverse a string: ``"rev:abc="`` → ``"cba"``.

    Args:
        min_len: shortest string (≥ 1).
        max_len: longest string (≥ ``min_len``).
        alphabet: distinct characters to draw from; no whitespace and no ``=``.
        partial_credit: reward the fraction of correct leading characters instead of 0/1.
        prompt_style: ``"compact"`` (``rev:abc=``) or ``"instruction"`` (``Reverse the string
            abc. Reply with the reversed string only.``, scored on the last run of alphabet
            characters on the answer line).
        validation_fraction: share of the possible prompts held out for evaluation, in [0, 1).
    """

    name = "reverse"

    def __init__(
        self,
        min_len: int = 3,
        max_len: int = 5,
        alphabet: str = "abcde",
        partial_credit: bool = False,
        prompt_style: PromptStyle = "compact",
        validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    ) -> None:
        self.min_len, self.max_len = _ordered_pair("min_len", min_len, "max_len", max_len, 1)
        self.alphabet = non_empty_string("alphabet", alphabet)
        bad = sorted({ch for ch in alphabet if ch.isspace() or ch == "="})
        require(not bad, f"alphabet must not contain whitespace or '='; got {alphabet!r} "
                         f"containing {', '.join(map(repr, bad))}")
        require(len(set(alphabet)) == len(alphabet),
                f"alphabet characters must be distinct; got {alphabet!r}")
        self.partial_credit = boolean("partial_credit", partial_credit)
        self.prompt_style = one_of("prompt_style", prompt_style, PROMPT_STYLES)
        self.validation_fraction = validation_share(validation_fraction)

    @property
    def answer_pattern(self) -> str:
        return f"[{re.escape(self.alphabet)}]+"

    def sample(self, rng: random.Random) -> Example:
        length = rng.randint(self.min_len, self.max_len)
        text = "".join(rng.choice(self.alphabet) for _ in range(length))
        prompt = (f"rev:{text}=" if self.prompt_style == "compact" else
                  f"Reverse the string {text}. Reply with the reversed string only.")
        return Example(prompt=prompt, answer=text[::-1])

    def split_key(self, example: Example) -> str:
        """The compact prompt, whatever the style."""
        return f"rev:{example.answer[::-1]}="


TASKS: dict[str, type[Task]] = {
    "arithmetic": Arithmetic,
    "digit_sort": DigitSort,
    "reverse": Reverse,
    "jsonl": JsonlTask,
}
"""Short name → task class."""


def available_tasks() -> list[str]:
    """Sorted short names accepted by :func:`get_task`."""
    return sorted(TASKS)


def get_task(name: str, **kwargs: Any) -> Task:
    """Build the task registered under ``name`` with the given hyperparameters.

    >>> get_task("arithmetic", max_value=9).sample(random.Random(0)).prompt
    '6+6='
    """
    try:
        cls = TASKS[name]
    except (KeyError, TypeError):
        known = available_tasks()
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown task {name!r}.{hint} Known tasks: {', '.join(known)}") from None
    return cls(**kwargs)
