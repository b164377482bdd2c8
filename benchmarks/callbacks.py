"""Overhead of the monitoring callbacks on a training config.

Usage: python benchmarks/callbacks.py [--config examples/configs/quickstart.yaml]
                                      [--steps 40] [--warmup 5] [--repeats 3]

Every run logs each rollout batch to a CSVLogger in a temporary directory, as the quickstart
does. Times ``--steps`` rollout batches (after ``--warmup`` untimed ones) of the config with no
monitoring callback, with ``DriftMonitor``, and with ``DriftMonitor`` plus
``ShadowStrategies(["ratio_clip", "dppo", "spo"])``. The settings run interleaved ``--repeats``
times, each from the same seed (the callbacks draw no random numbers, so every setting trains
identically). Reported, as medians over all timed rollout batches of all repeats:

* step: wall time from ``on_train_batch_start`` to the end of the last ``on_train_batch_end``
  (rollout, update and the monitors' work);
* monitors: time spent inside the monitors' ``on_train_batch_end``, measured directly, which is
  far less noisy than a difference of step times on a busy machine; "of which log" is the part
  spent handing values to the module's step log (``StepLog.add`` for the logger row and
  ``StepLog.show`` for the progress-bar entries); the row itself is written once per rollout
  batch by the module, after the monitors, and counts in the step time;
* overhead: monitors / (step − monitors), and the difference of median step times (Δ step).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from trustregion.callbacks import DriftMonitor, ShadowStrategies
from trustregion.cli import TrustRegionCLI

SETTINGS: dict[str, Callable[[], list[L.Callback]]] = {
    "no callbacks": lambda: [],
    "DriftMonitor": lambda: [DriftMonitor()],
    "DriftMonitor + ShadowStrategies(ratio_clip, dppo, spo)":
        lambda: [DriftMonitor(), ShadowStrategies(["ratio_clip", "dppo", "spo"])],
}


class _Clock:
    """Per timed rollout batch: step wall time, time inside the monitors' ``on_train_batch_end``
    and, of that, time inside the step log's ``add`` and ``show``."""

    def __init__(self) -> None:
        self.started = 0.0
        self.inside = False
        self.step: list[float] = []
        self.monitors: list[float] = []
        self.logging: list[float] = []


class _StepStart(L.Callback):
    """First callback: starts the step clock, opens the per-step slots, and times the module's
    step log (``add`` and ``show``) while a monitor runs."""

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        step_log = pl_module.step_log  # this run's own StepLog: wrapped on the instance
        step_log.add = self._timed(step_log.add)
        step_log.show = self._timed(step_log.show)

    def _timed(self, write: Callable[..., None]) -> Callable[..., None]:
        clock = self.clock

        def timed(*args: Any, **kwargs: Any) -> None:
            start = time.perf_counter()
            write(*args, **kwargs)
            if clock.inside:
                clock.logging[-1] += time.perf_counter() - start

        return timed

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any,
                             batch_idx: int) -> None:
        self.clock.monitors.append(0.0)
        self.clock.logging.append(0.0)
        self.clock.started = time.perf_counter()


class _StepEnd(L.Callback):
    """Last callback: stops the step clock."""

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.clock.step.append(time.perf_counter() - self.clock.started)


def _timed(callback: L.Callback, clock: _Clock) -> L.Callback:
    """Add the time ``callback.on_train_batch_end`` takes to the step's monitor time."""
    hook = callback.on_train_batch_end

    def timed(*args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        clock.inside = True
        try:
            hook(*args, **kwargs)
        finally:
            clock.inside = False
        clock.monitors[-1] += time.perf_counter() - start

    callback.on_train_batch_end = timed  # type: ignore[method-assign]
    return callback


def run(config: str, callbacks: list[L.Callback], steps: int, warmup: int) -> _Clock:
    """The clock of the timed rollout batches of one run."""
    cli = TrustRegionCLI(args=["--config", config, "--trainer.logger=false",
                               "--trainer.enable_checkpointing=false",
                               "--trainer.enable_progress_bar=false",
                               "--trainer.callbacks=null"], run=False)
    module = cli.model
    steps_per_rollout = module.optimizer_steps_per_rollout
    clock = _Clock()
    monitors = [_timed(c, clock) for c in callbacks]
    with tempfile.TemporaryDirectory() as logs:
        trainer = L.Trainer(max_steps=(warmup + steps) * steps_per_rollout,
                            logger=CSVLogger(logs), enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            log_every_n_steps=1,
                            callbacks=[_StepStart(clock), *monitors, _StepEnd(clock)])
        trainer.fit(module)
    for series in (clock.step, clock.monitors, clock.logging):
        del series[:warmup]
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="examples/configs/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=40, help="timed rollout batches per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rollout batches first")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per setting")
    args = parser.parse_args()
    totals = {name: _Clock() for name in SETTINGS}
    per_run: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for repeat in range(args.repeats):
        for name, make in SETTINGS.items():
            clock = run(args.config, make(), args.steps, args.warmup)
            totals[name].step += clock.step
            totals[name].monitors += clock.monitors
            totals[name].logging += clock.logging
            per_run[name].append(statistics.median(clock.step))
            print(f"repeat {repeat + 1}/{args.repeats} {name}: median step "
                  f"{1e3 * statistics.median(clock.step):.1f} ms, monitors "
                  f"{1e3 * statistics.median(clock.monitors):.2f} ms", flush=True)
    base = statistics.median(totals["no callbacks"].step)
    print(f"\nconfig {args.config}: {args.steps} timed rollout batches (+{args.warmup} warm-up) "
          f"× {args.repeats} interleaved repeats, torch threads {torch.get_num_threads()}; "
          "medians over rollout batches, times in ms")
    print(f"{'setting':<56} {'step':>7} {'Δ step':>8} {'monitors':>9} {'of which log':>13} "
          f"{'overhead':>9}")
    for name, clock in totals.items():
        step = statistics.median(clock.step)
        monitor = statistics.median(clock.monitors)
        logging = statistics.median(clock.logging)
        print(f"{name:<56} {1e3 * step:7.1f} {100 * (step / base - 1):+7.1f}% "
              f"{1e3 * monitor:9.2f} {1e3 * logging:13.2f} "
              f"{100 * monitor / max(step - monitor, 1e-12):8.2f}%")
    print("per-run median step (ms): " + "; ".join(
        f"{name}: " + ", ".join(f"{1e3 * s:.0f}" for s in runs) for name, runs in per_run.items()))


if __name__ == "__main__":
    main()
