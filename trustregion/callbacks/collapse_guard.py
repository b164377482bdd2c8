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
- ``reward``, the rollout batch's mean reward (``reward/mean``): fires below
  ``min_reward_fraction`` × its running mean (only while that mean is positive);
- ``nonfinite`` (always watched): a non-finite ``train/loss`` or ``train/grad_norm``, an
  optimiser step the module skipped for a non-finite gradient, a non-finite signal, or a
  non-finite policy or behaviour weight.

The KL is the k3 estimator with x = log μ − log π: k3 = eˣ − x − 1 = 1/r − 1 + log r ≥ 0, the same
per-token drift measure as ``DriftMonitor``'s ``drift/behavior/kl_k3``, so a threshold can be read
off that chart (the tokens were sampled from μ, so it is a drift measure, not an unbiased estimate
of KL(π‖μ)). Its mean is heavy-tailed: one token whose probability fell a thousandfold adds
about 1000 / N, so ``ess`` is the steadier drift signal for an absolute threshold.

The reward is an outcome rather than a precursor: it falls once the weights are already lost.
It is there for collapses the other signs miss (a policy that stays diverse while it forgets the
task, or a run with one optimiser step per rollout batch, where an iteration's drift only shows
in the next one). It is noisy from batch to batch, so pick a fraction well below that spread
(the quickstart's batch means range over about ±50 % of their running mean); rewards that are
not positive on average are not watched.

**What each action does** when a sign fires:

- ``escalate`` (the default): roll back to the last *confirmed* good state (below) and multiply
  the learning rate by ``lr_factor`` (never below ``min_lr``); after
  ``max_consecutive_triggers`` consecutive triggers, roll back once more and stop the run by
  raising :class:`TrainingCollapsed`, whose message names the signs, their values and
  thresholds and the rollout batches (``trustregion fit`` prints it and exits with status 3).
- ``warn``: a warning naming the signal, its value and its threshold;
- ``skip``: undo this iteration: the module's ``training_state()`` (policy and behaviour
  weights, optimiser and scheduler state, the behaviour-sync counter) goes back to an in-memory
  copy taken in ``on_train_batch_start`` (:mod:`~trustregion.callbacks.snapshots`), so the
  iteration's updates never reach the weights;
- ``lower_lr``: multiply the learning rate (every optimiser param group and every scheduler's
  ``base_lrs``) by ``lr_factor``, never below ``min_lr``;
- ``stop``: ask the trainer to stop (``trainer.should_stop = True``; the run ends normally);
- ``rollback``: restore the last snapshot, taken when training starts and refreshed after every
  ``snapshot_every`` healthy iterations.

**Why escalate confirms a state one iteration late.** The iteration that does the damage looks
healthy: its signals are measured on the rollouts of the state it *started* from and on its own
updates, so a destructive last optimiser step only shows in the next iteration (entropy at zero,
reward gone). ``skip`` then undoes the wrong iteration and keeps the collapsed weights for ever.
So ``escalate`` treats a state as good only once an iteration that started from it was healthy:
the copy taken before iteration t becomes the last good state when iteration t ends without a
trigger. A trigger in iteration t goes back to the state iteration t − 1 started from (or to the
state training started or resumed from), one iteration further back than strictly needed when
only iteration t's own drift fired, which costs one iteration's progress and never keeps damage.

**Consecutive triggers** are triggers with no confirmed progress between them. The healthy
iteration right after a roll-back only re-confirms the state rolled back to, so it does not
reset the count; the next healthy one (which started from freshly trained weights) does. A run
that keeps collapsing at every lowered rate therefore stops after ``max_consecutive_triggers``
triggers instead of alternating for ever.

**A non-finite value never reaches the weights or a checkpoint.** A non-finite sign always undoes
the iteration, whatever the action (``escalate`` and ``rollback`` go back to their good state,
every other action first restores the pre-iteration copy and then does what it says; a warning
is always raised). The restore happens in ``on_train_batch_end``, and Lightning runs every
``ModelCheckpoint`` after all other callbacks, so a checkpoint written at that step already holds
the restored weights. As a last line, the guard refuses any checkpoint save while a policy or
behaviour weight is non-finite (``on_save_checkpoint`` raises).

**Checkpoints.** :attr:`CollapseGuard.firing` is True when the latest rollout batch triggered
(:class:`~trustregion.callbacks.checkpoint.RolloutCheckpoint` marks a save made then and keeps
``last.ckpt`` off it), and every checkpoint records ``checkpoint["collapse_guard"]`` =
``{"firing", "fired" (the sign names), "signals" (their values), "consecutive_triggers",
"weights_step", "last_good_step"}``. ``weights_step`` is the global step at which the saved
weights were produced (older than the checkpoint's own step right after a roll-back);
``last_good_step`` that of the last confirmed state. Under ``escalate`` the weights of a save
made after a healthy batch are confirmed only by the next batch, so when the guard fires, every
checkpoint whose ``weights_step`` is above ``last_good_step`` holds unconfirmed, now rejected,
weights; the newest one at or below it that no earlier trigger rejected holds a confirmed
state, the one to point ``last.ckpt`` at. The escalation (consecutive triggers, the number of
learning-rate reductions, the KL and reward running means) is in the guard's state and resumes
with the run; the learning rates themselves are in the optimiser's.

Costs: every action but ``rollback`` copies the training state before each iteration
(``escalate`` keeps that copy as the next good state, so it holds two copies at once);
``rollback`` holds one. A copy is the policy and behaviour weights plus the optimiser state:
with AdamW (two moments) a copy is four times the policy's size, so ``escalate`` holds eight.
Pass ``snapshot_device="cpu"`` to keep them in host memory. The non-finite weight check reads
every policy weight once per iteration. Prompt positions and the trainer's step counter are not
rolled back: a skipped or rolled-back iteration still counts towards ``max_steps``.
Snapshots are not saved in checkpoints.

Example:
    >>> guard = CollapseGuard(min_ess=0.5, min_entropy=0.01)  # escalate
    >>> # L.Trainer(callbacks=[guard, ModelCheckpoint(...)])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from trustregion.callbacks.collapse_signals import signal_sums, signals_from_sums
from trustregion.callbacks.snapshots import TrainingSnapshot, nonfinite_weights
from trustregion.interface import StepOutput, TrainingModule, training_module
from trustregion.validation import integer_at_least, number_in, require

__all__ = ["ACTIONS", "CHECKPOINT_KEY", "CollapseGuard", "GuardAction", "TrainingCollapsed"]

GuardAction = Literal["escalate", "warn", "skip", "lower_lr", "stop", "rollback"]
ACTIONS: tuple[str, ...] = get_args(GuardAction)

CHECKPOINT_KEY = "collapse_guard"
"""The key of the guard's marker in every checkpoint (see the module docs)."""

_NONFINITE_METRICS = ("train/loss", "train/grad_norm")
_SKIPPED_METRIC = "train/skipped_steps"
_REWARD_METRIC = "reward/mean"
_LR_ACTIONS = ("escalate", "lower_lr")
_DEFAULT_LR_FACTOR, _DEFAULT_MIN_LR = 0.5, 0.0
_DEFAULT_SNAPSHOT_EVERY = 10
_DEFAULT_MAX_CONSECUTIVE = 3


class TrainingCollapsed(RuntimeError):
    """Raised by a :class:`CollapseGuard` with ``action="escalate"`` when its signs fired in
    ``max_consecutive_triggers`` consecutive rollout batches, though each earlier trigger rolled
    back and lowered the learning rate. The weights were rolled back to the last good state
    before it was raised.

    Attributes:
        triggers: one line per consecutive trigger: the rollout batch and the signs that fired,
            with their values and thresholds.
        signals: the signs that fired last (``min_ess``, ``kl_spike``, ...) and their values.
        last_good_step: the global step of the state the weights were rolled back to.
        exit_code: the status ``trustregion fit`` exits with when it catches one (3).
    """

    exit_code = 3

    def __init__(self, triggers: list[str], signals: dict[str, float],
                 last_good_step: int) -> None:
        self.triggers = list(triggers)
        self.signals = dict(signals)
        self.last_good_step = last_good_step
        repeated = (f" in {len(triggers)} consecutive rollout batches, though each earlier "
                    "trigger rolled back and lowered the learning rate" if len(triggers) > 1
                    else "")
        super().__init__(
            f"CollapseGuard stopped training: the collapse signs fired{repeated} "
            f"({'; '.join(triggers)}). The weights hold the last good state, from global step "
            f"{last_good_step}. Lower the learning rate or tighten the trust region, then "
            "start again from a checkpoint written at or before that step.")


@dataclass
class _GoodState:
    """A snapshot of known-good training state and the global step its weights are from."""

    snapshot: TrainingSnapshot
    step: int


# ------------------------------------------------------------------------------- the callback


class CollapseGuard(L.Callback):
    """Detect the signs that precede collapse (mismatch-KL spike, ESS drop, entropy collapse or
    explosion, reward collapse, non-finite values) and escalate (roll back to the last confirmed
    good state and lower the learning rate, then stop), warn, skip the iteration, lower the
    learning rate, stop or roll back. See the module docstring for the signals and guarantees.

    Args:
        max_kl: ceiling on the iteration's mean mismatch KL (k3); None: not watched.
        kl_spike_factor: fire when the KL exceeds this multiple (> 1) of its running mean; None:
            not watched.
        min_spike_kl: a spike also needs the KL to exceed this absolute value, so that numerical
            noise around zero (on-policy steps) is never called a spike.
        ema_decay: decay of the KL and reward running means (exponential moving averages over
            healthy iterations, started at the first value).
        warmup_steps: healthy iterations averaged before spikes and reward drops are watched.
        min_ess: floor on the effective-sample-size fraction of r = π/μ, in (0, 1].
        min_entropy: floor on the mean policy entropy (nats).
        max_entropy: ceiling on the mean policy entropy (nats).
        min_reward_fraction: fire when the rollout batch's mean reward falls below this
            fraction, in (0, 1), of its running mean; None: not watched.
        action: ``"escalate"``, ``"warn"``, ``"skip"``, ``"lower_lr"``, ``"stop"`` or
            ``"rollback"``.
        lr_factor: learning-rate multiplier of ``escalate`` and ``lower_lr``, in (0, 1);
            default 0.5.
        min_lr: ``escalate`` and ``lower_lr`` never go below this (and never raise a rate
            already below it); default 0.
        max_consecutive_triggers: ``escalate`` stops the run at this many consecutive
            triggers (≥ 1; 1 stops at the first); default 3.
        snapshot_every: healthy iterations between refreshes of the ``rollback`` snapshot;
            default 10.
        snapshot_device: where snapshots live; None keeps them beside the weights, ``"cpu"``
            saves accelerator memory at the cost of a copy each way.

    The four settings that default to None apply to some actions only, and are refused with
    the others.

    Attributes:
        fired_count: iterations in which the guard fired.
        fired_by_signal: firings per sign (``max_kl``, ``kl_spike``, ``min_ess``,
            ``min_entropy``, ``max_entropy``, ``min_reward``, ``nonfinite``).
        kl_ema: running mean of the mismatch KL over healthy iterations (None before any).
        reward_ema: running mean of the mean reward over healthy iterations (None before any,
            or when the reward is not watched).
        consecutive_triggers: ``escalate``'s triggers since the last confirmed progress.
        lr_reductions: how many times ``escalate`` or ``lower_lr`` lowered the learning rate.
        last_good_step: global step of the state ``escalate`` or ``rollback`` would restore
            (None before training starts, and for other actions).

    Logs ``guard/fired`` (1 or 0 this iteration), ``guard/kl``, ``guard/ess``,
    ``guard/entropy`` and, with ``escalate``, ``guard/consecutive_triggers``.
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
        min_reward_fraction: float | None = None,
        action: GuardAction = "escalate",
        lr_factor: float | None = None,
        min_lr: float | None = None,
        max_consecutive_triggers: int | None = None,
        snapshot_every: int | None = None,
        snapshot_device: str | None = None,
    ) -> None:
        require(action in ACTIONS, f"unknown action {action!r}; allowed: {ACTIONS}")
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
        number_in("min_reward_fraction", min_reward_fraction, 0.0, 1.0, high_inclusive=False,
                  optional=True)
        number_in("lr_factor", lr_factor, 0.0, 1.0, high_inclusive=False, optional=True)
        number_in("min_lr", min_lr, 0.0, low_inclusive=True, optional=True)
        if max_consecutive_triggers is not None:
            integer_at_least("max_consecutive_triggers", max_consecutive_triggers, 1)
        if snapshot_every is not None:
            integer_at_least("snapshot_every", snapshot_every, 1)
        integer_at_least("warmup_steps", warmup_steps, 0)
        for name, value, users in (("lr_factor", lr_factor, _LR_ACTIONS),
                                   ("min_lr", min_lr, _LR_ACTIONS),
                                   ("max_consecutive_triggers", max_consecutive_triggers,
                                    ("escalate",)),
                                   ("snapshot_every", snapshot_every, ("rollback",))):
            require(value is None or action in users,
                    f"{name} applies to action {' or '.join(map(repr, users))} only; got "
                    f"{name}={value!r} with action={action!r} (leave it out, or pick one of "
                    "those actions)")
        self.max_kl = max_kl
        self.kl_spike_factor = kl_spike_factor
        self.min_spike_kl = min_spike_kl
        self.ema_decay = ema_decay
        self.warmup_steps = warmup_steps
        self.min_ess = min_ess
        self.min_entropy = min_entropy
        self.max_entropy = max_entropy
        self.min_reward_fraction = min_reward_fraction
        self.action: GuardAction = action
        self.lr_factor = _DEFAULT_LR_FACTOR if lr_factor is None else lr_factor
        self.min_lr = _DEFAULT_MIN_LR if min_lr is None else min_lr
        self.max_consecutive_triggers = (_DEFAULT_MAX_CONSECUTIVE
                                         if max_consecutive_triggers is None
                                         else max_consecutive_triggers)
        self.snapshot_every = (_DEFAULT_SNAPSHOT_EVERY if snapshot_every is None
                               else snapshot_every)
        self.snapshot_device = snapshot_device

        self.fired_count = 0
        self.fired_by_signal: dict[str, int] = {}
        self.kl_ema: float | None = None
        self.kl_ema_count = 0
        self.reward_ema: float | None = None
        self.reward_ema_count = 0
        self.consecutive_triggers = 0
        self.lr_reductions = 0
        self._retrying = False  # the next healthy iteration only re-confirms a restored state
        self._triggers: list[str] = []
        self._firing = False
        self._restored_weights = False
        self._latest_fired: dict[str, float] = {}
        self._pre_iteration: TrainingSnapshot | None = None
        self._pre_iteration_step = 0
        self._weights_step = 0  # global step the weights in memory were produced at
        self._last_good: _GoodState | None = None
        self._healthy_since_snapshot = 0

    @property
    def state_key(self) -> str:
        """Distinguishes guards by action and by which signs they watch (not by threshold
        values, so a threshold can be tuned on resume without losing the counters)."""
        watched = [name for name in ("max_kl", "kl_spike_factor", "min_ess", "min_entropy",
                                     "max_entropy", "min_reward_fraction")
                   if getattr(self, name) is not None]
        return f"{type(self).__qualname__}{{'action': {self.action!r}, 'watched': {watched}}}"

    @property
    def firing(self) -> bool:
        """Whether a sign fired in the latest rollout batch (False before the first)."""
        return self._firing

    @property
    def restored_weights(self) -> bool:
        """Whether the latest rollout batch fired and the weights in memory are an earlier,
        known state again (rolled back or undone): then a save holds no rejected weights."""
        return self._restored_weights

    @property
    def last_good_step(self) -> int | None:
        """Global step of the state ``escalate`` or ``rollback`` restores on a trigger."""
        return None if self._last_good is None else self._last_good.step

    # ---------------------------------------------------------------------------- checks
    def check(self, signals: Mapping[str, float]) -> list[tuple[str, str]]:
        """The thresholds ``signals`` cross, as (sign name, message); pure, no side effects."""
        fired: list[tuple[str, str]] = []
        kl, ess, entropy = signals.get("kl"), signals.get("ess"), signals.get("entropy")
        reward = signals.get("reward")
        if kl is not None and self.max_kl is not None and kl > self.max_kl:
            value, limit = _distinct(kl, self.max_kl)
            fired.append(("max_kl", f"mismatch KL {value} > max_kl {limit}"))
        if (kl is not None and self.kl_spike_factor is not None and self.kl_ema is not None
                and self.kl_ema_count >= self.warmup_steps and kl > self.min_spike_kl
                and kl > self.kl_spike_factor * self.kl_ema):
            fired.append(("kl_spike", f"mismatch KL {kl:.4g} > kl_spike_factor "
                                      f"{self.kl_spike_factor:g} × running mean "
                                      f"{self.kl_ema:.4g} = "
                                      f"{self.kl_spike_factor * self.kl_ema:.4g}"))
        if ess is not None and self.min_ess is not None and ess < self.min_ess:
            value, limit = _distinct(ess, self.min_ess)
            fired.append(("min_ess", f"ESS fraction {value} < min_ess {limit}"))
        if entropy is not None and self.min_entropy is not None and entropy < self.min_entropy:
            value, limit = _distinct(entropy, self.min_entropy)
            fired.append(("min_entropy", f"entropy {value} < min_entropy {limit}"))
        if entropy is not None and self.max_entropy is not None and entropy > self.max_entropy:
            value, limit = _distinct(entropy, self.max_entropy)
            fired.append(("max_entropy", f"entropy {value} > max_entropy {limit}"))
        if (reward is not None and self.min_reward_fraction is not None
                and self.reward_ema is not None and self.reward_ema > 0
                and self.reward_ema_count >= self.warmup_steps
                and reward < self.min_reward_fraction * self.reward_ema):
            fired.append(("min_reward", f"mean reward {reward:.4g} < min_reward_fraction "
                                        f"{self.min_reward_fraction:g} × running mean "
                                        f"{self.reward_ema:.4g} = "
                                        f"{self.min_reward_fraction * self.reward_ema:.4g}"))
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
        self._firing = False
        self._restored_weights = False
        self._weights_step = trainer.global_step
        # The state training starts (or resumes) from is taken as good at the first rollout
        # batch, not here: the module's own on_train_start, which Lightning runs after every
        # callback's, may still change it (optimiser settings changed on resume).
        self._last_good = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self.action in ("rollback", "escalate") and self._last_good is None:
            snapshot = TrainingSnapshot.capture(training_module(pl_module, "CollapseGuard"),
                                                self.snapshot_device)
            self._last_good = _GoodState(snapshot, trainer.global_step)
        if self.action != "rollback":  # rollback restores its periodic snapshot instead
            self._pre_iteration = TrainingSnapshot.capture(
                training_module(pl_module, "CollapseGuard"), self.snapshot_device)
            self._pre_iteration_step = self._weights_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        module = training_module(pl_module, "CollapseGuard")
        step = StepOutput.of(outputs)
        updates = step.updates if step is not None else ()
        metrics = step.metrics if step is not None else {}
        sums = trainer.strategy.reduce(signal_sums(updates, pl_module.device), reduce_op="sum")
        signals = signals_from_sums(sums)
        if self.min_reward_fraction is not None and _REWARD_METRIC in metrics:
            signals["reward"] = float(metrics[_REWARD_METRIC])  # already global
        fired = self.check(signals)
        nonfinite = self._nonfinite(metrics, module, signals)
        any_nonfinite = trainer.strategy.reduce_boolean_decision(bool(nonfinite), all=False)
        if any_nonfinite:
            fired.append(("nonfinite", "non-finite values: "
                          + ("; ".join(nonfinite) or "on another process")))
        self._firing = bool(fired)
        self._latest_fired = {name: _fired_value(name, signals) for name, _ in fired}
        logged = {"guard/fired": float(bool(fired)),
                  **{f"guard/{k}": v for k, v in signals.items() if k != "reward"}}
        collapsed = None
        self._restored_weights = False  # unless the action restores an earlier state
        self._weights_step = trainer.global_step  # unless the action restores older weights
        if fired:
            collapsed = self._act(trainer, module, fired, restore=any_nonfinite,
                                  batch=int(module.step_log.step))
        else:
            self._healthy(trainer, module, signals)
        self._pre_iteration = None
        if self.action == "escalate":
            logged["guard/consecutive_triggers"] = float(self.consecutive_triggers)
        if collapsed is not None:
            trainer.should_stop = True
            module.step_log.add(logged)
            module.step_log.finish()  # the stopping batch's row still reaches the loggers
            raise collapsed
        module.step_log.add(logged, write=module.step_log.logging_batch(batch_idx))

    def _act(self, trainer: L.Trainer, module: TrainingModule, fired: list[tuple[str, str]],
             restore: bool, batch: int) -> TrainingCollapsed | None:
        """Take the action; returns the exception to stop with when ``escalate`` gives up."""
        self.fired_count += 1
        for name, _ in fired:
            self.fired_by_signal[name] = self.fired_by_signal.get(name, 0) + 1
        done = []
        if self.action in ("rollback", "escalate"):
            done.append(self._restore_last_good(trainer, module))
            self._healthy_since_snapshot = 0
            self._restored_weights = True
        elif restore or self.action == "skip":
            assert self._pre_iteration is not None
            self._pre_iteration.restore(module, keep=False)
            self._weights_step = self._pre_iteration_step
            self._restored_weights = True
            done.append("undid this iteration's update")
        if self.action == "escalate":
            self.consecutive_triggers += 1
            self._retrying = True
            self._triggers.append(f"rollout batch {batch}: "
                                  + "; ".join(text for _, text in fired))
            if self.consecutive_triggers >= self.max_consecutive_triggers:
                return TrainingCollapsed(self._triggers, self._latest_fired,
                                         self.last_good_step or 0)
            self.lr_reductions += 1
            done.append(self._lower_lr(trainer) + f" (trigger {self.consecutive_triggers} of "
                        f"{self.max_consecutive_triggers} before stopping)")
        if self.action == "lower_lr":
            self.lr_reductions += 1
            done.append(self._lower_lr(trainer))
        if self.action == "stop":
            trainer.should_stop = True
            done.append("stopping training")
        message = (f"CollapseGuard fired at global step {trainer.global_step}: "
                   + "; ".join(text for _, text in fired)
                   + f". Action {self.action!r}: " + ("; ".join(done) or "none") + ".")
        if self.action in ("warn", "escalate") or restore:
            rank_zero_warn(message)
        else:
            rank_zero_info(message)
        return None

    def _restore_last_good(self, trainer: L.Trainer, module: TrainingModule) -> str:
        """Restore the last good state but keep the current learning rates (param groups and
        schedulers' ``base_lrs``), which hold the reductions made since it was taken."""
        assert self._last_good is not None, "the good state is taken at the first rollout batch"
        rates = [[group["lr"] for group in optimizer.param_groups]
                 for optimizer in trainer.optimizers]
        base_lrs = [list(getattr(config.scheduler, "base_lrs", []))
                    for config in trainer.lr_scheduler_configs]
        self._last_good.snapshot.restore(module, keep=True)
        self._weights_step = self._last_good.step
        for optimizer, kept in zip(trainer.optimizers, rates, strict=True):
            for group, lr in zip(optimizer.param_groups, kept, strict=True):
                group["lr"] = lr
        for config, kept_base in zip(trainer.lr_scheduler_configs, base_lrs, strict=True):
            if kept_base:
                config.scheduler.base_lrs = kept_base
        return f"rolled back to the good state of global step {self._last_good.step}"

    def _healthy(self, trainer: L.Trainer, module: TrainingModule,
                 signals: Mapping[str, float]) -> None:
        kl, reward = signals.get("kl"), signals.get("reward")
        if kl is not None:
            self.kl_ema = self._averaged(self.kl_ema, kl)
            self.kl_ema_count += 1
        if reward is not None:
            self.reward_ema = self._averaged(self.reward_ema, reward)
            self.reward_ema_count += 1
        if self.action == "escalate":
            # the state this iteration started from is now confirmed
            assert self._pre_iteration is not None
            self._last_good = _GoodState(self._pre_iteration, self._pre_iteration_step)
            if self._retrying:
                self._retrying = False
            else:
                self.consecutive_triggers = 0
                self._triggers = []
        if self.action == "rollback":
            self._healthy_since_snapshot += 1
            if self._healthy_since_snapshot >= self.snapshot_every:
                self._last_good = _GoodState(
                    TrainingSnapshot.capture(module, self.snapshot_device), trainer.global_step)
                self._healthy_since_snapshot = 0

    def _averaged(self, mean: float | None, value: float) -> float:
        return value if mean is None else self.ema_decay * mean + (1 - self.ema_decay) * value

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
        checkpoint[CHECKPOINT_KEY] = {
            "firing": self._firing, "fired": sorted(self._latest_fired),
            "signals": dict(self._latest_fired),
            "consecutive_triggers": self.consecutive_triggers,
            "weights_step": self._weights_step, "last_good_step": self.last_good_step}

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"fired_count": self.fired_count, "fired_by_signal": dict(self.fired_by_signal),
                "kl_ema": self.kl_ema, "kl_ema_count": self.kl_ema_count,
                "reward_ema": self.reward_ema, "reward_ema_count": self.reward_ema_count,
                "consecutive_triggers": self.consecutive_triggers,
                "lr_reductions": self.lr_reductions, "retrying": self._retrying,
                "triggers": list(self._triggers)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.fired_count = int(state_dict["fired_count"])
        self.fired_by_signal = dict(state_dict["fired_by_signal"])
        self.kl_ema = state_dict["kl_ema"]
        self.kl_ema_count = int(state_dict["kl_ema_count"])
        # absent from checkpoints written before the escalation existed
        self.reward_ema = state_dict.get("reward_ema")
        self.reward_ema_count = int(state_dict.get("reward_ema_count", 0))
        self.consecutive_triggers = int(state_dict.get("consecutive_triggers", 0))
        self.lr_reductions = int(state_dict.get("lr_reductions", 0))
        self._retrying = bool(state_dict.get("retrying", False))
        self._triggers = list(state_dict.get("triggers", []))


def _distinct(value: float, threshold: float) -> tuple[str, str]:
    """``value`` and ``threshold`` with 4 significant digits, or more where that would print
    them alike (an ESS of 0.49996 against 0.5)."""
    for digits in range(4, 17):
        shown = f"{value:.{digits}g}", f"{threshold:.{digits}g}"
        if shown[0] != shown[1]:
            return shown
    return shown


def _fired_value(name: str, signals: Mapping[str, float]) -> float:
    """The value behind a fired sign (NaN for ``nonfinite``)."""
    source = {"max_kl": "kl", "kl_spike": "kl", "min_ess": "ess", "min_entropy": "entropy",
              "max_entropy": "entropy", "min_reward": "reward"}.get(name)
    return signals.get(source, math.nan) if source is not None else math.nan
