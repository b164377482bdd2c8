from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from trustregion.cli import TrustRegionCLI, describe_strategies, main
from trustregion.optim import AdamW, LinearWarmup
from trustregion.penalties import EntropyBonus, ReferenceKL
from trustregion.specs import to_spec
from trustregion.strategies import DRPO, RatioClip, available_strategies

SGD_STEP_LR = {
    "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9}},
    "lr_scheduler": {"class_path": "torch.optim.lr_scheduler.StepLR",
                     "init_args": {"step_size": 1, "gamma": 0.5}},
}
PENALTIES = [
    {"class_path": "trustregion.penalties.ReferenceKL",
     "init_args": {"beta": 0.05, "estimator": "k2"}},
    {"class_path": "trustregion.penalties.EntropyBonus", "init_args": {"coef": 0.01}},
]


def _config(tmp_path: Path, random_model_dir: Path, **model) -> Path:
    config = {
        "trainer": {"max_steps": 1, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "default_root_dir": str(tmp_path)},
        "model": {"policy": f"config:{random_model_dir}",
                  "batching": {"group_size": 2, "prompts_per_step": 2},
                  "sampling": {"max_new_tokens": 3}, **model},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_strategy_by_name_with_settings(tmp_path, random_model_dir) -> None:
    path = _config(tmp_path, random_model_dir,
                   trust_region={"name": "ratio_clip", "epsilon_high": 0.28})
    module = TrustRegionCLI(args=["--config", str(path)], run=False).model
    assert isinstance(module.trust_region, RatioClip)
    assert module.trust_region.hparams() == {"epsilon": 0.2, "epsilon_low": None,
                                             "epsilon_high": 0.28, "dual_clip_cap": math.inf,
                                             "anchor": "behavior"}


def test_strategy_by_class_path(tmp_path, random_model_dir) -> None:
    path = _config(tmp_path, random_model_dir, trust_region={
        "class_path": "trustregion.strategies.drpo.DRPO", "init_args": {"delta": 0.2}})
    module = TrustRegionCLI(args=["--config", str(path)], run=False).model
    assert isinstance(module.trust_region, DRPO) and module.trust_region.delta == 0.2


def test_print_config_shows_every_resolved_hyperparameter(tmp_path, random_model_dir,
                                                          capsys) -> None:
    path = _config(tmp_path, random_model_dir, trust_region="dppo")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["trust_region"] == {
        "name": "dppo", "divergence": "binary_tv", "delta": 0.15, "delta_low": None,
        "delta_high": None, "importance_weight_cap": 10.0, "divergence_top_k": 8,
        "anchor": "behavior"}
    assert printed["model"]["task"]["name"] == "arithmetic"
    # the injected parts, resolved with every default
    assert printed["model"]["batching"] == {"group_size": 2, "prompts_per_step": 2,
                                            "ppo_epochs": 1, "mini_batch_size": 64,
                                            "micro_batch_size": None}
    assert printed["model"]["sampling"] == {"temperature": 1.0, "top_p": 1.0, "top_k": 0,
                                            "max_new_tokens": 3, "sampler": "lean",
                                            "ignore_eos": False}
    assert printed["model"]["penalties"] is None
    assert printed["model"]["optimizer"] == {
        "class_path": "trustregion.optim.AdamW",
        "init_args": {"lr": 0.0001, "betas": [0.9, 0.999], "eps": 1e-08, "weight_decay": 0.0,
                     "fused": None}}
    assert printed["model"]["lr_scheduler"] == {"class_path": "trustregion.optim.LinearWarmup",
                                                "init_args": {"warmup_steps": 0}}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.trust_region=drpoo", "unknown trust-region strategy 'drpoo'. Did you mean"),
        ("--model.task=arithmatic", "unknown task 'arithmatic'"),
        ("--model.lrr=0.1", "unrecognized arguments: --model.lrr"),
        ("--model.trust_region={name: drpo, delta: -1}", "delta must be > 0"),
        # the flat settings that became parts are not accepted any more
        ("--model.group_size=4", "unrecognized arguments: --model.group_size"),
        ("--model.max_new_tokens=4", "unrecognized arguments: --model.max_new_tokens"),
        ("--model.kl_coef=0.1", "unrecognized arguments: --model.kl_coef"),
        ("--model.warmup_steps=3", "unrecognized arguments: --model.warmup_steps"),
        # types are checked while parsing
        ("--model.sampling.top_p=high", 'Parser key "model.sampling.top_p"'),
        ("--model.batching.group_size=two", 'Parser key "model.batching.group_size"'),
        ("--model.optimizer=torch.optim.Adamx", "module 'torch.optim' has no attribute 'Adamx'"),
        ("--model.penalties=[{class_path: trustregion.penalties.ReferenceKL, "
         "init_args: {estimator: k5}}]", "Expected a typing.Literal['k1', 'k2', 'k3']"),
    ],
)
def test_bad_configs_fail_before_training(tmp_path, random_model_dir, capsys, override,
                                          message) -> None:
    path = _config(tmp_path, random_model_dir)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), override])
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err


def test_strategies_command_lists_every_strategy(capsys) -> None:
    main(["strategies"])
    out = capsys.readouterr().out
    assert out.strip() == describe_strategies().strip()
    for name in available_strategies():
        assert f"\n{name} " in f"\n{out}"
    assert "delta=0.15" in out and "epsilon_high=0.28" in out


class WiderDRPO(DRPO):
    """An unregistered strategy: the CLI and checkpoints name it by class path."""


def _fit_with_checkpoint(path: Path, root: Path) -> tuple[Path, dict[str, Any]]:
    """Train the config at ``path`` with checkpointing under ``root``; return the checkpoint
    and the hyperparameters stored in it."""
    config = yaml.safe_load(path.read_text())
    config["trainer"].update(enable_checkpointing=True, default_root_dir=str(root))
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    (checkpoint,) = (root / "checkpoints").glob("rollout=*.ckpt")  # beside it: last.ckpt
    return checkpoint, torch.load(checkpoint, weights_only=True)["hyper_parameters"]


@pytest.mark.parametrize(("trust_region", "stored"), [
    ({"name": "dppo", "divergence": "binary_kl", "delta": 0.1},
     {"name": "dppo", "divergence": "binary_kl", "delta": 0.1, "delta_low": None,
      "delta_high": None, "importance_weight_cap": 10.0, "divergence_top_k": 8,
      "anchor": "behavior"}),
    ({"class_path": f"{__name__}.WiderDRPO", "init_args": {"delta": 0.3}},
     {"class_path": f"{__name__}.WiderDRPO",
      "init_args": {"delta": 0.3, "delta_low": None, "delta_high": None, "anchor": "behavior"}}),
])
def test_fit_resumes_from_a_checkpoint_through_the_cli(tmp_path, random_model_dir, trust_region,
                                                      stored) -> None:
    # Lightning's CLI rebuilds the module from the checkpoint's hyperparameters on --ckpt_path,
    # so the strategy and the task must be stored in a form the config parser reads back.
    path = _config(tmp_path, random_model_dir, trust_region=trust_region,
                   task={"name": "digit_sort", "min_len": 4})
    checkpoint, hparams = _fit_with_checkpoint(path, tmp_path)
    assert hparams["trust_region"] == stored
    assert hparams["task"] == {"name": "digit_sort", "min_len": 4, "max_len": 5,
                               "partial_credit": False, "prompt_style": "compact",
                               "validation_fraction": 0.125}

    cli = TrustRegionCLI(args=["fit", "--config", str(path), "--trainer.max_steps=2",
                               f"--ckpt_path={checkpoint}"])
    assert cli.trainer.global_step == 2  # one step restored, one trained
    assert to_spec(cli.model.trust_region) == stored  # same class, same settings
    assert to_spec(cli.model.task) == hparams["task"]


# ------------------------------------------------------------------------- trustregion plot
def test_plot_command_draws_a_run_and_prints_the_paths(tmp_path, capsys) -> None:
    version = tmp_path / "csv" / "version_0"
    version.mkdir(parents=True)
    (version / "metrics.csv").write_text("epoch,step,reward/mean,trust_region/outside_frac\n"
                                         "0,0,0.25,0.0\n0,1,0.5,0.125\n")
    main(["plot", str(tmp_path)])
    assert capsys.readouterr().out.split() == [str(version / "plots" / "reward.png"),
                                               str(version / "plots" / "drift.png")]


def test_plot_command_errors(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert "no such run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", "--help"])
    assert exit_info.value.code == 0
    assert "usage: trustregion plot" in capsys.readouterr().out
    # a metrics.csv without any value: nothing to draw, status 1
    (tmp_path / "metrics.csv").write_text("step,foo\n0,\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(tmp_path)])
    assert exit_info.value.code == 1
    assert f"nothing to draw in {tmp_path}" in capsys.readouterr().err
    # a run file that is not YAML is reported, not passed over
    (tmp_path / "metrics.csv").write_text("step,reward/mean\n0,1.0\n")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "token_samples.csv").write_text(
        "step,delta,weight,adv_sign,mu\n0,0.1,1,1,0.5\n")
    (tmp_path / "hparams.yaml").write_text("trust_region: [unclosed\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "hparams.yaml is not valid YAML" in capsys.readouterr().err


@pytest.mark.parametrize(("override", "message"), [
    ("--model.sampling.top_p=1.5",
     r"top_p must be a finite number in \(0.0, 1.0\] \(1 turns it off\); got 1.5"),
    ("--model.sampling.temperature=0",
     r"temperature must be a finite number in \(0.0, inf\); got 0.0"),
    ("--model.batching.group_size=1", "group_size must be ≥ 2"),
    ("--model.batching.mini_batch_size=0", "mini_batch_size must be an integer ≥ 1; got 0"),
    ("--model.penalties=[{class_path: trustregion.penalties.ReferenceKL, "
     "init_args: {beta: -1}}]", "ReferenceKL beta must be a finite number ≥ 0; got -1.0"),
    ("--model.penalties=[{class_path: trustregion.penalties.EntropyBonus, "
     "init_args: {coef: -0.5}}]", "EntropyBonus coef must be a finite number ≥ 0; got -0.5"),
    ("--model.optimizer.init_args.lr=0",
     "the optimizer's learning rate must be a finite number > 0; got 0.0"),
    ("--model.optimizer={class_path: torch.optim.SGD, init_args: {lr: -1}}",
     "the optimizer could not be built on the policy's parameters: Invalid learning rate"),
    ("--model.lr_scheduler={class_path: trustregion.optim.LinearWarmup, "
     "init_args: {warmup_steps: -2}}",
     r"the lr_scheduler could not be built: warmup_steps must be an integer ≥ 0 \(0: no "
     r"warm-up\); got -2"),
])
def test_bad_values_are_refused_when_the_module_is_built(tmp_path, random_model_dir, override,
                                                         message) -> None:
    path = _config(tmp_path, random_model_dir)
    given = path.read_text()
    with pytest.raises(ValueError, match=message):
        main(["fit", "--config", str(path), override])
    # refused before fitting started: the run's resolved config was never saved over it
    assert path.read_text() == given


def test_optimizer_and_scheduler_by_class_path_reach_the_trainer(tmp_path,
                                                                 random_model_dir) -> None:
    # 2 prompts × 2 completions = 4 sequences, one mini-batch: 1 optimiser step per rollout
    # batch; StepLR halves the rate after every step: 0.05 → 0.025 → 0.0125.
    path = _config(tmp_path, random_model_dir, **SGD_STEP_LR)
    config = yaml.safe_load(path.read_text())
    config["trainer"]["max_steps"] = 2
    path.write_text(yaml.safe_dump(config))
    cli = TrustRegionCLI(args=["fit", "--config", str(path)])
    (optimizer,) = cli.trainer.optimizers
    assert type(optimizer) is torch.optim.SGD
    (group,) = optimizer.param_groups
    assert group["momentum"] == 0.9 and group["initial_lr"] == 0.05
    assert group["lr"] == pytest.approx(0.0125)
    assert all(p is q for p, q in zip(group["params"], cli.model.policy.parameters(),
                                      strict=True))
    (scheduler_config,) = cli.trainer.lr_scheduler_configs
    scheduler = scheduler_config.scheduler
    assert type(scheduler) is torch.optim.lr_scheduler.StepLR
    assert scheduler.step_size == 1 and scheduler.gamma == 0.5
    assert scheduler_config.interval == "step"  # stepped once per optimiser step
    assert scheduler.last_epoch == 2
    assert float(cli.trainer.callback_metrics["train/lr"]) == pytest.approx(0.0125)


def test_default_optimizer_and_scheduler(tmp_path, random_model_dir) -> None:
    module = TrustRegionCLI(args=["--config", str(_config(tmp_path, random_model_dir))],
                            run=False).model
    optimizer = module.optimizer_factory(module.policy.parameters())
    assert type(optimizer) is AdamW
    assert optimizer.param_groups[0]["lr"] == 1e-4
    assert optimizer.param_groups[0]["weight_decay"] == 0.0
    scheduler = module.lr_scheduler_factory(optimizer)
    assert type(scheduler) is LinearWarmup and scheduler.warmup_steps == 0


def test_penalties_from_yaml_build_the_reference_and_log_their_keys(tmp_path,
                                                                    random_model_dir) -> None:
    path = _config(tmp_path, random_model_dir, penalties=PENALTIES)
    config = yaml.safe_load(path.read_text())
    config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                   "init_args": {"save_dir": str(tmp_path), "name": "run",
                                                 "version": 0}}
    path.write_text(yaml.safe_dump(config))
    cli = TrustRegionCLI(args=["fit", "--config", str(path)])
    module = cli.model
    kl, entropy = module.penalties
    assert isinstance(kl, ReferenceKL) and (kl.beta, kl.estimator, kl.in_reward) == \
        (0.05, "k2", False)
    assert isinstance(entropy, EntropyBonus) and entropy.coef == 0.01
    assert module.reference is not None  # ReferenceKL needs the frozen reference model
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    assert float(row["penalty/ref_kl"]) >= 0.0  # k2 = x²/2 ≥ 0
    assert float(row["penalty/entropy"]) > 0.0  # a random model's entropy, in nats
    assert "reward/penalty" not in row  # neither penalty is applied to the reward

    plain = TrustRegionCLI(args=["--config", str(_config(tmp_path, random_model_dir))],
                           run=False).model
    assert plain.penalties == [] and plain.reference is None


def test_resume_through_the_cli_rebuilds_optimizer_scheduler_and_penalties(
        tmp_path, random_model_dir) -> None:
    path = _config(tmp_path, random_model_dir, penalties=PENALTIES, **SGD_STEP_LR)
    checkpoint, hparams = _fit_with_checkpoint(path, tmp_path)
    # every part in a form the config parser reads back
    assert hparams["optimizer"]["class_path"] == "torch.optim.SGD"
    assert hparams["optimizer"]["init_args"]["momentum"] == 0.9
    assert hparams["lr_scheduler"]["class_path"] == "torch.optim.lr_scheduler.StepLR"
    assert hparams["lr_scheduler"]["init_args"]["gamma"] == 0.5
    assert [p["class_path"] for p in hparams["penalties"]] == [
        "trustregion.penalties.ReferenceKL", "trustregion.penalties.EntropyBonus"]
    assert hparams["batching"]["group_size"] == 2 and hparams["sampling"]["max_new_tokens"] == 3

    cli = TrustRegionCLI(args=["fit", "--config", str(path), "--trainer.max_steps=2",
                               f"--ckpt_path={checkpoint}"])
    assert cli.trainer.global_step == 2  # one step restored, one trained
    (optimizer,) = cli.trainer.optimizers
    assert type(optimizer) is torch.optim.SGD and optimizer.param_groups[0]["momentum"] == 0.9
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0125)  # the schedule continued
    assert [type(p) for p in cli.model.penalties] == [ReferenceKL, EntropyBonus]
    assert cli.model.reference is not None
