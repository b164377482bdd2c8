"""Argument checks for ``__init__`` methods, with messages that say what was given and what is
allowed.

Every check raises ``ValueError`` and returns the value it accepted, so that a constructor
validates and stores in one line::

    self.min_len = integer_at_least("min_len", min_len, 1)
    # min_len=0 → ValueError: min_len must be an integer ≥ 1; got 0

Messages read ``<name> must be <what is allowed>; got <value>``. Booleans are refused where a
number is expected (``True`` is an ``int`` to Python, never a count or a width to a user).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, TypeVar, overload

__all__ = [
    "boolean",
    "integer_at_least",
    "non_empty_string",
    "number_in",
    "one_of",
    "require",
]

T = TypeVar("T")


def require(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition`` holds.

    >>> require(0.2 > 0, "delta must be > 0; got 0.2")
    """
    if not condition:
        raise ValueError(message)


def _note(note: str) -> str:
    return f" ({note})" if note else ""


def integer_at_least(name: str, value: object, minimum: int, *, note: str = "") -> int:
    """``value`` if it is an integer (not a bool) ``≥ minimum``.

    ``note`` says what the number means and is shown in parentheses after the rule:

    >>> integer_at_least("warmup_steps", 0, 0, note="0: no warm-up")
    0
    >>> integer_at_least("group_size", 1.5, 2)
    Traceback (most recent call last):
    ValueError: group_size must be an integer ≥ 2; got 1.5
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}{_note(note)}; got {value!r}")
    return value


@overload
def number_in(name: str, value: object, low: float, high: float = ..., *,
              low_inclusive: bool = ..., high_inclusive: bool = ...,
              optional: Literal[False] = ..., note: str = ...) -> float: ...


@overload
def number_in(name: str, value: object, low: float, high: float = ..., *,
              low_inclusive: bool = ..., high_inclusive: bool = ..., optional: bool,
              note: str = ...) -> float | None: ...


def number_in(name: str, value: object, low: float, high: float = math.inf, *,
              low_inclusive: bool = False, high_inclusive: bool = True,
              optional: bool = False, note: str = "") -> float | None:
    """``value`` if it is a finite number (not a bool, NaN or ±inf) in the interval from ``low``
    to ``high``; each end is open unless ``low_inclusive`` / ``high_inclusive`` (an infinite
    end is always open). ``optional``: None is accepted too, and returned.

    >>> number_in("min_ess", 0.5, 0.0, 1.0)
    0.5
    >>> number_in("lr_factor", 1.0, 0.0, 1.0, high_inclusive=False)
    Traceback (most recent call last):
    ValueError: lr_factor must be a finite number in (0.0, 1.0); got 1.0
    >>> number_in("max_kl", -1, 0.0, optional=True)
    Traceback (most recent call last):
    ValueError: max_kl must be a finite number in (0.0, inf), or None; got -1
    """
    if value is None and optional:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        above = value >= low if low_inclusive else value > low
        below = value <= high if high_inclusive else value < high
        if above and below:
            return value
    opening = "[" if low_inclusive and math.isfinite(low) else "("
    closing = "]" if high_inclusive and math.isfinite(high) else ")"
    none = ", or None" if optional else ""
    raise ValueError(f"{name} must be a finite number in {opening}{low}, {high}{closing}{none}"
                     f"{_note(note)}; got {value!r}")


def one_of(name: str, value: object, allowed: Sequence[T], *, note: str = "") -> T:
    """The member of ``allowed`` equal to ``value``; ``note`` as for :func:`integer_at_least`.

    >>> one_of("prompt_style", "chat", ("compact", "instruction"))
    Traceback (most recent call last):
    ValueError: prompt_style must be one of 'compact', 'instruction'; got 'chat'
    """
    for candidate in allowed:
        # True == 1 to Python; a bool only matches a bool
        if isinstance(value, bool) == isinstance(candidate, bool) and value == candidate:
            return candidate
    raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}{_note(note)}; "
                     f"got {value!r}")


def boolean(name: str, value: object) -> bool:
    """``value`` if it is ``True`` or ``False`` (not 0, 1 or a string such as ``"yes"``).

    >>> boolean("partial_credit", "yes")
    Traceback (most recent call last):
    ValueError: partial_credit must be True or False; got 'yes'
    """
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False; got {value!r}")
    return value


def non_empty_string(name: str, value: object) -> str:
    """``value`` if it is a string of at least one character.

    >>> non_empty_string("prompt_key", "")
    Traceback (most recent call last):
    ValueError: prompt_key must be a non-empty string; got ''
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string; got {value!r}")
    return value
