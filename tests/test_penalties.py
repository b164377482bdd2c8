from __future__ import annotations

import math

import pytest
import torch

from trustregion import EntropyBonus, ReferenceKL, TokenBatch


def _batch(**extra: torch.Tensor) -> TokenBatch:
    logp = torch.tensor([[math.log(0.5), math.log(0.2)]], dtype=torch.float64,
                        requires_grad=True)
    return TokenBatch(logp=logp, behavior_logp=logp.detach(), advantages=torch.ones(1),
                      mask=torch.tensor([[1, 0]]), **extra)


def test_k3_penalty_value_and_gradient() -> None:
    batch = _batch(ref_logp=torch.tensor([[math.log(0.25), 0.0]], dtype=torch.float64))
    out = ReferenceKL(beta=0.1, estimator="k3")(batch)
    # x = ln(0.25/0.5) = −ln 2; k3 = 0.5 + ln 2 − 1 = 0.193147; loss = 0.1 · k3
    assert out.token_loss[0].tolist() == pytest.approx([0.1 * (0.5 + math.log(2) - 1), 0.0])
    assert out.metrics["penalty/ref_kl"].item() == pytest.approx(0.5 + math.log(2) - 1)
    out.token_loss.sum().backward()
    # ∂k3/∂log π = 1 − π_ref/π = 1 − 0.5 = 0.5, times β = 0.05; masked token gets 0
    assert batch.logp.grad is not None
    assert batch.logp.grad[0].tolist() == pytest.approx([0.05, 0.0])


def test_entropy_bonus_value_and_gradient() -> None:
    entropy = torch.tensor([[1.5, 9.0]], requires_grad=True)
    out = EntropyBonus(coef=0.01)(_batch(entropy=entropy))
    assert out.token_loss[0].tolist() == pytest.approx([-0.015, 0.0])
    assert out.metrics["penalty/entropy"].item() == pytest.approx(1.5)
    out.token_loss.sum().backward()
    assert entropy.grad is not None and entropy.grad[0].tolist() == pytest.approx([-0.01, 0.0])


def test_missing_inputs_and_bad_settings() -> None:
    with pytest.raises(ValueError, match=r"ReferenceKL needs TokenBatch\.ref_logp"):
        ReferenceKL()(_batch())
    with pytest.raises(ValueError, match=r"EntropyBonus needs TokenBatch\.entropy"):
        EntropyBonus()(_batch())
    with pytest.raises(ValueError, match="ReferenceKL beta must be a finite number ≥ 0"):
        ReferenceKL(beta=-1)
    with pytest.raises(ValueError, match="EntropyBonus coef must be a finite number ≥ 0"):
        EntropyBonus(coef=math.nan)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        ReferenceKL(estimator="k5")  # type: ignore[arg-type]
