"""DivergenceMask (DPPO): which tokens are dropped, for each divergence, by hand.

loss_t = −Â · sg(min(r, C)) · M_t · log π, so the gradient weight is w = M_t · min(r, C) / r:
1 on kept tokens (while r ≤ C), 0 on dropped ones. A token is dropped only when it has left the
region in the harmful direction for its advantage (up for Â > 0, down for Â < 0).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from trustregion.strategies import DivergenceMask, StrategyOutput, TokenBatch

F64 = torch.float64
P = "trust_region/"
NEG_INF = -math.inf


def one_token_batch(nu: list[float], pi: list[float], adv: list[float],
                    topk_nu: list[list[float]] | None = None,
                    topk_pi: list[list[float]] | None = None,
                    mask: list[int] | None = None) -> TokenBatch:
    """N one-token sequences; top-K probabilities (0 = unused slot) become [N, 1, K] log-probs."""
    behavior_logp = torch.tensor(nu, dtype=F64).log()[:, None]
    logp = torch.tensor(pi, dtype=F64).log()[:, None].requires_grad_(True)
    topk = {}
    if topk_nu is not None and topk_pi is not None:
        topk = {
            "topk_behavior_logp": torch.tensor(topk_nu, dtype=F64).log()[:, None, :],
            "topk_logp": torch.tensor(topk_pi, dtype=F64).log()[:, None, :],
        }
    return TokenBatch(
        logp=logp,
        behavior_logp=behavior_logp,
        advantages=torch.tensor(adv, dtype=F64),
        mask=torch.ones_like(behavior_logp, dtype=torch.bool) if mask is None
        else torch.tensor(mask, dtype=torch.bool)[:, None],
        **topk,
    )


def loss_and_weight(strategy: DivergenceMask, batch: TokenBatch) -> tuple[StrategyOutput, Tensor]:
    out = strategy(batch)
    out.token_loss.sum().backward()
    ratio = (batch.logp.detach() - batch.behavior_logp).exp()
    weight = -batch.logp.grad / (batch.token_advantages() * ratio)
    return out, weight[:, 0]


def test_binary_tv_drops_only_the_harmful_direction() -> None:
    batch = one_token_batch(
        nu=[0.5, 0.5, 0.5, 0.5, 0.9, 0.1],
        pi=[0.7, 0.6, 0.3, 0.4, 0.3, 0.9],
        adv=[1.0, 1.0, -1.0, -1.0, 1.0, -1.0],
    )
    out, weight = loss_and_weight(DivergenceMask(divergence="binary_tv"), batch)  # δ = 0.15
    # D = π − ν = [0.2, 0.1, −0.2, −0.1, −0.6, 0.8]
    # t0: Â > 0, D = 0.2 > 0.15          → dropped
    # t1: Â > 0, D = 0.1                 → kept
    # t2: Â < 0, D = −0.2 < −0.15        → dropped
    # t3: Â < 0, D = −0.1                → kept
    # t4: Â > 0, D = −0.6: far, but back toward ν for Â > 0 → kept (r = 1/3)
    # t5: Â < 0, D = +0.8: far, but back toward ν for Â < 0 → kept (r = 9 < C = 10)
    assert out.outside[:, 0].tolist() == [True, False, True, False, False, False]
    torch.testing.assert_close(weight, torch.tensor([0, 1, 0, 1, 1, 1], dtype=F64),
                               atol=1e-12, rtol=0)
    # t1: loss = −Â·r·log π = −1·1.2·ln 0.6 = 0.6129907485...
    assert out.token_loss[1, 0].item() == pytest.approx(0.6129907485191889, abs=1e-12)
    # dropped tokens have exactly zero loss
    assert out.token_loss[0, 0].item() == 0.0 and out.token_loss[2, 0].item() == 0.0


def test_binary_tv_asymmetric_deltas() -> None:
    batch = one_token_batch(nu=[0.5, 0.5], pi=[0.7, 0.4], adv=[1.0, -1.0])
    out, weight = loss_and_weight(DivergenceMask(delta_low=0.05, delta_high=0.3), batch)
    # t0: Â > 0, D = 0.2 ≤ δ_high = 0.3 → kept; t1: Â < 0, D = −0.1 < −δ_low = −0.05 → dropped
    assert out.outside[:, 0].tolist() == [False, True]
    torch.testing.assert_close(weight, torch.tensor([1.0, 0.0], dtype=F64), atol=1e-12, rtol=0)


def test_binary_kl_mask_decisions() -> None:
    # binary KL(ν‖π) = ν ln(ν/π) + (1 − ν) ln((1 − ν)/(1 − π)):
    #   ν = 0.5, π = 0.7: 0.5 ln(0.5/0.7) + 0.5 ln(0.5/0.3) = 0.5(−0.336472 + 0.510826) ≈ 0.087177
    #   ν = 0.5, π = 0.3: by symmetry the same, ≈ 0.087177
    #   ν = 0.5, π = 0.6: 0.5 ln(0.5/0.6) + 0.5 ln(0.5/0.4) = 0.5(−0.182322 + 0.223144) ≈ 0.020411
    batch = one_token_batch(
        nu=[0.5, 0.5, 0.5, 0.5, 0.5],
        pi=[0.7, 0.6, 0.3, 0.3, 0.7],
        adv=[1.0, 1.0, 1.0, -1.0, -1.0],
    )
    strategy = DivergenceMask(divergence="binary_kl")  # δ = 0.05
    divergence = strategy.divergence_of(strategy.prepare(batch))
    torch.testing.assert_close(
        divergence[:, 0],
        torch.tensor([0.0871766936, 0.0204109973, 0.0871766936, 0.0871766936, 0.0871766936],
                     dtype=F64),
        atol=1e-9, rtol=0)
    out, weight = loss_and_weight(strategy, batch)
    # t0: Â > 0, D ≈ 0.0872 > 0.05 and π > ν → dropped
    # t1: Â > 0, D ≈ 0.0204 ≤ 0.05             → kept
    # t2: Â > 0, D ≈ 0.0872 but π < ν (toward the right direction for Â > 0) → kept
    # t3: Â < 0, D ≈ 0.0872 and π < ν          → dropped
    # t4: Â < 0, D ≈ 0.0872 but π > ν          → kept
    assert out.outside[:, 0].tolist() == [True, False, False, True, False]
    torch.testing.assert_close(weight, torch.tensor([0, 1, 1, 0, 1], dtype=F64),
                               atol=1e-12, rtol=0)
    # a tighter δ = 0.02 < 0.020411 drops t1 too
    tight = DivergenceMask(divergence="binary_kl", delta=0.02)
    assert tight(one_token_batch([0.5], [0.6], [1.0])).outside.item()


# Top-K data per token: slot 0 = the sampled token, slot 1 = another token, slot 2 unused (−inf,
# written as probability 0). The rest bucket is 1 − Σ_k p_k.
TOPK_NU = [0.5, 0.3, 0.0]  # ν_rest = 1 − 0.8 = 0.2
TOPK_CASES = {
    # π = [0.6, 0.25], π_rest = 0.15
    #   TV = ½(|0.5−0.6| + |0.3−0.25| + 0 + |0.2−0.15|) = ½(0.1 + 0.05 + 0.05) = 0.1
    #   KL = 0.5 ln(0.5/0.6) + 0.3 ln(0.3/0.25) + 0.2 ln(0.2/0.15)
    #      = −0.091161 + 0.054696 + 0.057536 ≈ 0.021072
    "small_up": ([0.6, 0.25, 0.0], 1.0, 0.1, 0.0210721031, False),
    # π = [0.7, 0.1], π_rest = 0.2
    #   TV = ½(0.2 + 0.2 + 0 + 0) = 0.2;  KL = 0.5 ln(0.5/0.7) + 0.3 ln 3 + 0 ≈ 0.161348
    "large_up_pos_adv": ([0.7, 0.1, 0.0], 1.0, 0.2, 0.1613475683, True),
    # same shift, Â < 0: π > ν is not the harmful direction → kept
    "large_up_neg_adv": ([0.7, 0.1, 0.0], -1.0, 0.2, 0.1613475683, False),
    # π = [0.3, 0.5], π_rest = 0.2
    #   TV = ½(0.2 + 0.2) = 0.2;  KL = 0.5 ln(5/3) + 0.3 ln(3/5) = 0.2 ln(5/3) ≈ 0.102165
    "large_down_neg_adv": ([0.3, 0.5, 0.0], -1.0, 0.2, 0.1021651248, True),
    # π = [0.6, 0.38], π_rest = 0.02: the rest bucket decides
    #   TV = ½(0.1 + 0.08 + |0.2 − 0.02|) = ½(0.36) = 0.18 > 0.15 (without the rest: 0.09)
    #   KL = 0.5 ln(0.5/0.6) + 0.3 ln(0.3/0.38) + 0.2 ln(0.2/0.02)
    #      = −0.091161 − 0.070917 + 0.460517 ≈ 0.298440
    "rest_bucket": ([0.6, 0.38, 0.0], 1.0, 0.18, 0.2984396068, True),
}


@pytest.mark.parametrize("divergence", ["topk_tv", "topk_kl"])
def test_topk_divergences(divergence: str) -> None:
    names = list(TOPK_CASES)
    topk_pi = [TOPK_CASES[n][0] for n in names]
    batch = one_token_batch(
        nu=[TOPK_NU[0]] * len(names),
        pi=[row[0] for row in topk_pi],
        adv=[TOPK_CASES[n][1] for n in names],
        topk_nu=[TOPK_NU] * len(names),
        topk_pi=topk_pi,
    )
    assert batch.topk_logp is not None and batch.topk_logp[0, 0, 2].item() == NEG_INF
    strategy = DivergenceMask(divergence=divergence)  # δ = 0.15 (TV) or 0.05 (KL)
    column = 2 if divergence == "topk_tv" else 3
    expected_div = torch.tensor([TOPK_CASES[n][column] for n in names], dtype=F64)
    divergence_values = strategy.divergence_of(strategy.prepare(batch))[:, 0]
    # top-K divergences are computed in float32
    torch.testing.assert_close(divergence_values, expected_div, atol=1e-6, rtol=0)
    out, weight = loss_and_weight(strategy, batch)
    dropped = [TOPK_CASES[n][4] for n in names]
    # "small_up" is inside both regions (0.1 ≤ 0.15, 0.0211 ≤ 0.05); the rest as marked
    assert out.outside[:, 0].tolist() == dropped
    torch.testing.assert_close(weight, torch.tensor([0.0 if d else 1.0 for d in dropped],
                                                    dtype=F64), atol=1e-12, rtol=0)


def test_topk_reads_only_its_own_k_of_a_larger_record() -> None:
    # A record made for K = 2 (another consumer asked for it): two tracked ids in descending ν,
    # then the sampled id in the last slot. ν = [0.5, 0.3 | 0.1], π = [0.5, 0.1 | 0.2], Â > 0.
    record = {"nu": [0.1], "pi": [0.2], "adv": [1.0],
              "topk_nu": [[0.5, 0.3, 0.1]], "topk_pi": [[0.5, 0.1, 0.2]]}
    # divergence_top_k = 2 reads every slot: ν_rest = 0.1, π_rest = 0.2
    #   TV = ½(0 + 0.2 + 0.1 + 0.1) = 0.2 > 0.15 and π > ν for Â > 0 → dropped
    wide = DivergenceMask(divergence="topk_tv", divergence_top_k=2)
    assert wide.divergence_of(wide.prepare(one_token_batch(**record))).item() \
        == pytest.approx(0.2, abs=1e-6)
    assert wide(one_token_batch(**record)).outside.item()
    # divergence_top_k = 1 reads slot 0 and the sampled slot: ν = [0.5 | 0.1], rest 0.4;
    # π = [0.5 | 0.2], rest 0.3:  TV = ½(0 + 0.1 + 0.1) = 0.1 ≤ 0.15 → kept, as on a record
    # made for K = 1
    narrow = DivergenceMask(divergence="topk_tv", divergence_top_k=1)
    assert narrow.divergence_of(narrow.prepare(one_token_batch(**record))).item() \
        == pytest.approx(0.1, abs=1e-6)
    assert not narrow(one_token_batch(**record)).outside.item()
    own = one_token_batch([0.1], [0.2], [1.0], topk_nu=[[0.5, 0.1]], topk_pi=[[0.5, 0.2]])
    assert narrow.divergence_of(narrow.prepare(own)).item() == pytest.approx(0.1, abs=1e-6)


def test_topk_without_topk_tensors_raises() -> None:
    batch = one_token_batch([0.5], [0.6], [1.0])
    with pytest.raises(ValueError, match="topk_logp"):
        DivergenceMask(divergence="topk_tv")(batch)
    with pytest.raises(ValueError, match="topk_logp"):
        DivergenceMask(divergence="topk_kl")(batch)


@pytest.mark.parametrize("divergence", ["topk_tv", "topk_kl"])
def test_topk_with_old_anchor_raises_at_construction(divergence: str) -> None:
    with pytest.raises(ValueError, match="anchor='behavior'"):
        DivergenceMask(divergence=divergence, anchor="old")


def test_truncation_cap() -> None:
    # ν = 0.001, π = 0.02: r = 20, D = 0.019 ≤ 0.15 → kept, Â = 1
    def run(**kwargs: float) -> tuple[StrategyOutput, Tensor]:
        return loss_and_weight(DivergenceMask(**kwargs), one_token_batch([0.001], [0.02], [1.0]))

    # C = 10: w = min(20, 10)/20 = 0.5; loss = −1·10·ln 0.02 = 39.1202300543
    out, weight = run(importance_weight_cap=10.0)
    assert weight.item() == pytest.approx(0.5, abs=1e-12)
    assert out.token_loss.item() == pytest.approx(39.12023005428146, abs=1e-9)
    # default C is 10 too
    out, weight = run()
    assert weight.item() == pytest.approx(0.5, abs=1e-12)
    # no cap: w = 1; loss = −1·20·ln 0.02 = 78.2404601086
    out, weight = run(importance_weight_cap=math.inf)
    assert weight.item() == pytest.approx(1.0, abs=1e-12)
    assert out.token_loss.item() == pytest.approx(78.24046010856291, abs=1e-9)


def test_default_deltas() -> None:
    assert DivergenceMask().divergence == "binary_tv"
    assert DivergenceMask().delta == 0.15
    assert DivergenceMask(divergence="binary_tv").deltas == (0.15, 0.15)
    assert DivergenceMask(divergence="topk_tv").delta == 0.15
    assert DivergenceMask(divergence="binary_kl").deltas == (0.05, 0.05)
    assert DivergenceMask(divergence="topk_kl").delta == 0.05
    assert DivergenceMask().importance_weight_cap == 10.0
    # behaviour at the default TV width: D = 0.14 kept, D = 0.16 dropped (Â > 0)
    out = DivergenceMask()(one_token_batch([0.5, 0.5], [0.64, 0.66], [1.0, 1.0]))
    assert out.outside[:, 0].tolist() == [False, True]


def test_divergence_metrics() -> None:
    batch = one_token_batch(
        nu=[0.5, 0.5, 0.5, 0.5, 0.9, 0.1],
        pi=[0.7, 0.6, 0.3, 0.4, 0.3, 0.9],
        adv=[1.0, 1.0, -1.0, -1.0, 1.0, -1.0],
        mask=[1, 1, 1, 1, 1, 0],
    )
    out = DivergenceMask()(batch)
    m = {k: float(v) for k, v in out.metrics.items()}
    # |D| on unmasked tokens = [0.2, 0.1, 0.2, 0.1, 0.6] (the masked |D| = 0.8 is ignored)
    assert m[P + "divergence_mean"] == pytest.approx((0.2 + 0.1 + 0.2 + 0.1 + 0.6) / 5, abs=1e-12)
    assert m[P + "divergence_max"] == pytest.approx(0.6, abs=1e-12)
    # dropped: t0 (Â > 0) and t2 (Â < 0); Â > 0 tokens {t0, t1, t4}, Â < 0 tokens {t2, t3}
    assert m[P + "outside_frac"] == pytest.approx(2 / 5)
    assert m[P + "outside_frac_pos_adv"] == pytest.approx(1 / 3)
    assert m[P + "outside_frac_neg_adv"] == pytest.approx(1 / 2)
