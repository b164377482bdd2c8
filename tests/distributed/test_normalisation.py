"""Global normalisation: two ranks × half the batch give the gradient of one rank × the whole
batch, for every aggregation mode.

Two real processes (``torch.multiprocessing.spawn``, gloo) run the update's loss path: the
step's counts from :func:`step_counts` summed across ranks, :func:`aggregate` of each
micro-batch with them, backward of ``loss × world_size``, then the gradient averaged over ranks
as DDP does. The ranks hold different numbers of tokens and of non-empty sequences, in masks of
different widths, so a mean of per-rank means gives another gradient: the test checks that it
does, so that the equality it asserts is not a coincidence of the data.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import get_args

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from trustregion.functional.aggregation import AggregationMode, aggregate, step_counts
from trustregion.functional.logprobs import token_logprobs
from trustregion.strategies import DRPO, TokenBatch

MODES: tuple[AggregationMode, ...] = get_args(AggregationMode)
WORLD = 2
HORIZON = 6  # the fixed horizon of seq-mean-token-sum-norm (max_new_tokens)
MICRO = 2  # sequences per micro-batch on each rank
FEATURES, VOCAB = 4, 7
# Completion lengths; rank 0 takes the first four sequences, rank 1 the last four.
#   rank 0: 6 + 1 + 3 + 5 = 15 tokens in 4 non-empty sequences, mask width 6
#   rank 1: 2 + 0 + 4 + 3 =  9 tokens in 3 non-empty sequences, mask width 4
LENGTHS = (6, 1, 3, 5, 2, 0, 4, 3)


@dataclass(frozen=True)
class Sequences:
    """Per-token inputs of some sequences: features the logits are linear in, sampled ids,
    behaviour log-probs, one advantage per sequence and the completion mask."""

    features: Tensor
    ids: Tensor
    behavior_logp: Tensor
    advantages: Tensor
    mask: Tensor

    def rows(self, start: int, stop: int) -> Sequences:
        """Sequences ``start:stop``, cut to the width of their longest completion (as each
        rank's rollout is padded only to its own longest completion)."""
        width = int(self.mask[start:stop].sum(-1).max())
        return Sequences(self.features[start:stop, :width], self.ids[start:stop, :width],
                         self.behavior_logp[start:stop, :width], self.advantages[start:stop],
                         self.mask[start:stop, :width])


def _problem() -> tuple[Sequences, Tensor]:
    """The whole batch and the initial weights, the same in every process."""
    gen = torch.Generator().manual_seed(0)
    n, width = len(LENGTHS), max(LENGTHS)
    features = torch.randn(n, width, FEATURES, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (n, width), generator=gen)
    behavior_logp = -torch.rand(n, width, generator=gen, dtype=torch.float64) * 3
    advantages = torch.randn(n, generator=gen, dtype=torch.float64)
    mask = (torch.arange(width) < torch.tensor(LENGTHS)[:, None]).long()
    weights = torch.randn(FEATURES, VOCAB, generator=gen, dtype=torch.float64)
    return Sequences(features, ids, behavior_logp, advantages, mask), weights


def _token_loss(weights: Tensor, part: Sequences) -> Tensor:
    """The default strategy's per-token loss of a linear policy over ``part``."""
    logp = token_logprobs(part.features @ weights, part.ids)
    batch = TokenBatch(logp=logp, behavior_logp=part.behavior_logp,
                       advantages=part.advantages, mask=part.mask)
    return DRPO()(batch).token_loss


def _all_reduce_sum(tensor: Tensor, op: str) -> Tensor:
    """The cross-rank reduction the module gets from its trainer's strategy (sum only)."""
    assert op == "sum"
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _rank_gradient(mode: AggregationMode, local: Sequences, weights: Tensor, *,
                   global_counts: bool) -> Tensor:
    """One optimiser step's gradient on this rank, averaged over ranks as DDP does. With
    ``global_counts`` the update's way (counts summed across ranks, loss × world size);
    without, each rank normalises by its own counts: a mean of rank means."""
    parameter = weights.clone().requires_grad_()
    micro_batches = [local.rows(i, i + MICRO) for i in range(0, len(local.advantages), MICRO)]
    masks = [micro.mask for micro in micro_batches]
    counts = step_counts(masks, reduce=_all_reduce_sum if global_counts else None)
    scale = WORLD if global_counts else 1
    for micro in micro_batches:
        loss = aggregate(_token_loss(parameter, micro), micro.mask, mode, counts=counts,
                         horizon=HORIZON)
        (loss * scale).backward()
    assert parameter.grad is not None
    grad = parameter.grad.clone()
    dist.all_reduce(grad, op=dist.ReduceOp.SUM)
    return grad / WORLD


def _worker(rank: int, port: int, directory: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        whole, weights = _problem()
        share = len(LENGTHS) // WORLD
        local = whole.rows(rank * share, (rank + 1) * share)
        gradients = {mode: {"global": _rank_gradient(mode, local, weights, global_counts=True),
                            "naive": _rank_gradient(mode, local, weights, global_counts=False)}
                     for mode in MODES}
        torch.save({"width": local.mask.shape[1], "gradients": gradients},
                   Path(directory) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Both ranks' gradients for every mode, from one spawn of two processes."""
    directory = tmp_path_factory.mktemp("normalisation")
    mp.spawn(_worker, args=(_free_port(), str(directory)), nprocs=WORLD, join=True)
    return [torch.load(directory / f"rank{rank}.pt") for rank in range(WORLD)]


def _single_process_gradient(mode: AggregationMode) -> Tensor:
    whole, weights = _problem()
    parameter = weights.clone().requires_grad_()
    aggregate(_token_loss(parameter, whole), whole.mask, mode, horizon=HORIZON).backward()
    assert parameter.grad is not None
    return parameter.grad


def test_the_ranks_hold_masks_of_different_widths_and_counts(rank_results) -> None:
    assert [r["width"] for r in rank_results] == [6, 4]
    whole, _ = _problem()
    assert whole.mask[:4].sum() == 15 and whole.mask[4:].sum() == 9
    assert [int(whole.mask[s:s + 4].any(-1).sum()) for s in (0, 4)] == [4, 3]


@pytest.mark.parametrize("mode", MODES)
def test_two_ranks_give_the_gradient_of_one_rank_on_the_whole_batch(rank_results, mode) -> None:
    expected = _single_process_gradient(mode)
    assert expected.abs().max() > 1e-3  # a real gradient, not zeros
    first, second = (r["gradients"][mode]["global"] for r in rank_results)
    assert torch.equal(first, second)  # every rank steps with the same gradient
    torch.testing.assert_close(first, expected, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("mode", MODES)
def test_a_mean_of_rank_means_would_give_another_gradient(rank_results, mode) -> None:
    expected = _single_process_gradient(mode)
    naive = rank_results[0]["gradients"][mode]["naive"]
    relative = (naive - expected).norm() / expected.norm()
    assert relative > 1e-2, f"the data cannot tell global counts from per-rank ones ({mode})"


def test_step_counts_sum_the_counts_of_every_rank_through_reduce() -> None:
    # One rank's masks: 3 + 1 tokens in 2 non-empty sequences (the all-zero row does not
    # count). A second, identical rank makes the global counts 8 tokens in 4 sequences.
    masks = [torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]), torch.zeros(1, 4)]
    ops: list[str] = []

    def two_identical_ranks(tensor: Tensor, op: str) -> Tensor:
        ops.append(op)
        return tensor * 2

    counts = step_counts(masks, reduce=two_identical_ranks)
    assert ops == ["sum"]  # one collective for both counts
    assert (float(counts.tokens), float(counts.sequences)) == (8.0, 4.0)
    local = step_counts(masks)
    assert (float(local.tokens), float(local.sequences)) == (4.0, 2.0)
