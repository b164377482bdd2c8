"""Prompt batches for RL: an endless, deterministic stream that can resume where it stopped.

Batch ``i`` is always ``task.examples(batch_size, seed=derive_seed(seed, i))``, so a run resumed
from a checkpoint (which records the next batch index) sees exactly the prompts an uninterrupted
run would have seen, whatever the data loader prefetched. Batches hold only the task's training
split: a prompt the task holds out for evaluation (:meth:`Task.validation_examples`) is never
trained on.

With several processes each one iterates its own stream (``rank``, ``world_size``) and gets only
its share of every batch: a contiguous slice of whole prompts, so a prompt's completions (its
group) are all sampled on one process. The shares of the ranks, in rank order, are exactly the
batch a single process would see, so no prompt is drawn twice and none is skipped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

from trustregion.batching import multiples_near
from trustregion.tasks import Example, Task
from trustregion.validation import integer_at_least, require

__all__ = ["BatchList", "IndexedBatch", "PromptBatch", "PromptStream", "derive_seed", "in_batches"]

T = TypeVar("T")


def derive_seed(seed: int, index: int) -> int:
    """A distinct, reproducible seed for item ``index`` of a run seeded with ``seed``."""
    return (seed * 1_000_003 + index * 7_919 + 12_345) % (2**31 - 1)


def in_batches(items: Sequence[T], batch_size: int) -> list[list[T]]:
    """``items`` in consecutive batches of ``batch_size`` (the last may be smaller).

    >>> in_batches([1, 2, 3, 4, 5], 2)
    [[1, 2], [3, 4], [5]]
    """
    integer_at_least("batch_size", batch_size, 1)
    return [list(items[start:start + batch_size]) for start in range(0, len(items), batch_size)]


class IndexedBatch(Generic[T]):
    """The ``index``-th batch of a data loader: an index and a list of ``items``.

    A plain class on purpose, not a dataclass: Lightning's ``bf16-true`` and ``16-true``
    precisions cast a batch by rebuilding every dataclass and sequence in it, which the frozen
    examples inside would refuse; a plain object passes through untouched.
    """

    def __init__(self, index: int, items: Sequence[T]) -> None:
        self.index = index
        self.items = list(items)

    def __eq__(self, other: object) -> bool:
        return (type(other) is type(self) and isinstance(other, IndexedBatch)
                and (self.index, self.items) == (other.index, other.items))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.index}, {self.items!r})"


class BatchList(Generic[T]):
    """A finite list of batches given to Lightning as one data loader (a plain list would be
    read as a list of data loaders)."""

    def __init__(self, batches: Sequence[T]) -> None:
        self.batches = list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[T]:
        return iter(self.batches)


class PromptBatch(IndexedBatch[Example]):
    """The ``index``-th batch of prompts of a run (on one of several processes: that process's
    share of it)."""

    @property
    def examples(self) -> list[Example]:
        return self.items


class PromptStream:
    """Iterable of :class:`PromptBatch` starting at batch ``start``; endless (set ``max_steps``).

    Args:
        task: draws the prompts.
        batch_size: prompts per batch over all processes (``prompts_per_step``).
        seed: the run's seed; batch ``i`` is drawn with ``derive_seed(seed, i)``.
        start: index of the first batch (a resumed run's next batch).
        rank: this process's index among ``world_size`` processes.
        world_size: processes sharing every batch; ``batch_size`` must be a multiple of it.

    >>> from trustregion.tasks import Arithmetic
    >>> whole = PromptStream(Arithmetic(), 4, seed=1).batch(0).examples
    >>> shares = [PromptStream(Arithmetic(), 4, seed=1, rank=r, world_size=2).batch(0).examples
    ...           for r in (0, 1)]
    >>> shares[0] + shares[1] == whole
    True
    """

    def __init__(self, task: Task, batch_size: int, seed: int = 0, start: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        self.task = task
        self.batch_size = integer_at_least("batch_size", batch_size, 1, note="prompts per batch")
        self.seed = seed
        self.start = integer_at_least("start", start, 0, note="index of the first batch")
        self.world_size = integer_at_least("world_size", world_size, 1,
                                           note="processes sharing each batch")
        require(isinstance(rank, int) and not isinstance(rank, bool)
                and 0 <= rank < world_size,
                f"rank must be an integer in [0, {world_size - 1}] for world_size={world_size}; "
                f"got {rank!r}")
        require(batch_size % world_size == 0,
                f"batch_size={batch_size} (prompts per batch) must be a multiple of "
                f"world_size={world_size}, so that every process gets the same number of whole "
                f"prompts; for example {multiples_near(batch_size, world_size)}")
        self.rank = rank
        self.share = batch_size // world_size  # prompts of each batch this process gets

    def global_batch(self, index: int) -> list[Example]:
        """Every prompt of batch ``index``, over all processes."""
        return self.task.examples(self.batch_size, seed=derive_seed(self.seed, index))

    def batch(self, index: int) -> PromptBatch:
        """This process's share of batch ``index``."""
        first = self.rank * self.share
        return PromptBatch(index, self.global_batch(index)[first:first + self.share])

    def __iter__(self) -> Iterator[PromptBatch]:
        index = self.start
        while True:
            yield self.batch(index)
            index += 1

