"""Checkpoints every N rollout batches, at the end of training and on SIGINT / SIGTERM.

``trustregion fit`` adds :class:`RolloutCheckpoint` to every run; its settings form the
``checkpoint:`` section of the config (``--checkpoint.every_n_rollouts=20`` on the command line).

**Where.** ``<log_dir>/checkpoints`` of the first logger (``runs/quickstart/csv/version_0/
checkpoints`` for the quickstart), ``<default_root_dir>/checkpoints`` without a logger, or
``dirpath`` when given. Files are named after the rollout batches completed,
``rollout=000050.ckpt``, and ``last.ckpt`` holds the newest state no collapse guard rejected
(an atomic copy of that save, see below). Every
file is written by the trainer's checkpoint I/O, which under ``trustregion fit`` is
:class:`~trustregion.checkpointing.ChecksummedCheckpointIO` (atomic, checksummed).

**Sharded checkpoints.** Under Lightning's ``ModelParallelStrategy`` (FSDP) every process writes
its shard, and each checkpoint is a directory with the same name (``rollout=000050.ckpt/``,
``last.ckpt/``; layout in :mod:`trustregion.checkpointing`). It is written under a hidden name
(``.rollout=000050.ckpt.partial``), given its checksum manifest once every process has
finished, and only then renamed into place, so a crash never leaves a half-written checkpoint
under a checkpoint's name. ``keep_last`` deletes whole directories; ``last.ckpt`` is a copy of
the newest one (hard links: no second copy of the data). A resumed sharded checkpoint is
verified against its manifest before the first rollout batch: ``trustregion fit`` does it before
anything is loaded, and this callback once Lightning has read the shards (Lightning reads them
without the checkpoint I/O, so there is no earlier point to check them in ``Trainer.fit``).

**World size.** Every checkpoint records how many processes wrote it. Resuming on another
number of processes is refused before training starts (the prompt stream, the shards and each
process's sampling are split by it); export the policy (``trustregion export``) to start a new
run from its weights instead.

**Collapse guard.** A save made while a :class:`~trustregion.callbacks.CollapseGuard` is firing
(the rollout batch just finished raised one of its signals) is still written, but marked: its
name ends in ``-guard_firing.ckpt`` and its state here records ``guard_firing: True``.
Lightning runs checkpoint callbacks after all others, so the guard has judged the batch (and
undone it, if its action says so) before the save. ``last.ckpt`` follows the weights:

- when the firing guard put back an earlier known state (``escalate``, ``rollback``, ``skip``,
  or any action after a non-finite value; :attr:`CollapseGuard.restored_weights`), ``last.ckpt``
  is rewritten from that state at once, even between periodic saves, because the previous
  ``last.ckpt`` may hold the weights the guard has just rejected (damage shows in the batch
  after the one that did it);
- when it did not (``warn``, ``lower_lr``, ``stop``), ``last.ckpt`` keeps pointing at the
  previous healthy save.

**Signals.** The first SIGINT (Ctrl-C) or SIGTERM lets the current rollout batch finish, saves a
checkpoint and ``last.ckpt``, and stops the trainer; :attr:`RolloutCheckpoint.interruption` then
says which signal and where the checkpoint is, and ``trustregion fit`` prints the command that
resumes and exits with status 128 + the signal number (130 for SIGINT, 143 for SIGTERM). A
second SIGINT stops at once without saving (Lightning's own Ctrl-C handling, status 1); a second
SIGTERM terminates the process at once. The handlers are installed in the main thread when
training starts (after Lightning installs its own, which this callback stands in for during
training: Lightning's would end the run through ``SystemExit`` with status 0) and the previous
ones are restored when training ends. With several processes the stop is agreed by all ranks
at the end of a rollout batch, so they save together.

Example:
    >>> RolloutCheckpoint(every_n_rollouts=20, keep_last=2)  # doctest: +ELLIPSIS
    RolloutCheckpoint(every_n_rollouts=20, ...)
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from trustregion.callbacks.collapse_guard import CollapseGuard
from trustregion.checkpointing import (
    GUARD_FIRING_SUFFIX,
    CorruptCheckpointError,
    copy_checkpoint,
    install_checkpoint,
    remove_checkpoint,
    verify_checkpoint,
    with_checksummed_io,
    write_manifest,
)
from trustregion.interface import TrainingModule
from trustregion.resume import ResumeRefused
from trustregion.validation import boolean, integer_at_least, non_empty_string

__all__ = ["Interruption", "RolloutCheckpoint", "check_world_size", "fit_trainer_arguments",
           "interruption_of", "saved_world_size"]

LAST = "last.ckpt"
_PERIODIC = re.compile(rf"^rollout=(\d+)({re.escape(GUARD_FIRING_SUFFIX)})?\.ckpt$")
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class Interruption:
    """A run stopped by a signal: which one, and the newest healthy checkpoint to resume from
    (None when there is none)."""

    signal: int
    checkpoint: Path | None

    @property
    def exit_code(self) -> int:
        """The conventional status of a process ended by the signal: 128 + its number."""
        return 128 + self.signal

    def message(self, fit_args: Sequence[str] | None = None) -> str:
        """One line saying what happened and how to resume; ``fit_args`` are the arguments
        given to ``trustregion fit`` (any ``--ckpt_path`` among them is replaced)."""
        name = signal.Signals(self.signal).name
        if self.checkpoint is None:
            return f"trustregion: stopped by {name}; no checkpoint could be saved"
        command = ["trustregion", "fit", *_without_ckpt_path(fit_args or ["--config", "..."]),
                   "--ckpt_path", str(self.checkpoint)]
        return (f"trustregion: stopped by {name}; checkpoint saved to {self.checkpoint}; "
                f"resume with: {shlex.join(command)}")


class RolloutCheckpoint(Checkpoint):
    """Save a checkpoint every ``every_n_rollouts`` rollout batches, at the end of training and
    when the process receives SIGINT or SIGTERM (see the module docs).

    Args:
        every_n_rollouts: rollout batches (Lightning training steps) between saves.
        keep_last: how many ``rollout=…`` files to keep, the newest (and as many of the
            newest ``-guard_firing`` files); None keeps every file.
        save_last: keep ``last.ckpt``, the newest state no collapse guard rejected.
        handle_signals: save and stop on SIGINT / SIGTERM instead of Lightning's handling.
        dirpath: directory of the checkpoints; None: ``<log_dir>/checkpoints`` of the first
            logger, or ``<default_root_dir>/checkpoints`` without one.

    Attributes:
        directory: where the checkpoints go (resolved in ``setup``).
        rollouts: rollout batches completed (restored on resume).
        last_checkpoint: the newest checkpoint written whose weights no collapse guard
            rejected, the state ``last.ckpt`` holds (None before any).
        interruption: set when a signal stopped training.
    """

    def __init__(self, every_n_rollouts: int = 50, keep_last: int | None = 3,
                 save_last: bool = True, handle_signals: bool = True,
                 dirpath: str | None = None) -> None:
        self.every_n_rollouts = integer_at_least("every_n_rollouts", every_n_rollouts, 1)
        self.keep_last = (None if keep_last is None else integer_at_least(
            "keep_last", keep_last, 1, note="or None to keep every file"))
        self.save_last = boolean("save_last", save_last)
        self.handle_signals = boolean("handle_signals", handle_signals)
        self.dirpath = None if dirpath is None else Path(non_empty_string("dirpath", dirpath))
        self.directory: Path | None = self.dirpath
        self.rollouts = 0
        self.last_checkpoint: Path | None = None
        self.interruption: Interruption | None = None
        self._restored = False
        self._saved_at: int | None = None
        self._saving_guard_firing = False
        self._pending_signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._announce = True

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(every_n_rollouts={self.every_n_rollouts}, "
                f"keep_last={self.keep_last}, save_last={self.save_last}, "
                f"handle_signals={self.handle_signals}, dirpath={self.dirpath})")

    # ------------------------------------------------------------------------- lifecycle
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:  # resolved for each run: the logger's version may change
            self.directory = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._restored:  # a fresh run, or a checkpoint another callback wrote
            per_rollout = (pl_module.optimizer_steps_per_rollout
                           if isinstance(pl_module, TrainingModule) else 1)
            self.rollouts = trainer.global_step // per_rollout
        self._saved_at = None
        self.interruption = None
        self._pending_signal = None
        self._announce = trainer.is_global_zero
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            for signum in _SIGNALS:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.rollouts += 1
        signum = self._agreed_signal(trainer, pl_module)
        if signum or self.rollouts % self.every_n_rollouts == 0:
            self._save(trainer)
        elif self.save_last and _guards_firing(trainer) and _weights_trusted(trainer):
            self._write_last(trainer)
        if signum:
            self.interruption = Interruption(signum, self.last_checkpoint)
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()
        if self._saved_at != self.rollouts:
            self._save(trainer)
        if self._pending_signal and self.interruption is None:
            rank_zero_info(f"{signal.Signals(self._pending_signal).name} arrived after the last "
                           "rollout batch: the run finished")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        self._restore_handlers()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"rollouts": self.rollouts, "guard_firing": self._saving_guard_firing}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rollouts = int(state_dict["rollouts"])
        self._restored = True

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint written by another number of processes; verify one that the
        trainer read without its checkpoint I/O (a sharded directory, or any checkpoint under
        ``ModelParallelStrategy``) against its recorded checksums."""
        path = trainer.ckpt_path
        check_world_size(checkpoint, trainer.world_size, path or "the checkpoint")
        if path is None or "://" in str(path) or not (
                Path(path).is_dir() or isinstance(trainer.strategy, ModelParallelStrategy)):
            return
        error: CorruptCheckpointError | None = None
        unverified = False
        if trainer.is_global_zero:  # one process reads every file; all raise alike
            try:
                unverified = not verify_checkpoint(path)
            except CorruptCheckpointError as corrupt:
                error = corrupt
        error = trainer.strategy.broadcast(error)
        if error is not None:
            raise error
        if unverified:
            rank_zero_warn(f"checkpoint {path} has no recorded checksum, so it could not be "
                           "verified")

    # ----------------------------------------------------------------------------- saving
    def _save(self, trainer: L.Trainer) -> None:
        assert self.directory is not None, "setup() resolves the directory"
        firing = _guards_firing(trainer)
        suffix = GUARD_FIRING_SUFFIX if firing else ""
        path = self.directory / f"rollout={self.rollouts:06d}{suffix}.ckpt"
        self._saving_guard_firing = firing
        try:
            _save_to(trainer, path)  # the full training state
        finally:
            self._saving_guard_firing = False
        self._saved_at = self.rollouts
        if _weights_trusted(trainer):
            self.last_checkpoint = path
            if self.save_last:
                self._update_last(trainer, path)
        else:
            kept = ("still holds the previous healthy state" if self.last_checkpoint
                    else "is not written until a healthy state is saved")
            rank_zero_info(f"checkpoint {path} holds weights the collapse guard fired on; "
                           f"{LAST} {kept}")
        if trainer.is_global_zero and self.keep_last is not None:
            _prune(self.directory, self.keep_last)
        trainer.strategy.barrier("RolloutCheckpoint")

    def _write_last(self, trainer: L.Trainer) -> None:
        """Save the state in memory as ``last.ckpt`` (marked as written while firing)."""
        assert self.directory is not None, "setup() resolves the directory"
        self._saving_guard_firing = _guards_firing(trainer)
        try:
            _save_to(trainer, self.directory / LAST)
        finally:
            self._saving_guard_firing = False
        self.last_checkpoint = self.directory / LAST
        rank_zero_info(f"the collapse guard restored an earlier state; {LAST} now holds it")

    def _update_last(self, trainer: L.Trainer, path: Path) -> None:
        assert self.directory is not None
        if trainer.is_global_zero:  # a file or a sharded directory; _save's barrier waits
            copy_checkpoint(path, self.directory / LAST)

    # ---------------------------------------------------------------------------- signals
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._pending_signal is not None:  # a second signal: stop now, without saving
            self._restore_handlers()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self._pending_signal = signum
        if self._announce:
            again = "press Ctrl-C again" if signum == signal.SIGINT else "send it again"
            # os.write: safe even if the signal arrived in the middle of a print
            os.write(2, (f"\ntrustregion: {signal.Signals(signum).name} received; finishing "
                         f"this rollout batch, then saving a checkpoint ({again} to stop at "
                         f"once without saving)\n").encode())

    def _agreed_signal(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        """The pending signal's number (0 when none), agreed by every rank (the highest)."""
        if trainer.world_size == 1:
            return self._pending_signal or 0
        pending = torch.tensor(self._pending_signal or 0, device=pl_module.device)
        return int(trainer.strategy.reduce(pending, reduce_op="max").item())

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous_handlers = {}


def _save_to(trainer: L.Trainer, path: Path) -> None:
    """Save the full training state as ``path``; every process calls it.

    Under ``ModelParallelStrategy``, which writes a directory of shards (or, with
    ``save_distributed_checkpoint=False``, one file) without the checkpoint I/O, the checkpoint
    is written under a hidden name beside ``path``, given its checksum manifest once every
    process has finished, then renamed into place. Otherwise the checkpoint I/O writes ``path``
    itself (atomically, under ``trustregion fit``)."""
    if not isinstance(trainer.strategy, ModelParallelStrategy):
        trainer.save_checkpoint(path, weights_only=False)
        return
    partial = path.with_name(f".{path.name}.partial")  # the same name on every process
    if trainer.is_global_zero:
        remove_checkpoint(partial)  # left by a crash
    trainer.strategy.barrier("RolloutCheckpoint.partial")
    trainer.save_checkpoint(partial, weights_only=False)  # ends when every shard is written
    if trainer.is_global_zero:
        if partial.is_dir():
            write_manifest(partial)
        install_checkpoint(partial, path)
    trainer.strategy.barrier("RolloutCheckpoint.installed")


WORLD_SIZE = "world_size"
"""The key of the number of processes that wrote a checkpoint, in its ``trustregion`` state."""


def saved_world_size(checkpoint: Mapping[str, Any]) -> int | None:
    """How many processes wrote ``checkpoint`` (None when it does not say: written before this
    was recorded, or not by :class:`~trustregion.module.TrustRegionModule`).

    >>> saved_world_size({"trustregion": {"world_size": 2}})
    2
    """
    state = checkpoint.get("trustregion")
    value = state.get(WORLD_SIZE) if isinstance(state, Mapping) else None
    return int(value) if value is not None else None


def check_world_size(checkpoint: Mapping[str, Any], world_size: int, path: Any) -> None:
    """Refuse (:class:`~trustregion.resume.ResumeRefused`) to resume ``checkpoint``, read from
    ``path``, on ``world_size`` processes when another number of processes wrote it."""
    saved = saved_world_size(checkpoint)
    if saved is None or saved == world_size:
        return
    raise ResumeRefused(
        f"cannot resume from {path}: it was written by {saved} process{'es' * (saved != 1)} "
        f"and this run has {world_size} (trainer.devices × trainer.num_nodes). A checkpoint "
        f"resumes only on the number of processes that wrote it: set trainer.devices and "
        f"trainer.num_nodes to make {saved}, or export its policy (trustregion export "
        f"{path} OUT_DIR) and start a new run from it (model.policy: OUT_DIR)")


def _guards(trainer: L.Trainer) -> list[CollapseGuard]:
    return [cb for cb in trainer.callbacks  # type: ignore[attr-defined]  # public
            if isinstance(cb, CollapseGuard)]


def _guards_firing(trainer: L.Trainer) -> bool:
    """Whether a collapse guard fired on the rollout batch just finished."""
    return any(guard.firing for guard in _guards(trainer))


def _weights_trusted(trainer: L.Trainer) -> bool:
    """Whether the weights in memory are ones no firing guard rejected: no guard fired, or
    each that fired put back an earlier known state."""
    return all(guard.restored_weights for guard in _guards(trainer) if guard.firing)


def fit_trainer_arguments(trainer_config: Mapping[str, Any],
                          checkpoint: RolloutCheckpoint) -> dict[str, Any]:
    """The ``plugins`` and ``callbacks`` a ``trustregion fit`` trainer gets on top of its
    config: :class:`~trustregion.checkpointing.ChecksummedCheckpointIO` unless the config names
    another ``CheckpointIO``, and ``checkpoint`` after the configured callbacks unless
    ``enable_checkpointing`` is false (then settings of ``checkpoint`` other than its defaults
    cannot take effect, and a warning says so)."""
    arguments: dict[str, Any] = {"plugins": with_checksummed_io(trainer_config.get("plugins"))}
    if trainer_config.get("enable_checkpointing") is False:
        if repr(checkpoint) != repr(RolloutCheckpoint()):
            rank_zero_warn(f"trainer.enable_checkpointing is false, so no checkpoint is "
                           f"written and the checkpoint settings cannot take effect "
                           f"({checkpoint!r})")
        return arguments
    callbacks = trainer_config.get("callbacks")
    listed = [] if callbacks is None else (
        list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks])
    if any(isinstance(c, RolloutCheckpoint) for c in listed):
        raise ValueError("trainer.callbacks lists a RolloutCheckpoint, but trustregion fit "
                         "already adds one; set its arguments in the checkpoint: section "
                         "instead")
    arguments["callbacks"] = [*listed, checkpoint]
    return arguments


def interruption_of(trainer: L.Trainer) -> Interruption | None:
    """How a signal stopped ``trainer``'s last fit (None when none did)."""
    for callback in trainer.callbacks:  # type: ignore[attr-defined]  # public, undeclared
        if isinstance(callback, RolloutCheckpoint) and callback.interruption is not None:
            return callback.interruption
    return None


def _prune(directory: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` healthy and ``keep`` guard-firing periodic files."""
    groups: dict[bool, list[tuple[int, Path]]] = {False: [], True: []}
    for path in directory.glob("rollout=*.ckpt"):
        match = _PERIODIC.match(path.name)
        if match:
            groups[match.group(2) is not None].append((int(match.group(1)), path))
    for files in groups.values():
        for _, path in sorted(files, reverse=True)[keep:]:
            remove_checkpoint(path)  # a file, or a sharded checkpoint's directory


def _without_ckpt_path(args: Sequence[str]) -> list[str]:
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            kept.append(arg)
    return kept
