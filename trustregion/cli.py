"""The ``trustregion`` command.

* ``trustregion fit --config FILE.yaml`` — train (Lightning CLI: ``--print_config`` shows every
  resolved setting, including the strategy's hyperparameters).
* ``trustregion strategies`` — the registered strategies with their settings and defaults.
* ``trustregion plot RUN_DIR`` — draw a finished run's charts from its logs
  (:mod:`trustregion.plots`).

In a config, a strategy or a task is given as a registered name (``trust_region: drpo``), as a
name with settings (``trust_region: {name: drpo, delta: 0.1}``) or as a class path
(``trust_region: {class_path: my_pkg.MyStrategy, init_args: {...}}``).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from jsonargparse.typing import register_type
from lightning.pytorch.cli import LightningCLI

from trustregion.module import TrustRegionModule
from trustregion.strategies import (
    DRPO,
    TrustRegionStrategy,
    available_strategies,
    strategy_class,
)
from trustregion.tasks import TASKS, Arithmetic, Task, get_task

__all__ = ["TrustRegionCLI", "main"]

T = TypeVar("T")


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


def _config_type(base: type[T], by_name: Callable[..., T], name_of: Callable[[T], str | None],
                 what: str) -> tuple[Callable[[T], Any], Callable[[Any], T]]:
    """(serialiser, deserialiser) so a config can name a ``base`` by short name or class path."""

    def serialise(value: T) -> Any:
        name = name_of(value)
        hparams = value.hparams()  # type: ignore[attr-defined]
        if name is not None:
            return {"name": name, **hparams}
        cls = type(value)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": hparams}

    def deserialise(value: Any) -> T:
        if isinstance(value, base):
            return value
        if isinstance(value, str):
            return by_name(value)
        if isinstance(value, dict):
            settings = dict(value)
            if "class_path" in settings:
                cls = _import_class(settings.pop("class_path"))
                if not (isinstance(cls, type) and issubclass(cls, base)):
                    raise ValueError(f"{cls!r} is not a {base.__name__} subclass")
                return cls(**settings.pop("init_args", {}), **settings)
            if "name" in settings:
                return by_name(settings.pop("name"), **settings)
        raise ValueError(f"a {what} is a registered name, {{name: NAME, setting: value, ...}} or "
                         f"{{class_path: PATH, init_args: {{...}}}}; got {value!r}")

    return serialise, deserialise


def _strategy_name(strategy: TrustRegionStrategy) -> str | None:
    name = type(strategy).registered_name
    if name is not None and strategy_class(name) is type(strategy):
        return name
    return None


def _task_name(task: Task) -> str | None:
    for name, cls in TASKS.items():
        if type(task) is cls:
            return name
    return None


def _by_strategy_name(name: str, **hparams: Any) -> TrustRegionStrategy:
    return strategy_class(name)(**hparams)


_STRATEGY_BASE: type = TrustRegionStrategy  # abstract: registered for parsing, never built
_TASK_BASE: type = Task
register_type(_STRATEGY_BASE,
              *_config_type(_STRATEGY_BASE, _by_strategy_name, _strategy_name, "strategy"))
register_type(_TASK_BASE, *_config_type(_TASK_BASE, get_task, _task_name, "task"))


class TrustRegionCLI(LightningCLI):
    """Lightning CLI for :class:`~trustregion.module.TrustRegionModule`."""

    def __init__(self, args: Sequence[str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(TrustRegionModule, args=list(args) if args is not None else None,
                         **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        # Show the module's actual defaults rather than null in --print_config.
        parser.set_defaults({"model.trust_region": DRPO(), "model.task": Arithmetic()})


def describe_strategies() -> str:
    """A table of the registered strategies: name, class and ``__init__`` defaults."""
    lines = []
    for name in available_strategies():
        cls = strategy_class(name)
        params = [
            f"{p.name}={p.default!r}"
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.name != "self" and p.default is not inspect.Parameter.empty
        ]
        summary = (inspect.getdoc(cls) or "").splitlines()[0]
        lines.append(f"{name:<16}{cls.__module__}.{cls.__qualname__}\n"
                     f"{'':<16}{summary}\n{'':<16}{', '.join(params)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``trustregion`` command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["strategies"]:
        print(describe_strategies())
        return
    if args[:1] == ["plot"]:
        from trustregion.plots import plot_command  # matplotlib only when plotting

        plot_command(args[1:])
        return
    TrustRegionCLI(args=None if argv is None else args)


if __name__ == "__main__":
    main()
