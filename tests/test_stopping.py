"""A run with nothing to end it is reported when fitting starts."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Timer

from trustregion.batching import BatchSettings
from trustregion.module import TrustRegionModule
from trustregion.rollout import SamplingSettings
from trustregion.stopping import unbounded_run_warning

ENDLESS = "this run has no stopping condition and will train until it is interrupted"


def _trainer(**settings: Any) -> Any:
    """The public settings :func:`unbounded_run_warning` reads, as fitting resolves them
    (Lightning sets max_epochs to 1000 when neither max_steps nor max_time is given)."""
    values = {"max_steps": -1, "max_epochs": 1000, "limit_train_batches": 1.0, "callbacks": []}
    return SimpleNamespace(**{**values, **settings})


def test_no_bound_gives_the_warning_with_the_settings_to_use() -> None:
    assert unbounded_run_warning(_trainer(), steps_per_rollout=2) == (
        "this run has no stopping condition and will train until it is interrupted: "
        "trainer.max_steps is -1, trainer.max_time is not set, and the prompt stream is "
        "endless, so an epoch never ends and trainer.max_epochs cannot stop it. Set "
        "trainer.max_steps (optimiser steps; 2 per rollout batch here) or trainer.max_time "
        "(e.g. '00:12:00:00')")
    # an epoch of a fraction of an endless stream is still endless
    assert unbounded_run_warning(_trainer(limit_train_batches=0.5), 1) is not None
    # whole epochs of 5 batches, but no limit on the number of epochs
    assert unbounded_run_warning(_trainer(limit_train_batches=5, max_epochs=-1), 1) is not None


@pytest.mark.parametrize("settings", [
    {"max_steps": 1600},
    {"max_steps": 0},
    {"callbacks": [Timer(duration="00:00:01:00")]},        # trainer.max_time
    {"limit_train_batches": 5, "max_epochs": 3},           # 3 epochs of 5 rollout batches
])
def test_any_bound_gives_no_warning(settings: dict[str, Any]) -> None:
    assert unbounded_run_warning(_trainer(**settings), steps_per_rollout=2) is None


class _Stop(Exception):
    """Ends a test's fit once it has started."""


class _StopAtTrainStart(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise _Stop


def _fit_start(random_model_dir: Path, **trainer: Any) -> list[str]:
    """Start fitting a tiny module (stopped before its first rollout); the warnings given."""
    torch.manual_seed(0)
    # 2 prompts × 4 completions = 8 sequences, mini-batches of 4: 2 optimiser steps per rollout
    module = TrustRegionModule(
        policy=f"config:{random_model_dir}",
        batching=BatchSettings(group_size=4, prompts_per_step=2, mini_batch_size=4),
        sampling=SamplingSettings(max_new_tokens=2))
    fit = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, callbacks=[_StopAtTrainStart()], **trainer)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(_Stop):
        warnings.simplefilter("always")
        fit.fit(module)
    return [str(w.message) for w in caught]


def test_fitting_without_a_bound_warns_at_the_start(random_model_dir) -> None:
    messages = _fit_start(random_model_dir)  # max_steps -1, as --print_config saves it
    endless = [m for m in messages if m.startswith(ENDLESS)]
    assert len(endless) == 1
    assert re.search(r"trainer\.max_steps \(optimiser steps; 2 per rollout batch here\)",
                     endless[0])


def test_fitting_with_max_steps_or_max_time_does_not_warn(random_model_dir) -> None:
    assert not [m for m in _fit_start(random_model_dir, max_steps=4) if m.startswith(ENDLESS)]
    assert not [m for m in _fit_start(random_model_dir, max_time="00:00:05:00")
                if m.startswith(ENDLESS)]
