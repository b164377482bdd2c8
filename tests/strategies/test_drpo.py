"""DRPO, DRPO with the reference δ = 12.5, and SPO against the spec's test vectors (section 3).

DRPO: J = r Â − |Â| Δ² / (2 δ ν), Δ = π − ν  ⇒  w = 1 − sign(Â) (π − ν) / δ
SPO:  J = r Â − |Â| (r − 1)² / (2 ε)        ⇒  w = 1 − sign(Â) (r − 1) / ε
Weights come from autograd: w = (−∂loss/∂log π) / (Â·r), everything in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from trustregion.strategies import DRPO, SPO, DRPOReference, StrategyOutput, TokenBatch
from trustregion.strategies.base import TrustRegionStrategy
from trustregion.strategies.registry import get_strategy

F64 = torch.float64
P = "trust_region/"


def one_token_batch(nu: list[float], pi: list[float], adv: list[float],
                    mask: list[int] | None = None) -> TokenBatch:
    behavior_logp = torch.tensor(nu, dtype=F64).log()[:, None]
    logp = torch.tensor(pi, dtype=F64).log()[:, None].requires_grad_(True)
    return TokenBatch(
        logp=logp,
        behavior_logp=behavior_logp,
        advantages=torch.tensor(adv, dtype=F64),
        mask=torch.ones_like(behavior_logp, dtype=torch.bool) if mask is None
        else torch.tensor(mask, dtype=torch.bool)[:, None],
    )


def loss_and_weight(strategy: TrustRegionStrategy, batch: TokenBatch
                    ) -> tuple[StrategyOutput, Tensor]:
    out = strategy(batch)
    out.token_loss.sum().backward()
    ratio = (batch.logp.detach() - batch.behavior_logp).exp()
    weight = -batch.logp.grad / (batch.token_advantages() * ratio)
    return out, weight[:, 0]


# The spec's table: ν, π, Â, w DRPO δ=0.15, w DRPO δ=12.5, w SPO ε=0.2 (printed to 3 decimals).
TEST_VECTORS = [
    (0.5, 0.5, +1, 1.0, 1.0, 1.0),
    (0.5, 0.65, +1, 0.0, 0.988, -0.5),
    (0.5, 0.8, +1, -1.0, 0.976, -2.0),
    (0.5, 0.35, +1, 2.0, 1.012, 2.5),
    (0.5, 0.35, -1, 0.0, 0.988, -0.5),
    (0.5, 0.65, -1, 2.0, 1.012, 2.5),
    (0.01, 0.16, +1, 0.0, 0.988, -74.0),
    (0.9, 0.7, -1, -0.333, 0.984, -0.111),
    (1e-4, 0.05, +1, 0.667, 0.996, -2494.0),
]
STRATEGIES = {
    "drpo": (3, 0.15),            # column, δ
    "drpo_reference": (4, 12.5),  # column, δ
    "spo": (5, 0.2),              # column, ε
}


def closed_form(name: str, nu: float, pi: float, adv: float) -> float:
    _, width = STRATEGIES[name]
    sign = math.copysign(1.0, adv)
    if name == "spo":
        return 1 - sign * (pi / nu - 1) / width   # 1 − sign(Â)(r − 1)/ε
    return 1 - sign * (pi - nu) / width           # 1 − sign(Â)(π − ν)/δ


@pytest.mark.parametrize("name", list(STRATEGIES))
@pytest.mark.parametrize("row", TEST_VECTORS, ids=[f"nu{r[0]}-pi{r[1]}-adv{r[2]:+d}"
                                                   for r in TEST_VECTORS])
def test_spec_test_vectors(name: str, row: tuple[float, ...]) -> None:
    nu, pi, adv = row[:3]
    column, width = STRATEGIES[name]
    strategy = get_strategy(name)
    # the registered defaults are the table's widths
    assert (strategy.epsilon if name == "spo" else strategy.delta) == width
    out, weight = loss_and_weight(strategy, one_token_batch([nu], [pi], [adv]))
    # the table's printed precision
    assert weight.item() == pytest.approx(row[column], abs=5e-4)
    # the exact closed form
    assert weight.item() == pytest.approx(closed_form(name, nu, pi, adv), abs=1e-9)
    # the weight the strategy declares agrees
    assert out.weight.item() == pytest.approx(closed_form(name, nu, pi, adv), abs=1e-9)


def test_drpo_reference_is_drpo_with_delta_12_5() -> None:
    assert DRPOReference().delta == 12.5
    assert isinstance(DRPOReference(), DRPO)
    assert DRPO().delta == 0.15


def test_drpo_loss_values_by_hand() -> None:
    batch = one_token_batch(nu=[0.5, 0.5, 0.2], pi=[0.65, 0.35, 0.3], adv=[1.0, -1.0, 2.0])
    out = DRPO()(batch)  # δ = 0.15
    expected = torch.tensor([
        # r = 1.3, Δ = 0.15: J = 1.3·1 − 1·0.0225/(2·0.15·0.5) = 1.3 − 0.15 = 1.15 → −1.15
        [-1.15],
        # r = 0.7, Δ = −0.15: J = 0.7·(−1) − 1·0.0225/0.15 = −0.7 − 0.15 = −0.85 → 0.85
        [0.85],
        # r = 1.5, Δ = 0.1: J = 1.5·2 − 2·0.01/(2·0.15·0.2) = 3 − 0.02/0.06 = 2.666667 → −2.666667
        [-(3.0 - 0.02 / 0.06)],
    ], dtype=F64)
    torch.testing.assert_close(out.token_loss, expected, atol=1e-12, rtol=0)
    # penalty |Â|Δ²/(2δν) = [0.15, 0.15, 0.333333]; mean = 0.633333/3 = 0.211111
    assert float(out.metrics[P + "penalty_mean"]) == pytest.approx((0.15 + 0.15 + 1 / 3) / 3,
                                                                   abs=1e-12)


def test_penalty_mean_ignores_masked_tokens() -> None:
    # the masked token (Δ = 0.4) would add 1·0.16/(2·0.15·0.5) = 1.0667; mean stays 0.15
    batch = one_token_batch(nu=[0.5, 0.5], pi=[0.65, 0.9], adv=[1.0, 1.0], mask=[1, 0])
    out = DRPO()(batch)
    assert float(out.metrics[P + "penalty_mean"]) == pytest.approx(0.15, abs=1e-12)


def test_asymmetric_deltas() -> None:
    strategy = DRPO(delta_low=0.1, delta_high=0.3)
    batch = one_token_batch(
        nu=[0.5, 0.5, 0.5, 0.5, 0.5],
        pi=[0.65, 0.35, 0.35, 0.65, 0.85],
        adv=[1.0, 1.0, -1.0, -1.0, 1.0],
    )
    out, weight = loss_and_weight(strategy, batch)
    expected = torch.tensor([
        1 - 0.15 / 0.3,   # π ≥ ν → δ_high: 1 − (+1)(0.15)/0.3 = 0.5
        1 + 0.15 / 0.1,   # π < ν → δ_low:  1 − (+1)(−0.15)/0.1 = 2.5
        1 - 0.15 / 0.1,   # π < ν → δ_low:  1 − (−1)(−0.15)/0.1 = −0.5
        1 + 0.15 / 0.3,   # π ≥ ν → δ_high: 1 − (−1)(0.15)/0.3 = 1.5
        1 - 0.35 / 0.3,   # π ≥ ν → δ_high: 1 − 0.35/0.3 = −0.166667 (beyond the boundary)
    ], dtype=F64)
    torch.testing.assert_close(weight, expected, atol=1e-9, rtol=0)
    # outside: Â > 0 beyond δ_high (t4); Â < 0 beyond δ_low (t2)
    assert out.outside[:, 0].tolist() == [False, False, True, False, True]
    # loss of t1: r = 0.7, Δ = −0.15: J = 0.7 − 0.0225/(2·0.1·0.5) = 0.7 − 0.225 = 0.475
    assert out.token_loss[1, 0].item() == pytest.approx(-0.475, abs=1e-12)


def test_asymmetric_weight_is_continuous_at_pi_equal_nu() -> None:
    strategy = DRPO(delta_low=0.05, delta_high=0.4)
    nu = 0.3
    eps = 1e-8
    batch = one_token_batch(nu=[nu] * 6, pi=[nu * (1 - eps), nu, nu * (1 + eps)] * 2,
                            adv=[1.0] * 3 + [-1.0] * 3)
    _, weight = loss_and_weight(strategy, batch)
    # |w − 1| = |Δ|/δ ≤ (0.3e-8)/0.05 = 6e-8 on both sides; w = 1 exactly at π = ν
    torch.testing.assert_close(weight, torch.ones(6, dtype=F64), atol=1e-7, rtol=0)


def test_only_delta_high_overrides_one_side() -> None:
    strategy = DRPO(delta_high=0.3)  # δ_low stays δ = 0.15
    assert strategy.deltas == (0.15, 0.3)
    _, weight = loss_and_weight(strategy, one_token_batch([0.5, 0.5], [0.35, 0.65], [-1.0, 1.0]))
    # t0: π < ν, δ_low = 0.15: 1 − (−1)(−0.15)/0.15 = 0
    # t1: π ≥ ν, δ_high = 0.3: 1 − 0.15/0.3 = 0.5
    torch.testing.assert_close(weight, torch.tensor([0.0, 0.5], dtype=F64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("delta", [0.15, 12.5, 0.02])
def test_weight_bounded_over_dense_grid(delta: float) -> None:
    probs = torch.linspace(1e-4, 0.9999, 61, dtype=F64)
    nu, pi = torch.meshgrid(probs, probs, indexing="ij")
    nu, pi = nu.reshape(-1), pi.reshape(-1)
    adv = torch.tensor([1.0, -1.0, 0.3, -2.5], dtype=F64).repeat(nu.numel() // 4 + 1)[:nu.numel()]
    batch = TokenBatch(
        logp=pi.log()[:, None].requires_grad_(True),
        behavior_logp=nu.log()[:, None],
        advantages=adv,
        mask=torch.ones(nu.numel(), 1, dtype=torch.bool),
    )
    _, weight = loss_and_weight(DRPO(delta=delta), batch)
    # |π − ν| < 1, so 1 − 1/δ < w < 1 + 1/δ for every ν (δ = 0.15: [−5.667, 7.667])
    assert bool((weight >= 1 - 1 / delta - 1e-9).all())
    assert bool((weight <= 1 + 1 / delta + 1e-9).all())
    # and it is the closed form everywhere on the grid
    torch.testing.assert_close(weight, 1 - adv.sign() * (pi - nu) / delta, atol=1e-9, rtol=0)


def test_spo_weight_is_unbounded_for_rare_tokens() -> None:
    # contrast: SPO with ν = 1e-4, π = 0.05 gives w = 1 − 499/0.2 = −2494, far below 1 − 1/δ
    _, weight = loss_and_weight(SPO(), one_token_batch([1e-4], [0.05], [1.0]))
    assert weight.item() == pytest.approx(1 - 499 / 0.2, abs=1e-9)


def test_negative_weight_frac_and_weight_summary() -> None:
    batch = one_token_batch(
        nu=[0.5, 0.9, 0.5, 0.5, 0.5],
        pi=[0.8, 0.7, 0.6, 0.5, 0.9],
        adv=[1.0, -1.0, 1.0, 1.0, 1.0],
        mask=[1, 1, 1, 1, 0],
    )
    out = DRPO()(batch)  # δ = 0.15
    # w = [1 − 0.3/0.15, 1 − 0.2/0.15, 1 − 0.1/0.15, 1] = [−1, −1/3, 1/3, 1]; t4 masked
    torch.testing.assert_close(out.weight[:, 0],
                               torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0, 0.0], dtype=F64),
                               atol=1e-9, rtol=0)
    m = {k: float(v) for k, v in out.metrics.items()}
    assert m[P + "negative_weight_frac"] == pytest.approx(2 / 4)  # t0, t1 of 4 unmasked
    assert m[P + "outside_frac"] == pytest.approx(2 / 4)          # the same two tokens
    assert m[P + "outside_frac_pos_adv"] == pytest.approx(1 / 3)  # t0 of {t0, t2, t3}
    assert m[P + "outside_frac_neg_adv"] == pytest.approx(1.0)    # t1 of {t1}
    assert m[P + "weight_min"] == pytest.approx(-1.0, abs=1e-9)
    assert m[P + "weight_max"] == pytest.approx(1.0, abs=1e-9)
    assert m[P + "weight_mean"] == pytest.approx(0.0, abs=1e-9)   # (−1 − 1/3 + 1/3 + 1)/4


def test_spo_asymmetric_epsilons() -> None:
    strategy = SPO(epsilon_low=0.1, epsilon_high=0.3)
    assert strategy.epsilons == (0.1, 0.3)
    batch = one_token_batch(
        nu=[0.5, 0.5, 0.5, 0.5, 0.5],
        pi=[0.6, 0.4, 0.4, 0.6, 0.7],
        adv=[1.0, 1.0, -1.0, -1.0, 1.0],
    )
    out, weight = loss_and_weight(strategy, batch)
    # w = 1 − sign(Â)(r − 1)/ε_side, ε_high when r ≥ 1, ε_low when r < 1
    expected = torch.tensor([
        1 - 0.2 / 0.3,   # r = 1.2 → ε_high: 1 − 0.2/0.3 = 0.333333
        1 + 0.2 / 0.1,   # r = 0.8 → ε_low:  1 − (+1)(−0.2)/0.1 = 3
        1 - 0.2 / 0.1,   # r = 0.8 → ε_low:  1 − (−1)(−0.2)/0.1 = −1 (beyond the boundary)
        1 + 0.2 / 0.3,   # r = 1.2 → ε_high: 1 − (−1)(0.2)/0.3 = 1.666667
        1 - 0.4 / 0.3,   # r = 1.4 → ε_high: 1 − 0.4/0.3 = −0.333333 (beyond the boundary)
    ], dtype=F64)
    torch.testing.assert_close(weight, expected, atol=1e-9, rtol=0)
    # outside: Â < 0 below 1 − ε_low (t2); Â > 0 above 1 + ε_high (t4)
    assert out.outside[:, 0].tolist() == [False, False, True, False, True]
    # loss of t1: J = 0.8 − 1·0.04/(2·0.1) = 0.8 − 0.2 = 0.6 → loss −0.6
    assert out.token_loss[1, 0].item() == pytest.approx(-0.6, abs=1e-12)


def test_spo_one_side_inherits_epsilon() -> None:
    # ε_high = 0.3 set, ε_low left at None inherits ε = 0.2
    strategy = SPO(epsilon_high=0.3)
    assert strategy.epsilons == (0.2, 0.3)
    _, weight = loss_and_weight(strategy, one_token_batch([0.5, 0.5], [0.4, 0.6], [-1.0, 1.0]))
    # t0: r = 0.8, ε_low = 0.2: 1 − (−1)(−0.2)/0.2 = 0;  t1: r = 1.2, ε_high = 0.3: 1 − 0.2/0.3
    torch.testing.assert_close(weight, torch.tensor([0.0, 1 - 0.2 / 0.3], dtype=F64),
                               atol=1e-9, rtol=0)
