from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from trustregion.cli import TrustRegionCLI, describe_strategies, main
from trustregion.specs import to_spec
from trustregion.strategies import DRPO, RatioClip, available_strategies


def _config(tmp_path: Path, random_model_dir: Path, **model) -> Path:
    config = {
        "trainer": {"max_steps": 1, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False},
        "model": {"policy": f"config:{random_model_dir}", "group_size": 2,
                  "prompts_per_step": 2, "max_new_tokens": 3, **model},
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
                                             "epsilon_high": 0.28, "dual_clip": None,
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
        "delta_high": None, "tis_cap": 10.0, "top_k": 8, "anchor": "behavior"}
    assert printed["model"]["task"]["name"] == "arithmetic"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.trust_region=drpoo", "unknown trust-region strategy 'drpoo'. Did you mean"),
        ("--model.task=arithmatic", "unknown task 'arithmatic'"),
        ("--model.lrr=0.1", "unrecognized arguments: --model.lrr"),
        ("--model.trust_region={name: drpo, delta: -1}", "delta must be > 0"),
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


@pytest.mark.parametrize(("trust_region", "stored"), [
    ({"name": "dppo", "divergence": "binary_kl", "delta": 0.1},
     {"name": "dppo", "divergence": "binary_kl", "delta": 0.1, "delta_low": None,
      "delta_high": None, "tis_cap": 10.0, "top_k": 8, "anchor": "behavior"}),
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
    config = yaml.safe_load(path.read_text())
    config["trainer"].update(enable_checkpointing=True, default_root_dir=str(tmp_path))
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    (checkpoint,) = (tmp_path / "checkpoints").glob("*.ckpt")
    hparams = torch.load(checkpoint, weights_only=True)["hyper_parameters"]
    assert hparams["trust_region"] == stored
    assert hparams["task"] == {"name": "digit_sort", "min_len": 4, "max_len": 5,
                               "partial_credit": False, "prompt_style": "compact"}

    cli = TrustRegionCLI(args=["fit", "--config", str(path), "--trainer.max_steps=2",
                               f"--ckpt_path={checkpoint}"])
    assert cli.trainer.global_step == 2  # one step restored, one trained
    assert to_spec(cli.model.trust_region) == stored  # same class, same settings
    assert to_spec(cli.model.task) == hparams["task"]
