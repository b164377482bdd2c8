"""FP8 (e4m3) weights with one scale per output row, and the Linear layer that holds them.

Quantisation of a weight ``W`` (out × in), row by row::

    scale_r = amax_r / 448          (fp32; 448 is the largest float8_e4m3fn value; 1 if amax_r = 0)
    Q[r, :] = e4m3(W[r, :] / scale_r)          (round to nearest, so |Q| ≤ 448)
    W ≈ Q · scale                              (relative error ≤ 2⁻⁴ for normal values)

The matmul runs one of two ways (:func:`fp8_matmul_path` says which a device gets):

* ``scaled_mm``: on CUDA devices with compute capability ≥ 8.9 (Ada, Hopper and later), the
  activations are quantised to e4m3 on the fly with one scale per row (token) and multiplied
  by the FP8 weight in an FP8 tensor-core matmul (``torch.nn.functional.scaled_mm``, row-wise
  scales, bf16 output). It needs both weight dimensions to be multiples of 16; a layer whose
  dimensions are not falls back to the emulated matmul (:func:`describe_fp8_paths` says so).
* ``emulated``: the weight is dequantised (``Q · scale`` in fp32, then cast to the activations'
  dtype) and multiplied in that dtype — the weight rounding of an FP8 engine, without its
  activation rounding.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "E4M3_MAX",
    "FP8Linear",
    "dequantize_fp8_rows",
    "describe_fp8_paths",
    "fp8_linear_emulated",
    "fp8_linear_scaled_mm",
    "fp8_matmul_path",
    "quantize_fp8_rows",
]

E4M3_MAX = 448.0
"""The largest finite ``float8_e4m3fn`` value."""

FP8_DTYPE = torch.float8_e4m3fn


def quantize_fp8_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(Q, scale)`` of a 2-D tensor: ``Q`` in e4m3 and one fp32 scale per row, with
    ``x ≈ Q · scale[:, None]`` (see the module docstring). A row of zeros gets scale 1.

    >>> q, scale = quantize_fp8_rows(torch.tensor([[448.0, -224.0, 1.0], [896.0, 0.0, 2.0]]))
    >>> scale.tolist(), q.float().tolist()
    ([1.0, 2.0], [[448.0, -224.0, 1.0], [448.0, 0.0, 1.0]])
    """
    if x.dim() != 2:
        raise ValueError(f"FP8 row quantisation needs a 2-D tensor; got shape {tuple(x.shape)}")
    x = x.detach().float()
    scale = x.abs().amax(dim=1) / E4M3_MAX
    # an all-zero row (or one whose scale underflows) would divide by zero
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (x / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_fp8_rows(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``Q · scale[:, None]`` computed in fp32, then cast to ``dtype``."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def fp8_matmul_path(device: torch.device | str) -> Literal["scaled_mm", "emulated"]:
    """``"scaled_mm"`` where ``device`` runs FP8 matmuls (CUDA, compute capability ≥ 8.9, and a
    torch with ``torch.nn.functional.scaled_mm``), else ``"emulated"``.

    >>> fp8_matmul_path("cpu")
    'emulated'
    """
    device = torch.device(device)
    if (device.type == "cuda" and torch.cuda.is_available() and hasattr(F, "scaled_mm")
            and torch.cuda.get_device_capability(device) >= (8, 9)):
        return "scaled_mm"
    return "emulated"


def fp8_linear_emulated(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ (Q · scale)ᵀ + bias`` with the weight dequantised to ``x``'s dtype."""
    weight = dequantize_fp8_rows(q, scale, x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def fp8_linear_scaled_mm(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ (Q · scale)ᵀ + bias`` as an FP8 matmul: each row of ``x`` quantised to e4m3 with
    its own scale, row-wise scaled matmul with bf16 output, cast back to ``x``'s dtype. Needs
    both dimensions of ``Q`` to be multiples of 16 (CUDA's FP8 kernels require it)."""
    out_features, in_features = q.shape
    rows = x.reshape(-1, in_features)
    x_q, x_scale = quantize_fp8_rows(rows)
    out = F.scaled_mm(x_q, q.t(), x_scale[:, None].contiguous(), F.ScalingType.RowWise,
                      scale.float()[None, :].contiguous(), F.ScalingType.RowWise,
                      output_dtype=torch.bfloat16)
    out = out.to(x.dtype)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.reshape(*x.shape[:-1], out_features)


class FP8Linear(nn.Module):
    """A frozen Linear layer with an e4m3 weight and per-row fp32 scales (module docstring).

    Parameters, all frozen:

    * ``weight`` (out × in): the ``float8_e4m3fn`` codes ``Q``, stored as their bit patterns
      in ``uint8``; :attr:`weight_fp8` views them as ``float8_e4m3fn`` (no copy).
    * ``weight_scale`` (out): the fp32 row scales, stored as their bit patterns in ``int32``;
      :attr:`scale` views them as ``float32`` (no copy).
    * ``bias`` (out, optional): an ordinary parameter in the compute dtype.

    Stored as integers, the codes and scales come through unchanged wherever bitsandbytes'
    int8 and nf4 codes do: ``model.to(torch.bfloat16)`` (Lightning's ``bf16-true`` casts the
    whole LightningModule) casts only the bias; every collective backend broadcasts them (gloo
    has no float8, so DDP's start-up broadcast would fail on float8 parameters); and a model's
    ``dtype`` (its first floating-point parameter) stays the compute dtype.

    The output has the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(
            torch.zeros(out_features, in_features, device=device, dtype=torch.uint8),
            requires_grad=False)
        self.weight_scale = nn.Parameter(
            torch.ones(out_features, device=device, dtype=torch.float32).view(torch.int32),
            requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype),
                                  requires_grad=False) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FP8Linear:
        """The FP8 layer of ``linear``'s weight and bias (quantised from their full values)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        layer.load_full_weight(linear.weight, linear.bias)
        return layer

    @torch.no_grad()
    def load_full_weight(self, weight: Tensor, bias: Tensor | None) -> None:
        """Re-quantise in place from a full-precision ``weight`` (and copy ``bias``)."""
        q, scale = quantize_fp8_rows(weight.to(self.weight.device))
        self.weight.copy_(q.view(torch.uint8))
        self.weight_scale.copy_(scale.view(torch.int32))
        if self.bias is not None and bias is not None:
            self.bias.copy_(bias)

    @property
    def weight_fp8(self) -> Tensor:
        """The codes ``Q`` as ``float8_e4m3fn`` (a view of :attr:`weight`, no copy)."""
        return self.weight.detach().view(FP8_DTYPE)

    @property
    def scale(self) -> Tensor:
        """The row scales as ``float32`` (a view of :attr:`weight_scale`, no copy)."""
        return self.weight_scale.detach().view(torch.float32)

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        """``Q · scale`` in ``dtype`` (the weight the emulated matmul uses)."""
        return dequantize_fp8_rows(self.weight_fp8, self.scale, dtype)

    def dequantized_rows(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        """Rows ``ids`` of :meth:`dequantized_weight`, shaped ``ids.shape + (in_features,)``:
        an embedding lookup into the same FP8 matrix."""
        flat = ids.reshape(-1)
        rows = dequantize_fp8_rows(self.weight_fp8[flat], self.scale[flat], dtype)
        return rows.reshape(*ids.shape, self.in_features)

    def matmul_path(self, device: torch.device | str) -> Literal["scaled_mm", "emulated"]:
        """The matmul this layer runs on ``device``: ``scaled_mm`` needs the device's support
        and both weight dimensions to be multiples of 16."""
        if self.in_features % 16 or self.out_features % 16:
            return "emulated"
        return fp8_matmul_path(device)

    def forward(self, x: Tensor) -> Tensor:
        q, scale = self.weight_fp8, self.scale
        if self.matmul_path(x.device) == "scaled_mm":
            return fp8_linear_scaled_mm(x, q, scale, self.bias)
        return fp8_linear_emulated(x, q, scale, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight=float8_e4m3fn, per-row fp32 scales")


def describe_fp8_paths(model: nn.Module, device: torch.device | str) -> str:
    """One line saying how the FP8 layers of ``model`` multiply on ``device``, naming the
    layers that fall back to the emulated matmul on an FP8-capable device.

    >>> describe_fp8_paths(nn.Sequential(FP8Linear(32, 16), FP8Linear(16, 10)), "cpu")
    'fp8 matmuls on cpu: emulated (dequantised weights) for 2 layers'
    """
    paths = {name: layer.matmul_path(device) for name, layer in model.named_modules()
             if isinstance(layer, FP8Linear)}
    if not paths:
        return f"fp8 matmuls on {device}: none (the model has no FP8 layer)"
    counts = Counter(paths.values())
    parts = []
    if counts["scaled_mm"]:
        parts.append(f"scaled_mm (FP8 tensor cores) for {counts['scaled_mm']} layers")
    if counts["emulated"]:
        parts.append(f"emulated (dequantised weights) for {counts['emulated']} layers")
    line = f"fp8 matmuls on {device}: " + ", ".join(parts)
    if fp8_matmul_path(device) == "scaled_mm" and counts["emulated"]:
        fallbacks = [name for name, path in paths.items() if path == "emulated"]
        line += f" ({', '.join(fallbacks)}: dimensions not multiples of 16)"
    return line
