"""bitsandbytes int8 and nf4 Linear layers that can be re-quantised, moved, cast, copied and
loaded from each other's state dicts.

* :class:`Int8Linear` is a ``bnb.nn.Linear8bitLt`` (``has_fp16_weights=False``,
  ``threshold=0.0``: every column in int8, no fp16 outlier decomposition). Its weight is an
  ``Int8Params`` holding ``CB = round(127 · W / SCB)`` (int8) and ``SCB`` = the absmax of each
  output row (fp32), so ``W ≈ CB · SCB / 127`` (rounding half to even). The codes are
  computed from the fp32 weight with bitsandbytes' ``int8_vectorwise_quant``; bitsandbytes'
  own ``Int8Params`` first casts the weight to fp16, a rounding (2⁻¹¹ relative) far below the
  int8 step that would only slow the re-quantisation on CPUs.
* :class:`NF4Linear` is a ``bnb.nn.Linear4bit`` with ``quant_type="nf4"``: weights in blocks
  of 64, each block divided by its absmax and rounded to the nearest of the 16 NormalFloat-4
  levels (two codes a byte); the block absmaxes are themselves quantised to 8 bits
  (``compress_statistics``), about 4.13 bits a weight in all.

What bitsandbytes leaves to the caller, and these classes do:

* the int8 row statistics stay on the weight (``weight.SCB``) and follow it to the device of
  every forward, so moving the model with ``model.to(device)`` works;
* an nf4 layer loads another nf4 layer's ``state_dict()`` (bitsandbytes 0.50 saves the quant
  state but does not read it back) by rebuilding the quant state from the saved keys;
* both re-quantise in place from a full-precision weight (:meth:`load_full_weight`) and look up
  dequantised rows (:meth:`dequantized_rows`) for an embedding tied to the layer;
* every state-dict key is also an attribute path of the layer (``SCB`` and ``weight_format`` of
  the int8 layer, ``weight.absmax`` … of the nf4 layer), as
  ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` (Lightning's FSDP
  checkpoints) requires;
* every state-dict tensor has a shape fixed by the layer's shape, never by its values, as
  sharded checkpoints (``torch.distributed.checkpoint``) require to load into the tensors of the
  current model. bitsandbytes packs the nf4 quant state's settings (including the float
  ``nested_offset``) into a JSON byte tensor whose length varies with the weights; the nf4
  layer pads it with spaces to :data:`NF4_QUANT_STATE_BYTES` bytes. JSON ignores trailing
  whitespace, so padded and unpadded quant states both load, here and in bitsandbytes.

bitsandbytes' int8 matmul quantises each activation row to int8 as well (after a cast to fp16)
and logs a warning saying so on every call; importing this module drops that one message, as
the int8 format here is defined to work that way.

Both keep their int8 / uint8 weights through ``model.to(torch.bfloat16)``; only the bias is
cast. The nf4 layer keeps bitsandbytes' standard weight layout on every CPU (the AVX512-BF16
repacking is turned off), so its state dict, row lookups and re-quantisation see one format.
"""

from __future__ import annotations

import logging
from typing import Any

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from torch import Tensor, nn

__all__ = ["NF4_BLOCKSIZE", "NF4_QUANT_STATE_BYTES", "Int8Linear", "NF4Linear"]

NF4_BLOCKSIZE = 64
"""Weights sharing one absmax in the nf4 format."""

NF4_QUANT_STATE_BYTES = 256
"""Length of the nf4 quant state's packed JSON settings in a state dict (padded with spaces).
The longest possible settings take about 210 bytes: ~140 of fixed text, two 19-digit shape
numbers and a 23-character float offset."""

_FP16_CAST_NOTICE = "MatMul8bitLt: inputs will be cast from"


class _WithoutFp16CastNotice(logging.Filter):
    """Drops bitsandbytes' per-call notice that int8 matmul inputs pass through fp16."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_FP16_CAST_NOTICE)


_BNB_MATMUL_LOGGER = logging.getLogger("bitsandbytes.autograd._functions")
if not any(isinstance(f, _WithoutFp16CastNotice) for f in _BNB_MATMUL_LOGGER.filters):
    _BNB_MATMUL_LOGGER.addFilter(_WithoutFp16CastNotice())


def _on_meta(device: torch.device | str | None) -> bool:
    return device is not None and torch.device(device).type == "meta"


def _target_device(layer: nn.Module, weight: Tensor) -> torch.device:
    """Where a re-quantised weight goes: the layer's device, or the weight's for a layer still
    on meta (being built)."""
    current = layer.get_parameter("weight").device
    return weight.device if current.type == "meta" else current


def _frozen_bias(linear: nn.Linear) -> nn.Parameter | None:
    if linear.bias is None:
        return None
    return nn.Parameter(linear.bias.detach().clone(), requires_grad=False)


class Int8Linear(bnb.nn.Linear8bitLt):
    """LLM.int8() weights with row-wise absmax scales (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, has_fp16_weights=False,
                         threshold=0.0, device=device)
        if not _on_meta(device):  # a layer built on meta is filled by from_linear
            self.load_full_weight(torch.zeros(out_features, in_features, device=device), None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """The int8 layer of ``linear``'s weight and bias."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    device="meta")
        layer.register_parameter("bias", _frozen_bias(linear))
        layer.load_full_weight(linear.weight, None)
        return layer

    @torch.no_grad()
    def load_full_weight(self, weight: Tensor, bias: Tensor | None) -> None:
        """Quantise ``weight`` (and copy ``bias``) into this layer, in place when the layer
        already holds int8 weights of that shape on that device."""
        weight = weight.detach().to(_target_device(self, weight))
        cb, scb, _ = bnbf.int8_vectorwise_quant(weight.float().contiguous())
        current: Any = self.weight  # an Int8Params, holding SCB
        if (current.dtype == torch.int8 and current.shape == cb.shape
                and current.device == cb.device and current.SCB is not None):
            current.copy_(cb)
            current.SCB.copy_(scb)
        else:
            # CB stays None: bitsandbytes' forward would otherwise move SCB off the weight
            self.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False,
                                            SCB=scb)
        self.state.CB = None
        self.state.SCB = None
        if self.bias is not None and bias is not None:
            self.bias.copy_(bias)

    def row_statistics(self) -> Tensor:
        """``SCB``: the absmax of each output row of the full-precision weight (fp32)."""
        weight: Any = self.weight  # an Int8Params, holding SCB
        scb = weight.SCB
        if scb is None:
            raise RuntimeError("this Int8Linear holds no row statistics (weight.SCB is None)")
        if scb.device != weight.device:
            scb = scb.to(weight.device)
            weight.SCB = scb
        return scb

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        """``CB · SCB / 127`` (bitsandbytes' own dequantisation), cast to ``dtype``."""
        return bnbf.int8_vectorwise_dequant(self.weight.detach(), self.row_statistics()).to(dtype)

    def dequantized_rows(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        """Rows ``ids`` of :meth:`dequantized_weight`, shaped ``ids.shape + (in_features,)``."""
        flat = ids.reshape(-1)
        rows = bnbf.int8_vectorwise_dequant(self.weight.detach()[flat],
                                            self.row_statistics()[flat])
        return rows.to(dtype).reshape(*ids.shape, self.in_features)

    @property
    def SCB(self) -> Tensor | None:  # bitsandbytes' name, and the state-dict key
        """The row statistics as the state dict holds them (``weight.SCB``), under the
        state-dict key's name, so that tools which look keys up as attribute paths find them."""
        weight: Any = self.weight  # an Int8Params, holding SCB
        return weight.SCB

    @property
    def weight_format(self) -> Tensor:
        """bitsandbytes' code for the weight layout, as the state dict holds it: 0 (row-major,
        the only layout bitsandbytes loads)."""
        return torch.tensor(0, dtype=torch.uint8)

    def forward(self, x: Tensor) -> Tensor:
        # hand bitsandbytes the weight's own int8 matrix and statistics on its current device
        self.state.CB = self.weight.data
        self.state.SCB = self.row_statistics()
        return super().forward(x)


def _load_nf4_state(module: nn.Module, state_dict: dict[str, Any], prefix: str,
                    *args: Any) -> None:
    """Load-state-dict pre-hook of :class:`NF4Linear`: rebuild the weight's quant state from
    the ``weight.*`` keys an nf4 ``state_dict()`` holds, and take those keys out."""
    stats_prefix = prefix + "weight."
    stats = {key[len(stats_prefix):]: state_dict.pop(key) for key in list(state_dict)
             if key.startswith(stats_prefix)}
    packed = state_dict.get(prefix + "weight")
    if not stats or packed is None:
        return  # a missing quant state is reported by load_state_dict as a shape mismatch
    assert isinstance(module, NF4Linear)
    device = module.weight.device
    quant_state = bnbf.QuantState.from_dict(stats, device=device)
    module.set_quantized(packed.detach().to(device).clone(), quant_state)


def _pad_nf4_state(module: nn.Module, state_dict: dict[str, Any], prefix: str,
                   local_metadata: Any) -> None:
    """State-dict post-hook of :class:`NF4Linear`: pad the packed JSON settings of the quant
    state with spaces to :data:`NF4_QUANT_STATE_BYTES` bytes, so that their length does not
    change with the weights."""
    key = prefix + "weight.quant_state.bitsandbytes__nf4"
    packed = state_dict.get(key)
    if packed is None:
        return
    if packed.numel() > NF4_QUANT_STATE_BYTES:
        raise ValueError(f"{key} packs {packed.numel()} bytes of quant-state settings, more "
                         f"than the {NF4_QUANT_STATE_BYTES} its state dict allows")
    padding = packed.new_full((NF4_QUANT_STATE_BYTES - packed.numel(),), ord(" "))
    state_dict[key] = torch.cat([packed, padding])


class NF4Linear(bnb.nn.Linear4bit):
    """NormalFloat-4 weights in blocks of 64 (see the module docstring); activations are
    multiplied in ``compute_dtype`` and returned in the input's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 compute_dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, compute_dtype=compute_dtype,
                         compress_statistics=True, quant_type="nf4", device=device)
        self.support_avx512bf16_for_cpu = False
        self.register_load_state_dict_pre_hook(_load_nf4_state)
        self.register_state_dict_post_hook(_pad_nf4_state)
        if not _on_meta(device):  # a layer built on meta is filled by from_linear
            self.load_full_weight(torch.zeros(out_features, in_features, device=device), None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype) -> NF4Linear:
        """The nf4 layer of ``linear``'s weight and bias."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    compute_dtype=compute_dtype, device="meta")
        layer.register_parameter("bias", _frozen_bias(linear))
        layer.load_full_weight(linear.weight, None)
        return layer

    def set_quantized(self, packed: Tensor, quant_state: bnbf.QuantState) -> None:
        """Hold ``packed`` nf4 codes with their ``quant_state``."""
        self.weight = bnb.nn.Params4bit(
            packed, requires_grad=False, quant_state=quant_state,
            blocksize=quant_state.blocksize, compress_statistics=quant_state.nested,
            quant_type=quant_state.quant_type, quant_storage=packed.dtype, module=self,
            bnb_quantized=True)
        self.quant_state = quant_state

    @torch.no_grad()
    def load_full_weight(self, weight: Tensor, bias: Tensor | None) -> None:
        """Quantise ``weight`` (and copy ``bias``) into this layer."""
        weight = weight.detach().to(_target_device(self, weight))
        packed, quant_state = bnbf.quantize_4bit(
            weight.contiguous(), blocksize=NF4_BLOCKSIZE, compress_statistics=True,
            quant_type="nf4", quant_storage=torch.uint8)
        self.set_quantized(packed, quant_state)
        if self.bias is not None and bias is not None:
            self.bias.copy_(bias)

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        """The nf4 weight dequantised (``code · absmax`` per block), cast to ``dtype``."""
        return bnbf.dequantize_4bit(self.weight.detach(), self.quantization()).to(dtype)

    def quantization(self) -> bnbf.QuantState:
        """The weight's quant state: block absmaxes (8-bit, with their own state), code table,
        shape and dtype of the full weight."""
        weight: Any = self.weight  # a Params4bit, holding its quant state
        return weight.quant_state

    def dequantized_rows(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        """Rows ``ids`` of :meth:`dequantized_weight`, shaped ``ids.shape + (in_features,)``.

        When a row fills whole blocks (``in_features`` a multiple of 64) only the looked-up rows
        are dequantised; otherwise the whole matrix is.
        """
        flat = ids.reshape(-1)
        quant_state = self.quantization()
        out_features, in_features = self.out_features, self.in_features
        if in_features % quant_state.blocksize:
            rows = self.dequantized_weight(dtype)[flat]
            return rows.reshape(*ids.shape, in_features)
        absmax = quant_state.absmax
        if quant_state.nested:
            absmax = bnbf.dequantize_blockwise(absmax, quant_state.state2) + quant_state.offset
        absmax = absmax.float().reshape(out_features, -1)[flat].reshape(-1)
        packed = self.weight.detach().reshape(out_features, in_features // 2)[flat].reshape(-1, 1)
        rows_state = bnbf.QuantState(
            absmax=absmax, shape=torch.Size((flat.numel(), in_features)), code=quant_state.code,
            blocksize=quant_state.blocksize, quant_type=quant_state.quant_type,
            dtype=quant_state.dtype)
        rows = bnbf.dequantize_4bit(packed, rows_state).to(dtype)
        return rows.reshape(*ids.shape, in_features)
