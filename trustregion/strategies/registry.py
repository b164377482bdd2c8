"""Short names for strategy classes.

Built-ins register themselves on import. A user registers a class with
``@register_strategy("name")``; a third-party package declares an entry point in the group
``trustregion.strategies`` (``name = "package.module:Class"``), loaded on the first lookup.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, TypeVar

from trustregion.strategies.base import TrustRegionStrategy

__all__ = [
    "ENTRY_POINT_GROUP",
    "available_strategies",
    "get_strategy",
    "register_strategy",
    "strategy_class",
]

ENTRY_POINT_GROUP = "trustregion.strategies"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_REGISTRY: dict[str, type[TrustRegionStrategy]] = {}
_entry_points_loaded = False

S = TypeVar("S", bound=type[TrustRegionStrategy])


def register_strategy(name: str) -> Callable[[S], S]:
    """Class decorator: make ``cls`` available as ``get_strategy(name)`` and ``trust_region: name``.

    Example:
        >>> @register_strategy("my_clip")
        ... class MyClip(TrustRegionStrategy):
        ...     def terms(self, tokens): ...
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"strategy name must be lower-case letters, digits and underscores, starting with a "
            f"letter; got {name!r}"
        )

    def decorate(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, TrustRegionStrategy)):
            raise TypeError(f"register_strategy({name!r}) decorates TrustRegionStrategy "
                            f"subclasses; got {cls!r}")
        existing = _REGISTRY.get(name)
        same = existing is not None and (existing.__module__, existing.__qualname__) == (
            cls.__module__, cls.__qualname__)
        if existing is not None and not same:
            raise ValueError(
                f"strategy name {name!r} is already taken by {existing.__module__}."
                f"{existing.__qualname__}; choose another name"
            )
        _REGISTRY[name] = cls
        cls.registered_name = name
        return cls

    return decorate


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue
        try:
            cls = ep.load()
            register_strategy(ep.name)(cls)
        except Exception as err:  # a broken plug-in must not take the built-ins down
            warnings.warn(f"could not load trust-region strategy entry point {ep.name!r} "
                          f"({ep.value}): {err}", stacklevel=2)


def available_strategies() -> list[str]:
    """Sorted names of every registered strategy (built-ins, decorated classes, entry points)."""
    _load_entry_points()
    return sorted(_REGISTRY)


def strategy_class(name: str) -> type[TrustRegionStrategy]:
    """The class registered under ``name``; unknown names raise ``ValueError`` listing the known
    names and the closest match."""
    _load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = sorted(_REGISTRY)
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown trust-region strategy {name!r}.{hint} Known strategies: {', '.join(known)}"
        ) from None


def get_strategy(name: str, **hparams: Any) -> TrustRegionStrategy:
    """Build the strategy registered under ``name`` with the given hyperparameters."""
    return strategy_class(name)(**hparams)
