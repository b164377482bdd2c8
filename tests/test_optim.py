"""The default optimiser and learning-rate schedule, by hand and inside the module."""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import DigitRichArithmetic

from trustregion.batching import BatchSettings
from trustregion.callbacks.snapshots import TrainingSnapshot
from trustregion.module import TrustRegionModule
from trustregion.optim import AdamW, LinearWarmup, fused_adamw_supported, optimizer_state_bytes
from trustregion.rollout import SamplingSettings


def _rates(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[list[float]]:
    """The learning rate of every parameter group at each of ``steps`` optimiser steps."""
    optimizer = scheduler.optimizer
    rates = []
    for _ in range(steps):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return rates


def _sgd(*lrs: float) -> torch.optim.SGD:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups)


def test_linear_warmup_by_hand() -> None:
    # lr_s = lr · min(1, (s + 1) / 4): s = 0, 1, 2, 3, 4 → 1/4, 2/4, 3/4, 1, 1 of lr = 0.1
    rates = _rates(LinearWarmup(_sgd(0.1), warmup_steps=4), steps=5)
    assert [r[0] for r in rates] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])


def test_linear_warmup_scales_every_group_by_its_own_rate() -> None:
    # the same factors, 0.5 then 1, times 0.2 and 0.01
    rates = _rates(LinearWarmup(_sgd(0.2, 0.01), warmup_steps=2), steps=3)
    assert rates == [pytest.approx([0.1, 0.005]), pytest.approx([0.2, 0.01]),
                     pytest.approx([0.2, 0.01])]


@pytest.mark.parametrize("warmup_steps", [0, 1])
def test_no_warmup_is_a_constant_rate(warmup_steps: int) -> None:
    scheduler = LinearWarmup(_sgd(0.3), warmup_steps=warmup_steps)
    assert [r[0] for r in _rates(scheduler, steps=3)] == [0.3, 0.3, 0.3]
    assert scheduler.factor(0) == 1.0


def test_linear_warmup_resumes_from_its_state_dict() -> None:
    first = LinearWarmup(_sgd(0.1), warmup_steps=4)
    _rates(first, steps=2)  # at step 2 now
    resumed = LinearWarmup(_sgd(0.1), warmup_steps=4)
    resumed.load_state_dict(first.state_dict())
    resumed.optimizer.param_groups[0]["lr"] = first.get_last_lr()[0]  # as the optimiser's state
    assert [r[0] for r in _rates(resumed, steps=3)] == pytest.approx([0.075, 0.1, 0.1])


@pytest.mark.parametrize("warmup_steps", [-1, 2.5, True, None])
def test_bad_warmup_steps_say_what_is_allowed(warmup_steps) -> None:
    with pytest.raises(ValueError, match=r"warmup_steps must be an integer ≥ 0 \(0: no warm-up\)"):
        LinearWarmup(_sgd(0.1), warmup_steps=warmup_steps)


def test_adamw_defaults() -> None:
    optimizer = AdamW([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["lr"] == 1e-4
    assert optimizer.defaults["weight_decay"] == 0.0
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["eps"] == 1e-8
    assert AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4).defaults["lr"] == 3e-4


def test_adamw_fuses_plain_tensors_and_matches_the_loop() -> None:
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))]
    copies = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    start = [w.detach().clone() for w in weights]
    fused, loop = AdamW(weights, lr=1e-2), AdamW(copies, lr=1e-2, fused=False)
    assert fused.defaults["fused"] is True and loop.defaults["fused"] is False
    for _ in range(10):
        grads = [torch.randn_like(w) for w in weights]
        for params, optimizer in ((weights, fused), (copies, loop)):
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad.clone()
            optimizer.step()
    # The same AdamW step in another order of operations: within a few float32 ulps of
    # weights of order 1, while ten steps of lr 1e-2 moved every weight by up to 0.1.
    for w, c, s in zip(weights, copies, start, strict=True):
        torch.testing.assert_close(w, c, rtol=0, atol=1e-6)
        assert (w - s).abs().max() > 0.05


def test_adamw_keeps_the_loop_where_fusing_does_not_apply() -> None:
    # an integer buffer in the list: torch's fused kernel refuses it, so the loop is kept
    weight = torch.nn.Parameter(torch.zeros(2))
    assert AdamW([weight]).defaults["fused"] is True
    assert AdamW([{"params": [weight]}]).defaults["fused"] is True
    assert not fused_adamw_supported([])
    assert not fused_adamw_supported([weight, torch.zeros(2, dtype=torch.long)])


# --------------------------------------------------------------------------- in the module
def _module(random_model_dir: Path, **parts) -> TrustRegionModule:
    torch.manual_seed(0)
    return TrustRegionModule(
        policy=f"config:{random_model_dir}", task=DigitRichArithmetic(),
        batching=BatchSettings(group_size=4, prompts_per_step=2, mini_batch_size=4),
        sampling=SamplingSettings(max_new_tokens=3), **parts)


class _Rates(L.Callback):
    """The logged ``train/lr`` of every rollout batch."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rates.append(float(trainer.callback_metrics["train/lr"]))


def _fit(module: TrustRegionModule, steps: int, *callbacks: L.Callback) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1, callbacks=list(callbacks))
    trainer.fit(module)
    return trainer


def test_the_module_steps_the_schedule_once_per_optimiser_step(random_model_dir) -> None:
    # 8 sequences in mini-batches of 4: 2 optimiser steps per rollout batch. train/lr is the
    # rate after a batch's steps: after s = 2 steps 3/4 · lr, after s = 4 steps lr (and after).
    module = _module(random_model_dir, optimizer=partial(AdamW, lr=0.01),
                     lr_scheduler=partial(LinearWarmup, warmup_steps=4))
    rates = _Rates()
    trainer = _fit(module, 6, rates)
    assert rates.rates == pytest.approx([0.0075, 0.01, 0.01])
    (config,) = trainer.lr_scheduler_configs
    assert type(config.scheduler) is LinearWarmup and config.interval == "step"
    assert config.scheduler.last_epoch == 6


def test_any_torch_optimiser_and_scheduler_can_be_injected(random_model_dir) -> None:
    # SGD at 0.1, halved after every optimiser step: after 2 steps 0.025, after 4 steps 0.00625
    module = _module(random_model_dir, optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9),
                     lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1,
                                          gamma=0.5))
    rates = _Rates()
    trainer = _fit(module, 4, rates)
    (optimizer,) = trainer.optimizers
    assert type(optimizer) is torch.optim.SGD and optimizer.param_groups[0]["momentum"] == 0.9
    assert all("momentum_buffer" in optimizer.state[p] for p in module.policy.parameters())
    assert rates.rates == pytest.approx([0.025, 0.00625])
    assert type(trainer.lr_scheduler_configs[0].scheduler) is torch.optim.lr_scheduler.StepLR


def test_the_default_is_adamw_at_1e_4_without_warmup(random_model_dir) -> None:
    module = _module(random_model_dir)
    rates = _Rates()
    trainer = _fit(module, 2, rates)
    (optimizer,) = trainer.optimizers
    assert type(optimizer) is AdamW and optimizer.param_groups[0]["lr"] == 1e-4
    assert type(trainer.lr_scheduler_configs[0].scheduler) is LinearWarmup
    assert rates.rates == pytest.approx([1e-4])


# ------------------------------------------------------------------- bitsandbytes 8-bit AdamW
# The shipped tiny model (hidden size 128): its q_proj weight has 128 · 128 = 16384 elements, at
# least bitsandbytes' min_8bit_size (4096), so both its moments are uint8; the final norm's 128
# elements stay below it, so its moments stay fp32.
LARGE = "model.layers.0.self_attn.q_proj.weight"
SMALL = "model.norm.weight"
BLOCK = 256  # values per quantisation block of bitsandbytes' 8-bit optimisers


def _adamw8bit_module() -> TrustRegionModule:
    import bitsandbytes as bnb
    torch.manual_seed(0)
    return TrustRegionModule(
        policy="tiny-char-llama", task=DigitRichArithmetic(),
        batching=BatchSettings(group_size=2, prompts_per_step=2, mini_batch_size=4),
        sampling=SamplingSettings(max_new_tokens=3), seed=0,
        optimizer=partial(bnb.optim.AdamW8bit, lr=1e-3, weight_decay=0.0))


class _Gradients(L.Callback):
    """The policy's gradients as the optimiser receives them (after clipping)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads = {name: p.grad.detach().clone()
                      for name, p in pl_module.policy.named_parameters() if p.grad is not None}


def _state(optimizer: torch.optim.Optimizer, module: TrustRegionModule, name: str) -> dict:
    return optimizer.state[dict(module.policy.named_parameters())[name]]


def _assert_states_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert actual[key].dtype == value.dtype and torch.equal(actual[key], value), key
        elif isinstance(value, dict):
            _assert_states_equal(actual[key], value)
        else:
            assert actual[key] == value, key


def test_adamw8bit_keeps_large_moments_as_uint8_codes() -> None:
    import bitsandbytes.functional as F
    module = _adamw8bit_module()
    gradients = _Gradients()
    trainer = _fit(module, 1, gradients)
    (optimizer,) = trainer.optimizers
    state = _state(optimizer, module, LARGE)
    assert state["step"] == 1
    assert state["state1"].dtype == state["state2"].dtype == torch.uint8
    assert state["state1"].shape == state["state2"].shape == (128, 128)
    # the maps of the 256 codes: signed for the first moment, unsigned for the second
    assert torch.equal(state["qmap1"], F.create_dynamic_map(signed=True))
    assert torch.equal(state["qmap2"], F.create_dynamic_map(signed=False))
    # one fp32 scale per block: 16384 / 256 = 64 blocks, each the block's largest |moment|.
    # After one step from zero: m = (1 − β1) · g = 0.1 · g and v = (1 − β2) · g² = 0.001 · g².
    g = gradients.grads[LARGE].reshape(-1, BLOCK)
    m, v = 0.1 * g, 0.001 * g * g
    assert state["absmax1"].shape == state["absmax2"].shape == (64,)
    torch.testing.assert_close(state["absmax1"], m.abs().amax(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(state["absmax2"], v.amax(1), rtol=1e-5, atol=0)
    # the codes decode to the moments within half the widest gap between two codes (× scale)
    for moment, codes, absmax, qmap in ((m, "state1", "absmax1", "qmap1"),
                                        (v, "state2", "absmax2", "qmap2")):
        decoded = F.dequantize_blockwise(state[codes], absmax=state[absmax],
                                         code=state[qmap], blocksize=BLOCK).reshape(-1, BLOCK)
        bound = state[qmap].diff().max() / 2 * state[absmax][:, None]
        assert ((decoded - moment).abs() <= bound * (1 + 1e-5)).all(), codes
    small = _state(optimizer, module, SMALL)
    assert small["state1"].dtype == small["state2"].dtype == torch.float32
    assert "qmap1" not in small


def test_optimizer_state_bytes_adamw_vs_adamw8bit() -> None:
    import bitsandbytes as bnb
    weight = torch.nn.Parameter(torch.zeros(128, 128))
    adamw, adamw8bit = AdamW([weight]), bnb.optim.AdamW8bit([weight])
    weight.grad = torch.ones_like(weight)
    adamw.step()
    adamw8bit.step()
    # AdamW: two fp32 moments, 2 · 16384 · 4 = 131072, and a fp32 step tensor, 4
    assert optimizer_state_bytes(adamw) == 131076
    # AdamW8bit: two uint8 moments, 2 · 16384 = 32768; two maps of 256 fp32 codes, 2048; two
    # scales per 256-value block, 2 · 64 · 4 = 512; the step is a plain int
    assert optimizer_state_bytes(adamw8bit) == 35328
    # a second parameter shares the maps: + 2 · 16384 + 2 · 64 · 4 = 33280
    other = torch.nn.Parameter(torch.zeros(128, 128))
    both = bnb.optim.AdamW8bit([weight, other])
    other.grad = torch.ones_like(other)
    both.step()
    assert optimizer_state_bytes(both) == 35328 + 33280


def test_adamw8bit_state_survives_a_checkpoint(tmp_path) -> None:
    first = _adamw8bit_module()
    trainer = _fit(first, 1)
    path = tmp_path / "step1.ckpt"
    trainer.save_checkpoint(path)
    saved = trainer.optimizers[0].state_dict()

    class Restored(L.Callback):
        """The optimiser's state as restored, before the resumed run's first step."""

        def on_train_start(self, trainer, pl_module) -> None:
            self.state = copy.deepcopy(trainer.optimizers[0].state_dict())

    resumed, restored = _adamw8bit_module(), Restored()
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[restored])
    trainer.fit(resumed, ckpt_path=path)
    _assert_states_equal(restored.state, saved)
    state = _state(trainer.optimizers[0], resumed, LARGE)
    assert state["step"] == 2 and state["state1"].dtype == torch.uint8  # and it kept training


def test_adamw8bit_state_survives_a_rollback() -> None:
    module = _adamw8bit_module()
    trainer = _fit(module, 1)
    (optimizer,) = trainer.optimizers
    snapshot = TrainingSnapshot.capture(module)
    before = copy.deepcopy(optimizer.state_dict())
    # one more step changes the codes, the scales and the step count
    module.policy.zero_grad()
    for p in module.policy.parameters():
        p.grad = torch.full_like(p, 0.5)
    optimizer.step()
    assert _state(optimizer, module, LARGE)["step"] == 2
    snapshot.restore(module, keep=True)
    _assert_states_equal(optimizer.state_dict(), before)
    assert _state(optimizer, module, LARGE)["state1"].dtype == torch.uint8
