"""RatioClip (PPO / GRPO / DAPO clip-higher / dual clip): hand-derived losses and weights.

J_t = min(r Â, clip(r, 1 − ε_low, 1 + ε_high) Â), with dual clip J_t = max(J_t, c·Â) for Â < 0.
Every case uses one-token sequences in float64, so r = π/ν is exact to ~1e-16; the gradient
weight is w = (−∂loss/∂log π) / (Â·r), taken from autograd.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from trustregion.strategies import RatioClip, StrategyOutput, TokenBatch

F64 = torch.float64
P = "trust_region/"


def one_token_batch(nu: list[float], pi: list[float], adv: list[float],
                    old: list[float] | None = None) -> TokenBatch:
    """N one-token sequences with behaviour prob ν, current prob π, advantage Â (and π_old)."""
    behavior_logp = torch.tensor(nu, dtype=F64).log()[:, None]
    logp = torch.tensor(pi, dtype=F64).log()[:, None].requires_grad_(True)
    return TokenBatch(
        logp=logp,
        behavior_logp=behavior_logp,
        advantages=torch.tensor(adv, dtype=F64),
        mask=torch.ones_like(behavior_logp, dtype=torch.bool),
        old_logp=None if old is None else torch.tensor(old, dtype=F64).log()[:, None],
    )


def loss_and_weight(strategy: RatioClip, batch: TokenBatch,
                    anchor_logp: Tensor | None = None) -> tuple[StrategyOutput, Tensor]:
    """(output, autograd weight −∂Σloss/∂log π ÷ (Â·r)) with r measured against the anchor."""
    out = strategy(batch)
    out.token_loss.sum().backward()
    anchor = batch.behavior_logp if anchor_logp is None else anchor_logp
    ratio = (batch.logp.detach() - anchor).exp()
    weight = -batch.logp.grad / (batch.token_advantages() * ratio)
    return out, weight


# (ν, π, Â, expected loss, expected w) with the default ε_low = ε_high = 0.2: region [0.8, 1.2].
DEFAULT_CASES = {
    # r = 0.55/0.5 = 1.1 inside: J = 1.1·1 → loss −1.1, w = 1
    "inside": (0.5, 0.55, 1.0, -1.1, 1.0),
    # r = 0.6/0.4 = 1.5 > 1.2, Â = 2 > 0: J = min(1.5·2, 1.2·2) = 2.4 → loss −2.4, w = 0
    "above_pos_adv": (0.4, 0.6, 2.0, -2.4, 0.0),
    # r = 0.3/0.5 = 0.6 < 0.8, Â = −1: J = min(−0.6, −0.8) = −0.8 → loss 0.8, w = 0
    "below_neg_adv": (0.5, 0.3, -1.0, 0.8, 0.0),
    # r = 0.6 < 0.8 but Â = +1: J = min(0.6, 0.8) = 0.6, unclipped → loss −0.6, w = 1
    "below_pos_adv": (0.5, 0.3, 1.0, -0.6, 1.0),
    # r = 1.5 > 1.2 but Â = −1: J = min(−1.5, −1.2) = −1.5, unclipped → loss 1.5, w = 1
    "above_neg_adv": (0.4, 0.6, -1.0, 1.5, 1.0),
}


@pytest.mark.parametrize("case", list(DEFAULT_CASES))
def test_default_clip_loss_and_weight(case: str) -> None:
    nu, pi, adv, loss, w = DEFAULT_CASES[case]
    out, weight = loss_and_weight(RatioClip(), one_token_batch([nu], [pi], [adv]))
    torch.testing.assert_close(out.token_loss, torch.tensor([[loss]], dtype=F64),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(weight, torch.tensor([[w]], dtype=F64), atol=1e-12, rtol=0)
    # the declared weight agrees with autograd
    torch.testing.assert_close(out.weight, torch.tensor([[w]], dtype=F64), atol=1e-12, rtol=0)
    # outside only for the two harmful-direction cases
    assert bool(out.outside.item()) == (w == 0.0)


def test_dapo_clip_higher_is_asymmetric() -> None:
    strategy = RatioClip(epsilon_high=0.28)  # region [1 − 0.2, 1 + 0.28] = [0.8, 1.28]
    assert strategy.bounds == pytest.approx((0.8, 1.28))
    batch = one_token_batch(
        nu=[0.5, 0.5, 0.5],
        pi=[0.625, 0.7, 0.375],
        adv=[1.0, 1.0, -1.0],
    )
    out, weight = loss_and_weight(strategy, batch)
    expected_loss = torch.tensor([
        [-1.25],  # r = 1.25 ≤ 1.28: inside (it would be clipped at ε = 0.2) → −1.25
        [-1.28],  # r = 1.4 > 1.28, Â > 0: J = 1.28·1 → −1.28
        [0.8],    # r = 0.75 < 0.8, Â < 0: the lower side still uses 0.2: J = 0.8·(−1) → 0.8
    ], dtype=F64)
    torch.testing.assert_close(out.token_loss, expected_loss, atol=1e-12, rtol=0)
    torch.testing.assert_close(weight, torch.tensor([[1.0], [0.0], [0.0]], dtype=F64),
                               atol=1e-12, rtol=0)

    # the symmetric PPO default clips the first token: J = 1.2 → loss −1.2, w = 0
    out, weight = loss_and_weight(RatioClip(), one_token_batch([0.5], [0.625], [1.0]))
    torch.testing.assert_close(out.token_loss, torch.tensor([[-1.2]], dtype=F64),
                               atol=1e-12, rtol=0)
    assert weight.item() == 0.0


def test_epsilon_low_overrides_epsilon() -> None:
    # ε_low = 0.3: region [0.7, 1.2]; r = 0.375/0.5 = 0.75 with Â = −1 is inside → loss 0.75, w = 1
    out, weight = loss_and_weight(RatioClip(epsilon_low=0.3),
                                  one_token_batch([0.5], [0.375], [-1.0]))
    torch.testing.assert_close(out.token_loss, torch.tensor([[0.75]], dtype=F64),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(weight, torch.ones(1, 1, dtype=F64), atol=1e-12, rtol=0)


def test_dual_clip() -> None:
    strategy = RatioClip(dual_clip_cap=3.0)
    batch = one_token_batch(
        nu=[0.2, 0.2, 0.3, 0.2],
        pi=[0.8, 0.8, 0.6, 0.8],
        adv=[-1.0, -2.0, -1.0, 1.0],
    )
    out, weight = loss_and_weight(strategy, batch)
    expected_loss = torch.tensor([
        [3.0],   # r = 4 > c = 3, Â = −1: J = max(min(−4, −1.2), −3) = −3 = c·Â → loss 3
        [6.0],   # r = 4, Â = −2: J = max(min(−8, −2.4), −6) = −6 = c·Â → loss 6
        [2.0],   # r = 2 < c, Â = −1: J = max(min(−2, −1.2), −3) = −2 → loss 2, not dual-clipped
        [-1.2],  # r = 4, Â = +1: dual clip ignores Â > 0; J = min(4, 1.2) = 1.2 → loss −1.2
    ], dtype=F64)
    torch.testing.assert_close(out.token_loss, expected_loss, atol=1e-12, rtol=0)
    torch.testing.assert_close(weight, torch.tensor([[0.0], [0.0], [1.0], [0.0]], dtype=F64),
                               atol=1e-12, rtol=0)
    # dual-clipped tokens are not "outside" (that is the ε clip); the Â > 0 one is
    assert out.outside[:, 0].tolist() == [False, False, False, True]


def test_without_dual_clip_large_ratio_negative_advantage_is_unbounded() -> None:
    # r = 4, Â = −1, no dual clip: J = min(−4, −1.2) = −4 → loss 4, w = 1
    out, weight = loss_and_weight(RatioClip(), one_token_batch([0.2], [0.8], [-1.0]))
    torch.testing.assert_close(out.token_loss, torch.tensor([[4.0]], dtype=F64),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(weight, torch.ones(1, 1, dtype=F64), atol=1e-12, rtol=0)


def test_anchor_old_measures_the_ratio_against_old_logp() -> None:
    # ν = μ = 0.5, π_old = 0.4, π = 0.55, Â = 1
    # behaviour anchor: r = 0.55/0.5 = 1.1, inside → loss −1.1, w = 1
    batch = one_token_batch([0.5], [0.55], [1.0], old=[0.4])
    out, weight = loss_and_weight(RatioClip(), batch)
    torch.testing.assert_close(out.token_loss, torch.tensor([[-1.1]], dtype=F64),
                               atol=1e-12, rtol=0)
    assert weight.item() == pytest.approx(1.0, abs=1e-12)

    # old anchor: r = 0.55/0.4 = 1.375 > 1.2 → J = 1.2·1 → loss −1.2, w = 0
    batch = one_token_batch([0.5], [0.55], [1.0], old=[0.4])
    assert batch.old_logp is not None
    out, weight = loss_and_weight(RatioClip(anchor="old"), batch, anchor_logp=batch.old_logp)
    torch.testing.assert_close(out.token_loss, torch.tensor([[-1.2]], dtype=F64),
                               atol=1e-12, rtol=0)
    assert weight.item() == 0.0
    assert bool(out.outside.item())


def test_metrics_on_a_hand_built_batch() -> None:
    # One sequence of 6 tokens with per-token advantages; the last token is masked.
    nu = [0.4, 0.5, 0.5, 0.2, 0.5, 0.1]
    pi = [0.6, 0.55, 0.3, 0.8, 0.5, 0.9]
    adv = [1.0, 1.0, -1.0, -1.0, -1.0, 1.0]
    # r = [1.5, 1.1, 0.6, 4.0, 1.0, 9.0]
    # t0: Â > 0, r > 1.2        → outside (above)
    # t1: Â > 0, inside
    # t2: Â < 0, r < 0.8        → outside (below)
    # t3: Â < 0, r = 4 > c = 3  → dual-clipped (not "outside")
    # t4: Â < 0, r = 1, inside
    # t5: masked (would be outside above) — ignored everywhere
    batch = TokenBatch(
        logp=torch.tensor([pi], dtype=F64).log().requires_grad_(True),
        behavior_logp=torch.tensor([nu], dtype=F64).log(),
        advantages=torch.tensor([adv], dtype=F64),
        mask=torch.tensor([[1, 1, 1, 1, 1, 0]]),
    )
    out = RatioClip(dual_clip_cap=3.0)(batch)
    m = {k: float(v) for k, v in out.metrics.items()}
    assert m[P + "outside_frac_pos_adv"] == pytest.approx(1 / 2)  # t0 of {t0, t1}
    assert m[P + "outside_frac_neg_adv"] == pytest.approx(1 / 3)  # t2 of {t2, t3, t4}
    assert m[P + "dual_clip_frac"] == pytest.approx(1 / 5)        # t3 of 5 unmasked tokens
    assert m[P + "outside_frac"] == pytest.approx(2 / 5)          # t0, t2
    assert m[P + "zero_weight_frac"] == pytest.approx(3 / 5)      # t0, t2, t3
    assert m[P + "weight_mean"] == pytest.approx(2 / 5)           # w = [0, 1, 0, 0, 1]
    assert out.weight.tolist() == [[0.0, 1.0, 0.0, 0.0, 1.0, 0.0]]
    assert out.token_loss[0, 5].item() == 0.0
