"""One row of values per rollout batch: the module's and every callback's values share it, and it
is written through the loggers' public ``log_metrics`` at the rollout batch's index."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from conftest import DigitRichArithmetic
from lightning.pytorch.loggers import CSVLogger

from trustregion.batching import BatchSettings
from trustregion.callbacks import CollapseGuard, DriftMonitor, TrustRegionController
from trustregion.module import TrustRegionModule
from trustregion.rollout import SamplingSettings
from trustregion.step_log import StepLog, is_final_batch, log_every_n_steps


def test_one_row_per_logged_rollout_batch_with_every_callbacks_keys(random_model_dir: Path,
                                                                     tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = TrustRegionModule(policy=f"config:{random_model_dir}", task=DigitRichArithmetic(),
                               batching=BatchSettings(group_size=2, prompts_per_step=2,
                                                      mini_batch_size=4),
                               sampling=SamplingSettings(max_new_tokens=3))
    callbacks = [DriftMonitor(), CollapseGuard(max_kl=100.0, action="warn"),
                 TrustRegionController("outside_frac", target_value=0.1)]
    trainer = L.Trainer(max_steps=3, log_every_n_steps=2, logger=CSVLogger(tmp_path),
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module)  # 3 rollout batches of 1 optimiser step each
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    # log_every_n_steps=2: a row after batches 0-1 (step 1), and one for the last batch (step 2)
    assert [row["step"] for row in rows] == ["1", "2"]
    for row in rows:
        keys = {key for key, value in row.items() if value}
        assert {"reward/mean", "train/loss", "drift/behavior/kl_k3", "region/outside_frac",
                "guard/fired", "guard/kl", "controller/scale", "controller/delta",
                "epoch"} <= keys
    # The guard's KL is the k3 mean of its own rollout batch; the drift KL covers the logging
    # window: batches 0 and 1 at step 1, the last batch alone at step 2, where the two agree.
    assert float(rows[1]["drift/behavior/kl_k3"]) == pytest.approx(float(rows[1]["guard/kl"]),
                                                                   rel=1e-5, abs=1e-9)
    assert float(rows[0]["guard/fired"]) == 0.0
    assert module.step_log.step == 2  # the last rollout batch's index


# ------------------------------------------------------------------ StepLog on its own
class _Logger:
    """Records every ``log_metrics`` call and counts ``save`` calls."""

    def __init__(self) -> None:
        self.rows: list[tuple[dict[str, float], int]] = []
        self.saved = 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.rows.append((dict(metrics), step))

    def save(self) -> None:
        self.saved += 1


def _trainer(log_every_n_steps: int = 1, num_training_batches: int = 100,
             progress_bar: Any = None) -> SimpleNamespace:
    """What a StepLog reads of a trainer."""
    return SimpleNamespace(log_every_n_steps=log_every_n_steps,
                           num_training_batches=num_training_batches, max_steps=-1,
                           global_step=0, should_stop=False, current_epoch=3,
                           callback_metrics={}, loggers=[_Logger(), _Logger()],
                           progress_bar_callback=progress_bar)


class _Module:
    """Records what goes through ``LightningModule.log``."""

    def __init__(self) -> None:
        self.logged: list[tuple[str, Any, dict[str, Any]]] = []

    def log(self, name: str, value: Any, **kwargs: Any) -> None:
        self.logged.append((name, value, kwargs))


def test_values_reach_callback_metrics_at_once_and_every_logger_at_finish() -> None:
    trainer, log = _trainer(), StepLog()
    log.start(trainer, 7)  # type: ignore[arg-type]
    log.add({"a/x": torch.tensor(1.5), "a/y": 2})
    assert float(trainer.callback_metrics["a/x"]) == 1.5
    assert float(trainer.callback_metrics["a/y"]) == 2.0  # plain numbers become tensors too
    log.add({"a/x": torch.tensor([[4.0]])})  # a later value of the same key replaces it
    log.add({"b/z": 9.0}, write=False)  # callback_metrics only
    assert float(trainer.callback_metrics["b/z"]) == 9.0
    assert log.row == {"a/x": torch.tensor(4.0), "a/y": 2.0}
    assert all(logger.rows == [] for logger in trainer.loggers)  # nothing before finish
    log.finish()
    for logger in trainer.loggers:
        # one row at the rollout batch's index, with the epoch
        assert logger.rows == [({"a/x": 4.0, "a/y": 2.0, "epoch": 3.0}, 7)]
        assert logger.saved == 1
    log.finish()  # a finished row is not written twice
    assert len(trainer.loggers[0].rows) == 1


def test_a_row_still_open_is_written_when_the_next_one_starts() -> None:
    trainer, log = _trainer(), StepLog()
    log.start(trainer, 0)  # type: ignore[arg-type]
    log.add({"a": 1.0})
    log.start(trainer, 1)  # type: ignore[arg-type]
    log.add({"a": 2.0})
    log.finish()
    assert [(row["a"], step) for row, step in trainer.loggers[0].rows] == [(1.0, 0), (2.0, 1)]


def test_progress_bar_values_are_shown_not_written() -> None:
    module, log = _Module(), StepLog()
    heard: list[dict[str, float]] = []
    log.on_finish(heard.append)
    log.on_finish(heard.append)  # a listener is registered once
    trainer = _trainer()
    log.start(trainer, 0)  # type: ignore[arg-type]
    log.show({"reward": torch.tensor(0.25)})
    assert float(trainer.callback_metrics["reward"]) == 0.25
    assert log.progress_bar_metrics == {}  # published when the rollout batch finishes
    log.finish(module)  # type: ignore[arg-type]
    assert log.progress_bar_metrics == {"reward": 0.25}
    assert heard == [{"reward": 0.25}]
    assert trainer.loggers[0].rows == []  # no value was added for the loggers
    # any other progress bar gets the values through LightningModule.log, never the loggers
    ((name, value, kwargs),) = module.logged
    assert (name, value) == ("reward", 0.25)
    assert kwargs["prog_bar"] is True and kwargs["logger"] is False


def test_a_bar_that_reads_the_step_log_gets_nothing_through_log() -> None:
    module, log = _Module(), StepLog()
    log.start(_trainer(progress_bar=SimpleNamespace(reads_step_log=True)), 0)  # type: ignore[arg-type]
    log.show({"loss": 1.0})
    log.finish(module)  # type: ignore[arg-type]
    assert module.logged == [] and log.progress_bar_metrics == {"loss": 1.0}


def test_nothing_is_written_when_logging_is_off() -> None:
    trainer, log = _trainer(log_every_n_steps=0), StepLog()
    log.start(trainer, 0)  # type: ignore[arg-type]
    assert not log.logging_batch(0)
    log.add({"a": 1.0})
    assert float(trainer.callback_metrics["a"]) == 1.0  # still monitorable
    log.finish()
    assert trainer.loggers[0].rows == []


def test_logging_batches_are_every_nth_and_the_last() -> None:
    # log_every_n_steps=3 over 8 batches: indices 2 and 5, then 7, the last one
    trainer, log = _trainer(log_every_n_steps=3, num_training_batches=8), StepLog()
    logged = []
    for index in range(8):
        log.start(trainer, index)  # type: ignore[arg-type]
        logged.append(log.logging_batch(index))
    assert [i for i, flag in enumerate(logged) if flag] == [2, 5, 7]
    assert log_every_n_steps(trainer) == 3  # type: ignore[arg-type]


def test_final_batch_by_max_steps_or_stop() -> None:
    trainer = _trainer(num_training_batches=100)
    assert not is_final_batch(trainer, 0)  # type: ignore[arg-type]
    trainer.max_steps, trainer.global_step = 4, 4
    assert is_final_batch(trainer, 0)  # type: ignore[arg-type]
    trainer.max_steps, trainer.should_stop = -1, True
    assert is_final_batch(trainer, 0)  # type: ignore[arg-type]
    trainer.should_stop = False
    assert is_final_batch(trainer, 99)  # type: ignore[arg-type]  # the epoch's last batch


def test_adding_before_start_says_what_to_do() -> None:
    with pytest.raises(RuntimeError, match=r"StepLog.start\(trainer, step\) must open a row"):
        StepLog().add({"a": 1.0})
    StepLog().add({})  # nothing to add: nothing to refuse
    StepLog().finish()  # no open row: nothing to write
