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


@pytest.mark.parametrize("spelling", [["--model.optimizer=Adam"],
                                      ["--model.optimizer", "RMSprop"],
                                      ["--model.optimizer.class_path=Adagrad"],
                                      ["--model.optimizer=AdamW"]])
def test_a_bare_optimizer_name_is_torch_s_class(tmp_path, random_model_dir, spelling) -> None:
    import bitsandbytes.optim
    name = spelling[-1].rpartition("=")[2]
    assert hasattr(bitsandbytes.optim, name)  # a second class of that name, also importable
    cli = TrustRegionCLI(args=["--config", str(_config(tmp_path, random_model_dir)),
                               *spelling], run=False)
    optimizer = cli.model.configure_optimizers()["optimizer"]
    assert type(optimizer) is getattr(torch.optim, name)
    assert cli.model.hparams["optimizer"]["class_path"] == f"torch.optim.{name}"


def test_a_bare_optimizer_name_on_the_real_command_line(tmp_path, random_model_dir,
                                                       monkeypatch) -> None:
    # `trustregion fit ...` from a shell: the CLI reads sys.argv itself
    monkeypatch.setattr("sys.argv", ["trustregion", "--config",
                                     str(_config(tmp_path, random_model_dir)),
                                     "--model.optimizer=SGD"])
    cli = TrustRegionCLI(run=False)
    assert type(cli.model.configure_optimizers()["optimizer"]) is torch.optim.SGD


def test_print_config_has_no_top_level_optimizer(tmp_path, random_model_dir, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(_config(tmp_path, random_model_dir)), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "optimizer" not in printed and "lr_scheduler" not in printed
    assert printed["model"]["optimizer"]["class_path"] == "trustregion.optim.AdamW"


def _with_optimizer(path: Path, optimizer: dict) -> Path:
    config = yaml.safe_load(path.read_text())
    config["model"]["optimizer"] = optimizer
    path.write_text(yaml.safe_dump(config))
    return path


def test_adamw8bit_from_a_config_trains_with_uint8_moments(tmp_path, random_model_dir) -> None:
    import bitsandbytes as bnb
    # The test model's q_proj weight holds 32 · 32 = 1024 elements: with min_8bit_size 1024 its
    # moments are 8-bit; the final norm's 32 elements stay fp32.
    path = _with_optimizer(_config(tmp_path, random_model_dir), {
        "class_path": "bitsandbytes.optim.AdamW8bit",
        "init_args": {"lr": 3e-4, "min_8bit_size": 1024}})
    cli = TrustRegionCLI(args=["fit", "--config", str(path)])
    assert cli.trainer.global_step == 1
    (optimizer,) = cli.trainer.optimizers
    assert type(optimizer) is bnb.optim.AdamW8bit
    assert optimizer.param_groups[0]["lr"] == 3e-4
    parameters = dict(cli.model.policy.named_parameters())
    large = optimizer.state[parameters["model.layers.0.self_attn.q_proj.weight"]]
    assert large["step"] == 1
    assert large["state1"].dtype == large["state2"].dtype == torch.uint8
    assert optimizer.state[parameters["model.norm.weight"]]["state1"].dtype == torch.float32
    assert cli.model.hparams["optimizer"]["class_path"] == "bitsandbytes.optim.AdamW8bit"


def test_an_optimizer_class_keeps_the_default_rate_and_weight_decay(tmp_path,
                                                                    random_model_dir) -> None:
    # bitsandbytes' own defaults are lr 1e-3 and weight decay 0.01; settings the config leaves
    # out keep those of the default optimiser (trustregion.optim.AdamW: 1e-4 and 0)
    path = _with_optimizer(_config(tmp_path, random_model_dir),
                           {"class_path": "bitsandbytes.optim.AdamW8bit"})
    cli = TrustRegionCLI(args=["--config", str(path)], run=False)
    optimizer = cli.model.configure_optimizers()["optimizer"]
    assert optimizer.defaults["lr"] == 1e-4 and optimizer.defaults["weight_decay"] == 0.0
