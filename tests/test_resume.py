"""Resuming a run: settings that define the run are refused when they differ from the
checkpoint's, settings that may change take their new value and are reported; the module's
seed follows ``seed_everything``; a saved strategy spec always rebuilds the run."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
import yaml

import trustregion.specs as specs
from trustregion.batching import BatchSettings
from trustregion.checkpointing import read_checkpoint
from trustregion.cli import TrustRegionCLI, main
from trustregion.interface import StepOutput
from trustregion.module import TrustRegionModule
from trustregion.optim import LinearWarmup
from trustregion.resume import (
    Difference,
    apply_changed_settings,
    changed_init_args,
    defines_the_run,
    differences,
    refusal,
    run_seed,
)
from trustregion.rollout import SamplingSettings
from trustregion.specs import to_spec
from trustregion.strategies import DRPO, registry


def _without_global_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset Lightning's seed variables for this test and put them back afterwards."""
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        monkeypatch.setenv(name, "0")  # recorded first, so the old state comes back
        monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def no_global_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_global_seed(monkeypatch)


# ------------------------------------------------------------------------------ the rule
def test_differences_are_listed_by_dotted_key() -> None:
    checkpoint = {"trust_region": {"name": "drpo", "delta": 0.15},
                  "batching": {"group_size": 2, "ppo_epochs": 1},
                  "optimizer": {"class_path": "trustregion.optim.AdamW",
                                "init_args": {"lr": 1e-4, "betas": (0.9, 0.999)}}}
    given = {"trust_region": {"name": "drpo", "delta": 0.2},
             "batching": {"group_size": 4, "ppo_epochs": 1},
             "optimizer": {"class_path": "trustregion.optim.AdamW",
                           "init_args": {"lr": 0.05, "betas": [0.9, 0.999]}}}
    # a tuple equals its YAML list; the same class compares setting by setting
    assert differences(checkpoint, given, "model") == [
        Difference("model.trust_region.delta", 0.15, 0.2),
        Difference("model.batching.group_size", 2, 4),
        Difference("model.optimizer.init_args.lr", 1e-4, 0.05),
    ]
    # another class differs as a whole
    other = {**given, "trust_region": {"name": "ratio_clip", "epsilon": 0.2}}
    assert differences(checkpoint, other, "model")[0] == Difference(
        "model.trust_region", {"name": "drpo", "delta": 0.15},
        {"name": "ratio_clip", "epsilon": 0.2})


@pytest.mark.parametrize(("key", "run_defining"), [
    ("model.trust_region", True), ("model.trust_region.delta", True),
    ("model.task.min_len", True), ("model.policy", True), ("model.reference", True),
    ("model.penalties", True), ("model.batching.group_size", True),
    ("model.batching.prompts_per_step", True), ("model.advantage_estimator", True),
    ("model.aggregation", True), ("model.chat_template", True), ("model.pad_token", True),
    ("model.seed", True), ("model.optimizer", True), ("model.optimizer.class_path", True),
    ("model.lr_scheduler.class_path", True),
    ("model.optimizer.init_args.lr", False), ("model.optimizer.init_args.betas", False),
    ("model.lr_scheduler.init_args.warmup_steps", False), ("model.sampling.temperature", False),
    ("model.batching.ppo_epochs", False), ("model.batching.mini_batch_size", False),
    ("model.batching.micro_batch_size", False), ("model.max_grad_norm", False),
    ("model.sync_every", False), ("model.evaluation", False),
    ("trainer.max_steps", False), ("trainer.callbacks", False), ("trainer.logger", False),
    ("seed_everything", False),
    # a prefix match is a whole name, not a part of one
    ("model.sampling_extra", True), ("model.sync_every_n", True),
])
def test_which_settings_define_the_run(key: str, run_defining: bool) -> None:
    assert defines_the_run(key) is run_defining


def test_the_refusal_lists_every_difference() -> None:
    message = refusal("run/last.ckpt", [Difference("model.seed", 3, 1),
                                        Difference("model.batching.group_size", 2, 4)])
    lines = message.splitlines()
    assert lines[0] == ("cannot resume from run/last.ckpt: these settings define the run and "
                        "differ from the checkpoint's (checkpoint value → given value):")
    assert lines[1:3] == ["  model.seed: 3 → 1", "  model.batching.group_size: 2 → 4"]
    assert "config.yaml" in lines[3]


def test_changed_init_args_needs_the_same_class() -> None:
    sgd = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1, "momentum": 0.9}}
    assert changed_init_args(sgd, {**sgd, "init_args": {"lr": 0.1, "momentum": 0.5}}) == \
        {"momentum": 0.5}
    assert changed_init_args(sgd, {"class_path": "torch.optim.Adam", "init_args": {}}) == {}
    assert changed_init_args("<lambda>", sgd) == {}


def test_a_new_lr_keeps_the_schedule_factor() -> None:
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = LinearWarmup(optimizer, warmup_steps=4)  # factor (s + 1) / 4
    optimizer.step()
    scheduler.step()  # s = 1: lr = 0.1 · 2/4 = 0.05
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    checkpoint = {"optimizer": {"class_path": "torch.optim.SGD",
                                "init_args": {"lr": 0.1, "momentum": 0.0}},
                  "lr_scheduler": {"class_path": "trustregion.optim.LinearWarmup",
                                   "init_args": {"warmup_steps": 4}}}
    given = {"optimizer": {"class_path": "torch.optim.SGD",
                           "init_args": {"lr": 0.4, "momentum": 0.9}},
             "lr_scheduler": {"class_path": "trustregion.optim.LinearWarmup",
                              "init_args": {"warmup_steps": 8}}}
    apply_changed_settings(checkpoint, given, [optimizer], [scheduler])
    group = optimizer.param_groups[0]
    # the factor 0.05 / 0.1 = 1/2 is kept: 0.4 · 1/2 = 0.2; momentum set; base rate 0.4
    assert (group["lr"], group["momentum"], group["initial_lr"]) == \
        (pytest.approx(0.2), 0.9, 0.4)
    assert scheduler.base_lrs == [0.4] and scheduler.warmup_steps == 8
    optimizer.step()
    scheduler.step()  # s = 2 with the new warm-up: 0.4 · 3/8 = 0.15
    assert group["lr"] == pytest.approx(0.15)
    with pytest.raises(ValueError, match="optimizer setting 'nesterov_x' cannot change on "
                                         "resume: SGD holds no such setting"):
        apply_changed_settings(checkpoint, {"optimizer": {"class_path": "torch.optim.SGD",
                                                          "init_args": {"nesterov_x": True}}},
                               [optimizer], [scheduler])


# ------------------------------------------------------------------------------ the seed
def test_the_seed_follows_seed_everything_unless_given(monkeypatch) -> None:
    assert run_seed(None) == 0  # nothing seeded
    L.seed_everything(5)  # sets PL_GLOBAL_SEED (put back by the autouse fixture)
    assert run_seed(None) == 5
    assert run_seed(2) == 2
    with pytest.raises(ValueError, match=r"seed must be an integer ≥ 0 \(None: follow "
                                         r"seed_everything\); got -1"):
        run_seed(-1)


def _tiny_config(tmp_path: Path, policy: str, **model: Any) -> Path:
    config = {
        "trainer": {"max_steps": 1, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path)},
        "model": {"policy": policy, "batching": {"group_size": 2, "prompts_per_step": 2},
                  "sampling": {"max_new_tokens": 4}, **model},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class FirstRollout(L.Callback):
    """Keeps the prompts and completion tokens of the first rollout batch."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.tokens = torch.empty(0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = StepOutput.of(outputs)
        assert step is not None
        if not self.prompts:
            self.prompts = [example.prompt for example in step.rollout.examples]
            self.tokens = step.rollout.completion_ids.clone()


def _first_rollout(path: Path, *overrides: str) -> tuple[int, FirstRollout]:
    rollout = FirstRollout()
    cli = TrustRegionCLI(args=["fit", "--config", str(path), "--trainer.enable_checkpointing="
                               "false", *overrides], trainer_defaults={"callbacks": [rollout]})
    return cli.model.seed, rollout


def test_seed_everything_changes_the_rollouts(tmp_path) -> None:
    # The shipped tiny model: its weights are the same whatever the global seed, so only the
    # module's seed can make two runs differ.
    path = _tiny_config(tmp_path, "tiny-char-llama")
    seed_a, first = _first_rollout(path, "--seed_everything=1")
    seed_b, other = _first_rollout(path, "--seed_everything=2")
    seed_c, again = _first_rollout(path, "--seed_everything=1")
    seed_d, explicit = _first_rollout(path, "--seed_everything=2", "--model.seed=1")
    assert (seed_a, seed_b, seed_c, seed_d) == (1, 2, 1, 1)
    assert first.prompts != other.prompts
    assert not torch.equal(first.tokens, other.tokens)
    for same in (again, explicit):  # equal seeds, or an explicit model.seed, repeat the run
        assert same.prompts == first.prompts
        assert torch.equal(same.tokens, first.tokens)


# ------------------------------------------------------------------------ resuming (CLI)
class HalveLearningRate(L.Callback):
    """Halves the learning rate after the first rollout batch of a run, as
    ``CollapseGuard(action="lower_lr", lr_factor=0.5)`` does: every param group's rate and
    every scheduler's base rate."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step != 1:
            return
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] *= 0.5
        for config in trainer.lr_scheduler_configs:
            config.scheduler.base_lrs = [0.5 * lr for lr in config.scheduler.base_lrs]


def _checkpoint_in(root: Path) -> Path:
    directory = root / "checkpoints"
    last = directory / "last.ckpt"
    return last if last.is_file() else sorted(directory.glob("*.ckpt"))[-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory,
            random_model_dir: Path) -> Iterator[tuple[Path, Path]]:
    """One rollout batch (one optimiser step at lr 1e-4, then halved to 5e-5) of a run with
    ``seed_everything: 3``; returns its config and a copy of its checkpoint (resumed runs
    write theirs where the first one did) with the run's saved config.yaml beside it."""
    root = tmp_path_factory.mktemp("resume")
    config = {
        "seed_everything": 3,
        "trainer": {"max_steps": 1, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(root),
                    "callbacks": [{"class_path": f"{__name__}.HalveLearningRate"}]},
        "model": {"policy": f"config:{random_model_dir}",
                  "batching": {"group_size": 2, "prompts_per_step": 2},
                  "sampling": {"max_new_tokens": 3}},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.MonkeyPatch.context() as monkeypatch:
        _without_global_seed(monkeypatch)
        monkeypatch.setattr("sys.argv", ["trustregion"])  # module scope: before conftest's
        main(["fit", "--config", str(path)])
    kept = root / "kept"
    kept.mkdir()
    shutil.copy(root / "config.yaml", kept / "config.yaml")
    shutil.copy(_checkpoint_in(root), kept / "trained.ckpt")
    yield path, kept / "trained.ckpt"


def test_resume_refuses_settings_that_define_the_run(trained, capsys) -> None:
    path, checkpoint = trained
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), f"--ckpt_path={checkpoint}",
              "--model.trust_region={name: drpo, delta: 0.3}", "--model.task=reverse",
              "--model.batching.group_size=4", "--seed_everything=1",
              "--model.optimizer=torch.optim.SGD", "--model.optimizer.init_args.lr=0.1"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()  # the message alone, no traceback
    assert lines[0] == (f"trustregion: cannot resume from {checkpoint}: these settings define "
                        "the run and differ from the checkpoint's (checkpoint value → given "
                        "value):")
    task = lines[2].split(" → ")
    assert lines[1] == "  model.trust_region.delta: 0.15 → 0.3"
    assert task[0].startswith("  model.task: {'name': 'arithmetic',")
    assert task[1].startswith("{'name': 'reverse',")
    assert lines[3] == "  model.batching.group_size: 2 → 4"
    assert lines[4].startswith("  model.optimizer: {'class_path': 'trustregion.optim.AdamW'")
    assert "'class_path': 'torch.optim.SGD'" in lines[4]
    assert lines[5] == "  model.seed: 3 → 1"  # seed_everything moved the module's seed
    assert lines[6].startswith("Resume with the run's own settings")
    assert len(lines) == 7


def test_a_setting_that_does_not_exist_is_refused_on_resume(trained, capsys) -> None:
    # the learning rate is an optimiser setting: model.optimizer.init_args.lr
    path, checkpoint = trained
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), f"--ckpt_path={checkpoint}", "--model.lr=0.05"])
    assert exit_info.value.code != 0
    assert "--model.lr=0.05 could match --model.lr_scheduler" in capsys.readouterr().err


def test_the_saved_config_resumes_and_keeps_a_lowered_lr(trained, capsys) -> None:
    _, checkpoint = trained
    saved = yaml.safe_load((checkpoint.parent / "config.yaml").read_text())  # the first run's
    # the module's seed follows the resolved seed_everything when the config is reused
    assert (saved["seed_everything"], saved["model"]["seed"]) == (3, None)
    assert read_checkpoint(checkpoint)["hyper_parameters"]["seed"] == 3
    capsys.readouterr()
    cli = TrustRegionCLI(args=["fit", "--config", str(checkpoint.parent / "config.yaml"),
                               f"--ckpt_path={checkpoint}",
                               "--trainer.max_steps=2"])
    assert f"Resuming from {checkpoint} with changed settings:\n" \
           "  trainer.max_steps: 1 → 2\n" in capsys.readouterr().out
    assert cli.trainer.global_step == 2 and cli.model.seed == 3
    (optimizer,) = cli.trainer.optimizers
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-5)  # 1e-4 halved, kept


def test_a_new_lr_takes_effect_on_resume_and_is_reported(trained, capsys) -> None:
    path, checkpoint = trained
    capsys.readouterr()
    cli = TrustRegionCLI(args=["fit", "--config", str(path), f"--ckpt_path={checkpoint}",
                               "--trainer.max_steps=2", "--model.optimizer.init_args.lr=0.05",
                               "--model.sampling.temperature=0.5"])
    out = capsys.readouterr().out
    assert f"Resuming from {checkpoint} with changed settings:\n" \
           "  model.sampling.temperature: 1.0 → 0.5\n" \
           "  model.optimizer.init_args.lr: 0.0001 → 0.05\n" \
           "  trainer.max_steps: 1 → 2\n" in out
    assert cli.trainer.global_step == 2
    (optimizer,) = cli.trainer.optimizers
    # the constant schedule's factor is 1: the new rate replaces the halved 5e-5
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert float(cli.trainer.callback_metrics["train/lr"]) == pytest.approx(0.05)
    assert cli.model.sampling.temperature == 0.5


def test_fit_in_python_refuses_settings_that_define_the_run(trained, random_model_dir) -> None:
    _, checkpoint = trained
    module = TrustRegionModule(policy=f"config:{random_model_dir}",
                               batching=BatchSettings(group_size=4, prompts_per_step=2),
                               sampling=SamplingSettings(max_new_tokens=3),
                               trust_region=DRPO(delta=0.3), seed=3)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError) as refused:
        trainer.fit(module, ckpt_path=checkpoint)
    assert str(refused.value).splitlines()[:3] == [
        "cannot resume from the checkpoint: these settings define the run and differ from the "
        "checkpoint's (checkpoint value → given value):",
        "  model.trust_region.delta: 0.15 → 0.3",
        "  model.batching.group_size: 2 → 4",
    ]


# ------------------------------------------------------------------- saved strategy specs
SOFT_CLIP = '''
from trustregion.strategies import DRPO, register_strategy


@register_strategy("soft_clip")
class SoftClip(DRPO):
    """DRPO under a name registered by a user's module."""
'''


@pytest.fixture
def user_strategy(tmp_path, monkeypatch) -> Iterator[str]:
    """A module on sys.path that registers ``soft_clip`` (in a copy of the registry)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    (tmp_path / "user_soft_clip.py").write_text(SOFT_CLIP)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_soft_clip", raising=False)
    yield "user_soft_clip.SoftClip"
    sys.modules.pop("user_soft_clip", None)


def test_a_strategy_registered_by_a_user_module_is_saved_by_class_path(
        tmp_path, random_model_dir, user_strategy, capsys) -> None:
    path = _tiny_config(tmp_path, f"config:{random_model_dir}",
                        trust_region={"class_path": user_strategy, "init_args": {"delta": 0.2}})
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(path), "--print_config"])
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["model"]["trust_region"] == {
        "class_path": "user_soft_clip.SoftClip",
        "init_args": {"delta": 0.2, "delta_low": None, "delta_high": None,
                      "anchor": "behavior"}}
    # A later run that never imports the module does not know the name; the class path
    # still rebuilds the strategy.
    del registry._REGISTRY["soft_clip"]
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == printed


def test_a_strategy_declared_as_an_entry_point_is_saved_by_name(user_strategy,
                                                                 monkeypatch) -> None:
    from user_soft_clip import SoftClip  # type: ignore[import-not-found]

    declared = SimpleNamespace(name="soft_clip", value="user_soft_clip:SoftClip")
    monkeypatch.setattr(specs, "entry_points", lambda group: [declared])
    assert to_spec(SoftClip(delta=0.2)) == {"name": "soft_clip", "delta": 0.2,
                                            "delta_low": None, "delta_high": None,
                                            "anchor": "behavior"}
    assert to_spec(DRPO())["name"] == "drpo"  # built-ins keep their names


def test_a_changed_item_of_a_list_is_named_by_its_position() -> None:
    # one callback's argument changed: the report names that argument, not the whole list
    checkpoint = {"callbacks": [{"class_path": "a.Bar"},
                                {"class_path": "a.Summary", "init_args": {"window": 40}}]}
    given = {"callbacks": [{"class_path": "a.Bar"},
                           {"class_path": "a.Summary", "init_args": {"window": 20}}]}
    assert differences(checkpoint, given, "trainer") == [
        Difference("trainer.callbacks[1].init_args.window", 40, 20)]
    # a callback added: the lists differ as a whole
    longer = {"callbacks": [*given["callbacks"], {"class_path": "a.Plots"}]}
    [whole] = differences(checkpoint, longer, "trainer")
    assert whole.key == "trainer.callbacks"
