"""``trustregion fit --trainer.strategy=ddp --trainer.devices=2`` from the command line.

Lightning's ``ddp`` launches the second process by running the command line again, so this runs
the installed ``trustregion`` console script in a subprocess, with a callback saving what each
rank sampled, and the same config on one process (in this process) beside it.

What the two runs share exactly: the prompts of every rollout batch (the ranks' shares, in rank
order, are the one-process batch) and the logged keys. The completions differ: each rank samples
from its own seeded generator. So the logged values are checked against the union of the ranks'
saved samples, which is what a global value is, and the ranks' own values are checked to differ,
so that a rank-local value could not pass.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_runs import TRUSTREGION, finite, fit_config, metric_rows, process_env

from trustregion.advantages import compute_advantages
from trustregion.cli import main

STEPS = 3  # rollout batches, one optimiser step each (8 sequences ≤ mini_batch_size 64)
GROUP = 2
PROMPTS = 4  # per rollout batch: 2 per rank
MODEL = {"batching": {"group_size": GROUP, "prompts_per_step": PROMPTS}}


def _config(directory: Path, model_dir: Path) -> Path:
    saver = {"class_path": "cli_runs.SaveRankRollouts",
             "init_args": {"directory": str(directory / "rollouts")}}
    return fit_config(directory, model_dir, model=MODEL,
                      trainer={"max_steps": STEPS, "callbacks": [saver]})


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, random_model_dir: Path) -> dict[str, Path]:
    """The run on two processes (``ddp``) and on one (``single``), side by side."""
    ddp, single = tmp_path_factory.mktemp("ddp"), tmp_path_factory.mktemp("single")
    ddp_config, single_config = _config(ddp, random_model_dir), _config(single, random_model_dir)
    assert TRUSTREGION is not None, "the trustregion command is not installed"
    with (ddp / "stderr.txt").open("w") as stderr:
        process = subprocess.Popen(
            [TRUSTREGION, "fit", "--config", str(ddp_config), "--trainer.strategy=ddp",
             "--trainer.devices=2", "--trainer.accelerator=cpu"],
            cwd=ddp, env=process_env(), stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr("sys.argv", ["trustregion"])
                main(["fit", "--config", str(single_config)])
            process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
    log = (ddp / "stderr.txt").read_text()
    assert process.returncode == 0, log
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log  # the console script launched a second rank
    return {"ddp": ddp, "single": single}


def _samples(directory: Path, step: int, rank: int) -> dict[str, Any]:
    return torch.load(directory / "rollouts" / f"rank{rank}-step{step}.pt")


def _group_prompts(prompts: list[str]) -> list[str]:
    """One prompt per group, checking that the group's completions are consecutive."""
    groups = [prompts[i:i + GROUP] for i in range(0, len(prompts), GROUP)]
    assert all(len(set(group)) == 1 and len(group) == GROUP for group in groups), prompts
    return [group[0] for group in groups]


def test_one_row_per_rollout_batch_written_once(runs) -> None:
    ddp, single = metric_rows(runs["ddp"]), metric_rows(runs["single"])
    assert sorted(ddp) == sorted(single) == list(range(STEPS))
    # Only rank 0 logs: a second writer would have made a second version directory.
    assert [p.name for p in (runs["ddp"] / "csv").iterdir()] == ["version_0"]
    for step in range(STEPS):
        assert set(finite(ddp[step])) == set(finite(single[step]))
        assert ddp[step]["train/lr"] == single[step]["train/lr"]


def test_each_rank_samples_whole_groups_of_its_share_of_the_prompts(runs) -> None:
    for step in range(STEPS):
        shares = [_group_prompts(_samples(runs["ddp"], step, rank)["prompts"])
                  for rank in (0, 1)]
        whole = _group_prompts(_samples(runs["single"], step, 0)["prompts"])
        assert [len(share) for share in shares] == [PROMPTS // 2] * 2
        assert not set(shares[0]) & set(shares[1])  # no prompt on both ranks
        assert shares[0] + shares[1] == whole  # contiguous slices of the one-process batch


def test_advantages_are_those_of_the_whole_batch(runs) -> None:
    nonzero = False
    for step in range(STEPS):
        parts = [_samples(runs["ddp"], step, rank) for rank in (0, 1)]
        rewards = torch.cat([part["rewards"] for part in parts])
        local = torch.cat([part["advantages"] for part in parts])
        whole = compute_advantages("grpo", rewards, GROUP).values
        torch.testing.assert_close(local, whole, rtol=0, atol=0)
        nonzero |= bool(local.abs().max() > 0.1)
    assert nonzero  # some group's completions were rewarded differently


def test_logged_values_are_over_both_ranks(runs) -> None:
    rows = metric_rows(runs["ddp"])
    rank_means_differ = False
    for step in range(STEPS):
        parts = [_samples(runs["ddp"], step, rank) for rank in (0, 1)]
        rewards = torch.cat([part["rewards"] for part in parts]).double()
        lengths = torch.cat([part["lengths"] for part in parts]).double()
        groups = rewards.view(-1, GROUP)
        row = rows[step]
        assert row["reward/mean"] == pytest.approx(rewards.mean().item(), rel=1e-6)
        assert row["reward/std"] == pytest.approx(rewards.std().item(), rel=1e-6, abs=1e-7)
        assert row["reward/frac_zero_std"] == pytest.approx(
            (groups == groups[:, :1]).all(-1).double().mean().item())
        assert row["response/length_mean"] == pytest.approx(lengths.mean().item())
        assert row["response/length_max"] == lengths.max().item()
        means = [part["rewards"].double().mean().item() for part in parts]
        rank_means_differ |= abs(means[0] - means[1]) > 1e-3
    assert rank_means_differ  # rank 0's own mean would not have passed
