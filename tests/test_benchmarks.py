"""The pure parts of the benchmarks: exact FLOP counting, padding counts, the comparison table
and argument checks (no timing)."""

from __future__ import annotations

import doctest
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and doctest look modules up by name
    spec.loader.exec_module(module)
    return module


train_step = _load("train_step")
rollout_bench = _load("rollout")


def test_linear_flops_of_a_two_layer_mlp() -> None:
    mlp = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    counter = train_step.LinearFlops(mlp)
    mlp(torch.ones(4, 3))
    assert counter.flops == 0  # not counting until active
    counter.active = True
    mlp(torch.ones(4, 3))
    # 4 rows: 2·3·5·4 = 120 (first layer) + 2·5·2·4 = 80 (second) = 200
    assert counter.flops == 200
    mlp(torch.ones(2, 6, 3))
    # [2, 6, 3] is 12 rows: 2·3·5·12 = 360 + 2·5·2·12 = 240 → 200 + 600 = 800
    assert counter.flops == 800
    assert counter.largest == (12, 3, 5)  # the 360-FLOP call
    counter.remove()
    mlp(torch.ones(4, 3))
    assert counter.flops == 800


def test_padding_counts_of_a_hand_built_batch() -> None:
    prompt = torch.tensor([[False, True, True], [True, True, True]])
    completion = torch.tensor([[True, False], [True, True]])
    # 2 rows × (3 + 2) = 10 positions; real: 2 + 1 (row 0) + 3 + 2 (row 1) = 8 → 2 padding
    assert train_step.padding_counts(prompt, completion) == (10, 2)


def test_compare_table() -> None:
    old = {"quickstart": {"iteration_s": 0.4, "update_s": 0.2, "padding_fraction": 0.0},
           "long": {"iteration_s": 3.4}}
    new = {"quickstart": {"iteration_s": 0.3, "update_s": 0.1, "padding_fraction": 0.02,
                          "update_mfu_square": 0.5}}
    # long is only in the old run: left out; update MFU only in the new one: "–" for old;
    # new/old: 0.3 / 0.4 = 0.75, 0.1 / 0.2 = 0.50, and "–" against an old value of 0.
    assert train_step.compare_table(old, new).splitlines() == [
        "| workload | figure | old | new | new/old |",
        "|---|---|---:|---:|---:|",
        "| quickstart | iteration, s | 0.400 | 0.300 | 0.75 |",
        "| quickstart | update, s | 0.200 | 0.100 | 0.50 |",
        "| quickstart | update padding fraction | 0.000 | 0.020 | – |",
        "| quickstart | update MFU vs 1024² matmul | – | 0.500 | – |",
    ]


@pytest.mark.parametrize("module", [train_step, rollout_bench], ids=["train_step", "rollout"])
def test_docstring_examples(module: ModuleType) -> None:
    result = doctest.testmod(module)
    assert result.failed == 0


@pytest.mark.parametrize(("argv", "message"), [
    (["--completion-tokens", "129"], "--completion-tokens: must be an integer in [32, 128]; "
                                     "got 129"),
    (["--completion-tokens", "16"], "--completion-tokens: must be an integer in [32, 128]; "
                                    "got 16"),
    (["--threads", "0"], "--threads: must be an integer ≥ 1; got 0"),
    (["--workload", "short"], "--workload: invalid choice: 'short'"),
])
def test_train_step_refuses_bad_arguments(argv: list[str], message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        train_step.parse_args(argv)
    assert message in capsys.readouterr().err


def test_rollout_refuses_a_group_size_that_does_not_divide_the_sequences(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        rollout_bench.parse_args(["--sequences", "12", "--group-size", "8"])
    assert "--group-size (8) must divide --sequences (12)" in capsys.readouterr().err
