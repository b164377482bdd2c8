"""The argument checks: what each accepts, returns, and the exact message of each refusal."""

from __future__ import annotations

import doctest
import math
from typing import Any

import pytest

from trustregion import validation
from trustregion.strategies import base as strategy_base
from trustregion.validation import (
    boolean,
    integer_at_least,
    non_empty_string,
    number_in,
    one_of,
    require,
)


def _message(check: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ValueError) as info:
        check(*args, **kwargs)
    return str(info.value)


def test_the_docstring_examples_hold() -> None:
    result = doctest.testmod(validation, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 8 and result.failed == 0


def test_require() -> None:
    assert require(True, "never shown") is None
    assert _message(require, False, "delta must be > 0; got 0") == "delta must be > 0; got 0"


def test_the_strategies_share_the_same_require() -> None:
    assert strategy_base.require is require


def test_integer_at_least_returns_what_it_accepts() -> None:
    assert integer_at_least("n", 0, 0) == 0
    assert integer_at_least("group_size", 8, 2) == 8


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "batch_size must be an integer ≥ 1; got 0"),
        (-3, "batch_size must be an integer ≥ 1; got -3"),
        (2.0, "batch_size must be an integer ≥ 1; got 2.0"),
        ("4", "batch_size must be an integer ≥ 1; got '4'"),
        (None, "batch_size must be an integer ≥ 1; got None"),
        (True, "batch_size must be an integer ≥ 1; got True"),  # a bool is not a count
    ],
)
def test_integer_at_least_refuses(value: Any, message: str) -> None:
    assert _message(integer_at_least, "batch_size", value, 1) == message


def test_integer_at_least_refuses_false_even_at_minimum_zero() -> None:
    assert (_message(integer_at_least, "warmup_steps", False, 0, note="0: no warm-up")
            == "warmup_steps must be an integer ≥ 0 (0: no warm-up); got False")


@pytest.mark.parametrize(
    ("value", "kwargs"),
    [
        (0.5, {"low": 0.0, "high": 1.0}),
        (1.0, {"low": 0.0, "high": 1.0}),  # high end closed by default
        (0.0, {"low": 0.0, "low_inclusive": True}),
        (3, {"low": 1.0}),  # an int is a number
        (1e300, {"low": 0.0}),
    ],
)
def test_number_in_returns_what_it_accepts(value: float, kwargs: dict[str, Any]) -> None:
    assert number_in("x", value, **kwargs) == value


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        # open low end by default, open upper end at infinity
        (0.0, {"low": 0.0}, "max_kl must be a finite number in (0.0, inf); got 0.0"),
        (-1, {"low": 0.0}, "max_kl must be a finite number in (0.0, inf); got -1"),
        (1.5, {"low": 0.0, "high": 1.0}, "max_kl must be a finite number in (0.0, 1.0]; got 1.5"),
        (1.0, {"low": 0.0, "high": 1.0, "high_inclusive": False},
         "max_kl must be a finite number in (0.0, 1.0); got 1.0"),
        (-0.1, {"low": 0.0, "high": 1.0, "low_inclusive": True},
         "max_kl must be a finite number in [0.0, 1.0]; got -0.1"),
        (math.nan, {"low": 0.0}, "max_kl must be a finite number in (0.0, inf); got nan"),
        (math.inf, {"low": 0.0}, "max_kl must be a finite number in (0.0, inf); got inf"),
        (True, {"low": 0.0}, "max_kl must be a finite number in (0.0, inf); got True"),
        ("0.1", {"low": 0.0}, "max_kl must be a finite number in (0.0, inf); got '0.1'"),
        (None, {"low": 0.0}, "max_kl must be a finite number in (0.0, inf); got None"),
        (0.0, {"low": 0.0, "optional": True},
         "max_kl must be a finite number in (0.0, inf), or None; got 0.0"),
        (2.0, {"low": 0.0, "high": 1.0, "note": "a fraction of the tokens"},
         "max_kl must be a finite number in (0.0, 1.0] (a fraction of the tokens); got 2.0"),
    ],
)
def test_number_in_refuses(value: Any, kwargs: dict[str, Any], message: str) -> None:
    assert _message(number_in, "max_kl", value, **kwargs) == message


def test_number_in_accepts_none_only_when_optional() -> None:
    assert number_in("max_kl", None, 0.0, optional=True) is None
    with pytest.raises(ValueError, match="got None"):
        number_in("max_kl", None, 0.0)


def test_one_of_returns_the_allowed_value() -> None:
    assert one_of("prompt_style", "instruction", ("compact", "instruction")) == "instruction"
    assert one_of("anchor", "old", ["behavior", "old"]) == "old"


@pytest.mark.parametrize(
    ("value", "allowed", "message"),
    [
        ("chat", ("compact", "instruction"),
         "prompt_style must be one of 'compact', 'instruction'; got 'chat'"),
        (None, ("compact",), "prompt_style must be one of 'compact'; got None"),
        (True, (1, 2), "prompt_style must be one of 1, 2; got True"),  # True == 1 to Python
        (1, (True, False), "prompt_style must be one of True, False; got 1"),
    ],
)
def test_one_of_refuses(value: Any, allowed: tuple[Any, ...], message: str) -> None:
    assert _message(one_of, "prompt_style", value, allowed) == message


def test_one_of_with_a_note() -> None:
    assert (_message(one_of, "anchor", "new", ("behavior", "old"),
                     note="the policy the trust region is measured against")
            == "anchor must be one of 'behavior', 'old' (the policy the trust region is "
               "measured against); got 'new'")


def test_boolean() -> None:
    assert boolean("partial_credit", True) is True
    assert boolean("partial_credit", False) is False
    for value, shown in (("yes", "'yes'"), (1, "1"), (0, "0"), (None, "None")):
        assert (_message(boolean, "partial_credit", value)
                == f"partial_credit must be True or False; got {shown}")


def test_non_empty_string() -> None:
    assert non_empty_string("prompt_key", "q") == "q"
    assert non_empty_string("alphabet", " ") == " "  # one character, even a space
    for value, shown in (("", "''"), (None, "None"), (3, "3"), (["a"], "['a']")):
        assert (_message(non_empty_string, "prompt_key", value)
                == f"prompt_key must be a non-empty string; got {shown}")
