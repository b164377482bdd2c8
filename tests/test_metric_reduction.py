from __future__ import annotations

import pytest
import torch

from trustregion.metric_reduction import MetricAccumulator
from trustregion.strategies import DRPO, TokenBatch


def test_rules_by_hand() -> None:
    acc = MetricAccumulator()
    # micro-batch 1: 3 tokens (2 with Â > 0, 1 with Â < 0); micro-batch 2: 1 token (Â < 0)
    acc.add({"x/frac": torch.tensor(1 / 3), "x/w_min": torch.tensor(-0.5),
             "x/w_max": torch.tensor(2.0), "x/frac_pos_adv": torch.tensor(0.5),
             "x/frac_neg_adv": torch.tensor(0.0)},
            mask=torch.tensor([[1, 1, 1]]), advantages=torch.tensor([[1.0, 1.0, -1.0]]))
    acc.add({"x/frac": torch.tensor(1.0), "x/w_min": torch.tensor(0.2),
             "x/w_max": torch.tensor(3.0), "x/frac_pos_adv": torch.tensor(0.0),
             "x/frac_neg_adv": torch.tensor(1.0)},
            mask=torch.tensor([[1, 0]]), advantages=torch.tensor([[-2.0, -2.0]]))
    out = acc.compute()
    assert out["x/frac"].item() == pytest.approx((1 / 3 * 3 + 1.0 * 1) / 4)  # 2 of 4 tokens
    assert out["x/w_min"].item() == -0.5 and out["x/w_max"].item() == 3.0
    assert out["x/frac_pos_adv"].item() == pytest.approx(0.5)  # 1 of the 2 Â > 0 tokens
    assert out["x/frac_neg_adv"].item() == pytest.approx(0.5)  # 1 of the 2 Â < 0 tokens


def test_micro_batch_metrics_combine_to_the_full_batch_metrics() -> None:
    gen = torch.Generator().manual_seed(0)
    nu = torch.rand(6, 5, generator=gen) * 0.8 + 0.1
    pi = (nu + (torch.rand(6, 5, generator=gen) - 0.5) * 0.6).clamp(0.01, 0.99)
    adv = torch.randn(6, generator=gen)
    mask = torch.rand(6, 5, generator=gen) > 0.3
    strategy = DRPO()

    def batch(rows: slice) -> TokenBatch:
        return TokenBatch(logp=pi[rows].log(), behavior_logp=nu[rows].log(),
                          advantages=adv[rows], mask=mask[rows])

    full = strategy(batch(slice(0, 6))).metrics
    acc = MetricAccumulator()
    for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):
        part = batch(rows)
        acc.add(strategy(part).metrics, part.mask, part.token_advantages())
    combined = acc.compute()
    assert combined.keys() == full.keys()
    for key, value in full.items():
        assert combined[key].item() == pytest.approx(value.item(), abs=1e-6), key
