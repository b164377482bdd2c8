from __future__ import annotations

import pytest
import torch

from trustregion.functional import AGGREGATION_MODES, aggregate, step_counts

# Two sequences: lengths 3 and 1 (mask), losses chosen for easy arithmetic.
LOSS = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", (1 + 2 + 3 + 4) / 4),  # 10 / 4 tokens = 2.5
        ("seq-mean-token-mean", ((1 + 2 + 3) / 3 + 4 / 1) / 2),  # (2 + 4) / 2 = 3
        ("seq-mean-token-sum", ((1 + 2 + 3) + 4) / 2),  # (6 + 4) / 2 = 5
        ("seq-mean-token-sum-norm", ((1 + 2 + 3) + 4) / 2 / 8),  # 5 / horizon 8 = 0.625
    ],
)
def test_modes_by_hand(mode: str, expected: float) -> None:
    assert aggregate(LOSS, MASK, mode, horizon=8).item() == pytest.approx(expected)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_micro_batches_with_global_counts_sum_to_the_full_loss(mode: str) -> None:
    gen = torch.Generator().manual_seed(0)
    loss = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    mask = torch.rand(5, 6, generator=gen) > 0.3
    full = aggregate(loss, mask, mode, horizon=6)
    parts = [(0, 1), (1, 4), (4, 5)]
    counts = step_counts([mask[a:b] for a, b in parts])
    split = sum(aggregate(loss[a:b], mask[a:b], mode, counts=counts, horizon=6) for a, b in parts)
    assert float(split) == pytest.approx(float(full), abs=1e-12)


def test_micro_batch_padding_does_not_change_sum_norm() -> None:
    # The horizon is fixed: padding one micro-batch to a longer length changes nothing.
    loss = torch.tensor([[1.0, 2.0]])
    padded = torch.tensor([[1.0, 2.0, 0.0, 0.0]])
    a = aggregate(loss, torch.ones(1, 2), "seq-mean-token-sum-norm", horizon=10)
    b = aggregate(padded, torch.tensor([[1, 1, 0, 0]]), "seq-mean-token-sum-norm", horizon=10)
    assert a.item() == b.item() == pytest.approx(0.3)  # (1 + 2) / 1 seq / 10


def test_step_counts() -> None:
    counts = step_counts([MASK, torch.zeros(1, 4)])
    assert float(counts.tokens) == 4.0
    assert float(counts.sequences) == 2.0  # the empty sequence does not count


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_all_zero_mask_gives_exactly_zero(mode: str) -> None:
    loss = torch.full((2, 3), float("nan"))
    assert aggregate(loss, torch.zeros(2, 3), mode, horizon=3).item() == 0.0


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="unknown aggregation mode 'mean'; allowed"):
        aggregate(LOSS, MASK, "mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a fixed positive horizon"):
        aggregate(LOSS, MASK, "seq-mean-token-sum-norm")
