"""Watch the signs that precede a training collapse and act before it reaches the weights.

Every RL iteration (one ``training_step`` of :class:`~trustregion.module.TrustRegionModule`) the
guard computes, from the per-token records the step returns (``outputs["updates"]``), over all
masked tokens of all micro-batch updates, with r = π/μ the policy-to-behaviour ratio:

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
- ``skip``: undo this iteration: policy and behaviour weights, optimiser and scheduler state (and
  the module's behaviour-sync counter) go back to in-memory copies taken in
  ``on_train_batch_start``, so the iteration's updates never reach the weights;
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from trustregion.functional.divergences import kl_estimate
from trustregion.functional.masked import masked_count, masked_sum
from trustregion.functional.ratios import importance_ratio
from trustregion.step_logging import log_step_values, writes_logs

if TYPE_CHECKING:
    from trustregion.module import UpdateRecord

__all__ = ["ACTIONS", "CollapseGuard", "GuardAction", "collapse_signals", "signal_sums"]

GuardAction = Literal["warn", "skip", "lower_lr", "stop", "rollback"]
ACTIONS: tuple[str, ...] = get_args(GuardAction)

_MODELS = ("policy", "behavior")
"""Attributes of the module whose weights are copied and restored."""
_COUNTERS = ("steps_since_sync",)
"""Attributes of the module restored with the weights (the behaviour-sync counter)."""
_NONFINITE_METRICS = ("train/loss", "train/grad_norm")
_SKIPPED_METRIC = "train/skipped_steps"


# ------------------------------------------------------------------------------- the signals
def signal_sums(records: Sequence[UpdateRecord], device: torch.device | None = None) -> Tensor:
    """Sums over the masked tokens of ``records``, float32 ``[6]``:
    ``[N, Σ k3, Σ r, Σ r², N_entropy, Σ entropy]`` with r = π/μ and k3 = 1/r − 1 + log r.

    Sums (not means) so that ranks and micro-batches combine by adding.
    """
    total = torch.zeros(6, dtype=torch.float32, device=device)
    for record in records:
        batch = record.batch
        mask = batch.bool_mask()
        ratio = importance_ratio(batch.logp, batch.behavior_logp)
        k3 = kl_estimate(batch.logp, batch.behavior_logp, "k3")
        count = masked_count(mask)
        parts = [count, masked_sum(k3, mask), masked_sum(ratio, mask),
                 masked_sum(ratio * ratio, mask)]
        if batch.entropy is not None:
            parts += [count, masked_sum(batch.entropy, mask)]
        else:
            parts += [count.new_zeros(()), count.new_zeros(())]
        total = total + torch.stack([p.float() for p in parts]).to(total.device)
    return total


def signals_from_sums(sums: Tensor) -> dict[str, float]:
    """``kl``, ``ess`` and ``entropy`` from :func:`signal_sums`; a signal without tokens is left
    out."""
    n, kl_sum, r_sum, r2_sum, n_entropy, entropy_sum = (float(v) for v in sums.tolist())
    signals: dict[str, float] = {}
    if n > 0:
        signals["kl"] = kl_sum / n
        signals["ess"] = r_sum * r_sum / (n * r2_sum) if r2_sum > 0 else math.nan
    if n_entropy > 0:
        signals["entropy"] = entropy_sum / n_entropy
    return signals


def collapse_signals(records: Sequence[UpdateRecord]) -> dict[str, float]:
    """The guard's signals for one iteration's update records (one process)."""
    return signals_from_sums(signal_sums(records))


# ------------------------------------------------------------------------------- snapshots
def _copied(value: Any, device: torch.device | str | None) -> Any:
    """A deep copy of a (nested) state dict; tensors cloned, optionally onto ``device``."""
    if isinstance(value, Tensor):
        value = value.detach()
        return value.clone() if device is None else value.to(device, copy=True)
    if isinstance(value, Mapping):
        return {k: _copied(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_copied(v, device) for v in value)
    return value


def _named_tensors(model: torch.nn.Module) -> dict[str, Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _optimizers(pl_module: L.LightningModule) -> list[torch.optim.Optimizer]:
    return _as_list(pl_module.optimizers(use_pl_optimizer=False))


def _schedulers(pl_module: L.LightningModule) -> list[Any]:
    return _as_list(pl_module.lr_schedulers())


def _nonfinite_weights(pl_module: L.LightningModule) -> list[str]:
    """Names of the policy and behaviour tensors holding NaN or inf."""
    names, flags = [], []
    for attr in _MODELS:
        model = getattr(pl_module, attr, None)
        if isinstance(model, torch.nn.Module):
            for name, tensor in _named_tensors(model).items():
                if tensor.is_floating_point():
                    names.append(f"{attr}.{name}")
                    flags.append(torch.isfinite(tensor).all())
    if not flags:
        return []
    finite = torch.stack(flags).tolist()  # one host synchronisation
    return [name for name, ok in zip(names, finite, strict=True) if not ok]


@dataclass
class _Snapshot:
    models: dict[str, dict[str, Tensor]]
    optimizers: list[dict[str, Any]]
    schedulers: list[dict[str, Any]]
    counters: dict[str, Any]

    @classmethod
    def capture(cls, pl_module: L.LightningModule, device: torch.device | str | None
                ) -> _Snapshot:
        models = {}
        for attr in _MODELS:
            model = getattr(pl_module, attr, None)
            if isinstance(model, torch.nn.Module):
                models[attr] = _copied(_named_tensors(model), device)
        return cls(
            models=models,
            optimizers=[_copied(o.state_dict(), device) for o in _optimizers(pl_module)],
            schedulers=[_copied(s.state_dict(), device) for s in _schedulers(pl_module)
                        if hasattr(s, "state_dict")],
            counters={c: getattr(pl_module, c) for c in _COUNTERS if hasattr(pl_module, c)},
        )

    def restore(self, pl_module: L.LightningModule, keep: bool) -> None:
        """Copy the snapshot back; ``keep`` leaves it intact for a later restore (the optimiser
        would otherwise adopt its tensors and update them in place)."""
        with torch.no_grad():
            for attr, saved in self.models.items():
                tensors = _named_tensors(getattr(pl_module, attr))
                for name, value in saved.items():
                    tensors[name].copy_(value)
        for optimizer, state in zip(_optimizers(pl_module), self.optimizers, strict=True):
            optimizer.load_state_dict(_copied(state, None) if keep else state)
        schedulers = [s for s in _schedulers(pl_module) if hasattr(s, "state_dict")]
        for scheduler, state in zip(schedulers, self.schedulers, strict=True):
            scheduler.load_state_dict(_copied(state, None) if keep else state)
        for name, value in self.counters.items():
            setattr(pl_module, name, value)


# ------------------------------------------------------------------------------- the callback
def _check_range(name: str, value: float | None, *, low: float, high: float = math.inf,
                 low_inclusive: bool = False, high_inclusive: bool = True,
                 optional: bool = True) -> None:
    if value is None and optional:
        return
    ok = (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
          and (value >= low if low_inclusive else value > low)
          and (value <= high if high_inclusive else value < high))
    if not ok:
        lo = "[" if low_inclusive else "("
        hi = "]" if high_inclusive and math.isfinite(high) else ")"
        none = " (or None to not watch it)" if optional else ""
        raise ValueError(f"{name} must be a finite number in {lo}{low}, {high}{hi}{none}; "
                         f"got {value!r}")


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
        _check_range("max_kl", max_kl, low=0.0)
        _check_range("kl_spike_factor", kl_spike_factor, low=1.0)
        _check_range("min_spike_kl", min_spike_kl, low=0.0, low_inclusive=True, optional=False)
        _check_range("ema_decay", ema_decay, low=0.0, high=1.0, low_inclusive=True,
                     high_inclusive=False, optional=False)
        _check_range("min_ess", min_ess, low=0.0, high=1.0)
        _check_range("min_entropy", min_entropy, low=0.0, low_inclusive=True)
        _check_range("max_entropy", max_entropy, low=0.0)
        if min_entropy is not None and max_entropy is not None and min_entropy >= max_entropy:
            raise ValueError(f"min_entropy ({min_entropy}) must be below max_entropy "
                             f"({max_entropy})")
        _check_range("lr_factor", lr_factor, low=0.0, high=1.0, high_inclusive=False,
                     optional=False)
        _check_range("min_lr", min_lr, low=0.0, low_inclusive=True, optional=False)
        for name, count, low in (("warmup_steps", warmup_steps, 0),
                                 ("snapshot_every", snapshot_every, 1)):
            if isinstance(count, bool) or not isinstance(count, int) or count < low:
                raise ValueError(f"{name} must be an integer ≥ {low}; got {count!r}")
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
        self._pre_iteration: _Snapshot | None = None
        self._last_good: _Snapshot | None = None
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

    def _nonfinite(self, trainer: L.Trainer, pl_module: L.LightningModule,
                   signals: Mapping[str, float]) -> list[str]:
        reasons = []
        metrics = trainer.callback_metrics
        for key in _NONFINITE_METRICS:
            if key in metrics and not math.isfinite(float(metrics[key])):
                reasons.append(f"{key} = {float(metrics[key])}")
        if _SKIPPED_METRIC in metrics and float(metrics[_SKIPPED_METRIC]) > 0:
            reasons.append(f"{float(metrics[_SKIPPED_METRIC]):g} optimiser step(s) skipped for "
                           "a non-finite gradient")
        reasons += [f"guard/{k} = {v}" for k, v in signals.items() if not math.isfinite(v)]
        bad = _nonfinite_weights(pl_module)
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            reasons.append(f"non-finite weights in {', '.join(bad[:3])}{more}")
        return reasons

    # ----------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._healthy_since_snapshot = 0
        if self.action == "rollback":
            self._last_good = _Snapshot.capture(pl_module, self.snapshot_device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self.action != "rollback":  # rollback restores the last good state instead
            self._pre_iteration = _Snapshot.capture(pl_module, self.snapshot_device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        updates = outputs.get("updates", []) if isinstance(outputs, Mapping) else []
        sums = trainer.strategy.reduce(signal_sums(updates, pl_module.device), reduce_op="sum")
        signals = signals_from_sums(sums)
        fired = self.check(signals)
        nonfinite = self._nonfinite(trainer, pl_module, signals)
        any_nonfinite = trainer.strategy.reduce_boolean_decision(bool(nonfinite), all=False)
        if any_nonfinite:
            fired.append(("nonfinite", "non-finite values: "
                          + ("; ".join(nonfinite) or "on another process")))
        if fired:
            self._act(trainer, pl_module, fired, restore=any_nonfinite)
        else:
            self._healthy(pl_module, signals)
        self._pre_iteration = None
        logged = {"guard/fired": float(bool(fired)),
                  **{f"guard/{k}": v for k, v in signals.items()}}
        log_step_values(trainer, logged, to_loggers=writes_logs(trainer, batch_idx))

    def _act(self, trainer: L.Trainer, pl_module: L.LightningModule,
             fired: list[tuple[str, str]], restore: bool) -> None:
        self.fired_count += 1
        for name, _ in fired:
            self.fired_by_signal[name] = self.fired_by_signal.get(name, 0) + 1
        done = []
        if self.action == "rollback":
            assert self._last_good is not None, "rollback needs the snapshot from on_train_start"
            self._last_good.restore(pl_module, keep=True)
            self._healthy_since_snapshot = 0
            done.append("rolled back to the last known-good state")
        elif restore or self.action == "skip":
            assert self._pre_iteration is not None
            self._pre_iteration.restore(pl_module, keep=False)
            done.append("undid this iteration's update")
        if self.action == "lower_lr":
            done.append(self._lower_lr(pl_module))
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

    def _healthy(self, pl_module: L.LightningModule, signals: Mapping[str, float]) -> None:
        kl = signals.get("kl")
        if kl is not None:
            self.kl_ema = kl if self.kl_ema is None else (
                self.ema_decay * self.kl_ema + (1 - self.ema_decay) * kl)
            self.kl_ema_count += 1
        if self.action == "rollback":
            self._healthy_since_snapshot += 1
            if self._healthy_since_snapshot >= self.snapshot_every:
                self._last_good = _Snapshot.capture(pl_module, self.snapshot_device)
                self._healthy_since_snapshot = 0

    def _lowered(self, lr: float) -> float:
        return min(lr, max(lr * self.lr_factor, self.min_lr))

    def _lower_lr(self, pl_module: L.LightningModule) -> str:
        before = after = math.nan
        for optimizer in _optimizers(pl_module):
            for group in optimizer.param_groups:
                before = group["lr"]
                group["lr"] = after = self._lowered(group["lr"])
        for scheduler in _schedulers(pl_module):
            if hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [self._lowered(lr) for lr in scheduler.base_lrs]
        return f"learning rate {before:.4g} → {after:.4g}"

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        bad = _nonfinite_weights(pl_module)
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
