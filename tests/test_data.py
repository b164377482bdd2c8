"""The prompt stream: partitioned across processes, resumable, the same batches on one process."""

from __future__ import annotations

import itertools

import pytest

from trustregion.batching import BatchSettings
from trustregion.data import PromptStream, derive_seed
from trustregion.tasks import Arithmetic


def _take(stream: PromptStream, count: int) -> list[tuple[int, list[str]]]:
    return [(b.index, [e.prompt for e in b.examples]) for b in itertools.islice(stream, count)]


def test_one_process_gets_the_whole_batch_drawn_with_the_batch_seed() -> None:
    task = Arithmetic()
    batches = _take(PromptStream(task, 6, seed=3), 3)
    assert [index for index, _ in batches] == [0, 1, 2]
    for index, prompts in batches:
        assert prompts == [e.prompt for e in task.examples(6, seed=derive_seed(3, index))]


@pytest.mark.parametrize("world_size", [2, 3])
def test_the_ranks_shares_in_rank_order_are_the_single_process_batch(world_size: int) -> None:
    task = Arithmetic()
    single = _take(PromptStream(task, 6, seed=5), 4)
    shares = [_take(PromptStream(task, 6, seed=5, rank=rank, world_size=world_size), 4)
              for rank in range(world_size)]
    for batch, (index, prompts) in enumerate(single):
        parts = [share[batch] for share in shares]
        assert all(part_index == index for part_index, _ in parts)
        # 6 prompts / world_size ranks: 3 each on 2 ranks, 2 each on 3; contiguous, in order,
        # so every prompt of the batch goes to exactly one rank (none twice, none left out)
        assert [len(part) for _, part in parts] == [6 // world_size] * world_size
        assert [p for _, part in parts for p in part] == prompts


def test_a_resumed_stream_continues_each_ranks_share() -> None:
    task = Arithmetic()
    for rank in (0, 1):
        whole = _take(PromptStream(task, 4, seed=1, rank=rank, world_size=2), 5)
        resumed = _take(PromptStream(task, 4, seed=1, start=3, rank=rank, world_size=2), 2)
        assert resumed == whole[3:]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"batch_size": 6, "world_size": 4},
     "batch_size=6 (prompts per batch) must be a multiple of world_size=4, so that every "
     "process gets the same number of whole prompts; for example 4 or 8"),
    ({"batch_size": 4, "world_size": 2, "rank": 2},
     "rank must be an integer in [0, 1] for world_size=2; got 2"),
    ({"batch_size": 4, "world_size": 0}, "world_size must be an integer ≥ 1"),
    ({"batch_size": 4, "start": -1}, "start must be an integer ≥ 0"),
])
def test_bad_partitions_are_refused(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError) as error:
        PromptStream(Arithmetic(), **kwargs)
    assert message in str(error.value)


def test_a_batch_size_the_processes_cannot_share_is_refused_with_the_settings_to_change() -> None:
    settings = BatchSettings(group_size=2, prompts_per_step=6, mini_batch_size=8)
    settings.check_world_size(2)  # 6 prompts, 8 sequences per step: 3 and 4 per rank
    with pytest.raises(ValueError) as error:
        settings.check_world_size(4)
    assert str(error.value) == (
        "batching.prompts_per_step=6 must be a multiple of the number of processes, 4 "
        "(trainer.devices × trainer.num_nodes), for example 4 or 8: each rank samples whole "
        "prompt groups and takes an equal share of every optimiser step")
    with pytest.raises(ValueError, match=r"^batching\.mini_batch_size=8 must be a multiple of "
                                         r"the number of processes, 3 .* for example 6 or 9:"):
        BatchSettings(group_size=2, prompts_per_step=6, mini_batch_size=8).check_world_size(3)
