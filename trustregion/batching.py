"""How a rollout batch is sized and split into optimiser steps, and how ranks share it."""

from __future__ import annotations

from dataclasses import dataclass

from trustregion.validation import integer_at_least

__all__ = ["BatchSettings", "multiples_near"]


def multiples_near(value: int, factor: int) -> str:
    """The multiples of ``factor`` on either side of ``value``, for error messages.

    >>> multiples_near(6, 4), multiples_near(3, 4)
    ('4 or 8', '4')
    """
    below = value // factor * factor
    return f"{below} or {below + factor}" if below else str(factor)


@dataclass(frozen=True)
class BatchSettings:
    """The sizes of one RL iteration. All counts are global: with several processes each rank
    samples ``prompts_per_step / world_size`` prompts (whole groups) and takes
    ``mini_batch_size / world_size`` sequences into each optimiser step.

    Args:
        group_size: completions per prompt (≥ 2: every advantage estimator compares the
            completions of a group).
        prompts_per_step: prompts per RL iteration.
        ppo_epochs: passes over each rollout batch.
        mini_batch_size: sequences per optimiser step.
        micro_batch_size: sequences per forward/backward on one process (gradient accumulation);
            None: the whole per-process mini-batch.
    """

    group_size: int = 8
    prompts_per_step: int = 8
    ppo_epochs: int = 1
    mini_batch_size: int = 64
    micro_batch_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("group_size", "prompts_per_step", "ppo_epochs", "mini_batch_size"):
            integer_at_least(name, getattr(self, name), 1)
        if self.micro_batch_size is not None:
            integer_at_least("micro_batch_size", self.micro_batch_size, 1,
                             note="None: the whole per-process mini-batch")
        if self.group_size < 2:
            raise ValueError(f"group_size must be ≥ 2: the advantage estimators compare the "
                             f"completions within a group; got {self.group_size}")

    @property
    def sequences(self) -> int:
        """Sequences per rollout batch: group_size · prompts_per_step."""
        return self.group_size * self.prompts_per_step

    @property
    def optimizer_steps_per_rollout(self) -> int:
        """ppo_epochs × ⌈sequences / mini_batch_size⌉."""
        return self.ppo_epochs * -(-self.sequences // self.mini_batch_size)

    def check_world_size(self, world_size: int) -> None:
        """Refuse sizes that ranks cannot share evenly (whole prompts, equal mini-batches).

        >>> BatchSettings(prompts_per_step=6).check_world_size(4)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: batching.prompts_per_step=6 must be a multiple of the number of processes, 4 \
(trainer.devices × trainer.num_nodes), for example 4 or 8: ...
        """
        if world_size <= 1:
            return
        for name in ("prompts_per_step", "mini_batch_size"):
            value = getattr(self, name)
            if value % world_size:
                raise ValueError(
                    f"batching.{name}={value} must be a multiple of the number of processes, "
                    f"{world_size} (trainer.devices × trainer.num_nodes), for example "
                    f"{multiples_near(value, world_size)}: each rank samples whole prompt "
                    "groups and takes an equal share of every optimiser step")

    def per_rank(self, world_size: int) -> tuple[int, int, int]:
        """(prompts, mini-batch sequences, micro-batch sequences) of one rank."""
        self.check_world_size(world_size)
        prompts = self.prompts_per_step // world_size
        mini = self.mini_batch_size // world_size
        micro = min(self.micro_batch_size or mini, mini)
        return prompts, mini, micro
