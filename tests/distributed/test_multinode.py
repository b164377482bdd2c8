"""Two "machines" on localhost: ``trustregion fit --trainer.num_nodes=2 --trainer.devices=1``
started once per node, with the variables Lightning's default cluster environment reads
(``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``NODE_RANK``), and no launcher of our own.

Sampling is greedy (``top_k: 1``), so a completion depends only on the prompt and the weights,
not on which process drew it: two nodes × one process then log exactly what one process logs on
the whole batch, every row, as long as each optimiser step uses the global gradient. An entropy
bonus gives that gradient something to carry (greedy groups have equal rewards, so zero
advantages), and rewards that differ from prompt to prompt make a node's own reward mean
differ from the global one.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from cli_runs import TRUSTREGION, finite, fit_config, free_port, metric_rows, process_env

from trustregion.cli import main

STEPS = 3
MODEL = {"task": {"class_path": "cli_runs.AnswerLengthArithmetic"},
         "batching": {"group_size": 2, "prompts_per_step": 4},
         "sampling": {"max_new_tokens": 2, "top_k": 1},
         "penalties": [{"class_path": "trustregion.penalties.EntropyBonus",
                        "init_args": {"coef": 0.01}}]}


def _config(directory: Path, model_dir: Path) -> Path:
    saver = {"class_path": "cli_runs.SaveRankRollouts",
             "init_args": {"directory": str(directory / "rollouts")}}
    return fit_config(directory, model_dir, model=MODEL,
                      trainer={"max_steps": STEPS, "callbacks": [saver]})


def test_two_nodes_log_what_one_process_logs(tmp_path: Path, random_model_dir: Path) -> None:
    nodes, single = tmp_path / "nodes", tmp_path / "single"
    nodes.mkdir()
    single.mkdir()
    config = _config(nodes, random_model_dir)
    assert TRUSTREGION is not None, "the trustregion command is not installed"
    env = {**process_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": "2"}
    processes = []
    for node in (0, 1):
        with (nodes / f"node{node}.txt").open("w") as log:
            processes.append(subprocess.Popen(
                [TRUSTREGION, "fit", "--config", str(config), "--trainer.strategy=ddp",
                 "--trainer.num_nodes=2", "--trainer.devices=1", "--trainer.accelerator=cpu"],
                cwd=nodes, env={**env, "NODE_RANK": str(node)}, stdout=subprocess.DEVNULL,
                stderr=log))
    try:
        main(["fit", "--config", str(_config(single, random_model_dir))])
        for process in processes:
            process.wait(timeout=300)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    logs = [(nodes / f"node{node}.txt").read_text() for node in (0, 1)]
    assert [process.returncode for process in processes] == [0, 0], logs
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in logs[0]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in logs[1]

    distributed, alone = metric_rows(nodes), metric_rows(single)
    assert sorted(distributed) == sorted(alone) == list(range(STEPS))
    for step in range(STEPS):
        assert finite(distributed[step]) == pytest.approx(finite(alone[step]), rel=1e-5,
                                                          abs=1e-6)
        assert distributed[step]["train/loss"] != 0.0  # the entropy bonus made a gradient

    # The rows are global: the logged entropy is the token-weighted mean over both nodes'
    # updates, and the nodes' own reward means differ, so a node-local row would not match.
    rank_means_differ = False
    for step in range(STEPS):
        parts = [torch.load(nodes / "rollouts" / f"rank{rank}-step{step}.pt") for rank in (0, 1)]
        overall = sum(part["entropy_sum"].item() for part in parts) / sum(
            part["tokens"] for part in parts)
        assert distributed[step]["penalty/entropy"] == pytest.approx(overall, rel=1e-6)
        means = [part["rewards"].double().mean().item() for part in parts]
        rank_means_differ |= abs(means[0] - means[1]) > 0.1
    assert rank_means_differ
