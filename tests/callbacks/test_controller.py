from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import DigitRichArithmetic

from trustregion.batching import BatchSettings
from trustregion.callbacks import TrustRegionController
from trustregion.interface import UpdateRecord
from trustregion.module import TrustRegionModule
from trustregion.rollout import SamplingSettings
from trustregion.strategies import (
    DRPO,
    ImportanceSampledPG,
    LogRatioQuadratic,
    RatioClip,
    StrategyOutput,
    TokenBatch,
)

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


def _trainer(max_steps: int, callbacks: list[L.Callback]) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     log_every_n_steps=1, callbacks=callbacks)


def _outside_record(outside: list[bool], mask: list[int]) -> UpdateRecord:
    shape = (1, len(mask))
    batch = TokenBatch(logp=torch.zeros(shape), behavior_logp=torch.zeros(shape),
                       advantages=torch.ones(1), mask=torch.tensor([mask]))
    output = StrategyOutput(token_loss=torch.zeros(shape), metrics={},
                            weight=torch.ones(shape), outside=torch.tensor([outside]))
    return UpdateRecord(batch=batch, output=output)


def _kl_record() -> UpdateRecord:
    # μ = 0.25; π = 0.5, 0.25, 0.125 (r = 2, 1, 0.5); a masked padding token holds NaN.
    # k3 = 1/r − 1 + log r = (−0.5 + ln 2) + 0 + (1 − ln 2), sum 0.5, mean KL = 1/6.
    mu, nan = math.log(0.25), float("nan")
    logp = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.125), nan]])
    batch = TokenBatch(logp=logp, behavior_logp=torch.tensor([[mu, mu, mu, nan]]),
                       advantages=torch.ones(1), mask=torch.tensor([[1, 1, 1, 0]]))
    output = StrategyOutput(token_loss=torch.zeros(1, 4), metrics={},
                            weight=torch.ones(1, 4), outside=torch.zeros(1, 4, dtype=torch.bool))
    return UpdateRecord(batch=batch, output=output)


# 2 of 4 masked tokens outside (the masked fifth one does not count): outside fraction 0.5
HALF_OUTSIDE = [_outside_record([True, False, True, False, True], [1, 1, 1, 1, 0])]
NONE_OUTSIDE = [_outside_record([False, False, False, False], [1, 1, 1, 1])]


def test_outside_fraction_above_target_widens_below_narrows() -> None:
    strategy = RatioClip(epsilon=0.2, epsilon_high=0.28)
    controller = TrustRegionController("outside_frac", target_value=0.1, gain=0.1)
    assert controller.observe(HALF_OUTSIDE) == 0.5
    # e = clip(0.5 / 0.1 − 1 = 4, −0.2, 0.2) = 0.2; factor = 1 + 0.1 × 0.2 = 1.02
    assert controller.step(strategy, 0.5) == pytest.approx(1.02)
    assert strategy.epsilon == pytest.approx(0.2 * 1.02)
    assert strategy.epsilon_high == pytest.approx(0.28 * 1.02)
    assert strategy.epsilon_low is None  # an inheriting width keeps inheriting
    assert strategy.dual_clip_cap == math.inf  # no bound stays no bound
    # observed 0: e = clip(0 / 0.1 − 1 = −1) = −0.2; factor 0.98 (narrow)
    assert controller.observe(NONE_OUTSIDE) == 0.0
    controller.step(strategy, 0.0)
    assert strategy.epsilon == pytest.approx(0.2 * 1.02 * 0.98)
    assert controller.scale == pytest.approx(1.02 * 0.98)
    # unclipped: observed 0.11, e = 0.11 / 0.1 − 1 = 0.1, factor 1.01
    assert controller.factor(0.11) == pytest.approx(1.01)


def test_widening_lowers_a_penalty_strength() -> None:
    # LogRatioQuadratic's width is τ with direction −1: a wider region is a smaller τ
    strategy = LogRatioQuadratic(penalty_strength=1.0)
    controller = TrustRegionController("outside_frac", target_value=0.1, gain=0.1)
    controller.step(strategy, 0.5)
    assert strategy.penalty_strength == pytest.approx(1 / 1.02)


def test_dual_clip_scales_its_distance_from_one_and_stays_valid() -> None:
    # c = 3 is 2 above its origin 1: scale 0.1 → 1 + 2 × 0.1 = 1.2 (still > 1, a valid dual
    # clip; scaling c itself would give 0.3); scale 2 → 1 + 2 × 2 = 5
    narrow = RatioClip(dual_clip_cap=3.0)
    narrow.scale_width(0.1)
    assert narrow.dual_clip_cap == pytest.approx(1.2)
    assert narrow.epsilon == pytest.approx(0.02)
    RatioClip(**narrow.hparams())  # the constructor accepts every scaled value
    wide = RatioClip(dual_clip_cap=3.0)
    wide.scale_width(2.0)
    assert wide.dual_clip_cap == pytest.approx(5.0)


def test_kl_above_target_narrows_below_widens() -> None:
    records = [_kl_record()]
    high = TrustRegionController("kl", target_value=0.1, gain=0.1)
    assert high.observe(records) == pytest.approx(1 / 6, rel=1e-6)
    strategy = DRPO(delta=0.15)
    # e = clip((1/6) / 0.1 − 1 = 0.667) = 0.2; factor = 1 − 0.1 × 0.2 = 0.98
    high.step(strategy, high.observe(records))
    assert strategy.delta == pytest.approx(0.15 * 0.98)
    low = TrustRegionController("kl", target_value=1.0, gain=0.1)
    # e = clip((1/6) / 1 − 1 = −0.833) = −0.2; factor = 1.02
    low.step(strategy, low.observe(records))
    assert strategy.delta == pytest.approx(0.15 * 0.98 * 1.02)
    # unclipped: target (1/6) / 1.1 gives e = 0.1, factor 1 − 0.01 = 0.99
    assert TrustRegionController("kl", (1 / 6) / 1.1).factor(1 / 6) == pytest.approx(0.99)


def test_cumulative_scale_is_clamped_to_its_bounds() -> None:
    strategy = DRPO(delta=0.15, delta_high=0.2)
    controller = TrustRegionController("outside_frac", 0.1, gain=0.5, max_scale=1.25,
                                       min_scale=0.8)
    # factor 1 + 0.5 × 0.2 = 1.1: 1.1, 1.21, then 1.331 is clamped to 1.25 (only ×1.25/1.21)
    applied = [controller.step(strategy, 0.5) for _ in range(4)]
    assert applied == pytest.approx([1.1, 1.1, 1.25 / 1.21, 1.0])
    assert controller.scale == pytest.approx(1.25)
    assert strategy.delta == pytest.approx(0.15 * 1.25)
    assert strategy.delta_high == pytest.approx(0.2 * 1.25)
    for _ in range(10):  # factor 0.9 each time, down to min_scale
        controller.step(strategy, 0.0)
    assert controller.scale == pytest.approx(0.8)
    assert strategy.delta == pytest.approx(0.15 * 0.8)
    assert controller.step(strategy, math.nan) == 1.0  # a non-finite observation is ignored
    assert controller.observe([]) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": "ratio"}, "unknown target 'ratio'"),
        ({"target_value": 0.0}, r"target_value for 'outside_frac' must be .* in \(0, 1.0\)"),
        ({"target_value": 1.0}, "target_value for 'outside_frac'"),
        ({"target": "kl", "target_value": -1.0}, "target_value for 'kl'"),
        ({"gain": 5.0}, r"gain must be a finite number in \(0, 5\)"),
        ({"min_scale": 1.5}, r"min_scale must be a finite number in \(0, 1\]"),
        ({"max_scale": 0.5}, "max_scale must be a finite number ≥ 1"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict[str, Any], message: str) -> None:
    arguments = {"target": "outside_frac", "target_value": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message):
        TrustRegionController(**arguments)


def test_strategy_without_widths_is_refused_at_setup(random_model_dir) -> None:
    module = _module(random_model_dir, trust_region=ImportanceSampledPG())
    controller = TrustRegionController("kl", 0.01)
    with pytest.raises(ValueError, match=r"cannot adapt strategy 'pg_is' \(ImportanceSampledPG\)"
                                         r": it has no width hyperparameter"):
        _trainer(2, [controller]).fit(module)


def test_scale_and_widths_survive_a_checkpoint_round_trip(random_model_dir, tmp_path) -> None:
    # Target KL 1.0 is far above the run's KL, so every iteration widens by exactly 1.02.
    module = _module(random_model_dir, trust_region=DRPO(delta=0.15))
    controller = TrustRegionController("kl", target_value=1.0, gain=0.1)
    trainer = _trainer(4, [controller])  # 2 iterations of 2 optimiser steps
    trainer.fit(module)
    assert controller.scale == pytest.approx(1.02**2)
    assert module.trust_region.delta == pytest.approx(0.15 * 1.02**2)
    logged = trainer.callback_metrics
    assert {"controller/scale", "controller/observed", "controller/delta"} <= set(logged)
    assert not any(k in logged for k in ("controller/delta_low", "controller/delta_high"))
    assert logged["controller/delta"].item() == pytest.approx(0.15 * 1.02**2)
    assert 0 <= logged["controller/observed"].item() < 0.2
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    ckpt = torch.load(tmp_path / "c.ckpt", weights_only=False)
    assert ckpt["callbacks"][controller.state_key] == {"scale": pytest.approx(1.02**2)}

    resumed = _module(random_model_dir, trust_region=DRPO(delta=0.15))
    fresh = TrustRegionController("kl", target_value=1.0, gain=0.1)
    _trainer(6, [fresh]).fit(resumed, ckpt_path=tmp_path / "c.ckpt")  # one more iteration
    assert fresh.scale == pytest.approx(1.02**3)
    assert resumed.trust_region.delta == pytest.approx(0.15 * 1.02**3)
