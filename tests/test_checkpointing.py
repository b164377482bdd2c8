"""Checksummed atomic checkpoint files (trustregion.checkpointing) and the RolloutCheckpoint
callback: cadence, last.ckpt, guard marking, signals, and the `trustregion fit` wiring."""

from __future__ import annotations

import hashlib
import os
import signal
import warnings
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from cli_configs import tiny_cli_config
from lightning.pytorch.plugins.io import TorchCheckpointIO

import trustregion.checkpointing as checkpointing
from trustregion.callbacks import CollapseGuard, RolloutCheckpoint
from trustregion.callbacks.checkpoint import Interruption
from trustregion.checkpointing import (
    ChecksummedCheckpointIO,
    CorruptCheckpointError,
    read_checkpoint,
    recorded_digest,
    verify_checkpoint,
    with_checksummed_io,
    write_checkpoint,
)
from trustregion.cli import TrustRegionCLI, main

STATE = {"weights": torch.arange(4096, dtype=torch.float32), "step": 7}


def _two_checkpoints(tmp_path: Path) -> tuple[Path, Path]:
    """An older good checkpoint and a newer one (mtimes 1000 s and 2000 s)."""
    older, newer = tmp_path / "rollout=000050.ckpt", tmp_path / "rollout=000100.ckpt"
    write_checkpoint(STATE, older)
    write_checkpoint({**STATE, "step": 8}, newer)
    os.utime(older, (1000, 1000))
    os.utime(newer, (2000, 2000))
    return older, newer


# ------------------------------------------------------------------------------ file format
def test_checksum_is_the_zip_comment_over_everything_before_it(tmp_path) -> None:
    path = tmp_path / "a.ckpt"
    write_checkpoint(STATE, path)
    data = path.read_bytes()
    # comment = b"trustregion-sha256:" (19 bytes) + 64 hex digits = 83 bytes, preceded by its
    # 2-byte length; the digest covers every byte before that length field
    expected = hashlib.sha256(data[:-(83 + 2)]).hexdigest()
    assert zipfile.ZipFile(path).comment == b"trustregion-sha256:" + expected.encode()
    assert recorded_digest(path) == expected
    assert verify_checkpoint(path) is True
    # still an ordinary torch.load input
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 7 and torch.equal(loaded["weights"], STATE["weights"])


def test_flipped_bytes_are_refused_naming_the_file_and_a_good_sibling(tmp_path) -> None:
    older, newer = _two_checkpoints(tmp_path)
    data = bytearray(newer.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    newer.write_bytes(bytes(data))
    for load in (read_checkpoint, ChecksummedCheckpointIO().load_checkpoint):
        with pytest.raises(CorruptCheckpointError) as info:
            load(newer)
        assert info.value.path == newer
        assert info.value.alternatives == [older]
        message = str(info.value)
        assert str(newer) in message and str(older) in message
        assert "do not match the checksum" in message


@pytest.mark.parametrize("damage", ["empty", "half", "tail_cut", "plain_half"])
def test_empty_or_truncated_files_raise_one_clear_error(tmp_path, damage) -> None:
    older, newer = _two_checkpoints(tmp_path)
    if damage == "plain_half":  # written without a checksum, then cut short
        torch.save(STATE, newer)
    data = newer.read_bytes()
    cut = {"empty": 0, "half": len(data) // 2, "tail_cut": len(data) - 10,
           "plain_half": len(data) // 2}[damage]
    newer.write_bytes(data[:cut])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "could not be verified" before the error
        with pytest.raises(CorruptCheckpointError) as info:
            read_checkpoint(newer)
    message = str(info.value)
    assert not isinstance(info.value, EOFError)
    assert "central directory" not in message and "weights_only" not in message
    assert str(newer) in message and info.value.alternatives == [older]


def test_no_good_sibling_says_so(tmp_path) -> None:
    path = tmp_path / "only.ckpt"
    path.write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match="no other checkpoint in its directory"):
        read_checkpoint(path)


def test_guard_firing_checkpoints_are_not_suggested(tmp_path) -> None:
    older, newer = _two_checkpoints(tmp_path)
    marked = tmp_path / "rollout=000150-guard_firing.ckpt"
    write_checkpoint(STATE, marked)
    newer.write_bytes(b"")
    with pytest.raises(CorruptCheckpointError) as info:
        read_checkpoint(newer)
    assert info.value.alternatives == [older]


def test_missing_file_lists_verified_checkpoints(tmp_path) -> None:
    older, newer = _two_checkpoints(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        read_checkpoint(tmp_path / "last.ckpt")
    assert str(info.value) == (f"checkpoint {tmp_path / 'last.ckpt'} does not exist; verified "
                               f"checkpoints in {tmp_path}: {newer}, {older}")


def test_checkpoint_without_checksum_loads_with_a_warning(tmp_path) -> None:
    path = tmp_path / "plain.ckpt"
    torch.save(STATE, path)
    assert verify_checkpoint(path) is False
    with pytest.warns(UserWarning, match="could not be verified"):
        assert read_checkpoint(path)["step"] == 7


def test_failed_write_leaves_the_previous_file_intact(tmp_path, monkeypatch) -> None:
    path = tmp_path / "last.ckpt"
    write_checkpoint(STATE, path)
    before = path.read_bytes()

    def save_part_then_fail(obj: Any, file: Any) -> None:
        file.write(b"PK\x03\x04 half an archive")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpointing.torch, "save", save_part_then_fail)
    with pytest.raises(OSError, match="No space left"):
        write_checkpoint({**STATE, "step": 8}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary left


def test_checksummed_io_is_added_unless_the_user_chose_a_checkpoint_io() -> None:
    assert [type(p) for p in with_checksummed_io(None)] == [ChecksummedCheckpointIO]
    assert [type(p) for p in with_checksummed_io("bf16-mixed")] == [str,
                                                                    ChecksummedCheckpointIO]
    own = TorchCheckpointIO()
    assert with_checksummed_io([own]) == [own]


# ---------------------------------------------------------------------------- the callback
class Steps(L.LightningModule):
    """One linear layer; ``signal_at`` maps a training step (1-based) to signals the process
    sends itself during that step."""

    def __init__(self, signal_at: dict[int, list[int]] | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.signal_at = signal_at or {}
        self.calls = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.calls += 1
        for signum in self.signal_at.get(self.calls, []):
            os.kill(os.getpid(), signum)
        return self.layer(batch).pow(2).mean()

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(torch.ones(64, 2), batch_size=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class ScriptedGuard(CollapseGuard):
    """A CollapseGuard whose ``firing`` follows a script: it fires on the given rollout
    batches (1-based), says it restored an earlier state when ``restores``, and does nothing
    else. ``last_seen`` records, at the start of each batch, the global step ``last.ckpt``
    holds (None before it exists)."""

    def __init__(self, fire_on: set[int], restores: bool = False,
                 directory: Path | None = None) -> None:
        super().__init__()
        self.fire_on = fire_on
        self.restores = restores
        self.directory = directory
        self.batches = 0
        self.scripted_firing = False
        self.last_seen: list[int | None] = []

    @property
    def firing(self) -> bool:
        return self.scripted_firing

    @property
    def restored_weights(self) -> bool:
        return self.scripted_firing and self.restores

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        pass

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        pass

    def on_train_batch_start(self, *args: Any) -> None:
        if self.directory is not None:
            last = self.directory / "last.ckpt"
            self.last_seen.append(read_checkpoint(last)["global_step"] if last.exists()
                                  else None)

    def on_train_batch_end(self, *args: Any) -> None:
        self.batches += 1
        self.scripted_firing = self.batches in self.fire_on

    def on_save_checkpoint(self, *args: Any) -> None:
        pass


def _fit(tmp_path: Path, max_steps: int, callback: RolloutCheckpoint,
         module: L.LightningModule | None = None, extra: list[Any] | None = None) -> Path:
    trainer = L.Trainer(max_steps=max_steps, logger=False, default_root_dir=tmp_path,
                        callbacks=[*(extra or []), callback],
                        plugins=[ChecksummedCheckpointIO()], enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module or Steps())
    return tmp_path / "checkpoints"


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_saves_every_n_rollouts_and_at_the_end(tmp_path) -> None:
    callback = RolloutCheckpoint(every_n_rollouts=3, keep_last=None)
    directory = _fit(tmp_path, 7, callback)
    # 7 rollout batches, every 3rd saved (3, 6) and the end (7); last.ckpt is a copy of 7
    assert _names(directory) == ["last.ckpt", "rollout=000003.ckpt", "rollout=000006.ckpt",
                                 "rollout=000007.ckpt"]
    assert (directory / "last.ckpt").read_bytes() == (directory / "rollout=000007.ckpt"
                                                      ).read_bytes()
    for path in directory.iterdir():
        assert verify_checkpoint(path)
    saved = read_checkpoint(directory / "rollout=000006.ckpt")
    assert saved["global_step"] == 6
    assert saved["callbacks"]["RolloutCheckpoint"] == {"rollouts": 6, "guard_firing": False}
    assert callback.last_checkpoint == directory / "rollout=000007.ckpt"
    assert callback.interruption is None


@pytest.mark.parametrize("given", [False, True], ids=["logger_dir", "dirpath"])
def test_checkpoint_directory(tmp_path, given) -> None:
    from lightning.pytorch.loggers import CSVLogger

    callback = RolloutCheckpoint(every_n_rollouts=2,
                                 dirpath=str(tmp_path / "mine") if given else None)
    trainer = L.Trainer(max_steps=2, logger=CSVLogger(tmp_path, name="csv"),
                        default_root_dir=tmp_path, callbacks=[callback],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Steps())
    expected = tmp_path / "mine" if given else tmp_path / "csv" / "version_0" / "checkpoints"
    assert callback.directory == expected
    assert _names(expected) == ["last.ckpt", "rollout=000002.ckpt"]


def test_keep_last_prunes_the_oldest(tmp_path) -> None:
    directory = _fit(tmp_path, 7, RolloutCheckpoint(every_n_rollouts=2, keep_last=2))
    # saves at 2, 4, 6 and the end (7); the newest two stay
    assert _names(directory) == ["last.ckpt", "rollout=000006.ckpt", "rollout=000007.ckpt"]


# The stand-in's DataLoader has no state_dict, so Lightning warns that a mid-epoch resume may
# repeat data; only the rollout count matters here (the real module keeps its prompt position).
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before")
def test_resume_continues_the_rollout_count(tmp_path) -> None:
    directory = _fit(tmp_path, 4, RolloutCheckpoint(every_n_rollouts=4))
    resumed = tmp_path / "resumed"
    trainer = L.Trainer(max_steps=8, logger=False, default_root_dir=resumed,
                        callbacks=[RolloutCheckpoint(every_n_rollouts=4)],
                        plugins=[ChecksummedCheckpointIO()], enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(Steps(), ckpt_path=directory / "last.ckpt")
    # 4 restored + 4 more rollout batches: the next save is rollout 8, not 4
    assert _names(resumed / "checkpoints") == ["last.ckpt", "rollout=000008.ckpt"]


def test_saves_while_the_guard_fires_are_marked_and_never_become_last(tmp_path) -> None:
    guard = ScriptedGuard(fire_on={4, 5, 6})
    directory = _fit(tmp_path, 6, RolloutCheckpoint(every_n_rollouts=2, keep_last=None),
                     extra=[guard])
    assert _names(directory) == ["last.ckpt", "rollout=000002.ckpt",
                                 "rollout=000004-guard_firing.ckpt",
                                 "rollout=000006-guard_firing.ckpt"]
    # last.ckpt stays on the newest healthy save
    assert (directory / "last.ckpt").read_bytes() == (directory / "rollout=000002.ckpt"
                                                      ).read_bytes()
    marked = read_checkpoint(directory / "rollout=000004-guard_firing.ckpt")
    assert marked["callbacks"]["RolloutCheckpoint"] == {"rollouts": 4, "guard_firing": True}


def test_a_guard_that_restored_a_good_state_rewrites_last_at_once(tmp_path) -> None:
    # Saves every 4 rollout batches. The guard fires on batch 5 and restores an earlier state:
    # last.ckpt (global step 4, weights the guard may have just rejected) is rewritten from
    # the state in memory right after batch 5, not at the next periodic save.
    guard = ScriptedGuard(fire_on={5}, restores=True, directory=tmp_path / "checkpoints")
    directory = _fit(tmp_path, 6, RolloutCheckpoint(every_n_rollouts=4, keep_last=None),
                     extra=[guard])
    # seen at the start of batches 1..6: none, none, none, none, step 4, step 5
    assert guard.last_seen == [None, None, None, None, 4, 5]
    assert _names(directory) == ["last.ckpt", "rollout=000004.ckpt", "rollout=000006.ckpt"]
    assert (directory / "last.ckpt").read_bytes() == (directory / "rollout=000006.ckpt"
                                                      ).read_bytes()


def test_a_marked_save_of_restored_weights_becomes_last(tmp_path) -> None:
    # The guard fires on batches 4 to 6 and restores each time: the saves are marked, and
    # last.ckpt follows them, because they hold an earlier known state, not rejected weights.
    guard = ScriptedGuard(fire_on={4, 5, 6}, restores=True)
    directory = _fit(tmp_path, 6, RolloutCheckpoint(every_n_rollouts=2, keep_last=None),
                     extra=[guard])
    assert _names(directory) == ["last.ckpt", "rollout=000002.ckpt",
                                 "rollout=000004-guard_firing.ckpt",
                                 "rollout=000006-guard_firing.ckpt"]
    assert (directory / "last.ckpt").read_bytes() == (
        directory / "rollout=000006-guard_firing.ckpt").read_bytes()


def test_sigint_finishes_the_batch_saves_and_stops(tmp_path) -> None:
    before = signal.getsignal(signal.SIGINT)
    callback = RolloutCheckpoint(every_n_rollouts=100)
    directory = _fit(tmp_path, 50, callback, Steps(signal_at={3: [signal.SIGINT]}))
    assert _names(directory) == ["last.ckpt", "rollout=000003.ckpt"]
    assert callback.interruption == Interruption(signal.SIGINT, directory / "rollout=000003.ckpt")
    assert callback.interruption.exit_code == 130  # 128 + SIGINT (2)
    assert read_checkpoint(directory / "last.ckpt")["global_step"] == 3
    assert signal.getsignal(signal.SIGINT) is before


def test_second_sigint_stops_at_once_without_saving(tmp_path) -> None:
    callback = RolloutCheckpoint(every_n_rollouts=100)
    with pytest.raises(SystemExit) as info:  # Lightning's Ctrl-C handling: status 1
        _fit(tmp_path, 50, callback, Steps(signal_at={3: [signal.SIGINT, signal.SIGINT]}))
    assert info.value.code == 1
    assert not (tmp_path / "checkpoints").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_interruption_message_replaces_ckpt_path() -> None:
    done = Interruption(signal.SIGTERM, Path("/runs/x/rollout=000004.ckpt"))
    assert done.exit_code == 143  # 128 + SIGTERM (15)
    assert done.message(["--config", "a.yaml", "--ckpt_path", "old.ckpt"]) == (
        "trustregion: stopped by SIGTERM; checkpoint saved to /runs/x/rollout=000004.ckpt; "
        "resume with: trustregion fit --config a.yaml --ckpt_path /runs/x/rollout=000004.ckpt")


@pytest.mark.parametrize(("name", "value", "message"), [
    ("every_n_rollouts", 0, "every_n_rollouts must be an integer ≥ 1; got 0"),
    ("keep_last", 0, "keep_last must be an integer ≥ 1 (or None to keep every file); got 0"),
    ("save_last", "yes", "save_last must be True or False; got 'yes'"),
    ("dirpath", "", "dirpath must be a non-empty string; got ''"),
])
def test_bad_settings_are_refused(name, value, message) -> None:
    with pytest.raises(ValueError, match=f"^{message}$".replace("(", r"\(").replace(")", r"\)")):
        RolloutCheckpoint(**{name: value})


# ----------------------------------------------------------------------- trustregion fit
def _cli_config(tmp_path: Path, random_model_dir: Path, **trainer: Any) -> Path:
    return tiny_cli_config(tmp_path, random_model_dir, trainer=trainer)


def test_fit_checkpoints_by_default_with_checksummed_io(tmp_path, random_model_dir) -> None:
    path = _cli_config(tmp_path, random_model_dir)
    cli = TrustRegionCLI(args=["--config", str(path), "--checkpoint.every_n_rollouts=20"],
                         run=False)
    [callback] = [c for c in cli.trainer.callbacks if isinstance(c, RolloutCheckpoint)]
    assert callback.every_n_rollouts == 20
    assert type(cli.trainer.strategy.checkpoint_io) is ChecksummedCheckpointIO


def test_fit_keeps_a_users_checkpoint_io(tmp_path, random_model_dir) -> None:
    path = _cli_config(tmp_path, random_model_dir, plugins=[
        {"class_path": "lightning.pytorch.plugins.io.TorchCheckpointIO"}])
    cli = TrustRegionCLI(args=["--config", str(path)], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is TorchCheckpointIO


def test_a_second_rolloutcheckpoint_in_trainer_callbacks_is_refused(
        tmp_path, random_model_dir) -> None:
    path = _cli_config(tmp_path, random_model_dir,
                       callbacks=["trustregion.callbacks.RolloutCheckpoint"])
    with pytest.raises(ValueError, match="set its arguments in the checkpoint: section"):
        TrustRegionCLI(args=["--config", str(path)], run=False)


def test_disabled_checkpointing_adds_no_callback_and_reports_unused_settings(
        tmp_path, random_model_dir) -> None:
    path = _cli_config(tmp_path, random_model_dir, enable_checkpointing=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = TrustRegionCLI(args=["--config", str(path)], run=False)
    assert not [w for w in caught if "enable_checkpointing" in str(w.message)]  # defaults
    assert not any(isinstance(c, RolloutCheckpoint) for c in cli.trainer.callbacks)
    with pytest.warns(UserWarning, match=r"enable_checkpointing is false, so no checkpoint is "
                                         r"written and the checkpoint settings cannot take "
                                         r"effect \(RolloutCheckpoint\(every_n_rollouts=5,"):
        cli = TrustRegionCLI(args=["--config", str(path), "--checkpoint.every_n_rollouts=5"],
                             run=False)
    assert not any(isinstance(c, RolloutCheckpoint) for c in cli.trainer.callbacks)


def test_every_example_config_checkpoints_periodically() -> None:
    from trustregion.batching import BatchSettings

    configs = sorted((Path(__file__).parents[1] / "examples" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        config = yaml.safe_load(path.read_text())
        every = RolloutCheckpoint(**config["checkpoint"]).every_n_rollouts
        per_rollout = BatchSettings(**config["model"].get("batching", {}))
        rollouts = config["trainer"]["max_steps"] // per_rollout.optimizer_steps_per_rollout
        # at least two periodic saves before the run ends
        assert 2 * every <= rollouts, path.name


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_the_command_answers_a_corrupt_checkpoint_with_one_message(
        tmp_path, random_model_dir, capsys, subcommand) -> None:
    # A checkpoint of a real run, cut in half: `trustregion fit/validate --ckpt_path` print one
    # line naming the file and the good checkpoint to use instead, and exit 2; no traceback,
    # no zip or EOF wording.
    path = _cli_config(tmp_path, random_model_dir, max_steps=2)
    main(["fit", "--config", str(path), "--checkpoint.every_n_rollouts=1"])
    directory = tmp_path / "checkpoints"
    good, bad = directory / "rollout=000001.ckpt", directory / "rollout=000002.ckpt"
    data = bad.read_bytes()
    bad.write_bytes(data[:len(data) // 2])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--config", str(path), f"--ckpt_path={bad}"])
    assert exit_info.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"trustregion: checkpoint {bad} ")
    assert str(good) in line
    for wording in ("central directory", "EOFError", "weights_only", "Traceback"):
        assert wording not in line


def test_two_damaged_checkpoints_still_give_the_clear_error(tmp_path) -> None:
    # each damaged file's error lists the files that verify; looking at the other damaged one
    # must not raise (and so recurse) in turn. Both of these fail their check outright: an
    # empty file, and one with flipped bytes under an intact checksum record.
    older, newer = _two_checkpoints(tmp_path)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    data = bytearray(newer.read_bytes())
    data[100:164] = bytes(b ^ 0xFF for b in data[100:164])
    newer.write_bytes(bytes(data))
    for damaged in (empty, newer):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(CorruptCheckpointError) as info:
                read_checkpoint(damaged)
        assert info.value.alternatives == [older]
    with pytest.raises(FileNotFoundError, match=rf"verified checkpoints in {tmp_path}: {older}$"):
        read_checkpoint(tmp_path / "missing.ckpt")


@pytest.mark.parametrize(("given", "says"), [
    ("last", "trustregion fit writes last.ckpt into the run's checkpoints directory"),
    ("nowhere/last.ckpt", "checkpoint nowhere/last.ckpt does not exist"),
])
def test_a_ckpt_path_that_names_no_file_is_refused_before_the_run(
        tmp_path, random_model_dir, capsys, given, says) -> None:
    path = _cli_config(tmp_path, random_model_dir)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), f"--ckpt_path={given}"])
    assert exit_info.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("trustregion: ") and says in line
    assert not (tmp_path / "config.yaml.bak").exists() and not list(tmp_path.glob("version_*"))


class SignalAtTrainEnd(L.Callback):
    """Sends the process SIGTERM once training has run its last batch (Lightning runs this
    before the checkpoint callback's own on_train_end)."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_after_the_last_batch_leaves_a_finished_run(tmp_path) -> None:
    callback = RolloutCheckpoint(every_n_rollouts=100)
    directory = _fit(tmp_path, 3, callback, extra=[SignalAtTrainEnd()])
    # the run finished all 3 rollout batches: it is saved as usual, and not reported stopped
    assert _names(directory) == ["last.ckpt", "rollout=000003.ckpt"]
    assert callback.interruption is None


def test_resuming_from_a_checkpoint_without_a_checksum_warns_once(
        tmp_path, random_model_dir) -> None:
    # a checkpoint saved without trustregion's I/O (plain torch.save) still resumes; that it
    # could not be verified is said once, not by both the resume check and the trainer
    path = _cli_config(tmp_path, random_model_dir)
    main(["fit", "--config", str(path)])
    plain = tmp_path / "plain.ckpt"
    torch.save(read_checkpoint(tmp_path / "checkpoints" / "last.ckpt"), plain)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", "--config", str(path), f"--ckpt_path={plain}", "--trainer.max_steps=2"])
    unverified = [w for w in caught if "could not be verified" in str(w.message)]
    assert len(unverified) == 1 and str(plain) in str(unverified[0].message)
