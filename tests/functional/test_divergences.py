from __future__ import annotations

import math

import pytest
import torch

from trustregion.functional import (
    binary_kl,
    binary_tv,
    importance_ratio,
    kl_estimate,
    masked_max,
    masked_mean,
    masked_min,
    prob_shift,
    topk_kl,
    topk_tv,
)

T = torch.tensor


def test_binary_tv_is_signed_shift() -> None:
    assert binary_tv(T([0.65]), T([0.5])).item() == pytest.approx(0.15)
    assert binary_tv(T([0.35]), T([0.5])).item() == pytest.approx(-0.15)


def test_binary_kl_by_hand() -> None:
    # ν = 0.5, π = 0.7: 0.5 ln(0.5/0.7) + 0.5 ln(0.5/0.3)
    #                 = 0.5(−0.336472) + 0.5(0.510826) = 0.087177
    value = binary_kl(T([0.7], dtype=torch.float64), T([0.5], dtype=torch.float64)).item()
    assert value == pytest.approx(0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3))
    assert value == pytest.approx(0.087177, abs=1e-6)
    assert binary_kl(T([0.3]), T([0.3])).item() == pytest.approx(0.0, abs=1e-7)


def test_topk_divergences_by_hand() -> None:
    # Tracked tokens: ν = (0.5, 0.3), π = (0.4, 0.4); rest: ν 0.2, π 0.2; third slot unused.
    nu = T([[0.5, 0.3, 0.0]], dtype=torch.float64).log()
    pi = T([[0.4, 0.4, 0.0]], dtype=torch.float64).log()
    # TV = ½ (|0.5 − 0.4| + |0.3 − 0.4| + |0.2 − 0.2|) = 0.1
    assert topk_tv(pi, nu).item() == pytest.approx(0.1)
    # KL = 0.5 ln(0.5/0.4) + 0.3 ln(0.3/0.4) + 0.2 ln(0.2/0.2) = 0.111572 − 0.086305 = 0.025267
    expected = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4)
    assert topk_kl(pi, nu).item() == pytest.approx(expected, abs=1e-7)


def test_kl_estimators_by_hand() -> None:
    # log π = ln 0.5, log π_ref = ln 0.25: x = ln 0.5 = −0.693147
    logp, ref = T([math.log(0.5)]), T([math.log(0.25)])
    x = math.log(0.5)
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(-x)  # 0.693147
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(x * x / 2)  # 0.240227
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 - x - 1)  # 0.193147
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_estimate(logp, ref, "k4")  # type: ignore[arg-type]


def test_ratio_and_shift_are_clamped_and_accurate() -> None:
    assert importance_ratio(T([0.0]), T([-100.0])).item() == pytest.approx(math.exp(20))
    # π − ν for a tiny shift: expm1 keeps the digits that exp(a) − exp(b) loses in float32.
    # Two float32 log-probs one ulp apart near ln 0.3: d = 2**-24 (ulp of 1.2 in [1, 2) is 2**-23,
    # of 1.204 ≈ |ln 0.3| is 2**-23 too; take it from nextafter to be exact).
    anchor = torch.tensor([math.log(0.3)], dtype=torch.float32)
    logp = torch.nextafter(anchor, torch.zeros(1))
    d = (logp.double() - anchor.double()).item()
    expected = math.exp(anchor.item()) * math.expm1(d)  # ν·(e^d − 1) ≈ 0.3·d
    assert prob_shift(logp, anchor).item() == pytest.approx(expected, rel=1e-5)


def test_masked_reductions() -> None:
    values = T([1.0, float("nan"), -3.0, 5.0])
    mask = T([True, False, True, False])
    assert masked_mean(values, mask).item() == -1.0  # (1 − 3) / 2
    assert masked_min(values, mask).item() == -3.0
    assert masked_max(values, mask).item() == 1.0
    empty = torch.zeros(4, dtype=torch.bool)
    assert masked_mean(values, empty).item() == 0.0
    assert masked_min(values, empty).item() == 0.0
    assert masked_max(values, empty).item() == 0.0
