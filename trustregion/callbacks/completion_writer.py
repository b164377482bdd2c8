"""Write the completions of ``trainer.predict`` to a JSONL file (``trustregion predict``)."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from trustregion.prediction import Completion

__all__ = ["CompletionWriter"]


class CompletionWriter(BasePredictionWriter):
    """Write each :class:`~trustregion.prediction.Completion` that ``predict_step`` returns as
    one JSON line (UTF-8, non-ASCII characters kept as they are) to ``output``.

    The lines go to a temporary file beside ``output`` batch by batch; when prediction ends it
    replaces ``output`` in one step, so ``output`` never holds a partial result. If prediction
    fails, the temporary file is removed and ``output`` is left as it was. Only the process of
    global rank zero writes.

    Args:
        output: the JSONL file to write; its directory must exist.
    """

    def __init__(self, output: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output).expanduser()
        if self.output.is_dir():
            raise ValueError(f"the output {self.output} is a directory; give a file path "
                             "such as completions.jsonl")
        if not self.output.parent.is_dir():
            raise ValueError(f"the output's directory {self.output.parent} does not exist; "
                             "create it first")
        self.written = 0
        """Completions written by the last prediction."""
        self._file: IO[str] | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every Completion carries its prompt's line number; the batch indices Lightning would
        # report to a prediction writer (from a sampler, which prompt batches lack) are unused.
        warnings.filterwarnings("ignore", message=r"Couldn't infer the batch indices fetched "
                                                  r"from your dataloader: `PredictionBatches`")
        self.written = 0
        if trainer.is_global_zero:
            self._file = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed by on_predict_end)
                "w", encoding="utf-8", dir=self.output.parent, prefix=f".{self.output.name}.",
                suffix=".tmp", delete=False)

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           prediction: Any, batch_indices: Sequence[int] | None, batch: Any,
                           batch_idx: int, dataloader_idx: int) -> None:
        if self._file is None:
            return
        for completion in prediction:
            if not isinstance(completion, Completion):
                raise TypeError(f"predict_step must return a list of Completion; got "
                                f"{type(completion).__name__}")
            self._file.write(json.dumps(completion.record(), ensure_ascii=False) + "\n")
            self.written += 1

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._file.name, self.output)
        self._file = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        if self._file is not None:
            self._file.close()
            Path(self._file.name).unlink(missing_ok=True)
            self._file = None
