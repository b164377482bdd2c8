"""The drift statistics of ``trustregion.functional.drift``: hand-derived values, the limiting
cases, dtypes, and the metric classes and callbacks that must equal them."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

import trustregion.functional.correlation
import trustregion.functional.drift
import trustregion.functional.masked
from trustregion.functional import (
    LOG_RATIO_CLAMP,
    chi2,
    chi2_from_excess,
    count_fraction,
    ess_fraction,
    ess_fraction_from_excess,
    importance_ratio,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
    log_ratio,
    masked_mean,
    pearson_from_sums,
    prob_shift,
    ratio,
    ratio_excess,
    tv,
)
from trustregion.metrics import PairDrift, RegionActivity, StrategyAgreement, TokenMean

LN2 = math.log(2)
F64 = torch.float64


def _logs(*probs: float, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.tensor(probs, dtype=dtype).log()


# Three tokens, π against ν:
#   a: π = 0.5, ν = 0.25 → log r = ln 2,  r = 2,   x = −ln 2
#   b: π = 0.2, ν = 0.4  → log r = −ln 2, r = 0.5, x = ln 2
#   c: π = ν = 0.3       → log r = 0,     r = 1,   x = 0
PI = _logs(0.5, 0.2, 0.3)
NU = _logs(0.25, 0.4, 0.3)


def test_per_token_statistics_by_hand() -> None:
    # k1 = log π − log ν = log r
    assert kl_k1(PI, NU).tolist() == pytest.approx([LN2, -LN2, 0.0])  # ±0.693147
    # k2 = x²/2: (ln 2)²/2 = 0.240227 for a and b
    assert kl_k2(PI, NU).tolist() == pytest.approx([LN2**2 / 2, LN2**2 / 2, 0.0])
    # k3 = eˣ − x − 1:  a: 0.5 + ln 2 − 1 = ln 2 − 0.5 = 0.193147
    #                   b: 2 − ln 2 − 1 = 1 − ln 2 = 0.306853;  c: 1 − 0 − 1 = 0
    assert kl_k3(PI, NU).tolist() == pytest.approx([LN2 - 0.5, 1 - LN2, 0.0])
    # r = π / ν: 0.5/0.25 = 2, 0.2/0.4 = 0.5, 1; r − 1 = 1, −0.5, 0
    assert ratio(PI, NU).tolist() == pytest.approx([2.0, 0.5, 1.0])
    assert ratio_excess(PI, NU).tolist() == pytest.approx([1.0, -0.5, 0.0])
    # Δ = π − ν = ν·(r − 1): 0.25·1 = 0.25, 0.4·(−0.5) = −0.2, 0; tv = |Δ|
    assert prob_shift(PI, NU).tolist() == pytest.approx([0.25, -0.2, 0.0])
    assert tv(PI, NU).tolist() == pytest.approx([0.25, 0.2, 0.0])
    assert importance_ratio is ratio


def test_log_ratio_is_clamped_to_twenty() -> None:
    # log π − log ν = ±100 is clamped to ±20 before anything is exponentiated.
    logp, anchor = torch.tensor([0.0, -100.0], dtype=F64), torch.tensor([-100.0, 0.0], dtype=F64)
    assert LOG_RATIO_CLAMP == 20.0
    assert log_ratio(logp, anchor).tolist() == [20.0, -20.0]
    assert kl_k1(logp, anchor).tolist() == [20.0, -20.0]
    assert ratio(logp, anchor).tolist() == pytest.approx([math.exp(20), math.exp(-20)])
    # k3 at x = −20: e^−20 + 20 − 1 = 19.000000002; at x = 20: e^20 − 21 = 485165174.4
    assert kl_k3(logp, anchor).tolist() == pytest.approx([math.exp(-20) + 19,
                                                          math.exp(20) - 21])
    # Δ for π = 1, ν = e^−100: ν·expm1(20) (clamped), not 1 − e^−100
    assert prob_shift(logp, anchor)[0].item() == pytest.approx(math.exp(-100) * math.expm1(20))
    assert torch.isfinite(tv(logp, anchor)).all()


def test_no_drift_gives_zero_divergence() -> None:
    logp = torch.randn(4, 7, dtype=F64)
    for fn in (kl_k1, kl_k2, kl_k3, ratio_excess, prob_shift, tv):
        assert torch.equal(fn(logp, logp), torch.zeros_like(logp)), fn.__name__
    assert torch.equal(ratio(logp, logp), torch.ones_like(logp))


def test_k3_is_nonnegative_and_its_mean_tracks_the_kl() -> None:
    # Sampling π = softmax(θ) and averaging k1, k3 against ν = softmax(φ) estimates KL(π‖ν).
    gen = torch.Generator().manual_seed(0)
    theta, phi = torch.randn(6, generator=gen, dtype=F64), torch.randn(6, generator=gen,
                                                                       dtype=F64)
    log_pi, log_nu = theta.log_softmax(0), phi.log_softmax(0)
    exact = (log_pi.exp() * (log_pi - log_nu)).sum().item()
    tokens = torch.multinomial(log_pi.exp(), 200_000, replacement=True, generator=gen)
    k1, k3 = kl_k1(log_pi[tokens], log_nu[tokens]), kl_k3(log_pi[tokens], log_nu[tokens])
    assert (k3 >= 0).all()
    assert k1.mean().item() == pytest.approx(exact, rel=0.05)
    assert k3.mean().item() == pytest.approx(exact, rel=0.05)


def test_kl_estimate_is_the_same_function() -> None:
    logp, ref = torch.randn(3, 5), torch.randn(3, 5)
    for name, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        assert torch.equal(kl_estimate(logp, ref, name), fn(logp, ref))  # type: ignore[arg-type]


@pytest.mark.parametrize("fn", [log_ratio, kl_k1, kl_k2, kl_k3, ratio, ratio_excess,
                                prob_shift, tv])
def test_dtypes_are_float32_or_wider(fn) -> None:
    gen = torch.Generator().manual_seed(1)
    logp = (-torch.rand(8, generator=gen) * 5).bfloat16()
    anchor = (-torch.rand(8, generator=gen) * 5).bfloat16()
    low = fn(logp, anchor)
    assert low.dtype == torch.float32
    # bfloat16 inputs are upcast first: the same values as from their float32 copies
    assert torch.equal(low, fn(logp.float(), anchor.float()))
    assert fn(logp.half(), anchor.float()).dtype == torch.float32
    assert fn(logp.double(), anchor.float()).dtype == F64
    assert fn(logp.float(), anchor.double()).dtype == F64


def test_small_shifts_keep_their_digits() -> None:
    # log r = 1e-10: r − 1 = expm1(1e-10) = 1.00000000005e-10, which exp(log r) − 1 rounds to
    # 0 in float32; Δ = ν·(r − 1) = 0.5e-10 for ν = 0.5.
    anchor = torch.tensor([math.log(0.5)], dtype=F64)
    logp = anchor + 1e-10
    assert ratio_excess(logp, anchor).item() == pytest.approx(1e-10, rel=1e-6)
    assert prob_shift(logp, anchor).item() == pytest.approx(0.5e-10, rel=1e-6)
    assert kl_k3(logp, anchor).item() == pytest.approx(0.5e-20, rel=1e-4)  # ≈ x²/2


# ---------------------------------------------------------------------------- from sums
# r = [1, 2, 0.5, 2, 0.25] (N = 5): Σr = 5.75, Σr² = 1 + 4 + 0.25 + 4 + 0.0625 = 9.3125;
# r − 1 = [0, 1, −0.5, 1, −0.75]: Σ(r − 1) = 0.75, Σ(r − 1)² = 0 + 1 + 0.25 + 1 + 0.5625 = 2.8125.
R = torch.tensor([1.0, 2.0, 0.5, 2.0, 0.25], dtype=F64)


def test_ess_and_chi2_by_hand() -> None:
    n = torch.tensor(5.0, dtype=F64)
    # ESS = 5.75² / (5 · 9.3125) = 33.0625 / 46.5625 = 0.710067
    assert ess_fraction(R.sum(), R.square().sum(), n).item() == pytest.approx(33.0625 / 46.5625)
    # χ² = Σ(r − 1)² / N = 2.8125 / 5 = 0.5625 = (Σr² − 2 Σr + N) / N = (9.3125 − 11.5 + 5) / 5
    assert chi2(R.sum(), R.square().sum(), n).item() == pytest.approx(0.5625)
    excess = R - 1
    assert excess.sum().item() == 0.75 and excess.square().sum().item() == 2.8125
    assert chi2_from_excess(excess.square().sum(), n).item() == pytest.approx(0.5625)
    assert ess_fraction_from_excess(excess.sum(), excess.square().sum(), n).item() \
        == pytest.approx(33.0625 / 46.5625)
    # Python numbers work too: r = 1, 3 → (1 + 3)² / (2 · (1 + 9)) = 0.8; χ² = (0 + 4) / 2 = 2
    assert ess_fraction(4.0, 10.0, 2).item() == pytest.approx(0.8)
    assert chi2(4.0, 10.0, 2).item() == 2.0


def test_chi2_is_never_negative_where_the_second_moment_form_is() -> None:
    # r = 0.9, 1.0 (π ≈ ν, mean r below 1): E[r²] − 1 = (0.81 + 1) / 2 − 1 = −0.095, a negative
    # "divergence"; E[(r − 1)²] = (0.01 + 0) / 2 = 0.005.
    r = torch.tensor([0.9, 1.0], dtype=F64)
    assert r.square().mean().item() - 1 == pytest.approx(-0.095)
    assert chi2(r.sum(), r.square().sum(), 2).item() == pytest.approx(0.005)
    assert chi2_from_excess((r - 1).square().sum(), 2).item() == pytest.approx(0.005)


def test_ess_limits() -> None:
    # every r equal: (N r)² / (N · N r²) = 1
    assert ess_fraction(torch.tensor(3 * 0.7), torch.tensor(3 * 0.49), torch.tensor(3.0)) \
        .item() == pytest.approx(1.0)
    # one ratio dominating: r = (1e6, 1e-3, 1e-3) → ESS ≈ 1/N
    r = torch.tensor([1e6, 1e-3, 1e-3], dtype=F64)
    assert ess_fraction(r.sum(), r.square().sum(), torch.tensor(3.0)).item() == pytest.approx(
        1 / 3, rel=1e-6)


def test_empty_sums_are_defined() -> None:
    zero = torch.zeros((), dtype=F64)
    assert ess_fraction(zero, zero, zero).item() == 0.0  # no tokens: 0, never 0/0
    assert math.isnan(ess_fraction(zero, zero, zero, empty=float("nan")).item())
    assert ess_fraction(zero, zero, torch.tensor(4.0)).item() == 0.0  # Σr² = 0
    assert ess_fraction_from_excess(zero, zero, zero).item() == 0.0
    assert chi2(zero, zero, zero).item() == 0.0
    assert chi2_from_excess(zero, zero).item() == 0.0
    assert count_fraction(torch.tensor([0.0, 3.0]), torch.tensor([0.0, 4.0])).tolist() == [
        0.0, 0.75]


def test_sums_combine_across_parts() -> None:
    # Micro-batches or ranks add their sums; the result is that of all tokens at once.
    parts = (R[:2], R[2:])
    s1 = sum(p.sum() for p in parts)
    s2 = sum(p.square().sum() for p in parts)
    n = sum(torch.tensor(float(len(p)), dtype=F64) for p in parts)
    assert ess_fraction(s1, s2, n).item() == pytest.approx(
        ess_fraction(R.sum(), R.square().sum(), torch.tensor(5.0)).item())


def test_chi2_from_excess_is_accurate_near_one() -> None:
    # r = 1 ± 1e-9: E[(r − 1)²] = 1e-18 exactly; Σr² − 2Σr + N cancels to 0 (or noise) in
    # float64.
    r_minus_1 = torch.tensor([1e-9, -1e-9], dtype=F64)
    exact = chi2_from_excess(r_minus_1.square().sum(), torch.tensor(2.0))
    assert exact.item() == pytest.approx(1e-18, rel=1e-9)


def test_pearson_from_sums() -> None:
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(50, generator=gen, dtype=F64), torch.randn(50, generator=gen, dtype=F64)
    y = y + 0.5 * x
    expected = torch.corrcoef(torch.stack([x, y]))[0, 1].item()
    sums = (x.sum(), y.sum(), x.square().sum(), y.square().sum(), (x * y).sum())
    assert pearson_from_sums(torch.tensor(50.0, dtype=F64), *sums).item() == pytest.approx(
        expected, rel=1e-9)
    zero = torch.zeros((), dtype=F64)
    assert pearson_from_sums(zero, zero, zero, zero, zero, zero).item() == 0.0


@pytest.mark.parametrize("module", [trustregion.functional.drift, trustregion.functional.masked,
                                    trustregion.functional.correlation])
def test_docstring_examples(module) -> None:
    result = doctest.testmod(module, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------- the metric classes equal the functions
def _random_batch(seed: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logp = (torch.randn(4, 9, generator=gen) - 2).clamp(max=0).to(dtype)
    anchor = (logp.float() + 0.7 * torch.randn(4, 9, generator=gen)).clamp(max=0).to(dtype)
    mask = torch.rand(4, 9, generator=gen) < 0.7
    mask[0] = False  # an empty sequence
    logp = logp.masked_fill(~mask, float("nan"))  # padding may hold anything
    return logp, anchor, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pair_drift_equals_the_functional_forms(dtype) -> None:
    logp, anchor, mask = _random_batch(3, dtype)
    metric = PairDrift()
    metric.update(logp[:2], anchor[:2], mask[:2])  # two micro-batches
    metric.update(logp[2:], anchor[2:], mask[2:])
    got = metric.compute()
    lp, an = logp.double(), anchor.double()
    r = ratio(lp, an)[mask]
    n = torch.tensor(float(mask.sum()), dtype=F64)
    expected = {
        "tv_mean": masked_mean(tv(lp, an), mask),
        "tv_max": tv(lp, an)[mask].max(),
        "kl_k1": masked_mean(kl_k1(lp, an), mask),
        "kl_k3": masked_mean(kl_k3(lp, an), mask),
        "chi2": chi2(r.sum(), r.square().sum(), n),
        "ess": ess_fraction(r.sum(), r.square().sum(), n),
        "ratio_min": r.min(),
        "ratio_mean": r.mean(),
        "ratio_max": r.max(),
    }
    for name, value in expected.items():
        assert got[name].item() == pytest.approx(value.item(), rel=1e-6, abs=1e-7), name


def test_token_mean_and_region_activity_equal_masked_means() -> None:
    logp, anchor, mask = _random_batch(4)
    values = torch.randn(4, 9, generator=torch.Generator().manual_seed(5))
    mean = TokenMean()
    mean.update(values, mask)
    assert mean.compute().item() == pytest.approx(masked_mean(values.double(), mask).item(),
                                                  rel=1e-6)

    weight = 1 - 2 * prob_shift(logp.nan_to_num(), anchor)  # some < 0, none exactly 0
    weight[1, :3] = 0.0
    outside = weight < 0.5
    advantages = torch.tensor([1.0, -1.0, 2.0, -0.5])[:, None].expand(4, 9)
    region = RegionActivity()
    region.update(weight, outside, mask, advantages, anchor)
    got = region.compute()
    pos = mask & (advantages > 0)
    assert got["outside_frac"].item() == pytest.approx(masked_mean(outside, mask).item())
    assert got["zero_weight_frac"].item() == pytest.approx(masked_mean(weight == 0, mask).item())
    assert got["negative_weight_frac_pos_adv"].item() == pytest.approx(
        masked_mean(weight < 0, pos).item())


def test_strategy_agreement_equals_the_functional_forms() -> None:
    gen = torch.Generator().manual_seed(6)
    shadow, active = torch.rand(3, 8, generator=gen) * 2, torch.rand(3, 8, generator=gen) * 2
    mask = torch.rand(3, 8, generator=gen) < 0.8
    agreement = StrategyAgreement()
    agreement.update(shadow, shadow > 1.5, active, active > 1.2, mask)
    got = agreement.compute()
    pairs = torch.stack([shadow[mask], active[mask]]).double()
    assert got["weight_corr"].item() == pytest.approx(torch.corrcoef(pairs)[0, 1].item(),
                                                      rel=1e-5)
    assert got["outside_frac"].item() == pytest.approx(masked_mean(shadow > 1.5, mask).item())
