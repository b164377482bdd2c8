"""Reward functions: answer extraction, exact-match scoring, loading by import path, validation.

A reward function takes the completions and the examples they answer and returns one float per
completion (a sequence or a 1-D tensor)::

    def my_reward(completions: list[str], examples: list[Example]) -> list[float]: ...

:func:`score` calls one and checks what it returned, so that a faulty reward function fails
loudly and by name instead of corrupting a training run. :func:`load_reward_fn` resolves
``"package.module:function"`` (or ``"package.module.function"``) to the function.

End of an answer: a completion is read up to its first *end marker*, a newline or the literal
``<eos>`` (:data:`END_MARKERS`), so ``"19\\nbecause..."`` and ``"19<eos><pad>"`` both answer
``"19"``. Leading whitespace is skipped first and surrounding whitespace is stripped, see
:func:`extract_answer`. Chat models tend to restate the question before the answer
(``"12 + 7 = 19"``); :func:`final_answer` takes the last match of a pattern on that line.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import torch
from torch import Tensor

from trustregion.tasks.example import Example

__all__ = [
    "END_MARKERS",
    "RewardFn",
    "exact_match",
    "extract_answer",
    "final_answer",
    "load_reward_fn",
    "prefix_credit",
    "prefix_match",
    "qualified_name",
    "score",
]

RewardFn: TypeAlias = Callable[[list[str], list[Example]], "Sequence[float] | Tensor"]
"""``fn(completions, examples) -> one reward per completion``."""

END_MARKERS: tuple[str, ...] = ("\n", "<eos>")
"""Text that ends an answer: a newline, or the end-of-sequence token written out as text."""


def extract_answer(completion: str, end_markers: Sequence[str] = END_MARKERS) -> str:
    """The answer a completion gives: skip leading whitespace, cut at the first end marker, strip.

    >>> extract_answer(" 19\\n20")
    '19'
    >>> extract_answer("19<eos><pad>")
    '19'
    """
    text = completion.lstrip()
    cut = len(text)
    for marker in end_markers:
        index = text.find(marker)
        if index != -1:
            cut = min(cut, index)
    return text[:cut].strip()


def final_answer(completion: str, pattern: str) -> str:
    """The last match of the regular expression ``pattern`` in the completion's answer line
    (:func:`extract_answer`), or ``""`` if there is none: what a chat model that writes its
    working on one line ends with.

    >>> final_answer("12 + 7 = 19.", r"-?\\d+")
    '19'
    >>> final_answer("I think it is 3\\nor 4", r"-?\\d+")
    '3'
    """
    matches = re.findall(pattern, extract_answer(completion))
    return str(matches[-1]) if matches else ""


def prefix_credit(prediction: str, answer: str) -> float:
    """Fraction of leading characters that are right: ``matched / max(len(prediction),
    len(answer))``.

    1.0 exactly when ``prediction == answer``; extra or missing characters both cost credit.
    """
    longest = max(len(prediction), len(answer))
    if longest == 0:
        return 1.0
    matched = 0
    for got, want in zip(prediction, answer, strict=False):
        if got != want:
            break
        matched += 1
    return matched / longest


def exact_match(completions: list[str], examples: list[Example]) -> list[float]:
    """1.0 where the extracted answer equals ``example.answer`` exactly, else 0.0."""
    return [
        1.0 if extract_answer(completion) == example.answer else 0.0
        for completion, example in zip(completions, examples, strict=True)
    ]


def prefix_match(completions: list[str], examples: list[Example]) -> list[float]:
    """Partial credit: :func:`prefix_credit` of the extracted answer against ``example.answer``."""
    return [
        prefix_credit(extract_answer(completion), example.answer)
        for completion, example in zip(completions, examples, strict=True)
    ]


def qualified_name(fn: Any) -> str:
    """``module.QualifiedName`` of a function, method, partial or callable object."""
    if isinstance(fn, functools.partial):
        return f"functools.partial({qualified_name(fn.func)})"
    qualname = getattr(fn, "__qualname__", None)
    module = getattr(fn, "__module__", None)
    if not isinstance(qualname, str):  # a callable instance: name its class
        qualname = type(fn).__qualname__
        module = type(fn).__module__
    return f"{module}.{qualname}" if module else qualname


def score(fn: RewardFn, completions: Sequence[str], examples: Sequence[Example]) -> Tensor:
    """Call the reward function ``fn`` and return its rewards as a float32 tensor ``[N]``.

    Raises:
        ValueError: ``completions`` and ``examples`` differ in length; ``fn`` returned a shape
            other than ``(N,)``; ``fn`` returned NaN or infinite rewards.
        TypeError: ``fn`` returned something that is not numbers.
        RuntimeError: ``fn`` raised; the original exception is the cause.
    """
    completions = list(completions)
    examples = list(examples)
    if len(completions) != len(examples):
        raise ValueError(
            f"got {len(completions)} completions but {len(examples)} examples; each completion "
            f"needs the example it answers"
        )
    name = qualified_name(fn)
    try:
        result = fn(completions, examples)
    except Exception as err:
        raise RuntimeError(f"reward function {name} raised {type(err).__name__}: {err}") from err

    if isinstance(result, Tensor):
        rewards = result.detach()
    elif isinstance(result, (str, bytes)) or result is None:
        raise TypeError(
            f"reward function {name} returned {type(result).__name__}; expected a sequence of "
            f"{len(completions)} numbers or a 1-D tensor"
        )
    else:
        try:
            rewards = torch.as_tensor(result, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"reward function {name} returned {type(result).__name__} that is not a sequence "
                f"of numbers ({err}); expected {len(completions)} numbers or a 1-D tensor"
            ) from err
    expected = (len(completions),)
    if tuple(rewards.shape) != expected:
        raise ValueError(
            f"reward function {name} returned shape {tuple(rewards.shape)}; expected shape "
            f"{expected}, one reward per completion"
        )
    rewards = rewards.to(torch.float32)
    bad = int((~torch.isfinite(rewards)).sum())
    if bad:
        raise ValueError(
            f"reward function {name} returned {bad} non-finite value(s) (NaN or inf) among "
            f"{len(completions)} rewards; rewards must be finite"
        )
    return rewards


def _split_import_path(path: str) -> tuple[str, str]:
    form = "use 'package.module:function' or 'package.module.function'"
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
    else:
        module_name, _, attr_path = path.rpartition(".")
    parts = [*module_name.split("."), *attr_path.split(".")]
    if not module_name or not attr_path or not all(part.isidentifier() for part in parts):
        raise ValueError(f"malformed reward function path {path!r}; {form}")
    return module_name, attr_path


def load_reward_fn(path: str) -> RewardFn:
    """Import the reward function named by ``"package.module:function"`` or
    ``"package.module.function"`` (the colon form also reaches nested attributes,
    ``"package.module:Class.method"``).

    Raises:
        ValueError: the path is malformed.
        ImportError: the module cannot be found or fails to import.
        AttributeError: the module has no such attribute.
        TypeError: the attribute is not callable.
    """
    if not isinstance(path, str):
        raise TypeError(f"reward function path must be a string; got {type(path).__name__}")
    path = path.strip()
    module_name, attr_path = _split_import_path(path)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise ImportError(
                f"cannot load reward function {path!r}: module {module_name!r} not found "
                f"(is it installed, or on sys.path / PYTHONPATH?)"
            ) from err
        raise ImportError(
            f"cannot load reward function {path!r}: importing module {module_name!r} failed: "
            f"{err}"
        ) from err
    except Exception as err:
        raise ImportError(
            f"cannot load reward function {path!r}: importing module {module_name!r} failed: "
            f"{type(err).__name__}: {err}"
        ) from err
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise AttributeError(
                f"cannot load reward function {path!r}: module {module_name!r} has no attribute "
                f"{attr_path!r}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(
            f"reward function {path!r} is a {type(obj).__name__}, not a callable; it must be "
            f"fn(completions: list[str], examples: list[Example]) -> list[float]"
        )
    return obj
