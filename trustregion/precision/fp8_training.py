"""FP8 training of the policy with torchao (``precision.policy: fp8``).

torchao's ``convert_to_float8_training`` swaps ``nn.Linear`` layers for ``Float8Linear``: the
forward and backward matmuls run in float8 (e4m3 for inputs and weights, e5m2 where torchao's
recipe says so) with dynamic tensor-wise scales, while the master weights, optimiser state and
every other layer stay in their own precision. On H100/H200 GPUs the matmuls run on FP8 tensor
cores; on a CPU torchao emulates them, slowly but with the same rounding.

torchao is an optional extra: ``pip install -e ".[fp8]"`` or ``pip install 'trustregion[fp8]'``.
"""

from __future__ import annotations

import warnings
from types import ModuleType

from torch import nn

from trustregion.precision.settings import FP8_INSTALL_HINT

__all__ = ["enable_fp8_training", "import_torchao_float8"]

def import_torchao_float8() -> ModuleType:
    """``torchao.float8`` (its import noise is filtered by
    :func:`~trustregion.known_noise.drop_torchao_import_noise`); ``ValueError`` naming the extra
    to install when torchao is missing."""
    try:
        import torchao.float8 as float8
    except ImportError as error:
        raise ValueError("precision.policy='fp8' trains with torchao float8, which is not "
                         f"installed ({error}); install the fp8 extra: {FP8_INSTALL_HINT}"
                         ) from error
    return float8


def _output_layer(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def enable_fp8_training(model: nn.Module, *, quantize_lm_head: bool = False) -> int:
    """Convert ``model``'s Linear layers to torchao ``Float8Linear`` in place and return how
    many were converted.

    Skipped: the lm_head (the model's output embedding) unless ``quantize_lm_head``, and layers
    whose ``in_features`` or ``out_features`` is not a multiple of 16 (FP8 kernels need it);
    a layer skipped for its sizes is named in a warning. Raises ``ValueError`` when torchao is
    missing or no layer can be converted.
    """
    float8 = import_torchao_float8()
    from torchao.float8.float8_linear import Float8Linear

    output = _output_layer(model)

    unfit: list[str] = []

    def convertible(module: nn.Module, fqn: str) -> bool:  # torchao asks only of nn.Linear
        assert isinstance(module, nn.Linear)
        if isinstance(module, Float8Linear) or (module is output and not quantize_lm_head):
            return False
        fits = module.in_features % 16 == 0 and module.out_features % 16 == 0
        if not fits:
            unfit.append(f"{fqn} ({module.out_features}×{module.in_features})")
        return fits

    before = sum(isinstance(m, Float8Linear) for m in model.modules())
    float8.convert_to_float8_training(model, module_filter_fn=convertible)
    converted = sum(isinstance(m, Float8Linear) for m in model.modules()) - before
    if converted == 0:
        raise ValueError(
            f"precision.policy='fp8' found no nn.Linear layer of {type(model).__name__} to "
            "train in float8 (layers need in and out features that are multiples of 16; the "
            "lm_head is skipped unless precision.quantize_lm_head is true); use "
            "precision.policy='auto'")
    if unfit:
        warnings.warn(f"precision.policy='fp8' leaves {', '.join(unfit)} in its own precision: "
                      "FP8 matmuls need sizes that are multiples of 16", stacklevel=2)
    return converted
