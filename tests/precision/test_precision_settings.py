"""The precision settings block: defaults, accepted values and the exact refusals."""

from __future__ import annotations

import doctest
import sys

import pytest
import torch

from trustregion.precision import settings
from trustregion.precision.settings import (
    FP8_INSTALL_HINT,
    PRECISIONS,
    PrecisionSettings,
    torch_dtype,
)


def _message(**kwargs: object) -> str:
    with pytest.raises(ValueError) as info:
        PrecisionSettings(**kwargs)  # type: ignore[arg-type]
    return str(info.value)


def test_the_docstring_examples_hold() -> None:
    result = doctest.testmod(settings)
    assert result.attempted >= 3 and result.failed == 0


def test_defaults_are_full_precision_models_and_bf16_compute() -> None:
    assert PrecisionSettings() == PrecisionSettings(
        behavior="fp32", reference="fp32", policy="auto", compute="bf16", quantize_lm_head=False)
    assert PRECISIONS == ("fp32", "bf16", "fp16", "int8", "nf4", "fp8")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_format_is_accepted_for_behaviour_and_reference(precision: str) -> None:
    chosen = PrecisionSettings(behavior=precision, reference=precision)
    assert (chosen.behavior, chosen.reference) == (precision, precision)


def test_an_unknown_precision_names_the_setting_and_the_allowed_values() -> None:
    allowed = "'fp32', 'bf16', 'fp16', 'int8', 'nf4', 'fp8'"
    assert _message(behavior="int4") == f"precision.behavior must be one of {allowed}; got 'int4'"
    assert _message(reference="FP8") == f"precision.reference must be one of {allowed}; got 'FP8'"
    assert _message(policy="bf16") == (
        "precision.policy must be one of 'auto', 'fp8' (auto: trainer.precision decides; "
        "fp8: torchao float8 training); got 'bf16'")
    assert _message(behavior="fp8", compute="int8") == (
        "precision.compute must be one of 'fp32', 'bf16', 'fp16'; got 'int8'")
    assert _message(quantize_lm_head="yes") == (
        "precision.quantize_lm_head must be True or False; got 'yes'")


def test_settings_that_would_have_no_effect_are_refused() -> None:
    assert _message(behavior="bf16", compute="fp16") == (
        "precision.compute='fp16' is the dtype of int8, nf4 and fp8 models, and there is none "
        "(behavior='bf16', reference='fp32'); leave compute out or quantise a model")
    assert _message(quantize_lm_head=True) == (
        "precision.quantize_lm_head=True applies to int8, nf4 and fp8 models and to "
        "policy='fp8', and there is none (behavior='fp32', reference='fp32', policy='auto'); "
        "leave it out or quantise a model")
    # each applies as soon as one model uses it
    assert PrecisionSettings(reference="nf4", compute="fp16", quantize_lm_head=True).compute \
        == "fp16"


def test_fp8_policy_without_torchao_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # a None entry in sys.modules is how Python marks a module as not importable
    monkeypatch.setitem(sys.modules, "torchao", None)
    message = _message(policy="fp8")
    assert message == ("precision.policy='fp8' trains with torchao float8, which is not "
                       f"installed; install the fp8 extra: {FP8_INSTALL_HINT}")
    assert 'pip install -e ".[fp8]"' in message and "pip install 'trustregion[fp8]'" in message


def test_fp8_policy_with_torchao_installed_is_accepted() -> None:
    pytest.importorskip("torchao")
    assert PrecisionSettings(policy="fp8").policy == "fp8"


def test_compute_names_map_to_torch_dtypes() -> None:
    assert [torch_dtype(n) for n in ("fp32", "bf16", "fp16")] == [
        torch.float32, torch.bfloat16, torch.float16]
