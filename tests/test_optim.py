"""The default optimiser and learning-rate schedule, by hand and inside the module."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import DigitRichArithmetic

from trustregion.batching import BatchSettings
from trustregion.module import TrustRegionModule
from trustregion.optim import AdamW, LinearWarmup
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
