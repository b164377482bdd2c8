"""One prompt of a task and the answer that earns full reward."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Example"]


@dataclass(frozen=True)
class Example:
    """One prompt and the answer that earns full reward.

    ``meta`` holds whatever else a reward function may need (operands, test cases, ...); it takes
    no part in hashing.
    """

    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict, hash=False)
