"""FSDP2 (Lightning's ``ModelParallelStrategy``, ``fully_shard`` in ``configure_model``) on two
CPU processes logs and trains exactly what one process does on the concatenated data.

Lightning starts the second process by running the script again, so each run is a subprocess
(``parallel_run.py``). The ranks' rollouts are replayed, concatenated, on one process with the
same initial weights and callbacks; every logged value (``train/grad_norm`` included) and the
updated policy and behaviour weights must agree to fp32 rounding (rel 1e-5, abs 1e-6: the
sharded run sums gradients in another order). Callbacks must log the same row on every rank.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import DigitRichArithmetic
from lightning.pytorch.strategies import ModelParallelStrategy
from parallel_run import (
    ROLLOUT_BATCHES,
    SETTINGS,
    build,
    callbacks,
    report_differing_models,
    run_on_two_processes,
)
from rank_replay import ReplayModule, concatenated
from row_logger import RowLogger

from trustregion.evaluation import EvaluationSettings
from trustregion.module import TrustRegionModule
from trustregion.sharding import (
    check_fsdp_layout,
    clip_grad_norm,
    decoder_layers,
    full_state_dict,
    is_sharded,
)

HERE = Path(__file__).parent


def replayed_rows(model_dir: Path, out: Path, scenario: str
                  ) -> tuple[ReplayModule, list[tuple[int, dict[str, float]]]]:
    """The ranks' rollouts, concatenated, trained on one process from the same weights."""
    replay = build(model_dir, ReplayModule)
    initial = torch.load(out / "initial0.pt")
    assert all(torch.equal(initial[k], v) for k, v in replay.policy.state_dict().items())
    replay.replays = [concatenated([torch.load(out / f"rollout{rank}_{index}.pt",
                                               weights_only=False) for rank in (0, 1)])
                      for index in range(ROLLOUT_BATCHES)]
    single = out / "single"
    single.mkdir()
    L.Trainer(max_steps=ROLLOUT_BATCHES, log_every_n_steps=1, logger=RowLogger(single),
              enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=callbacks(scenario)).fit(replay)
    return replay, torch.load(single / "rows0.pt")


def test_fsdp_on_two_ranks_logs_and_trains_what_one_process_does(
        random_model_dir: Path, tmp_path: Path) -> None:
    rows = run_on_two_processes(random_model_dir, tmp_path, "train", "fsdp")
    assert rows[0] == rows[1]  # every rank holds the same global row
    assert [step for step, _ in rows[0]] == list(range(ROLLOUT_BATCHES))
    initial = [torch.load(tmp_path / f"initial{rank}.pt") for rank in (0, 1)]
    assert all(torch.equal(initial[0][k], initial[1][k]) for k in initial[0])

    replay, single = replayed_rows(random_model_dir, tmp_path, "train")
    assert [step for step, _ in single] == [step for step, _ in rows[0]]
    for (_, sharded), (_, whole) in zip(rows[0], single, strict=True):
        assert set(sharded) == set(whole)
        for prefix in ("reward/", "train/grad_norm", "trust_region/", "penalty/", "drift/",
                       "region/", "guard/", "controller/", "shadow/"):
            assert any(key.startswith(prefix) for key in whole), prefix
        assert sharded == pytest.approx(whole, rel=1e-5, abs=1e-6)

    final = [torch.load(tmp_path / f"final{rank}.pt") for rank in (0, 1)]
    for name in ("policy", "behavior"):
        expected = getattr(replay, name).state_dict()
        assert set(final[0][name]) == set(expected)
        for key, value in expected.items():
            assert torch.equal(final[0][name][key], final[1][name][key])  # gathered whole
            torch.testing.assert_close(final[0][name][key], value, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(final[0]["policy"][k], initial[0][k]) for k in initial[0])

    # One gradient reduce-scatter per sharded unit (the decoder layer and the root) per
    # optimiser step, not per micro-batch: 2 rollout batches × 1 step × 2 units = 4 (8 if each
    # of the 2 micro-batches per step exchanged its gradients).
    assert [torch.load(tmp_path / f"exchanges{rank}.pt") for rank in (0, 1)] == [4, 4]


def test_a_guard_undoing_every_batch_acts_the_same_on_every_fsdp_rank(
        random_model_dir: Path, tmp_path: Path) -> None:
    rows = run_on_two_processes(random_model_dir, tmp_path, "skip", "fsdp")
    assert rows[0] == rows[1]
    assert [row["guard/fired"] for _, row in rows[0]] == [1.0] * ROLLOUT_BATCHES
    initial = torch.load(tmp_path / "initial0.pt")
    for rank in (0, 1):
        final = torch.load(tmp_path / f"final{rank}.pt")
        for name in ("policy", "behavior"):  # every update undone, on every shard
            assert all(torch.equal(final[name][k], v) for k, v in initial.items()), name


def test_fsdp_on_one_process_is_refused_before_the_first_rollout(
        random_model_dir: Path, tmp_path: Path) -> None:
    saved = dict(os.environ)  # the strategy sets MASTER_ADDR, WORLD_SIZE, ...
    try:
        # With or without held-out evaluation (which FSDP runs, generating in lockstep on
        # every process: tests/distributed/test_fsdp_evaluation.py), one process is refused.
        message = (r"FSDP \(ModelParallelStrategy\) shards the policy across processes and "
                   r"needs at least 2; trainer\.devices × trainer\.num_nodes gives 1")
        for evaluation in (EvaluationSettings(prompts=4), None):
            module = TrustRegionModule(policy=f"config:{random_model_dir}",
                                       task=DigitRichArithmetic(), evaluation=evaluation,
                                       **SETTINGS)
            trainer = L.Trainer(
                accelerator="cpu", devices=1, max_steps=1, logger=False,
                strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
                enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=tmp_path)
            with pytest.raises(ValueError, match=message):
                trainer.fit(module)
            assert module.next_prompt_batch == 0  # no rollout happened
            assert not is_sharded(module.policy)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


def test_models_that_differ_between_processes_are_named_on_every_process(
        tmp_path: Path) -> None:
    # policies seeded 0 and 1 differ, behaviours both seeded 0 do not, no reference is skipped
    torch.multiprocessing.spawn(report_differing_models, args=(tmp_path / "store", tmp_path),
                                nprocs=2)
    assert [torch.load(tmp_path / f"differing{rank}.pt") for rank in (0, 1)] == [["policy"]] * 2


def test_tensor_parallelism_is_refused_with_the_settings_to_use() -> None:
    check_fsdp_layout(4, 1)
    with pytest.raises(ValueError) as error:
        check_fsdp_layout(4, 2)
    assert str(error.value) == (
        "ModelParallelStrategy's tensor_parallel_size must be 1 (the policy is sharded with FSDP "
        "over data-parallel processes only); got 2. Set tensor_parallel_size: 1 and "
        "data_parallel_size: 4 (the number of processes)")


def test_an_unsharded_model_is_its_own_full_state_and_its_layers_are_found(
        random_model_dir: Path) -> None:
    module = build(random_model_dir)
    state = full_state_dict(module.policy)
    assert state.keys() == module.policy.state_dict().keys()
    # the live weights, not copies
    assert all(state[k].data_ptr() == v.data_ptr() for k, v in module.policy.state_dict().items())
    # the conftest model has one decoder layer
    assert decoder_layers(module.policy) == list(module.policy.model.layers)
    assert len(decoder_layers(module.policy)) == 1
    assert decoder_layers(torch.nn.Linear(2, 2)) == []


def test_gradient_clipping_uses_the_norm_of_every_gradient() -> None:
    # grads (3, 0) and (4): norm √(9 + 16) = 5; max_norm 10 leaves them, max_norm 2.5 halves
    # them (coefficient 2.5 / (5 + 1e-6)); a parameter without a gradient is skipped
    params = [torch.zeros(2, requires_grad=True), torch.zeros(1, requires_grad=True),
              torch.zeros(3, requires_grad=True)]
    params[0].grad, params[1].grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert clip_grad_norm(params, 10.0).item() == pytest.approx(5.0)
    assert params[0].grad.tolist() == [3.0, 0.0]
    assert clip_grad_norm(params, 2.5).item() == pytest.approx(5.0)
    assert params[0].grad.tolist() == pytest.approx([1.5, 0.0])
    assert params[1].grad.tolist() == pytest.approx([2.0])
    assert params[2].grad is None
    assert clip_grad_norm([torch.zeros(1, requires_grad=True)], 1.0).item() == 0.0
    nan = torch.zeros(1, requires_grad=True)
    nan.grad = torch.tensor([float("nan")])
    assert torch.isnan(clip_grad_norm([nan], 1.0))


def test_trustregion_fit_trains_the_fsdp_config_on_two_processes(tmp_path: Path) -> None:
    config = HERE.parents[1] / "examples" / "configs" / "fsdp.yaml"
    # 2 optimiser steps per rollout batch: 4 steps are 2 rollout batches, one row each
    result = subprocess.run(
        [sys.executable, "-m", "trustregion.cli", "fit", "--config", str(config),
         "--trainer.max_steps=4"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Starting with 2 processes" in result.stderr + result.stdout
    with (tmp_path / "runs" / "fsdp" / "csv" / "version_0" / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [row["step"] for row in rows] == ["0", "1"]
    for row in rows:
        for key in ("reward/mean", "train/loss", "train/grad_norm", "train/lr",
                    "trust_region/outside_frac", "drift/behavior/kl_k3", "guard/fired"):
            assert row[key] != "", key
        assert float(row["train/skipped_steps"]) == 0.0
