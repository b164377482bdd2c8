"""``trustregion export CKPT OUT_DIR`` writes a checkpoint's policy, exactly, as a Hugging Face
``save_pretrained`` directory, from a single-file checkpoint or a sharded checkpoint directory,
and refuses a missing or corrupt checkpoint and a non-empty output directory in one line."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from cli_configs import tiny_cli_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from trustregion.checkpointing import (
    SHARDED_STATE,
    read_checkpoint,
    write_checkpoint,
    write_manifest,
)
from trustregion.cli import main
from trustregion.export import ExportRefused, export_policy, policy_weights
from trustregion.models.loading import load_model
from trustregion.module import TrustRegionModule


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, random_model_dir: Path) -> Path:
    """``last.ckpt`` of one rollout batch of ``trustregion fit`` (one optimiser step at lr 0.1
    on a task that rewards even a random model, so the policy's weights have moved)."""
    root = tmp_path_factory.mktemp("export")
    config = tiny_cli_config(root, random_model_dir, seed_everything=0, max_new_tokens=8,
                             checkpoint={"dirpath": str(root / "checkpoints")})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", ["trustregion"])
        main(["fit", "--config", str(config), "--model.optimizer.init_args.lr=0.1",
              "--model.task={class_path: conftest.DigitRichArithmetic}"])
    return root / "checkpoints" / "last.ckpt"


def _saved_policy(path: Path) -> dict[str, torch.Tensor]:
    """The policy's tensors as the single-file checkpoint at ``path`` holds them."""
    return {name.removeprefix("policy."): value
            for name, value in read_checkpoint(path)["state_dict"].items()
            if name.startswith("policy.")}


def _assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        assert torch.equal(got[name], value), name


def test_export_writes_the_policy_exactly(checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "policy"
    main(["export", str(checkpoint), str(out)])
    assert capsys.readouterr().out == f"{out}\n"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    saved = _saved_policy(checkpoint)
    fresh = load_model(read_checkpoint(checkpoint)["hyper_parameters"]["policy"])[0]
    # the checkpoint's weights, not the source's freshly initialised ones
    assert not torch.equal(fresh.state_dict()["model.norm.weight"], saved["model.norm.weight"])
    _assert_same(AutoModelForCausalLM.from_pretrained(out).state_dict(), saved)
    model, tokenizer = load_model(str(out))  # the model source PATH
    _assert_same(model.state_dict(), saved)
    assert tokenizer.pad_token is not None and len(tokenizer) == model.config.vocab_size


def test_export_keeps_the_saved_dtype(checkpoint, tmp_path) -> None:
    state = read_checkpoint(checkpoint)
    state["state_dict"] = {name: value.to(torch.bfloat16) if name.startswith("policy.")
                           else value for name, value in state["state_dict"].items()}
    bf16 = tmp_path / "bf16.ckpt"
    write_checkpoint(state, bf16)
    out = export_policy(bf16, tmp_path / "policy")
    stored = load_file(out / "model.safetensors")
    assert {value.dtype for value in stored.values()} == {torch.bfloat16}
    saved = _saved_policy(bf16)
    # tied: lm_head.weight is model.embed_tokens.weight, stored once
    assert "lm_head.weight" not in stored
    _assert_same({**stored, "lm_head.weight": stored["model.embed_tokens.weight"]}, saved)


def test_a_sharded_checkpoint_directory_is_consolidated(random_model_dir, tmp_path) -> None:
    # The layout ModelParallelStrategy writes, made on one process: the model's tensors as
    # torch.distributed.checkpoint shards under "state_dict", the rest in meta.pt, and the
    # checksum manifest RolloutCheckpoint adds.
    module = TrustRegionModule(policy=f"config:{random_model_dir}")
    with torch.no_grad():
        for index, parameter in enumerate(module.policy.parameters()):
            parameter.fill_(index + 0.5)  # 0.5, 1.5, …: unlike any fresh initialisation
    directory = tmp_path / "rollout=000001.ckpt"
    with warnings.catch_warnings():  # one process on purpose
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"state_dict": module.state_dict()}, checkpoint_id=str(directory),
                 no_dist=True)
    torch.save({"hyper_parameters": dict(module.hparams), "trustregion": {"world_size": 2}},
               directory / SHARDED_STATE)
    write_manifest(directory)

    hparams, weights = policy_weights(directory)
    assert hparams["policy"] == f"config:{random_model_dir}"
    expected = module.policy.state_dict()
    _assert_same(weights, expected)
    out = tmp_path / "empty"
    out.mkdir()  # an empty directory is used
    assert export_policy(directory, out) == out
    _assert_same(AutoModelForCausalLM.from_pretrained(out).state_dict(), expected)


def _last_stderr_line(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_a_missing_checkpoint_is_refused_in_one_line(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "none.ckpt"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert _last_stderr_line(capsys) == [
        f"trustregion export: checkpoint {tmp_path / 'none.ckpt'} does not exist; verified "
        f"checkpoints in {tmp_path}: none"]
    assert not (tmp_path / "out").exists()


def test_a_corrupt_checkpoint_is_refused_in_one_line(checkpoint, tmp_path, capsys) -> None:
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(corrupt), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    [line] = _last_stderr_line(capsys)
    assert line.startswith(f"trustregion export: checkpoint {corrupt} is unusable: its "
                           "contents do not match the checksum recorded when it was written")
    assert not (tmp_path / "out").exists()


def test_an_output_directory_with_files_is_refused(checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(checkpoint), str(out)])
    assert exit_info.value.code == 2
    assert _last_stderr_line(capsys) == [
        f"trustregion export: {out} exists and is not an empty directory; give a new or empty "
        "directory to export to"]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_checkpoint_without_a_policy_is_refused(tmp_path) -> None:
    path = tmp_path / "other.ckpt"
    write_checkpoint({"state_dict": {"layer.weight": torch.zeros(2)},
                      "hyper_parameters": {"hidden": 4}}, path)
    with pytest.raises(ExportRefused, match=rf"checkpoint {path} holds no trustregion policy "
                                            r"\(no 'policy' hyperparameter or no policy "
                                            r"weights\): export a checkpoint written by "
                                            "trustregion fit"):
        export_policy(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
