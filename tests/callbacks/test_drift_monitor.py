"""DriftMonitor: exact keys, hand-derived values, micro-batch and cross-rank reduction.

The hand-built batch (2 sequences × 3 positions, the last position of sequence 2 is padding
holding NaN) has five response tokens:

| token | seq | Â | μ | π | r = π/μ | abs(π − μ) | log r | entropy |
|---|---|---|---|---|---|---|---|---|
| a | 1 | +1 | 0.6 | 0.6 | 1 | 0 | 0 | 1.0 |
| b | 1 | +1 | 0.25 | 0.5 | 2 | 0.25 | ln 2 | 2.0 |
| c | 1 | +1 | 0.4 | 0.2 | 0.5 | 0.2 | −ln 2 | 3.0 |
| d | 2 | −1 | 0.005 | 0.01 | 2 | 0.005 | ln 2 | 0.5 |
| e | 2 | −1 | 0.8 | 0.2 | 0.25 | 0.6 | −2 ln 2 | 1.5 |
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from stub_module import HandBuiltUpdates, RecordingModule, StandInTrainer, step_output

from trustregion.callbacks import DriftMonitor
from trustregion.callbacks.drift_monitor import PROGRESS_BAR, progress_bar_values
from trustregion.interface import UpdateRecord
from trustregion.metrics import PairDrift, linear_quantile
from trustregion.strategies import DRPO, DivergenceMask, TokenBatch, TrustRegionStrategy

LN2 = math.log(2)
NAN = float("nan")

PI = [[0.6, 0.5, 0.2], [0.01, 0.2, NAN]]
MU = [[0.6, 0.25, 0.4], [0.005, 0.8, NAN]]
ENTROPY = [[1.0, 2.0, 3.0], [0.5, 1.5, NAN]]
MASK = [[1, 1, 1], [1, 1, 0]]
ADVANTAGES = [1.0, -1.0]

BEHAVIOR = {
    # abs(π − μ) = [0, 0.25, 0.2, 0.005, 0.6]: Σ = 1.055 over N = 5 tokens.
    "tv_mean": 1.055 / 5,
    # sorted [0, 0.005, 0.2, 0.25, 0.6]; position 0.99 · (5 − 1) = 3.96 →
    # 0.25 + 0.96 · (0.6 − 0.25) = 0.586.
    "tv_p99": 0.586,
    "tv_max": 0.6,
    # k1 = log r = [0, ln2, −ln2, ln2, −2 ln2]: Σ = −ln2.
    "kl_k1": -LN2 / 5,
    # k3 = 1/r + log r − 1 (x = −log r): a 0, b ln2 − 1/2, c 1 − ln2, d ln2 − 1/2,
    # e 3 − 2 ln2: Σ = 3 − ln2.
    "kl_k3": (3 - LN2) / 5,
    # r = [1, 2, 0.5, 2, 0.25]: Σr = 5.75, Σr² = 1 + 4 + 0.25 + 4 + 0.0625 = 9.3125;
    # (r − 1)² = [0, 1, 0.25, 1, 0.5625]: Σ = 2.8125.
    "chi2": 2.8125 / 5,                     # 0.5625
    "ess": 5.75**2 / (5 * 9.3125),          # 33.0625 / 46.5625 = 0.71007
    "ratio_min": 0.25,
    "ratio_mean": 5.75 / 5,                 # 1.15
    "ratio_max": 2.0,
    # x = log μ − log π per sequence: seq 1 [0, −ln2, ln2] → mean 0;
    # seq 2 [−ln2, 2 ln2] → mean ln2/2; mean over the 2 sequences: ln2/4.
    "log_ppl_diff": LN2 / 4,
}
NO_DRIFT = {  # π against itself
    "tv_mean": 0.0, "tv_p99": 0.0, "tv_max": 0.0, "kl_k1": 0.0, "kl_k3": 0.0, "chi2": 0.0,
    "ess": 1.0, "ratio_min": 1.0, "ratio_mean": 1.0, "ratio_max": 1.0, "log_ppl_diff": 0.0,
}
ENTROPY_MEAN = (1.0 + 2.0 + 3.0 + 0.5 + 1.5) / 5   # 1.6; the NaN pad is masked out

REGION_KEYS = [f"region/{event}{group}"
               for event in ("outside_frac", "zero_weight_frac", "negative_weight_frac")
               for group in ("", "_pos_adv", "_neg_adv", "_nu_0_0.01", "_nu_0.01_0.1",
                             "_nu_0.1_0.5", "_nu_0.5_1")]
PAIR_STATS = ["tv_mean", "tv_p99", "tv_max", "kl_k1", "kl_k3", "chi2", "ess", "ratio_min",
              "ratio_mean", "ratio_max", "log_ppl_diff"]


def hand_batch(rows: slice = slice(None), *, old: bool = True, ref: bool = True) -> TokenBatch:
    """The table's batch (or some of its sequences); π_old = μ and π_ref = π when present."""
    logp = torch.tensor(PI).log()[rows]
    behavior = torch.tensor(MU).log()[rows]
    return TokenBatch(
        logp=logp, behavior_logp=behavior, advantages=torch.tensor(ADVANTAGES)[rows],
        mask=torch.tensor(MASK)[rows], old_logp=behavior.clone() if old else None,
        ref_logp=logp.clone() if ref else None, entropy=torch.tensor(ENTROPY)[rows])


def record(batch: TokenBatch, strategy: TrustRegionStrategy | None = None) -> UpdateRecord:
    """An UpdateRecord as training_step returns it: detached batch and the strategy's output."""
    return UpdateRecord(batch=batch, output=(strategy or DRPO())(batch))


def values_of(monitor: DriftMonitor) -> dict[str, float]:
    return {k: float(v) for k, v in monitor.compute().items()}


def assert_values(got: dict[str, float], expected: dict[str, float], prefix: str = "") -> None:
    for key, value in expected.items():
        assert got[prefix + key] == pytest.approx(value, rel=1e-5, abs=1e-6), prefix + key


def test_pair_drift_entropy_and_keys_on_hand_built_batch() -> None:
    monitor = DriftMonitor()
    monitor.update(**vars(record(hand_batch())))
    got = values_of(monitor)
    assert list(got) == DriftMonitor.metric_names(["behavior", "old", "ref"])
    assert len(got) == 3 * 11 + 1 + 21
    assert_values(got, BEHAVIOR, "drift/behavior/")
    assert_values(got, BEHAVIOR, "drift/old/")      # π_old = μ here
    assert_values(got, NO_DRIFT, "drift/ref/")      # π_ref = π here
    assert got["drift/entropy"] == pytest.approx(ENTROPY_MEAN)


def test_only_pairs_present_in_the_batch_are_logged() -> None:
    monitor = DriftMonitor()
    monitor.update(**vars(record(hand_batch(old=False, ref=False))))
    assert list(monitor.compute()) == DriftMonitor.metric_names(["behavior"])
    assert DriftMonitor.metric_names([], entropy=False) == REGION_KEYS
    with pytest.raises(ValueError, match="unknown drift pair"):
        DriftMonitor.metric_names(["reference"])


# Region fractions: outside, zero weight, negative weight — over all 5 tokens, over Â > 0
# {a, b, c}, Â < 0 {d, e}, and μ buckets [0, .01) {d}, [.01, .1) {} (empty → 0),
# [.1, .5) {b, c}, [.5, 1] {a, e}.
#
# DRPO δ = 0.15: w = 1 − sign(Â)(π − μ)/δ, outside when sign(Â)(π − μ) > δ:
#   a 1; b 1 − 0.25/0.15 = −2/3 (out); c 1 + 0.2/0.15 = 7/3; d 1 + 0.005/0.15 = 31/30;
#   e 1 − 0.6/0.15 = −3 (out). Outside = negative = {b, e}, zero = {}.
# DPPO binary TV δ = 0.15: drop b (Â > 0, π − μ = 0.25 > δ) and e (Â < 0, π − μ = −0.6 < −δ);
#   w = 1 elsewhere (r ≤ 2 < cap 10). Outside = zero = {b, e}, negative = {}.
_B_E = [2 / 5, 1 / 3, 1 / 2, 0.0, 0.0, 1 / 2, 1 / 2]   # the fractions of the set {b, e}
_NONE = [0.0] * 7


@pytest.mark.parametrize(("strategy", "outside", "zero", "negative"), [
    (DRPO(delta=0.15), _B_E, _NONE, _B_E),
    (DivergenceMask(divergence="binary_tv", delta=0.15), _B_E, _B_E, _NONE),
])
def test_region_fractions_by_sign_and_bucket(strategy, outside, zero, negative) -> None:
    monitor = DriftMonitor()
    monitor.update(**vars(record(hand_batch(), strategy)))
    got = values_of(monitor)
    assert_values(got, dict(zip(REGION_KEYS, outside + zero + negative, strict=True)))


def test_the_progress_bar_outside_is_the_strategy_metric_of_the_batch() -> None:
    # DRPO δ = 0.15 puts {b, e} outside: 2/5, the batch's trust_region/outside_frac.
    update = record(hand_batch(), DRPO(delta=0.15))
    assert PROGRESS_BAR["outside"] == "trust_region/outside_frac"
    shown = progress_bar_values([update])
    assert float(shown["outside"]) == pytest.approx(2 / 5)
    assert float(update.output.metrics[PROGRESS_BAR["outside"]]) == pytest.approx(2 / 5)


def test_micro_batches_reduce_to_the_whole_batch() -> None:
    whole = DriftMonitor()
    whole.update(**vars(record(hand_batch())))
    split = DriftMonitor()
    for rows in (slice(0, 1), slice(1, 2)):  # one sequence per micro-batch: 3 and 2 tokens
        split.update(**vars(record(hand_batch(rows))))
    assert values_of(split) == pytest.approx(values_of(whole), rel=1e-6, abs=1e-7)
    # ... and not the mean of the micro-batch means: (0.45/3 + 0.605/2) / 2 = 0.22625.
    assert values_of(split)["drift/behavior/tv_mean"] == pytest.approx(0.211)


def test_empty_mask_gives_zeros() -> None:
    batch = hand_batch()
    batch.mask = torch.zeros_like(batch.mask)
    monitor = DriftMonitor()
    monitor.update(**vars(record(batch)))
    got = values_of(monitor)
    assert all(math.isfinite(v) for v in got.values())
    assert all(v == 0 for k, v in got.items())


def test_linear_quantile_matches_torch() -> None:
    values = torch.rand(1001, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.5, 0.99, 1.0):
        assert float(linear_quantile(values, q)) == pytest.approx(
            float(torch.quantile(values, q, interpolation="linear")))
    assert float(linear_quantile(torch.zeros(0), 0.99)) == 0.0


def test_pair_drift_is_accurate_for_a_tiny_drift() -> None:
    # log r = ±1e-6 on two tokens: r − 1 ≈ ±1e-6, χ² = E[(r − 1)²] ≈ 1e-12
    metric = PairDrift()
    metric.update(torch.tensor([[1e-6, -1e-6]], dtype=torch.float64) + math.log(0.5),
                  torch.full((1, 2), math.log(0.5), dtype=torch.float64), torch.ones(1, 2))
    assert float(metric.compute()["chi2"]) == pytest.approx(1e-12, rel=1e-3)


def test_on_train_batch_end_writes_every_n_steps_then_resets() -> None:
    monitor, module, trainer = DriftMonitor(every_n_steps=2), RecordingModule(), StandInTrainer()
    first = step_output([record(hand_batch(slice(0, 1)))])
    second = step_output([record(hand_batch(slice(1, 2)))])
    trainer.end_batch(monitor, module, first)
    assert trainer.written == []
    # The progress bar shows every batch on its own. Sequence 1: k3 = 0, ln2 − ½, 1 − ln2
    # (Σ = ½ over 3 tokens); DRPO (δ = 0.15) puts b (Â > 0, π − μ = 0.25) outside: 1/3.
    (kl, kl_kwargs), (outside, outside_kwargs) = module.logged
    assert float(kl["kl"]) == pytest.approx(0.5 / 3)
    assert float(outside["outside"]) == pytest.approx(1 / 3)
    assert kl_kwargs["prog_bar"] and not kl_kwargs["logger"] and outside_kwargs["prog_bar"]
    trainer.end_batch(monitor, module, second)
    ((values, step),) = trainer.written
    assert step == 1  # the second rollout batch's index
    assert list(values) == DriftMonitor.metric_names(["behavior", "old", "ref"])
    assert_values(values, BEHAVIOR, "drift/behavior/")  # the window: both sequences
    # callback_metrics holds the row and the progress-bar values of the latest batch
    assert set(trainer.callback_metrics) == set(values) | {"kl", "outside"}
    assert {k: float(trainer.callback_metrics[k]) for k in values} == pytest.approx(values)
    # Sequence 2: k3 of d = ln2 − ½, of e = 3 − 2 ln2 (Σ = 2.5 − ln2); e (Â < 0, π − μ = −0.6)
    # is outside: 1/2.
    (kl, _), (outside, _) = module.logged[2:]
    assert float(kl["kl"]) == pytest.approx((2.5 - LN2) / 2)
    assert float(outside["outside"]) == pytest.approx(0.5)
    assert not any(m.update_called for m in monitor._metrics())  # reset after logging
    trainer.end_batch(monitor, module, {"rollout": None})  # no StepOutput
    trainer.end_batch(monitor, module, None)
    assert len(trainer.written) == 1 and len(module.logged) == 4  # nothing without updates


def test_default_window_follows_log_every_n_steps_and_closes_at_the_last_batch() -> None:
    # log_every_n_steps=2 over 3 batches: rows at steps 1 (batches 0-1) and 2 (batch 2, the
    # last batch of the epoch closes its window early).
    monitor, module = DriftMonitor(), RecordingModule()
    trainer = StandInTrainer(log_every_n_steps=2, num_training_batches=3)
    for index in (0, 1, 0):
        trainer.end_batch(monitor, module, step_output([record(hand_batch(
            slice(index, index + 1)))]))
    assert [step for _, step in trainer.written] == [1, 2]
    assert trainer.written[0][0]["drift/behavior/tv_max"] == pytest.approx(BEHAVIOR["tv_max"])


def test_nothing_is_written_when_the_trainer_logs_nothing() -> None:
    monitor, module = DriftMonitor(), RecordingModule()
    trainer = StandInTrainer(log_every_n_steps=0)
    trainer.end_batch(monitor, module, step_output([record(hand_batch(slice(0, 2)))]))
    assert trainer.written == []
    assert float(trainer.callback_metrics["drift/behavior/tv_max"]) == pytest.approx(
        BEHAVIOR["tv_max"])


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_every_n_steps_is_validated(bad) -> None:
    with pytest.raises(ValueError, match=r"every_n_steps must be None .* or an integer ≥ 1"):
        DriftMonitor(every_n_steps=bad)


# ----------------------------------------------------------------------- two processes
def _sequence_of_rank(rank: int, batch_idx: int) -> list[UpdateRecord]:
    return [record(hand_batch(slice(rank, rank + 1)))]


class _SaveMetrics(L.Callback):
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        torch.save(metrics, self.directory / f"rank{trainer.global_rank}.pt")


def test_two_ranks_reduce_to_the_concatenated_tokens(tmp_path) -> None:
    # Two spawned CPU processes (gloo): rank 0 holds sequence 1, rank 1 sequence 2; every rank
    # must log the values of the whole table.
    trainer = L.Trainer(accelerator="cpu", strategy="ddp_spawn", devices=2, max_epochs=1,
                        limit_train_batches=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[DriftMonitor(), _SaveMetrics(tmp_path)])
    # Rank 0 holds sequence 1 of the table (3 tokens), rank 1 sequence 2 (2 tokens).
    trainer.fit(HandBuiltUpdates(_sequence_of_rank))
    expected = DriftMonitor()
    expected.update(**vars(record(hand_batch())))
    single = values_of(expected)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(got) == set(single) | {"kl", "outside"}
        assert {k: got[k] for k in single} == pytest.approx(single, rel=1e-6, abs=1e-7)
    # global token mean, not the mean of the rank means (0.45/3 + 0.605/2) / 2 = 0.22625;
    # tv_max from rank 1, ratio_min from rank 1, ratio_max reached on both.
    assert got["drift/behavior/tv_mean"] == pytest.approx(0.211)
    assert got["drift/behavior/tv_max"] == pytest.approx(0.6)
    assert got["drift/behavior/tv_p99"] == pytest.approx(0.586)
    assert got["drift/behavior/log_ppl_diff"] == pytest.approx(LN2 / 4)
