"""How a strategy or a task is written in a config, a checkpoint's hyperparameters and
``hparams.yaml``: one form, read back by the CLI.

A strategy or task is either registered — ``{name: drpo, delta: 0.15, ...}`` — or named by its
import path — ``{class_path: my_pkg.MyStrategy, init_args: {...}}``. A config may also give a
bare registered name (``trust_region: drpo``). A saved spec must rebuild the run in a fresh
process, so a name is written only for the built-ins and for strategies declared as entry
points; a class registered by a user's module is written by its class path.
:func:`to_spec` writes the full form with every hyperparameter; :func:`strategy_from_spec`
and :func:`task_from_spec` read any of the three. Because ``TrustRegionModule`` stores its
strategy and task in this form, ``trustregion fit --ckpt_path ...`` rebuilds them from a
checkpoint exactly as they were configured.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, TypeVar, cast

from trustregion.strategies import (
    ENTRY_POINT_GROUP,
    TrustRegionStrategy,
    available_strategies,
    get_strategy,
    strategy_class,
)
from trustregion.tasks import TASKS, Task, get_task

__all__ = ["registered_name", "strategy_from_spec", "task_from_spec", "to_spec"]

T = TypeVar("T")


def _built_in(cls: type) -> bool:
    # every class of the package registers itself when trustregion.strategies (or .tasks) is
    # imported, which parsing a config always does
    return cls.__module__.split(".")[0] == "trustregion"


def _entry_point(name: str, cls: type) -> bool:
    """Whether the entry point ``name`` of the strategies group names ``cls``."""
    target = f"{cls.__module__}:{cls.__qualname__}"
    return any(ep.name == name and ep.value.replace(" ", "") == target
               for ep in entry_points(group=ENTRY_POINT_GROUP))


def registered_name(value: TrustRegionStrategy | Task) -> str | None:
    """The name ``value``'s class is registered under when any process can look that name up
    without importing the user's code (a built-in, or a strategy declared as an entry point),
    else None: a class registered by a module that a later run may not import is written by
    its class path."""
    cls = type(value)
    if isinstance(value, TrustRegionStrategy):
        name = type(value).registered_name
        if name not in available_strategies() or strategy_class(name) is not cls:
            return None
        return name if _built_in(cls) or _entry_point(name, cls) else None
    name = next((name for name, task in TASKS.items() if cls is task), None)
    return name if name is not None and _built_in(cls) else None


def to_spec(value: TrustRegionStrategy | Task) -> dict[str, Any]:
    """``{name: ..., **hparams}`` for a class any process finds by name (see
    :func:`registered_name`), else ``{class_path, init_args}``."""
    hparams = value.hparams()
    name = registered_name(value)
    if name is not None:
        return {"name": name, **hparams}
    cls = type(value)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": hparams}


def _import_class(path: str) -> type:
    module_name, _, name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"class_path {path!r} must be a full import path such as "
                         "'my_package.module.MyClass'")
    try:
        cls: type = getattr(importlib.import_module(module_name), name)
        return cls
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import class_path {path!r}: {err}") from err


def _from_spec(value: Any, base: type, by_name: Callable[..., T], what: str) -> T:
    """``base`` is the (abstract) class every result is an instance of."""
    if isinstance(value, base):
        return cast(T, value)
    if isinstance(value, str):
        return by_name(value)
    if isinstance(value, dict):
        settings = dict(value)
        if "class_path" in settings:
            cls = _import_class(settings.pop("class_path"))
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise ValueError(f"{cls!r} is not a {base.__name__} subclass")
            return cast(T, cls(**settings.pop("init_args", None) or {}, **settings))
        if "name" in settings:
            return by_name(settings.pop("name"), **settings)
    raise ValueError(f"a {what} is a registered name, {{name: NAME, setting: value, ...}} or "
                     f"{{class_path: PATH, init_args: {{...}}}}; got {value!r}")


def strategy_from_spec(value: Any) -> TrustRegionStrategy:
    """Build a strategy from a name, a ``{name: ...}`` or a ``{class_path: ...}`` spec (an
    instance is returned as it is)."""
    return _from_spec(value, TrustRegionStrategy, get_strategy, "strategy")


def task_from_spec(value: Any) -> Task:
    """Build a task from a name, a ``{name: ...}`` or a ``{class_path: ...}`` spec (an instance
    is returned as it is)."""
    return _from_spec(value, Task, get_task, "task")
