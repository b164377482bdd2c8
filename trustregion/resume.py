"""Resuming a run from a checkpoint: what must match, what may change, and the run's seed.

The settings you give with ``--ckpt_path`` (config files and command-line overrides, with their
defaults) describe the run you get. Resuming never silently keeps a checkpoint's value over the
one you give:

* **settings that define the run must match the checkpoint**, or resuming is refused with one
  error listing every difference as ``key: checkpoint value → given value``. These are every
  ``model.*`` setting except those listed below: the strategy with all its settings (a width
  that a controller adapted is part of the strategy's checkpointed state, so a new configured
  width could not take effect), the task and its settings, ``policy``, ``reference``, the
  penalties (they are part of the objective and decide whether a reference model is part of
  the checkpoint), ``batching.group_size`` and ``batching.prompts_per_step`` (the position in
  the prompt stream is counted in batches of that size), ``advantage_estimator``,
  ``aggregation``, ``chat_template``, ``pad_token``, ``seed`` (the module's resolved seed,
  see :func:`run_seed`), and the *class* of the optimiser and of the scheduler (their state
  in the checkpoint belongs to that class);
* **settings that may change take the new value**, and the run prints one block listing each
  change: :data:`CHANGEABLE_MODEL_SETTINGS` (sampling, the mini-/micro-batch sizes and PPO
  epochs, the optimiser's and scheduler's settings such as ``lr``, ``max_grad_norm``,
  ``sync_every``, the evaluation settings, ``routing_replay``: it keeps no state and takes
  effect from the next rollout; ``prefix_sharing``: it changes only the order of floating-point
  work) and everything outside ``model``: every trainer
  setting (``max_steps``, precision, ...) but the number of processes (``trainer.devices`` ×
  ``trainer.num_nodes``, checked by
  :class:`~trustregion.callbacks.checkpoint.RolloutCheckpoint`), callbacks, loggers and
  ``seed_everything`` (as far as it does not change the module's seed).

A changed optimiser or scheduler setting is applied to the restored optimiser and scheduler
after Lightning restored them (:func:`changed_init_args`); a learning rate that a callback
lowered during the run (``CollapseGuard(action="lower_lr")``) therefore survives a resume with
the same settings, and a newly configured ``lr`` replaces it.

``trustregion fit`` records its whole resolved config in every checkpoint
(:class:`RecordedConfig`), which is how it can tell which trainer, callback and logger settings
changed. ``Trainer.fit(module, ckpt_path=...)`` in Python gets the same check of the settings
that define the run (``TrustRegionModule.on_load_checkpoint``).
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_only

from trustregion.checkpointing import read_checkpoint
from trustregion.validation import integer_at_least

__all__ = [
    "CHANGEABLE_MODEL_SETTINGS",
    "RUN_CONFIG_KEY",
    "Difference",
    "RecordedConfig",
    "Resume",
    "ResumeRefused",
    "apply_changed_settings",
    "changed_init_args",
    "check_resume",
    "defines_the_run",
    "differences",
    "print_report",
    "refusal",
    "run_defining_differences",
    "run_seed",
]

CHANGEABLE_MODEL_SETTINGS = (
    "sampling",
    "batching.ppo_epochs",
    "batching.mini_batch_size",
    "batching.micro_batch_size",
    "optimizer.init_args",
    "lr_scheduler.init_args",
    "max_grad_norm",
    "sync_every",
    "evaluation",
    "routing_replay",
    "prefix_sharing",
)
"""The ``model.*`` settings (and everything below them) that may change on resume; every other
``model.*`` setting defines the run."""

RUN_CONFIG_KEY = "trustregion.run_config"
"""Where :class:`RecordedConfig` keeps the resolved config in ``checkpoint["callbacks"]``."""

_NOT_COMPARED = ("ckpt_path",)  # naming the checkpoint is what resuming means


class _Unset:
    def __repr__(self) -> str:
        return "(not set)"


UNSET: Any = _Unset()


def run_seed(seed: int | None) -> int:
    """The seed of a run: ``seed`` when given, else the one ``seed_everything`` set (Lightning
    keeps it in the environment variable ``PL_GLOBAL_SEED``; the CLI seeds before building the
    module), else 0.

    >>> run_seed(7)
    7
    """
    if seed is not None:
        return integer_at_least("seed", seed, 0, note="None: follow seed_everything")
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


@dataclass(frozen=True)
class Difference:
    """One setting that differs: ``key`` is its dotted path, e.g. ``model.batching.group_size``."""

    key: str
    checkpoint: Any
    given: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.checkpoint!r} → {self.given!r}"


def _plain(value: Any) -> Any:
    """Tuples as lists and mappings as dicts, so a value compares equal to its YAML form."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _identity(spec: dict[str, Any]) -> tuple[Any, Any]:
    return spec.get("name"), spec.get("class_path")


def differences(checkpoint: Any, given: Any, key: str = "") -> list[Difference]:
    """Every setting whose value differs between ``checkpoint`` and ``given`` (nested dicts,
    and lists of the same length item by item), by dotted key. Two specs of different classes
    (``name`` or ``class_path``) differ as a whole, not setting by setting.

    >>> differences({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}})
    [Difference(key='b.c', checkpoint=2, given=3)]
    >>> differences({"cb": [{"w": 40}, "X"]}, {"cb": [{"w": 20}, "X"]})
    [Difference(key='cb[0].w', checkpoint=40, given=20)]
    """
    checkpoint, given = _plain(checkpoint), _plain(given)
    if (isinstance(checkpoint, dict) and isinstance(given, dict)
            and _identity(checkpoint) == _identity(given)):
        found = []
        for name in dict.fromkeys([*checkpoint, *given]):
            found += differences(checkpoint.get(name, UNSET), given.get(name, UNSET),
                                 f"{key}.{name}" if key else name)
        return found
    if isinstance(checkpoint, list) and isinstance(given, list) and len(checkpoint) == len(given):
        return [d for i, (old, new) in enumerate(zip(checkpoint, given, strict=True))
                for d in differences(old, new, f"{key}[{i}]")]
    return [] if checkpoint == given else [Difference(key, checkpoint, given)]


def defines_the_run(key: str) -> bool:
    """Whether the setting at dotted ``key`` (from the config's root, e.g.
    ``model.optimizer.init_args.lr``) must match the checkpoint on resume."""
    if not key.startswith("model."):
        return False
    setting = key.removeprefix("model.")
    return not any(setting == name or setting.startswith(f"{name}.")
                   for name in CHANGEABLE_MODEL_SETTINGS)


def _settings(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """A module's hyperparameters without Lightning's bookkeeping keys (``_instantiator``)."""
    return {k: v for k, v in hparams.items() if not str(k).startswith("_")}


def run_defining_differences(checkpoint: Mapping[str, Any], given: Mapping[str, Any]
                             ) -> list[Difference]:
    """The settings that define the run and differ between a checkpoint's hyperparameters and
    a module's, keyed ``model.<setting>``. Settings the checkpoint does not record are not
    compared; an optimiser or scheduler given as a plain callable (not a class) is compared
    only when both sides name a class."""
    recorded, current = _settings(checkpoint), _settings(given)
    for name in ("optimizer", "lr_scheduler"):
        if not (_class_path(recorded.get(name)) and _class_path(current.get(name))):
            recorded.pop(name, None)
    found = differences(recorded, {k: current.get(k, UNSET) for k in recorded}, "model")
    return [d for d in found if defines_the_run(d.key)]


def _class_path(spec: Any) -> str | None:
    return spec.get("class_path") if isinstance(spec, Mapping) else None


def changed_init_args(checkpoint: Any, given: Any) -> dict[str, Any]:
    """The ``init_args`` of an optimiser or scheduler spec whose value differs from the
    checkpoint's, with their new values; empty unless both specs name the same class.

    >>> changed_init_args({"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}},
    ...                   {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}})
    {'lr': 0.05}
    """
    if _class_path(checkpoint) is None or _class_path(checkpoint) != _class_path(given):
        return {}
    old = _plain(checkpoint.get("init_args") or {})
    new = _plain(given.get("init_args") or {})
    return {key: value for key, value in new.items() if old.get(key, UNSET) != value}


def apply_changed_settings(checkpoint: Mapping[str, Any], given: Mapping[str, Any],
                           optimizers: Sequence[Any], schedulers: Sequence[Any]) -> None:
    """Apply the optimiser and scheduler settings of hyperparameters ``given`` that differ from
    the ``checkpoint``'s to the optimisers and schedulers restored from it.

    A new ``lr`` becomes every param group's rate and every scheduler's base rate, keeping the
    schedule's current factor (rate ÷ base rate); a rate lowered during the run is replaced.
    Any other optimiser setting is set in every param group that holds it, a scheduler setting
    as the scheduler's attribute of the same name; one that neither holds is refused.
    """
    optimizer_changes = changed_init_args(checkpoint.get("optimizer"), given.get("optimizer"))
    lr = optimizer_changes.pop("lr", None)
    for optimizer in optimizers:
        for index, group in enumerate(optimizer.param_groups):
            for key, value in optimizer_changes.items():
                if key not in group:
                    raise ValueError(f"optimizer setting {key!r} cannot change on resume: "
                                     f"{type(optimizer).__name__} holds no such setting")
                group[key] = type(group[key])(value) if isinstance(group[key], tuple) \
                    else value
            if lr is None:
                continue
            bases = [s.base_lrs for s in schedulers if s.optimizer is optimizer]
            factor = group["lr"] / bases[0][index] if bases and bases[0][index] else 1.0
            group["lr"] = lr * factor
            group["initial_lr"] = lr
            for base in bases:
                base[index] = lr
    for key, value in changed_init_args(checkpoint.get("lr_scheduler"),
                                        given.get("lr_scheduler")).items():
        for scheduler in schedulers:
            if not hasattr(scheduler, key):
                raise ValueError(f"lr_scheduler setting {key!r} cannot change on resume: "
                                 f"{type(scheduler).__name__} has no attribute {key!r}")
            setattr(scheduler, key, value)


class ResumeRefused(ValueError):
    """Resuming would change a setting that defines the run (the message lists them)."""


def refusal(path: str | Path, found: Sequence[Difference]) -> str:
    """The message that refuses resuming from ``path`` with settings that define the run."""
    lines = "\n".join(f"  {difference}" for difference in found)
    return (f"cannot resume from {path}: these settings define the run and differ from the "
            f"checkpoint's (checkpoint value → given value):\n{lines}\n"
            "Resume with the run's own settings (the config.yaml saved beside its logs) and "
            "change only settings that may change on resume (sampling, ppo_epochs, "
            "mini_batch_size, micro_batch_size, the optimizer's and lr_scheduler's init_args, "
            "max_grad_norm, sync_every, evaluation, trainer settings, callbacks, loggers), or "
            "start a new run.")


class RecordedConfig(SaveConfigCallback):
    """Lightning's ``SaveConfigCallback`` that also records the run's resolved config in every
    checkpoint, so a resumed run can report which trainer, callback and logger settings
    changed. The resumed run records its own config."""

    @property
    def state_key(self) -> str:
        return RUN_CONFIG_KEY

    def state_dict(self) -> dict[str, Any]:
        dumped = self.parser.dump(self.config, format="yaml", skip_unset=False,
                                  skip_link_targets=False)
        return {"config": yaml.safe_load(dumped)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The checkpoint's config was compared when the run was parsed; this run keeps its
        own."""


def _dump(parser: Any, config: Any, subcommand: str) -> dict[str, Any]:
    dumped = yaml.safe_load(parser.dump(config, format="yaml", skip_unset=False,
                                        skip_link_targets=False))
    return dict(dumped[subcommand])


def _configured_seed(subcommand_config: Mapping[str, Any]) -> int:
    """The module seed the given config leads to (see :func:`run_seed`): ``model.seed``, else
    an integer ``seed_everything``, else the environment's or 0."""
    seed = subcommand_config["model"].get("seed")
    if seed is not None:
        return run_seed(seed)
    everything = subcommand_config.get("seed_everything")
    if isinstance(everything, int) and not isinstance(everything, bool):
        return everything
    return run_seed(None)


@dataclass
class Resume:
    """A checked resume of the CLI: the checkpoint, the user's model config to run with, the
    changed model settings and the checkpoint's recorded config (None when it has none)."""

    path: str
    subcommand: str
    model: Any
    changed: list[Difference]
    recorded: dict[str, Any] | None

    def restore(self, parser: Any, config: Any) -> list[Difference]:
        """Put the given model settings back into ``config`` (Lightning's CLI parses a
        checkpoint's hyperparameters over them) and return every changed setting."""
        config[self.subcommand]["model"] = self.model
        changed = list(self.changed)
        if self.recorded is not None:
            current = _dump(parser, config, self.subcommand)
            others = {k: v for k, v in current.items() if k not in ("model", *_NOT_COMPARED)}
            recorded = {k: self.recorded.get(k, UNSET) for k in others}
            changed += differences(recorded, others)
        return changed

    def report(self, changed: Sequence[Difference]) -> str:
        """The block printed when the run starts."""
        if not changed:
            text = f"Resuming from {self.path} with unchanged settings."
        else:
            lines = "\n".join(f"  {difference}" for difference in changed)
            text = f"Resuming from {self.path} with changed settings:\n{lines}"
        if self.recorded is None:
            text += ("\n  (the checkpoint records no trainer, callback or logger settings: only "
                     "model settings were compared)")
        return text


@rank_zero_only
def print_report(text: str) -> None:
    """Print ``text`` once, on the process of rank zero."""
    print(text, flush=True)


def check_resume(parser: Any, config: Any) -> Resume | None:
    """For a CLI ``config`` with a ``ckpt_path`` file: refuse settings that define the run and
    differ from the checkpoint's (:class:`ResumeRefused` listing them all); else the :class:`Resume`
    that puts the given settings back. None without a checkpoint file."""
    subcommand = config.get("subcommand")
    if not subcommand:
        return None
    path = config[subcommand].get("ckpt_path")
    if not path:
        return None
    if not Path(path).is_file():
        if "://" in str(path):  # remote: read by the trainer's checkpoint I/O, unchecked here
            return None
        if str(path) in ("last", "best", "hpc", "registry"):
            raise ResumeRefused(
                f"--ckpt_path {path}: trustregion fit writes last.ckpt into the run's "
                "checkpoints directory (<log_dir>/checkpoints, e.g. runs/quickstart/csv/"
                "version_0/checkpoints/last.ckpt); give that file's path")
        try:
            read_checkpoint(path)  # says which verified checkpoints its directory holds
        except FileNotFoundError as missing:
            raise ResumeRefused(str(missing)) from None
    # The hyperparameters and recorded config are plain values: no arbitrary unpickling. A
    # checkpoint without a checksum is reported once, when the trainer loads it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"checkpoint .* has no recorded checksum")
        checkpoint = read_checkpoint(path, weights_only=True)
    hparams = _settings(checkpoint.get("hyper_parameters") or {})
    given_model = copy.deepcopy(config[subcommand]["model"])
    given = _dump(parser, config, subcommand)
    given["model"]["seed"] = _configured_seed(given)
    try:
        stored = parser.parse_object({subcommand: {"model": hparams}}, copy.deepcopy(config))
    except SystemExit:
        sys.stderr.write(f"the hyperparameters stored in {path} could not be read back\n")
        raise
    recorded_model = {k: v for k, v in _dump(parser, stored, subcommand)["model"].items()
                      if k in hparams}
    found = differences(recorded_model, {k: given["model"].get(k, UNSET)
                                         for k in recorded_model}, "model")
    refused = [d for d in found if defines_the_run(d.key)]
    if refused:
        raise ResumeRefused(refusal(path, refused))
    state = (checkpoint.get("callbacks") or {}).get(RUN_CONFIG_KEY)
    recorded = dict(state["config"]) if state else None
    return Resume(path=str(path), subcommand=subcommand, model=given_model,
                  changed=[d for d in found if not defines_the_run(d.key)],
                  recorded=recorded)
