"""Held-out evaluation with the policy sharded by FSDP2 (Lightning's ``ModelParallelStrategy``)
across two CPU processes scores exactly what one process scores with the same weights.

Every forward pass of a sharded policy is a collective, so the processes must generate in
lockstep: a process whose completions end early keeps running forward passes until the other's
end, and a process without a prompt in a batch generates for a stand-in prompt that it does not
score. The policy here is made to end its completions at once after an "a" and to run to the
length limit otherwise, so that one batch has a process stop early and another leaves one process
without a prompt; without lockstep generation the run would hang (the subprocess has a timeout).

Lightning starts the second process by running this file again (``main`` below), so the run is
a subprocess of the test.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from row_logger import RowLogger
from torch.distributed.device_mesh import init_device_mesh
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trustregion.batching import BatchSettings
from trustregion.evaluation import (
    EvaluationSettings,
    EvaluationTotals,
    ValidationBatch,
    evaluate,
    evaluate_share,
    generate_completions,
    validation_batches,
)
from trustregion.module import TrustRegionModule
from trustregion.rollout import SamplingSettings
from trustregion.sharding import full_state_dict, is_sharded, shard_model
from trustregion.tasks import Example, Task

MAX_NEW_TOKENS = 4
# 7 prompts in batches of 3, 3 and 1: rank 0 scores 2, 2 and 1 of them, rank 1 scores 1, 1 and 0
SETTINGS = EvaluationSettings(prompts=7, batch_size=3, samples=2, correct_at=1.0)
RUN_TIMEOUT_S = 300  # the run takes well under a minute; a hang is cut off here


def length_share(completions: list[str], examples: list[Example]) -> list[float]:
    """The completion's length in characters over ``MAX_NEW_TOKENS``: 0 for a completion that
    ends at once, 1 for one that runs to the limit."""
    return [len(text) / MAX_NEW_TOKENS for text in completions]


class Words(Task):
    """Prompts of 2 to 4 letters from "abc", rewarded by :func:`length_share`."""

    name = "words"

    def __init__(self, validation_fraction: float = 0.5) -> None:
        self.validation_fraction = validation_fraction

    def sample(self, rng: random.Random) -> Example:
        word = "".join(rng.choice("abc") for _ in range(rng.randint(2, 4)))
        return Example(prompt=word, answer=word)

    @property
    def reward_function(self) -> Any:
        return length_share


def end_after_a(policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make the end-of-sequence token the policy's greedy choice right after an "a".

    A random tiny model repeats its last token, its output head being its input embedding
    (tied): giving the end-of-sequence token 1.5 × the embedding of "a" outscores "a" itself.
    """
    assert policy.config.tie_word_embeddings
    embedding = policy.get_input_embeddings().weight
    with torch.no_grad():
        embedding[tokenizer.eos_token_id] = 1.5 * embedding[tokenizer.convert_tokens_to_ids("a")]


def build(model_dir: Path) -> TrustRegionModule:
    """The module of the run and of its one-process twin: seeded random weights, then
    :func:`end_after_a`."""
    torch.manual_seed(0)
    module = TrustRegionModule(
        policy=f"config:{model_dir}", task=Words(), evaluation=SETTINGS,
        batching=BatchSettings(group_size=2, prompts_per_step=4),  # 2 prompts per process
        sampling=SamplingSettings(max_new_tokens=MAX_NEW_TOKENS))
    end_after_a(module.policy, module.tokenizer)
    return module


class SaveEvaluatedPolicy(L.Callback):
    """Saves the policy's whole weights after each evaluation that logs (not the sanity
    check)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(pl_module, TrustRegionModule)
        if trainer.sanity_checking:
            return
        assert is_sharded(pl_module.policy)
        state = full_state_dict(pl_module.policy)  # a collective: on every process
        if trainer.global_rank == 0:
            torch.save(state, self.directory / "evaluated.pt")


def main(model_dir: Path, out: Path) -> None:
    """One rollout batch under FSDP on two processes, evaluated after it (and, as a sanity
    check, on the first two validation batches before it)."""
    trainer = L.Trainer(
        accelerator="cpu", devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=1, val_check_interval=1, check_val_every_n_epoch=None, log_every_n_steps=1,
        logger=RowLogger(out), callbacks=[SaveEvaluatedPolicy(out)],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(build(model_dir))


def run_on_two_processes(model_dir: Path, out: Path) -> None:
    """Run :func:`main` in a subprocess (Lightning starts the second process from it); kill the
    whole process group and fail if it runs past ``RUN_TIMEOUT_S``."""
    tests = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(tests), str(tests / "distributed"),
                            os.environ.get("PYTHONPATH", "")])
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), str(model_dir), str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path})
    try:
        _, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"the FSDP evaluation run did not end within {RUN_TIMEOUT_S} s (a hang)")
    assert process.returncode == 0, stderr[-4000:]


def one_process_values(module: TrustRegionModule) -> tuple[dict[str, float], dict[str, float]]:
    """With ``module``'s policy on this process: the values of one process evaluating every
    prompt, and those of both processes' shares scored one after the other, unsharded."""
    whole = evaluate(module.policy, module.tokenizer, module.task, SETTINGS,
                     max_new_tokens=MAX_NEW_TOKENS, seed=module.seed)
    totals = EvaluationTotals(SETTINGS)
    for batch in validation_batches(module.task.validation_examples(7), SETTINGS.batch_size):
        for rank in (0, 1):
            evaluate_share(module.policy, module.tokenizer, module.task, batch, SETTINGS,
                           totals, max_new_tokens=MAX_NEW_TOKENS, seed=module.seed, rank=rank,
                           world_size=2)
    shares = {key: float(value) for key, value in totals.metrics().items()}
    return whole, shares


def test_fsdp_evaluation_on_two_processes_scores_what_one_process_does(
        random_model_dir: Path, tmp_path: Path) -> None:
    single = build(random_model_dir)
    examples = single.task.validation_examples(7)
    prompts = [ex.prompt for ex in examples]
    assert prompts == ["ccba", "ab", "ccac", "ca", "bba", "aabb", "bcc"]
    # Completions of prompts ending in "a" end at once. Batch 1 ([ca bba aabb]): rank 1's "bba"
    # ends after one token while rank 0's "aabb" runs 4; batch 2 ([bcc]): rank 1 has no prompt.
    assert generate_completions(single.policy, single.tokenizer, prompts, greedy=True,
                                max_new_tokens=MAX_NEW_TOKENS) == [
        "", "bbbb", "cccc", "", "", "bbbb", "cccc"]

    run_on_two_processes(random_model_dir, tmp_path)
    rows = [torch.load(tmp_path / f"rows{rank}.pt") for rank in (0, 1)]
    assert rows[0] == rows[1]  # every process holds the global values
    val_rows = [(step, row) for step, row in rows[0] if "val/greedy_reward_mean" in row]
    ((step, row),) = val_rows  # the sanity check logs nothing
    assert step == 0  # evaluated after rollout batch 0
    logged = {key: value for key, value in row.items() if key.startswith("val/")}
    assert set(logged) == set(SETTINGS.keys)
    assert any(key.startswith("reward/") for _, row in rows[0] for key in row)  # it trained

    single.policy.load_state_dict(torch.load(tmp_path / "evaluated.pt"))
    whole, shares = one_process_values(single)
    # 4 of the 7 greedy completions run to the limit (reward 1), 3 end at once (reward 0):
    # 4/7 both as the mean reward and as pass@1 (correct_at 1.0). Counting the stand-in prompt
    # of batch 2 ("bcc", reward 1) would give 5/8.
    greedy = {"val/greedy_reward_mean": 4 / 7, "val/greedy_pass@1": 4 / 7}
    assert {k: whole[k] for k in greedy} == pytest.approx(greedy)
    assert {k: logged[k] for k in greedy} == pytest.approx(greedy)
    # Sampled completions are seeded by batch and process: the sharded run draws exactly what
    # each process's share draws on one process.
    assert logged == pytest.approx(shares, rel=1e-6)
    assert 0 < logged["val/reward_mean"] < 1


# ------------------------------------------------------------- one batch, without Lightning
def score_a_batch_with_a_sharded_policy(rank: int, model_dir: Path, store: Path,
                                        out: Path) -> None:
    """On process ``rank`` of two (``torch.multiprocessing.spawn``): score a one-prompt batch
    with the policy sharded, inside ``torch.inference_mode`` as Lightning validates on GPUs,
    then train the policy one step; save the sums and the number of forward passes."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        module = build(model_dir)
        shard_model(module.policy, init_device_mesh("cpu", (2,)))
        forwards = []
        module.policy.register_forward_hook(lambda *args: forwards.append(1))
        batch = ValidationBatch(0, module.task.validation_examples(1))  # ["ccba"]: rank 0's
        totals = EvaluationTotals(replace(SETTINGS, samples=0))
        with torch.inference_mode():
            evaluate_share(module.policy, module.tokenizer, module.task, batch, totals.settings,
                           totals, max_new_tokens=MAX_NEW_TOKENS, rank=rank, world_size=2,
                           synced=True)
        evaluated = len(forwards)
        ids = torch.tensor([[1, 2, 3]])
        module.policy(input_ids=ids).logits.sum().backward()  # the gathered weights still train
        grads = sum(p.grad is not None for p in module.policy.parameters())
        torch.save({"sums": totals.sums, "forwards": evaluated, "grads": grads},
                   out / f"scored{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_process_without_a_prompt_takes_part_and_counts_nothing(
        random_model_dir: Path, tmp_path: Path) -> None:
    torch.multiprocessing.spawn(score_a_batch_with_a_sharded_policy,
                                args=(random_model_dir, tmp_path / "store", tmp_path), nprocs=2)
    scored = [torch.load(tmp_path / f"scored{rank}.pt") for rank in (0, 1)]
    # "ccba" ends at once (reward 0) on rank 0; rank 1 generates for it as a stand-in, in the
    # same forward passes (a prefill that ends every completion: 1), and scores nothing
    assert scored[0]["sums"] == {"greedy_prompts": 1.0, "greedy_reward": 0.0,
                                 "greedy_correct": 0.0}
    assert scored[1]["sums"] == {}
    assert [s["forwards"] for s in scored] == [1, 1]
    assert scored[0]["grads"] == scored[1]["grads"] > 0


def test_a_synced_generation_without_a_prompt_is_refused(random_model_dir: Path) -> None:
    module = build(random_model_dir)
    with pytest.raises(ValueError, match=r"a synced generation needs at least one prompt on "
                                         r"every process"):
        generate_completions(module.policy, module.tokenizer, [], greedy=True, synced=True)


def test_a_rank_outside_the_world_is_refused(random_model_dir: Path) -> None:
    module = build(random_model_dir)
    batch = ValidationBatch(0, module.task.validation_examples(1))
    with pytest.raises(ValueError, match=r"rank must be < world_size=2; got 2"):
        evaluate_share(module.policy, module.tokenizer, module.task, batch, SETTINGS,
                       EvaluationTotals(SETTINGS), max_new_tokens=MAX_NEW_TOKENS, rank=2,
                       world_size=2)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
