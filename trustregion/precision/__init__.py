"""Precision of the policy, behaviour and reference models.

* :class:`PrecisionSettings` — the ``precision:`` settings block and its checks;
* :func:`low_precision_copy`, :func:`load_weights`, :func:`model_bytes` — building, syncing and
  measuring a behaviour or reference model at fp32, bf16, fp16, int8, nf4 or fp8;
* :func:`fp8_matmul_path`, :func:`describe_fp8_paths` — whether FP8 matmuls run for real;
* :func:`enable_fp8_training` — torchao float8 training of the policy (``pip install -e
  ".[fp8]"``).
"""

from trustregion.precision.bnb_layers import Int8Linear, NF4Linear
from trustregion.precision.fp8 import (
    E4M3_MAX,
    FP8Linear,
    dequantize_fp8_rows,
    describe_fp8_paths,
    fp8_matmul_path,
    quantize_fp8_rows,
)
from trustregion.precision.fp8_training import enable_fp8_training
from trustregion.precision.quantize import (
    QUANTIZED_LINEAR_TYPES,
    load_weights,
    low_precision_copy,
    model_bytes,
)
from trustregion.precision.settings import (
    COMPUTE_PRECISIONS,
    POLICY_PRECISIONS,
    PRECISIONS,
    QUANTIZED_PRECISIONS,
    PrecisionSettings,
    torch_dtype,
)
from trustregion.precision.tied_embedding import QuantizedTiedEmbedding

__all__ = [
    "COMPUTE_PRECISIONS",
    "E4M3_MAX",
    "POLICY_PRECISIONS",
    "PRECISIONS",
    "QUANTIZED_LINEAR_TYPES",
    "QUANTIZED_PRECISIONS",
    "FP8Linear",
    "Int8Linear",
    "NF4Linear",
    "PrecisionSettings",
    "QuantizedTiedEmbedding",
    "dequantize_fp8_rows",
    "describe_fp8_paths",
    "enable_fp8_training",
    "fp8_matmul_path",
    "load_weights",
    "low_precision_copy",
    "model_bytes",
    "quantize_fp8_rows",
    "torch_dtype",
]
