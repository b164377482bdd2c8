"""``trustregion predict``: a checkpoint's policy completes the prompts of a JSONL file, and the
completions are written as JSON lines."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import yaml

from tests.cli_configs import tiny_cli_config
from trustregion.callbacks import CompletionWriter
from trustregion.cli import main
from trustregion.evaluation import generate_completions
from trustregion.module import TrustRegionModule
from trustregion.prediction import (
    Completion,
    PredictionBatches,
    PredictionSettings,
    prediction_batches,
)
from trustregion.tasks.jsonl import UTF8_BOM, PromptLine, load_jsonl_prompts

PROMPTS = ["12+7=", "3-1=", "sort:312="]
MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, random_model_dir: Path
            ) -> tuple[Path, Path]:
    """(config, checkpoint) of one rollout batch of training with a large learning rate, so
    the checkpoint's policy differs from the configured one."""
    directory = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as patch:  # as conftest's command_line_of_the_cli
        patch.setattr("sys.argv", ["trustregion"])
        return _train(directory, random_model_dir)


def _train(directory: Path, random_model_dir: Path) -> tuple[Path, Path]:
    # the run directory is not the config's: each command saves its config.yaml there
    config = tiny_cli_config(directory, random_model_dir, max_new_tokens=MAX_NEW_TOKENS,
                             trainer={"default_root_dir": str(directory / "run")},
                             seed_everything=3)
    values = yaml.safe_load(config.read_text())
    values["model"]["optimizer"] = {"class_path": "trustregion.optim.AdamW",
                                    "init_args": {"lr": 0.05}}
    # rewards that even a random model earns some of: non-zero advantages, so a gradient
    values["model"]["task"] = {"class_path": "tests.conftest.DigitRichArithmetic"}
    config.write_text(yaml.safe_dump(values))
    main(["fit", "--config", str(config)])
    (checkpoint,) = directory.rglob("last.ckpt")
    return config, checkpoint


def _prompt_file(path: Path) -> Path:
    # a blank second line: the prompts sit on lines 1, 3 and 4
    lines = [json.dumps({"prompt": PROMPTS[0], "id": "a"}), "",
             json.dumps({"prompt": PROMPTS[1]}), json.dumps({"prompt": PROMPTS[2]})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _predict(trained: tuple[Path, Path], prompts: Path, output: Path, *extra: str) -> None:
    config, checkpoint = trained
    main(["predict", "--config", str(config), "--ckpt_path", str(checkpoint),
          "--prediction.prompts", str(prompts), "--prediction.output", str(output), *extra])


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_sampled_completions_one_line_each_with_exact_fields(trained, tmp_path, capsys) -> None:
    output = tmp_path / "out.jsonl"
    _predict(trained, _prompt_file(tmp_path / "p.jsonl"), output, "--prediction.greedy=false",
             "--prediction.samples=2", "--prediction.batch_size=2")
    records = _records(output)
    # 3 prompts × 2 samples = 6 lines, prompt by prompt, over two batches (2 + 1 prompts)
    assert [(r["line"], r["sample"], r["prompt"]) for r in records] == [
        (1, 0, PROMPTS[0]), (1, 1, PROMPTS[0]), (3, 0, PROMPTS[1]), (3, 1, PROMPTS[1]),
        (4, 0, PROMPTS[2]), (4, 1, PROMPTS[2])]
    assert all(list(r) == ["prompt", "completion", "sample", "line"] for r in records)
    assert all(isinstance(r["completion"], str) for r in records)
    assert f"wrote 6 completions to {output}" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file became the output


def test_greedy_completions_are_the_checkpoint_policy_s(trained, tmp_path,
                                                        random_model_dir) -> None:
    output = tmp_path / "greedy.jsonl"
    _predict(trained, _prompt_file(tmp_path / "p.jsonl"), output)
    loaded = TrustRegionModule.load_from_checkpoint(trained[1])
    direct = generate_completions(loaded.policy, loaded.tokenizer, PROMPTS, greedy=True,
                                  max_new_tokens=MAX_NEW_TOKENS)
    records = _records(output)
    assert [r["completion"] for r in records] == direct
    assert [(r["line"], r["sample"]) for r in records] == [(1, 0), (3, 0), (4, 0)]


def test_two_runs_write_identical_files(trained, tmp_path) -> None:
    prompts = _prompt_file(tmp_path / "p.jsonl")
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    for output in (first, second):
        _predict(trained, prompts, output, "--prediction.greedy=false",
                 "--prediction.samples=3", "--prediction.temperature=2.0")
    assert first.read_bytes() == second.read_bytes()
    # 3 prompts × 3 samples at temperature 2 on a tiny random model: not all alike
    assert len({r["completion"] for r in _records(first)}) > 1
    # the configured policy, untrained, with the same seed: the checkpoint's weights were used
    untrained = tmp_path / "untrained.jsonl"
    main(["predict", "--config", str(trained[0]), "--prediction.prompts", str(prompts),
          "--prediction.output", str(untrained), "--prediction.greedy=false",
          "--prediction.samples=3", "--prediction.temperature=2.0"])
    assert [r["completion"] for r in _records(untrained)] != \
        [r["completion"] for r in _records(first)]


def test_non_ascii_text_is_written_as_utf8(trained, tmp_path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "é+1="}) + "\n", encoding="utf-8")
    output = tmp_path / "out.jsonl"
    with pytest.warns(UserWarning, match="encodes as its unknown token"):  # the char tokenizer's
        _predict(trained, prompts, output)
    assert '"prompt": "é+1="' in output.read_text(encoding="utf-8")  # not "\u00e9"


def test_a_bad_prompt_file_names_its_file_and_line(trained, tmp_path, capsys) -> None:
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text('{"prompt": "1+1="}\n{oops\n', encoding="utf-8")
    output = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        _predict(trained, prompts, output)
    assert exit_info.value.code == 2
    assert f"trustregion: {prompts}:2: invalid JSON" in capsys.readouterr().err
    assert not output.exists()


def test_a_prompt_without_the_prompt_key_is_named(trained, tmp_path, capsys) -> None:
    prompts = tmp_path / "keys.jsonl"
    prompts.write_text('{"question": "1+1="}\n', encoding="utf-8")
    with pytest.raises(SystemExit):
        _predict(trained, prompts, tmp_path / "out.jsonl")
    assert (f"trustregion: {prompts}:1: missing key 'prompt' (keys present: 'question'); "
            "each line needs the prompt to complete") in capsys.readouterr().err


def test_a_prompt_too_long_for_the_context_is_refused(trained, tmp_path, capsys) -> None:
    # the tiny model's context is 64 tokens; a character tokenizer: 60 characters + BOS = 61
    # tokens, plus max_new_tokens=6 is 67 > 64
    prompts = tmp_path / "long.jsonl"
    prompts.write_text(json.dumps({"prompt": "1" * 60}) + "\n", encoding="utf-8")
    output = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        _predict(trained, prompts, output)
    assert exit_info.value.code == 2
    assert "plus max_new_tokens=6 exceeds the model's context of 64" in capsys.readouterr().err
    assert not output.exists()


@pytest.mark.parametrize("missing", ["prompts", "output"])
def test_prompts_and_output_are_required(trained, tmp_path, capsys, missing) -> None:
    given = {"prompts": str(_prompt_file(tmp_path / "p.jsonl")),
             "output": str(tmp_path / "out.jsonl")}
    del given[missing]
    config, checkpoint = trained
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--config", str(config), "--ckpt_path", str(checkpoint),
              *(f"--prediction.{k}={v}" for k, v in given.items())])
    assert exit_info.value.code == 2
    assert (f"error: the following arguments are required: predict.prediction.{missing}"
            in capsys.readouterr().err)


def test_an_output_in_a_missing_directory_is_refused(trained, tmp_path, capsys) -> None:
    output = tmp_path / "nowhere" / "out.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        _predict(trained, _prompt_file(tmp_path / "p.jsonl"), output)
    assert exit_info.value.code == 2
    assert (f"trustregion: the output's directory {output.parent} does not exist; create it "
            "first") in capsys.readouterr().err


def test_fit_has_no_prediction_settings(trained, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(trained[0]), "--prediction.prompts=p.jsonl"])
    assert exit_info.value.code == 2
    assert "prediction.prompts" in capsys.readouterr().err


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"samples": 2}, "samples=2 only apply to sampled decoding; set greedy: false to sample, "
                     "or leave them out"),
    ({"temperature": 0.5, "top_p": 0.9}, "temperature=0.5, top_p=0.9 only apply to sampled "
                                         "decoding; set greedy: false to sample, or leave them "
                                         "out"),
    ({"greedy": False, "samples": 0}, "samples must be an integer ≥ 1 (completions per "
                                      "prompt); got 0"),
    ({"batch_size": 0}, "batch_size must be an integer ≥ 1 (prompts generated together); "
                        "got 0"),
    ({"prompts": ""}, "prompts must be a non-empty string; got ''"),
])
def test_bad_settings_are_refused(kwargs, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        PredictionSettings(**{"prompts": "p.jsonl", "output": "o.jsonl", **kwargs})


def test_the_prompt_reader_skips_a_byte_order_mark_and_keeps_line_numbers(tmp_path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(UTF8_BOM + b'{"prompt": "2+2=", "answer": "4"}\r\n\r\n{"prompt": "3+3="}\n')
    assert load_jsonl_prompts(path) == [PromptLine(1, "2+2="), PromptLine(3, "3+3=")]
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"JSONL prompt file not found: {tmp_path / 'none.jsonl'}")):
        load_jsonl_prompts(tmp_path / "none.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(
            f"JSONL prompt file holds no prompts: {tmp_path / 'blank.jsonl'}")):
        load_jsonl_prompts(tmp_path / "blank.jsonl")


class _FailsOnSecondBatch(L.LightningModule):
    def predict_dataloader(self) -> PredictionBatches:
        return prediction_batches([PromptLine(1, "a"), PromptLine(2, "b")], batch_size=1)

    def predict_step(self, batch: Any, batch_idx: int) -> list[Completion]:
        if batch_idx == 1:
            raise RuntimeError("generation failed")
        return [Completion(line=1, prompt="a", sample=0, completion="b")]

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        return batch


def test_a_failed_prediction_leaves_the_output_as_it_was(tmp_path) -> None:
    output = tmp_path / "out.jsonl"
    output.write_text("earlier\n", encoding="utf-8")
    writer = CompletionWriter(output)
    trainer = L.Trainer(accelerator="cpu", callbacks=[writer], logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(RuntimeError, match="generation failed"):
        trainer.predict(_FailsOnSecondBatch())
    assert output.read_text(encoding="utf-8") == "earlier\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no temporary file


def test_the_output_may_not_be_a_directory(tmp_path) -> None:
    with pytest.raises(ValueError, match=re.escape(
            f"the output {tmp_path} is a directory; give a file path such as completions.jsonl")):
        CompletionWriter(tmp_path)


def test_predicting_without_prompts_says_what_to_do(random_model_dir) -> None:
    module = TrustRegionModule(policy=f"config:{random_model_dir}")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with pytest.raises(ValueError, match=re.escape(
            "predicting needs prompts: call prepare_prediction(prompts, settings) first")):
        trainer.predict(module)
