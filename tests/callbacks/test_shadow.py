"""ShadowStrategies: hand-derived agreement values, labels, setup checks and a tiny real run.

The hand-built batch (2 sequences × 3 positions, the last of sequence 2 is NaN padding):

| token | Â | μ | π | π − μ | r |
|---|---|---|---|---|---|
| a | +1 | 0.6 | 0.6 | 0 | 1 |
| b | +1 | 0.25 | 0.5 | +0.25 | 2 |
| c | +1 | 0.4 | 0.2 | −0.2 | 0.5 |
| d | −1 | 0.005 | 0.01 | +0.005 | 2 |
| e | −1 | 0.8 | 0.2 | −0.6 | 0.25 |

Per token (outside: beyond the region in the harmful direction for Â):
- DPPO binary TV δ = 0.15: b (0.25 > δ, Â > 0) and e (−0.6 < −δ, Â < 0) outside, w = 0 there,
  else 1 (r ≤ 2 below the cap 10): w = [1, 0, 1, 1, 0].
- DPPO δ = 0.3: only e outside: w = [1, 1, 1, 1, 0].
- ratio clip ε = 0.2: b (Â > 0, r = 2 > 1.2) and e (Â < 0, r = 0.25 < 0.8): w = [1, 0, 1, 1, 0].
- PG-IS: never outside, w = 1 everywhere (constant).
- DRPO δ = 0.15: w = 1 − sign(Â)(π − μ)/δ = [1, −2/3, 7/3, 31/30, −3]; b and e outside.
"""

from __future__ import annotations

import copy
import csv
import math
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import DigitRichArithmetic
from lightning.pytorch.loggers import CSVLogger
from stub_module import RecordingModule

from trustregion.batching import BatchSettings
from trustregion.callbacks import DriftMonitor, ShadowStrategies
from trustregion.metrics import pearson_from_sums
from trustregion.module import TrustRegionModule
from trustregion.optim import AdamW
from trustregion.penalties import ReferenceKL
from trustregion.rollout import SamplingSettings
from trustregion.strategies import (
    DRPO,
    SHARED_METRICS,
    DivergenceMask,
    RatioClip,
    TokenBatch,
    TrustRegionStrategy,
)

NAN = float("nan")
STATS = ["outside_frac", "zero_weight_frac", "only_shadow_outside_frac",
         "only_active_outside_frac", "weight_corr"]


def hand_batch() -> TokenBatch:
    logp = torch.tensor([[0.6, 0.5, 0.2], [0.01, 0.2, NAN]]).log()
    behavior = torch.tensor([[0.6, 0.25, 0.4], [0.005, 0.8, NAN]]).log()
    return TokenBatch(logp=logp, behavior_logp=behavior, advantages=torch.tensor([1.0, -1.0]),
                      mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))


def agreement(active: TrustRegionStrategy, shadows: list) -> dict[str, float]:
    callback = ShadowStrategies(shadows)
    batch = hand_batch()
    callback.update(batch, active(batch))
    values = {k: float(v) for k, v in callback.compute().items()}
    assert list(values) == callback.metric_names()
    return values


def test_agreement_with_the_active_strategy_on_hand_built_batch() -> None:
    got = agreement(DivergenceMask(delta=0.15),
                    ["ratio_clip", DivergenceMask(delta=0.3), "pg_is", DRPO()])
    # DRPO against the active w = [1, 0, 1, 1, 0] (y, mean 0.6, variance 0.6 − 0.36 = 0.24):
    # x = [1, −2/3, 7/3, 31/30, −3]: Σx = 0.7, Σx² = 10 + 53/9 + 961/900 = 16.95667,
    # Σxy = 1 + 7/3 + 31/30 = 131/30; var x = 16.95667/5 − 0.14² = 3.371733,
    # cov = 131/150 − 0.14 · 0.6 = 0.789333 → corr = 0.789333 / √(3.371733 · 0.24) = 0.877462.
    expected = {
        # identical region and weights
        "ratio_clip": [0.4, 0.4, 0.0, 0.0, 1.0],
        # {e} outside; b only outside the active region (1/5); x = [1, 1, 1, 1, 0]:
        # cov = 3/5 − 0.8 · 0.6 = 0.12, var x = 0.8 − 0.64 = 0.16 → 0.12/√(0.16 · 0.24) = √(3/8)
        "dppo": [0.2, 0.2, 0.0, 0.2, math.sqrt(3 / 8)],
        # never outside, w ≡ 1: constant → correlation defined as 0
        "pg_is": [0.0, 0.0, 0.0, 0.4, 0.0],
        # same tokens outside, no weight exactly 0
        "drpo": [0.4, 0.0, 0.0, 0.0, 0.877462],
    }
    for label, values in expected.items():
        for stat, value in zip(STATS, values, strict=True):
            assert got[f"shadow/{label}/{stat}"] == pytest.approx(value, abs=1e-6), (label, stat)


def test_only_shadow_outside() -> None:
    # Active δ = 0.3 ({e} outside), shadow δ = 0.15 ({b, e}): b only outside the shadow's.
    got = agreement(DivergenceMask(delta=0.3), ["dppo"])
    assert got["shadow/dppo/only_shadow_outside_frac"] == pytest.approx(0.2)
    assert got["shadow/dppo/only_active_outside_frac"] == 0.0
    assert got["shadow/dppo/weight_corr"] == pytest.approx(math.sqrt(3 / 8))


def test_micro_batches_and_sums() -> None:
    callback = ShadowStrategies([DRPO()])
    batch, active = hand_batch(), DivergenceMask()
    for rows in (slice(0, 1), slice(1, 2)):
        part = TokenBatch(logp=batch.logp[rows], behavior_logp=batch.behavior_logp[rows],
                          advantages=batch.advantages[rows], mask=batch.mask[rows])
        callback.update(part, active(part))
    assert float(callback.compute()["shadow/drpo/weight_corr"]) == pytest.approx(0.877462,
                                                                                 abs=1e-6)
    # constant sides and no tokens give 0
    x = torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64)
    y = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    sums = [x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum()]
    assert float(pearson_from_sums(torch.tensor(3.0, dtype=torch.float64), *sums)) == 0.0
    zero = torch.zeros((), dtype=torch.float64)
    assert float(pearson_from_sums(zero, zero, zero, zero, zero, zero)) == 0.0


def test_labels_are_registered_names_with_suffixes_for_repeats() -> None:
    callback = ShadowStrategies(["dppo", DivergenceMask(delta=0.3), "dppo", RatioClip()])
    assert list(callback.strategies) == ["dppo", "dppo_2", "dppo_3", "ratio_clip"]
    assert callback.strategies["dppo_2"].delta == 0.3


@pytest.mark.parametrize(("strategies", "message"), [
    ("dppo", "must be a list"),
    ([], "at least one shadow"),
    (["ppo"], "unknown trust-region strategy 'ppo'"),
    ([3], "must be a TrustRegionStrategy or a registered name"),
])
def test_bad_shadows_fail_at_construction(strategies, message) -> None:
    with pytest.raises(ValueError, match=message):
        ShadowStrategies(strategies)


def _setup(callback: ShadowStrategies, active: TrustRegionStrategy) -> RecordingModule:
    module = RecordingModule(active)
    callback.setup(None, module, "fit")  # type: ignore[arg-type]
    return module


def test_setup_rejects_old_anchored_shadow_with_behavior_anchored_active() -> None:
    with pytest.raises(ValueError, match=r"shadow strategy 'ratio_clip' anchors on 'old'.*"
                                         r"only recomputed for an active strategy anchored"):
        _setup(ShadowStrategies([RatioClip(anchor="old")]), DRPO())
    _setup(ShadowStrategies([RatioClip(anchor="old")]), DRPO(anchor="old"))  # fine
    with pytest.raises(TypeError, match=r"ShadowStrategies needs a TrustRegionModule .*"
                                        r"SimpleNamespace lacks step_log, strategy"):
        ShadowStrategies(["dppo"]).setup(None, SimpleNamespace(), "fit")  # type: ignore[arg-type]


def test_setup_requests_topk_for_topk_shadows() -> None:
    topk = DivergenceMask(divergence="topk_tv", divergence_top_k=4)
    assert _setup(ShadowStrategies(["dppo", topk]), DRPO()).requested_topk == 4
    assert _setup(ShadowStrategies(["dppo"]), DRPO()).requested_topk == 0
    active = DivergenceMask(divergence="topk_kl", divergence_top_k=2)
    assert _setup(ShadowStrategies([topk]), active).requested_topk == 4


def test_a_topk_shadow_makes_the_module_record_its_k(random_model_dir: Path) -> None:
    # a top-2 active strategy with a top-4 shadow: four are recorded, the active one reads two
    active = DivergenceMask(divergence="topk_kl", divergence_top_k=2)
    module = TrustRegionModule(policy=f"config:{random_model_dir}", trust_region=active)
    assert module.behavior_topk == 2
    ShadowStrategies([DivergenceMask(divergence="topk_tv", divergence_top_k=4)]).setup(
        None, module, "fit")  # type: ignore[arg-type]
    assert module.behavior_topk == 4
    ShadowStrategies(["dppo"]).setup(None, module, "fit")  # type: ignore[arg-type]
    assert module.behavior_topk == 4  # a smaller request never lowers it


# --------------------------------------------------------------------------- real run
def test_tiny_run_logs_exact_keys_and_a_self_shadow_agrees(random_model_dir: Path,
                                                           tmp_path: Path) -> None:
    torch.manual_seed(0)
    active = DRPO()
    module = TrustRegionModule(
        policy=f"config:{random_model_dir}", task=DigitRichArithmetic(), trust_region=active,
        batching=BatchSettings(group_size=4, prompts_per_step=2, mini_batch_size=4,
                               micro_batch_size=2),
        sampling=SamplingSettings(max_new_tokens=5), optimizer=partial(AdamW, lr=1e-2),
        penalties=[ReferenceKL(beta=0.01)])
    shadows = ShadowStrategies(["ratio_clip", "dppo", copy.deepcopy(active)])
    trainer = L.Trainer(max_steps=2, logger=CSVLogger(tmp_path), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1, callbacks=[DriftMonitor(), shadows])
    trainer.fit(module)  # 1 rollout batch, 2 optimiser steps (mini-batches of 4 of 8)
    module_keys = {
        "reward/mean", "reward/std", "reward/frac_zero_std", "response/length_mean",
        "response/length_max", "train/lr", "train/loss", "train/grad_norm",
        "train/skipped_steps", "penalty/ref_kl", "trust_region/penalty_mean",
        *(f"trust_region/{k}" for k in SHARED_METRICS),
    }
    drift_keys = set(DriftMonitor.metric_names(["behavior", "ref"]))  # ReferenceKL: π_ref
    shadow_keys = {f"shadow/{label}/{stat}" for label in ("ratio_clip", "dppo", "drpo")
                   for stat in STATS}
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    written = {key for row in rows for key, value in row.items() if value}
    assert written == module_keys | drift_keys | shadow_keys | {"step", "epoch"}
    assert [row["step"] for row in rows] == ["0"]  # one row for the one rollout batch
    assert set(trainer.progress_bar_metrics) == {"reward", "loss", "kl", "outside"}
    logged = {k: float(v) for k, v in rows[0].items() if v and k not in ("step", "epoch")}
    assert set(logged) == module_keys | drift_keys | shadow_keys
    assert logged["drift/behavior/tv_max"] > 0  # π moved from μ: DRPO weights vary
    assert logged["shadow/drpo/only_shadow_outside_frac"] == 0.0
    assert logged["shadow/drpo/only_active_outside_frac"] == 0.0
    assert logged["shadow/drpo/weight_corr"] == pytest.approx(1.0, abs=1e-6)
    assert logged["shadow/drpo/outside_frac"] == pytest.approx(logged["region/outside_frac"])
