"""Sharded checkpoints: written by every process under FSDP (Lightning's
``ModelParallelStrategy``) as checksummed directories, resumed to the same logged rows as an
uninterrupted run, refused on another number of processes or when damaged, and exported to a
Hugging Face directory on one process.

The two-process run starts this file as a script, once per rank, with the variables a launcher
such as ``torchrun`` sets (``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``), so
Lightning launches nothing and both ``trustregion fit`` runs — the uninterrupted one, then the
one resumed from its checkpoint after two rollout batches — share one process group:

    PYTHONPATH=tests:tests/distributed LOCAL_RANK=0 WORLD_SIZE=2 ... \\
        python tests/distributed/test_sharded_checkpoint.py CONFIG OUT
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from cli_runs import fit_config, free_port, process_env
from conftest import DigitRichArithmetic

from trustregion.batching import BatchSettings
from trustregion.callbacks.checkpoint import RolloutCheckpoint
from trustregion.checkpointing import (
    MANIFEST,
    SHARDED_STATE,
    ChecksummedCheckpointIO,
    CorruptCheckpointError,
    copy_checkpoint,
    read_checkpoint,
    recorded_digest,
    verified_checkpoints,
    verify_checkpoint,
    write_checkpoint,
    write_manifest,
)
from trustregion.cli import TrustRegionCLI, main
from trustregion.export import export_policy
from trustregion.module import TrustRegionModule
from trustregion.resume import ResumeRefused
from trustregion.rollout import SamplingSettings

# 3 rollout batches of 4 prompts × 2 completions; 2 optimiser steps each (mini-batches of 4
# sequences); the behaviour model syncs every 3 optimiser steps, so the checkpoint after 2
# rollout batches (step 4) falls between two syncs.
ROLLOUTS = 3
MODEL = {"task": {"class_path": "conftest.DigitRichArithmetic"},
         "batching": {"group_size": 2, "prompts_per_step": 4, "mini_batch_size": 4},
         "sampling": {"max_new_tokens": 4}, "sync_every": 3,
         "optimizer": {"class_path": "trustregion.optim.AdamW", "init_args": {"lr": 5e-3}}}
FSDP = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
        "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1}}
RESUME_TOLERANCE = {"rel": 1e-5, "abs": 1e-7}  # as tests/test_module.py's single-process resume


# ---------------------------------------------------------------- one process: the format
@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    """A sharded checkpoint directory made on one process, laid out as ModelParallelStrategy
    lays it out (``torch.distributed.checkpoint`` shards and ``meta.pt``), with its manifest."""
    return _sharded_checkpoint(tmp_path / "rollout=000002.ckpt", step=2)


def _sharded_checkpoint(directory: Path, step: int) -> Path:
    with warnings.catch_warnings():  # one process on purpose
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"state_dict": {"policy.weight": torch.arange(6.0).reshape(2, 3)}},
                 checkpoint_id=str(directory), no_dist=True)
    torch.save({"global_step": step, "trustregion": {"world_size": 2}},
               directory / SHARDED_STATE)
    write_manifest(directory)
    return directory


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_the_manifest_lists_every_file_as_sha256sum_does(sharded) -> None:
    assert _files(sharded) == [".metadata", "__0_0.distcp", MANIFEST, SHARDED_STATE]
    expected = "".join(f"{hashlib.sha256((sharded / name).read_bytes()).hexdigest()}  {name}\n"
                       for name in (".metadata", "__0_0.distcp", SHARDED_STATE))
    assert (sharded / MANIFEST).read_text() == expected
    assert verify_checkpoint(sharded) is True
    assert recorded_digest(sharded) == hashlib.sha256(expected.encode()).hexdigest()
    # reading a directory reads meta.pt, the state beside the shards
    assert read_checkpoint(sharded) == {"global_step": 2, "trustregion": {"world_size": 2}}


@pytest.mark.parametrize("damage", ["flipped", "missing", "manifest"])
def test_a_damaged_sharded_checkpoint_is_refused_naming_the_file(tmp_path, damage) -> None:
    older = _sharded_checkpoint(tmp_path / "rollout=000001.ckpt", step=1)
    os.utime(older, ns=(1, 1))  # older than the damaged one
    newer = _sharded_checkpoint(tmp_path / "rollout=000002.ckpt", step=2)
    shard = newer / "__0_0.distcp"
    if damage == "flipped":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        problem = "its file __0_0.distcp does not match the checksum recorded when it was written"
    elif damage == "missing":
        shard.unlink()
        problem = f"its file __0_0.distcp, listed in {MANIFEST}, is missing"
    else:
        (newer / MANIFEST).write_text("not a checksum  meta.pt\n")
        problem = f"its checksum manifest {MANIFEST} is damaged"
    for check in (verify_checkpoint, read_checkpoint):
        with pytest.raises(CorruptCheckpointError) as info:
            check(newer)
        assert info.value.path == newer and info.value.alternatives == [older]
        assert str(info.value).startswith(f"checkpoint {newer} is unusable: {problem}")
    with pytest.raises(CorruptCheckpointError, match=problem):
        export_policy(newer, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_sharded_checkpoint_without_a_manifest_loads_with_a_warning(sharded, tmp_path) -> None:
    (sharded / MANIFEST).unlink()
    assert verify_checkpoint(sharded) is False
    assert verified_checkpoints(tmp_path) == []
    with pytest.warns(UserWarning, match=f"checkpoint {sharded} has no recorded checksum "
                                         f"\\(a sharded checkpoint without {MANIFEST}\\)"):
        assert read_checkpoint(sharded)["global_step"] == 2
    # a directory that is not a checkpoint at all
    (tmp_path / "plots.ckpt").mkdir()
    with pytest.raises(CorruptCheckpointError, match=f"it is a directory without "
                                                     f"{SHARDED_STATE}, not a sharded"):
        read_checkpoint(tmp_path / "plots.ckpt")


def test_a_sharded_checkpoint_is_refused_by_the_single_file_reader(sharded) -> None:
    # what Lightning's default and DDP strategies read a checkpoint with, under trustregion fit
    with pytest.raises(ValueError, match=f"checkpoint {sharded} is a sharded checkpoint .*, "
                                         "which only ModelParallelStrategy reads; resume it"):
        ChecksummedCheckpointIO().load_checkpoint(sharded)


def test_copying_a_sharded_checkpoint_replaces_the_target_whole(sharded, tmp_path) -> None:
    last = tmp_path / "last.ckpt"
    older = _sharded_checkpoint(last, step=1)
    (older / "__1_0.distcp").write_bytes(b"a shard of an older save")
    copy_checkpoint(sharded, last)
    assert _files(last) == _files(sharded)  # nothing of the older save is left
    assert verify_checkpoint(last) and read_checkpoint(last)["global_step"] == 2
    for name in _files(sharded):  # hard links: no second copy of the data
        assert (last / name).stat().st_ino == (sharded / name).stat().st_ino
    # a single file where a directory was, and back
    write_checkpoint({"global_step": 5}, tmp_path / "file.ckpt")
    copy_checkpoint(tmp_path / "file.ckpt", last)
    assert last.is_file() and read_checkpoint(last)["global_step"] == 5
    copy_checkpoint(sharded, last)
    assert last.is_dir() and read_checkpoint(last)["global_step"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ------------------------------------------------ one process: the world size on resume
@pytest.fixture(scope="module")
def single_process_checkpoint(tmp_path_factory: pytest.TempPathFactory,
                              random_model_dir: Path) -> tuple[Path, Path]:
    """(config, checkpoint) of one rollout batch of ``trustregion fit`` on one process."""
    root = tmp_path_factory.mktemp("world_size")
    config = fit_config(root, random_model_dir, model={}, trainer={
        "enable_checkpointing": True, "logger": False})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", ["trustregion"])
        main(["fit", "--config", str(config)])
    return config, root / "checkpoints" / "last.ckpt"


def test_the_world_size_is_recorded(single_process_checkpoint) -> None:
    _, checkpoint = single_process_checkpoint
    assert read_checkpoint(checkpoint)["trustregion"]["world_size"] == 1


def _written_by_two(checkpoint: Path, directory: Path) -> Path:
    """A copy of ``checkpoint`` that says two processes wrote it (as a DDP run's does)."""
    state = read_checkpoint(checkpoint)
    state["trustregion"]["world_size"] = 2
    path = directory / "ddp.ckpt"
    write_checkpoint(state, path)
    return path


def test_resuming_on_another_world_size_is_refused_by_the_cli(single_process_checkpoint,
                                                              tmp_path, capsys) -> None:
    config, checkpoint = single_process_checkpoint
    ddp = _written_by_two(checkpoint, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), f"--ckpt_path={ddp}", "--trainer.max_steps=2"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"trustregion: cannot resume from {ddp}: it was written by 2 processes and this run "
        "has 1 (trainer.devices × trainer.num_nodes). A checkpoint resumes only on the number "
        "of processes that wrote it: set trainer.devices and trainer.num_nodes to make 2, or "
        f"export its policy (trustregion export {ddp} OUT_DIR) and start a new run from it "
        "(model.policy: OUT_DIR)"]


def test_resuming_on_another_world_size_is_refused_in_python(single_process_checkpoint,
                                                             random_model_dir, tmp_path) -> None:
    _, checkpoint = single_process_checkpoint
    ddp = _written_by_two(checkpoint, tmp_path)
    module = TrustRegionModule(policy=f"config:{random_model_dir}", task=DigitRichArithmetic(),
                               batching=BatchSettings(group_size=2, prompts_per_step=2),
                               sampling=SamplingSettings(max_new_tokens=2), seed=0)
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[RolloutCheckpoint(dirpath=str(tmp_path / "out"))])
    with pytest.raises(ResumeRefused, match="it was written by 2 processes and this run has 1"):
        trainer.fit(module, ckpt_path=ddp)
    assert trainer.global_step == 0  # refused before the first rollout batch


# -------------------------------------------------------------------- two processes (FSDP)
def _run_as_one_rank(config: Path, out: Path) -> None:
    """What each of the two processes runs: the uninterrupted run, then the run resumed from
    its sharded checkpoint after two rollout batches; each saves the policy it ends with."""
    sys.argv = sys.argv[:1]
    from trustregion.sharding import full_state_dict

    for name, extra in (("uninterrupted", []),
                        ("resumed", ["--ckpt_path", str(_checkpoints(out, 0) /
                                                        "rollout=000002.ckpt")])):
        cli = TrustRegionCLI(args=["fit", "--config", str(config), *extra])
        policy = full_state_dict(cli.model.policy)  # every process takes part
        if cli.trainer.is_global_zero:
            torch.save(policy, out / f"{name}.pt")


def _checkpoints(out: Path, version: int) -> Path:
    return out / "csv" / f"version_{version}" / "checkpoints"


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory: pytest.TempPathFactory, random_model_dir: Path
              ) -> tuple[Path, Path]:
    """(config, run directory) of the two-process runs of :func:`_run_as_one_rank`."""
    out = tmp_path_factory.mktemp("fsdp")
    config = fit_config(out, random_model_dir, model=MODEL, trainer={
        "max_steps": 2 * ROLLOUTS, "enable_checkpointing": True, "strategy": FSDP,
        "devices": 2, "accelerator": "cpu"})
    values = yaml.safe_load(config.read_text())
    values["checkpoint"] = {"every_n_rollouts": 1, "keep_last": 2}
    config.write_text(yaml.safe_dump(values))
    env = {**process_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": "2", "NODE_RANK": "0"}
    processes = []
    for rank in (0, 1):
        with (out / f"rank{rank}.txt").open("w") as log:
            processes.append(subprocess.Popen(
                [sys.executable, __file__, str(config), str(out)], cwd=out,
                env={**env, "LOCAL_RANK": str(rank)}, stdout=subprocess.DEVNULL, stderr=log))
    try:
        for process in processes:
            process.wait(timeout=400)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    logs = [(out / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert [process.returncode for process in processes] == [0, 0], logs
    assert not any("could not be verified" in log for log in logs), logs
    return config, out


def test_a_sharded_checkpoint_is_a_checksummed_directory(fsdp_runs) -> None:
    _, out = fsdp_runs
    directory = _checkpoints(out, 0)
    # keep_last=2 deleted rollout=000001.ckpt, a directory; no partial writes are left
    assert _files(directory) == ["last.ckpt", "rollout=000002.ckpt", "rollout=000003.ckpt"]
    for name in _files(directory):
        checkpoint = directory / name
        assert _files(checkpoint) == [".metadata", "__0_0.distcp", "__1_0.distcp", MANIFEST,
                                      SHARDED_STATE]
        assert verify_checkpoint(checkpoint) is True
    assert read_checkpoint(directory / "last.ckpt") == read_checkpoint(
        directory / "rollout=000003.ckpt")  # last.ckpt is the newest save
    state = read_checkpoint(directory / "rollout=000002.ckpt")
    assert state["global_step"] == 4 and state["trustregion"]["world_size"] == 2
    assert state["trustregion"]["steps_since_sync"] == 1  # 4 steps, synced at 3


def test_a_resumed_sharded_run_logs_what_the_uninterrupted_run_logs(fsdp_runs) -> None:
    _, out = fsdp_runs
    expected, resumed = _rows(out, 0), _rows(out, 1)
    assert sorted(expected) == [0, 1, 2] and sorted(resumed) == [2]
    assert expected[2]["train/grad_norm"] > 0  # the run really learns something
    assert resumed[2].keys() == expected[2].keys()
    for key, value in expected[2].items():
        assert resumed[2][key] == pytest.approx(value, **RESUME_TOLERANCE), key
    uninterrupted = torch.load(out / "uninterrupted.pt")
    for name, value in torch.load(out / "resumed.pt").items():
        torch.testing.assert_close(value, uninterrupted[name], rtol=RESUME_TOLERANCE["rel"],
                                   atol=RESUME_TOLERANCE["abs"])


def _rows(out: Path, version: int) -> dict[int, dict[str, float]]:
    """The rows of ``out/csv/version_<version>/metrics.csv`` by step (the uninterrupted run
    is version 0, the resumed one version 1)."""
    with (out / "csv" / f"version_{version}" / "metrics.csv").open() as file:
        return {int(row["step"]): {key: float(value) for key, value in row.items()
                                   if value != "" and key not in ("step", "epoch")}
                for row in csv.DictReader(file)}


def test_a_sharded_checkpoint_exports_the_policy_exactly(fsdp_runs, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    _, out = fsdp_runs
    exported = export_policy(_checkpoints(out, 0) / "last.ckpt", tmp_path / "policy")
    weights = AutoModelForCausalLM.from_pretrained(exported).state_dict()
    policy = torch.load(out / "uninterrupted.pt")
    assert sorted(weights) == sorted(policy)
    for name, value in policy.items():
        assert torch.equal(weights[name], value), name


def test_a_sharded_checkpoint_is_refused_on_one_process(fsdp_runs, capsys) -> None:
    config, out = fsdp_runs
    checkpoint = _checkpoints(out, 0) / "rollout=000002.ckpt"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--trainer.strategy=auto", "--trainer.devices=1",
              f"--ckpt_path={checkpoint}"])
    assert exit_info.value.code == 2
    [line] = _refusals(capsys.readouterr().err)
    assert line.startswith(f"trustregion: cannot resume from {checkpoint}: it was written by 2 "
                           "processes and this run has 1")


def _refusals(stderr: str) -> list[str]:
    """The lines ``trustregion`` wrote to say why it stopped (Lightning's own messages on
    starting a trainer may come before them)."""
    return [line for line in stderr.splitlines() if line.startswith("trustregion:")]


def test_a_damaged_shard_is_refused_before_resuming(fsdp_runs, tmp_path, capsys) -> None:
    config, out = fsdp_runs
    damaged = tmp_path / "rollout=000002.ckpt"
    shutil.copytree(_checkpoints(out, 0) / "rollout=000002.ckpt", damaged)  # real copies
    shard = damaged / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), f"--ckpt_path={damaged}"])
    assert exit_info.value.code == 2
    [line] = _refusals(capsys.readouterr().err)
    assert line.startswith(f"trustregion: checkpoint {damaged} is unusable: its file "
                           "__1_0.distcp does not match the checksum recorded when it was "
                           "written")


if __name__ == "__main__":
    _run_as_one_rank(Path(sys.argv[1]), Path(sys.argv[2]))
