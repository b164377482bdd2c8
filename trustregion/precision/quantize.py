"""Low-precision copies of a causal LM, re-quantised from the policy's weights.

:func:`low_precision_copy` builds the behaviour or reference model at a format of
:data:`~trustregion.precision.settings.PRECISIONS`; :func:`load_weights` re-quantises it from
the policy's current ``state_dict()``, the way an inference engine receives new weights;
:func:`model_bytes` counts what a model holds.

In an int8, nf4 or fp8 copy every ``nn.Linear`` is swapped for its quantised twin
(:class:`~trustregion.precision.bnb_layers.Int8Linear`,
:class:`~trustregion.precision.bnb_layers.NF4Linear`,
:class:`~trustregion.precision.fp8.FP8Linear`) and everything else (embeddings, norms, biases)
is cast to the ``compute`` dtype. Layers converted for FP8 training (torchao's
``Float8Linear``) become plain ``nn.Linear`` layers first, in every format. The lm_head (the
model's output embedding) is left in ``compute`` unless ``quantize_lm_head``; when it is
quantised and tied to the input embedding, the input embedding reads its rows from the
quantised lm_head
(:class:`~trustregion.precision.tied_embedding.QuantizedTiedEmbedding`), so the vocabulary
matrix is stored once.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import TypeVar

import bitsandbytes as bnb
import torch
from torch import Tensor, nn

from trustregion.precision.bnb_layers import Int8Linear, NF4Linear
from trustregion.precision.fp8 import FP8Linear
from trustregion.precision.settings import (
    COMPUTE_PRECISIONS,
    PRECISIONS,
    QUANTIZED_PRECISIONS,
    torch_dtype,
)
from trustregion.precision.tied_embedding import QuantizedTiedEmbedding
from trustregion.validation import boolean, one_of

__all__ = ["QUANTIZED_LINEAR_TYPES", "load_weights", "low_precision_copy", "model_bytes"]

QUANTIZED_LINEAR_TYPES = (Int8Linear, NF4Linear, FP8Linear)
"""The layers an int8, nf4 or fp8 copy holds in place of ``nn.Linear``."""

ModelT = TypeVar("ModelT", bound=nn.Module)

_LAYER_NAMES = {"int8": "bitsandbytes Linear8bitLt", "nf4": "bitsandbytes Linear4bit (nf4)",
                "fp8": "FP8Linear (e4m3 weights, per-row scales)"}


def _output_layer(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _input_embedding(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    try:
        return get() if callable(get) else None
    except NotImplementedError:
        return None


def _ties_embeddings(model: nn.Module) -> bool:
    embedding, output = _input_embedding(model), _output_layer(model)
    weight = getattr(embedding, "weight", None)
    return weight is not None and weight is getattr(output, "weight", None)


def _swappable(module: nn.Module | None) -> bool:
    """An ``nn.Linear`` (or a subclass, such as torchao's Float8Linear) that is not already
    quantised."""
    return isinstance(module, nn.Linear) and not isinstance(
        module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))


def _quantized(linear: nn.Linear, precision: str, compute: torch.dtype
               ) -> Int8Linear | NF4Linear | FP8Linear:
    if precision == "int8":
        return Int8Linear.from_linear(linear)
    if precision == "nf4":
        return NF4Linear.from_linear(linear, compute)
    return FP8Linear.from_linear(linear)


def _plain_linears(model: nn.Module) -> None:
    """Replace training-time Linear layers (torchao's Float8Linear, from ``precision.policy:
    fp8``) by plain ``nn.Linear`` layers holding the same parameters: a behaviour or reference
    model runs the matmuls of its own format."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and type(module).__module__.startswith("torchao."):
            plain = nn.Linear(module.in_features, module.out_features,
                              bias=module.bias is not None, device="meta")
            plain.weight = module.weight
            plain.register_parameter("bias", module.bias)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, plain)


def _frozen_copy(model: ModelT) -> ModelT:
    duplicate = copy.deepcopy(model)
    _plain_linears(duplicate)
    for parameter in duplicate.parameters():
        parameter.grad = None
    duplicate.requires_grad_(False)
    return duplicate.eval()


def low_precision_copy(model: ModelT, precision: str, *, compute: str = "bf16",
                       quantize_lm_head: bool = False,
                       setting: str = "precision.behavior") -> ModelT:
    """A frozen copy of ``model`` (same class; eval mode, ``requires_grad`` False) at
    ``precision``.

    ``fp32``, ``bf16`` and ``fp16`` cast every floating-point tensor (``compute`` is not
    used). ``int8``, ``nf4`` and ``fp8`` swap the ``nn.Linear`` layers for quantised ones,
    quantised from ``model``'s full-precision weights, and cast the rest to ``compute``
    (module docstring). ``setting`` names the setting in error messages.

    Raises ``ValueError`` for an unknown precision or compute, and for a quantised format when
    ``model`` has no Linear layer to swap.
    """
    precision = one_of(setting, precision, PRECISIONS)
    compute_dtype = torch_dtype(one_of("precision.compute", compute, COMPUTE_PRECISIONS))
    boolean("precision.quantize_lm_head", quantize_lm_head)
    if precision not in QUANTIZED_PRECISIONS:
        return _frozen_copy(model).to(torch_dtype(precision, setting=setting))

    output = _output_layer(model)
    names = [name for name, module in model.named_modules()
             if _swappable(module) and (quantize_lm_head or module is not output)]
    if not names:
        lm_head = (" (the lm_head is kept in the compute dtype unless "
                   "precision.quantize_lm_head is true)" if _swappable(output) else "")
        raise ValueError(
            f"{setting}={precision!r} swaps nn.Linear layers for {_LAYER_NAMES[precision]}, "
            f"but {type(model).__name__} has no nn.Linear layer to swap{lm_head}; choose one "
            f"of 'fp32', 'bf16', 'fp16' for {setting}")

    tied = _ties_embeddings(model)
    duplicate = _frozen_copy(model)
    new_output: Int8Linear | NF4Linear | FP8Linear | None = None
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = duplicate.get_submodule(parent_name)
        linear = parent.get_submodule(child)
        assert isinstance(linear, nn.Linear)
        layer = _quantized(linear, precision, compute_dtype)
        setattr(parent, child, layer)
        if model.get_submodule(name) is output:
            new_output = layer
    if tied and new_output is not None:
        embedding = _input_embedding(duplicate)
        name = next(name for name, module in duplicate.named_modules() if module is embedding)
        parent_name, _, child = name.rpartition(".")
        setattr(duplicate.get_submodule(parent_name), child,
                QuantizedTiedEmbedding(new_output, compute_dtype))
    duplicate.to(compute_dtype)  # quantised weights keep their own dtypes
    return duplicate.requires_grad_(False).eval()


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _keys_under(prefixes: Iterable[str], keys: Iterable[str]) -> set[str]:
    starts = tuple(prefixes)
    return {key for key in keys if starts and key.startswith(starts)}


def _same_values(a: Tensor, b: Tensor) -> bool:
    if a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride():
        return True
    return a.shape == b.shape and bool(torch.equal(a, b.to(a.device)))


def _check_keys(missing: Iterable[str], extra: Iterable[str]) -> None:
    missing, extra = sorted(missing), sorted(extra)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing from the source: {', '.join(missing[:8])}"
                         + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
        if extra:
            parts.append(f"not in the target: {', '.join(extra[:8])}"
                         + (f" (+{len(extra) - 8} more)" if len(extra) > 8 else ""))
        raise ValueError("load_weights needs a full-precision state dict keyed like the target "
                         "model's source (its policy's state_dict()); keys " + "; ".join(parts))


@torch.no_grad()
def load_weights(target: nn.Module, source_state: Mapping[str, Tensor]) -> None:
    """Re-quantise or cast ``target`` (a :func:`low_precision_copy`) in place from
    ``source_state``, a full-precision state dict keyed like the source model's
    ``state_dict()``.

    Each quantised layer is quantised afresh from its full weight, every other tensor is cast
    into its target's dtype: afterwards ``target`` equals ``low_precision_copy`` of a model
    holding ``source_state``, bit for bit. Raises ``ValueError`` naming the keys when
    ``source_state`` lacks a key the target needs or holds one it has no place for, or when
    the target ties two tensors whose source values differ; nothing is changed then.
    """
    layers = {name: module for name, module in target.named_modules()
              if isinstance(module, QUANTIZED_LINEAR_TYPES)}
    tied = {name: module for name, module in target.named_modules()
            if isinstance(module, QuantizedTiedEmbedding)}
    state = target.state_dict(keep_vars=True)
    plain = set(state) - _keys_under(map(_prefix, layers), state)

    needed = set(plain)
    for name, layer in layers.items():
        needed.add(_prefix(name) + "weight")
        if layer.bias is not None:
            needed.add(_prefix(name) + "bias")
    needed.update(_prefix(name) + "weight" for name in tied)
    _check_keys(needed - set(source_state), set(source_state) - needed)

    layer_names = {id(layer): name for name, layer in layers.items()}
    for name, embedding in tied.items():
        output_name = layer_names.get(id(embedding.output_layer))
        if output_name is None:
            raise ValueError(f"{name} reads its rows from a layer outside the target model")
        if not _same_values(source_state[_prefix(output_name) + "weight"],
                            source_state[_prefix(name) + "weight"]):
            raise ValueError(f"the target's {name} reads its rows from {output_name}, but the "
                             f"source's {name}.weight and {output_name}.weight differ")
    first_key: dict[int, str] = {}
    for key in sorted(plain):
        ptr = state[key].data_ptr()
        if state[key].numel() == 0:
            continue
        if ptr in first_key and not _same_values(source_state[first_key[ptr]], source_state[key]):
            raise ValueError(f"the target ties {first_key[ptr]} and {key}, but their source "
                             "values differ")
        first_key.setdefault(ptr, key)

    for name, layer in layers.items():
        prefix = _prefix(name)
        bias = source_state[prefix + "bias"] if layer.bias is not None else None
        layer.load_full_weight(source_state[prefix + "weight"], bias)
    for key in plain:
        state[key].copy_(source_state[key])


def _quantization_state(module: nn.Module) -> list[Tensor | None]:
    """Tensors a bitsandbytes layer holds outside its parameters and buffers."""
    if isinstance(module, bnb.nn.Linear8bitLt):
        return [getattr(module.weight, "SCB", None), module.state.CB, module.state.SCB]
    if isinstance(module, bnb.nn.Linear4bit):
        quant_state = getattr(module.weight, "quant_state", None)
        if quant_state is None:
            return []
        found = [quant_state.absmax, quant_state.code, quant_state.offset]
        if quant_state.state2 is not None:
            found += [quant_state.state2.absmax, quant_state.state2.code]
        return found
    return []


def model_bytes(model: nn.Module) -> int:
    """Bytes held by ``model``: every parameter, buffer and bitsandbytes quantisation state,
    each storage counted once (tied weights, and views of one storage, count once)."""
    seen: set[tuple[torch.device, int]] = set()
    total = 0
    tensors: list[Tensor | None] = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        tensors += _quantization_state(module)
    for tensor in tensors:
        if not isinstance(tensor, Tensor) or tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        key = (tensor.device, storage.data_ptr())
        if storage.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total
