"""Every way a user might pick the optimiser on the command line either works or is refused
while parsing, with the setting to use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from cli_configs import tiny_cli_config

from trustregion.cli import TrustRegionCLI, main


def _config(tmp_path: Path, random_model_dir: Path) -> Path:
    return tiny_cli_config(tmp_path, random_model_dir, max_new_tokens=3,
                           trainer={"enable_checkpointing": False})


@pytest.mark.parametrize(("given", "name", "part", "short", "example"), [
    (["--optimizer=SGD"], "--optimizer", "optimizer", "SGD", "torch.optim.SGD"),
    (["--optimizer", "torch.optim.SGD"], "--optimizer", "optimizer", "SGD", "torch.optim.SGD"),
    (["--optimizer.lr=0.1"], "--optimizer.lr", "optimizer", "SGD", "torch.optim.SGD"),
    (["--lr_scheduler=StepLR"], "--lr_scheduler", "lr_scheduler", "StepLR",
     "torch.optim.lr_scheduler.StepLR"),
])
def test_top_level_optimizer_is_refused_with_the_model_setting(
        tmp_path, random_model_dir, capsys, given, name, part, short, example) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(_config(tmp_path, random_model_dir)), *given])
    assert exit_info.value.code == 2
    assert (f"{name} is not a setting of trustregion: the {part} belongs to the model. Use "
            f"--model.{part}={short} (a torch class name, or a full class path such as "
            f"{example}) and set its arguments with --model.{part}.init_args.NAME=VALUE"
            ) in capsys.readouterr().err


@pytest.mark.parametrize("spelling", ["SGD", "torch.optim.SGD"])
def test_model_optimizer_by_name_or_class_path_is_used(tmp_path, random_model_dir,
                                                       spelling: str) -> None:
    cli = TrustRegionCLI(args=["--config", str(_config(tmp_path, random_model_dir)),
                               f"--model.optimizer={spelling}",
                               "--model.optimizer.init_args.lr=0.03",
                               "--model.lr_scheduler=StepLR",
                               "--model.lr_scheduler.init_args.step_size=2"], run=False)
    configured = cli.model.configure_optimizers()
    optimizer = configured["optimizer"]
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["lr"] == 0.03
    scheduler = configured["lr_scheduler"]["scheduler"]
    assert type(scheduler) is torch.optim.lr_scheduler.StepLR and scheduler.step_size == 2
    # the module's own configure_optimizers is used, never one the CLI substitutes
    assert "configure_optimizers" not in vars(cli.model)


def test_print_config_has_no_top_level_optimizer(tmp_path, random_model_dir, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(_config(tmp_path, random_model_dir)), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "optimizer" not in printed and "lr_scheduler" not in printed
    assert printed["model"]["optimizer"]["class_path"] == "trustregion.optim.AdamW"
