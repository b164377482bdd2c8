"""Held-out evaluation: the pass@k estimator, the settings, the sums across processes, validation
during ``fit``, ``trustregion validate`` on a checkpoint, and the command's subcommands."""

from __future__ import annotations

import csv
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from row_logger import RowLogger

from trustregion.batching import BatchSettings
from trustregion.cli import main
from trustregion.evaluation import (
    EvaluationSettings,
    EvaluationTotals,
    check_schedule,
    evaluate,
    pass_at_k,
    rank_share,
    validation_batches,
)
from trustregion.module import TrustRegionModule
from trustregion.optim import AdamW
from trustregion.rollout import SamplingSettings
from trustregion.tasks import Arithmetic, Example, RewardFn


def digit_share(completions: list[str], examples: list[Example]) -> list[float]:
    """Fraction of a completion's characters that are digits: a reward a random model earns."""
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in completions]


class DigitArithmetic(Arithmetic):
    """Arithmetic prompts rewarded by :func:`digit_share`."""

    @property
    def reward_function(self) -> RewardFn:
        return digit_share


def first_char_code(completions: list[str], examples: list[Example]) -> list[float]:
    """(code of the first character mod 5) / 4, 0 for an empty completion: varied rewards even
    for the greedy completions of a random model."""
    return [(ord(text[0]) % 5) / 4 if text else 0.0 for text in completions]


class CodeArithmetic(Arithmetic):
    """Arithmetic prompts rewarded by :func:`first_char_code`."""

    @property
    def reward_function(self) -> RewardFn:
        return first_char_code


# --------------------------------------------------------------------------------- pass@k
@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (4, 1, 2, 0.5),      # 1 − C(3,2)/C(4,2) = 1 − 3/6
    (5, 2, 1, 0.4),      # 1 − C(3,1)/C(5,1) = 1 − 3/5 = c/n
    (5, 2, 3, 0.9),      # 1 − C(3,3)/C(5,3) = 1 − 1/10
    (5, 0, 3, 0.0),      # no correct sample
    (4, 3, 2, 1.0),      # n − c = 1 < k: every pair holds a correct one
    (10, 3, 10, 1.0),    # all samples drawn
])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k, expected) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("args", "message"), [
    ((4, 1, 5), r"k must be ≤ n \(pass@k needs at least k samples\); got k=5, n=4"),
    ((4, 5, 1), r"c must be ≤ n; got c=5, n=4"),
    ((4, 1, 0), r"k must be an integer ≥ 1; got 0"),
])
def test_pass_at_k_refuses_impossible_counts(args, message) -> None:
    with pytest.raises(ValueError, match=message):
        pass_at_k(*args)


# ------------------------------------------------------------------------------- settings
def test_settings_keys_follow_the_decoding() -> None:
    assert EvaluationSettings().keys == ["val/greedy_reward_mean", "val/greedy_pass@1"]
    sampled = EvaluationSettings(greedy=False, samples=4)
    assert sampled.ks == (1, 4)  # pass_k left out: 1 and samples
    assert sampled.keys == ["val/reward_mean", "val/pass@1", "val/pass@4"]
    both = EvaluationSettings(samples=8, pass_k=[8, 2])
    assert both.pass_k == (8, 2) and both.ks == (2, 8)
    assert both.config()["pass_k"] == [8, 2]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"greedy": False}, r"needs greedy: true or samples ≥ 1"),
    ({"samples": 4, "pass_k": [1, 5]}, r"every pass_k must be ≤ samples=4 .*got \[5\]"),
    ({"samples": 4, "pass_k": [2, 2]}, r"pass_k must not repeat; got \[2, 2\]"),
    ({"temperature": 0.7}, r"temperature=0.7 only apply to sampled decoding; set samples ≥ 1"),
    ({"pass_k": [1]}, r"pass_k=\[1\] only apply to sampled decoding"),
    ({"prompts": 0}, r"prompts must be an integer ≥ 1 \(held-out prompts per evaluation\)"),
    ({"samples": 2, "top_p": 0.0}, r"top_p must be a finite number in \(0.0, 1.0\]"),
    ({"batch_size": 0}, r"batch_size must be an integer ≥ 1"),
    ({"greedy": "yes"}, r"greedy must be True or False"),
])
def test_settings_refuse_bad_values(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        EvaluationSettings(**kwargs)


# ---------------------------------------------------------------------------- the totals
def test_totals_give_the_means_by_hand() -> None:
    totals = EvaluationTotals(EvaluationSettings(samples=2))
    totals.add_greedy([1.0, 0.0, 0.5, 1.0])
    totals.add_sampled([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    metrics = {k: float(v) for k, v in totals.metrics().items()}
    assert metrics == pytest.approx({
        "val/greedy_reward_mean": 2.5 / 4,     # (1 + 0 + 0.5 + 1) / 4
        "val/greedy_pass@1": 2 / 4,            # two rewards reach correct_at = 1
        "val/reward_mean": 3 / 6,              # three 1s among six samples
        "val/pass@1": (0.5 + 0 + 1) / 3,       # c/n per prompt
        "val/pass@2": (1 + 0 + 1) / 3,         # any correct of both samples
    })


def test_totals_are_summed_across_processes_before_the_means() -> None:
    settings = EvaluationSettings(greedy=False, samples=2, correct_at=0.5)
    first, second = EvaluationTotals(settings), EvaluationTotals(settings)
    first.add_sampled([[1.0, 1.0]])
    second.add_sampled([[0.0, 0.0], [0.0, 1.0]])
    other: dict[str, torch.Tensor] = {}

    def record(tensor: torch.Tensor, op: str) -> torch.Tensor:
        other[op] = tensor
        return tensor

    second.metrics(record)
    metrics = first.metrics(lambda tensor, op: tensor + other[op])
    # the whole list: rewards 1,1,0,0,0,1 → 3/6 (a mean of the two means would be 0.625)
    assert float(metrics["val/reward_mean"]) == pytest.approx(0.5)
    # pass@1 per prompt: 1, 0, 0.5 → 1.5/3; pass@2: 1, 0, 1 → 2/3
    assert float(metrics["val/pass@1"]) == pytest.approx(0.5)
    assert float(metrics["val/pass@2"]) == pytest.approx(2 / 3)


def test_batches_and_rank_shares_cover_every_prompt_once() -> None:
    examples = [Example(f"{i}+0=", str(i)) for i in range(7)]
    batches = list(validation_batches(examples, 3))
    assert [b.index for b in batches] == [0, 1, 2]
    assert [len(b.examples) for b in batches] == [3, 3, 1]
    shares = [rank_share(batches[0].examples, rank, 2) for rank in range(2)]
    assert shares == [[examples[0], examples[2]], [examples[1]]]


# ----------------------------------------------------------------------- the trainer check
@pytest.mark.parametrize(("settings", "trainer", "message"), [
    (EvaluationSettings(), {"val_check_interval": 1.0, "check_val_every_n_epoch": None},
     r"set val_check_interval to an integer ≥ 1; got 1.0"),
    (EvaluationSettings(), {"val_check_interval": 5, "check_val_every_n_epoch": 1},
     r"needs trainer.check_val_every_n_epoch: null"),
    (EvaluationSettings(), {"val_check_interval": 5, "check_val_every_n_epoch": None,
                            "limit_val_batches": 0.5},
     r"leave trainer.limit_val_batches at 1.0 \(the integer 1 would mean one batch\) and set "
     r"evaluation.prompts instead; got 0.5"),
    (EvaluationSettings(), {"val_check_interval": 5, "check_val_every_n_epoch": None,
                            "limit_val_batches": 1},  # Lightning: one batch, not all
     r"leave trainer.limit_val_batches at 1.0 .*; got 1$"),
    (None, {"val_check_interval": 5, "check_val_every_n_epoch": None},
     r"trainer.val_check_interval=5 asks for evaluation, but model.evaluation is null"),
])
def test_a_schedule_that_would_not_evaluate_is_refused(settings, trainer, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_schedule(settings, **{"limit_val_batches": 1.0, **trainer})


# --------------------------------------------------------------------- validation in fit
def _module(random_model_dir: Path, **overrides: Any) -> TrustRegionModule:
    torch.manual_seed(0)
    overrides.setdefault("task", DigitArithmetic())
    return TrustRegionModule(
        policy=f"config:{random_model_dir}",
        batching=BatchSettings(group_size=2, prompts_per_step=2),  # 1 optimiser step a batch
        sampling=SamplingSettings(max_new_tokens=4), **overrides)


SETTINGS = EvaluationSettings(prompts=6, samples=3, pass_k=[1, 2], correct_at=0.5,
                              batch_size=4)


def test_fit_evaluates_the_policy_every_val_check_interval_rollout_batches(
        random_model_dir, tmp_path) -> None:
    module = _module(random_model_dir, evaluation=SETTINGS, sync_every=100)
    trainer = L.Trainer(max_steps=5, val_check_interval=2, check_val_every_n_epoch=None,
                        logger=CSVLogger(tmp_path), log_every_n_steps=1,
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    trainer.fit(module)
    with open(Path(trainer.log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    val_rows = [row for row in rows if row["val/reward_mean"]]
    # rollout batches 0..4; evaluated after batches 1 and 3 (every 2nd), logged at their index
    assert [int(row["step"]) for row in val_rows] == [1, 3]
    keys = ["val/greedy_reward_mean", "val/greedy_pass@1", "val/reward_mean", "val/pass@1",
            "val/pass@2"]
    assert {k for k in rows[0] if k.startswith("val/")} == set(keys)
    for row in val_rows:  # a row of its own: the evaluation's values only
        assert {k for k, v in row.items() if v} == {*keys, "step", "epoch"}
    assert [int(r["step"]) for r in rows if r["reward/mean"]] == [0, 1, 2, 3, 4]
    logged = {k: float(trainer.callback_metrics[k]) for k in keys}  # ModelCheckpoint reads here
    assert logged == {k: pytest.approx(float(val_rows[-1][k])) for k in keys}


def test_validation_logs_at_the_trained_batch_and_scores_the_policy(random_model_dir,
                                                                    tmp_path) -> None:
    # the behaviour copy never syncs (sync_every=100), and a large rate moves the policy away
    module = _module(random_model_dir, evaluation=SETTINGS, sync_every=100,
                     optimizer=partial(AdamW, lr=0.05))
    trainer = L.Trainer(max_steps=4, val_check_interval=4, check_val_every_n_epoch=None,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(module)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    # evaluated after the last batch (index 3): exactly what the trained policy scores
    policy = evaluate(module.policy, module.tokenizer, module.task, SETTINGS,
                      max_new_tokens=4, seed=module.seed)
    assert logged == pytest.approx(policy)
    behavior = evaluate(module.behavior, module.tokenizer, module.task, SETTINGS,
                        max_new_tokens=4, seed=module.seed)
    assert behavior != policy


def test_fit_refuses_evaluation_without_an_integer_interval(random_model_dir) -> None:
    module = _module(random_model_dir, evaluation=EvaluationSettings(prompts=2))
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"set val_check_interval to an integer ≥ 1; got 1.0"):
        trainer.fit(module)


def test_validate_without_evaluation_settings_is_refused(random_model_dir) -> None:
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"validating needs evaluation settings: set "
                                         r"model.evaluation"):
        trainer.validate(_module(random_model_dir))


@pytest.mark.parametrize("limit", [0.25, 1])
def test_validate_scores_every_prompt_or_refuses(random_model_dir, limit) -> None:
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=limit)
    with pytest.raises(ValueError, match=rf"leave trainer.limit_val_batches at 1.0 .*; got "
                                         rf"{limit}$"):
        trainer.validate(_module(random_model_dir, evaluation=EvaluationSettings(prompts=4)))


def test_the_evaluations_own_max_new_tokens_must_fit_the_context(random_model_dir) -> None:
    # the tiny model's context is 64 tokens; an arithmetic prompt such as "12+7=" is at least 4,
    # so 4 + 61 > 64 whatever the prompts, while training's max_new_tokens (4) fits
    module = _module(random_model_dir,
                     evaluation=EvaluationSettings(prompts=4, max_new_tokens=61))
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"plus max_new_tokens=61 exceeds the model's context "
                                         r"of 64 tokens"):
        trainer.validate(module)


def test_a_task_without_a_held_out_split_fails_at_construction(random_model_dir) -> None:
    with pytest.raises(ValueError, match=r"holds no prompts out for validation"):
        _module(random_model_dir, task=Arithmetic(validation_fraction=0),
                evaluation=EvaluationSettings())


def test_hparams_hold_the_evaluation_settings(random_model_dir) -> None:
    assert _module(random_model_dir).hparams["evaluation"] is None
    module = _module(random_model_dir, evaluation=SETTINGS)
    assert module.hparams["evaluation"] == {
        "prompts": 6, "greedy": True, "samples": 3, "temperature": 1.0, "top_p": 1.0,
        "pass_k": [1, 2], "correct_at": 0.5, "batch_size": 4, "max_new_tokens": None}


# ------------------------------------------------------------------------ the command line
def _config(tmp_path: Path, random_model_dir: Path) -> Path:
    config = {
        "trainer": {"max_steps": 3, "logger": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path), "val_check_interval": 2,
                    "check_val_every_n_epoch": None},
        "model": {"policy": f"config:{random_model_dir}",
                  "task": {"class_path": f"{__name__}.DigitArithmetic"},
                  "batching": {"group_size": 2, "prompts_per_step": 2},
                  "sampling": {"max_new_tokens": 4},
                  "optimizer": {"class_path": "trustregion.optim.AdamW",
                                "init_args": {"lr": 0.05}},  # large: the outputs change
                  "evaluation": SETTINGS.config()},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_validate_evaluates_a_checkpoint(tmp_path, random_model_dir, capsys) -> None:
    path = _config(tmp_path, random_model_dir)
    main(["fit", "--config", str(path)])
    (checkpoint,) = tmp_path.rglob("last.ckpt")
    capsys.readouterr()
    main(["validate", "--config", str(path), "--ckpt_path", str(checkpoint)])
    printed = dict(line.split() for line in capsys.readouterr().out.splitlines()
                   if line.startswith("val/"))
    loaded = TrustRegionModule.load_from_checkpoint(checkpoint)
    direct = evaluate(loaded.policy, loaded.tokenizer, loaded.task, SETTINGS, max_new_tokens=4,
                      seed=loaded.seed)
    assert set(printed) == set(SETTINGS.keys)
    assert {k: float(v) for k, v in printed.items()} == pytest.approx(direct, abs=1e-5)
    untrained = evaluate(_module(random_model_dir).policy, loaded.tokenizer, loaded.task,
                         SETTINGS, max_new_tokens=4, seed=loaded.seed)
    assert untrained != direct  # the checkpoint's weights were evaluated, not fresh ones


def test_help_lists_every_command(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for command in ("fit", "validate", "'trustregion strategies'", "'trustregion plot RUN_DIR'",
                    "'trustregion predict --config FILE --ckpt_path CKPT"):
        assert command in text
    assert "{fit,validate,predict}" in text  # Lightning's test is not offered


@pytest.mark.parametrize("command", ["test"])
def test_removed_subcommands_say_what_to_use(command, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--config", "x.yaml"])
    assert exit_info.value.code == 2
    assert f"trustregion has no {command} stage: evaluate held-out prompts with 'trustregion " \
           "validate --config FILE --ckpt_path CKPT'" in capsys.readouterr().err


def test_two_ranks_evaluate_what_one_process_does(random_model_dir, tmp_path) -> None:
    # 5 prompts: rank 0 scores 3 of them, rank 1 two; greedy decoding does not depend on the
    # split, so the sums over both ranks give the one-process values exactly
    settings = EvaluationSettings(prompts=5, batch_size=5, correct_at=0.5)
    module = _module(random_model_dir, evaluation=settings, task=CodeArithmetic())
    L.Trainer(accelerator="cpu", strategy="ddp_spawn", devices=2, logger=RowLogger(tmp_path),
              enable_progress_bar=False, enable_model_summary=False).validate(module)
    rows = [torch.load(tmp_path / f"rows{rank}.pt") for rank in (0, 1)]
    assert rows[0] == rows[1]  # every rank holds the global values
    ((step, logged),) = rows[0]
    assert step == 0  # nothing trained yet
    single = evaluate(module.policy, module.tokenizer, module.task, settings, max_new_tokens=4)
    assert 0 < single["val/greedy_reward_mean"] < 1  # not a trivial all-0 or all-1 case
    assert {k: v for k, v in logged.items() if k != "epoch"} == pytest.approx(single)
