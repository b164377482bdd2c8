"""A Lightning logger for tests that keeps every row it is given and, at the end, saves them
per rank (``rows{rank}.pt``), so tests of several processes can compare what each logged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import Logger


class RowLogger(Logger):
    """Saves every row it is given, per rank."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = directory
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "rows"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((int(step or 0), dict(metrics)))

    def finalize(self, status: str) -> None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        torch.save(self.rows, self.directory / f"rows{rank}.pt")
