"""The one naming rule for trust-region widths and caps, and the checks that enforce it.

Every strategy whose region has two sides takes a symmetric value and two one-sided overrides:
``epsilon`` / ``epsilon_low`` / ``epsilon_high`` (half-widths of the ratio r = π/ν) or ``delta`` /
``delta_low`` / ``delta_high`` (half-widths of the probability shift π − ν).

* ``None`` always means *not set here: inherit*. A side left at None takes the symmetric value
  (DPPO's ``delta`` left at None takes its divergence's default).
* ``math.inf`` (YAML ``.inf``) always means *no bound*: an infinite half-width or cap never binds.
* A cap on the ratio says which ratio it caps (``dual_clip_cap``, ``importance_weight_cap``).
* A finite width that no token can ever reach is refused, not silently ignored: the lower
  half-width of a ratio (always > 0) must be < 1, a half-width of a total-variation distance
  (at most 1) must be < 1. Write inf to say *no bound* on that side. (Widening a region with
  :meth:`~trustregion.strategies.base.TrustRegionStrategy.scale_width` may pass these limits:
  that is the region opening up, as asked.)

The full list of names is in ``docs/glossary.md``.
"""

from __future__ import annotations

import math

from trustregion.validation import require

__all__ = ["check_cap", "check_inherited_width", "check_width", "is_number",
           "resolve_side"]


def is_number(value: object) -> bool:
    """A real number (int or float, not bool), not NaN; inf is a number."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and not math.isnan(value))


def check_width(name: str, value: object, *, meaning: str, positive: bool = False,
                inherits: str | None = None, below: float | None = None) -> None:
    """``value`` must be a number ≥ 0 (> 0 with ``positive``), and < ``below`` when given, or
    inf for no bound, or — only when ``inherits`` names the setting it falls back to — None.

    Example:
        >>> check_width("epsilon_low", None, meaning="lower half-width", inherits="epsilon")
        >>> check_width("eps", 1.5, meaning="a ratio bound", below=1.0)
        Traceback (most recent call last):
        ValueError: eps must be a number ≥ 0 and < 1, or inf for no bound (a ratio bound); got 1.5
    """
    if value is None and inherits is not None:
        return
    valid = is_number(value) and (value > 0 if positive else value >= 0)  # type: ignore[operator]
    if valid and below is not None:
        valid = not math.isfinite(value) or value < below  # type: ignore[arg-type,operator]
    requirement = "> 0" if positive else "a number ≥ 0"
    if below is not None:
        requirement += f" and < {below:g}"
    inherit = f", or None to inherit {inherits}" if inherits is not None else ""
    require(valid, f"{name} must be {requirement}, or inf for no bound{inherit} ({meaning}); "
                   f"got {value!r}")


def check_inherited_width(name: str, value: float, side: str, side_value: object, *,
                          below: float, meaning: str) -> None:
    """Refuse a symmetric width ``name`` that the one-sided ``side``, left at None, would inherit
    when it is finite and ≥ ``below`` (a bound that side could never reach); ``value`` has
    already passed :func:`check_width`.

    Example:
        >>> check_inherited_width("epsilon", 0.2, "epsilon_low", None, below=1.0, meaning="...")
    """
    if side_value is None and math.isfinite(value) and value >= below:
        raise ValueError(
            f"{name}={value!r} is inherited by {side} (None), which must be < {below:g}, or inf "
            f"for no bound ({meaning}); set {side} on its own, or give {name} a value < "
            f"{below:g}")


def check_cap(name: str, value: object, *, minimum: float, meaning: str, off: str) -> None:
    """A cap on a ratio: a number > ``minimum``, or inf to turn it off (None is refused: a cap
    has nothing to inherit)."""
    valid = is_number(value) and value > minimum  # type: ignore[operator]
    require(valid, f"{name} must be > {minimum:g}, or inf {off} ({meaning}); got {value!r}")


def resolve_side(symmetric: float, side: float | None) -> float:
    """The half-width of one side: its own value if set, else the symmetric one."""
    return symmetric if side is None else side
