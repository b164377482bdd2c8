"""FP8 weights: row scales and codes by hand, the two matmul paths, and dtype casts."""

from __future__ import annotations

import copy
import doctest

import pytest
import torch
import torch.nn.functional as F

from trustregion.precision import fp8
from trustregion.precision.fp8 import (
    FP8Linear,
    dequantize_fp8_rows,
    describe_fp8_paths,
    fp8_linear_emulated,
    fp8_linear_scaled_mm,
    fp8_matmul_path,
    quantize_fp8_rows,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _hand_layer() -> FP8Linear:
    linear = torch.nn.Linear(3, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[448.0, -224.0, 1.0], [896.0, 0.0, 2.0]]))
        linear.bias.copy_(torch.tensor([1.0, -1.0]))
    return FP8Linear.from_linear(linear)


def test_the_docstring_examples_hold() -> None:
    result = doctest.testmod(fp8)
    assert result.attempted >= 3 and result.failed == 0


def test_row_scales_and_codes_by_hand() -> None:
    weight = torch.tensor([
        [448.0, -224.0, 1.0],   # amax 448 → scale 448/448 = 1: every value is an e4m3 value
        [896.0, 0.0, 3.0],      # amax 896 → scale 2: 896/2 = 448, 3/2 = 1.5 (e4m3: 1.100₂)
        [0.0, 0.0, 0.0],        # no amax: scale 1, codes 0 (no division by zero)
        [448.0, 17.0, -0.0],    # 17 lies halfway between e4m3's 16 and 18: ties to even → 16
    ])
    q, scale = quantize_fp8_rows(weight)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert scale.tolist() == [1.0, 2.0, 1.0, 1.0]
    assert q.float().tolist() == [[448.0, -224.0, 1.0], [448.0, 0.0, 1.5], [0.0, 0.0, 0.0],
                                  [448.0, 16.0, 0.0]]
    assert dequantize_fp8_rows(q, scale, torch.float32).tolist() == [
        [448.0, -224.0, 1.0], [896.0, 0.0, 3.0], [0.0, 0.0, 0.0], [448.0, 16.0, 0.0]]


def test_dequantised_weights_are_within_e4m3_rounding() -> None:
    weight = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_fp8_rows(weight)
    error = (dequantize_fp8_rows(q, scale, torch.float32) - weight).abs()
    # e4m3 keeps 3 mantissa bits: a normal value is off by at most 2⁻⁴ of itself; below the
    # smallest normal (2⁻⁶ · scale) the step is 2⁻⁹ · scale, so the error is at most half that
    bound = torch.maximum(weight.abs() * 2.0**-4, scale[:, None] * 2.0**-10)
    assert bool((error <= bound).all())
    assert bool((scale == weight.abs().amax(dim=1) / 448).all())


def test_a_non_matrix_is_refused() -> None:
    with pytest.raises(ValueError, match=r"needs a 2-D tensor; got shape \(3,\)"):
        quantize_fp8_rows(torch.ones(3))


def test_emulated_forward_by_hand() -> None:
    layer = _hand_layer()
    # row 0: 448 − 224 + 1 + bias 1 = 226; row 1: (448 + 0 + 1)·2 − 1 = 897
    out = layer(torch.ones(1, 3))
    assert out.tolist() == [[226.0, 897.0]]
    assert out.dtype == torch.float32


def test_cpu_runs_the_emulated_path() -> None:
    assert fp8_matmul_path("cpu") == "emulated"
    assert FP8Linear(32, 16).matmul_path("cpu") == "emulated"


@pytest.mark.skipif(not hasattr(F, "scaled_mm"), reason="torch without F.scaled_mm")
def test_the_scaled_mm_path_multiplies_fp8_activations_by_fp8_weights() -> None:
    # torch runs row-wise scaled_mm on CPU too, so the CUDA path's arithmetic is checked here
    gen = torch.Generator().manual_seed(1)
    x, weight, bias = torch.randn(5, 64, generator=gen), torch.randn(32, 64, generator=gen), \
        torch.randn(32, generator=gen)
    q, scale = quantize_fp8_rows(weight)
    out = fp8_linear_scaled_mm(x, q, scale, bias)
    x_q, x_scale = quantize_fp8_rows(x)
    product = (dequantize_fp8_rows(x_q, x_scale, torch.float64)
               @ dequantize_fp8_rows(q, scale, torch.float64).T)
    # the product is rounded to bf16 (unit roundoff 2⁻⁸), then the bias is added in fp32
    assert out.dtype == torch.float32 and out.shape == (5, 32)
    assert bool(((out.double() - product - bias.double()).abs()
                 <= 2.0**-8 * product.abs() + 1e-5).all())
    # against the emulated path, the activations' e4m3 rounding differs (≤ 2⁻⁴ of a normal
    # value, ≤ 2⁻¹⁰ of the row scale below the normals), and the product's bf16 rounding
    emulated = fp8_linear_emulated(x, q, scale, bias).double()
    weight_abs = dequantize_fp8_rows(q, scale, torch.float64).abs()
    magnitude = x.abs().double() @ weight_abs.T
    subnormal = x_scale.double()[:, None] * 2.0**-10 * weight_abs.sum(dim=1)[None, :]
    assert bool(((out.double() - emulated).abs()
                 <= (2.0**-4 + 2.0**-8) * magnitude + subnormal + 1e-5).all())
    assert not torch.equal(out, fp8_linear_emulated(x, q, scale, bias))


def test_layers_choose_their_path_and_fall_back_on_odd_dimensions(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fp8, "fp8_matmul_path", lambda device: "scaled_mm")
    model = torch.nn.Sequential(FP8Linear(64, 32), FP8Linear(32, 47))
    assert [layer.matmul_path("cuda") for layer in model] == ["scaled_mm", "emulated"]
    assert describe_fp8_paths(model, "cuda") == (
        "fp8 matmuls on cuda: scaled_mm (FP8 tensor cores) for 1 layers, emulated (dequantised "
        "weights) for 1 layers (1: dimensions not multiples of 16)")
    if hasattr(F, "scaled_mm"):
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
        layer = model[0]
        expected = fp8_linear_scaled_mm(x, layer.weight_fp8, layer.scale, layer.bias)
        assert torch.equal(layer(x), expected)


def test_describe_a_model_without_fp8_layers() -> None:
    assert describe_fp8_paths(torch.nn.Linear(2, 2), "cpu") == (
        "fp8 matmuls on cpu: none (the model has no FP8 layer)")


def test_module_casts_keep_the_fp8_weight_and_its_fp32_scale() -> None:
    layer = _hand_layer()
    weight, scale = layer.weight.detach().clone(), layer.weight_scale.detach().clone()
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.to("cpu", torch.float16),
                 lambda m: m.half(), lambda m: m.bfloat16(), lambda m: m.float()):
        cast(layer)
        assert layer.weight.dtype == torch.uint8 and torch.equal(layer.weight, weight)
        assert layer.weight_scale.dtype == torch.int32 and torch.equal(layer.weight_scale, scale)
    assert layer.weight_fp8.float().tolist() == [[448.0, -224.0, 1.0], [448.0, 0.0, 1.0]]
    assert layer.scale.dtype == torch.float32 and layer.scale.tolist() == [1.0, 2.0]
    layer.to(torch.bfloat16)
    assert layer.bias is not None and layer.bias.dtype == torch.bfloat16  # the bias follows casts
    out = layer(torch.ones(1, 3, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.tolist() == [[226.0, 896.0]]  # 897 → bf16 896


def test_state_dict_round_trip_and_deepcopy() -> None:
    layer = _hand_layer()
    state = layer.state_dict()
    assert {k: v.dtype for k, v in state.items()} == {
        "weight": torch.uint8, "weight_scale": torch.int32, "bias": torch.float32}
    # the uint8 codes are e4m3 bit patterns: 448 = 0 1111 110, −224 = 1 1110 110, 1 = 0 0111 000
    assert state["weight"][0].tolist() == [0b01111110, 0b11110110, 0b00111000]
    # the int32 scales are fp32 bit patterns: 1.0 = 0x3F800000, 2.0 = 0x40000000
    assert state["weight_scale"].tolist() == [0x3F800000, 0x40000000]
    fresh = FP8Linear(3, 2)
    fresh.load_state_dict(state)
    duplicate = copy.deepcopy(layer)
    x = torch.randn(4, 3)
    assert torch.equal(fresh(x), layer(x)) and torch.equal(duplicate(x), layer(x))


def test_rows_are_an_exact_lookup_into_the_fp8_matrix() -> None:
    layer = FP8Linear.from_linear(torch.nn.Linear(16, 10))
    ids = torch.tensor([[3, 0], [9, 3]])
    rows = layer.dequantized_rows(ids, torch.bfloat16)
    assert rows.shape == (2, 2, 16) and rows.dtype == torch.bfloat16
    assert torch.equal(rows, layer.dequantized_weight(torch.bfloat16)[ids])


@pytest.mark.gpu
@needs_cuda
def test_on_an_fp8_gpu_the_layer_runs_scaled_mm() -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 matmuls need compute capability ≥ 8.9")
    layer = FP8Linear.from_linear(torch.nn.Linear(64, 32)).cuda().to(torch.bfloat16)
    assert layer.matmul_path("cuda") == "scaled_mm"
    x = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    out = layer(x)
    q, scale = layer.weight_fp8, layer.scale
    emulated = fp8_linear_emulated(x.float(), q, scale, layer.bias).double()
    magnitude = x.abs().double() @ dequantize_fp8_rows(q, scale, torch.float64).abs().T
    assert out.dtype == torch.bfloat16
    assert bool(((out.double() - emulated).abs()
                 <= (2.0**-4 + 2.0**-7) * magnitude + 2.0**-7 * emulated.abs() + 1e-3).all())
