"""Draw a run's charts while it trains: reward, drift and the gradient weight per token."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from trustregion.callbacks.controller import current_widths
from trustregion.functional.drift import prob_shift
from trustregion.interface import StepOutput, UpdateRecord, training_module
from trustregion.plots.charts import (
    plot_drift_panel,
    plot_reward,
    plot_weight_vs_shift,
    weight_chart_title,
)
from trustregion.plots.monitors import plot_monitors
from trustregion.plots.runs import (
    TOKEN_SAMPLE_COLUMNS,
    join_versions,
    load_metrics,
    version_history,
    write_token_samples,
)
from trustregion.strategies.base import TrustRegionStrategy

__all__ = ["DriftPlots"]


class DriftPlots(L.Callback):
    """Keep a uniform sample of the tokens the strategy saw and draw PNG charts of the run.

    Every RL iteration, the sampled (masked-in) tokens of every update in the step's
    :class:`~trustregion.interface.StepOutput` (its ``updates``) feed a reservoir sample of at
    most ``max_tokens`` rows (Algorithm R, seeded), so every token of the run has the same
    chance to be kept:

    ======== ===================================================================
    step     the RL iteration (the logger's ``step``)
    delta    Δ = π − μ = μ · expm1(log π − log μ) (:func:`~trustregion.functional.prob_shift`)
    weight   the strategy's gradient weight w of the token
    adv_sign sign of the token's advantage Â (−1, 0 or 1)
    mu       μ, the probability the behaviour policy gave the sampled token
    ======== ===================================================================

    Δ is measured against μ for every strategy, including one anchored on π_old.

    At the end of training, and every ``every_n_steps`` RL iterations if set, it writes
    ``token_samples.csv``, ``reward.png``, ``drift.png``, ``monitors.png`` (when shadow, guard
    or controller keys were logged) and ``weight_vs_shift.png`` (see :mod:`trustregion.plots`)
    to ``<log_dir>/plots/``, where ``log_dir`` is the first logger's directory, or
    ``trainer.default_root_dir`` without a logger. The charts over time are drawn from a
    ``CSVLogger``'s ``metrics.csv`` when the trainer has one (every logged key, including a
    drift monitor's; for a resumed run, joined with the earlier versions' files, see
    :func:`~trustregion.plots.join_versions`), else from the metrics the module logged. A
    chart drawn during training covers the iterations logged so far, up to the one before. The
    weight chart's title names the strategy with the widths it has now (a width controller
    may have moved them) and the ones it started with. Only global rank zero samples and draws
    (its own tokens). The sample, the counters and the random state are part of the
    callback's checkpoint state, so a resumed run continues them.

    ``trustregion plot RUN_DIR`` redraws the charts from the files afterwards.

    Args:
        max_tokens: size of the token reservoir.
        every_n_steps: also draw every this many RL iterations (None: only at the end).
        seed: seed of the reservoir's random choices.
    """

    def __init__(self, max_tokens: int = 20_000, every_n_steps: int | None = None,
                 seed: int = 0) -> None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer ≥ 1; got {max_tokens!r}")
        if every_n_steps is not None and (isinstance(every_n_steps, bool)
                                          or not isinstance(every_n_steps, int)
                                          or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be None or an integer ≥ 1; "
                             f"got {every_n_steps!r}")
        self.max_tokens = max_tokens
        self.every_n_steps = every_n_steps
        self.seed = seed
        self.sample: dict[str, Tensor] = {key: torch.empty(0, dtype=torch.float64)
                                     for key in TOKEN_SAMPLE_COLUMNS}
        self.tokens_seen = 0
        self.iterations = 0
        self.history: list[tuple[int, dict[str, float]]] = []
        self.configured: TrustRegionStrategy | None = None
        self._generator = torch.Generator().manual_seed(seed)

    # ------------------------------------------------------------------------- sampling
    def add_tokens(self, rows: dict[str, Tensor]) -> None:
        """Feed tokens (equal-length 1-D CPU tensors, one per column) to the reservoir."""
        count = len(rows["delta"])
        filled = len(self.sample["delta"])
        fill = min(self.max_tokens - filled, count)
        if fill > 0:
            self.sample = {key: torch.cat([self.sample[key], rows[key][:fill].double()])
                           for key in TOKEN_SAMPLE_COLUMNS}
        rest = count - fill
        if rest > 0:
            # token i (0-based over the run) replaces a uniform slot j ∈ [0, i] when j < k;
            # when several new tokens pick one slot, the last of them wins, as in sequence
            seen = self.tokens_seen + fill + torch.arange(rest, dtype=torch.float64)
            draw = torch.rand(rest, generator=self._generator, dtype=torch.float64)
            slots = (draw * (seen + 1)).long()
            chosen = slots < self.max_tokens
            source = torch.full((self.max_tokens,), -1, dtype=torch.long).scatter_reduce(
                0, slots[chosen], torch.arange(rest)[chosen] + fill, reduce="amax")
            hit = source >= 0
            for key in TOKEN_SAMPLE_COLUMNS:
                self.sample[key][hit] = rows[key][source[hit]].double()
        self.tokens_seen += count

    @staticmethod
    def token_rows(updates: Sequence[UpdateRecord], step: int) -> dict[str, Tensor]:
        """The masked-in tokens of ``UpdateRecord``s as columns (see the class docstring)."""
        parts: dict[str, list[Tensor]] = {key: [] for key in TOKEN_SAMPLE_COLUMNS}
        for record in updates:
            batch, output = record.batch, record.output
            mask = batch.bool_mask()
            logp = batch.logp.detach()[mask].double()
            behavior_logp = batch.behavior_logp.detach()[mask].double()
            mu = behavior_logp.exp()
            parts["delta"].append(prob_shift(logp, behavior_logp).cpu())
            parts["weight"].append(output.weight.detach()[mask].double().cpu())
            parts["adv_sign"].append(batch.token_advantages()[mask].sign().double().cpu())
            parts["mu"].append(mu.cpu())
            parts["step"].append(torch.full((int(mask.sum()),), float(step),
                                            dtype=torch.float64))
        return {key: torch.cat(values) if values else torch.empty(0, dtype=torch.float64)
                for key, values in parts.items()}

    # ---------------------------------------------------------------------------- hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # before a checkpoint is restored: the strategy with the widths it was configured with
        self.configured = copy.deepcopy(training_module(pl_module, "DriftPlots").strategy)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.iterations
        self.iterations += 1
        if not trainer.is_global_zero:
            return
        output = StepOutput.of(outputs)
        if output is not None and output.updates:
            self.add_tokens(self.token_rows(list(output.updates), step))
        logged = {key: float(value) for key, value in trainer.callback_metrics.items()
                  if isinstance(value, Tensor) and value.numel() == 1}
        self.history.append((step, logged))
        if self.every_n_steps is not None and self.iterations % self.every_n_steps == 0:
            self.render(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            paths = self.render(trainer)
            if paths:
                rank_zero_info(f"DriftPlots: charts written to {paths[0].parent}")

    # -------------------------------------------------------------------------- drawing
    @staticmethod
    def plot_dir(trainer: L.Trainer) -> Path:
        """``<first logger's log_dir>/plots``, or ``<default_root_dir>/plots``."""
        for logger in trainer.loggers[:1]:
            directory = logger.log_dir or logger.save_dir
            if directory:
                return Path(directory) / "plots"
        return Path(trainer.default_root_dir) / "plots"

    def metrics(self, trainer: L.Trainer) -> dict[str, list[tuple[int, float]]]:
        """Logged metrics by key: a CSVLogger's file when there is one, else the history of
        the metrics logged during each iteration."""
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.save()
                path = Path(logger.log_dir) / "metrics.csv"
                if path.is_file():
                    return join_versions([load_metrics(p) for p in version_history(path)])
        series: dict[str, list[tuple[int, float]]] = {}
        for step, logged in self.history:
            for key, value in logged.items():
                series.setdefault(key, []).append((step, value))
        return series

    def write_samples(self, path: Path) -> Path:
        """Write the reservoir as CSV, rows ordered by step (see
        :func:`~trustregion.plots.write_token_samples`)."""
        return write_token_samples({key: value.double().numpy()
                                    for key, value in self.sample.items()}, path)

    def title(self, trainer: L.Trainer) -> str:
        """The weight chart's title: the strategy as configured, with its current widths."""
        strategy = training_module(trainer.lightning_module, "DriftPlots").strategy
        return weight_chart_title(self.configured or strategy, current_widths(strategy))

    def render(self, trainer: L.Trainer) -> list[Path]:
        """Write the token sample and every chart the data allows; returns the paths."""
        out = self.plot_dir(trainer)
        metrics = self.metrics(trainer)
        samples = {key: value.double().numpy() for key, value in self.sample.items()}
        written = [self.write_samples(out / "token_samples.csv"),
                   plot_reward(metrics, out / "reward.png"),
                   plot_drift_panel(metrics, out / "drift.png"),
                   plot_monitors(metrics, out / "monitors.png"),
                   plot_weight_vs_shift(samples, out / "weight_vs_shift.png",
                                        self.title(trainer))]
        return [path for path in written if path is not None]

    # ---------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"sample": {key: value.clone() for key, value in self.sample.items()},
                "tokens_seen": self.tokens_seen, "iterations": self.iterations,
                "history": [(step, dict(logged)) for step, logged in self.history],
                "generator": self._generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sample = {key: state_dict["sample"][key].clone() for key in TOKEN_SAMPLE_COLUMNS}
        self.tokens_seen = int(state_dict["tokens_seen"])
        self.iterations = int(state_dict["iterations"])
        self.history = [(int(step), dict(logged)) for step, logged in state_dict["history"]]
        self._generator.set_state(state_dict["generator"])
