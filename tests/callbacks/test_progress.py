"""RolloutProgressBar counts rollout batches, not optimiser steps."""

from __future__ import annotations

import io
import math
import re
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from conftest import DigitRichArithmetic
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.loggers import CSVLogger
from rich.cells import cell_len
from rich.console import Console

from trustregion.batching import BatchSettings
from trustregion.callbacks import DriftMonitor, RolloutProgressBar
from trustregion.callbacks.progress import (
    drop_disabled_progress_bars,
    format_value,
    pack_lines,
    parameter_summary,
)
from trustregion.module import TrustRegionModule
from trustregion.rollout import SamplingSettings


class _Seen(L.Callback):
    """Records the bar's total and description when the epoch starts, and the optimiser steps
    after every rollout batch."""

    def __init__(self, bar: RolloutProgressBar) -> None:
        self.bar = bar
        self.total: Any = None
        self.description = ""
        self.steps: list[int] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.total = self.bar.total_train_batches
        self.description = self.bar.description(trainer.current_epoch)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.steps.append(trainer.global_step)


@pytest.mark.parametrize(("mini_batch_size", "ppo_epochs", "max_steps", "batches"), [
    (2, 1, 6, 3),   # 4 sequences in mini-batches of 2: 2 steps per rollout batch
    (3, 2, 7, 2),   # ⌈4 / 3⌉ = 2 steps per epoch × 2 epochs = 4; 7 steps → ⌈7 / 4⌉ = 2 batches
])
def test_total_is_rollout_batches(random_model_dir, mini_batch_size, ppo_epochs, max_steps,
                                  batches) -> None:
    torch.manual_seed(0)
    module = TrustRegionModule(policy=f"config:{random_model_dir}", task=DigitRichArithmetic(),
                               batching=BatchSettings(group_size=2, prompts_per_step=2,
                                                      mini_batch_size=mini_batch_size,
                                                      ppo_epochs=ppo_epochs),
                               sampling=SamplingSettings(max_new_tokens=3))
    per_rollout = ppo_epochs * -(-4 // mini_batch_size)
    assert module.optimizer_steps_per_rollout == per_rollout
    bar = RolloutProgressBar()
    seen = _Seen(bar)
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[bar, seen])
    trainer.fit(module)
    assert seen.total == batches
    assert len(seen.steps) == batches  # the bar's total is what actually ran
    assert seen.steps[0] == per_rollout  # the property matches the optimiser steps made
    assert seen.description.strip() == "Epoch 0"  # not "Epoch 0/-2" for max_epochs=-1


def test_other_modules_get_lightnings_total() -> None:
    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.layer(batch).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self) -> Any:
            return torch.utils.data.DataLoader(torch.ones(10, 1), batch_size=2)

    bar = RolloutProgressBar()
    seen = _Seen(bar)
    L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
              callbacks=[bar, seen]).fit(Plain())
    assert seen.total == 5
    assert seen.description.strip() == "Epoch 0/0"


def test_bar_shows_the_step_logs_values_and_the_description(random_model_dir) -> None:
    torch.manual_seed(0)
    module = TrustRegionModule(policy=f"config:{random_model_dir}", task=DigitRichArithmetic(),
                               batching=BatchSettings(group_size=2, prompts_per_step=2,
                                                      mini_batch_size=2),
                               sampling=SamplingSettings(max_new_tokens=3))
    screen = io.StringIO()
    bar = RolloutProgressBar(console=Console(file=screen, width=200, force_terminal=True))
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[bar])
    trainer.fit(module)  # 2 rollout batches of 2 optimiser steps
    metrics = bar.get_metrics(trainer, module)
    assert {"reward", "loss"} <= set(metrics)
    assert metrics["reward"] == pytest.approx(module.step_log.progress_bar_metrics["reward"])
    # the bar reads the StepLog itself, so nothing goes through LightningModule.log
    assert "reward" not in trainer.progress_bar_metrics
    text = screen.getvalue()
    assert "Epoch 0" in text and "2/2" in text
    assert "reward " in text and "loss " in text


def test_refresh_per_second_must_be_a_positive_integer() -> None:
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=r"refresh_per_second must be an integer ≥ 1"):
            RolloutProgressBar(refresh_per_second=bad)  # type: ignore[arg-type]


def _module(random_model_dir: Any) -> TrustRegionModule:
    """2 prompts × 2 completions in mini-batches of 2: 2 optimiser steps per rollout batch."""
    torch.manual_seed(0)
    return TrustRegionModule(policy=f"config:{random_model_dir}", task=DigitRichArithmetic(),
                             batching=BatchSettings(group_size=2, prompts_per_step=2,
                                                    mini_batch_size=2),
                             sampling=SamplingSettings(max_new_tokens=3))


class _Marker(L.Callback):
    """Writes a marker to the screen when training ends (listed before the bar, so it runs
    before the bar's own on_train_end)."""

    def __init__(self, screen: io.StringIO) -> None:
        self.screen = screen

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.screen.write("<train end>")


_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_terminal_bar_fits_80_columns_has_no_v_num_and_is_drawn_once_at_the_end(
        random_model_dir, tmp_path) -> None:
    module = _module(random_model_dir)
    screen = io.StringIO()
    bar = RolloutProgressBar(console=Console(file=screen, width=80, force_terminal=True))
    trainer = L.Trainer(max_steps=6, logger=CSVLogger(tmp_path), enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[_Marker(screen), bar,
                                                               DriftMonitor()])
    trainer.fit(module)  # 3 rollout batches
    text = screen.getvalue()
    lines = [line for chunk in _CONTROL.sub("", text).split("\n") for line in chunk.split("\r")]
    assert max(cell_len(line) for line in lines) <= 80
    assert "…" not in text  # nothing squeezed out of the 80 columns
    assert "3/3" in text and "reward " in text and "kl " in text and "outside " in text
    assert "v_num" not in text  # the CSV logger's version is not a training value
    # The bar's last frame is drawn when the last batch ends, not again when training ends.
    before, after = text.split("<train end>")
    assert "3/3" in before and after == ""


def test_plain_lines_every_log_every_rollout_batches_and_after_the_last(random_model_dir
                                                                       ) -> None:
    module = _module(random_model_dir)
    screen = io.StringIO()
    bar = RolloutProgressBar(console=Console(file=screen, width=80, force_terminal=False),
                             log_every=2)
    assert bar.plain
    trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[bar, DriftMonitor()])
    trainer.fit(module)  # 10 optimiser steps / 2 per rollout batch = 5 rollout batches
    lines = screen.getvalue().splitlines()
    assert lines[0] == parameter_summary(module)  # no model summary callback: counts instead
    progress = lines[1:]
    # every 2nd batch (2, 4) and the last (5)
    assert [line.split("  ")[0] for line in progress] == ["batch 2/5", "batch 4/5",
                                                          "batch 5/5"]
    number = r"-?[0-9.e+-]+"
    for line in progress:
        assert re.fullmatch(rf"batch \d/5  reward {number}  kl {number}  outside {number}%  "
                            rf"{number} s/batch", line), line
    shown = module.step_log.progress_bar_metrics  # the last batch's values
    assert progress[-1].startswith(f"batch 5/5  reward {format_value('reward', shown['reward'])}"
                                   f"  kl {format_value('kl', shown['kl'])}  outside "
                                   f"{format_value('outside', shown['outside'])}  ")
    assert "\x1b" not in screen.getvalue()  # no terminal control codes in a log file


class StopAt(L.Callback):
    """Stops the run at the end of the given rollout batch (0-based), as a collapse guard
    listed after the bar does."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.batch:
            trainer.should_stop = True


def test_a_run_stopped_by_a_later_callback_gets_its_final_plain_line(random_model_dir
                                                                       ) -> None:
    module = _module(random_model_dir)
    screen = io.StringIO()
    bar = RolloutProgressBar(console=Console(file=screen, width=80, force_terminal=False),
                             log_every=10)
    trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[bar, StopAt(1)])
    trainer.fit(module)
    # stopped after the 2nd of 5 rollout batches: no line is due every 10, but the last is shown
    assert [line.split("  ")[0] for line in screen.getvalue().splitlines()[1:]] == ["batch 2/5"]


@pytest.mark.parametrize("widgets", [True, False])
def test_a_notebook_draws_the_bar_only_with_ipywidgets(monkeypatch, widgets) -> None:
    # rich draws a live bar in Jupyter only through ipywidgets; without it the bar would stay
    # blank until the end, so plain lines are printed instead
    import importlib.util

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        object() if widgets else None) if name == "ipywidgets" else found(name, *a))
    bar = RolloutProgressBar(console=Console(file=io.StringIO(), force_jupyter=True,
                                             force_terminal=False))
    assert bar.plain is not widgets


def _stand_in_trainer(module: Any, *, max_steps: int, global_step: int) -> SimpleNamespace:
    return SimpleNamespace(max_steps=max_steps, global_step=global_step, max_epochs=-1,
                           num_training_batches=math.inf, lightning_module=module,
                           current_epoch=0, callbacks=[ModelSummary()], should_stop=False,
                           loggers=[],
                           progress_bar_metrics={}, is_global_zero=True)


@pytest.mark.parametrize(("global_step", "max_steps", "per_rollout", "start", "total"), [
    (1600, 3200, 2, 800, 1600),  # resumed after 800 of 1600 rollout batches
    (7, 12, 2, 3, 6),            # ⌊7 / 2⌋ = 3 done; ⌈(12 − 7) / 2⌉ = 3 left → 3 + 3 = 6
    (0, 6, 2, 0, 3),             # a fresh run: 0 done of ⌈6 / 2⌉ = 3
])
def test_a_resumed_run_counts_the_runs_rollout_batches(global_step, max_steps, per_rollout,
                                                        start, total) -> None:
    module = SimpleNamespace(optimizer_steps_per_rollout=per_rollout)
    trainer = _stand_in_trainer(module, max_steps=max_steps, global_step=global_step)
    screen = io.StringIO()
    bar = RolloutProgressBar(console=Console(file=screen, force_terminal=False), log_every=1)
    bar.setup(trainer, module, "fit")  # type: ignore[arg-type]
    # A run resumed in the middle of its epoch gets on_train_start but no on_train_epoch_start.
    bar.on_train_start(trainer, module)  # type: ignore[arg-type]
    assert bar.counts() == (start, total)
    bar.on_train_epoch_start(trainer, module)  # type: ignore[arg-type]  # a fresh run: no reset
    assert bar.counts() == (start, total)
    assert bar.total_train_batches == total - start  # what this fit runs
    trainer.global_step += per_rollout
    bar.on_train_batch_end(trainer, module, None, None, start)  # type: ignore[arg-type]
    assert bar.counts() == (start + 1, total)
    assert screen.getvalue().startswith(f"batch {start + 1}/{total}  ")


def test_format_value_and_pack_lines() -> None:
    assert format_value("reward", 0.41234) == "0.412"
    assert format_value("outside", 0.00347) == "0.347%"  # 100 × 0.00347, 3 digits
    assert format_value("outside", 0.0) == "0%"
    assert format_value("kl", 0.0012345) == "0.00123"
    assert format_value("epoch", 3) == "3"
    # "a 1" + 2 spaces + "bb 2" = 9 columns fit in 10; the third item starts a line
    assert pack_lines(["a 1", "bb 2", "ccc 3"], 10) == ["a 1  bb 2", "ccc 3"]
    assert pack_lines(["abcdefghijk"], 4) == ["abcd", "efgh", "ijk"]  # folded, never wider
    with pytest.raises(ValueError, match="width must be an integer ≥ 1; got 0"):
        pack_lines(["a"], 0)


def test_parameter_summary_counts_trainable_and_frozen_parameters_per_model() -> None:
    module = L.LightningModule()
    module.policy = torch.nn.Linear(2, 3)  # 2·3 weights + 3 biases = 9
    module.frozen = torch.nn.Linear(3, 1).requires_grad_(False)  # 3 + 1 = 4
    module.mixed = torch.nn.Sequential(torch.nn.Linear(1, 1),  # 2 trainable
                                       torch.nn.Linear(2, 1).requires_grad_(False))  # 3 frozen
    module.mixed.append(module.policy)  # shared with policy: counted there only
    assert parameter_summary(module) == ("parameters: policy 9 trainable · frozen 4 frozen · "
                                         "mixed 2 trainable + 3 frozen")


def test_progress_bars_are_dropped_only_when_the_progress_bar_is_disabled() -> None:
    bar = {"class_path": "trustregion.callbacks.RolloutProgressBar"}
    monitor = {"class_path": "trustregion.callbacks.DriftMonitor"}
    built = RolloutProgressBar()
    for enabled in (None, True):  # Lightning's default is None: a bar is shown
        config = {"enable_progress_bar": enabled, "callbacks": [bar, monitor]}
        assert drop_disabled_progress_bars(config) == []
        assert config["callbacks"] == [bar, monitor]
    config = {"enable_progress_bar": False, "callbacks": [bar, monitor, built]}
    assert drop_disabled_progress_bars(config) == [
        "trustregion.callbacks.RolloutProgressBar",
        "trustregion.callbacks.progress.RolloutProgressBar"]
    assert config["callbacks"] == [monitor]


def test_log_every_must_be_a_positive_integer() -> None:
    with pytest.raises(ValueError, match=r"log_every must be an integer ≥ 1 \(rollout batches "
                                         r"between two plain lines\); got 0"):
        RolloutProgressBar(log_every=0)
