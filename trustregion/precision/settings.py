"""The precision of each model, as one settings block.

In YAML (``model.precision``)::

    precision:
      behavior: fp8        # the model that samples rollouts, as an inference engine would run it
      reference: int8      # the frozen model of the KL penalty
      policy: auto         # the trained model: Lightning's trainer.precision decides
      compute: bf16        # activations and unquantised weights of int8/nf4/fp8 models
      quantize_lm_head: false  # true: quantise the lm_head too (and train it in fp8)

Formats of the behaviour and reference models:

* ``fp32``, ``bf16``, ``fp16``: every floating-point tensor cast to that dtype.
* ``int8``: each ``nn.Linear`` becomes a bitsandbytes ``Linear8bitLt`` (LLM.int8() weights,
  one absmax per output row: ``W ≈ round(127·W/absmax_row)·absmax_row/127``).
* ``nf4``: each ``nn.Linear`` becomes a bitsandbytes ``Linear4bit`` with NormalFloat-4 codes,
  one absmax per block of 64 weights (itself stored in 8 bits).
* ``fp8``: each ``nn.Linear`` weight stored as ``float8_e4m3fn`` with one fp32 scale per output
  row (``scale = amax_row / 448``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from trustregion.validation import boolean, one_of, require

__all__ = [
    "COMPUTE_PRECISIONS",
    "FP8_INSTALL_HINT",
    "POLICY_PRECISIONS",
    "PRECISIONS",
    "QUANTIZED_PRECISIONS",
    "PrecisionSettings",
    "require_torchao",
    "torch_dtype",
]

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "nf4", "fp8")
"""Formats of the behaviour and reference models."""

QUANTIZED_PRECISIONS = ("int8", "nf4", "fp8")
"""Formats that swap ``nn.Linear`` layers for quantised ones."""

COMPUTE_PRECISIONS = ("fp32", "bf16", "fp16")
"""Dtypes of activations and unquantised weights in an int8, nf4 or fp8 model."""

POLICY_PRECISIONS = ("auto", "fp8")
"""``auto``: ``trainer.precision`` decides (``32-true``, ``bf16-mixed``, ``bf16-true``,
``16-true``); ``fp8``: torchao float8 training of the policy's Linear layers."""

FP8_INSTALL_HINT = "pip install -e \".[fp8]\" (from a checkout) or pip install 'trustregion[fp8]'"

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str, *, setting: str = "precision.compute") -> torch.dtype:
    """The torch dtype of a compute precision name.

    >>> torch_dtype("bf16")
    torch.bfloat16
    >>> torch_dtype("int8")
    Traceback (most recent call last):
    ValueError: precision.compute must be one of 'fp32', 'bf16', 'fp16'; got 'int8'
    """
    return _DTYPES[one_of(setting, name, COMPUTE_PRECISIONS)]


def require_torchao(setting: str) -> None:
    """Raise ``ValueError`` naming ``setting`` and the extra to install when torchao is
    missing."""
    if importlib.util.find_spec("torchao") is None:
        raise ValueError(f"{setting}='fp8' trains with torchao float8, which is not installed; "
                         f"install the fp8 extra: {FP8_INSTALL_HINT}")


@dataclass(frozen=True)
class PrecisionSettings:
    """Precision of the policy, behaviour and reference models (see the module docstring).

    A ``compute`` other than the default, or ``quantize_lm_head``, with no model to apply to is
    refused rather than ignored.

    >>> PrecisionSettings(behavior="int8", reference="nf4").compute
    'bf16'
    >>> PrecisionSettings(compute="fp8")
    Traceback (most recent call last):
    ValueError: precision.compute must be one of 'fp32', 'bf16', 'fp16'; got 'fp8'
    """

    behavior: str = "fp32"
    reference: str = "fp32"
    policy: str = "auto"
    compute: str = "bf16"
    quantize_lm_head: bool = False

    def __post_init__(self) -> None:
        one_of("precision.behavior", self.behavior, PRECISIONS)
        one_of("precision.reference", self.reference, PRECISIONS)
        one_of("precision.policy", self.policy, POLICY_PRECISIONS,
               note="auto: trainer.precision decides; fp8: torchao float8 training")
        one_of("precision.compute", self.compute, COMPUTE_PRECISIONS)
        boolean("precision.quantize_lm_head", self.quantize_lm_head)
        if self.policy == "fp8":
            require_torchao("precision.policy")
        quantized = self.behavior in QUANTIZED_PRECISIONS or self.reference in QUANTIZED_PRECISIONS
        models = f"behavior={self.behavior!r}, reference={self.reference!r}"
        require(quantized or self.compute == "bf16",
                f"precision.compute={self.compute!r} is the dtype of int8, nf4 and fp8 models, "
                f"and there is none ({models}); leave compute out or quantise a model")
        require(quantized or self.policy == "fp8" or not self.quantize_lm_head,
                "precision.quantize_lm_head=True applies to int8, nf4 and fp8 models and to "
                f"policy='fp8', and there is none ({models}, policy={self.policy!r}); leave it "
                "out or quantise a model")
