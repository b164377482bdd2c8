"""The ``trustregion`` command.

* ``trustregion fit --config FILE.yaml`` — train (Lightning CLI: ``--print_config`` shows every
  resolved setting, including the strategy's hyperparameters). With ``--ckpt_path CKPT`` it
  resumes: settings that define the run must match the checkpoint, the others take their new
  value and are listed (:mod:`trustregion.resume`).
* ``trustregion validate --config FILE.yaml --ckpt_path CKPT`` — evaluate a checkpoint's policy
  on the task's held-out prompts (:mod:`trustregion.evaluation`) and print the values.
* ``trustregion predict --config FILE.yaml --ckpt_path CKPT --prediction.prompts IN.jsonl
  --prediction.output OUT.jsonl`` — write a checkpoint's policy's completions of a prompt file
  as JSON lines (:mod:`trustregion.prediction`); on one process.
* ``trustregion strategies`` — the registered strategies with their settings and defaults.
* ``trustregion plot RUN_DIR`` — draw a finished run's charts from its logs
  (:mod:`trustregion.plots`).
* ``trustregion export CKPT OUT_DIR`` — write a checkpoint's policy (one file, or a sharded
  checkpoint directory) as a Hugging Face ``save_pretrained`` directory
  (:mod:`trustregion.export`).

In a config, a strategy or a task is given as a registered name (``trust_region: drpo``), as a
name with settings (``trust_region: {name: drpo, delta: 0.1}``) or as a class path
(``trust_region: {class_path: my_pkg.MyStrategy, init_args: {...}}``).
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jsonargparse.typing import register_type
from lightning.pytorch.cli import LightningCLI

from trustregion.callbacks.checkpoint import (
    RolloutCheckpoint,
    check_world_size,
    fit_trainer_arguments,
    interruption_of,
)
from trustregion.callbacks.collapse_guard import TrainingCollapsed
from trustregion.callbacks.completion_writer import CompletionWriter
from trustregion.callbacks.progress import drop_disabled_progress_bars
from trustregion.checkpointing import CorruptCheckpointError, read_recorded_state
from trustregion.known_noise import quiet_known_noise
from trustregion.module import TrustRegionModule
from trustregion.optim import with_torch_class_paths
from trustregion.prediction import PredictionRefused, PredictionSettings
from trustregion.resume import RecordedConfig, Resume, ResumeRefused, check_resume, print_report
from trustregion.specs import strategy_from_spec, task_from_spec, to_spec
from trustregion.strategies import DRPO, TrustRegionStrategy, available_strategies, strategy_class
from trustregion.tasks import Arithmetic, Task
from trustregion.tasks.jsonl import load_jsonl_prompts

__all__ = ["TrustRegionCLI", "export_command", "main", "plot_command"]

SUBCOMMANDS = ("fit", "validate", "predict")
"""The Lightning subcommands ``trustregion`` offers; ``strategies``, ``plot`` and ``export`` are
its own."""
HELP_EPILOG = (
    "other commands: 'trustregion strategies' lists the registered trust-region strategies "
    "with their settings; 'trustregion plot RUN_DIR' draws a run's charts from its logs "
    "(trustregion plot --help). 'trustregion export CKPT OUT_DIR' writes a checkpoint's "
    "policy as a Hugging Face model directory (trustregion export --help). "
    "'trustregion validate --config FILE --ckpt_path CKPT' "
    "evaluates a checkpoint on the task's held-out prompts (needs model.evaluation). "
    "'trustregion predict --config FILE --ckpt_path CKPT --prediction.prompts PROMPTS.jsonl "
    "--prediction.output OUT.jsonl' writes the policy's completions of a prompt file "
    "(trustregion predict --help).")
PREDICT_DESCRIPTION = (
    "Write the policy's completions of a JSONL prompt file (one {\"prompt\": ...} object a "
    "line) to a JSONL file: greedy, or --prediction.greedy=false --prediction.samples=N "
    "sampled; with --ckpt_path, the checkpoint's policy. Runs on one process.")
"""The ``trustregion predict --help`` text; :meth:`TrustRegionCLI.add_arguments_to_parser` adds
the ``prediction:`` section to the parser that has it."""
REMOVED = {
    "test": "trustregion has no test stage: evaluate held-out prompts with 'trustregion "
            "validate --config FILE --ckpt_path CKPT' (see model.evaluation)",
}

MODEL_PARTS = {"optimizer": "torch.optim.SGD", "lr_scheduler": "torch.optim.lr_scheduler.StepLR"}
"""Parts that are settings of the model, not of the command, with an example class for each."""


def refuse_top_level_parts(parser: Any, args: Sequence[str]) -> None:
    """Refuse ``--optimizer`` and ``--lr_scheduler`` on the command line with the model setting
    to use instead. (Lightning's CLI would take them and replace the module's own optimiser and
    schedule, dropping ``model.optimizer`` and ``model.lr_scheduler`` without a word.)"""
    for arg in args:
        for part, example in MODEL_PARTS.items():
            if arg == f"--{part}" or arg.startswith((f"--{part}=", f"--{part}.")):
                short = example.rpartition(".")[2]
                parser.error(
                    f"{arg.split('=')[0]} is not a setting of trustregion: the {part} belongs to "
                    f"the model. Use --model.{part}={short} (a torch class name, or a full "
                    f"class path such as {example}) and set its arguments with "
                    f"--model.{part}.init_args.NAME=VALUE; in a config file, under model: "
                    f"{part}: {{class_path: {example}, init_args: {{...}}}}")


_STRATEGY_BASE: type = TrustRegionStrategy  # abstract: registered for parsing, never built
_TASK_BASE: type = Task
register_type(_STRATEGY_BASE, to_spec, strategy_from_spec)
register_type(_TASK_BASE, to_spec, task_from_spec)


class TrustRegionCLI(LightningCLI):
    """Lightning CLI for :class:`~trustregion.module.TrustRegionModule`."""

    def __init__(self, args: Sequence[str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs["parser_kwargs"] = {"description": "RL post-training of language models with a "
                                                  "pluggable trust region.",
                                   "epilog": HELP_EPILOG,
                                   "predict": {"description": PREDICT_DESCRIPTION},
                                   **(kwargs.get("parser_kwargs") or {})}
        kwargs.setdefault("save_config_callback", RecordedConfig)
        # model.optimizer and model.lr_scheduler configure the optimiser (refuse_top_level_parts)
        kwargs.setdefault("auto_configure_optimizers", False)
        # Lightning's summary table has a FLOPs column that reads 0 without an example input;
        # RolloutProgressBar prints the parameter counts instead.
        kwargs["trainer_defaults"] = {"enable_model_summary": False,
                                      **(kwargs.get("trainer_defaults") or {})}
        quiet_known_noise()
        self.resume: Resume | None = None
        self.completion_writer: CompletionWriter | None = None
        super().__init__(TrustRegionModule, args=list(args) if args is not None else None,
                         **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate`` and ``predict``; Lightning's ``test`` has no meaning here."""
        return {name: skip for name, skip in LightningCLI.subcommands().items()
                if name in SUBCOMMANDS}

    def after_validate(self) -> None:
        """Print the evaluation's values (``trustregion validate``)."""
        if self.trainer.is_global_zero:
            values = {key: float(value) for key, value in self.trainer.callback_metrics.items()
                      if key.startswith("val/")}
            print("\n".join(f"{key:<24}{value:.6g}" for key, value in sorted(values.items())))

    def before_predict(self) -> None:
        """Read the prompt file and hand it to the module (``trustregion predict``); a bad file
        or a prompt too long for the context is refused before the checkpoint loads."""
        settings = self.config_init["predict"]["prediction"]
        try:
            prompts = load_jsonl_prompts(settings.prompts, settings.prompt_key)
            self.model.prepare_prediction(prompts, settings)
        except (FileNotFoundError, ValueError) as err:
            raise PredictionRefused(str(err)) from err

    def after_predict(self) -> None:
        """Say what was written (``trustregion predict``)."""
        writer = self.completion_writer
        if writer is not None and self.trainer.is_global_zero:
            print(f"trustregion: wrote {writer.written} completions to {writer.output}",
                  file=sys.stderr)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse, then, with ``--ckpt_path``, refuse settings that define the run and differ
        from the checkpoint's (:mod:`trustregion.resume`)."""
        if args is None or isinstance(args, Sequence):
            refuse_top_level_parts(parser, sys.argv[1:] if args is None else args)
            # a bare optimiser or scheduler name is torch's class of that name
            if args is None:
                sys.argv[1:] = with_torch_class_paths(sys.argv[1:])
            else:
                args = with_torch_class_paths(args)
        super().parse_arguments(parser, args)
        self.resume = check_resume(parser, self.config)

    def before_fit(self) -> None:
        """With ``--ckpt_path``, refuse a checkpoint written by another number of processes
        before any process is started (:func:`~trustregion.callbacks.checkpoint.
        check_world_size`)."""
        if self.resume is not None and "://" not in self.resume.path:
            check_world_size(read_recorded_state(self.resume.path), self.trainer.world_size,
                             self.resume.path)

    def before_instantiate_classes(self) -> None:
        # Lightning's CLI parses the checkpoint's hyperparameters over the given model
        # settings; the given ones (checked equal where they define the run) win.
        if self.resume is not None:
            changed = self.resume.restore(self.parser, self.config)
            if self.resume.subcommand == "fit":
                print_report(self.resume.report(changed))
        config = self.config[self.subcommand] if self.subcommand else self.config
        for class_path in drop_disabled_progress_bars(config["trainer"]):
            print(f"trustregion: trainer.enable_progress_bar is false, so the callback "
                  f"{class_path} is left out", file=sys.stderr)

    def add_arguments_to_parser(self, parser: Any) -> None:
        # Show the module's actual defaults rather than null in --print_config.
        parser.set_defaults({"model.trust_region": DRPO(), "model.task": Arithmetic()})
        # The `checkpoint:` section; instantiate_trainer adds the callback to the trainer.
        parser.add_class_arguments(RolloutCheckpoint, "checkpoint", fail_untyped=False,
                                   sub_configs=True)
        # Lightning builds one parser per subcommand; only predict's has this description.
        if parser.description == PREDICT_DESCRIPTION:
            parser.add_class_arguments(PredictionSettings, "prediction", sub_configs=True)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The trainer, with checksummed checkpoint I/O and :class:`RolloutCheckpoint`
        (:func:`~trustregion.callbacks.checkpoint.fit_trainer_arguments`); for ``predict``, a
        :class:`~trustregion.callbacks.CompletionWriter` of ``prediction.output`` last."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = config.get("trainer") or {}
        added = fit_trainer_arguments(trainer_config, config["checkpoint"])
        if self.subcommand == "predict":
            try:
                self.completion_writer = CompletionWriter(config["prediction"].output)
            except ValueError as err:
                raise PredictionRefused(str(err)) from err
            given = added.get("callbacks", trainer_config.get("callbacks"))
            listed = [] if given is None else (
                list(given) if isinstance(given, list | tuple) else [given])
            added["callbacks"] = [*listed, self.completion_writer]
        return super().instantiate_trainer(**{**added, **kwargs})


def describe_strategies() -> str:
    """A table of the registered strategies: name, class and ``__init__`` defaults."""
    lines = []
    for name in available_strategies():
        cls = strategy_class(name)
        params = [
            f"{p.name}={p.default!r}"
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.name != "self" and p.default is not inspect.Parameter.empty
        ]
        summary = (inspect.getdoc(cls) or "").splitlines()[0]
        lines.append(f"{name:<16}{cls.__module__}.{cls.__qualname__}\n"
                     f"{'':<16}{summary}\n{'':<16}{', '.join(params)}")
    return "\n".join(lines)


def plot_command(args: Sequence[str]) -> None:
    """``trustregion plot RUN_DIR``: draw a run's charts (:func:`trustregion.plots.render_run`)
    and print their paths; exits with status 2 on a bad path and 1 when nothing is drawn."""
    parser = argparse.ArgumentParser(
        prog="trustregion plot",
        description="Draw a run's charts (reward.png, drift.png and, when the DriftPlots "
                    "callback saved token samples, weight_vs_shift.png) into the plots/ folder "
                    "beside its metrics.csv.",
        epilog="RUN_DIR is a run directory (e.g. runs/quickstart: every csv/version_N of a "
               "resumed run is joined, and the charts go to the latest one's plots/), a version "
               "directory or a metrics.csv file (that version alone).")
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path,
                        help="run directory, version directory or metrics.csv")
    options = parser.parse_args(list(args))
    from trustregion.plots import render_run  # matplotlib only when plotting

    try:
        paths = render_run(options.run_dir)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    if not paths:
        parser.exit(1, f"trustregion plot: nothing to draw in {options.run_dir}\n")
    for path in paths:
        print(path)


def export_command(args: Sequence[str]) -> None:
    """``trustregion export CKPT OUT_DIR``: write the checkpoint's policy as a Hugging Face
    model directory (:func:`trustregion.export.export_policy`) and print its path; exits with
    status 2 and one line on a missing or corrupt checkpoint or an unusable ``OUT_DIR``."""
    parser = argparse.ArgumentParser(
        prog="trustregion export",
        description="Write a checkpoint's policy as a Hugging Face save_pretrained directory "
                    "(config.json, model.safetensors, tokenizer) that "
                    "AutoModelForCausalLM.from_pretrained(OUT_DIR) loads and a new run can "
                    "start from (model.policy: OUT_DIR).",
        epilog="CKPT is a checkpoint written by trustregion fit: a file, or a sharded "
               "checkpoint directory written by several processes (FSDP), consolidated here "
               "on one process. Its checksums are verified; the model is rebuilt from the "
               "policy source it records, which must still be available. OUT_DIR must not "
               "exist or be empty.")
    parser.add_argument("checkpoint", metavar="CKPT", type=Path, help="checkpoint to export")
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="directory to write")
    options = parser.parse_args(list(args))
    from trustregion.export import ExportRefused, export_policy

    try:
        out = export_policy(options.checkpoint, options.out_dir)
    except (FileNotFoundError, CorruptCheckpointError, ExportRefused) as err:
        parser.exit(2, f"trustregion export: {err}\n")
    print(out)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``trustregion`` command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["strategies"]:
        print(describe_strategies())
        return
    if args[:1] == ["plot"]:
        plot_command(args[1:])
        return
    if args[:1] == ["export"]:
        export_command(args[1:])
        return
    if args[:1] and args[0] in REMOVED:
        print(f"trustregion: {REMOVED[args[0]]}", file=sys.stderr)
        sys.exit(2)
    try:
        cli = TrustRegionCLI(args=None if argv is None else args)
    except TrainingCollapsed as collapsed:  # the guard gave up: its message, not a traceback
        print(f"trustregion: {collapsed}", file=sys.stderr)
        sys.exit(collapsed.exit_code)
    except (CorruptCheckpointError, ResumeRefused, PredictionRefused) as refused:
        # a bad --ckpt_path or prompt file: say why
        print(f"trustregion: {refused}", file=sys.stderr)
        sys.exit(2)
    interruption = interruption_of(cli.trainer)
    if interruption is not None:  # stopped by SIGINT / SIGTERM after saving a checkpoint
        print(interruption.message(args[1:] if args[:1] == ["fit"] else args), file=sys.stderr)
        sys.exit(interruption.exit_code)


if __name__ == "__main__":
    main()
