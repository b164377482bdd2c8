"""PG-IS, CISPO, GSPO and the log-ratio quadratic (DRO): hand-derived losses and weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from trustregion.functional import aggregate
from trustregion.strategies import (
    CISPO,
    GSPO,
    ImportanceSampledPG,
    LogRatioQuadratic,
    StrategyOutput,
    TokenBatch,
)
from trustregion.strategies.base import TrustRegionStrategy

F64 = torch.float64
P = "trust_region/"


def one_token_batch(nu: list[float], pi: list[float], adv: list[float]) -> TokenBatch:
    behavior_logp = torch.tensor(nu, dtype=F64).log()[:, None]
    return TokenBatch(
        logp=torch.tensor(pi, dtype=F64).log()[:, None].requires_grad_(True),
        behavior_logp=behavior_logp,
        advantages=torch.tensor(adv, dtype=F64),
        mask=torch.ones_like(behavior_logp, dtype=torch.bool),
    )


def sequence_batch(nu: list[list[float]], pi: list[list[float]], adv: list[float],
                   mask: list[list[int]]) -> TokenBatch:
    return TokenBatch(
        logp=torch.tensor(pi, dtype=F64).log().requires_grad_(True),
        behavior_logp=torch.tensor(nu, dtype=F64).log(),
        advantages=torch.tensor(adv, dtype=F64),
        mask=torch.tensor(mask, dtype=torch.bool),
    )


def grad_of_sum(strategy: TrustRegionStrategy, batch: TokenBatch
                ) -> tuple[StrategyOutput, Tensor]:
    """(output, ∂J/∂log π = −∂Σloss/∂log π)."""
    out = strategy(batch)
    out.token_loss.sum().backward()
    assert batch.logp.grad is not None
    return out, -batch.logp.grad


def weight_of(batch: TokenBatch, dj_dlogp: Tensor) -> Tensor:
    ratio = (batch.logp.detach() - batch.behavior_logp).exp()
    return dj_dlogp / (batch.token_advantages() * ratio)


# ---------------------------------------------------------------------------------------- PG-IS

def test_pg_is_loss_and_unit_weight() -> None:
    batch = one_token_batch(nu=[0.5, 0.2, 0.9], pi=[0.6, 0.8, 0.1], adv=[1.0, -2.0, 0.5])
    out, grad = grad_of_sum(ImportanceSampledPG(), batch)
    # r = [1.2, 4, 1/9]; loss = −r·Â = [−1.2, 8, −0.0555556]
    torch.testing.assert_close(out.token_loss[:, 0],
                               torch.tensor([-1.2, 8.0, -0.5 / 9], dtype=F64), atol=1e-12, rtol=0)
    # w = 1 everywhere, however far the token moved; nothing is ever outside
    torch.testing.assert_close(weight_of(batch, grad)[:, 0], torch.ones(3, dtype=F64),
                               atol=1e-12, rtol=0)
    assert not bool(out.outside.any())


# ---------------------------------------------------------------------------------------- CISPO

def test_cispo_loss_and_weight_defaults() -> None:
    strategy = CISPO()  # ε_high = 0.28, no lower bound (ε = inf, inherited by ε_low)
    assert (strategy.epsilon, strategy.epsilon_low, strategy.epsilon_high) == (math.inf, None, 0.28)
    assert strategy.bounds == (-math.inf, 1.28)
    batch = one_token_batch(
        nu=[0.3, 0.5, 0.5, 0.2],
        pi=[0.6, 0.1, 0.6, 0.9],
        adv=[1.5, 1.0, -1.0, -1.0],
    )
    out, grad = grad_of_sum(strategy, batch)
    # loss = −sg(clip(r, −∞, 1.28))·Â·log π
    expected_loss = torch.tensor([
        -1.28 * 1.5 * math.log(0.6),   # r = 2 → 1.28: −1.92·(−0.5108256) = 0.9807852
        -0.2 * 1.0 * math.log(0.1),    # r = 0.2, lower side open: −0.2·(−2.3025851) = 0.4605170
        -1.2 * -1.0 * math.log(0.6),   # r = 1.2 inside: 1.2·(−0.5108256) = −0.6129907
        -1.28 * -1.0 * math.log(0.9),  # r = 4.5 → 1.28: 1.28·(−0.1053605) = −0.1348614
    ], dtype=F64)
    torch.testing.assert_close(out.token_loss[:, 0], expected_loss, atol=1e-12, rtol=0)
    assert out.token_loss[0, 0].item() == pytest.approx(0.9807851976307022, abs=1e-12)
    # w = clip(r)/r = [1.28/2, 1, 1, 1.28/4.5] = [0.64, 1, 1, 0.284444]: never 0
    expected_w = torch.tensor([0.64, 1.0, 1.0, 1.28 / 4.5], dtype=F64)
    torch.testing.assert_close(weight_of(batch, grad)[:, 0], expected_w, atol=1e-12, rtol=0)
    torch.testing.assert_close(out.weight[:, 0], expected_w, atol=1e-12, rtol=0)
    # only the upper clip with Â > 0 restrains a harmful move: t0 outside, t3 (Â < 0) not
    assert out.outside[:, 0].tolist() == [True, False, False, False]
    # clipped: t0 (r = 2) and t3 (r = 4.5) → 2/4
    assert float(out.metrics[P + "clipped_frac"]) == pytest.approx(0.5)


@pytest.mark.parametrize("strategy", [CISPO(epsilon_low=0.2), CISPO(epsilon=0.2)],
                         ids=["epsilon_low", "epsilon"])
def test_cispo_lower_bound(strategy: CISPO) -> None:
    # ε_low = 0.2 set on its own, or inherited from ε = 0.2 (ε_high stays 0.28): [0.8, 1.28]
    assert strategy.bounds == pytest.approx((0.8, 1.28))
    batch = one_token_batch(nu=[0.3, 0.5, 0.5, 0.2], pi=[0.6, 0.1, 0.6, 0.9],
                            adv=[1.5, 1.0, -1.0, -1.0])
    out, grad = grad_of_sum(strategy, batch)
    # t1: r = 0.2 → 0.8: w = 0.8/0.2 = 4, loss = −0.8·1·ln 0.1 = 1.8420681
    assert weight_of(batch, grad)[1, 0].item() == pytest.approx(4.0, abs=1e-12)
    assert out.token_loss[1, 0].item() == pytest.approx(1.8420680743952365, abs=1e-12)
    # the raised weight is not "outside" (it does not restrain a harmful move)
    assert not bool(out.outside[1, 0])
    # clipped: t0, t1, t3 → 3/4
    assert float(out.metrics[P + "clipped_frac"]) == pytest.approx(0.75)


# ----------------------------------------------------------------------------------------- GSPO

def gspo_batch() -> TokenBatch:
    return sequence_batch(
        nu=[[0.5, 0.4, 0.1], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]],
        pi=[[0.6, 0.3, 0.9], [0.8, 0.45, 0.7], [0.35, 0.35, 0.9]],
        adv=[2.0, 1.0, -1.0],
        mask=[[1, 1, 0], [1, 1, 1], [1, 1, 0]],
    )


S0 = math.sqrt(1.2 * 0.75)  # seq 0: s = exp((ln 1.2 + ln 0.75)/2) = √0.9 = 0.9486833


def test_gspo_sequence_ratio_over_unmasked_tokens() -> None:
    strategy = GSPO(epsilon_low=0.2, epsilon_high=0.2)  # s region [0.8, 1.2]
    batch = gspo_batch()
    s = GSPO.sequence_ratio(strategy.prepare(batch))[:, 0]
    # seq 0: r = [1.2, 0.75] on the unmasked tokens (the masked r = 9 must not count): s = √0.9
    # seq 1: r = [1.6, 0.9, 1.4]: s = (1.6·0.9·1.4)^(1/3) = 2.016^(1/3) = 1.2632719
    # seq 2: r = [0.7, 0.7]: s = 0.7
    torch.testing.assert_close(s, torch.tensor([S0, 2.016 ** (1 / 3), 0.7], dtype=F64),
                               atol=1e-12, rtol=0)
    assert pytest.approx(0.9486832980505138, abs=1e-15) == S0


def test_gspo_token_losses_and_weights() -> None:
    strategy = GSPO(epsilon_low=0.2, epsilon_high=0.2)
    batch = gspo_batch()
    out, grad = grad_of_sum(strategy, batch)
    expected_loss = torch.tensor([
        [-S0 * 2, -S0 * 2, 0.0],  # inside: −s·Â = −1.8973666 on each unmasked token
        [-1.2, -1.2, -1.2],       # s = 1.263 > 1.2, Â = 1: −1.2·1
        [0.8, 0.8, 0.0],          # s = 0.7 < 0.8, Â = −1: −(0.8·(−1))
    ], dtype=F64)
    torch.testing.assert_close(out.token_loss, expected_loss, atol=1e-12, rtol=0)
    # sum of token losses: ∂J/∂log π_t = s·Â for each token of seq 0 (value s, gradient s·∇log π)
    torch.testing.assert_close(grad[0], torch.tensor([S0 * 2, S0 * 2, 0.0], dtype=F64),
                               atol=1e-12, rtol=0)
    # w_t = s/r_t = [√0.9/1.2, √0.9/0.75] = [0.7905694, 1.2649111]
    w = weight_of(batch, grad)
    torch.testing.assert_close(w[0, :2], torch.tensor([S0 / 1.2, S0 / 0.75], dtype=F64),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(out.weight[0, :2], w[0, :2], atol=1e-12, rtol=0)
    # seq 1 is clipped (s beyond 1 + ε_high with Â > 0): zero gradient on ALL its tokens,
    # including the one whose own ratio (0.9) is below 1; likewise the clipped seq 2 (Â < 0)
    assert grad[1].tolist() == [0.0, 0.0, 0.0]
    assert grad[2].tolist() == [0.0, 0.0, 0.0]
    assert out.outside.tolist() == [[False, False, False], [True, True, True],
                                    [True, True, False]]


def test_gspo_seq_mean_token_mean_is_the_sequence_objective() -> None:
    strategy = GSPO(epsilon_low=0.2, epsilon_high=0.2)
    batch = gspo_batch()
    loss = aggregate(strategy(batch).token_loss, batch.mask, "seq-mean-token-mean")
    # mean over sequences of −min(s Â, clip(s, 0.8, 1.2) Â):
    #   seq 0: −min(1.8973666, 1.8973666) = −1.8973666
    #   seq 1: −min(1.2632719, 1.2)       = −1.2
    #   seq 2: −min(−0.7, −0.8)           = +0.8
    # (−1.8973666 − 1.2 + 0.8)/3 = −0.7657889
    assert loss.item() == pytest.approx((-2 * S0 - 1.2 + 0.8) / 3, abs=1e-12)
    assert loss.item() == pytest.approx(-0.7657888653670092, abs=1e-12)
    loss.backward()
    assert batch.logp.grad is not None
    gspo_grad = batch.logp.grad.clone()

    # the same objective written directly from s = exp(mean over unmasked tokens of log r)
    logp = batch.logp.detach().clone().requires_grad_(True)
    mask = batch.mask.to(F64)
    s = (((logp - batch.behavior_logp) * mask).sum(-1) / mask.sum(-1)).exp()
    adv = batch.advantages
    objective = torch.minimum(s * adv, s.clamp(0.8, 1.2) * adv)
    (-objective.mean()).backward()
    # seq 0: ∂/∂log π_t of −(1/3)·s·Â = −(1/3)·(s/2)·Â = −√0.9/3 = −0.3162278
    assert gspo_grad[0, 0].item() == pytest.approx(-S0 / 3, abs=1e-12)
    torch.testing.assert_close(gspo_grad, logp.grad, atol=1e-12, rtol=0)


def test_gspo_default_epsilons() -> None:
    strategy = GSPO()
    assert (strategy.epsilon, strategy.epsilon_low, strategy.epsilon_high) == (3e-4, None, 4e-4)
    assert strategy.bounds == (1 - 3e-4, 1 + 4e-4)
    # two-token sequences with log r = 3e-4 (s = e^3e-4 = 1.0003, inside [0.9997, 1.0004]) and
    # log r = 5e-4 (s = 1.0005 > 1.0004, clipped); Â = 1
    nu = 0.5
    batch = sequence_batch(
        nu=[[nu, nu], [nu, nu]],
        pi=[[nu * math.exp(3e-4)] * 2, [nu * math.exp(5e-4)] * 2],
        adv=[1.0, 1.0],
        mask=[[1, 1], [1, 1]],
    )
    out, grad = grad_of_sum(strategy, batch)
    assert out.outside.tolist() == [[False, False], [True, True]]
    torch.testing.assert_close(grad[0], torch.full((2,), math.exp(3e-4), dtype=F64),
                               atol=1e-12, rtol=0)
    assert grad[1].tolist() == [0.0, 0.0]
    # clipped loss: −(1 + 4e-4)·1 per token
    torch.testing.assert_close(out.token_loss[1], torch.full((2,), -1.0004, dtype=F64),
                               atol=1e-12, rtol=0)


# ------------------------------------------------------------------------ log-ratio quadratic

def test_log_ratio_quadratic_gradient_and_loss() -> None:
    tau = 0.5
    batch = one_token_batch(nu=[0.4, 0.5, 0.5], pi=[0.6, 0.25, 0.8], adv=[1.0, -1.0, 0.0])
    out, grad = grad_of_sum(LogRatioQuadratic(penalty_strength=tau), batch)
    log_r = torch.tensor([math.log(1.5), -math.log(2.0), math.log(1.6)], dtype=F64)
    # ∂J/∂log π = Â − τ log r:
    #   t0: 1 − 0.5·ln 1.5 = 1 − 0.2027326 = 0.7972674
    #   t1: −1 − 0.5·(−ln 2) = −1 + 0.3465736 = −0.6534264
    #   t2: 0 − 0.5·ln 1.6 = −0.2350018 (Â = 0: only the pull toward ν remains)
    expected_grad = torch.tensor([0.7972674459459178, -0.6534264097200273,
                                  -0.23500181462286782], dtype=F64)
    torch.testing.assert_close(grad[:, 0], expected_grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad[:, 0], batch.advantages - tau * log_r, atol=1e-12, rtol=0)
    # loss = −(Â log π − (τ/2)(log r)²):
    #   t0: −(ln 0.6 − 0.25·(ln 1.5)²) = −(−0.5108256 − 0.0411005) = 0.5519261
    #   t1: −(−ln 0.25 − 0.25·(ln 2)²) = −(1.3862944 − 0.1201133) = −1.2661811
    #   t2: −(0 − 0.25·(ln 1.6)²) = 0.0552259
    expected_loss = torch.tensor([0.5519261122392821, -1.2661811076403402,
                                  0.05522585287604073], dtype=F64)
    torch.testing.assert_close(out.token_loss[:, 0], expected_loss, atol=1e-12, rtol=0)
    # declared weight (1 − τ log r/Â)/r on Â ≠ 0 tokens: t0 0.7972674/1.5, t1 0.6534264/0.5
    torch.testing.assert_close(out.weight[:2, 0],
                               torch.tensor([0.7972674459459178 / 1.5,
                                             0.6534264097200273 / 0.5], dtype=F64),
                               atol=1e-12, rtol=0)


def test_log_ratio_quadratic_outside_and_negative_weight() -> None:
    # τ = 2, Â = 0.5: boundary at log r = Â/τ = 0.25. ν = 0.4, π = 0.6: log r = 0.405 > 0.25
    # → ∂J/∂log π = 0.5 − 2·0.4054651 = −0.3109302 < 0: a pull back, and outside
    batch = one_token_batch(nu=[0.4], pi=[0.6], adv=[0.5])
    out, grad = grad_of_sum(LogRatioQuadratic(penalty_strength=2.0), batch)
    assert grad.item() == pytest.approx(0.5 - 2 * math.log(1.5), abs=1e-12)
    assert bool(out.outside.item())
    assert float(out.metrics[P + "negative_weight_frac"]) == 1.0
