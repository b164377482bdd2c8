"""The module at each precision: behaviour and reference built at their own precision, synced by
re-quantising the policy's weights, restored exactly by checkpoints and rollbacks, computing
outside the trainer's autocast; and the drift each behaviour precision causes, in its order."""

from __future__ import annotations

import itertools
from functools import partial
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import lightning as L
import pytest
import torch
from conftest import DigitRichArithmetic
from row_logger import RowLogger

from trustregion.batching import BatchSettings
from trustregion.callbacks import DriftMonitor
from trustregion.callbacks.snapshots import TrainingSnapshot
from trustregion.models.loading import TINY
from trustregion.module import TrustRegionModule
from trustregion.optim import AdamW
from trustregion.penalties import ReferenceKL
from trustregion.precision import PrecisionSettings, low_precision_copy
from trustregion.precision.trainer import check_trainer_precision
from trustregion.rollout import SamplingSettings
from trustregion.sharding import check_strategy
from trustregion.tasks import Arithmetic

SMALL: dict[str, Any] = {
    "batching": BatchSettings(group_size=2, prompts_per_step=4, mini_batch_size=4),
    "sampling": SamplingSettings(max_new_tokens=4),
}


def _module(precision: PrecisionSettings, **kwargs: Any) -> TrustRegionModule:
    """The shipped model on a task that rewards any digit, with a learning rate high enough
    that one optimiser step moves the int8 / nf4 / fp8 codes."""
    torch.manual_seed(0)
    return TrustRegionModule(policy=TINY, task=DigitRichArithmetic(), precision=precision,
                             optimizer=partial(AdamW, lr=1e-2), **{**SMALL, **kwargs})


def _trainer(directory: Path, **kwargs: Any) -> L.Trainer:
    return L.Trainer(logger=RowLogger(directory), log_every_n_steps=1,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu", **kwargs)


def _projections(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for name, m in model.named_modules() if name.endswith("_proj")]


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    left, right = a.state_dict(), b.state_dict()
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


# ------------------------------------------------------------------------ construction
def test_behaviour_and_reference_are_built_at_their_own_precision() -> None:
    module = _module(PrecisionSettings(behavior="int8", reference="nf4"),
                     penalties=[ReferenceKL(beta=0.1)])
    assert module.reference is not None
    for model, kind in ((module.behavior, bnb.nn.Linear8bitLt),
                        (module.reference, bnb.nn.Linear4bit)):
        assert len(_projections(model)) == 3 * 7  # q, k, v, o, gate, up, down in 3 layers
        assert all(isinstance(m, kind) for m in _projections(model))
    # the policy itself stays a plain fp32 model that trains
    assert all(type(m) is torch.nn.Linear for m in _projections(module.policy))
    assert all(p.dtype == torch.float32 and p.requires_grad for p in module.policy.parameters())
    assert not any(p.requires_grad for p in module.behavior.parameters())
    assert module.hparams["precision"] == {"behavior": "int8", "reference": "nf4",
                                           "policy": "auto", "compute": "bf16",
                                           "quantize_lm_head": False}


def test_a_cast_behaviour_has_the_policy_weights_rounded_to_its_dtype() -> None:
    module = _module(PrecisionSettings(behavior="bf16"))
    for name, value in module.policy.state_dict().items():
        held = module.behavior.state_dict()[name]
        assert held.dtype == torch.bfloat16, name
        assert torch.equal(held, value.to(torch.bfloat16)), name


# ----------------------------------------------------------------------------- sync
def _move(model: torch.nn.Module, seed: int) -> None:
    """Move every weight by noise of about a tenth of its own scale (enough to change int8,
    nf4 and fp8 codes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(0.1 * parameter.abs().mean() * noise)


@pytest.mark.parametrize("precision", ["int8", "nf4", "fp8"])
def test_sync_requantises_the_updated_policy(precision: str) -> None:
    module = _module(PrecisionSettings(behavior=precision))
    initial = low_precision_copy(module.policy, precision)
    _same_state(module.behavior, initial)  # built from the initial policy
    _move(module.policy, seed=1)
    module.sync_behavior()
    _same_state(module.behavior, low_precision_copy(module.policy, precision))
    assert any(not torch.equal(v, initial.state_dict()[k])
               for k, v in module.behavior.state_dict().items())


# ----------------------------------------------------------------- rollbacks, checkpoints
@pytest.mark.parametrize("precision", ["int8", "nf4", "fp8"])
def test_a_training_state_restores_a_quantised_behaviour_exactly(precision: str,
                                                                 tmp_path: Path) -> None:
    module = _module(PrecisionSettings(behavior=precision))
    _trainer(tmp_path, max_steps=1).fit(module)  # a trainer holds the optimiser state
    snapshot = TrainingSnapshot.capture(module)
    before = {k: v.clone() for k, v in module.behavior.state_dict().items()}
    _move(module.policy, seed=1)
    module.sync_behavior()
    assert any(not torch.equal(v, before[k]) for k, v in module.behavior.state_dict().items())
    snapshot.restore(module, keep=True)
    after = module.behavior.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


@pytest.mark.parametrize("precision", ["int8", "nf4", "fp8"])
def test_a_checkpoint_restores_a_stale_quantised_behaviour(precision: str,
                                                           tmp_path: Path) -> None:
    module = _module(PrecisionSettings(behavior=precision), sync_every=3)
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module)
    _move(module.policy, seed=2)  # the policy moves on; the behaviour is not synced
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    resumed = _module(PrecisionSettings(behavior=precision), sync_every=3)
    resumed.load_state_dict(torch.load(path, weights_only=False)["state_dict"])
    _same_state(resumed.policy, module.policy)
    _same_state(resumed.behavior, module.behavior)  # the stale weights, not the policy's
    stale = resumed.behavior.state_dict()
    assert any(not torch.equal(v, stale[k])
               for k, v in low_precision_copy(resumed.policy, precision).state_dict().items())


# ------------------------------------------------------------------------- autocast
def test_the_behaviour_samples_at_its_own_precision_under_bf16_autocast(tmp_path: Path
                                                                        ) -> None:
    module = _module(PrecisionSettings(behavior="fp32"))
    seen: list[torch.dtype] = []
    hook = module.behavior.lm_head.register_forward_hook(
        lambda _m, _i, out: seen.append(out.dtype))
    _trainer(tmp_path, max_steps=1, precision="bf16-mixed").fit(module)
    hook.remove()
    assert seen and set(seen) == {torch.float32}  # not bf16, although training autocasts


# ----------------------------------------------------------------------------- errors
def test_trainer_precision_that_casts_every_model_is_refused_for_another_behaviour(
        tmp_path: Path) -> None:
    module = _module(PrecisionSettings(behavior="fp32"))
    with pytest.raises(ValueError, match=r"bf16-true.*precision\.behavior.*'fp32'"):
        _trainer(tmp_path, max_steps=1, precision="bf16-true").fit(module)


# ---------------------------------------------------------------------- the drift panel
DRIFT_ORDER = ("fp32", "fp16", "bf16", "int8", "fp8", "nf4")
"""Behaviour precisions from least to most drift, measured on the shipped tiny model (int8,
fp8 and nf4 computing in bf16, the default). TV mean / k3 at seed 0: fp32 6.4e-8 / 1.6e-13,
fp16 1.5e-4 / 1.1e-6, bf16 1.1e-3 / 3.0e-5, int8 1.7e-3 / 7.7e-5, fp8 2.3e-3 / 2.0e-4,
nf4 9.4e-3 / 6.0e-3; seed 1 gives the same order."""


def _behaviour_drift(precision: str, directory: Path) -> dict[str, float]:
    """The drift panel's π-vs-μ values of one rollout batch, with behaviour = the policy's own
    weights at ``precision`` (sync_every=1; one optimiser step, so every token is scored
    before the policy moves)."""
    torch.manual_seed(0)
    module = TrustRegionModule(
        policy=TINY, task=Arithmetic(), precision=PrecisionSettings(behavior=precision),
        batching=BatchSettings(group_size=8, prompts_per_step=16, mini_batch_size=128),
        sampling=SamplingSettings(max_new_tokens=4), sync_every=1, seed=0)
    directory.mkdir()
    _trainer(directory, max_steps=1, callbacks=[DriftMonitor()]).fit(module)
    ((_, row),) = torch.load(directory / "rows0.pt")
    return {"tv": row["drift/behavior/tv_mean"], "k3": row["drift/behavior/kl_k3"]}


def test_each_behaviour_precision_drifts_in_the_measured_order(tmp_path: Path) -> None:
    drift = {p: _behaviour_drift(p, tmp_path / p) for p in DRIFT_ORDER}
    assert drift["fp32"]["tv"] < 1e-6  # the same weights: drift only from sampling numerics
    for precision in DRIFT_ORDER[1:]:  # rounding the weights is visible on the panel
        assert drift[precision]["tv"] > 100 * drift["fp32"]["tv"], precision
    for lower, higher in itertools.pairwise(DRIFT_ORDER):
        for stat in ("tv", "k3"):
            assert drift[higher][stat] > drift[lower][stat], (lower, higher, stat, drift)


# ------------------------------------------------------------------- policy precisions
def test_a_bf16_true_run_trains_bf16_weights_with_a_bf16_behaviour(tmp_path: Path) -> None:
    module = _module(PrecisionSettings(behavior="bf16"))
    _trainer(tmp_path, max_steps=1, precision="bf16-true").fit(module)
    assert {p.dtype for p in module.policy.parameters()} == {torch.bfloat16}
    # synced after the step: the behaviour holds the policy's bf16 weights exactly
    _same_state(module.behavior, module.policy)


def test_an_fp8_policy_trains_its_linear_layers_in_float8_and_syncs_plain_weights(
        tmp_path: Path) -> None:
    from torchao.float8.float8_linear import Float8Linear

    module = _module(PrecisionSettings(behavior="fp32", policy="fp8"))
    converted = [m for m in _projections(module.policy) if isinstance(m, Float8Linear)]
    assert len(converted) == 3 * 7  # every projection; the 47-row lm_head is left alone
    assert not isinstance(module.policy.lm_head, Float8Linear)
    assert all(type(m) is torch.nn.Linear for m in _projections(module.behavior))
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    _move(module.policy, seed=3)
    module.sync_behavior()
    _same_state(module.behavior, module.policy)  # fp32 behaviour: the weights themselves
    assert any(not torch.equal(v, before[k]) for k, v in module.behavior.state_dict().items())
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module)
    assert "torchao float8" in module.precision_summary()


def test_16_mixed_is_refused_for_its_late_unscaling() -> None:
    # On a CPU Lightning turns 16-mixed into bf16-mixed, so the check is called directly.
    with pytest.raises(ValueError, match=r"'16-mixed' is not supported: .* use "
                                         r"trainer.precision='bf16-mixed'"):
        check_trainer_precision("16-mixed", PrecisionSettings(), has_reference=False)
    with pytest.raises(ValueError, match=r"must be one of 32-true, bf16-mixed, bf16-true, "
                                         r"16-true with trustregion; got '64-true'"):
        check_trainer_precision("64-true", PrecisionSettings(), has_reference=False)


def test_strategies_other_than_one_device_ddp_and_fsdp2_are_refused() -> None:
    from lightning.pytorch.strategies import (
        DDPStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
        SingleDeviceStrategy,
    )

    for supported in (SingleDeviceStrategy("cpu"), DDPStrategy(), ModelParallelStrategy()):
        check_strategy(supported)
    with pytest.raises(ValueError, match=r"trainer.strategy FSDPStrategy is not supported; .*"
                                         r"ModelParallelStrategy .*'fsdp' strategy is FSDP1"):
        check_strategy(FSDPStrategy())
