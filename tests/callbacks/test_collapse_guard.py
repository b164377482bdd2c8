from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from conftest import DigitRichArithmetic
from lightning.pytorch.callbacks import ModelCheckpoint
from stub_module import HandBuiltUpdates

from trustregion.batching import BatchSettings
from trustregion.callbacks import CollapseGuard
from trustregion.callbacks.collapse_guard import CHECKPOINT_KEY, TrainingCollapsed
from trustregion.callbacks.collapse_signals import collapse_signals
from trustregion.cli import main
from trustregion.interface import UpdateRecord
from trustregion.module import TrustRegionModule
from trustregion.optim import AdamW
from trustregion.rollout import SamplingSettings
from trustregion.strategies import DRPO, StrategyOutput, TokenBatch
from trustregion.strategies.base import AnchoredTokens, StrategyTerms

# 2 prompts × 4 completions = 8 sequences per iteration; mini-batches of 4 → 2 optimiser steps
# per iteration, so max_steps = 2 × iterations.
SMALL = {"batching": BatchSettings(group_size=4, prompts_per_step=2, mini_batch_size=4),
         "sampling": SamplingSettings(max_new_tokens=5)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """The tiny model gains nothing from intra-op threads; on a busy 2-core machine they make
    these Trainer runs many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _module(random_model_dir: Path, **overrides: Any) -> TrustRegionModule:
    torch.manual_seed(0)
    return TrustRegionModule(policy=f"config:{random_model_dir}", task=DigitRichArithmetic(),
                             **{**SMALL, **overrides})


def _fit(module: TrustRegionModule, iterations: int, callbacks: list[L.Callback],
         **trainer: Any) -> L.Trainer:
    trainer.setdefault("enable_checkpointing", False)
    t = L.Trainer(max_steps=2 * iterations, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, log_every_n_steps=1, callbacks=callbacks,
                  **trainer)
    t.fit(module)
    return t


def _state(module: L.LightningModule, name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in getattr(module, name).state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Record(L.Callback):
    """Policy/behaviour weights, scheduler position and learning rate at the start and the end
    of every iteration (list it after the guard so that the end sees the guard's action)."""

    def __init__(self) -> None:
        self.before: list[dict[str, Any]] = []
        self.after: list[dict[str, Any]] = []

    def _snapshot(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, Any]:
        scheduler = module.lr_schedulers()
        optimizer = module.optimizers(use_pl_optimizer=False)
        return {"policy": _state(module, "policy"), "behavior": _state(module, "behavior"),
                "last_epoch": scheduler.last_epoch, "lr": optimizer.param_groups[0]["lr"],
                "base_lrs": list(scheduler.base_lrs),
                "adam_steps": [float(s["step"]) for s in optimizer.state.values()],
                "fired": float(trainer.callback_metrics.get("guard/fired", math.nan)),
                "kl": float(trainer.callback_metrics.get("guard/kl", math.nan))}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before.append(self._snapshot(trainer, pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append(self._snapshot(trainer, pl_module))


class PerturbBehavior(L.Callback):
    """Inject a mismatch spike: add noise to the behaviour model before the listed iterations'
    rollouts, so μ differs strongly from π (list it after the guard, whose pre-iteration copy
    then holds the clean behaviour model)."""

    def __init__(self, at: set[int], std: float = 0.5) -> None:
        self.at, self.std = at, std

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx in self.at:
            generator = torch.Generator().manual_seed(batch_idx)
            with torch.no_grad():
                for p in pl_module.behavior.parameters():
                    p.add_(torch.randn(p.shape, generator=generator) * self.std)


class CorruptPolicy(L.Callback):
    """Write a NaN into a policy weight after the listed iterations' updates (list it before the
    guard, so the guard sees the corrupted weights)."""

    def __init__(self, at: set[int]) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx in self.at:
            with torch.no_grad():
                next(pl_module.policy.parameters()).view(-1)[0] = float("nan")


class PoisonedDRPO(DRPO):
    """DRPO whose objective is NaN while ``poison`` is set."""

    poison = False

    def terms(self, tokens: AnchoredTokens) -> StrategyTerms:
        terms = super().terms(tokens)
        if self.poison:
            terms.objective = terms.objective * float("nan")
        return terms


class PoisonAt(L.Callback):
    def __init__(self, at: set[int]) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        pl_module.trust_region.poison = batch_idx in self.at


# ------------------------------------------------------------------------------ pure maths
def _record(logp: list[float], behavior_logp: list[float], entropy: list[float],
            mask: list[bool]) -> UpdateRecord:
    shape = (1, len(logp))
    batch = TokenBatch(logp=torch.tensor([logp]), behavior_logp=torch.tensor([behavior_logp]),
                       advantages=torch.ones(1), mask=torch.tensor([mask]),
                       entropy=torch.tensor([entropy]))
    output = StrategyOutput(token_loss=torch.zeros(shape), metrics={},
                            weight=torch.zeros(shape), outside=torch.zeros(shape, dtype=torch.bool))
    return UpdateRecord(batch=batch, output=output)


def test_signals_on_hand_built_records() -> None:
    # μ = 0.25 on every token; π = 0.5, 0.25, 0.125, so r = π/μ = 2, 1, 0.5, split over two
    # records, plus one masked padding token holding NaN that must be ignored.
    mu, nan = math.log(0.25), float("nan")
    first = _record([math.log(0.5), math.log(0.25)], [mu, mu], [1.0, 2.0], [True, True])
    second = _record([math.log(0.125), nan], [mu, nan], [3.0, nan], [True, False])
    signals = collapse_signals([first, second])
    # k3 = 1/r − 1 + log r: r = 2 → 0.5 − 1 + ln 2; r = 1 → 0; r = 0.5 → 2 − 1 − ln 2.
    # Sum = 0.5 (the ln 2 cancel), over N = 3 tokens: KL = 1/6.
    assert signals["kl"] == pytest.approx(1 / 6, rel=1e-6)
    # ESS = (Σr)² / (N Σr²) = 3.5² / (3 × (4 + 1 + 0.25)) = 12.25 / 15.75 = 7/9.
    assert signals["ess"] == pytest.approx(7 / 9, rel=1e-6)
    # entropy = (1 + 2 + 3) / 3 = 2.
    assert signals["entropy"] == pytest.approx(2.0, rel=1e-6)
    assert collapse_signals([]) == {}

    quiet = CollapseGuard(max_kl=0.2, min_ess=0.7, min_entropy=1.5, max_entropy=2.5)
    assert quiet.check(signals) == []
    loud = CollapseGuard(max_kl=0.1, min_ess=0.8, min_entropy=2.5)
    assert [name for name, _ in loud.check(signals)] == ["max_kl", "min_ess", "min_entropy"]
    assert "mismatch KL 0.1667 > max_kl 0.1" in loud.check(signals)[0][1]
    assert [n for n, _ in CollapseGuard(max_entropy=1.5).check(signals)] == ["max_entropy"]


def test_kl_spike_compares_with_the_running_mean_after_warmup() -> None:
    guard = CollapseGuard(kl_spike_factor=3.0, warmup_steps=2, min_spike_kl=1e-3)
    guard.kl_ema, guard.kl_ema_count = 0.01, 2
    assert [n for n, _ in guard.check({"kl": 0.05})] == ["kl_spike"]  # 0.05 > 3 × 0.01
    assert guard.check({"kl": 0.02}) == []  # 0.02 ≤ 0.03
    guard.kl_ema_count = 1  # still warming up
    assert guard.check({"kl": 0.05}) == []
    guard.kl_ema, guard.kl_ema_count = 1e-6, 2  # noise around zero is no spike
    assert guard.check({"kl": 5e-4}) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"action": "pause"}, "unknown action 'pause'"),
        ({"max_kl": 0.0}, r"max_kl must be a finite number in \(0.0, inf\)"),
        ({"max_kl": float("nan")}, "max_kl must be a finite number"),
        ({"kl_spike_factor": 1.0}, "kl_spike_factor must be a finite number in"),
        ({"min_ess": 1.5}, r"min_ess must be a finite number in \(0.0, 1.0\]"),
        ({"min_entropy": -1.0}, "min_entropy must be"),
        ({"min_entropy": 2.0, "max_entropy": 1.0}, "min_entropy .* must be below max_entropy"),
        ({"lr_factor": 1.0}, r"lr_factor must be a finite number in \(0.0, 1.0\)"),
        ({"min_lr": -1e-5}, "min_lr must be"),
        ({"ema_decay": 1.0}, "ema_decay must be"),
        ({"snapshot_every": 0}, "snapshot_every must be an integer ≥ 1"),
        ({"warmup_steps": -1}, "warmup_steps must be an integer ≥ 0"),
        ({"min_reward_fraction": 1.0}, r"min_reward_fraction must be a finite number in "
                                       r"\(0.0, 1.0\)"),
        ({"max_consecutive_triggers": 0}, "max_consecutive_triggers must be an integer ≥ 1"),
        ({"action": "warn", "lr_factor": 0.5},
         "lr_factor applies to action 'escalate' or 'lower_lr' only; got lr_factor=0.5 with "
         "action='warn'"),
        ({"action": "skip", "min_lr": 1e-6}, "min_lr applies to action 'escalate' or"),
        ({"action": "lower_lr", "max_consecutive_triggers": 2},
         "max_consecutive_triggers applies to action 'escalate' only"),
        ({"snapshot_every": 5}, "snapshot_every applies to action 'rollback' only; got "
                                "snapshot_every=5 with action='escalate'"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CollapseGuard(**kwargs)


def test_state_dict_round_trip() -> None:
    guard = CollapseGuard(kl_spike_factor=5.0)
    guard.fired_count, guard.fired_by_signal = 3, {"kl_spike": 2, "nonfinite": 1}
    guard.kl_ema, guard.kl_ema_count = 0.02, 7
    other = CollapseGuard(kl_spike_factor=5.0)
    other.load_state_dict(guard.state_dict())
    assert other.state_dict() == guard.state_dict()


# --------------------------------------------------------------------------- non-finite values
def test_nan_weights_are_undone_whatever_the_action_and_never_checkpointed(
        random_model_dir, tmp_path) -> None:
    module = _module(random_model_dir, optimizer=partial(AdamW, lr=1e-2))
    guard, record = CollapseGuard(action="warn"), Record()
    # listed first, yet Lightning moves every ModelCheckpoint after the other callbacks
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1,
                                  filename="{step}")
    with pytest.warns(UserWarning, match=r"non-finite weights in policy\.") as caught:
        trainer = _fit(module, 3, [checkpoints, CorruptPolicy({1}), guard, record],
                       enable_checkpointing=True)
    assert trainer.callbacks.index(checkpoints) > trainer.callbacks.index(guard)
    assert sum("CollapseGuard fired" in str(w.message) for w in caught) == 1
    assert guard.fired_count == 1 and guard.fired_by_signal == {"nonfinite": 1}
    assert [r["fired"] for r in record.after] == [0.0, 1.0, 0.0]
    # iteration 1 is undone: policy, behaviour, optimiser and scheduler as before it
    assert _equal(record.after[1]["policy"], record.before[1]["policy"])
    assert _equal(record.after[1]["behavior"], record.before[1]["behavior"])
    assert record.after[1]["last_epoch"] == record.before[1]["last_epoch"]
    assert record.after[1]["adam_steps"] == record.before[1]["adam_steps"]
    assert not _equal(record.after[0]["policy"], record.before[0]["policy"])  # it does learn
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())
    saved = sorted(tmp_path.glob("*.ckpt"))
    assert [p.name for p in saved] == ["step=2.ckpt", "step=4.ckpt", "step=6.ckpt"]
    for path in saved:
        ckpt = torch.load(path, weights_only=False)
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values()
                   if v.is_floating_point())
        assert ckpt["callbacks"][guard.state_key]["fired_count"] == (0 if "2" in path.name
                                                                   else 1)
    step4 = torch.load(tmp_path / "step=4.ckpt", weights_only=False)["state_dict"]
    assert _equal({k[len("policy."):]: v for k, v in step4.items() if k.startswith("policy.")},
                  record.before[1]["policy"])


def test_nan_loss_skips_the_iteration(random_model_dir) -> None:
    module = _module(random_model_dir, trust_region=PoisonedDRPO())
    guard, record = CollapseGuard(action="skip"), Record()
    with pytest.warns(UserWarning, match="train/loss = nan"):
        _fit(module, 3, [guard, PoisonAt({1}), record])
    assert guard.fired_by_signal == {"nonfinite": 1}
    # the module dropped the non-finite gradients of iteration 1 (its two optimiser steps were
    # empty but still count towards max_steps) and stepped the scheduler; the guard undoes that
    assert [r["fired"] for r in record.after] == [0.0, 1.0, 0.0]
    assert record.after[1]["last_epoch"] == record.before[1]["last_epoch"]
    assert _equal(record.after[1]["policy"], record.before[1]["policy"])
    assert record.after[2]["last_epoch"] == record.before[2]["last_epoch"] + 2


def test_checkpoint_with_nan_weights_is_refused(random_model_dir, tmp_path) -> None:
    module = _module(random_model_dir)
    trainer = _fit(module, 1, [CollapseGuard()])
    trainer.save_checkpoint(tmp_path / "good.ckpt")
    with torch.no_grad():
        module.policy.get_input_embeddings().weight[3, 1] = float("inf")
    with pytest.raises(RuntimeError, match=r"refused to save a checkpoint: non-finite .* in "
                                           r"policy\.model\.embed_tokens\.weight"):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()


# ------------------------------------------------------------------------- an injected spike
def test_skip_restores_the_weights_exactly(random_model_dir) -> None:
    module = _module(random_model_dir, optimizer=partial(AdamW, lr=1e-2))
    guard, record = CollapseGuard(max_kl=1.0, action="skip"), Record()
    trainer = _fit(module, 3, [guard, PerturbBehavior({1}), record])
    assert guard.fired_by_signal == {"max_kl": 1}
    assert [r["fired"] for r in record.after] == [0.0, 1.0, 0.0]
    kl = [r["kl"] for r in record.after]
    assert kl[1] > 1.0 > 0.1 > max(kl[0], kl[2])
    assert trainer.callback_metrics["guard/kl"] == pytest.approx(kl[2])
    # the state before iteration 1 is the state after iteration 0 (``before`` is recorded after
    # the perturbation); the behaviour model is the clean one again
    for key in ("policy", "behavior"):
        assert _equal(record.after[1][key], record.after[0][key])
    assert not _equal(record.after[1]["behavior"], record.before[1]["behavior"])
    assert record.after[1]["adam_steps"] == record.before[1]["adam_steps"]
    assert record.after[1]["last_epoch"] == record.before[1]["last_epoch"]
    assert not _equal(record.after[2]["policy"], record.before[2]["policy"])


@pytest.mark.parametrize(("min_lr", "expected"), [(0.0, 1e-3 * 0.25), (5e-4, 5e-4)])
def test_lower_lr_multiplies_the_learning_rate(random_model_dir, min_lr, expected) -> None:
    module = _module(random_model_dir, optimizer=partial(AdamW, lr=1e-3))
    guard = CollapseGuard(max_kl=1.0, action="lower_lr", lr_factor=0.25, min_lr=min_lr)
    record = Record()
    _fit(module, 3, [guard, PerturbBehavior({1}), record])
    assert guard.fired_by_signal == {"max_kl": 1}
    assert [r["lr"] for r in record.after] == [1e-3, expected, expected]
    assert [r["base_lrs"] for r in record.after] == [[1e-3], [expected], [expected]]
    assert not _equal(record.after[1]["policy"], record.before[1]["policy"])  # not undone


def test_stop_ends_training_early(random_model_dir) -> None:
    module = _module(random_model_dir)
    guard = CollapseGuard(max_kl=1.0, action="stop")
    trainer = _fit(module, 4, [guard, PerturbBehavior({1})])
    assert guard.fired_count == 1
    assert trainer.global_step == 4 < trainer.max_steps == 8  # stopped after iteration 1


def test_rollback_restores_the_last_good_snapshot(random_model_dir) -> None:
    module = _module(random_model_dir, optimizer=partial(AdamW, lr=1e-2))
    guard, record = CollapseGuard(max_kl=1.0, action="rollback", snapshot_every=2), Record()
    _fit(module, 4, [guard, PerturbBehavior({3}), record])
    assert guard.fired_by_signal == {"max_kl": 1}
    # healthy iterations 0 and 1 refresh the snapshot at the end of 1; iteration 2 is healthy
    # but the next refresh would need 2 more; iteration 3 fires and goes back to the end of 1
    for key in ("policy", "behavior"):
        assert _equal(record.after[3][key], record.after[1][key])
    assert record.after[3]["adam_steps"] == record.after[1]["adam_steps"]
    assert record.after[3]["last_epoch"] == record.after[1]["last_epoch"]
    assert not _equal(record.after[3]["policy"], record.before[3]["policy"])  # not a skip


def test_warn_on_a_kl_spike_over_the_running_mean(random_model_dir) -> None:
    module = _module(random_model_dir, optimizer=partial(AdamW, lr=1e-2))
    guard = CollapseGuard(kl_spike_factor=10.0, warmup_steps=2, action="warn")
    record = Record()
    with pytest.warns(UserWarning, match=r"CollapseGuard fired at global step 8: mismatch KL "
                                         r"\S+ > kl_spike_factor 10 × running mean"):
        _fit(module, 4, [guard, PerturbBehavior({3}), record])
    # iterations 0-2 feed the running mean (warm-up: 2); iteration 3 spikes
    assert guard.fired_by_signal == {"kl_spike": 1}
    assert guard.kl_ema_count == 3
    assert [r["fired"] for r in record.after] == [0.0, 0.0, 0.0, 1.0]
    assert not _equal(record.after[3]["policy"], record.before[3]["policy"])  # warn only
    assert guard.firing and not guard.restored_weights  # a save now holds what it fired on


# ------------------------------------------------------------------------------- escalation
HEALTHY, COLLAPSED = 1.0, 0.0  # entropy of the stand-in's tokens; the guard's floor is 0.5


def _entropy_records(entropies: list[float]) -> Any:
    """Update records for the stand-in module: one token with r = 1 (KL 0, ESS 1) and the
    given entropy in each rollout batch."""
    half = math.log(0.5)
    return lambda rank, batch_idx: [_record([half], [half], [entropies[batch_idx]], [True])]


class Escalation(L.Callback):
    """After the guard: the learning rate, ``firing`` and the consecutive-trigger count at the
    end of every rollout batch."""

    def __init__(self, guard: CollapseGuard) -> None:
        self.guard = guard
        self.lr: list[float] = []
        self.firing: list[bool] = []
        self.restored: list[bool] = []
        self.consecutive: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.lr.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.firing.append(self.guard.firing)
        self.restored.append(self.guard.restored_weights)
        self.consecutive.append(float(trainer.callback_metrics["guard/consecutive_triggers"]))


def _fit_stand_in(entropies: list[float], guard: CollapseGuard) -> Escalation:
    escalation = Escalation(guard)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[guard, escalation])
    trainer.fit(HandBuiltUpdates(_entropy_records(entropies), batches=len(entropies)))
    return escalation


def test_escalate_halves_the_learning_rate_then_stops_with_the_signals() -> None:
    guard = CollapseGuard(min_entropy=0.5)  # escalate: lr_factor 0.5, 3 triggers in a row
    assert guard.action == "escalate" and guard.firing is False
    escalation = Escalation(guard)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[guard, escalation])
    entropies = [HEALTHY, COLLAPSED, COLLAPSED, 0.25, HEALTHY]
    with pytest.warns(UserWarning, match="Action 'escalate'"), \
            pytest.raises(TrainingCollapsed) as raised:
        trainer.fit(HandBuiltUpdates(_entropy_records(entropies), batches=len(entropies)))
    # the stand-in's SGD starts at lr 0.1: 0.1 → 0.1 × 0.5 = 0.05 → 0.05 × 0.5 = 0.025; the
    # third trigger (batch 3) stops before another reduction and before the recorder runs
    assert escalation.lr == [0.1, 0.05, 0.025]
    assert escalation.firing == [False, True, True]
    # each trigger rolled the weights back to the state batch 0 started from (step 0)
    assert escalation.restored == [False, True, True]
    assert escalation.consecutive == [0.0, 1.0, 2.0]
    assert guard.firing and guard.consecutive_triggers == 3 and guard.lr_reductions == 2
    assert trainer.should_stop
    assert guard.fired_by_signal == {"min_entropy": 3}
    collapsed = raised.value
    assert collapsed.signals == {"min_entropy": 0.25}
    assert collapsed.triggers == ["rollout batch 1: entropy 0 < min_entropy 0.5",
                                  "rollout batch 2: entropy 0 < min_entropy 0.5",
                                  "rollout batch 3: entropy 0.25 < min_entropy 0.5"]
    assert collapsed.last_good_step == 0 and collapsed.exit_code == 3
    assert str(collapsed).startswith(
        "CollapseGuard stopped training: the collapse signs fired in 3 consecutive rollout "
        "batches, though each earlier trigger rolled back and lowered the learning rate "
        "(rollout batch 1: entropy 0 < min_entropy 0.5; rollout batch 2: entropy 0 < "
        "min_entropy 0.5; rollout batch 3: entropy 0.25 < min_entropy 0.5). The weights hold "
        "the last good state, from global step 0.")


def test_one_allowed_trigger_stops_at_the_first() -> None:
    guard = CollapseGuard(min_entropy=0.5, max_consecutive_triggers=1)
    with pytest.raises(TrainingCollapsed) as raised:
        _fit_stand_in([HEALTHY, COLLAPSED, HEALTHY], guard)
    assert str(raised.value).startswith(
        "CollapseGuard stopped training: the collapse signs fired (rollout batch 1: entropy 0 "
        "< min_entropy 0.5). The weights hold the last good state, from global step 0.")
    assert guard.lr_reductions == 0


def test_only_confirmed_progress_resets_the_consecutive_count() -> None:
    guard = CollapseGuard(min_entropy=0.5, lr_factor=0.1, min_lr=0.002)
    entropies = [HEALTHY, COLLAPSED, HEALTHY, COLLAPSED, HEALTHY, HEALTHY, COLLAPSED, HEALTHY]
    with pytest.warns(UserWarning, match="CollapseGuard fired"):
        escalation = _fit_stand_in(entropies, guard)
    # batch 2 only re-confirms the state rolled back to: the count stays; batch 5 started from
    # weights trained after the roll-back and resets it; batch 6 is a first trigger again
    assert escalation.consecutive == [0.0, 1.0, 1.0, 2.0, 2.0, 0.0, 1.0, 1.0]
    assert escalation.firing == [False, True, False, True, False, False, True, False]
    # 0.1 × 0.1 = 0.01; 0.01 × 0.1 = 0.001 is below min_lr, so 0.002; then it stays there
    assert escalation.lr == pytest.approx([0.1, 0.01, 0.01, 0.002, 0.002, 0.002, 0.002, 0.002])
    assert guard.lr_reductions == 3 and guard.fired_count == 3


def test_a_resumed_guard_continues_its_escalation() -> None:
    before = CollapseGuard(min_entropy=0.5)
    with pytest.warns(UserWarning):
        _fit_stand_in([HEALTHY, COLLAPSED, HEALTHY, COLLAPSED], before)
    state = before.state_dict()
    assert state["consecutive_triggers"] == 2 and state["lr_reductions"] == 2
    resumed = CollapseGuard(min_entropy=0.5)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    # the third consecutive trigger, in the resumed run's first batch, stops it
    with pytest.raises(TrainingCollapsed, match=r"fired in 3 consecutive rollout batches, .*"
                                                r"rollout batch 1: .* rollout batch 3: .* "
                                                r"rollout batch 0: entropy 0 < min_entropy"):
        _fit_stand_in([COLLAPSED], resumed)
    # a checkpoint written before the escalation existed still loads, with nothing pending
    old = {"fired_count": 2, "fired_by_signal": {"max_kl": 2}, "kl_ema": 0.01,
           "kl_ema_count": 4}
    fresh = CollapseGuard(max_kl=1.0)
    fresh.load_state_dict(old)
    assert fresh.state_dict() == {**old, "reward_ema": None, "reward_ema_count": 0,
                                  "consecutive_triggers": 0, "lr_reductions": 0,
                                  "retrying": False, "triggers": []}


def test_reward_drop_compares_with_the_running_mean_after_warmup() -> None:
    guard = CollapseGuard(min_reward_fraction=0.25, warmup_steps=2)
    guard.reward_ema, guard.reward_ema_count = 0.4, 2
    # 0.25 × 0.4 = 0.1
    assert guard.check({"reward": 0.09}) == [
        ("min_reward", "mean reward 0.09 < min_reward_fraction 0.25 × running mean 0.4 = 0.1")]
    assert guard.check({"reward": 0.1}) == []
    guard.reward_ema_count = 1  # still warming up
    assert guard.check({"reward": 0.0}) == []
    guard.reward_ema, guard.reward_ema_count = -0.2, 2  # a mean that is not positive
    assert guard.check({"reward": -5.0}) == []
    # a value that prints like its threshold gets more digits
    assert CollapseGuard(min_ess=0.5).check({"ess": 0.49996}) == [
        ("min_ess", "ESS fraction 0.49996 < min_ess 0.5")]


def test_escalate_rolls_back_to_the_confirmed_state_and_marks_checkpoints(
        random_model_dir, tmp_path) -> None:
    module = _module(random_model_dir, optimizer=partial(AdamW, lr=1e-2))
    guard, record = CollapseGuard(max_kl=1.0), Record()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1,
                                  filename="{step}")
    with pytest.warns(UserWarning, match=r"global step 6: mismatch KL \S+ > max_kl 1\. Action "
                                         r"'escalate': rolled back to the good state of global "
                                         r"step 2; learning rate 0\.01 → 0\.005"):
        _fit(module, 4, [checkpoints, guard, PerturbBehavior({2}), record],
             enable_checkpointing=True)
    assert [r["fired"] for r in record.after] == [0.0, 0.0, 1.0, 0.0]
    # Iteration 1 (healthy) confirmed the state it started from, the end of iteration 0; the
    # end of iteration 1 was never confirmed, so iteration 2 goes back two iterations' worth
    for key in ("policy", "behavior"):
        assert _equal(record.after[2][key], record.after[0][key])
        assert not _equal(record.after[2][key], record.after[1][key])
    assert record.after[2]["adam_steps"] == record.after[0]["adam_steps"]
    assert record.after[2]["last_epoch"] == record.after[0]["last_epoch"]
    assert [r["lr"] for r in record.after] == [1e-2, 1e-2, 5e-3, 5e-3]
    assert [r["base_lrs"] for r in record.after] == [[1e-2], [1e-2], [5e-3], [5e-3]]
    assert guard.consecutive_triggers == 1  # iteration 3 only re-confirmed the restored state
    assert guard.last_good_step == 2 and not guard.firing

    def marker(step: int) -> dict[str, Any]:
        return torch.load(tmp_path / f"step={step}.ckpt", weights_only=False)[CHECKPOINT_KEY]

    assert marker(2) == {"firing": False, "fired": [], "signals": {},
                         "consecutive_triggers": 0, "weights_step": 2, "last_good_step": 0}
    assert marker(4) == {"firing": False, "fired": [], "signals": {},
                         "consecutive_triggers": 0, "weights_step": 4, "last_good_step": 2}
    fired = marker(6)
    assert fired["signals"]["max_kl"] == pytest.approx(record.after[2]["kl"])
    assert fired == {"firing": True, "fired": ["max_kl"], "signals": fired["signals"],
                     "consecutive_triggers": 1, "weights_step": 2, "last_good_step": 2}
    # the save made while firing holds the restored weights, those of the step-2 save; the
    # step-4 save holds the rejected ones (weights_step 4 > last_good_step 2)
    saved = {s: torch.load(tmp_path / f"step={s}.ckpt", weights_only=False)["state_dict"]
             for s in (2, 4, 6)}
    assert _equal(saved[6], saved[2]) and not _equal(saved[4], saved[2])


# ------------------------------------------------------------------ the quickstart at lr = 10
QUICKSTART = Path(__file__).parents[2] / "examples" / "configs" / "quickstart.yaml"
SIGNAL = re.compile(r"(ESS fraction|entropy|mismatch KL|mean reward) \S+ [<>] "
                    r"(min_ess|min_entropy|max_entropy|max_kl|kl_spike_factor|"
                    r"min_reward_fraction) \S+")


def test_quickstart_guard_is_escalate_and_lr_10_never_ends_quietly_collapsed(
        tmp_path, capsys) -> None:
    """The quickstart at a learning rate 50 000 times its own (2e-4) collapses in its first
    rollout batch. The run must either stop with a non-zero status and the guard's message, or
    end with status 0 and a reward back within 20 % of its level before the collapse (the first
    rollout batch, sampled before any update). Collapsed means: the mean reward of the last 5
    rollout batches is below 80 % of that level."""
    guards = [c for c in yaml.safe_load(QUICKSTART.read_text())["trainer"]["callbacks"]
              if isinstance(c, dict) and c["class_path"].endswith("CollapseGuard")]
    assert len(guards) == 1 and "action" not in guards[0]["init_args"]  # the default
    override = tmp_path / "short.yaml"
    override.write_text(yaml.safe_dump({"trainer": {
        "max_steps": 80,  # 40 rollout batches at most
        "default_root_dir": str(tmp_path),
        "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": str(tmp_path), "name": "csv"}}]}}))
    code = 0
    with pytest.warns(UserWarning):
        try:
            main(["fit", "--config", str(QUICKSTART), "--config", str(override),
                  "--model.optimizer.init_args.lr=10"])
        except SystemExit as stopped:
            code = stopped.code
    (metrics,) = tmp_path.glob("csv/version_*/metrics.csv")
    with metrics.open() as file:
        rewards = [float(row["reward/mean"]) for row in csv.DictReader(file)
                   if row.get("reward/mean")]
    stderr = capsys.readouterr().err
    if code != 0:
        assert code == TrainingCollapsed.exit_code
        assert "trustregion: CollapseGuard stopped training: the collapse signs fired in 3 " \
               "consecutive rollout batches" in stderr
        assert SIGNAL.search(stderr), stderr[-2000:]
        assert "Traceback" not in stderr
    else:
        recovered = sum(rewards[-5:]) / 5
        assert recovered >= 0.8 * rewards[0], f"exited 0 with a collapsed model: {rewards}"


class ChangesWeightDecayAtTrainStart(TrustRegionModule):
    """A module whose own on_train_start changes an optimiser setting, as a resumed module does
    for a setting configured differently since the checkpoint (Lightning runs it after every
    callback's on_train_start)."""

    def on_train_start(self) -> None:
        super().on_train_start()
        for group in self.optimizers(use_pl_optimizer=False).param_groups:
            group["weight_decay"] = 0.5


def test_the_starting_good_state_includes_the_modules_on_train_start(random_model_dir) -> None:
    torch.manual_seed(0)
    module = ChangesWeightDecayAtTrainStart(
        policy=f"config:{random_model_dir}", task=DigitRichArithmetic(), **SMALL,
        optimizer=partial(AdamW, lr=1e-2, weight_decay=0.0))
    guard, record = CollapseGuard(max_kl=1.0), Record()
    with pytest.warns(UserWarning, match="rolled back to the good state of global step 0"):
        _fit(module, 1, [guard, PerturbBehavior({0}), record])
    # iteration 0 fired and rolled back to the state training started from, which holds the
    # weight decay the module set in its on_train_start, not the configured 0.0
    assert [r["fired"] for r in record.after] == [1.0]
    assert module.optimizers(use_pl_optimizer=False).param_groups[0]["weight_decay"] == 0.5
