"""Prompt batches for RL: an endless, deterministic stream that can resume where it stopped.

Batch ``i`` is always ``task.examples(batch_size, seed=derive_seed(seed, i))``, so a run resumed
from a checkpoint (which records the next batch index) sees exactly the prompts an uninterrupted
run would have seen, whatever the data loader prefetched. Batches hold only the task's training
split: a prompt the task holds out for evaluation (:meth:`Task.validation_examples`) is never
trained on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from trustregion.tasks import Example, Task
from trustregion.validation import integer_at_least

__all__ = ["BatchList", "PromptBatch", "PromptStream", "derive_seed", "in_batches"]

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


class BatchList(Generic[T]):
    """A finite list of batches given to Lightning as one data loader (a plain list would be
    read as a list of data loaders)."""

    def __init__(self, batches: Sequence[T]) -> None:
        self.batches = list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[T]:
        return iter(self.batches)


@dataclass(frozen=True)
class PromptBatch:
    """The ``index``-th batch of prompts of a run."""

    index: int
    examples: list[Example]


class PromptStream:
    """Iterable of :class:`PromptBatch` starting at batch ``start``; endless (set ``max_steps``)."""

    def __init__(self, task: Task, batch_size: int, seed: int = 0, start: int = 0) -> None:
        self.task = task
        self.batch_size = integer_at_least("batch_size", batch_size, 1, note="prompts per batch")
        self.seed = seed
        self.start = start

    def batch(self, index: int) -> PromptBatch:
        return PromptBatch(index, self.task.examples(self.batch_size,
                                                     seed=derive_seed(self.seed, index)))

    def __iter__(self) -> Iterator[PromptBatch]:
        index = self.start
        while True:
            yield self.batch(index)
            index += 1
