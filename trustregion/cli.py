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

import argparse
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jsonargparse.typing import register_type
from lightning.pytorch.cli import LightningCLI

from trustregion.module import TrustRegionModule
from trustregion.specs import strategy_from_spec, task_from_spec, to_spec
from trustregion.strategies import DRPO, TrustRegionStrategy, available_strategies, strategy_class
from trustregion.tasks import Arithmetic, Task

__all__ = ["TrustRegionCLI", "main", "plot_command"]


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


def plot_command(args: Sequence[str]) -> None:
    """``trustregion plot RUN_DIR``: draw a run's charts (:func:`trustregion.plots.render_run`)
    and print their paths; exits with status 2 on a bad path and 1 when nothing is drawn."""
    parser = argparse.ArgumentParser(
        prog="trustregion plot",
        description="Draw a run's charts (reward.png, drift.png and, when the DriftPlots "
                    "callback saved token samples, weight_vs_shift.png) into the plots/ folder "
                    "beside its metrics.csv.",
        epilog="RUN_DIR is a run directory (e.g. runs/quickstart: its latest "
               "csv/version_N is used), a version directory or a metrics.csv file.")
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path,
                        help="run directory, version directory or metrics.csv")
    options = parser.parse_args(list(args))
    from trustregion.plots import render_run  # matplotlib only when plotting

    try:
        paths = render_run(options.run_dir)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    if not paths:
        parser.exit(1, f"trustregion plot: nothing to draw in {options.run_dir}\n")
    for path in paths:
        print(path)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``trustregion`` command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["strategies"]:
        print(describe_strategies())
        return
    if args[:1] == ["plot"]:
        plot_command(args[1:])
        return
    TrustRegionCLI(args=None if argv is None else args)


if __name__ == "__main__":
    main()
