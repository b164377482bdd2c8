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

import inspect
import sys
from collections.abc import Sequence
from typing import Any

from jsonargparse.typing import register_type
from lightning.pytorch.cli import LightningCLI

from trustregion.module import TrustRegionModule
from trustregion.specs import strategy_from_spec, task_from_spec, to_spec
from trustregion.strategies import DRPO, TrustRegionStrategy, available_strategies, strategy_class
from trustregion.tasks import Arithmetic, Task

__all__ = ["TrustRegionCLI", "main"]


_STRATEGY_BASE: type = TrustRegionStrategy  # abstract: registered for parsing, never built
_TASK_BASE: type = Task
register_type(_STRATEGY_BASE, to_spec, strategy_from_spec)
register_type(_TASK_BASE, to_spec, task_from_spec)


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
