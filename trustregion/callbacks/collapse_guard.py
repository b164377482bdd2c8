"""Watch the signs that precede a training collapse and act before it reaches the weights.

Every RL iteration (one ``training_step`` of :class:`~trustregion.module.TrustRegionModule`) the
guard computes (:mod:`~trustregion.callbacks.collapse_signals`), from the update records of the
step's :class:`~trustregion.interface.StepOutput`, over all masked tokens of all micro-batch
updates on every rank, with r = π/μ the policy-to-behaviour ratio:

- ``kl``, the mismatch KL (k3 estimate, mean of 1/r − 1 + log r): fires above ``max_kl``, or
  above ``kl_spike_factor`` × its running mean;
- ``ess``, the effective-sample-size fraction (Σr)² / (N Σr²) ∈ (0, 1]: fires below ``min_ess``;
- ``entropy``, the mean policy entropy at the sampled positions: fires below ``min_entropy`` or
  above ``max_entropy``;
- ``nonfinite`` (always watched): a non-finite ``train/loss`` or ``train/grad_norm``, an
  optimiser step the module skipped for a non-finite gradient, a non-finite signal, or a
  non-finite policy or behaviour weight.

The KL is the k3 estimator with x = log μ − log π: k3 = eˣ − x − 1 = 1/r − 1 + log r ≥ 0, the same
per-token drift measure as ``DriftMonitor``'s ``drift/behavior/kl_k3``, so a threshold can be read
off that chart (the tokens were sampled from μ, so it is a drift measure, not an unbiased estimate
of KL(π‖μ)).

When a sign fires, the guard takes its ``action``:

- ``warn``: a warning naming the signal, its value and its threshold;
- ``skip``: undo this iteration: the module's ``training_state()`` (policy and behaviour
  weights, optimiser and scheduler state, the behaviour-sync counter) goes back to an in-memory
  copy taken in ``on_train_batch_start`` (:mod:`~trustregion.callbacks.snapshots`), so the
  iteration's updates never reach the weights;
- ``lower_lr``: multiply the learning rate (every optimiser param group and every scheduler's
  ``base_lrs``) by ``lr_factor``, never below ``min_lr``;
- ``stop``: ask the trainer to stop (``trainer.should_stop = True``);
- ``rollback``: restore the **last known-good state**, an in-memory snapshot of the same objects
  as ``skip``, taken when training starts and refreshed after every ``snapshot_every`` healthy
  iterations.

**A non-finite value never reaches the weights or a checkpoint.** A non-finite sign always undoes
the iteration, whatever the action (``rollback`` goes back to the last known-good snapshot, every
other action first restores the pre-iteration copy and then does what it says; a warning is
always raised). The restore happens in ``on_train_batch_end``, and Lightning runs every
``ModelCheckpoint`` after all other callbacks, so a checkpoint written at that step already holds
the restored weights. As a last line, the guard refuses any checkpoint save while a policy or
behaviour weight is non-finite (``on_save_checkpoint`` raises). So the last known-good state
extends to disk: every checkpoint written while the guard runs holds finite weights, and after a
``stop`` (or a crash) the latest one is a safe place to resume from.

Costs: the pre-iteration copy (every action but ``rollback``) and the last-good snapshot
(``rollback`` only) each hold the policy and behaviour weights plus the optimiser state (for AdamW
twice the policy's size). Pass ``snapshot_device="cpu"`` to keep them in host memory. The
non-finite weight check reads every policy weight once per iteration. Prompt positions and the
trainer's step counter are not rolled back: a skipped iteration still counts towards
``max_steps``. Snapshots are not saved in checkpoints; the counters and the KL running mean are.

Example:
    >>> guard = CollapseGuard(max_kl=0.05, min_ess=0.5, action="skip")
    >>> # L.Trainer(callbacks=[guard, ModelCheckpoint(...)])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, get_args

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from trustregion.callbacks.collapse_signals import signal_sums, signals_from_sums
from trustregion.callbacks.snapshots import TrainingSnapshot, nonfinite_weights
from trustregion.interface import StepOutput, TrainingModule, training_module
from trustregion.validation import integer_at_least, number_in

__all__ = ["ACTIONS", "CollapseGuard", "GuardAction"]

GuardAction = Literal["warn", "skip", "lower_lr", "stop", "rollback"]
ACTIONS: tuple[str, ...] = get_args(GuardAction)

_NONFINITE_METRICS = ("train/loss", "train/grad_norm")
_SKIPPED_METRIC = "train/skipped_steps"


# ------------------------------------------------------------------------------- the callback


class CollapseGuard(L.Callback):
    """Detect the signs that precede collapse (mismatch-KL spike, ESS drop, entropy collapse or
    explosion, non-finite values) and warn, skip the iteration, lower the learning rate, stop or
    roll back. See the module docstring for the signals and the guarantees.

    Args:
        max_kl: ceiling on the iteration's mean mismatch KL (k3); None: not watched.
        kl_spike_factor: fire when the KL exceeds this multiple (> 1) of its running mean; None:
            not watched.
        min_spike_kl: a spike also needs the KL to exceed this absolute value, so that numerical
            noise around zero (on-policy steps) is never called a spike.
        ema_decay: decay of the KL running mean (an exponential moving average over healthy
            iterations, started at the first value).
        warmup_steps: healthy iterations averaged before spikes are watched.
        min_ess: floor on the effective-sample-size fraction of r = π/μ, in (0, 1].
        min_entropy: floor on the mean policy entropy (nats).
        max_entropy: ceiling on the mean policy entropy (nats).
        action: ``"warn"``, ``"skip"``, ``"lower_lr"``, ``"stop"`` or ``"rollback"``.
        lr_factor: learning-rate multiplier of ``lower_lr``, in (0, 1).
        min_lr: ``lower_lr`` never goes below this (and never raises a rate already below it).
        snapshot_every: healthy iterations between refreshes of the ``rollback`` snapshot.
        snapshot_device: where snapshots live; None keeps them beside the weights, ``"cpu"``
            saves accelerator memory at the cost of a copy each way.

    Attributes:
        fired_count: iterations in which the guard fired.
        fired_by_signal: firings per sign (``max_kl``, ``kl_spike``, ``min_ess``,
            ``min_entropy``, ``max_entropy``, ``nonfinite``).
        kl_ema: running mean of the mismatch KL over healthy iterations (None before any).

    Logs ``guard/fired`` (1 or 0 this iteration), ``guard/kl``, ``guard/ess`` and
    ``guard/entropy``.
    """

    def __init__(
        self,
        max_kl: float | None = None,
        kl_spike_factor: float | None = None,
        min_spike_kl: float = 1e-4,
        ema_decay: float = 0.9,
        warmup_steps: int = 5,
        min_ess: float | None = None,
        min_entropy: float | None = None,
        max_entropy: float | None = None,
        action: GuardAction = "skip",
        lr_factor: float = 0.5,
        min_lr: float = 0.0,
        snapshot_every: int = 10,
        snapshot_device: str | None = None,
    ) -> None:
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; allowed: {ACTIONS}")
        number_in("max_kl", max_kl, 0.0, optional=True)
        number_in("kl_spike_factor", kl_spike_factor, 1.0, optional=True)
        number_in("min_spike_kl", min_spike_kl, 0.0, low_inclusive=True)
        number_in("ema_decay", ema_decay, 0.0, 1.0, low_inclusive=True,
                     high_inclusive=False)
        number_in("min_ess", min_ess, 0.0, 1.0, optional=True)
        number_in("min_entropy", min_entropy, 0.0, low_inclusive=True, optional=True)
        number_in("max_entropy", max_entropy, 0.0, optional=True)
        if min_entropy is not None and max_entropy is not None and min_entropy >= max_entropy:
            raise ValueError(f"min_entropy ({min_entropy}) must be below max_entropy "
                             f"({max_entropy})")
        number_in("lr_factor", lr_factor, 0.0, 1.0, high_inclusive=False)
        number_in("min_lr", min_lr, 0.0, low_inclusive=True)
        integer_at_least("warmup_steps", warmup_steps, 0)
        integer_at_least("snapshot_every", snapshot_every, 1)
        self.max_kl = max_kl
        self.kl_spike_factor = kl_spike_factor
        self.min_spike_kl = min_spike_kl
        self.ema_decay = ema_decay
        self.warmup_steps = warmup_steps
        self.min_ess = min_ess
        self.min_entropy = min_entropy
        self.max_entropy = max_entropy
        self.action: GuardAction = action
        self.lr_factor = lr_factor
        self.min_lr = min_lr
        self.snapshot_every = snapshot_every
        self.snapshot_device = snapshot_device

        self.fired_count = 0
        self.fired_by_signal: dict[str, int] = {}
        self.kl_ema: float | None = None
        self.kl_ema_count = 0
        self._pre_iteration: TrainingSnapshot | None = None
        self._last_good: TrainingSnapshot | None = None
        self._healthy_since_snapshot = 0

    @property
    def state_key(self) -> str:
        """Distinguishes guards by action and by which signs they watch (not by threshold
        values, so a threshold can be tuned on resume without losing the counters)."""
        watched = [name for name in ("max_kl", "kl_spike_factor", "min_ess", "min_entropy",
                                     "max_entropy") if getattr(self, name) is not None]
        return f"{type(self).__qualname__}{{'action': {self.action!r}, 'watched': {watched}}}"

    # ---------------------------------------------------------------------------- checks
    def check(self, signals: Mapping[str, float]) -> list[tuple[str, str]]:
        """The thresholds ``signals`` cross, as (sign name, message); pure, no side effects."""
        fired: list[tuple[str, str]] = []
        kl, ess, entropy = signals.get("kl"), signals.get("ess"), signals.get("entropy")
        if kl is not None and self.max_kl is not None and kl > self.max_kl:
            fired.append(("max_kl", f"mismatch KL {kl:.4g} > max_kl {self.max_kl:.4g}"))
        if (kl is not None and self.kl_spike_factor is not None and self.kl_ema is not None
                and self.kl_ema_count >= self.warmup_steps and kl > self.min_spike_kl
                and kl > self.kl_spike_factor * self.kl_ema):
            fired.append(("kl_spike", f"mismatch KL {kl:.4g} > kl_spike_factor "
                                      f"{self.kl_spike_factor:g} × running mean "
                                      f"{self.kl_ema:.4g} = "
                                      f"{self.kl_spike_factor * self.kl_ema:.4g}"))
        if ess is not None and self.min_ess is not None and ess < self.min_ess:
            fired.append(("min_ess", f"ESS fraction {ess:.4g} < min_ess {self.min_ess:.4g}"))
        if entropy is not None and self.min_entropy is not None and entropy < self.min_entropy:
            fired.append(("min_entropy",
                          f"entropy {entropy:.4g} < min_entropy {self.min_entropy:.4g}"))
        if entropy is not None and self.max_entropy is not None and entropy > self.max_entropy:
            fired.append(("max_entropy",
                          f"entropy {entropy:.4g} > max_entropy {self.max_entropy:.4g}"))
        return fired

    def _nonfinite(self, metrics: Mapping[str, Any], module: TrainingModule,
                   signals: Mapping[str, float]) -> list[str]:
        reasons = []
        for key in _NONFINITE_METRICS:
            if key in metrics and not math.isfinite(float(metrics[key])):
                reasons.append(f"{key} = {float(metrics[key])}")
        if _SKIPPED_METRIC in metrics and float(metrics[_SKIPPED_METRIC]) > 0:
            reasons.append(f"{float(metrics[_SKIPPED_METRIC]):g} optimiser step(s) skipped for "
                           "a non-finite gradient")
        reasons += [f"guard/{k} = {v}" for k, v in signals.items() if not math.isfinite(v)]
        bad = nonfinite_weights(module)
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            reasons.append(f"non-finite weights in {', '.join(bad[:3])}{more}")
        return reasons

    # ----------------------------------------------------------------------------- hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        training_module(pl_module, "CollapseGuard")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._healthy_since_snapshot = 0
        if self.action == "rollback":
            self._last_good = TrainingSnapshot.capture(training_module(pl_module, "CollapseGuard"),
                                                       self.snapshot_device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self.action != "rollback":  # rollback restores the last good state instead
            self._pre_iteration = TrainingSnapshot.capture(
                training_module(pl_module, "CollapseGuard"), self.snapshot_device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        module = training_module(pl_module, "CollapseGuard")
        step = StepOutput.of(outputs)
        updates = step.updates if step is not None else ()
        sums = trainer.strategy.reduce(signal_sums(updates, pl_module.device), reduce_op="sum")
        signals = signals_from_sums(sums)
        fired = self.check(signals)
        nonfinite = self._nonfinite(step.metrics if step is not None else {}, module, signals)
        any_nonfinite = trainer.strategy.reduce_boolean_decision(bool(nonfinite), all=False)
        if any_nonfinite:
            fired.append(("nonfinite", "non-finite values: "
                          + ("; ".join(nonfinite) or "on another process")))
        if fired:
            self._act(trainer, module, fired, restore=any_nonfinite)
        else:
            self._healthy(module, signals)
        self._pre_iteration = None
        logged = {"guard/fired": float(bool(fired)),
                  **{f"guard/{k}": v for k, v in signals.items()}}
        module.step_log.add(logged, write=module.step_log.logging_batch(batch_idx))

    def _act(self, trainer: L.Trainer, module: TrainingModule,
             fired: list[tuple[str, str]], restore: bool) -> None:
        self.fired_count += 1
        for name, _ in fired:
            self.fired_by_signal[name] = self.fired_by_signal.get(name, 0) + 1
        done = []
        if self.action == "rollback":
            assert self._last_good is not None, "rollback needs the snapshot from on_train_start"
            self._last_good.restore(module, keep=True)
            self._healthy_since_snapshot = 0
            done.append("rolled back to the last known-good state")
        elif restore or self.action == "skip":
            assert self._pre_iteration is not None
            self._pre_iteration.restore(module, keep=False)
            done.append("undid this iteration's update")
        if self.action == "lower_lr":
            done.append(self._lower_lr(trainer))
        if self.action == "stop":
            trainer.should_stop = True
            done.append("stopping training")
        message = (f"CollapseGuard fired at global step {trainer.global_step}: "
                   + "; ".join(text for _, text in fired)
                   + f". Action {self.action!r}: " + ("; ".join(done) or "none") + ".")
        if self.action == "warn" or restore:
            rank_zero_warn(message)
        else:
            rank_zero_info(message)

    def _healthy(self, module: TrainingModule, signals: Mapping[str, float]) -> None:
        kl = signals.get("kl")
        if kl is not None:
            self.kl_ema = kl if self.kl_ema is None else (
                self.ema_decay * self.kl_ema + (1 - self.ema_decay) * kl)
            self.kl_ema_count += 1
        if self.action == "rollback":
            self._healthy_since_snapshot += 1
            if self._healthy_since_snapshot >= self.snapshot_every:
                self._last_good = TrainingSnapshot.capture(module, self.snapshot_device)
                self._healthy_since_snapshot = 0

    def _lowered(self, lr: float) -> float:
        return min(lr, max(lr * self.lr_factor, self.min_lr))

    def _lower_lr(self, trainer: L.Trainer) -> str:
        before = after = math.nan
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                before = group["lr"]
                group["lr"] = after = self._lowered(group["lr"])
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [self._lowered(float(lr)) for lr in scheduler.base_lrs]
        return f"learning rate {before:.4g} → {after:.4g}"

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        bad = nonfinite_weights(training_module(pl_module, "CollapseGuard"))
        if bad:
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise RuntimeError(
                "CollapseGuard refused to save a checkpoint: non-finite values (NaN or inf) in "
                f"{', '.join(bad[:5])}{more}. Resume from the last checkpoint on disk, which "
                "holds finite weights.")

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"fired_count": self.fired_count, "fired_by_signal": dict(self.fired_by_signal),
                "kl_ema": self.kl_ema, "kl_ema_count": self.kl_ema_count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.fired_count = int(state_dict["fired_count"])
        self.fired_by_signal = dict(state_dict["fired_by_signal"])
        self.kl_ema = state_dict["kl_ema"]
        self.kl_ema_count = int(state_dict["kl_ema_count"])
